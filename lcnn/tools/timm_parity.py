"""Fidelity check: time one model with timm's inference-benchmark method and with lcnn.benchmark, print the ratio.

timm's ``benchmark.py`` (pytorch-image-models repository; not shipped in the pip wheel) times inference like
this: ``num_warm_iter`` (default 10) untimed steps, then ``num_bench_iter`` (default 40) steps under
``torch.no_grad()`` on a ``torch.randn`` batch; each step is timed with ``time.perf_counter()`` (on CUDA the
step end synchronizes first); ``samples_per_sec = batch * steps / wall time of the whole timed loop`` and
``step_time = mean per-step time``. :func:`timm_method` re-implements that method (written from the
description above, not copied). It is applied to the *same* model instance and input as lcnn's eager fp32
NCHW measurement, so the comparison isolates the timing method (timm's script would also build its model with
``global_pool='fast'``, a model change, not a timing one). The two methods alternate ``repeats`` times so slow
drift of the host (other jobs, thermal) hits both alike; medians are compared.

    python -m lcnn.tools.timm_parity --timm-name mobilenetv3_large_100 --img-size 224 --batch-size 8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

from lcnn import models, timing
from lcnn.benchmark import resolve_device
from lcnn.utils import LcnnError, atomic_write_json, cli, environment


def timm_method(model: nn.Module, x: torch.Tensor, warmup: int = 10, iters: int = 40) -> dict[str, float]:
    """timm's InferenceBenchmarkRunner timing: per-step perf_counter under no_grad, throughput over the loop."""
    cuda = x.device.type == "cuda"

    def clock(sync: bool = False) -> float:
        if sync and cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def step() -> float:
        begin = clock()
        model(x)
        return clock(sync=True) - begin

    with torch.no_grad():
        for _ in range(warmup):
            step()
        step_total, loop_start = 0.0, clock()
        for _ in range(iters):
            step_total += step()
        loop_s = clock(sync=True) - loop_start
    return {"samples_per_sec": x.shape[0] * iters / loop_s, "step_time_ms": 1000 * step_total / iters}


def lcnn_method(model: nn.Module, batch: int, img_size: int, device: torch.device, warmup: int, iters: int) -> dict:
    """lcnn.benchmark's eager fp32 NCHW timing (lcnn.timing), same counts, no time budget."""
    settings = {"warmup": warmup, "iters": iters, "time_budget_s": None}
    probe = timing.MemProbe(device)
    return timing.time_torch(
        model, device=device, precision="fp32", channels_last=False, batch=batch, img_size=img_size,
        settings=settings, probe=probe,
    )  # fmt: skip


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Time ``cfg['timm_name']`` at ``batch_size`` with both methods ``repeats`` times; return both and ratios."""
    device = resolve_device(cfg.get("device", "cpu"))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    img_size, batch = cfg.get("img_size", 224), cfg.get("batch_size", 8)
    warmup, iters, repeats = cfg.get("warmup", 10), cfg.get("iters", 40), cfg.get("repeats", 3)
    if min(batch, iters, repeats) < 1 or warmup < 0:
        raise LcnnError("batch_size, iters and repeats must be >= 1 and warmup >= 0")
    model = models.create(cfg["timm_name"], cfg.get("num_classes", 1000), img_size=img_size).eval().to(device)
    x = timing.make_input(batch, img_size, device)
    timm_runs, lcnn_runs = [], []
    for i in range(repeats):
        for name in ("timm", "lcnn") if i % 2 == 0 else ("lcnn", "timm"):
            if name == "timm":
                timm_runs.append(timm_method(model, x, warmup, iters))
            else:
                lcnn_runs.append(lcnn_method(model, batch, img_size, device, warmup, iters))
            last = timm_runs[-1] if name == "timm" else lcnn_runs[-1]
            ips = last.get("samples_per_sec", last.get("throughput_ips"))
            ms = last.get("step_time_ms", last.get("latency_ms_mean"))
            print(f"[parity] run {i + 1}/{repeats} {name:<4} {ips:9.1f} img/s  {ms:8.2f} ms/step", file=sys.stderr)
    timm_ips = statistics.median(r["samples_per_sec"] for r in timm_runs)
    timm_ms = statistics.median(r["step_time_ms"] for r in timm_runs)
    lcnn_ips = statistics.median(r["throughput_ips"] for r in lcnn_runs)
    lcnn_ms = statistics.median(r["latency_ms_mean"] for r in lcnn_runs)
    return {
        "timm_name": cfg["timm_name"], "img_size": img_size, "batch_size": batch, "device": device.type,
        "threads": torch.get_num_threads(), "warmup": warmup, "iters": iters, "repeats": repeats,
        "timm_samples_per_sec": timm_ips, "timm_step_time_ms": timm_ms,
        "lcnn_throughput_ips": lcnn_ips, "lcnn_latency_ms_mean": lcnn_ms,
        "lcnn_latency_ms_p50": statistics.median(r["latency_ms_p50"] for r in lcnn_runs),
        "throughput_ratio_lcnn_over_timm": lcnn_ips / timm_ips, "step_time_ratio_lcnn_over_timm": lcnn_ms / timm_ms,
        "timm_runs": timm_runs, "lcnn_runs": lcnn_runs, "env": environment(),
    }  # fmt: skip


@cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Compare lcnn.benchmark's eager timing with timm's benchmark method.")
    p.add_argument("--timm-name", required=True)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--warmup", type=int, default=10, help="timm's default num_warm_iter")
    p.add_argument("--iters", type=int, default=40, help="timm's default num_bench_iter")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each method (medians compared)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", help="also write the full result as JSON")
    args = p.parse_args(argv)
    result = run(vars(args))
    if args.out:
        atomic_write_json(args.out, result)
    print(
        f"{result['timm_name']} b={result['batch_size']} {result['img_size']}px {result['device']} "
        f"{result['threads']} threads: timm method {result['timm_samples_per_sec']:.1f} img/s "
        f"({result['timm_step_time_ms']:.2f} ms/step), lcnn {result['lcnn_throughput_ips']:.1f} img/s "
        f"(mean {result['lcnn_latency_ms_mean']:.2f} ms, p50 {result['lcnn_latency_ms_p50']:.2f} ms); "
        f"ratio lcnn/timm throughput {result['throughput_ratio_lcnn_over_timm']:.3f}, "
        f"step time {result['step_time_ratio_lcnn_over_timm']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()

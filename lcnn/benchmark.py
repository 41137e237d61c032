"""Inference benchmark of one model: per-batch latency distribution, throughput, memory and deployment checks.

Why it is built this way (what a deployment engineer needs to trust the numbers):

* Every timed iteration is timed on its own, so ``latency_ms_p50/p90/p99`` are real per-batch latencies, not
  ``1000 / throughput``. On the GPU each iteration is bracketed by CUDA events and synchronized, so no queued
  asynchronous work escapes the clock. ``throughput_ips = batch * iters / wall time of the timed loop``.
* Warm-up iterations run first, untimed (oneDNN/cuDNN algorithm selection, allocator growth, torch.compile).
  Warm-up and timing each stop at their count or ``time_budget_s``, whichever comes first (at least
  MIN_WARMUP / MIN_ITERS iterations), so a configuration takes at most about 2 x budget plus one iteration;
  the row's ``iters`` says how many were timed.
* Precisions are autocast dtypes (fp32 weights, activations in fp16/bf16). fp16 on the CPU is recorded as
  "unsupported" rather than timed through slow fallback kernels.
* ``peak_mem_mb``: GPU = ``torch.cuda.max_memory_allocated`` during the configuration (weights + activations +
  workspaces). CPU = peak resident set size during the configuration (Linux ``VmHWM``, reset through
  ``/proc/self/clear_refs`` before it) minus the process RSS before the model was built (:func:`run`; for
  :func:`benchmark_model` without ``rss_baseline_mb``: the RSS at its start, weights excluded). It includes allocator
  caches kept from earlier configurations, so it is an upper-side estimate; ``None`` where the kernel does not
  allow the reset.
* An out-of-memory batch becomes an "oom" row (memory is freed, larger batches of that configuration are
  recorded as "oom" without running); any other exception becomes an "error" row; the sweep goes on and the
  JSON is always written.
* Deployment forms: "trained" (as trained), "reparam" (``timm.utils.model.reparameterize_model`` when it
  changes the model: RepVGG, MobileOne, FastViT, TinyViT's conv-bn), "compiled" (``torch.compile``), and the
  ONNX Runtime edge path (lcnn.bench_onnx). A form whose outputs drift from the trained model beyond
  ``REL_TOL`` is not timed; its rows say why.

Output beyond the contract: rows also carry ``latency_ms_max`` and ``threads`` (torch intra-op threads, or ORT's);
the top level adds ``weights``, ``device``, ``forms`` (params/FLOPs per form), ``settings`` (resolved, plus TF32/
cuDNN flags), ``host_load_avg_1m`` and ``host_other_cpu_share``: the fraction of the host's CPU time other processes
used during the run (from /proc/stat minus this process's CPU time). With threads = cores, even a little other
work stalls every parallel region; CPU timings from a run with a share above a few percent are not trustworthy.

``python -m lcnn.benchmark --timm-name resnet18 --num-classes 10`` benchmarks a random-init timm model.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcnn.utils import LcnnError, atomic_write_json, cli, environment, json_arg, read_json

ROW_KEYS = (
    "form", "engine", "device", "precision", "channels_last", "batch_size", "status", "error",
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_max",
    "throughput_ips", "peak_mem_mb", "iters", "threads",
)  # fmt: skip
PRECISIONS = ("fp32", "fp16", "bf16")
MIN_ITERS = 5  # fewest timed iterations a row may have, whatever the time budget
MIN_WARMUP = 2  # fewest warm-up iterations when the warm-up hits the time budget
REL_TOL = 1e-3  # max |diff| / max |reference output| accepted for a deployment form
SEED = 0
DEFAULTS: dict[str, Any] = {  # standalone defaults; the Snakemake rule passes config.yaml's benchmark section
    "device": "auto", "batch_sizes": [1, 8, 32], "precisions": ["fp32", "fp16", "bf16"],
    "channels_last": [False, True], "compile": False, "reparameterize": True, "warmup": 10, "iters": 50,
    "time_budget_s": 10.0, "img_size": None, "onnx": True, "onnx_threads": 2, "onnx_int8": False,
    "val_manifest": None, "val_limit": 500, "onnx_out": None, "quiet": False,
}  # fmt: skip
IGNORED_KEYS = {"variant"}  # benchmark-section keys that concern the workflow, not this tool


def _log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the device (or host) ran out of memory."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    return isinstance(err, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def _proc_status_mb(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


class MemProbe:
    """Peak memory of one configuration (see the module docstring for what it means on each device)."""

    def __init__(self, device: torch.device, rss_baseline_mb: float | None = None):
        self.device = device
        self.baseline = rss_baseline_mb if rss_baseline_mb is not None else _proc_status_mb("VmRSS")
        self.can_reset = True

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            self.can_reset = False

    def peak_mb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        hwm = _proc_status_mb("VmHWM")
        if not self.can_reset or hwm is None or self.baseline is None:
            return None
        return max(hwm - self.baseline, 0.0)


def measure(
    step: Callable[[], Any], *, warmup: int, iters: int, budget_s: float | None, cuda: bool = False
) -> dict[str, Any]:
    """Warm up, then time ``step()`` per iteration; return the latency distribution (ms/batch) and wall time.

    Both loops stop at their count or after ``budget_s`` seconds, whichever comes first (at least MIN_WARMUP
    warm-up and MIN_ITERS timed iterations). On CUDA each iteration is timed with events and synchronized.
    """
    start = time.perf_counter()
    for i in range(warmup):
        step()
        if budget_s is not None and i + 1 >= MIN_WARMUP and time.perf_counter() - start >= budget_s:
            break
    if cuda:
        torch.cuda.synchronize()
    min_iters = min(MIN_ITERS, iters)
    latencies: list[float] = []
    start = time.perf_counter()
    while len(latencies) < iters:
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step()
            end.record()
            end.synchronize()
            latencies.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            step()
            latencies.append((time.perf_counter() - t0) * 1e3)
        if budget_s is not None and len(latencies) >= min_iters and time.perf_counter() - start >= budget_s:
            break
    total_s = time.perf_counter() - start
    return {"latencies_ms": latencies, "total_s": total_s}


def summarize(latencies_ms: list[float], total_s: float, batch: int) -> dict[str, Any]:
    """Row statistics from per-iteration latencies: mean/p50/p90/p99/max (ms per batch) and images/s."""
    lat = np.asarray(latencies_ms, dtype=float)
    p50, p90, p99 = np.percentile(lat, [50, 90, 99])
    return {
        "latency_ms_mean": float(lat.mean()),
        "latency_ms_p50": float(p50),
        "latency_ms_p90": float(p90),
        "latency_ms_p99": float(p99),
        "latency_ms_max": float(lat.max()),
        "throughput_ips": batch * len(lat) / total_s,
        "iters": len(lat),
    }


def make_row(**fields: Any) -> dict[str, Any]:
    """A result row with every key of ROW_KEYS (``None`` where not applicable)."""
    unknown = set(fields) - set(ROW_KEYS)
    if unknown:
        raise ValueError(f"unknown row keys {sorted(unknown)}")
    return {key: fields.get(key) for key in ROW_KEYS}


def progress_line(row: dict[str, Any]) -> str:
    cl = {True: "on", False: "off", None: "-"}[row["channels_last"]]
    head = f"[bench] {row['form']:<9} {row['precision']:<4} cl={cl:<3} b={row['batch_size']:<4}"
    if row["status"] == "ok":
        return (
            f"{head} -> p50 {row['latency_ms_p50']:9.2f} ms  mean {row['latency_ms_mean']:9.2f} ms  "
            f"{row['throughput_ips']:9.1f} img/s  ({row['iters']} it)"
        )
    return f"{head} -> {row['status']}: {row['error']}"


def make_input(
    batch: int, img_size: int, device: torch.device, channels_last: bool = False, seed: int = SEED
) -> torch.Tensor:
    """A fixed (seeded) random image batch, so every form and engine sees the same input."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LcnnError(f"benchmark device '{name}' requested but CUDA is not available; use --device cpu or auto")
    if device.type not in ("cpu", "cuda"):
        raise LcnnError(f"unsupported benchmark device '{name}'; use auto, cpu or cuda")
    return device


def precision_unsupported(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` is not measured on ``device`` (None when it is)."""
    if precision == "fp16" and device.type == "cpu":
        return "fp16 is not benchmarked on the CPU (no fast fp16 kernels; bf16 is the CPU half precision)"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU does not support bf16"
    return None


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int, device: torch.device) -> int | None:
    """FLOPs of one forward pass at batch 1 (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(make_input(1, img_size, device))
        return int(counter.get_total_flops())
    except Exception as err:  # an exotic op the counter cannot trace must not stop the benchmark
        _log(f"[bench] FLOP counting failed: {type(err).__name__}: {err}")
        return None


def _signature(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()) + tuple(model.state_dict())


def reparameterized(model: nn.Module) -> nn.Module | None:
    """timm's fused deployment form of ``model`` (a copy), or None when reparameterization changes nothing."""
    from timm.utils.model import reparameterize_model

    fused = reparameterize_model(model).eval()
    return fused if _signature(fused) != _signature(model) else None


def output_diff(reference: nn.Module, other: Callable[[torch.Tensor], Any], img_size: int, device) -> tuple:
    """(max |diff|, max |diff| / max |reference|) of the outputs on a fixed batch of 2, eval mode, fp32."""
    x = make_input(2, img_size, device)
    with torch.inference_mode():
        ref = reference(x).float()
        out = torch.as_tensor(other(x)).float().to(ref.device)
    abs_diff = float((ref - out).abs().max())
    return abs_diff, abs_diff / max(float(ref.abs().max()), 1e-12)


def _error_text(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_torch(
    module: Callable, *, device, precision, channels_last, batch, img_size, settings, probe: MemProbe
) -> dict[str, Any]:
    """Time one torch configuration under inference_mode (and autocast) and return its statistics."""
    x = make_input(batch, img_size, device, channels_last)
    probe.reset()
    with torch.inference_mode(), autocast(precision, device):
        timing = measure(
            lambda: module(x),
            warmup=settings["warmup"],
            iters=settings["iters"],
            budget_s=settings["time_budget_s"],
            cuda=device.type == "cuda",
        )
    return {**summarize(timing["latencies_ms"], timing["total_s"], batch), "peak_mem_mb": probe.peak_mb()}


def sweep_form(
    form: str, model: nn.Module, settings: dict, device: torch.device, img_size: int, probe: MemProbe,
    skip_reason: str | None = None, compile_model: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """All precision x memory-format x batch-size rows of one form; failures become rows, never exceptions."""
    rows = []
    for precision in settings["precisions"]:
        unsupported = precision_unsupported(precision, device)
        for cl in settings["channels_last"]:
            oom_at = None
            module: Callable = model
            if not unsupported and not skip_reason:
                model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                if compile_model:
                    module = _compiled(model, len(settings["batch_sizes"]))
            for batch in settings["batch_sizes"]:
                base = {"form": form, "engine": "torch", "device": device.type, "precision": precision}
                base.update(channels_last=cl, batch_size=batch, threads=torch.get_num_threads())
                if skip_reason or unsupported:
                    status = "error" if skip_reason else "unsupported"
                    rows.append(make_row(**base, status=status, error=skip_reason or unsupported))
                    if batch != settings["batch_sizes"][0]:
                        continue  # one progress line for the whole configuration
                elif oom_at is not None:
                    error = f"skipped: batch {oom_at} already ran out of memory"
                    rows.append(make_row(**base, status="oom", error=error))
                else:
                    failure = None
                    try:
                        stats = bench_torch(
                            module, device=device, precision=precision, channels_last=cl, batch=batch,
                            img_size=img_size, settings=settings, probe=probe,
                        )  # fmt: skip
                        rows.append(make_row(**base, **stats, status="ok"))
                    except Exception as err:  # one configuration's failure must not lose the others
                        failure = ("oom" if is_oom(err) else "error", _error_text(err))
                    if failure:  # outside the except block, so the traceback's tensors can be freed
                        free_memory(device)
                        oom_at = batch if failure[0] == "oom" else None
                        rows.append(make_row(**base, status=failure[0], error=failure[1]))
                _log(progress_line(rows[-1]), settings["quiet"])
    model.to(memory_format=torch.contiguous_format)
    return rows


def _compiled(model: nn.Module, n_shapes: int) -> Callable:
    """torch.compile with one static graph per batch size; the recompile limit is raised so that no batch size
    silently falls back to eager (dynamo's default limit is 8 graphs)."""
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n_shapes + 4))
    return torch.compile(model, dynamic=False)


def benchmark_model(model: nn.Module, cfg: dict[str, Any], rss_baseline_mb: float | None = None) -> dict[str, Any]:
    """Benchmark an already built model; ``cfg`` as for :func:`run` (model_name, timm_name, ..., benchmark)."""
    settings = resolve_settings(cfg.get("benchmark") or {})
    device = resolve_device(settings["device"])
    img_size = settings["img_size"] or cfg.get("img_size") or _default_img_size(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    probe = MemProbe(device, rss_baseline_mb)
    load_start, cpu_start = _load_avg(), _cpu_times()
    model = model.eval().to(device)
    forms: dict[str, dict[str, Any]] = {"trained": {"params": count_params(model)}}
    forms["trained"]["flops"] = count_flops(model, img_size, device)
    checks: dict[str, Any] = {"reparam_max_abs_diff": None, "onnx_max_abs_diff": None}
    checks["onnx_vs_eager_speedup_b1"] = None
    rows = sweep_form("trained", model, settings, device, img_size, probe)

    deploy, deploy_form = model, "trained"
    fused, skip = None, None
    try:
        fused = reparameterized(model) if settings["reparameterize"] else None
        if fused is not None:
            abs_diff, rel_diff = output_diff(model, fused, img_size, device)
            checks.update(reparam_max_abs_diff=abs_diff, reparam_rel_diff=rel_diff, reparam_ok=rel_diff <= REL_TOL)
            forms["reparam"] = {"params": count_params(fused), "flops": count_flops(fused, img_size, device)}
            if rel_diff > REL_TOL:
                skip = f"reparameterized outputs differ from trained (rel diff {rel_diff:.2e} > {REL_TOL})"
    except Exception as err:  # a broken fuse() must not lose the trained rows
        skip, fused = f"reparameterization failed: {_error_text(err)}", fused or model
        checks["reparam_ok"] = False
    if fused is not None:
        rows += sweep_form("reparam", fused, settings, device, img_size, probe, skip_reason=skip)
        if skip is None:
            deploy, deploy_form = fused, "reparam"
    if settings["compile"]:
        rows += sweep_form("compiled", deploy, settings, device, img_size, probe, compile_model=True)
    if settings["onnx"]:
        from lcnn import bench_onnx  # imported lazily: onnx/onnxruntime are only needed for this path

        onnx_rows, onnx_checks = bench_onnx.onnx_section(
            deploy, deploy_form=deploy_form, img_size=img_size, settings=settings, sweep_rows=rows, probe=probe
        )
        rows += onnx_rows
        checks.update(onnx_checks)

    other_share = _other_cpu_share(cpu_start, _cpu_times())
    if other_share is not None and other_share > 0.05:
        _log(f"[bench] warning: other processes used {other_share:.0%} of this host's CPU time during the benchmark; "
             "CPU timings are unreliable, rerun on an idle host")  # fmt: skip
    return {
        "model": cfg.get("model_name") or cfg.get("timm_name") or type(model).__name__,
        "timm_name": cfg.get("timm_name"),
        "img_size": img_size,
        "num_classes": cfg.get("num_classes"),
        "weights": str(cfg["weights"]) if cfg.get("weights") else None,
        "device": device.type,
        "env": environment(),
        "params": forms["trained"]["params"],
        "gmacs": forms["trained"]["flops"] / 2e9 if forms["trained"]["flops"] is not None else None,
        "flops": forms["trained"]["flops"],
        "forms": forms,
        "rows": rows,
        "checks": checks,
        "settings": {**settings, **_backend_flags(device)},
        "host_load_avg_1m": {"start": load_start, "end": _load_avg()},
        "host_other_cpu_share": other_share,  # other work on the host skews CPU timings; ~0 means a clean run
    }


def _cpu_times() -> tuple[float, float, float] | None:
    """(host busy s, host total s, this process's CPU s), from /proc/stat (Linux) and os.times()."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, own.user + own.system


def _other_cpu_share(start: tuple | None, end: tuple | None) -> float | None:
    """Fraction of all the host's CPU time that other processes used between two :func:`_cpu_times`."""
    if start is None or end is None or end[1] <= start[1]:
        return None
    other = (end[0] - start[0]) - (end[2] - start[2])
    return min(max(other / (end[1] - start[1]), 0.0), 1.0)


def _load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _backend_flags(device: torch.device) -> dict[str, Any]:
    flags: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_capability": None}
    with contextlib.suppress(Exception):
        flags["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":  # TF32 changes what "fp32" means on Ampere and newer GPUs
        flags.update(
            cuda_matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return flags


def _default_img_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def resolve_settings(section: dict[str, Any]) -> dict[str, Any]:
    """Merge a benchmark section onto DEFAULTS and validate it, with errors that name the fix."""
    unknown = set(section) - set(DEFAULTS) - IGNORED_KEYS
    if unknown:
        _log(f"[bench] warning: ignoring unknown benchmark settings {sorted(unknown)}")
    s = {**DEFAULTS, **{k: v for k, v in section.items() if k in DEFAULTS}}
    if not s["batch_sizes"] or any(not isinstance(b, int) or b < 1 for b in s["batch_sizes"]):
        raise LcnnError(f"benchmark batch_sizes must be positive integers, got {s['batch_sizes']}")
    s["batch_sizes"] = sorted(set(s["batch_sizes"]))  # ascending, so an OOM can skip the larger ones
    bad = [p for p in s["precisions"] if p not in PRECISIONS]
    if bad or not s["precisions"]:
        raise LcnnError(f"benchmark precisions must be among {', '.join(PRECISIONS)}, got {s['precisions']}")
    if isinstance(s["channels_last"], bool):
        s["channels_last"] = [s["channels_last"]]
    if not s["channels_last"] or any(not isinstance(c, bool) for c in s["channels_last"]):
        raise LcnnError(f"benchmark channels_last must be a list of true/false, got {s['channels_last']}")
    if s["iters"] < 1 or s["warmup"] < 0 or s["onnx_threads"] < 1:
        raise LcnnError("benchmark iters and onnx_threads must be >= 1 and warmup >= 0")
    if s["time_budget_s"] is not None and s["time_budget_s"] <= 0:
        raise LcnnError(f"benchmark time_budget_s must be > 0 or null, got {s['time_budget_s']}")
    return s


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the model (lcnn.models, weights optional), benchmark it and write ``cfg['out']`` atomically.

    cfg keys: timm_name, model_name (defaults to timm_name), num_classes (1000), img_size (training resolution;
    None = the model's default), weights (safetensors path or None = random init), out (JSON path or None),
    benchmark (the config's benchmark section; missing keys take DEFAULTS).
    """
    from lcnn import models

    resolve_device(resolve_settings(cfg.get("benchmark") or {})["device"])  # fail fast, before building the model
    rss_baseline = _proc_status_mb("VmRSS")
    model = models.create(cfg["timm_name"], cfg.get("num_classes") or 1000, img_size=cfg.get("img_size"))
    if cfg.get("weights"):
        models.load_weights(model, cfg["weights"])
    else:
        _log("[bench] no --weights: benchmarking a random-init model (timing is valid, accuracy checks are not)")
    result = benchmark_model(model, cfg, rss_baseline_mb=rss_baseline)
    if cfg.get("out"):
        atomic_write_json(cfg["out"], result)
        counts: dict[str, int] = {}
        for row in result["rows"]:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        _log(f"[bench] wrote {cfg['out']} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    return result


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark a timm model's inference (latency, throughput, ONNX).")
    p.add_argument("--timm-name", help="timm architecture, e.g. mobilenetv3_large_100 (or from --run-config)")
    p.add_argument("--model-name", help="study name for the output (default: the run config's model or timm name)")
    p.add_argument("--weights", help="safetensors weights (default: random init, for timing only)")
    p.add_argument("--run-config", help="a training run's config.json: supplies timm_name, num_classes, img_size")
    p.add_argument("--num-classes", type=int, help="classifier classes (default: run config's, else 1000)")
    p.add_argument("--img-size", type=int, help="training resolution (default: run config's, else the model's)")
    p.add_argument("--config-json", help="JSON file holding the config's benchmark section; flags override it")
    p.add_argument("--out", help="output JSON (default: benchmarks/{model}.json)")
    p.add_argument("--bench-img-size", type=int, dest="bench_img_size", help="benchmark resolution override")
    p.add_argument("--batch-sizes", type=_csv(int), help="e.g. 1,8,32")
    p.add_argument("--precisions", type=_csv(str), help="e.g. fp32,bf16")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--iters", type=int, help="timed iterations per configuration (at most)")
    p.add_argument("--warmup", type=int, help="untimed warm-up iterations per configuration")
    p.add_argument("--time-budget", type=float, dest="time_budget_s", help="seconds per configuration (at most)")
    p.add_argument("--channels-last", choices=("both", "on", "off"))
    p.add_argument("--compile", action="store_const", const=True, help="also time torch.compile'd models")
    p.add_argument("--no-reparam", dest="reparameterize", action="store_const", const=False)
    p.add_argument("--no-onnx", dest="onnx", action="store_const", const=False)
    p.add_argument("--onnx-threads", type=int, help="intra-op threads for ORT and the eager comparison")
    p.add_argument("--onnx-int8", action="store_const", const=True, help="also time ORT int8 dynamic quantization")
    p.add_argument("--onnx-out", help="keep the exported ONNX model at this path")
    p.add_argument("--val-manifest", help="val.csv to measure the int8 model's top-1 change on real images")
    p.add_argument("--val-limit", type=int, help="validation images used for the int8 check (default 500)")
    p.add_argument("--quiet", action="store_const", const=True, help="no progress lines on stderr")
    return p.parse_args(argv)


def _config_section(text: str) -> dict[str, Any]:
    """The benchmark section from --config-json: inline JSON or a file, holding the section or a whole config."""
    return dict(json_arg(text, "--config-json", section="benchmark"))


@cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    section = _config_section(args.config_json) if args.config_json else {}
    overrides = {k: v for k, v in vars(args).items() if k in DEFAULTS and k != "img_size" and v is not None}
    if args.channels_last:
        overrides["channels_last"] = {"both": [False, True], "on": [True], "off": [False]}[args.channels_last]
    if args.bench_img_size:
        overrides["img_size"] = args.bench_img_size
    section.update(overrides)
    run_cfg = read_json(args.run_config) if args.run_config else {}
    timm_name = args.timm_name or run_cfg.get("timm_name")
    if not timm_name:
        raise LcnnError("name the model: --timm-name NAME, or --run-config runs/.../config.json")
    model_name = args.model_name or run_cfg.get("model") or timm_name
    cfg = {
        "model_name": model_name,
        "timm_name": timm_name,
        "weights": args.weights,
        "num_classes": args.num_classes or run_cfg.get("num_classes") or 1000,
        "img_size": args.img_size or run_cfg.get("img_size"),
        "out": args.out or f"benchmarks/{model_name}.json",
        "benchmark": section,
    }
    return run(cfg)


if __name__ == "__main__":
    main()

"""Timing core shared by the eager benchmark (lcnn.benchmark) and the ONNX Runtime path (lcnn.bench_onnx).

One home for how anything is timed, so every engine's row means the same thing:

* :func:`measure` warms up, then times each iteration on its own (CUDA events and a synchronization on the GPU),
  so :func:`latency_stats` reports real per-batch latencies, not ``1000 / throughput``. Both loops stop at their
  count or the time budget, whichever comes first (at least MIN_WARMUP / MIN_ITERS iterations).
* :class:`MemProbe` is the peak memory of one configuration's timed calls (reset after its warm-up):
  ``torch.cuda.max_memory_allocated`` on the GPU; on the CPU the peak resident set size (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs``) minus a baseline.
* :func:`make_input` is a seeded random batch, so every form and engine sees the same input; :func:`val_batches`
  are real validation images (timm's eval transform) for the accuracy and agreement checks.
* :func:`make_row` gives every result row the same keys (ROW_KEYS), ``None`` where a key does not apply.
* :func:`exact_fp32` turns TF32 off, so an equivalence check compares true fp32 outputs.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROW_KEYS = (
    "form", "engine", "device", "precision", "channels_last", "batch_size", "status", "error",
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "latency_ms_max",
    "throughput_ips", "peak_mem_mb", "iters", "threads",
    "fp32_max_abs_diff", "fp32_rel_diff", "fp32_top1_agreement",
)  # fmt: skip
MIN_ITERS = 5  # fewest timed iterations a row may have, whatever the time budget
MIN_WARMUP = 2  # fewest warm-up iterations when the warm-up hits the time budget
REL_TOL = 1e-3  # max |diff| / max |reference output| accepted for an fp32 deployment form (reparam, ONNX)
SEED = 0


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then give the caller its own count back.

    torch's thread count is process-wide, and it changes float sums: a caller that goes on training (a test
    process) would otherwise train differently after the block.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def log(msg: str, quiet: bool = False) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def error_text(err: BaseException) -> str:
    """``Type: first line`` of an exception, short enough for a result row."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def is_oom(err: BaseException) -> bool:
    """Whether ``err`` means the device (or host) ran out of memory."""
    if isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    msg = str(err).lower()
    # cuBLAS and cuDNN report a failed workspace allocation in their own words
    return isinstance(err, RuntimeError) and any(
        words in msg for words in ("out of memory", "can't allocate memory", "alloc_failed", "allocation failed")
    )


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def rss_mb(key: str = "VmRSS") -> float | None:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB; None off Linux."""
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
        self.baseline = rss_baseline_mb if rss_baseline_mb is not None else rss_mb()
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
        hwm = rss_mb("VmHWM")
        if not self.can_reset or hwm is None or self.baseline is None:
            return None
        return max(hwm - self.baseline, 0.0)


def measure(
    step: Callable[[], Any], *, warmup: int, iters: int, budget_s: float | None, cuda: bool = False,
    compiled: bool = False, on_warm: Callable[[], Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Warm up, then time ``step()`` per iteration; return the latency distribution (ms/batch) and wall time.

    On CUDA (cuDNN's autotuning with ``cudnn.benchmark``, lazy kernel loading) and for a compiled module (a new
    batch size compiles a new graph) the first call does one-off work, so at least one warm-up call always runs.
    ``on_warm`` is called once the warm-up has finished, before the first timed call (a memory probe's reset).
    """
    if cuda or compiled:
        warmup = max(warmup, 1)
    start = time.perf_counter()
    for i in range(warmup):
        step()
        if budget_s is not None and i + 1 >= MIN_WARMUP and time.perf_counter() - start >= budget_s:
            break
    if cuda:
        torch.cuda.synchronize()
    if on_warm is not None:
        on_warm()
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
    return {"latencies_ms": latencies, "total_s": time.perf_counter() - start}


def latency_stats(latencies_ms: list[float], total_s: float, batch: int) -> dict[str, Any]:
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


def val_indices(n_images: int, limit: int) -> np.ndarray:
    """Evenly spaced indices: manifests are sorted by class, so the first ``limit`` images would cover few."""
    return np.unique(np.linspace(0, n_images - 1, min(n_images, limit)).astype(int))


def val_images(manifest: str | Path, model: torch.nn.Module, img_size: int):
    """A manifest's images through the trainer's own eval transform, so a top-1 here matches the run's top-1."""
    from lcnn.data import ManifestDataset
    from lcnn.recipe import transforms

    pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
    timm_name = pretrained_cfg.get("architecture")
    if not timm_name:
        raise ValueError("the model has no timm pretrained_cfg naming its architecture; build it with lcnn.models")
    if pretrained_cfg.get("tag"):  # the weights' config the run was trained under (lcnn.models.create's tag)
        timm_name = f"{timm_name}.{pretrained_cfg['tag']}"
    no_augment = {"scale": (1.0, 1.0), "hflip": 0.0, "color_jitter": 0.0, "auto_augment": None, "re_prob": 0.0}
    return ManifestDataset(manifest, transform=transforms(no_augment, img_size, timm_name)[1])


def image_batches(dataset, indices: np.ndarray, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) batches of ``dataset`` at ``indices``, decoded once so every engine sees the same ones."""
    out = []
    for start in range(0, len(indices), batch):
        items = [dataset[int(i)] for i in indices[start : start + batch]]
        out.append((torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])))
    return out


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for cuBLAS and cuDNN inside the block (restored after), so fp32 means fp32 in a check."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype={"fp16": torch.float16, "bf16": torch.bfloat16}[precision])


def time_torch(
    module: Callable, *, device, precision, channels_last, batch, img_size, settings, probe: MemProbe,
    compiled: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Time one torch configuration under inference_mode (and autocast) and return its statistics.

    The peak memory is that of the timed calls: the probe is reset after the warm-up, whose first call holds
    one-off memory (cuDNN's autotuning tries each algorithm's workspace, a compiled graph its autotuning) that
    would otherwise be every GPU row's peak, most of all at small batches.
    """
    x = make_input(batch, img_size, device, channels_last)
    with torch.inference_mode(), autocast(precision, device):
        timing = measure(
            lambda: module(x),
            warmup=settings["warmup"],
            iters=settings["iters"],
            budget_s=settings["time_budget_s"],
            cuda=device.type == "cuda",
            compiled=compiled,
            on_warm=probe.reset,
        )
    return {**latency_stats(timing["latencies_ms"], timing["total_s"], batch), "peak_mem_mb": probe.peak_mb()}


def host_cpu_times() -> tuple[float, float, float] | None:
    """(host busy s, host total s, this process's CPU s), from /proc/stat (Linux) and os.times()."""
    try:
        ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    own = os.times()
    return (sum(ticks) - ticks[3] - ticks[4]) / hz, sum(ticks) / hz, own.user + own.system


def other_cpu_share(start: tuple | None, end: tuple | None) -> float | None:
    """Fraction of the host's CPU time that other processes used between two :func:`host_cpu_times`.

    With threads = cores, even a little other work stalls every parallel region, so CPU timings from a run with a
    share above a few percent are not trustworthy.
    """
    if start is None or end is None or end[1] <= start[1]:
        return None
    other = (end[0] - start[0]) - (end[2] - start[2])
    return min(max(other / (end[1] - start[1]), 0.0), 1.0)


def load_avg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None

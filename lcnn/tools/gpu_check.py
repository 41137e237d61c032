"""GPU acceptance check: one command that proves lcnn's CUDA path on the card it runs on, in under 8 minutes.

Why: GPUs are lent to this project rarely and briefly, so the proof is one prepared command with a time budget per
part and a global deadline. Each check records ``ok``, ``failed`` or ``skipped`` with its reason; the tool writes
``gpu_check.json`` and ``gpu_check.md`` and exits 1 if any check failed. Without a GPU it says so in one line and
exits 0 (``--require-gpu`` makes that an error). Usage::

    .venv/bin/python -m lcnn.tools.gpu_check --out gpu_check/

The checks, in order (budgets in :data:`BUDGETS_S`):

* ``train``: each of config.yaml's models trains 20 steps at 224 px on one fixed synthetic batch, in bf16 and in fp16
  with the grad scaler, through ``Accelerator(mixed_precision=...)`` like lcnn.train; the loss must stay finite and
  the mean of the last 5 steps must be below that of the first 5.
* ``resume``: an fp16 run (MobileNetV3-L, 64 px, built-in data) is sent SIGTERM mid-epoch through
  ``python -m lcnn.train``, rerun, and its weights compared with an uninterrupted run's.
* ``multi_gpu``: with two or more GPUs, the same run through the train rule's launcher, ``lcnn.launch --nproc 2``.
* ``syncs``: lcnn.train's own loop (MobileNetV3-L, 64 px, built-in data, loader workers, ``log_every`` 5) in fp16
  and bf16, under ``torch.cuda.set_sync_debug_mode("warn")``: every synchronizing CUDA call and every host read of
  a tensor is recorded with its step, and they must come only at the ``log_every`` checks and the epoch's end.
* ``throughput``: training images/s at batch 128, bf16, channels_last, lcnn's step against a bare PyTorch loop.
* ``benchmark``: lcnn.benchmark's fp16 sweep (batch 1 to 512, CUDA events) beside timm's published figures.
* ``oom``: a batch too large for the card is recorded as ``oom`` and the sweep goes on.

Not in the default run (``--checks compile`` runs it): ``compile``, what ``train.compile`` gains, MobileNetV3-L's
compiled lcnn step against the eager bare loop, with the time spent compiling.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pandas as pd
import yaml

from lcnn.utils import LcnnError, atomic_write_json, atomic_write_text, cli

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 450.0  # the whole check stops starting new work here (the limit is 8 minutes)
BUDGETS_S = {"train": 240, "resume": 110, "multi_gpu": 70, "syncs": 40, "throughput": 50, "benchmark": 70, "oom": 40,
             "compile": 240}  # fmt: skip
THROUGHPUT_GOAL = 0.95  # lcnn's step against a bare PyTorch loop
THROUGHPUT_MODELS = ("mobilenetv3_large_100", "convnext_tiny")
COMPILE_MODEL = "mobilenetv3_large_100"  # the check of train.compile (run on its own: --checks compile)
BENCH_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
# timm's published inference figures for a comparable card: huggingface/pytorch-image-models,
# results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv (RTX 4090, AMP, NCHW, torch 2.9.1, CUDA 12.8, batch 1024):
# mobilenetv3_large_100 14586.41 images/s; repvgg_a2 8700.45 images/s with 25.5 M params, i.e. reparameterized.
PUBLISHED = {
    "mobilenetv3_large_100": {"form": "trained", "images_per_s": 14586.41, "batch_size": 1024, "what": "eager"},
    "repvgg_a2": {"form": "reparam", "images_per_s": 8700.45, "batch_size": 1024, "what": "reparameterized"},
}
PUBLISHED_SOURCE = "timm results/benchmark-infer-amp-nchw-pt291-cu128-4090.csv (RTX 4090, AMP, NCHW, batch 1024)"


# ----------------------------------------------------------------------------------------------- training steps
def _accelerator(precision: str, device: str):
    """A fresh Accelerator: its state is a process-wide singleton that refuses a second precision otherwise."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return Accelerator(mixed_precision=precision, cpu=device == "cpu")


def train_steps(
    timm_name: str,
    *,
    device: str = "cuda",
    precision: str = "bf16",
    img_size: int = 224,
    steps: int = 20,
    batch_size: int = 8,
    num_classes: int = 10,
) -> dict[str, Any]:
    """Train ``steps`` steps on one fixed synthetic batch the way lcnn.train steps; the loss must fall.

    The batch never changes, so a working step memorises it: the mean loss of the last steps (5, or a third of
    them when fewer than 15) must be below the mean of the first ones. Losses stay on the device until the end.
    """
    import torch

    from lcnn import models, recipe

    accelerator = _accelerator(precision, device)
    model = models.create(timm_name, num_classes, img_size)
    if accelerator.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        model = model.to(memory_format=torch.channels_last)
    hp = {"opt": "adamw", "lr_base": 1e-3, "lr_base_size": batch_size, "lr_scale": "none", "weight_decay": 0.0}
    optimizer, _ = recipe.build_optimizer(model, {**hp, "batch_size": batch_size, "momentum": 0.9}, 1)
    fused = bool(optimizer.defaults.get("fused"))  # the trainer's default: fp16 overflow steps skipped on the device
    loss_fn, _ = recipe.build_loss({"mixup": 0.0, "cutmix": 0.0, "smoothing": 0.0})
    model, optimizer = accelerator.prepare(model, optimizer)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(accelerator.device)
    if accelerator.device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    targets = (torch.arange(batch_size) % num_classes).to(accelerator.device)
    scale0 = accelerator.scaler.get_scale() if accelerator.scaler is not None else None
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_fn(model(images), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach().float())
    values = torch.stack(losses).cpu().tolist()
    window = 5 if steps >= 15 else max(1, steps // 3)
    first, last = sum(values[:window]) / window, sum(values[-window:]) / window
    finite = all(math.isfinite(v) for v in values)
    result = {
        "model": timm_name,
        "precision": precision,
        "device": accelerator.device.type,
        "img_size": img_size,
        "steps": steps,
        "batch_size": batch_size,
        "losses": values,
        "first_mean": first,
        "last_mean": last,
        "window": window,
        "finite": finite,
        "falls": finite and last < first,
        "grad_scaler": scale0 is not None,
        "fused_optimizer": fused,
    }
    if scale0 is not None:  # growth needs 2000 clean steps, so every halving here is one skipped (overflow) step
        result["skipped_steps"] = round(math.log2(scale0 / accelerator.scaler.get_scale()))
    result["status"] = "ok" if result["falls"] else "failed"
    if not finite:
        result["reason"] = "loss is not finite"
    elif not result["falls"]:
        result["reason"] = f"loss did not fall (first {window} steps {first:.4f}, last {window} {last:.4f})"
    del model, optimizer
    if accelerator.device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def _over_budget(start: float, ctx: dict[str, Any]) -> bool:
    """Whether the part that started at ``start`` has used its budget (the next model is then skipped)."""
    return time.monotonic() - start > ctx["budget_s"]


def _problems(*labelled: tuple[str, list[str]]) -> str:
    """``"label: a, b; other: c"`` from (label, items) pairs, leaving out those with no items."""
    return "; ".join(f"{label}: {', '.join(items)}" for label, items in labelled if items)


def check_train(ctx: dict[str, Any]) -> dict[str, Any]:
    """Every configured model in bf16 and in fp16 (grad scaler); stops at the part's budget."""
    rows, start = [], time.monotonic()
    for precision in ctx["precisions"]:
        for name, spec in ctx["models"].items():
            if _over_budget(start, ctx):
                rows.append({"model": spec["timm"], "precision": precision, "status": "skipped", "reason": "budget"})
                continue
            try:
                row = train_steps(spec["timm"], device=ctx["device"], precision=precision, img_size=ctx["img_size"])
            except Exception as err:  # one model's failure must not hide the others
                row = {"model": spec["timm"], "precision": precision, "status": "failed", "reason": _err(err)}
            rows.append({"study_name": name, **row})
            _say(f"train {name} {precision}: {row['status']} {row.get('reason', '')}")
    failed = [f"{r['model']}/{r['precision']}" for r in rows if r["status"] == "failed"]
    skipped = [f"{r['model']}/{r['precision']}" for r in rows if r["status"] == "skipped"]
    status = "failed" if failed or skipped else "ok"
    reason = _problems(("failed", failed), ("over budget", skipped))
    return {"status": status, "reason": reason or f"{len(rows)} runs: loss finite and falling", "rows": rows}


# ------------------------------------------------------------------------------------- resume and multi-process
def study_config(work: Path, config_path: Path) -> dict[str, Any]:
    """The study's config.yaml with the built-in data (120 train / 60 val images) under ``work``."""
    from lcnn import config as study

    cfg = yaml.safe_load(config_path.read_text())
    cfg["data"].update(source="builtin", root=str(work / "data"), per_class=12, val_per_class=6, short_side=32)
    cfg["seeds"] = [0]
    cfg.pop("select", None)
    return study.validate(cfg)


def run_json(cfg: dict[str, Any], *, device: str, precision: str, img_size: int = 64, epochs: int = 2) -> dict:
    """A small MobileNetV3-L run config (15 steps per epoch at batch 8) through lcnn.config.run_config.

    Eager even where the study sets ``train.compile``: each run would compile for a minute or more, past these
    checks' budgets; the ``compile`` check measures compiling."""
    from lcnn import config as study

    rc = study.run_config(cfg, "mobilenetv3_l", "baseline", 0)
    rc["hparams"].update(epochs=epochs, batch_size=8, img_size=img_size)
    rc["train"].update(
        precision=precision, device=device, num_workers=0, log_every=1, keep_checkpoint=False, compile=False
    )
    if "deterministic" in rc["train"]:  # deterministic kernels, where the trainer offers them: bit-identical resume
        rc["train"]["deterministic"] = True
    return rc


def _trainer(rc: dict, out: Path, launcher: list[str] | None = None) -> subprocess.Popen:
    """``python -m lcnn.train`` (or ``launcher`` followed by the trainer's arguments) on the run config ``rc``."""
    args = [*(launcher or [sys.executable, "-m", "lcnn.train"]), "--run-json", json.dumps(rc), "--out-dir", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # its own process group: a kill reaches torchrun's workers too, which would otherwise keep the GPUs and the pipe
    return subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str]:
    """Wait for a trainer (its process group killed past ``timeout``); its exit status and whole output."""
    return _Output(proc).finish(timeout)


class _Output:
    """A child's output, read on a thread: the caller waits for a line with a deadline, so a child that hangs
    silently (in CUDA's initialisation, say) cannot block the check past its budget."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self._seen = proc, [], 0
        self._reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self._reader.start()

    def first(self, find: Callable[[str], Any], deadline: float) -> Any:
        """The first non-None ``find(line)`` among the lines not yet looked at, or None once the output ends or the
        deadline passes."""
        while time.monotonic() < deadline:
            ended = not self._reader.is_alive()
            while self._seen < len(self.lines):
                self._seen += 1
                if (found := find(self.lines[self._seen - 1])) is not None:
                    return found
            if ended:
                return None
            time.sleep(0.1)
        return None

    def finish(self, timeout: float) -> tuple[int, str]:
        """Wait for the child (killing its process group past ``timeout``); its exit status and whole output."""
        note = ""
        try:
            code = self.proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            code, note = self.proc.wait(timeout=30), "\n[gpu_check] killed: over the part's budget"
        self._reader.join(timeout=30)
        return code, "".join(self.lines) + note


def _weights_diff(a: Path, b: Path) -> float:
    """Max |a - b| over every tensor of two safetensors files (0.0 means bit-identical)."""
    from safetensors.torch import load_file

    ta, tb = load_file(str(a)), load_file(str(b))
    if ta.keys() != tb.keys():
        return math.inf
    return max(((ta[k].double() - tb[k].double()).abs().max().item() if ta[k].numel() else 0.0) for k in ta)


def check_resume(ctx: dict[str, Any], cut_after: int = 5) -> dict[str, Any]:
    """SIGTERM mid-epoch 1, rerun, and compare weights with an uninterrupted run (and, if they differ, with a
    second uninterrupted run: two runs that already differ mean the card is not deterministic, not the resume)."""
    from lcnn import data, train

    deadline = time.monotonic() + ctx["budget_s"]
    work = ctx["work"] / "resume"
    cfg = study_config(work, ctx["config_path"])
    data.run(cfg["data"])
    rc = run_json(cfg, device=ctx["device"], precision=ctx["resume_precision"])
    code, log = _finish(_trainer(rc, work / "whole"), deadline - time.monotonic())
    if code != 0:
        return {"status": "failed", "reason": f"uninterrupted run exited {code}", "log_tail": log[-3000:]}

    def step_reached(line: str) -> int | None:
        step = re.search(r"epoch 1 step (\d+)/", line)
        return int(step[1]) if step and int(step[1]) >= cut_after else None

    proc = _trainer(rc, work / "cut")
    output = _Output(proc)
    signalled = output.first(step_reached, deadline)
    if signalled is not None:
        proc.send_signal(signal.SIGTERM)
    code, log = output.finish(deadline - time.monotonic())
    if signalled is None or code != train.EXIT_PREEMPTED:
        why = "no 'epoch 1 step N/' progress line to interrupt at" if signalled is None else f"exited {code}"
        return {
            "status": "failed",
            "reason": f"interrupted run: {why}, expected {train.EXIT_PREEMPTED}",
            "log_tail": log[-3000:],
        }
    scaler_files = [str(p.relative_to(work / "cut")) for p in (work / "cut").rglob("scaler*.pt")]
    code, log = _finish(_trainer(rc, work / "cut"), deadline - time.monotonic())
    if code != 0 or "resum" not in log:
        return {
            "status": "failed",
            "reason": f"resumed run exited {code} (or never said it resumed)",
            "log_tail": log[-3000:],
        }
    details = {"signalled_at_step": signalled, "precision": ctx["resume_precision"], "scaler_state": scaler_files}
    details["deterministic"] = rc["train"].get("deterministic")
    diff = _weights_diff(work / "whole" / "model.safetensors", work / "cut" / "model.safetensors")
    details["max_abs_diff"] = diff
    if diff == 0.0:
        return {"status": "ok", "reason": "resumed weights are bit-identical to the uninterrupted run's", **details}
    code, _ = _finish(_trainer(rc, work / "whole2"), deadline - time.monotonic())
    control = (
        _weights_diff(work / "whole" / "model.safetensors", work / "whole2" / "model.safetensors")
        if code == 0
        else None
    )
    details["control_max_abs_diff"] = control
    if control is not None and control > 0 and diff <= 2 * control:
        return {
            "status": "ok",
            **details,
            "reason": f"not bit-identical, but two uninterrupted runs differ as much "
            f"(resumed {diff:.3g}, control {control:.3g}): the card's kernels are not deterministic",
        }
    return {
        "status": "failed",
        "reason": f"resumed weights differ by {diff:.3g} (two uninterrupted runs: {details['control_max_abs_diff']})",
        **details,
    }


def check_multi_gpu(ctx: dict[str, Any]) -> dict[str, Any]:
    """The trainer under the train rule's launcher (lcnn.launch: torchrun, two processes); skipped on one GPU."""
    if ctx["device"] == "cuda" and ctx["gpu_count"] < 2:  # on the CPU (tests) two gloo ranks stand in for GPUs
        return {"status": "skipped", "reason": f"{ctx['gpu_count']} GPU visible; needs 2"}
    from lcnn import data

    work = ctx["work"] / "multi_gpu"
    cfg = study_config(work, ctx["config_path"])
    data.run(cfg["data"])
    rc = run_json(cfg, device=ctx["device"], precision="bf16", epochs=1)
    rc["train"]["gpus_per_job"] = 2
    launcher = [sys.executable, "-m", "lcnn.launch", "--nproc", "2", "--"]  # what the train rule execs
    code, log = _finish(_trainer(rc, work / "run", launcher), ctx["budget_s"])
    metrics_path = work / "run" / "metrics.json"
    if code != 0 or not metrics_path.is_file():
        return {"status": "failed", "reason": f"two-process run exited {code}", "log_tail": log[-3000:]}
    metrics = json.loads(metrics_path.read_text())
    ok = metrics.get("status") == "ok" and metrics.get("num_devices") == 2
    return {
        "status": "ok" if ok else "failed",
        "reason": f"status {metrics.get('status')} on {metrics.get('num_devices')} devices",
        "metrics": metrics,
    }


# ------------------------------------------------------------------------------------------------- throughput
# ------------------------------------------------------------------------------------------------ host syncs
HOST_READS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")  # Tensor methods


def _loop_step() -> int | None:
    """``prog.step`` of the lcnn.train.train_epoch frame that the current call runs under; None outside the loop
    and inside the data loader (whose reads are the host's own work on host tensors, in workers on a cluster)."""
    from lcnn import train

    frame = sys._getframe(1)
    while frame is not None:
        if "torch/utils/data/" in frame.f_code.co_filename:
            return None
        if frame.f_code is train.train_epoch.__code__:
            return frame.f_locals["prog"].step
        frame = frame.f_back
    return None


@contextlib.contextmanager
def step_syncs(cuda: bool) -> Iterator[list[int]]:
    """Within the block, the step of lcnn.train's loop at every host read of a tensor (``item``, ``cpu``, ``bool``,
    ...) and, with ``cuda``, at every synchronizing CUDA call that ``torch.cuda.set_sync_debug_mode("warn")``
    reports (a non-blocking copy from pageable memory, a stream sync inside a kernel wrapper). On a GPU each one
    waits for the queued work."""
    import warnings

    import torch

    steps: list[int] = []
    saved = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(original):
        def read(self, *args, **kwargs):
            if (step := _loop_step()) is not None:
                steps.append(step)
            return original(self, *args, **kwargs)

        return read

    shown = warnings.showwarning

    def on_warning(message, category, filename, lineno, file=None, line=None):
        if "synchronizing CUDA operation" not in str(message):
            shown(message, category, filename, lineno, file, line)  # any other warning is shown as usual
        elif (step := _loop_step()) is not None:
            steps.append(step)

    try:
        for name, original in saved.items():
            setattr(torch.Tensor, name, counted(original))
        with warnings.catch_warnings():
            warnings.filterwarnings("always", message=".*synchronizing CUDA operation")  # each one, not the first
            warnings.showwarning = on_warning
            if cuda:
                torch.cuda.set_sync_debug_mode("warn")
            try:
                yield steps
            finally:
                if cuda:
                    torch.cuda.set_sync_debug_mode("default")
    finally:
        for name, original in saved.items():
            setattr(torch.Tensor, name, original)


def check_syncs(ctx: dict[str, Any], log_every: int = 5) -> dict[str, Any]:
    """lcnn.train's loop may wait for the GPU only at its checks: every ``log_every`` steps and at the epoch's end.

    One epoch of 15 steps per precision (MobileNetV3-L, 64 px, built-in data, batch 8), in this process so that
    each sync is traced to its step. Step 0 is the set-up before the first step.
    """
    from lcnn import data, train

    cuda = ctx["device"] == "cuda"
    work = ctx["work"] / "syncs"
    cfg = study_config(work, ctx["config_path"])
    data.run(cfg["data"])
    rows, start = [], time.monotonic()
    for precision in ctx["precisions"]:
        if _over_budget(start, ctx):
            rows.append({"precision": precision, "status": "skipped", "reason": "over budget"})
            continue
        rc = run_json(cfg, device=ctx["device"], precision=precision, epochs=1)
        rc["train"].update(log_every=log_every, num_workers=2 if cuda else 0, log_with=[], deterministic=False)
        rc["train"].update(ctx.get("sync_train", {}))  # (tests) another recipe
        rc["hparams"].update(ctx.get("sync_hparams", {}))
        with step_syncs(cuda) as steps:
            metrics = train.run({**rc, "out_dir": str(work / precision)})
        last = metrics["train_images"] // rc["hparams"]["batch_size"]  # the epoch's end: validation, state
        allowed = {s for s in steps if s % log_every == 0 or s == last}
        extra = sorted(set(steps) - allowed)
        ok = metrics["status"] == "ok" and not extra
        why = "" if ok else f"syncs at steps {extra}" if extra else f"run {metrics['status']}"
        rows.append({"precision": precision, "status": "ok" if ok else "failed", "sync_steps": sorted(set(steps)),
                     "syncs": len(steps), "reason": why})  # fmt: skip
        _free(ctx["device"])
    bad = [f"{r['precision']}: {r['reason']}" for r in rows if r["status"] != "ok"]
    status = "failed" if bad else "ok"
    return {"status": status, "reason": "; ".join(bad) or f"syncs only every {log_every} steps", "rows": rows}


def train_throughput(
    timm_name: str, *, device: str = "cuda", batch_size: int = 128, img_size: int = 224, steps: int = 30,
    warmup: int = 10, repeats: int = 2, config_path: Path = REPO / "config.yaml", compiled: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Training images/s of lcnn's step against a bare PyTorch loop on the same model, optimizer and batch.

    lcnn's step is the trainer's: the baseline recipe's optimizer, schedule and loss from lcnn.recipe, model and
    optimizer prepared by ``Accelerator(mixed_precision="bf16")``, the loss summed and checked for NaN on the device,
    the schedule updated every step. The bare loop is ``torch.autocast`` bf16 with plain cross-entropy. Both use
    synthetic data already on the device (the loader is not what is measured); best of ``repeats``, interleaved in
    ABBA order so that neither loop always runs first.

    Each loop's aten calls per step are counted too (one profiled step each). Every aten call costs host time, and
    a step as short as MobileNetV3-L's on a fast GPU is bound by that host time, not by the GPU: so when the
    ratio misses the goal, the counts tell whether lcnn's step does more work or the timing is noise.

    ``compiled``: lcnn's model is compiled in place as ``train.compile`` does, and its first step's time (the
    compiling) is recorded as ``compile_seconds``; the bare loop stays eager, so ``ratio`` is compile's speed-up.
    """
    import torch

    from lcnn import config as study
    from lcnn import models, recipe, train

    accelerator = _accelerator("bf16", device)
    dev = accelerator.device
    hp = {**study.load(config_path)["baseline"], "batch_size": batch_size, "mixup": 0.0, "cutmix": 0.0}
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, img_size, img_size, generator=gen).to(dev)
    images = images.contiguous(memory_format=torch.channels_last)
    targets = torch.randint(0, 1000, (batch_size,), generator=gen).to(dev)

    lcnn_model = models.create(timm_name, 1000, img_size).to(memory_format=torch.channels_last)
    graphs_before = _graphs()  # a process-wide count that torch._dynamo.reset() keeps
    if compiled:
        train.compile_model(lcnn_model)
    lcnn_opt, _ = recipe.build_optimizer(lcnn_model, hp, 1)
    lcnn_model, lcnn_opt = accelerator.prepare(lcnn_model, lcnn_opt)
    scheduler = recipe.build_scheduler(lcnn_opt, hp, steps_per_epoch=1000)
    lcnn_loss, _ = recipe.build_loss(hp)
    tally = train.StepTally(0.0, 0, 0, dev, scaled=False)  # the trainer's own loss tally (bf16: no scaler)
    host_step = [0]

    def lcnn_step() -> torch.Tensor:
        loss = lcnn_loss(lcnn_model(images), targets)
        accelerator.backward(loss)
        lcnn_opt.step()
        lcnn_opt.zero_grad(set_to_none=True)
        loss = loss.detach()
        tally.add(loss)
        host_step[0] += 1
        if scheduler is not None:
            scheduler.step_update(host_step[0])
        return loss

    bare_model = models.create(timm_name, 1000, img_size).to(dev, memory_format=torch.channels_last)
    bare_opt, _ = recipe.build_optimizer(bare_model, hp, 1)
    bare_loss = torch.nn.CrossEntropyLoss()

    def bare_step() -> torch.Tensor:
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            loss = bare_loss(bare_model(images), targets)
        loss.backward()
        bare_opt.step()
        bare_opt.zero_grad(set_to_none=True)
        return loss.detach()

    def rate(step: Callable[[], torch.Tensor]) -> float:
        total = torch.zeros((), dtype=torch.float64, device=dev)
        for _ in range(warmup):
            total += step()
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(steps):
            total += step()  # accumulated on the device: no host sync inside the timed loop
        _sync(dev)
        return batch_size * steps / (time.perf_counter() - t0)

    def aten_calls(step: Callable[[], torch.Tensor]) -> int:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        return sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))

    lcnn_model.train()
    bare_model.train()
    compile_seconds = None
    if compiled:  # the first call compiles: timed apart, so the timed steps below are the compiled graph's
        t0 = time.perf_counter()
        lcnn_step()
        _sync(dev)
        compile_seconds = time.perf_counter() - t0
    best = {"bare": 0.0, "lcnn": 0.0}
    steps_by_name = {"bare": bare_step, "lcnn": lcnn_step}
    for i in range(repeats):
        for name in ("bare", "lcnn") if i % 2 == 0 else ("lcnn", "bare"):
            best[name] = max(best[name], rate(steps_by_name[name]))
    lcnn_ips, bare_ips = best["lcnn"], best["bare"]
    lcnn_calls, bare_calls = aten_calls(lcnn_step), aten_calls(bare_step)
    return {
        "model": timm_name,
        "device": dev.type,
        "batch_size": batch_size,
        "img_size": img_size,
        "steps": steps,
        "repeats": repeats,
        "lcnn_images_per_s": lcnn_ips,
        "bare_images_per_s": bare_ips,
        "ratio": lcnn_ips / bare_ips,
        "lcnn_aten_calls_per_step": lcnn_calls,
        "bare_aten_calls_per_step": bare_calls,
        "aten_calls_ratio": lcnn_calls / bare_calls,
        "compiled": compiled,
        "compile_seconds": compile_seconds,
        # graphs dynamo made (training: 1); more would mean recompiles, each paid in the timed steps
        "graphs": _graphs() - graphs_before if compiled else None,
    }


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def check_throughput(ctx: dict[str, Any]) -> dict[str, Any]:
    """lcnn's training step against a bare loop, per model in THROUGHPUT_MODELS; stops at the part's budget."""
    rows, skipped, start = [], [], time.monotonic()
    for name in THROUGHPUT_MODELS:
        if _over_budget(start, ctx):
            skipped.append(name)
            continue
        rows.append(train_throughput(name, device=ctx["device"]))
        _free(ctx["device"])
        _say(
            f"throughput {name}: lcnn {rows[-1]['lcnn_images_per_s']:.0f} vs bare "
            f"{rows[-1]['bare_images_per_s']:.0f} images/s = {rows[-1]['ratio']:.3f}"
        )
    low = [f"{r['model']} {r['ratio']:.3f}" for r in rows if r["ratio"] < THROUGHPUT_GOAL]
    reason = _problems((f"below the goal of {THROUGHPUT_GOAL}", low), ("over budget", skipped))
    status = "failed" if low or skipped else "ok"
    return {"status": status, "reason": reason or f"all >= {THROUGHPUT_GOAL}", "rows": rows, "skipped": skipped}


def check_compile(ctx: dict[str, Any]) -> dict[str, Any]:
    """What ``train.compile`` gains: lcnn's compiled step against the eager bare loop (MobileNetV3-L, whose eager
    step is bound by kernel launches); not in the default run, whose 8 minutes it would not fit."""
    import torch

    from lcnn import devices

    missing = devices.compiler_missing(torch.device(ctx["device"]))
    if missing:
        return {"status": "skipped", "reason": missing, "rows": []}
    kw = {k: ctx[k] for k in ("batch_size", "img_size", "steps", "warmup") if k in ctx}
    # a cold cache, as on a fresh node: inductor's default one (/tmp/torchinductor_$USER) outlives a run
    cache = {"TORCHINDUCTOR_CACHE_DIR": str(ctx["work"] / "inductor"), "TRITON_CACHE_DIR": str(ctx["work"] / "triton")}
    with mock.patch.dict(os.environ, cache):
        row = train_throughput(ctx.get("compile_model", COMPILE_MODEL), device=ctx["device"], compiled=True, **kw)
    _free(ctx["device"])
    reason = (
        f"{row['model']}: compiled lcnn step {row['lcnn_images_per_s']:.0f} images/s, {row['ratio']:.2f}x the eager "
        f"bare loop's {row['bare_images_per_s']:.0f}, after {row['compile_seconds']:.0f} s compiling"
    )
    if row["graphs"] != 1:  # the timed steps recompiled: what was timed is not one compiled graph
        return {"status": "failed", "reason": f"{reason}; {row['graphs']} graphs for one training step", "rows": [row]}
    return {"status": "ok", "reason": reason, "rows": [row]}


# -------------------------------------------------------------------------------------------------- benchmark
BENCH_FIELDS = ("form", "precision", "batch_size", "status", "error", "latency_ms_p50", "latency_ms_p99",
                "throughput_ips", "peak_mem_mb")  # fmt: skip


def run_benchmark(timm_name: str, section: dict[str, Any], img_size: int = 224) -> dict[str, Any]:
    """lcnn.benchmark's public entry on a random-init model (the one place this tool calls the benchmark)."""
    from lcnn import benchmark

    section = {"onnx": False, "compile": False, "quiet": True, **section}
    return benchmark.run({"timm_name": timm_name, "num_classes": 1000, "img_size": img_size, "out": None,
                          "benchmark": section})  # fmt: skip


def _versus_published(name: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Our largest ok batch of the published form beside timm's figure, and their ratio."""
    published = PUBLISHED[name]
    ok = [r for r in rows if r["form"] == published["form"] and r["status"] == "ok"]
    ours = max(ok, key=lambda r: r["batch_size"]) if ok else {}
    ips = ours.get("throughput_ips")
    return {"model": name, "form": published["form"], "batch_size": ours.get("batch_size"), "images_per_s": ips,
            "published_batch_size": published["batch_size"], "published_images_per_s": published["images_per_s"],
            "ratio": ips / published["images_per_s"] if ips else None}  # fmt: skip


def check_benchmark(ctx: dict[str, Any]) -> dict[str, Any]:
    """fp16 batch 1..512 sweep of MobileNetV3-L and RepVGG-A2, each largest batch beside timm's figure; a model
    that would start past the part's budget is skipped (and the check fails)."""
    section = {"device": ctx["device"], "batch_sizes": ctx.get("bench_batches", BENCH_BATCHES),
               "precisions": [ctx.get("bench_precision", "fp16")], "channels_last": [False], "warmup": 5,
               "iters": 30, "time_budget_s": 0.4, "reparameterize": True}  # fmt: skip
    rows, compare, problems, start = [], [], [], time.monotonic()
    for name in PUBLISHED:
        if _over_budget(start, ctx):
            problems.append(f"{name}: skipped, over budget")
            continue
        result = run_benchmark(name, section, ctx.get("bench_img_size", 224))
        rows += [{"model": name, **{k: row.get(k) for k in BENCH_FIELDS}} for row in result["rows"]]
        bad = [r for r in result["rows"] if r["status"] != "ok"]
        problems += [f"{name} {r['form']} b{r['batch_size']}: {r['status']} {r['error']}" for r in bad]
        compare.append(_versus_published(name, result["rows"]))
        got = compare[-1]
        _say(f"benchmark {name}: {got['images_per_s']} images/s at b{got['batch_size']}, ratio {got['ratio']} to "
             f"timm's {got['published_images_per_s']:.0f} at b{got['published_batch_size']}")  # fmt: skip
    status = "failed" if problems or any(c["ratio"] is None for c in compare) else "ok"
    reason = "; ".join(problems[:3]) if problems else f"{len(rows)} rows ok; ratios against {PUBLISHED_SOURCE}"
    return {"status": status, "reason": reason, "rows": rows, "published": compare, "source": PUBLISHED_SOURCE}


def oom_batch(total_bytes: int, per_image_bytes: float, factor: float = 1.2) -> int:
    """A batch whose activations alone need ``factor`` times ``total_bytes``."""
    return max(2, math.ceil(factor * total_bytes / max(per_image_bytes, 1.0)))


def _peak_bytes(model, batch: int) -> int:
    """Peak memory of one fp16 forward at ``batch``, above what was allocated before it."""
    import torch

    x = torch.randn(batch, 3, 224, 224, device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16):
        model(x)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def check_oom(ctx: dict[str, Any], timm_name: str = "convnext_tiny", headroom_gb: float = 2.0) -> dict[str, Any]:
    """A real CUDA out-of-memory in lcnn.benchmark's sweep: the batch is recorded as ``oom`` and the sweep goes on.

    A ballast tensor holds all but ``headroom_gb`` of the card's free memory, so a batch that needs twice the
    headroom runs out of memory on any card (an H200's 141 GB would otherwise need a batch of tens of thousands,
    and a host input of many GB, to fill). The memory per image is the peak's growth from batch 16 to 32 after a
    warm-up, so cuDNN's autotuning workspace does not count as activations.
    """
    import torch

    from lcnn import models

    model = models.create(timm_name, 1000, 224).cuda().eval()
    for batch in (16, 32):  # warm-up at both shapes: cudnn.benchmark's autotuning workspaces are not activations
        _peak_bytes(model, batch)
    per_image = max(_peak_bytes(model, 32) - _peak_bytes(model, 16), 1) / 16
    del model
    _free("cuda")
    free, total = torch.cuda.mem_get_info()
    headroom = int(headroom_gb * 2**30)
    batch = oom_batch(headroom, per_image, factor=2.0)
    details = {"per_image_mb": per_image / 2**20, "total_memory_gb": total / 1e9, "free_memory_gb": free / 1e9,
               "headroom_gb": headroom_gb, "oom_batch": batch}  # fmt: skip
    section = {
        "device": "cuda",
        "batch_sizes": [8, batch],
        "precisions": ["fp16", "bf16"],
        "channels_last": [False],
        "warmup": 1,
        "iters": 3,
        "time_budget_s": 1.0,
        "reparameterize": False,
    }
    ballast = torch.empty(max(free - headroom, 0), dtype=torch.uint8, device="cuda")
    try:
        rows = run_benchmark(timm_name, section)["rows"]
    finally:
        del ballast
        _free("cuda")
    statuses = [(r["precision"], r["batch_size"], r["status"]) for r in rows]
    details["rows"] = statuses
    first_oom = next((i for i, r in enumerate(rows) if r["status"] == "oom"), None)
    went_on = first_oom is not None and any(r["status"] == "ok" for r in rows[first_oom + 1 :])
    if first_oom is None:
        return {"status": "failed", "reason": f"batch {batch} did not run out of memory: {statuses}", **details}
    if not went_on:
        return {"status": "failed", "reason": f"no configuration ran after the oom: {statuses}", **details}
    return {"status": "ok", "reason": f"batch {batch} recorded as oom, the sweep went on: {statuses}", **details}


# ------------------------------------------------------------------------------------------------ the harness
CHECKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "train": check_train,
    "resume": check_resume,
    "multi_gpu": check_multi_gpu,
    "syncs": check_syncs,
    "throughput": check_throughput,
    "benchmark": check_benchmark,
    "oom": check_oom,
    "compile": check_compile,
}
DEFAULT_CHECKS = [name for name in CHECKS if name != "compile"]  # compiling alone takes a minute or more


def _err(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"[:300]


def _say(msg: str) -> None:
    print(f"[gpu_check] {msg}", file=sys.stderr, flush=True)


def _free(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def environment_summary() -> dict[str, Any]:
    """The card, driver, CUDA and torch versions the figures belong to."""
    import torch

    from lcnn.utils import environment

    env = environment()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["total_memory_gb"] = props.total_memory / 1e9
        env["compute_capability"] = f"{props.major}.{props.minor}"
        env["cudnn_version"] = torch.backends.cudnn.version()
    return env


def run_checks(ctx: dict[str, Any], names: list[str], deadline_s: float, budgets: dict[str, float]) -> list[dict]:
    """Run each named check under its budget; a check that would start past the global deadline is skipped."""
    start, results = time.monotonic(), []
    for name in names:
        elapsed = time.monotonic() - start
        entry = {"name": name, "budget_s": budgets[name]}
        if elapsed > deadline_s:
            results.append(
                {
                    **entry,
                    "status": "skipped",
                    "reason": f"global deadline of {deadline_s:.0f} s reached",
                    "seconds": 0.0,
                }
            )
            continue
        t0 = time.monotonic()
        try:
            out = CHECKS[name]({**ctx, "budget_s": min(budgets[name], deadline_s - elapsed)})
        except Exception as err:  # a crashing check is a failed check; the others still run
            out = {"status": "failed", "reason": _err(err)}
        results.append({**entry, **out, "seconds": round(time.monotonic() - t0, 1)})
        _say(f"{name}: {out['status']} ({results[-1]['seconds']} s) {out.get('reason', '')}")
    return results


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the checks and write gpu_check.json and gpu_check.md into ``cfg['out']``.

    cfg keys: out, config (its models), checks (names, default DEFAULT_CHECKS), deadline_s, budgets; and, so the
    harness can be exercised on the CPU, device ("cuda"), img_size (224), precisions (bf16, fp16) and models (all).
    """
    import torch

    from lcnn import config as study

    config_path = Path(cfg.get("config") or REPO / "config.yaml")
    models = study.load(config_path)["models"]
    if cfg.get("models"):
        models = {name: models[name] for name in cfg["models"]}
    names = cfg.get("checks") or DEFAULT_CHECKS
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        raise LcnnError(f"unknown check {unknown[0]}; choose from {', '.join(CHECKS)}")
    out = Path(cfg.get("out") or "gpu_check")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as work:
        ctx = {"device": cfg.get("device", "cuda"), "models": models, "img_size": cfg.get("img_size", 224),
               "precisions": cfg.get("precisions", ["bf16", "fp16"]), "work": Path(work), "config_path": config_path,
               "gpu_count": torch.cuda.device_count(), "resume_precision": "fp16"}  # fmt: skip
        checks = run_checks(ctx, names, cfg.get("deadline_s", DEADLINE_S), {**BUDGETS_S, **cfg.get("budgets", {})})
    result = {
        "status": "failed" if any(c["status"] == "failed" for c in checks) else "ok",
        "seconds": round(time.monotonic() - t0, 1),
        "env": environment_summary(),
        "checks": checks,
    }
    write_outputs(result, out)
    return result


def write_outputs(result: dict[str, Any], out: Path) -> None:
    atomic_write_json(out / "gpu_check.json", result)
    atomic_write_text(out / "gpu_check.md", to_markdown(result))


def _table(rows: list[dict], columns: list[str]) -> str:
    frame = pd.DataFrame(rows).reindex(columns=columns)
    frame = frame.astype(object).where(frame.notna(), None)  # tabulate leaves None cells empty, not "nan"
    return frame.to_markdown(index=False, floatfmt=".4g", missingval="")


def to_markdown(result: dict[str, Any]) -> str:
    """The summary a person reads: the card and versions, one line per check, then each check's figures."""
    env = result.get("env") or {}
    pkgs = env.get("packages") or {}
    head = [
        "# lcnn GPU check",
        "",
        f"- **card:** {env.get('device_name')} ({env.get('gpu_count')} visible, "
        f"{env.get('total_memory_gb', float('nan')):.1f} GB, compute {env.get('compute_capability')})",
        f"- **driver:** {env.get('driver_version')}; **CUDA:** {env.get('cuda_version')} (torch's build); "
        f"**cuDNN:** {env.get('cudnn_version')}",
        f"- **torch:** {pkgs.get('torch')}; **timm:** {pkgs.get('timm')}; **accelerate:** {pkgs.get('accelerate')}",
        f"- **result:** {result['status']} in {result['seconds']} s",
        "",
        _table(result["checks"], ["name", "status", "seconds", "budget_s", "reason"]),
    ]
    parts = ["\n".join(head)]
    by_name = {c["name"]: c for c in result["checks"]}
    if by_name.get("train", {}).get("rows"):
        cols = ["model", "precision", "status", "first_mean", "last_mean", "skipped_steps", "fused_optimizer", "reason"]
        done = [r for r in by_name["train"]["rows"] if "steps" in r] or [{}]
        head = f"## Training steps ({done[0].get('steps')} steps, {done[0].get('img_size')} px, one fixed batch)"
        parts.append(head + "\n\n" + _table(by_name["train"]["rows"], cols))
    if by_name.get("syncs", {}).get("rows"):
        cols = ["precision", "status", "sync_steps", "syncs", "reason"]
        parts.append("## Host syncs in the training loop (log_every 5)\n\n" + _table(by_name["syncs"]["rows"], cols))
    if by_name.get("throughput", {}).get("rows"):
        cols = ["model", "batch_size", "lcnn_images_per_s", "bare_images_per_s", "ratio", "aten_calls_ratio"]
        parts.append(
            f"## Training throughput (bf16, channels_last; goal >= {THROUGHPUT_GOAL})\n\n"
            + _table(by_name["throughput"]["rows"], cols)
        )
    if by_name.get("compile", {}).get("rows"):
        cols = ["model", "batch_size", "compile_seconds", "lcnn_images_per_s", "bare_images_per_s", "ratio"]
        parts.append(
            "## train.compile (bf16, channels_last): compiled lcnn step against the eager bare loop\n\n"
            + _table(by_name["compile"]["rows"], cols)
        )
    if by_name.get("benchmark", {}).get("published"):
        bench = by_name["benchmark"]
        cols = [
            "model",
            "form",
            "batch_size",
            "images_per_s",
            "published_batch_size",
            "published_images_per_s",
            "ratio",
        ]
        parts.append(
            f"## Benchmark against timm's published figures\n\nSource: {bench['source']}.\n\n"
            + _table(bench["published"], cols)
            + "\n\n"
            + _table(
                bench["rows"],
                ["model", "form", "batch_size", "status", "latency_ms_p50", "throughput_ips", "peak_mem_mb"],
            )
        )
    return "\n\n".join(parts) + "\n"


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--config", default=str(REPO / "config.yaml"), help="the study config (its models)")
    parser.add_argument(
        "--checks", default=",".join(DEFAULT_CHECKS), help=f"comma-separated subset of {','.join(CHECKS)}"
    )
    parser.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds after which no check starts")
    parser.add_argument("--require-gpu", action="store_true", help="exit 2 where there is no GPU, instead of 0")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        msg = f"no GPU: torch {torch.__version__} sees no CUDA device, so there is nothing to check here"
        if args.require_gpu:
            raise LcnnError(msg + "; run it on a GPU node, e.g. `srun --gpus=1 make gpu-check`")
        print(f"lcnn gpu_check: {msg}")
        return
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    result = run({"out": args.out, "config": args.config, "checks": checks, "deadline_s": args.deadline})
    print(to_markdown(result))
    if result["status"] == "failed":
        raise SystemExit(1)


if __name__ == "__main__":
    main()

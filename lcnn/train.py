"""Training stage: one model x variant x seed, with Accelerate, resumable and honest about its outcome.

Run by the train rule through ``python -m lcnn.launch`` (``python -m lcnn.train`` on one device, ``torchrun
--standalone`` across several GPUs of one node). Every study axis goes through a timm factory:
``create_optimizer_v2``, ``create_scheduler_v2``, ``create_transform`` and ``Mixup``.

The step loop never waits on the host: losses add up on the device and are read, with the divergence and stop
checks, every ``train.log_every`` steps. On SIGTERM/SIGUSR1/SIGINT (a SLURM time limit or preemption) every rank
stops at the same check, the full state of every rank is saved (Accelerate's ``save_state``) and the job exits 75,
so a retry resumes exactly where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.optim.swa_utils import update_bn
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from lcnn import checkpoint, dataset, devices, models, owner, tracking
from lcnn.config import RECIPE_TRAIN_KEYS, merge_run, used_hparams
from lcnn.launch import EXIT_PREEMPTED, STOP_SIGNALS, note_preempted
from lcnn.recipe import build_loaders, build_loss, build_optimizer, build_scheduler, data_name, normalization
from lcnn.utils import (
    LcnnError,
    atomic_save,
    atomic_write_json,
    atomic_write_text,
    cli,
    environment,
    exit_now,
    json_arg,
    peak_rss_mb,
)

# fp16: a GradScaler scale below this means even the unscaled gradients overflow, step after step, while the loss
# stays finite and the skipped steps learn nothing (fairseq's --min-loss-scale default; its error reads the same)
MIN_LOSS_SCALE = 1e-4
# a training epoch whose step waited on the loader for more than this share of its time is loader-bound: the GPU
# idles for it, so the epoch line says so and metrics.json records the share (more loader workers, or staging fix it)
DATA_WAIT_WARN = 0.10
NEWER_IDENTITY_KEYS = ("steps_per_epoch", "data")  # identity keys a state saved by an older lcnn lacks
ACCELERATE_KEPT = {"ACCELERATE_LOG_LEVEL"}  # Accelerate's variables a job may take from its environment (logging)
# Seeds of one run's streams are spaced this far apart. Accelerate's seedable sampler shuffles epoch e with
# data_seed + e, and set_seed(device_specific=True) seeds rank r with seed + r: on the seed itself, seed 1 would
# replay seed 0's shuffles one epoch later (and seed 1's rank 0 draw seed 0's rank-1 masks), so the seeds' spread,
# the noise every gain is measured against, would come out too small. Seed 0 on one process is unchanged.
SEED_STRIDE = 1_000_003


class Progress:
    """Where the run stands: plain data, saved as JSON beside Accelerate's state (see :mod:`lcnn.checkpoint`)."""

    def __init__(self) -> None:
        self.epoch, self.step, self.history = 0, 0, []
        self.train_seconds = self.val_seconds = 0.0
        self.epoch_acc = self.fresh_acc()  # the interrupted epoch's totals, so its history row covers all of it

    @staticmethod
    def fresh_acc() -> dict[str, float]:
        return {"seen": 0, "loss_sum": 0.0, "n_loss": 0, "seconds": 0.0, "data_wait": 0.0}

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


class _StopSignal:
    """Remembers a stop signal while a run trains; the loop turns it into Accelerate's trigger at its next check.

    A context manager: the previous handlers come back when the run ends, so a process that called ``run()`` (a
    tool, a test) and later forks workers does not leave them deaf to SIGTERM. A run that stopped on a signal
    ignores the stop signals from then on, while it exits.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignal:
        self._previous = {sig: signal.signal(sig, self._handle) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *_exc: Any) -> None:
        for sig, handler in self._previous.items():
            # a run that stopped on a signal is exiting 75: a late second signal (SLURM's after torchrun's) must
            # not turn that into death by the signal
            signal.signal(sig, signal.SIG_IGN if self.signum is not None else handler)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


@dataclass
class Job:
    """Everything one run trains with, built by :func:`setup`."""

    cfg: dict[str, Any]
    out: Path
    tag: str
    accelerator: Accelerator
    model: Any
    optimizer: Any
    scheduler: Any
    train_loader: Any
    val_loader: Any
    mixup: Any
    on_device: Any  # lcnn.recipe.DeviceBatch: uint8 batches normalised (and erased) on the device
    losses: tuple[Any, Any]
    lr: float
    img_size: int
    num_classes: int
    steps: int
    epochs: int
    stop_at: int
    data: str  # the prepared subset's fingerprint (lcnn.dataset.fingerprint): a state resumes on the same data only
    progress: Progress = field(default_factory=Progress)

    @property
    def tcfg(self) -> dict[str, Any]:
        return self.cfg["train"]


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one run described by ``cfg`` (see :func:`lcnn.config.run_config`) into ``cfg['out_dir']``."""
    faulthandler.enable()  # a segfault in a native library names itself and the Python stack in the job's log
    try:
        return _train(cfg)
    finally:  # however it ends (done, preempted, failed), this process no longer trains the run
        owner.release(cfg["out_dir"])


def _train(cfg: dict[str, Any]) -> dict[str, Any]:
    job = setup(cfg)
    resume(job)
    announce(job)
    diverged = None
    with _StopSignal() as stop:
        while job.progress.epoch < job.stop_at:
            diverged = train_epoch(job, stop) or end_epoch(job)
            if diverged is not None:
                job.accelerator.print(f"[{job.tag}] {diverged['reason']}: diverged")
                break
            if job.progress.epoch < job.stop_at and _stop_requested(job, stop):
                _exit_preempted(job, stop)  # signalled during validation: its state is saved, start no epoch
    result = finish(job, diverged)
    end_training(job)
    hand_off(job, diverged)  # last: until here a failed job's retry resumes from the saved state
    return result


def end_training(job: Job) -> None:
    """Close the trackers and the process group once the run's outputs are written.

    A failure here (an MLflow server that stays unreachable through its retries) is one warning line: as a failed
    job it would lose those outputs (Snakemake deletes a failed job's outputs) and retrain.
    """
    try:
        job.accelerator.end_training()
    except Exception as err:
        warning = f"[{job.tag}] warning: closing the trackers failed after the outputs were written: {err}"
        print(warning, file=sys.stderr)


def setup(cfg: dict[str, Any]) -> Job:
    """Device, data, model, optimizer and schedule, prepared by Accelerate; trackers started."""
    hp, tcfg = cfg["hparams"], cfg["train"]
    accelerator, device = make_accelerator(cfg)
    if accelerator.is_main_process:  # one job per run folder: a twin (a restarted Snakemake's) stops here
        owner.claim(cfg["out_dir"])
    set_seed(cfg["seed"])  # identical weights on every rank
    img_size = hp.get("img_size") or cfg["native_img_size"]
    loaders = build_loaders(cfg, img_size, accelerator.num_processes, device == "cuda", accelerator.device)
    num_classes = loaders.num_classes
    model = models.create(
        cfg["timm_name"],
        num_classes,
        img_size,
        hp["init"],
        hp.get("pretrained_file"),
        hp.get("drop_path", 0.0),
        cfg.get("pretrained_tag"),
    )
    if tcfg.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    if tcfg.get("compile"):
        compile_model(model)
    optimizer, lr = build_optimizer(model, hp, accelerator.num_processes, fused=tcfg["fused_optimizer"])
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, loaders.train, loaders.val)
    steps = min(len(train_loader), tcfg.get("max_steps_per_epoch") or len(train_loader))
    epochs = hp["epochs"]  # the schedule always spans the full budget, also when this job stops earlier
    stop_at = int(cfg.get("stop_epoch") or epochs)  # a halving rung stops here; its state lets the next one go on
    if not 1 <= stop_at <= epochs:
        raise LcnnError(f"stop_epoch {stop_at} must be between 1 and the run's {epochs} epochs")
    job = Job(
        cfg=cfg,
        out=Path(cfg["out_dir"]),
        tag=f"{cfg['model']}/{cfg['variant']}/seed{cfg['seed']}",
        accelerator=accelerator,
        model=model,
        optimizer=optimizer,
        scheduler=build_scheduler(optimizer, hp, steps),
        train_loader=train_loader,
        val_loader=val_loader,
        mixup=loaders.mixup,
        on_device=loaders.on_device,
        losses=build_loss(hp),
        lr=lr,
        img_size=img_size,
        num_classes=num_classes,
        steps=steps,
        epochs=epochs,
        stop_at=stop_at,
        data=dataset.fingerprint(cfg["data_root"]),
    )
    if accelerator.log_with:  # the tracker instances make_accelerator handed over
        if "mlflow" in tcfg.get("log_with", []) and accelerator.is_main_process:
            tracking.ensure_mlflow_experiment()
        accelerator.init_trackers(tracking.PROJECT, config=tracking.hparams(cfg))
    # each rank draws its own drop-path masks and Mixup/CutMix parameters (its saved RNG state restores them)
    set_seed(rank_seed(cfg["seed"], accelerator.process_index))
    return job


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``train.compile``: torch.compile ``model`` in place, so its parameter names, saved weights and training states
    stay those of the eager model (a state resumes with compile switched either way).

    A frame that reaches torch's recompile limit would otherwise run eagerly from then on, after one warning line:
    here it fails the job instead. Graphs and counts left by earlier runs in this process (tools, tests) are
    dropped first: Accelerate's forward wrapper is one code object for every model, so they would add up.
    """
    torch._dynamo.reset()
    flag = "fail_on_recompile_limit_hit"  # torch 2.7's name; before it, fail_on_cache_limit_hit
    setattr(torch._dynamo.config, flag if hasattr(torch._dynamo.config, flag) else "fail_on_cache_limit_hit", True)
    model.compile()
    return model


def rank_seed(seed: int, rank: int) -> int:
    """The process RNG seed of ``rank`` in a run of ``seed``: distinct for every seed and rank of a study."""
    return seed + SEED_STRIDE * rank


def make_accelerator(cfg: dict[str, Any]) -> tuple[Accelerator, str]:
    """The job's Accelerator on the device it was given (never a silent CPU fallback), with its trackers."""
    tcfg = cfg["train"]
    device = devices.resolve(tcfg.get("device", "auto"), "train.device")
    precision = tcfg.get("precision", "no")
    devices.check_precision(precision, device, "train.precision")
    missing = None
    if tcfg.get("compile"):
        missing = devices.compiler_missing(torch.device(device))
        if not hasattr(torch.compiler, "set_stance"):  # precise BN runs a compiled model eagerly through it
            missing = f"it needs torch 2.6 or newer (this is {torch.__version__})"
    if missing:  # before any data or model is set up: a job that cannot compile stops in its first seconds
        raise LcnnError(f"train.compile is true but {missing}; install it, or set train.compile: false")
    if tcfg.get("deterministic"):  # bit-identical resume on a GPU, at some cost in speed
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: an op with no deterministic CUDA kernel (e.g. adaptive pooling's backward) warns, not crashes
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
    if device == "cuda":
        torch.backends.cudnn.benchmark = not tcfg.get("deterministic")
    trackers = tracking.trackers(cfg)  # an uninstalled tracker stops here, in one line, before any training
    # Accelerate reads ACCELERATE_* variables wherever no argument overrides them (ACCELERATE_USE_CPU moves a GPU
    # job to the CPU, ACCELERATE_GRADIENT_ACCUMULATION_STEPS divides every loss): sbatch exports the login shell's
    # environment to every job, so they are dropped here and a job takes its settings from its config alone
    ignored = sorted(k for k in os.environ if k.startswith("ACCELERATE_") and k not in ACCELERATE_KEPT)
    for key in ignored:
        del os.environ[key]
    # Accelerate keeps one state per process; a second run() in it (tools, tests) may ask for another precision.
    # The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
    accelerator = Accelerator(
        log_with=trackers or None,
        mixed_precision=precision,
        cpu=device == "cpu",
        gradient_accumulation_steps=1,  # the loop steps on every batch
        dynamo_backend="no",  # explicit: ACCELERATE_* variables and config files never change a study's job
        dataloader_config=DataLoaderConfiguration(
            use_seedable_sampler=True, data_seed=cfg["seed"] * SEED_STRIDE, non_blocking=device == "cuda"
        ),
    )
    if ignored:
        accelerator.print(f"lcnn train: ignoring {', '.join(ignored)}: a job's settings come from its config")
    got = (accelerator.device.type, accelerator.mixed_precision, accelerator.gradient_accumulation_steps)
    if got != (device, precision, 1):
        raise LcnnError(
            f"Accelerate set up {got[0]}, precision {got[1]}, gradient accumulation {got[2]} for a job asking for "
            f"{device}, precision {precision}, none; unset what overrides it (an Accelerate plugin or variable)"
        )
    expected = int(tcfg.get("gpus_per_job", 1))
    if accelerator.num_processes != expected:
        raise LcnnError(
            f"this job runs {accelerator.num_processes} processes but train.gpus_per_job is {expected}; "
            "start it through `python -m lcnn.launch --nproc N` as the train rule does"
        )
    return accelerator, device


def identity(job: Job) -> dict[str, Any]:
    """Who a saved state belongs to; a state of anything else is refused rather than resumed."""
    cfg = job.cfg
    return {
        "timm_name": cfg["timm_name"],
        "num_classes": job.num_classes,
        "img_size": job.img_size,
        "seed": cfg["seed"],
        "hparams": cfg["hparams"],
        "recipe_train": {k: cfg["train"].get(k) for k in RECIPE_TRAIN_KEYS},
        "num_processes": job.accelerator.num_processes,
        # the schedule's length comes from the steps per epoch, and a resume loads it with the state
        "steps_per_epoch": job.steps,
        "normalization": _jsonable(normalization(data_name(cfg))),  # the input's mean and std, the eval crop
        "data": job.data,
    }


def resume(job: Job) -> None:
    """Go on from this run's own saved state, or (a later halving rung) from the previous rung's."""
    cfg = job.cfg
    folder = checkpoint.find(job.out)
    if folder is None and cfg.get("init_state"):
        folder = checkpoint.find(cfg["init_state"])
        meta = checkpoint.read_meta(folder) if folder else None
        if meta is None or meta["epoch"] > job.stop_at or meta["step"]:
            raise LcnnError(
                f"no usable training state in {cfg['init_state']} to go on from (missing, or not at an epoch "
                f"<= {job.stop_at}); rerun the previous rung, e.g. by deleting its metrics.json"
            )
    if folder is None:
        return
    meta = checkpoint.read_meta(folder)
    _check_state_fits(meta, job, folder)
    checkpoint.load(job.accelerator, folder)
    checkpoint.match_layouts(job.optimizer)  # a state saved before train.channels_last was changed
    job.progress.load_state_dict(meta["progress"])
    if job.scheduler is not None:
        job.scheduler.load_state_dict(meta["scheduler"])
    job.accelerator.print(f"[{job.tag}] resuming at epoch {job.progress.epoch + 1} step {job.progress.step}")


def _check_state_fits(meta: dict[str, Any], job: Job, folder: Path) -> None:
    """Refuse, naming both sides, a saved state of another model, recipe, seed or device count."""
    old, new = meta.get("run") or {}, identity(job)
    old_hparams = used_hparams(old.get("hparams") or {})  # a state saved before recipes dropped unused settings
    flat_old = {**{k: v for k, v in old.items() if k != "hparams"}, **old_hparams}
    if "normalization" not in flat_old:  # saved before every run took its tag's: only pretrained runs did
        tag = job.cfg.get("pretrained_tag") if job.cfg["hparams"]["init"] == "pretrained" else None
        flat_old["normalization"] = _jsonable(normalization(data_name({**job.cfg, "pretrained_tag": tag})))
    for key in NEWER_IDENTITY_KEYS:  # a state saved before lcnn recorded them: not checked, as then
        flat_old.setdefault(key, new[key])
    flat_new = {**{k: v for k, v in new.items() if k != "hparams"}, **new["hparams"]}
    keys = [k for k in new if k != "hparams"] + sorted(new["hparams"].keys() | old_hparams.keys())
    changed = [k for k in keys if flat_old.get(k) != flat_new.get(k)]  # who it belongs to first, then the recipe
    if changed:
        shown = ", ".join(f"{k} {flat_old.get(k)!r} -> {flat_new.get(k)!r}" for k in changed[:4])
        raise LcnnError(
            f"the saved {checkpoint.STATE_DIR} in {job.out} was trained with other settings ({shown}); "
            f"delete {folder} to start this run over with the new ones"
        )


def announce(job: Job) -> None:
    acc = job.accelerator
    acc.print(
        f"[{job.tag}] {job.cfg['timm_name']} {models.count_params(job.model) / 1e6:.1f}M params, "
        f"{len(job.train_loader.dataset)} train / {len(job.val_loader.dataset)} val images, {job.epochs} epochs x "
        f"{job.steps} steps, lr {job.lr:.3g}, {acc.num_processes} x {acc.device} precision={acc.mixed_precision}"
        + (f", stopping after epoch {job.stop_at}" if job.stop_at < job.epochs else "")
    )


def loss_scale(scaler: torch.amp.GradScaler | None) -> float:
    """The fp16 GradScaler's current scale (inf without one: bf16 and fp32 never skip a step).

    A fused optimizer skips an overflowed step on the device, so nothing on the host sees the skips; the scale,
    halved on each one, is what shows a run that has stopped learning. Read at the checks only (one host read)."""
    return scaler.get_scale() if scaler is not None and scaler.is_enabled() else math.inf


class StepTally:
    """The training losses of an epoch, added up on the device: no step waits on the host to count its loss.

    bf16 and fp32 (``scaled`` false): a non-finite loss is a divergence, and the first such step is kept. fp16 with
    a GradScaler: a step whose forward overflowed is one the scaler skips (and halves its scale for), which is its
    job, not a divergence; its loss is left out of the mean, and a run that keeps overflowing shows as a scale below
    MIN_LOSS_SCALE instead (one overflow in an attention block must not end a run of hours).
    """

    def __init__(self, loss_sum: float, n_loss: float, step: int, device: torch.device, scaled: bool):
        self.loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)
        self.n_loss = torch.tensor(n_loss, dtype=torch.float64, device=device)
        self.step = torch.tensor(step, device=device)
        self.first_bad = torch.tensor(-1, device=device)
        self.scaled = scaled

    def add(self, loss: torch.Tensor) -> None:
        self.step += 1
        finite = torch.isfinite(loss)
        if self.scaled:
            self.loss_sum += torch.where(finite, loss, 0.0)
            self.n_loss += finite
        else:
            self.first_bad = torch.where((self.first_bad < 0) & ~finite, self.step, self.first_bad)
            self.loss_sum += loss
            self.n_loss += 1

    def values(self) -> list[torch.Tensor]:
        """Loss sum, counted steps and the first non-finite step (-1: none), for the check's one gather."""
        return [self.loss_sum, self.n_loss, self.first_bad.to(torch.float64)]


def train_epoch(job: Job, stop: _StopSignal) -> dict[str, Any] | None:
    """Train the current epoch from its current step; return where the loss diverged (or, in fp16, where the loss
    scale fell below MIN_LOSS_SCALE), or None.

    The loop queues work without waiting for it: losses add up on the device and the first non-finite step is
    kept there too; every ``log_every`` steps (and at the epoch's end) one gather reads them on the host, and
    Accelerate's trigger tells every rank whether any rank was signalled to stop.
    """
    acc, prog, tcfg = job.accelerator, job.progress, job.tcfg
    epoch, device = prog.epoch, acc.device
    job.model.train()
    job.train_loader.set_epoch(epoch)  # the seedable sampler's shuffle
    job.train_loader.dataset.set_epoch(epoch)  # per-sample augmentation: not forwarded when the loader is sharded
    loader = acc.skip_first_batches(job.train_loader, prog.step) if prog.step else job.train_loader
    if not prog.step:
        prog.epoch_acc = Progress.fresh_acc()
    totals = prog.epoch_acc
    tally = StepTally(totals["loss_sum"], totals["n_loss"], prog.step, device, scaled=loss_scale(acc.scaler) < math.inf)
    train_loss_fn, log_every, t0 = job.losses[0], tcfg.get("log_every", 50), time.perf_counter()
    # a progress bar on a terminal; plain lines in a log file
    interactive = acc.is_main_process and sys.stdout.isatty()
    bar = tqdm(total=job.steps, initial=prog.step, desc=f"epoch {epoch + 1}", leave=False, disable=not interactive)
    for images, targets in _timed(loader, totals):
        if prog.step >= job.steps:
            break
        images = job.on_device(images, train=True)
        if job.mixup is not None:
            images, targets = job.mixup(images, targets)
        if tcfg.get("channels_last"):
            images = images.contiguous(memory_format=torch.channels_last)
        loss = train_loss_fn(job.model(images), targets)
        acc.backward(loss)
        if tcfg.get("grad_clip"):
            acc.clip_grad_norm_(job.model.parameters(), tcfg["grad_clip"])
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        tally.add(loss.detach())
        prog.step += 1
        totals["seen"] += images.shape[0] * acc.num_processes
        if job.scheduler is not None:
            job.scheduler.step_update(epoch * job.steps + prog.step)
        if prog.step % log_every and prog.step < job.steps:
            continue
        # the check: one gather and one trigger all-reduce per log_every steps, never per step
        scale = torch.tensor(loss_scale(acc.scaler), dtype=torch.float64, device=device)
        gathered = acc.gather(torch.stack([*tally.values(), scale])[None]).cpu()
        totals["loss_sum"], totals["n_loss"] = float(gathered[:, 0].mean()), float(gathered[:, 1].mean())
        bad = [int(b) for b in gathered[:, 2] if b >= 0]
        scale = float(gathered[:, 3].min())  # every rank decides on the same values: none is left waiting
        if bad or scale < MIN_LOSS_SCALE:
            prog.train_seconds += time.perf_counter() - t0
            if bad:
                at = {"epoch": epoch + 1, "step": min(bad)}
                return at | {"reason": f"loss is not finite at epoch {at['epoch']} step {at['step']}"}
            at = {"epoch": epoch + 1, "step": prog.step, "loss_scale": scale}
            why = f"the fp16 loss scale fell to {scale:.3g} at epoch {epoch + 1} step {prog.step}: every step overflows"
            return at | {"reason": why}
        running = totals["loss_sum"] / totals["n_loss"] if totals["n_loss"] else math.nan
        lr = job.optimizer.param_groups[0]["lr"]
        acc.log({"train/loss": running, "train/lr": lr}, step=epoch * job.steps + prog.step)
        if bar.disable:
            acc.print(f"[{job.tag}] epoch {epoch + 1} step {prog.step}/{job.steps} loss {running:.4f}")
        bar.update(prog.step - bar.n)
        bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.3g}")
        if _stop_requested(job, stop):
            _save_and_exit(job, stop, time.perf_counter() - t0)
    bar.close()
    elapsed = time.perf_counter() - t0
    totals["seconds"] += elapsed
    prog.train_seconds += elapsed
    return None


def _timed(loader: Any, totals: dict[str, float]) -> Any:
    """``loader``'s batches, adding the time the step waited for each to ``totals["data_wait"]`` (timm's
    ``data_time``): the step queues its GPU work without waiting, so a wait here is time the GPU may idle."""
    batches = iter(loader)
    while True:
        t0 = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        finally:
            totals["data_wait"] = totals.get("data_wait", 0.0) + time.perf_counter() - t0
        yield batch


def _stop_requested(job: Job, stop: _StopSignal) -> bool:
    """Whether any rank was signalled to stop (Accelerate's trigger: one all-reduce, so every rank agrees)."""
    if stop.signum is not None:
        job.accelerator.set_trigger()
    return job.accelerator.check_trigger()


def _save_and_exit(job: Job, stop: _StopSignal, elapsed: float) -> None:
    """Every rank saves its part of the state, waits until all of it is in place, says where it stopped, exits 75."""
    prog = job.progress
    prog.epoch_acc["seconds"] += elapsed
    prog.train_seconds += elapsed
    save_state(job)
    _exit_preempted(job, stop)


def _exit_preempted(job: Job, stop: _StopSignal) -> None:
    prog, acc = job.progress, job.accelerator
    why = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another rank"
    print(
        f"[{job.tag}] rank {acc.process_index}: got {why}: saved state at epoch {prog.epoch + 1} step {prog.step}; "
        f"exiting {EXIT_PREEMPTED} so a retry resumes",
        flush=True,
    )
    note_preempted(acc.process_index)
    sys.exit(EXIT_PREEMPTED)


def save_state(job: Job) -> None:
    prog, scheduler = job.progress, job.scheduler
    meta = {
        "run": identity(job),
        "epoch": prog.epoch,
        "step": prog.step,
        "progress": prog.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
    }
    checkpoint.save(job.accelerator, job.out, meta)


def end_epoch(job: Job) -> dict[str, Any] | None:
    """Validate, add the epoch's history row, step the schedule and save the state for a resume; return the
    divergence when the validation loss is not finite, else None.

    A non-finite validation loss with a finite training loss is what an fp16 forward that overflowed into a
    BatchNorm leaves: the GradScaler skips that step, but the layer's running statistics took the batch's inf/NaN
    and never recover (training normalises by the batch and goes on as if nothing happened), so every later
    validation and the saved weights would be at chance under status "ok". Precise BN re-estimates them first.
    """
    prog = job.progress
    epoch, totals = prog.epoch, prog.epoch_acc
    t0 = time.perf_counter()
    precise_bn(job)
    metrics = evaluate(
        job.model, job.val_loader, job.losses[1], job.accelerator, job.tcfg.get("channels_last"), job.on_device
    )
    prog.val_seconds += time.perf_counter() - t0
    seconds = totals["seconds"]  # the whole epoch, also across a resume
    row = {
        "epoch": epoch + 1,
        "train_loss": totals["loss_sum"] / totals["n_loss"] if totals["n_loss"] else math.nan,
        **metrics,
        "lr": job.optimizer.param_groups[0]["lr"],
        "images_per_s": totals["seen"] / seconds if seconds > 0 else float("nan"),
        "seconds": seconds,
        "data_wait_s": totals.get("data_wait", 0.0),  # of ``seconds``: the step waiting for the loader
    }
    prog.history.append(row)
    job.accelerator.log(
        {
            "epoch": epoch + 1,
            "train/epoch_loss": row["train_loss"],
            "eval/loss": row["val_loss"],
            "eval/top1": row["top1"],
            "eval/top5": row["top5"],
            "train/images_per_s": row["images_per_s"],
        },
        step=(epoch + 1) * job.steps,
    )
    prog.epoch, prog.step, prog.epoch_acc = epoch + 1, 0, Progress.fresh_acc()
    if job.scheduler is not None:
        job.scheduler.step(epoch + 1)
    waited = row["data_wait_s"] / seconds if seconds > 0 else 0.0
    job.accelerator.print(
        f"[{job.tag}] epoch {epoch + 1}/{job.epochs} loss {row['train_loss']:.4f} val top1 {row['top1']:.2f} "
        f"top5 {row['top5']:.2f} lr {row['lr']:.3g} {row['images_per_s']:.0f} img/s {seconds:.1f}s "
        f"(loader wait {waited:.0%})"
        + (
            "; loader-bound: raise train.num_workers (and CPUs per GPU) or set data.stage_to (README, Data path)"
            if waited > DATA_WAIT_WARN and epoch > 0  # the first epoch also waits for its workers to start
            else ""
        )
    )
    if not math.isfinite(row["val_loss"]):  # every rank read the same gathered loss: all stop together
        return {
            "epoch": epoch + 1,
            "step": job.steps,
            "reason": f"validation loss is not finite after epoch {epoch + 1} (in fp16 an overflowed forward leaves "
            "BatchNorm's running statistics non-finite for good; use bf16, or set train.precise_bn_batches)",
        }
    if prog.epoch < job.epochs:
        save_state(job)
    return None


def precise_bn(job: Job) -> None:
    """Re-estimate every BatchNorm's running statistics on ``train.precise_bn_batches`` training batches ("precise
    BN", Wu and Johnson, *Rethinking "Batch" in BatchNorm*) with torch's ``swa_utils.update_bn``, before validating.

    Running averages lag the weights: they start at mean 0 and variance 1 and forget at BatchNorm's momentum (0.1
    per step), while a small-init network's activations are far smaller. On the built-in digits every model but
    ConvNeXt validated at chance after 31 steps, with almost every recipe, and most recipes reached 85-97 % by 9
    epochs. Training normalises by the batch, so the weights and the training itself are unchanged: only the
    buffers that validation (and the saved model) use. The batches come from the training set under its own
    seeded sampler, drawn alike on every rank (the ranks' buffers stay equal) and never from the process RNG, and
    loaded in this process.
    """
    batches = job.tcfg.get("precise_bn_batches", 0)
    model = job.accelerator.unwrap_model(job.model)
    if not batches or not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return
    size = job.cfg["hparams"]["batch_size"]
    generator = torch.Generator().manual_seed(job.cfg["seed"] * 100_003 + job.progress.epoch)
    dataset = job.train_loader.dataset  # the training images under the training transform of this epoch
    sampler = RandomSampler(dataset, num_samples=batches * size, generator=generator)
    device, channels_last = job.accelerator.device, job.tcfg.get("channels_last")

    def inputs():
        for images, _ in DataLoader(dataset, batch_size=size, sampler=sampler):
            images = job.on_device(images.to(device, non_blocking=True))
            yield images.contiguous(memory_format=torch.channels_last) if channels_last else images

    # drop-path and dropout still draw in train mode: the process RNG (which a saved state restores) is set back.
    # A compiled model runs eagerly here: update_bn's cumulative average (momentum None) reads each BatchNorm's
    # batch count as a Python number, which would recompile its graph on every batch.
    cuda = [device.index or 0] if device.type == "cuda" else []
    eager = torch.compiler.set_stance("force_eager") if job.tcfg.get("compile") else contextlib.nullcontext()
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), job.accelerator.autocast(), eager:
        update_bn(inputs(), model)


def evaluate(
    model, loader, loss_fn, accelerator: Accelerator, channels_last: bool, on_device: Any = None
) -> dict[str, float]:
    """Top-1/top-5 and loss over the whole held-out validation set (``gather_for_metrics`` drops the padding).

    ``on_device`` turns the loader's batches into the model's input (:class:`lcnn.recipe.DeviceBatch`).
    """
    model.eval()
    totals, n = torch.zeros(3, dtype=torch.float64, device=accelerator.device), 0
    with torch.inference_mode():
        for images, targets in loader:
            if on_device is not None:
                images = on_device(images)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            logits, targets = accelerator.gather_for_metrics((logits, targets))
            k = min(5, logits.shape[1])
            hits = logits.topk(k, dim=1).indices == targets[:, None]
            loss = loss_fn(logits, targets).double() * targets.shape[0]
            totals += torch.stack([loss, hits[:, 0].sum().double(), hits.any(dim=1).sum().double()])
            n += targets.shape[0]
    loss_sum, top1, top5 = totals.tolist()  # the one host read of the evaluation
    n = max(n, 1)
    return {"val_loss": loss_sum / n, "top1": 100 * top1 / n, "top5": 100 * top5 / n}


def finish(job: Job, diverged: dict[str, int] | None) -> dict[str, Any]:
    """Write weights, history, resolved config, environment and (last) metrics.json, all atomically, on rank 0."""
    cfg, acc, prog = job.cfg, job.accelerator, job.progress
    history = prog.history
    best = max(history, key=lambda r: r["top1"]) if history else None
    cuda = acc.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    env = environment()
    seconds = prog.train_seconds + prog.val_seconds
    metrics = {
        "model": cfg["model"],
        "timm_name": cfg["timm_name"],
        "variant": cfg["variant"],
        "axis": cfg["hparams"]["axis"],
        "seed": cfg["seed"],
        "status": "diverged" if diverged else "ok",
        "top1": history[-1]["top1"] if history and not diverged else None,
        "top5": history[-1]["top5"] if history and not diverged else None,
        "best_top1": best["top1"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "epochs": cfg["hparams"]["epochs"],
        "epochs_completed": len(history),
        "train_images": _dataset_size(cfg, "train"),
        "val_images": _dataset_size(cfg, "val"),
        "train_seconds": prog.train_seconds,
        "val_seconds": prog.val_seconds,
        # the share of training time the step waited for the loader, past the first epoch's worker start
        "data_wait_fraction": _data_wait_fraction(history),
        "device": env["device_name"],
        "device_type": acc.device.type,
        "num_devices": acc.num_processes,
        "device_hours": seconds * acc.num_processes / 3600,  # training and validation: what the study cost
        "peak_mem_mb": peak,
        "params": models.count_params(job.model),
        "img_size": job.img_size,
        "num_classes": job.num_classes,
        "slurm_job_id": env["slurm_job_id"],
        "diverged_at": diverged,
    }
    acc.wait_for_everyone()
    if acc.is_main_process:
        out = job.out
        models.save_weights(
            acc.unwrap_model(job.model),
            out / "model.safetensors",
            metadata={"timm_name": cfg["timm_name"], "num_classes": str(job.num_classes)},
        )
        atomic_write_text(out / "history.csv", _history_csv(history))
        atomic_save(out / "summary.csv", lambda tmp: _timm_summary(history, tmp))
        atomic_write_text(out / "args.yaml", yaml.safe_dump(_jsonable(cfg), sort_keys=False))
        atomic_write_json(out / "config.json", {**cfg, "img_size": job.img_size, "num_classes": job.num_classes})
        atomic_write_json(out / "env.json", env)
        atomic_write_json(out / "metrics.json", metrics)
    acc.wait_for_everyone()
    return metrics


def _data_wait_fraction(history: list[dict[str, Any]]) -> float | None:
    rows = history[1:] or history
    seconds = sum(r["seconds"] for r in rows)
    return sum(r.get("data_wait_s", 0.0) for r in rows) / seconds if seconds > 0 else None


def hand_off(job: Job, diverged: dict[str, int] | None) -> None:
    """A halving rung that stopped early hands its state on; a finished run frees it (unless keep_checkpoint)."""
    cfg, acc = job.cfg, job.accelerator
    if not acc.is_main_process:
        return
    stopped_early = diverged is None and job.progress.epoch < job.epochs
    if stopped_early and cfg.get("handoff_dir"):
        checkpoint.move(job.out, cfg["handoff_dir"])  # where the next rung goes on from; a rerun starts over
    if not job.tcfg.get("keep_checkpoint"):
        if not stopped_early:
            checkpoint.remove(job.out)
        if cfg.get("init_state"):  # the previous rung's state, now carried on into this rung's outputs
            checkpoint.remove(cfg["init_state"])


HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_s", "seconds", "data_wait_s"]


def _history_csv(history: list[dict[str, Any]]) -> str:
    lines = [",".join(HISTORY_COLUMNS)]
    lines += [
        ",".join(f"{v:.6g}" if isinstance(v := row.get(c, ""), float) else str(v) for c in HISTORY_COLUMNS)
        for row in history
    ]
    return "\n".join(lines) + "\n"


def _timm_summary(history: list[dict[str, Any]], path: str) -> None:
    """timm train.py's per-run summary.csv, written by timm's own ``update_summary``: scripts for timm read it."""
    from timm.utils import update_summary

    for i, row in enumerate(history):
        train_metrics = {"loss": row["train_loss"]}
        eval_metrics = {"loss": row["val_loss"], "top1": row["top1"], "top5": row["top5"]}
        update_summary(row["epoch"], train_metrics, eval_metrics, path, lr=row["lr"], write_header=i == 0)
    if not history:
        Path(path).write_text("epoch,train_loss,eval_loss,eval_top1,eval_top5,lr\n")


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


def _dataset_size(cfg: dict[str, Any], split: str) -> int:
    with open(Path(cfg["data_root"]) / f"{split}.csv") as fh:
        return sum(1 for _ in fh) - 1


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one lcnn run (model x variant x seed).")
    parser.add_argument("--run-json", required=True, help="the run's recipe (lcnn.config.run_recipe) or full config")
    parser.add_argument("--exec-json", help="execution settings shared by every job (lcnn.config.run_execution)")
    parser.add_argument("--out-dir", required=True, help="run folder: runs/{model}/{variant}/seed{seed}")
    args = parser.parse_args(argv)
    cfg = json_arg(args.run_json, "--run-json")
    if args.exec_json:
        cfg = merge_run(cfg, json_arg(args.exec_json, "--exec-json"))
    cfg["out_dir"] = args.out_dir
    metrics = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({k: metrics[k] for k in ("model", "variant", "seed", "status", "top1", "top5")}))


if __name__ == "__main__":
    main()
    exit_now()

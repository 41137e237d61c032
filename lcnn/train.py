"""Training stage: one model x variant x seed, with Accelerate, resumable and honest about its outcome.

Run by the train rule as ``python -m lcnn.train`` (one device) or ``accelerate launch -m lcnn.train``
(several GPUs). Every study axis goes through a timm factory: ``create_optimizer_v2``,
``create_scheduler_v2``, ``create_transform`` and ``Mixup``. On SIGUSR1/SIGTERM (a SLURM time limit or
preemption) the full training state is saved and the job exits non-zero, so a retry resumes from it.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from timm.utils import accuracy

from lcnn import checkpoint, models
from lcnn.recipe import build_loaders, build_loss, build_optimizer, build_scheduler
from lcnn.utils import LcnnError, atomic_write_json, atomic_write_text, cli, environment, json_arg, peak_rss_mb

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again", which Snakemake's retry and a SLURM requeue do


class _Stop:
    """Remembers a SIGUSR1/SIGTERM so the loop can save its state at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, _frame: Any) -> None:
        self.signum = signum


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Train one run described by ``cfg`` (see :func:`lcnn.config.run_config`) into ``cfg['out_dir']``."""
    out = Path(cfg["out_dir"])
    hp, tcfg = cfg["hparams"], cfg["train"]
    tag = f"{cfg['model']}/{cfg['variant']}/seed{cfg['seed']}"
    if os.environ.get("LCNN_FAIL_RUN") == tag:  # fault-injection hook for the workflow tests
        raise RuntimeError(f"LCNN_FAIL_RUN={tag}: failing this job on purpose")
    accelerator = _accelerator(tcfg)
    set_seed(cfg["seed"])
    img_size = hp.get("img_size") or cfg["native_img_size"]
    train_loader, val_loader, mixup, num_classes = build_loaders(cfg, img_size, accelerator.num_processes)
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
    optimizer, lr = build_optimizer(model, hp, accelerator.num_processes)
    model, optimizer, train_loader, val_loader = accelerator.prepare(model, optimizer, train_loader, val_loader)
    steps = len(train_loader)
    if tcfg.get("max_steps_per_epoch"):
        steps = min(steps, tcfg["max_steps_per_epoch"])
    scheduler = build_scheduler(optimizer, hp, steps)
    train_loss_fn, val_loss_fn = build_loss(hp)

    # epoch_acc: the interrupted epoch's running totals, so its history row covers the whole epoch after a resume
    fresh_acc = {"seen": 0, "loss_sum": 0.0, "n_loss": 0, "seconds": 0.0}
    state = {"epoch": 0, "step": 0, "history": [], "train_seconds": 0.0, "epoch_acc": dict(fresh_acc)}
    epochs = hp["epochs"]  # the schedule always spans the full budget, also when this job stops earlier
    stop_at = int(cfg.get("stop_epoch") or epochs)  # a halving rung stops here; its state lets the next one go on
    if not 1 <= stop_at <= epochs:
        raise LcnnError(f"stop_epoch {stop_at} must be between 1 and the run's {epochs} epochs")
    saved = checkpoint.load(out)
    if saved is None and cfg.get("init_state"):  # a later rung: go on from where the previous rung stopped
        saved = checkpoint.load(cfg["init_state"])
        if saved is None or saved["epoch"] > stop_at or saved["step"]:
            raise LcnnError(
                f"no usable training state in {cfg['init_state']} to go on from (missing, or not at an epoch "
                f"<= {stop_at}); rerun the previous rung, e.g. by deleting its metrics.json"
            )
    if saved is not None:
        _check_state_fits(saved, cfg, accelerator.unwrap_model(model), num_classes)
        accelerator.unwrap_model(model).load_state_dict(saved["model"])
        optimizer.optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        if accelerator.scaler is not None and saved.get("scaler"):
            accelerator.scaler.load_state_dict(saved["scaler"])
        checkpoint.set_rng_state(saved["rng"])
        state = {k: saved.get(k, state[k]) for k in state}
        accelerator.print(f"[{tag}] resuming at epoch {state['epoch'] + 1} step {state['step']}")

    def save_state() -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            checkpoint.save(
                out,
                {
                    **state,
                    "run": {
                        "timm_name": cfg["timm_name"],
                        "num_classes": num_classes,
                        "img_size": img_size,
                        "seed": cfg["seed"],
                        "hparams": json.dumps(hp, sort_keys=True),
                    },
                    "model": accelerator.unwrap_model(model).state_dict(),
                    "optimizer": optimizer.optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else {},
                    "scaler": accelerator.scaler.state_dict() if accelerator.scaler is not None else {},
                    "rng": checkpoint.rng_state(),
                },
            )

    stop = _Stop()
    diverged = None
    accelerator.print(
        f"[{tag}] {cfg['timm_name']} {models.count_params(model) / 1e6:.1f}M params, {len(train_loader.dataset)} "
        f"train / {len(val_loader.dataset)} val images, {epochs} epochs x {steps} steps, lr {lr:.3g}, "
        f"{accelerator.num_processes} x {accelerator.device} precision={accelerator.mixed_precision}"
        + (f", stopping after epoch {stop_at}" if stop_at < epochs else "")
    )
    while state["epoch"] < stop_at and diverged is None:
        epoch = state["epoch"]
        model.train()
        train_loader.set_epoch(epoch)  # reshuffles with seed + epoch, and reseeds per-sample augmentation
        loader = accelerator.skip_first_batches(train_loader, state["step"]) if state["step"] else train_loader
        acc = state["epoch_acc"] if state["step"] else dict(fresh_acc)
        t0, seen, loss_sum, n_loss = time.perf_counter(), acc["seen"], acc["loss_sum"], acc["n_loss"]
        for images, targets in loader:
            if state["step"] >= steps:
                break
            if mixup is not None:
                images, targets = mixup(images, targets)
            if tcfg.get("channels_last"):
                images = images.contiguous(memory_format=torch.channels_last)
            with accelerator.accumulate(model):
                loss = train_loss_fn(model(images), targets)
                if _any_process(accelerator, not torch.isfinite(loss).all()):  # every process stops together
                    diverged = {"epoch": epoch + 1, "step": state["step"] + 1}
                    break
                accelerator.backward(loss)
                if tcfg.get("grad_clip"):
                    accelerator.clip_grad_norm_(model.parameters(), tcfg["grad_clip"])
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            if scheduler is not None:
                scheduler.step_update(epoch * steps + state["step"])
            seen += images.shape[0] * accelerator.num_processes
            loss_sum, n_loss = loss_sum + loss.item(), n_loss + 1
            if state["step"] % tcfg.get("log_every", 50) == 0:
                accelerator.print(f"[{tag}] epoch {epoch + 1} step {state['step']}/{steps} loss {loss.item():.4f}")
            if _any_process(accelerator, stop.signum is not None):
                elapsed = time.perf_counter() - t0
                state["train_seconds"] += elapsed
                state["epoch_acc"] = {"seen": seen, "loss_sum": loss_sum, "n_loss": n_loss}
                state["epoch_acc"]["seconds"] = acc["seconds"] + elapsed
                save_state()
                why = signal.Signals(stop.signum).name if stop.signum else "a stop signal on another process"
                accelerator.print(
                    f"[{tag}] got {why}: saved state at epoch {epoch + 1} step {state['step']}; "
                    f"exiting {EXIT_PREEMPTED} so a retry resumes"
                )
                sys.exit(EXIT_PREEMPTED)
        if diverged is not None:
            accelerator.print(
                f"[{tag}] loss is not finite at epoch {diverged['epoch']} step {diverged['step']}: diverged"
            )
            break
        elapsed = time.perf_counter() - t0
        state["train_seconds"] += elapsed
        seconds = acc["seconds"] + elapsed  # the whole epoch, also across a resume
        metrics = evaluate(model, val_loader, val_loss_fn, accelerator, tcfg.get("channels_last", False))
        row = {
            "epoch": epoch + 1,
            "train_loss": loss_sum / max(n_loss, 1),
            **metrics,
            "lr": optimizer.param_groups[0]["lr"],
            "images_per_s": seen / seconds if seconds > 0 else float("nan"),
            "seconds": seconds,
        }
        state["history"].append(row)
        state["epoch"], state["step"], state["epoch_acc"] = epoch + 1, 0, dict(fresh_acc)
        if scheduler is not None:
            scheduler.step(epoch + 1)
        accelerator.print(
            f"[{tag}] epoch {epoch + 1}/{epochs} loss {row['train_loss']:.4f} val top1 {row['top1']:.2f} "
            f"top5 {row['top5']:.2f} lr {row['lr']:.3g} {row['images_per_s']:.0f} img/s {seconds:.1f}s"
        )
        if state["epoch"] < epochs:
            save_state()

    result = _finish(cfg, out, accelerator, model, state, diverged, img_size, num_classes)
    stopped_early = diverged is None and state["epoch"] < epochs  # the next rung goes on from the saved state
    if accelerator.is_main_process and stopped_early and cfg.get("handoff_dir"):
        checkpoint.move(out, cfg["handoff_dir"])  # where the next rung goes on from; a rerun of this rung starts over
    if accelerator.is_main_process and not tcfg.get("keep_checkpoint"):
        if not stopped_early:
            checkpoint.remove(out)
        if cfg.get("init_state"):  # the previous rung's state, now carried on into this rung's outputs
            checkpoint.remove(cfg["init_state"])
    return result


def _any_process(accelerator: Accelerator, flag: bool) -> bool:
    """True if ``flag`` is set on any process: with several GPUs, one rank alone must never leave the loop."""
    if accelerator.num_processes == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=accelerator.device)
    return accelerator.reduce(t, reduction="sum").item() > 0


def _check_state_fits(saved: dict[str, Any], cfg: dict[str, Any], model, num_classes: int) -> None:
    """Refuse, naming both sides, a saved state of another recipe, seed, architecture or class count."""
    was = saved.get("run") or {}
    if "hparams" in was:
        old = {"seed": was["seed"], **json.loads(was["hparams"])}
        new = {"seed": cfg["seed"], **cfg["hparams"]}
        changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        if changed:
            shown = ", ".join(f"{k} {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
            raise LcnnError(
                f"the saved {checkpoint.STATE_FILE} in {cfg['out_dir']} was trained with other settings ({shown}); "
                f"delete that {checkpoint.STATE_FILE} to start this run over with the new ones"
            )
    own, theirs = model.state_dict(), saved["model"]
    bad = sorted(set(own) ^ set(theirs)) or sorted(k for k in own if own[k].shape != theirs[k].shape)
    if bad:
        raise LcnnError(
            f"the saved {checkpoint.STATE_FILE} in {cfg['out_dir']} is from {was.get('timm_name', 'another model')} "
            f"with {was.get('num_classes', '?')} classes, but this run trains {cfg['timm_name']} with {num_classes} "
            f"classes (first difference: {bad[0]}); delete that {checkpoint.STATE_FILE} to start this run over"
        )


def evaluate(model, loader, loss_fn, accelerator: Accelerator, channels_last: bool) -> dict[str, float]:
    """Top-1/top-5 and loss on the held-out validation set."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64)
    with torch.inference_mode():
        for images, targets in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            logits = model(images).float()
            logits, targets = accelerator.gather_for_metrics((logits, targets))
            top1, top5 = accuracy(logits, targets, topk=(1, min(5, logits.shape[1])))
            n = targets.shape[0]
            totals += torch.tensor([loss_fn(logits, targets).item() * n, top1.item() * n, top5.item() * n, n])
    n = max(totals[3].item(), 1)
    return {"val_loss": totals[0].item() / n, "top1": totals[1].item() / n, "top5": totals[2].item() / n}


def _accelerator(tcfg: dict[str, Any]) -> Accelerator:
    precision = tcfg.get("precision", "no")
    cpu = tcfg.get("device") == "cpu" or not torch.cuda.is_available()
    if precision == "fp16" and cpu:
        raise LcnnError("train.precision is fp16 but there is no GPU; use bf16 or no on the CPU")
    # The seedable sampler shuffles with seed + epoch, so a resumed epoch sees the same order.
    return Accelerator(
        mixed_precision=precision, cpu=cpu, dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True)
    )


def _finish(cfg, out: Path, accelerator, model, state, diverged, img_size: int, num_classes: int) -> dict[str, Any]:
    """Write weights, history, resolved config, environment and (last) metrics.json, all atomically."""
    history = state["history"]
    best = max(history, key=lambda r: r["top1"]) if history else None
    cuda = accelerator.device.type == "cuda"
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    env = environment()
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
        "train_seconds": state["train_seconds"],
        "device": env["device_name"],
        "device_type": accelerator.device.type,
        "num_devices": accelerator.num_processes,
        "device_hours": state["train_seconds"] * accelerator.num_processes / 3600,
        "peak_mem_mb": peak,
        "params": models.count_params(model),
        "img_size": img_size,
        "num_classes": num_classes,
        "slurm_job_id": env["slurm_job_id"],
        "diverged_at": diverged,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        models.save_weights(
            accelerator.unwrap_model(model),
            out / "model.safetensors",
            metadata={"timm_name": cfg["timm_name"], "num_classes": str(num_classes)},
        )
        atomic_write_text(out / "history.csv", _history_csv(history))
        atomic_write_json(out / "config.json", {**cfg, "img_size": img_size, "num_classes": num_classes})
        atomic_write_json(out / "env.json", env)
        atomic_write_json(out / "metrics.json", metrics)
    return metrics


HISTORY_COLUMNS = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr", "images_per_s", "seconds"]


def _history_csv(history: list[dict[str, Any]]) -> str:
    lines = [",".join(HISTORY_COLUMNS)]
    lines += [
        ",".join(f"{row[c]:.6g}" if isinstance(row[c], float) else str(row[c]) for c in HISTORY_COLUMNS)
        for row in history
    ]
    return "\n".join(lines) + "\n"


def _dataset_size(cfg: dict[str, Any], split: str) -> int:
    with open(Path(cfg["data_root"]) / f"{split}.csv") as fh:
        return sum(1 for _ in fh) - 1


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train one lcnn run (model x variant x seed).")
    parser.add_argument("--run-json", required=True, help="resolved run config (lcnn.config.run_config) as JSON")
    parser.add_argument("--out-dir", required=True, help="run folder: runs/{model}/{variant}/seed{seed}")
    args = parser.parse_args(argv)
    cfg = json_arg(args.run_json, "--run-json")
    cfg["out_dir"] = args.out_dir
    metrics = run(cfg)
    print(json.dumps({k: metrics[k] for k in ("model", "variant", "seed", "status", "top1", "top5")}))


if __name__ == "__main__":
    main()

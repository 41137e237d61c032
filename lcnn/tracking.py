"""Experiment tracking through Accelerate's trackers: TensorBoard by default, MLflow and W&B on request.

Each run logs under its own name, ``{model}/{variant}/seed{seed}``: TensorBoard to ``logs/tb/{model}/{variant}/
seed{seed}``, MLflow to a local ``mlruns/`` file store (or the server ``MLFLOW_TRACKING_URI`` names), W&B offline
(``wandb sync`` uploads it from a machine with internet). The study's axes are logged as hyperparameters, so
TensorBoard's HParams view and MLflow's run comparison put the variants side by side.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from lcnn.utils import LcnnError

PROJECT = "lcnn"
# tracker -> (module it needs, package that provides it, lcnn extra)
PACKAGES = {
    "tensorboard": ("tensorboard", "tensorboard", None),
    "mlflow": ("mlflow", "mlflow-skinny", "mlflow"),
    "wandb": ("wandb", "wandb", "wandb"),
}


def check_installed(log_with: list[str]) -> None:
    """One line naming the package to install for a tracker that is not there, before any training."""
    for name in log_with:
        if name not in PACKAGES:
            raise LcnnError(f"train.log_with has '{name}'; pick from {', '.join(PACKAGES)}")
        module, package, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            how = f"pip install '{package}'" + (f" (or pip install -e '.[{extra}]')" if extra else "")
            raise LcnnError(f"train.log_with includes {name} but {package} is not installed; {how}, or remove it")


def run_name(cfg: dict[str, Any]) -> str:
    return f"{cfg['model']}/{cfg['variant']}/seed{cfg['seed']}"


def hparams(cfg: dict[str, Any]) -> dict[str, Any]:
    """The run's recipe as flat scalars (TensorBoard's HParams and MLflow's params take no lists or None)."""
    flat = {"model": cfg["model"], "timm_name": cfg["timm_name"], "variant": cfg["variant"], "seed": cfg["seed"]}
    flat |= {k: v for k, v in cfg["hparams"].items()}
    flat |= {f"train.{k}": cfg["train"].get(k) for k in ("precision", "gpus_per_job", "grad_clip")}
    return {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat.items()}


def trackers(cfg: dict[str, Any]) -> list[Any]:
    """Accelerate tracker instances for ``train.log_with``, writing under ``train.log_dir``."""
    log_with = list(cfg["train"].get("log_with") or [])
    if not log_with:
        return []
    check_installed(log_with)
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    log_dir, name = Path(cfg["train"].get("log_dir") or "logs"), run_name(cfg)
    out = []
    if "tensorboard" in log_with:
        out.append(TensorBoardTracker(name, log_dir / "tb"))
    if "mlflow" in log_with:
        os.environ.setdefault("MLFLOW_TRACKING_URI", Path("mlruns").resolve().as_uri())
        # MLflow 3 wants a database, but SQLite locks up with hundreds of jobs writing over a shared file system;
        # one folder per run, as the file store keeps them, does not
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        out.append(MLflowTracker(PROJECT, run_name=name, tags={"model": cfg["model"], "variant": cfg["variant"]}))
    if "wandb" in log_with:
        os.environ.setdefault("WANDB_MODE", "offline")  # compute nodes often have no internet: `wandb sync` later
        os.environ.setdefault("WANDB_DIR", str((log_dir / "wandb").resolve()))
        Path(os.environ["WANDB_DIR"]).mkdir(parents=True, exist_ok=True)
        out.append(WandBTracker(PROJECT, name=name, group=f"{cfg['model']}/{cfg['variant']}"))
    return out


def ensure_mlflow_experiment() -> None:
    """Create the MLflow experiment once; parallel jobs racing to create it must not fail."""
    import mlflow

    try:
        if mlflow.get_experiment_by_name(PROJECT) is None:
            mlflow.create_experiment(PROJECT)
    except mlflow.exceptions.MlflowException:
        if mlflow.get_experiment_by_name(PROJECT) is None:  # not the race: a real error
            raise

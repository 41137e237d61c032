"""Resumable training state: saved atomically, loaded with ``weights_only=True``.

One file holds everything a preempted job needs to continue exactly where it stopped: model,
optimizer, scheduler, grad scaler, every RNG state, the epoch and step, and the history so far.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lcnn.utils import LcnnError, atomic_save

STATE_FILE = "train_state.pt"


def rng_state() -> dict[str, Any]:
    """All RNG states as plain tensors and lists, so ``torch.load(weights_only=True)`` accepts them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_tuplify(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["kind"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["gauss"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuplify(obj: Any) -> Any:
    return tuple(_tuplify(x) for x in obj) if isinstance(obj, (list, tuple)) else obj


def save(run_dir: str | Path, state: dict[str, Any]) -> Path:
    """Write the training state atomically: a kill at any moment leaves the old file or the new one."""
    return atomic_save(Path(run_dir) / STATE_FILE, lambda tmp: torch.save(state, tmp))


def load(run_dir: str | Path) -> dict[str, Any] | None:
    """Return the saved training state, or None when the run has not been started before."""
    path = Path(run_dir) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise LcnnError(f"cannot resume from {path} ({type(err).__name__}: {err}); delete it to start over") from None


def move(run_dir: str | Path, dest_dir: str | Path) -> Path:
    """Move a run's state into ``dest_dir`` (a rename, so it is never half there)."""
    dest = Path(dest_dir) / STATE_FILE
    dest.parent.mkdir(parents=True, exist_ok=True)
    return (Path(run_dir) / STATE_FILE).replace(dest)


def remove(run_dir: str | Path) -> None:
    (Path(run_dir) / STATE_FILE).unlink(missing_ok=True)

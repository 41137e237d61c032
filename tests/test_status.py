"""lcnn.status: every run's state, the GPU-hours spent and left, read from what the workflow leaves on disk."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import OVERLAYS, REPO, copy_workflow, tiny_config
from test_slurm import slurm_cluster  # noqa: F401  (the session's SLURM test cluster fixture)

from lcnn import status

OVERLAY = "status.yaml"  # 4 epochs, so a running run has epochs left


def write_run(root, model, variant, **metrics):
    """A run folder's metrics.json, with the keys the trainer writes."""
    run = root / f"runs/{model}/{variant}/seed0"
    run.mkdir(parents=True, exist_ok=True)
    full = {"model": model, "variant": variant, "seed": 0, "status": "ok", "top1": None, "epochs_completed": 4}
    full.update({"device_hours": 0.4, "diverged_at": None, **metrics})
    (run / "metrics.json").write_text(json.dumps(full))


def write_log(root, model, variant, lines, age_s=0.0):
    """A rule log with the trainer's progress lines, last written ``age_s`` seconds ago."""
    log = root / f"logs/train/{model}/{variant}/seed0.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    tag = f"[{model}/{variant}/seed0]"
    log.write_text("".join(f"{tag} {line}\n" for line in lines))
    past = time.time() - age_s
    os.utime(log, (past, past))
    return log


@pytest.fixture
def run_tree(tmp_path):
    """The tiny study's workflow folder with its four runs in four different states, written by hand."""
    root = copy_workflow(tmp_path / "study")
    (root / OVERLAY).write_text(yaml.safe_dump({"baseline": {"epochs": 4}}))
    write_run(root, "mobilenetv3_l", "baseline", top1=51.5)
    write_run(root, "mobilenetv3_l", "cosine", status="diverged", epochs_completed=1, device_hours=0.1,
              diverged_at={"epoch": 2, "step": 3})  # fmt: skip
    write_log(root, "mobilevitv2_xs", "baseline", ["epoch 1/4 loss 2.3 val top1 10.00 top5 50.00",
              "RuntimeError: CUDA error: an illegal memory access"], age_s=7200)  # fmt: skip
    write_log(root, "mobilevitv2_xs", "cosine", ["epoch 1/4 loss 2.3 val top1 10.00 top5 50.00 lr 0.1",
              "epoch 2/4 loss 2.1 val top1 17.50 top5 60.00 lr 0.1", "epoch 3 step 2/7 loss 2.0000"])  # fmt: skip
    return root


def test_statuses_spent_and_left_from_a_hand_made_tree(run_tree):
    out = status.run({"directory": run_tree, "configfiles": [*OVERLAYS, OVERLAY], "slurm": False})
    rows = {(r["model"], r["variant"]): r for r in out["runs"]}
    assert len(out["runs"]) == 4 and len(rows) == 4
    assert [rows[k]["status"] for k in sorted(rows)] == ["done", "diverged", "failed", "running"]
    done, diverged = rows["mobilenetv3_l", "baseline"], rows["mobilenetv3_l", "cosine"]
    failed, running = rows["mobilevitv2_xs", "baseline"], rows["mobilevitv2_xs", "cosine"]
    assert done["top1"] == 51.5 and done["epoch_done"] == 4
    assert "epoch 2 step 3" in diverged["detail"]
    assert (
        "illegal memory access" in failed["detail"]
        and "logs/train/mobilevitv2_xs/baseline/seed0.log" in failed["detail"]
    )
    assert (running["epoch_done"], running["top1"]) == (2, 17.5) and running["detail"] == "epoch 3 step 2/7"
    assert out["counts"] == {"done": 1, "running": 1, "queued": 0, "failed": 1, "diverged": 1, "pending": 0}
    assert out["gpu_hours"]["finished"] == pytest.approx(0.5)
    # 0.1 device-hours per epoch measured on mobilenetv3_l; mobilevitv2_xs has 4 + 2 epochs left at that mean
    assert out["estimate"]["gpu_hours_left"] == pytest.approx(0.6)
    assert out["estimate"]["hours_left"] == pytest.approx(0.6)
    assert "mobilevitv2_xs at the all-model mean" in out["estimate"]["note"]


def test_a_run_with_nothing_yet_is_pending_and_a_stale_log_failed(run_tree):
    shutil.rmtree(run_tree / "logs/train/mobilevitv2_xs/cosine")
    out = status.run({"directory": run_tree, "configfiles": [*OVERLAYS, OVERLAY], "slurm": False,
                      "stale_after_min": 60})  # fmt: skip
    assert len(out["runs"]) == 4
    by_variant = {(r["model"], r["variant"]): r["status"] for r in out["runs"]}
    assert by_variant["mobilevitv2_xs", "cosine"] == "pending"
    assert by_variant["mobilevitv2_xs", "baseline"] == "failed"  # two hours without a line: not running
    assert out["estimate"]["hours_left"] is None  # nothing is running, so no wall-clock figure


def test_slurm_jobs_match_runs_by_the_plugins_comment():
    """sacct rows as snakemake-executor-plugin-slurm submits them: comment rule_<rule>_wildcards_<values>; the
    latest submission of a run wins (a retry after a failure), and a job without a comment is matched by its log."""
    jobs = [
        {"JobID": "11", "Comment": "rule_train_wildcards_mobilenetv3_l_baseline_0", "State": "FAILED",
         "Submit": "2026-01-01T10:00:00", "Elapsed": "00:10:00", "AllocTRES": "cpu=9,gres/gpu=1"},
        {"JobID": "12", "Comment": "rule_train_wildcards_mobilenetv3_l_baseline_0", "State": "PENDING",
         "Submit": "2026-01-01T10:11:00", "Elapsed": "00:00:00", "AllocTRES": ""},
        {"JobID": "13", "Comment": "", "State": "RUNNING", "Submit": "2026-01-01T10:12:00", "Elapsed": "1-02:00:00",
         "AllocTRES": "cpu=18,gres/gpu:a100=2,gres/gpu=2"},
        {"JobID": "14", "Comment": "rule_report", "State": "PENDING", "Submit": "2026-01-01T10:13:00",
         "Elapsed": "00:00:00", "AllocTRES": ""},
    ]  # fmt: skip
    logs = {"13": ("train", "mobilevitv2_xs_cosine_0")}
    matched = status.jobs_by_run(jobs, logs)
    assert sorted(matched) == [("train", "mobilenetv3_l_baseline_0"), ("train", "mobilevitv2_xs_cosine_0")]
    assert matched["train", "mobilenetv3_l_baseline_0"]["JobID"] == "12"
    assert status._seconds(matched["train", "mobilevitv2_xs_cosine_0"]["Elapsed"]) == 26 * 3600
    assert status._gpus(matched["train", "mobilevitv2_xs_cosine_0"]["AllocTRES"]) == 2


def test_cli_prints_a_table_and_json(run_tree):
    args = [sys.executable, "-m", "lcnn.status", "--directory", str(run_tree), "--no-slurm",
            "--configfile", *OVERLAYS, OVERLAY]  # fmt: skip
    text = subprocess.run(args, cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "runs: 4 (1 done, 1 running, 1 failed, 1 diverged)" in text
    assert "GPU-hours spent: 0.50" in text and "time left: 0.60 GPU-hours" in text
    parsed = json.loads(subprocess.run([*args, "--json"], cwd=REPO, capture_output=True, text=True, check=True).stdout)
    assert parsed["total"] == 4 and parsed["counts"]["done"] == 1


@pytest.mark.slow
def test_status_of_the_tiny_study_after_a_failure_and_a_divergence(tiny_study, tmp_path):
    """The tiny study run end to end, then one run failed (its log, no metrics) and one diverged (metrics.json
    with status diverged, as the trainer writes it), in a copy of the study's folder."""
    root = tmp_path / "study"
    top = str(tiny_study)
    shutil.copytree(tiny_study, root, ignore=lambda d, names: [".snakemake", "data"] if d == top else [])
    ok = status.run({"directory": root, "configfiles": OVERLAYS, "slurm": False})
    assert ok["total"] == 4 and ok["counts"]["done"] == 4
    assert ok["gpu_hours"]["finished"] > 0 and ok["estimate"]["gpu_hours_left"] == 0

    failed_dir = root / "runs/mobilevitv2_xs/cosine/seed0"
    history = pd.read_csv(failed_dir / "history.csv")
    (failed_dir / "metrics.json").unlink()  # as if the job died after its last epoch line
    log = root / "logs/train/mobilevitv2_xs/cosine/seed0.log"
    old = time.time() - 7200
    os.utime(log, (old, old))
    diverged = root / "runs/mobilenetv3_l/cosine/seed0/metrics.json"
    metrics = json.loads(diverged.read_text())
    metrics.update(status="diverged", top1=None, top5=None, diverged_at={"epoch": 1, "step": 3})
    diverged.write_text(json.dumps(metrics))

    out = status.run({"directory": root, "configfiles": OVERLAYS, "slurm": False})
    assert len(out["runs"]) == 4
    rows = {(r["model"], r["variant"]): r for r in out["runs"]}
    assert rows["mobilevitv2_xs", "cosine"]["status"] == "failed"
    assert "logs/train/mobilevitv2_xs/cosine/seed0.log" in rows["mobilevitv2_xs", "cosine"]["detail"]
    # the real trainer's log gives the last epoch and its top-1
    assert rows["mobilevitv2_xs", "cosine"]["epoch_done"] == 1
    assert rows["mobilevitv2_xs", "cosine"]["top1"] == pytest.approx(history["top1"].iloc[-1], abs=0.01)
    assert rows["mobilenetv3_l", "cosine"]["status"] == "diverged"
    assert [rows[k]["status"] for k in sorted(rows)].count("done") == 2
    assert rows["mobilenetv3_l", "baseline"]["result"] == "results/mobilenetv3_l/baseline.json"


@pytest.mark.slurm
@pytest.mark.slow
def test_status_sees_running_and_queued_slurm_jobs(slurm_cluster, tmp_path):  # noqa: F811
    """The tiny study's four training jobs on the test cluster, two at a time (each asks for 100 of its 250 GB):
    while two run and two wait, status reads both states from SLURM (matched by the SLURM plugin's job comment),
    then all four are done."""
    from test_slurm import WORKFLOW_TIMEOUT_S, make_profile, start_snakemake

    from lcnn import config as study

    work = copy_workflow(tmp_path / "study")
    profile = make_profile(tmp_path / "profile", slurm_cluster)
    settings = yaml.safe_load((profile / "config.yaml").read_text())
    settings["set-resources"]["train"]["mem_mb"] = 100_000  # two of the node's 250 GB: two jobs run, two wait
    (profile / "config.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    runs = study.runs(tiny_config())
    targets = [f"runs/{r['model']}/{r['variant']}/seed{r['seed']}/metrics.json" for r in runs]
    args = ["--profile", str(profile), "--configfile", *OVERLAYS, "--", *targets]
    seen = []
    with (tmp_path / "snakemake.log").open("w") as fh:
        proc = start_snakemake(args, work, WORKFLOW_TIMEOUT_S, fh)
        while proc.poll() is None:
            seen.append(status.run({"directory": work, "configfiles": OVERLAYS}))
            time.sleep(1)
    log = (tmp_path / "snakemake.log").read_text()
    assert proc.returncode == 0, log[-4000:]
    assert seen and all(s["slurm"]["available"] for s in seen), seen[-1]["slurm"] if seen else "never polled"
    both = [s for s in seen if s["counts"]["running"] and s["counts"]["queued"]]
    assert both, [s["counts"] for s in seen]
    busy = [r for r in both[0]["runs"] if r["status"] in ("running", "queued")]
    assert len(busy) >= 2
    for row in busy:
        assert row["slurm_job_id"] and row["slurm_state"] == ("RUNNING" if row["status"] == "running" else "PENDING")
    assert both[0]["gpu_hours"]["running"] >= 0
    final = status.run({"directory": work, "configfiles": OVERLAYS})
    assert final["total"] == len(runs) == 4 and final["counts"]["done"] == 4
    for row in final["runs"]:
        assert row["slurm_state"] == "COMPLETED", row


def test_halving_rows_follow_each_runs_latest_rung(run_tree):
    """search.mode halving: each run is shown at the latest rung it reached, with that rung's epoch budget."""
    (run_tree / "halving.yaml").write_text(yaml.safe_dump({"search": {"mode": "halving"}, "baseline": {"epochs": 3}}))
    rung2 = run_tree / "runs_halving/mobilenetv3_l/baseline/seed0/rung2"
    rung2.mkdir(parents=True)
    (rung2 / "metrics.json").write_text(json.dumps({"status": "ok", "top1": 40.0, "epochs_completed": 3,
                                                    "device_hours": 0.3}))  # fmt: skip
    (run_tree / "runs_halving/mobilenetv3_l/baseline/seed0/rung1").mkdir()
    out = status.run({"directory": run_tree, "configfiles": [*OVERLAYS, "halving.yaml"], "slurm": False})
    assert out["search_mode"] == "halving" and len(out["runs"]) == 4
    rows = {(r["model"], r["variant"]): r for r in out["runs"]}
    assert len(rows) == 4
    best = rows["mobilenetv3_l", "baseline"]
    assert (best["status"], best["rung"], best["epochs"], best["top1"]) == ("done", 2, 3, 40.0)
    for key in [k for k in rows if k != ("mobilenetv3_l", "baseline")]:
        assert (rows[key]["status"], rows[key]["rung"], rows[key]["epochs"]) == ("pending", 1, 1)
    assert "halving: only the rungs known so far" in out["estimate"]["note"]

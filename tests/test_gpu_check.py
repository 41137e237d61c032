"""The GPU acceptance check: its parts run for real on the CPU where they can, and whole where CUDA exists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO

from lcnn import devices
from lcnn.tools import gpu_check

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_without_a_gpu_it_says_so_in_one_line_and_exits_0(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a GPU machine
    cmd = [sys.executable, "-m", "lcnn.tools.gpu_check", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [proc.stdout.strip()] and "no GPU" in proc.stdout
    assert not (tmp_path / "out").exists()
    strict = subprocess.run([*cmd, "--require-gpu"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1 and "srun --gpus=1" in strict.stderr


def result_dict() -> dict:
    """A result as run() returns it (figures invented; the writers must carry them through)."""
    return {
        "status": "failed",
        "seconds": 401.2,
        "env": {"device_name": "NVIDIA H200", "gpu_count": 1, "total_memory_gb": 150.0, "compute_capability": "9.0",
                "driver_version": "570.86.15", "cuda_version": "12.8", "cudnn_version": 91000,
                "packages": {"torch": "2.14.1", "timm": "1.0.31", "accelerate": "1.15.0"}},
        "checks": [
            {"name": "train", "status": "ok", "seconds": 90.0, "budget_s": 240, "reason": "14 runs",
             "rows": [{"model": "convnext_tiny", "precision": "fp16", "status": "ok", "first_mean": 2.31,
                       "last_mean": 0.42, "skipped_steps": 1}]},
            {"name": "multi_gpu", "status": "skipped", "seconds": 0.0, "budget_s": 70, "reason": "1 GPU visible"},
            {"name": "throughput", "status": "failed", "seconds": 30.0, "budget_s": 50, "reason": "below the goal",
             "rows": [{"model": "convnext_tiny", "batch_size": 128, "lcnn_images_per_s": 1800.0,
                       "bare_images_per_s": 2000.0, "ratio": 0.9}]},
            {"name": "benchmark", "status": "ok", "seconds": 60.0, "budget_s": 70, "reason": "rows ok",
             "source": gpu_check.PUBLISHED_SOURCE,
             "published": [{"model": "repvgg_a2", "form": "reparam", "batch_size": 512, "images_per_s": 17400.0,
                            "published_batch_size": 1024, "published_images_per_s": 8700.0, "ratio": 2.0}],
             "rows": [{"model": "repvgg_a2", "form": "reparam", "batch_size": 512, "status": "ok",
                       "latency_ms_p50": 29.4, "throughput_ips": 17400.0, "peak_mem_mb": 900.0}]},
        ],
    }  # fmt: skip


def test_writers_carry_the_card_versions_and_every_check(tmp_path):
    result = result_dict()
    gpu_check.write_outputs(result, tmp_path)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result
    md = (tmp_path / "gpu_check.md").read_text()
    for text in ("NVIDIA H200", "570.86.15", "**CUDA:** 12.8", "**torch:** 2.14.1", "failed in 401.2 s"):
        assert text in md
    assert len(result["checks"]) == 4
    for check in result["checks"]:
        assert f"| {check['name']} " in md and check["reason"] in md
    assert "| convnext_tiny | fp16 " in md and "0.9 " in md  # training rows and the throughput ratio
    assert "8700" in md and "| repvgg_a2 | reparam |" in md and gpu_check.PUBLISHED_SOURCE in md


def test_training_check_trains_for_real_on_the_cpu():
    row = gpu_check.train_steps("mobilenetv3_large_100", device="cpu", precision="bf16", img_size=32, steps=3)
    assert row["device"] == "cpu" and len(row["losses"]) == 3 and row["window"] == 1
    assert row["status"] == "ok" and row["finite"] and row["last_mean"] < row["first_mean"]
    assert not row["grad_scaler"]  # only fp16 has one
    assert row["fused_optimizer"]  # the trainer's optimizer step: torch's fused AdamW


def test_throughput_check_times_both_loops_on_the_cpu():
    """Both loops are timed, and lcnn's step dispatches at most 3 % more aten calls than the bare loop's
    (Accelerate's division of the loss by the accumulation steps and its fp32 casts, and the device loss tally: 38
    more of 2,920 per step in fp32 at batch 2). On a fast GPU each call is a kernel launch paid in host time, so a
    step that grows a per-step check or a host read fails this."""
    row = gpu_check.train_throughput(
        "mobilenetv3_large_100", device="cpu", batch_size=4, img_size=32, steps=2, warmup=1, repeats=2
    )
    assert row["lcnn_images_per_s"] > 0 and row["bare_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["lcnn_images_per_s"] / row["bare_images_per_s"])
    assert row["bare_aten_calls_per_step"] > 1000
    assert 1.0 <= row["aten_calls_ratio"] <= 1.03, row


@pytest.mark.slow
def test_run_writes_both_files_from_a_real_check_on_the_cpu(tmp_path):
    """The harness end to end on the CPU: one small model's training check, then the JSON and Markdown."""
    cfg = {"out": tmp_path, "device": "cpu", "checks": ["train"], "img_size": 32, "precisions": ["bf16"],
           "models": ["mobilenetv3_l"]}  # fmt: skip
    result = gpu_check.run(cfg)
    assert result["status"] == "ok" and len(result["checks"]) == 1
    check = result["checks"][0]
    assert check["name"] == "train" and check["status"] == "ok" and len(check["rows"]) == 1
    assert check["rows"][0]["model"] == "mobilenetv3_large_100" and check["rows"][0]["steps"] == 20
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["checks"][0]["rows"][0]["losses"] == check["rows"][0]["losses"]
    md, torch_version = (tmp_path / "gpu_check.md").read_text(), saved["env"]["packages"]["torch"]
    assert torch_version and f"**torch:** {torch_version}" in md and "| train " in md


def test_harness_records_crashes_and_the_global_deadline():
    budgets = gpu_check.BUDGETS_S
    crashed = gpu_check.run_checks({}, ["train"], deadline_s=60, budgets=budgets)  # ctx lacks what train needs
    assert len(crashed) == 1 and crashed[0]["status"] == "failed" and "KeyError" in crashed[0]["reason"]
    late = gpu_check.run_checks({}, ["train", "oom"], deadline_s=-1, budgets=budgets)
    assert len(late) == 2
    for entry in late:
        assert entry["status"] == "skipped" and "global deadline" in entry["reason"]


def test_oom_batch_needs_more_than_the_card():
    total, per_image = 80 * 2**30, 7.5 * 2**20
    batch = gpu_check.oom_batch(total, per_image)
    assert batch * per_image >= 1.2 * total and (batch - 1) * per_image < 1.2 * total


def test_a_silent_child_and_its_children_cannot_outlive_the_budget(tmp_path):
    """A trainer that hangs without a line (in CUDA's initialisation, say) and holds its output pipe open through a
    child of its own (as torchrun's workers do) is waited for only until the deadline, then killed with its group."""
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True)
    output = gpu_check._Output(proc)
    child_pid = output.first(lambda line: int(line), time.monotonic() + 60)
    assert output.first(lambda line: line, time.monotonic() + 1) is None  # nothing more: the deadline ends the wait
    code, log = output.finish(timeout=1)
    assert code == -9 and log.endswith("killed: over the part's budget")
    for _ in range(50):  # the kill reached the grandchild too (its pid gone, or a zombie of the dead parent's)
        try:
            os.kill(child_pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        stat = Path(f"/proc/{child_pid}/stat").read_text().split()
        assert stat[2] == "Z", f"the trainer's child {child_pid} outlived the kill"


@pytest.mark.slow
def test_resume_check_on_the_cpu(tmp_path):
    """The interrupted-run check end to end on the CPU (bf16: fp16 needs a GPU): SIGTERM, rerun, same weights."""
    ctx = {"device": "cpu", "resume_precision": "bf16", "work": tmp_path, "config_path": REPO / "config.yaml",
           "budget_s": 600}  # fmt: skip
    out = gpu_check.check_resume(ctx)
    assert out["status"] == "ok", out
    assert out["max_abs_diff"] == 0.0 and out["signalled_at_step"] >= 5


def test_sync_check_passes_the_trainers_loop_and_catches_a_per_step_read(tmp_path):
    """The sync check on the CPU, where it counts host reads (on a GPU, torch's sync debug mode adds every
    synchronizing CUDA call): the study's loop reads only at its checks, every 5 steps and at the epoch's end;
    torch's per-tensor AdamW, which reads its step count every step, fails it with the steps named."""
    ctx = {"device": "cpu", "precisions": ["no"], "work": tmp_path, "config_path": REPO / "config.yaml",
           "budget_s": 600}  # fmt: skip
    out = gpu_check.check_syncs(ctx)
    assert out["status"] == "ok", out
    assert out["rows"][0]["sync_steps"] == [5, 10, 15]
    unfused = gpu_check.check_syncs({**ctx, "sync_train": {"fused_optimizer": False}, "sync_hparams": {"opt": "adamw"}})
    assert unfused["status"] == "failed" and "syncs at steps [1, 2, 3, 4, 6," in unfused["reason"], unfused


def test_sync_check_traces_cuda_sync_warnings_to_their_step(tmp_path, monkeypatch):
    """On a GPU a sync arrives as torch's warning ("called a synchronizing CUDA operation"), raised where the loop
    made it. Here the loss tally raises that warning on every step, as a sync inside it would: the check names
    the steps, and other warnings still reach the user."""
    import warnings

    from lcnn import train

    add = train.StepTally.add

    def syncing_add(self, *args, **kwargs):
        warnings.warn("called a synchronizing CUDA operation", stacklevel=2)
        return add(self, *args, **kwargs)

    monkeypatch.setattr(train.StepTally, "add", syncing_add)
    ctx = {"device": "cpu", "precisions": ["no"], "work": tmp_path, "config_path": REPO / "config.yaml",
           "budget_s": 600}  # fmt: skip
    out = gpu_check.check_syncs(ctx)
    assert out["status"] == "failed" and out["rows"][0]["sync_steps"] == list(range(16)), out
    with pytest.warns(UserWarning, match="another"), gpu_check.step_syncs(cuda=False) as steps:
        warnings.warn("another warning", stacklevel=1)
    assert steps == []


@pytest.mark.slow
def test_two_process_check_through_the_rules_launcher_on_the_cpu(tmp_path):
    """Two gloo ranks stand in for two GPUs: the same launcher, the same metrics the check reads."""
    ctx = {"device": "cpu", "gpu_count": 0, "work": tmp_path, "config_path": REPO / "config.yaml", "budget_s": 600}
    out = gpu_check.check_multi_gpu(ctx)
    assert out["status"] == "ok", out
    assert out["metrics"]["num_devices"] == 2
    assert gpu_check.check_multi_gpu({**ctx, "device": "cuda", "gpu_count": 1})["status"] == "skipped"


@pytest.mark.slow
def test_benchmark_check_sets_lcnn_benchmark_beside_timms_figures_on_the_cpu():
    ctx = {"device": "cpu", "bench_batches": [1, 2], "bench_precision": "bf16", "bench_img_size": 32, "budget_s": 600}
    out = gpu_check.check_benchmark(ctx)
    assert out["status"] == "ok", out["reason"]
    assert len(out["published"]) == 2
    for row in out["published"]:
        assert row["batch_size"] == 2 and row["ratio"] == row["images_per_s"] / row["published_images_per_s"]
    assert {r["form"] for r in out["rows"] if r["model"] == "repvgg_a2"} == {"trained", "reparam"}


def test_throughput_and_benchmark_checks_stop_at_their_budget():
    """A part past its budget starts no further model and fails, naming what it skipped (the lent GPU's time is
    short: the global deadline only stops new parts from starting)."""
    ctx = {"device": "cpu", "budget_s": -1.0}
    throughput = gpu_check.check_throughput(ctx)
    assert throughput["status"] == "failed" and throughput["skipped"] == list(gpu_check.THROUGHPUT_MODELS)
    assert throughput["reason"] == f"over budget: {', '.join(gpu_check.THROUGHPUT_MODELS)}" and not throughput["rows"]
    bench = gpu_check.check_benchmark(ctx)
    assert bench["status"] == "failed" and not bench["rows"]
    assert bench["reason"] == "; ".join(f"{name}: skipped, over budget" for name in gpu_check.PUBLISHED)


@pytest.mark.gpu
@needs_gpu
def test_fp16_training_uses_the_grad_scaler_and_learns():
    row = gpu_check.train_steps("mobilenetv3_large_100", device="cuda", precision="fp16", img_size=224, steps=20)
    assert row["grad_scaler"] and row["fused_optimizer"] and row["status"] == "ok", row


@pytest.mark.gpu
@needs_gpu
def test_the_training_loop_syncs_only_at_its_checks_on_this_gpu(tmp_path):
    """torch's sync debug mode on the trainer's own loop, fp16 (grad scaler, fused AdamW) and bf16."""
    ctx = {"device": "cuda", "precisions": ["fp16", "bf16"], "work": tmp_path, "config_path": REPO / "config.yaml",
           "budget_s": 600}  # fmt: skip
    out = gpu_check.check_syncs(ctx)
    assert out["status"] == "ok", out


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_the_whole_gpu_check_passes_on_this_gpu(tmp_path):
    result = gpu_check.run({"out": tmp_path})
    assert (tmp_path / "gpu_check.json").is_file() and (tmp_path / "gpu_check.md").is_file()
    assert len(result["checks"]) == len(gpu_check.DEFAULT_CHECKS)
    failed = [c for c in result["checks"] if c["status"] == "failed"]
    assert not failed, failed


@pytest.mark.slow
def test_compile_check_times_the_compiled_step_against_the_eager_bare_loop_on_the_cpu(tmp_path):
    """The check of train.compile, for real on the CPU (timm's test network: compiling costs per layer): lcnn's
    model compiled in place into a cold cache of its own, its compiling timed apart from the timed steps, which
    run one graph. It is not in the default run."""
    if devices.compiler_missing(torch.device("cpu")):
        pytest.skip(devices.compiler_missing(torch.device("cpu")))
    ctx = {"device": "cpu", "compile_model": "test_efficientnet", "batch_size": 4, "img_size": 32, "steps": 2,
           "warmup": 1, "budget_s": 600, "work": tmp_path}  # fmt: skip
    out = gpu_check.check_compile(ctx)
    assert out["status"] == "ok", out["reason"]
    (row,) = out["rows"]
    assert row["compiled"] and row["compile_seconds"] > 0 and row["lcnn_images_per_s"] > 0 and row["graphs"] == 1
    assert any(p.is_file() for p in (tmp_path / "inductor").rglob("*"))  # compiled cold, not from a warm cache
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or os.environ["TORCHINDUCTOR_CACHE_DIR"] != str(
        tmp_path / "inductor"
    )
    assert "compiled lcnn step" in out["reason"] and "compile" not in gpu_check.DEFAULT_CHECKS
    assert "## train.compile" in gpu_check.to_markdown(
        {"status": "ok", "seconds": 1, "checks": [{"name": "compile", **out}]}
    )


@pytest.mark.gpu
@pytest.mark.slow
@needs_gpu
def test_compile_check_runs_on_this_gpu(tmp_path):
    out = gpu_check.check_compile({"device": "cuda", "budget_s": 600, "work": tmp_path})
    assert out["status"] == "ok", out["reason"]


def test_the_small_runs_stay_eager_where_the_study_compiles(tmp_path):
    """The resume, two-process and sync checks each start trainers on a budget that compiling would overrun."""
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    config["train"]["compile"] = True
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    cfg = gpu_check.study_config(tmp_path, tmp_path / "config.yaml")
    assert (
        cfg["train"]["compile"] and gpu_check.run_json(cfg, device="cpu", precision="bf16")["train"]["compile"] is False
    )

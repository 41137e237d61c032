"""lcnn.benchmark: honest timing, failure isolation (oom/error), numerics checks, deployment forms, ONNX path, CLI.

Everything runs on the CPU at tiny resolutions. No assertion depends on how fast this machine is: the only timing
bounds are ones a sleeping forward pass guarantees (it cannot take less than its sleep).
"""

from __future__ import annotations

import json
import time

import pytest
import torch
import yaml
from conftest import REPO
from torch import nn

from lcnn import bench_checks, benchmark, config, devices, models, timing

CONTRACT_ROW_KEYS = {
    "form", "engine", "device", "precision", "channels_last", "batch_size", "status", "error",
    "latency_ms_mean", "latency_ms_p50", "latency_ms_p90", "latency_ms_p99", "throughput_ips", "peak_mem_mb", "iters",
}  # fmt: skip
CONTRACT_TOP_KEYS = {"model", "timm_name", "img_size", "num_classes", "env", "params", "gmacs", "flops", "rows"}
CONTRACT_TOP_KEYS.add("checks")
CONTRACT_CHECKS = {"reparam_max_abs_diff", "onnx_max_abs_diff", "onnx_vs_eager_speedup_b1"}


def settings(**overrides):
    base = {
        "device": "cpu", "batch_sizes": [1], "precisions": ["fp32"], "channels_last": [False], "warmup": 1,
        "iters": 4, "time_budget_s": None, "onnx": False, "reparameterize": False, "quiet": True,
    }  # fmt: skip
    return {**base, **overrides}


class Tiny(nn.Module):
    """A small conv net whose forward can sleep or fail on demand."""

    def __init__(self, sleep_s=0.0, fail=None):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 10)
        self.sleep_s, self.fail = sleep_s, fail

    def forward(self, x):
        if self.fail:
            self.fail(x)
        if self.sleep_s:
            time.sleep(self.sleep_s)
        return self.head(self.conv(x).mean((2, 3)))


def rows_by(result, **match):
    return [r for r in result["rows"] if all(r[k] == v for k, v in match.items())]


def test_sleeping_forward_is_measured_honestly():
    cfg = {"img_size": 16, "benchmark": settings(batch_sizes=[1, 2], iters=6)}
    result = benchmark.benchmark_model(Tiny(sleep_s=0.010), cfg)
    assert len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["status"] == "ok" and row["iters"] == 6
        assert row["latency_ms_p50"] >= 10.0 and row["latency_ms_mean"] >= 10.0
        assert row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_p99"] <= row["latency_ms_max"]
        # images/s = batch * iters / wall time of the timed loop, so it cannot beat batch / mean latency
        assert row["throughput_ips"] <= 1000 * row["batch_size"] / row["latency_ms_mean"] * (1 + 1e-9)


def test_time_budget_stops_early_but_keeps_minimum_iterations():
    cfg = {"img_size": 16, "benchmark": settings(iters=1000, time_budget_s=0.05)}
    row = benchmark.benchmark_model(Tiny(sleep_s=0.010), cfg)["rows"][0]
    assert timing.MIN_ITERS <= row["iters"] < 20


def _oom_at_4(x):
    if x.shape[0] >= 4:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")


def test_oom_rows_skip_larger_batches_and_json_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "create", lambda *a, **k: Tiny(fail=_oom_at_4))
    out = tmp_path / "bench" / "tiny.json"
    cfg = {"timm_name": "tiny", "img_size": 16, "out": str(out)}
    cfg["benchmark"] = settings(batch_sizes=[8, 1, 4, 2], precisions=["fp32", "bf16"])
    benchmark.run(cfg)
    result = json.loads(out.read_text())
    for precision in ("fp32", "bf16"):  # each configuration starts again from the smallest batch
        status = {r["batch_size"]: r["status"] for r in rows_by(result, precision=precision)}
        assert status == {1: "ok", 2: "ok", 4: "oom", 8: "oom"}
    eight = rows_by(result, precision="fp32", batch_size=8)[0]
    assert "skipped" in eight["error"] and eight["latency_ms_p50"] is None


class HugeAtBatch4(Tiny):
    """Asks the CPU allocator for 2**46 bytes per image from batch 4 on: a real out-of-memory RuntimeError, raised
    before anything is allocated, so it is safe on any machine."""

    def forward(self, x):
        if x.shape[0] >= 4:
            torch.empty(x.shape[0] * 2**46, dtype=torch.uint8)
        return super().forward(x)


def test_real_cpu_out_of_memory_is_an_oom_row_and_the_sweep_goes_on():
    cfg = {"img_size": 16, "benchmark": settings(batch_sizes=[1, 4, 8], channels_last=[False, True])}
    result = benchmark.benchmark_model(HugeAtBatch4(), cfg)
    assert len(result["rows"]) == 6
    for cl in (False, True):
        rows = {r["batch_size"]: r for r in rows_by(result, channels_last=cl)}
        assert [rows[b]["status"] for b in (1, 4, 8)] == ["ok", "oom", "oom"]
        assert "can't allocate memory" in rows[4]["error"] and "skipped" in rows[8]["error"]


def test_error_in_one_configuration_keeps_the_others():
    def fail_at_2(x):
        if x.shape[0] == 2:
            raise ValueError("boom at batch 2")

    cfg = {"img_size": 16, "benchmark": settings(batch_sizes=[1, 2, 4])}
    result = benchmark.benchmark_model(Tiny(fail=fail_at_2), cfg)
    status = {r["batch_size"]: (r["status"], r["error"]) for r in result["rows"]}
    assert status[1] == ("ok", None) and status[4] == ("ok", None)
    assert status[2] == ("error", "ValueError: boom at batch 2")


def test_a_poisoned_cuda_context_fails_the_job_in_one_line(tmp_path, monkeypatch):
    """After an illegal memory access every CUDA call of the process fails, freeing memory and moving a model
    included (here every forward, timing.free_memory and Module.to fail once it happened): the sweep ends there,
    the JSON keeps the rows measured so far, and the job fails in one line, naming the error and what to check (a
    job that exited 0 would leave error rows in the report; a traceback from the cleanup would hide the cause)."""
    illegal, lost = "CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ...", []
    free_memory, to = timing.free_memory, nn.Module.to

    def illegal_access(x):
        if lost or x.shape[0] == 2:
            lost.append(x.shape[0])
            raise RuntimeError(illegal)

    def unless_lost(call):
        def wrapped(*args, **kwargs):
            if lost:
                raise RuntimeError(illegal)
            return call(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(timing, "free_memory", unless_lost(free_memory))
    monkeypatch.setattr(nn.Module, "to", unless_lost(to))
    monkeypatch.setattr(models, "create", lambda *a, **k: Tiny(fail=illegal_access))
    out = tmp_path / "tiny.json"
    bench = settings(batch_sizes=[1, 2, 4], channels_last=[False, True])
    cfg = {"timm_name": "tiny", "img_size": 16, "out": str(out), "benchmark": bench}
    says = "GPU failed with 'RuntimeError: CUDA error: an illegal memory access.*dmesg"
    with pytest.raises(benchmark.LcnnError, match=says):
        benchmark.run(cfg)
    rows = [(r["channels_last"], r["batch_size"], r["status"]) for r in json.loads(out.read_text())["rows"]]
    assert rows == [(False, 1, "ok"), (False, 2, "error")] and lost == [2]
    monkeypatch.setattr(models, "create", lambda *a, **k: Tiny(fail=lambda x: x.shape[0] == 2 and 1 / 0))
    lost.clear()
    statuses = [r["status"] for r in benchmark.run(cfg)["rows"]]
    assert statuses == ["ok", "error", "ok"] * 2  # an ordinary error stays a row of a finished job


def test_fp16_on_cpu_is_unsupported_not_timed_and_bf16_records_its_agreement():
    result = benchmark.benchmark_model(Tiny(), {"img_size": 16, "benchmark": settings(precisions=["fp16", "bf16"])})
    fp16, bf16 = rows_by(result, precision="fp16")[0], rows_by(result, precision="bf16")[0]
    assert fp16["status"] == "unsupported" and "CPU" in fp16["error"] and fp16["latency_ms_p50"] is None
    assert bf16["status"] == "ok" and 0 < bf16["fp32_rel_diff"] <= bench_checks.HALF_REL_TOL["bf16"]
    assert bf16["fp32_top1_agreement"] is not None and "random" in result["checks"]["fp32_agreement_inputs"]


class Cancels(Tiny):
    """Logits = (head + 1e4) - 1e4: exact in fp32, lost to rounding in bf16 (a real cancellation failure)."""

    def forward(self, x):
        return (super().forward(x) + 1e4) - 1e4  # the head's output is bf16 under autocast, so is the sum


class Overflows(Tiny):
    """A bias near fp32's largest value: finite in fp32, rounds to inf in bf16."""

    def __init__(self):
        super().__init__()
        self.big = nn.Linear(10, 10)
        nn.init.zeros_(self.big.weight)
        nn.init.constant_(self.big.bias, 3.4e38)

    def forward(self, x):
        return self.big(super().forward(x)) * 0.5


@pytest.mark.parametrize(("model", "status"), [(Cancels(), "mismatch"), (Overflows(), "nan")])
def test_half_precision_that_disagrees_with_fp32_is_marked_not_timed(model, status):
    cfg = {"img_size": 16, "benchmark": settings(precisions=["fp32", "bf16"], batch_sizes=[1, 2])}
    result = benchmark.benchmark_model(model, cfg)
    assert len(result["rows"]) == 4
    assert [r["status"] for r in rows_by(result, precision="fp32")] == ["ok", "ok"]
    bf16 = rows_by(result, precision="bf16")
    assert [r["status"] for r in bf16] == [status, status]
    assert all(r["latency_ms_p50"] is None and "not timed" in r["error"] for r in bf16)


def test_equivalence_checks_run_with_tf32_off_and_restore_it():
    seen = []
    model = Tiny()
    model.register_forward_pre_hook(
        lambda *_: seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
    )
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        bench_checks.output_diff(model, model, 16, torch.device("cpu"))
        reference = bench_checks.Reference(model, [(timing.make_input(2, 16, torch.device("cpu")), None)], "x")
        reference.compare(model, "bf16", False, torch.device("cpu"))
        flags_after = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    assert len(seen) == 4 and set(seen) == {(False, False)}
    assert flags_after == (True, True)


def test_repvgg_reparam_form_matches_trained():
    model = models.create("repvgg_a2", 10)
    cfg = {"timm_name": "repvgg_a2", "img_size": 32, "benchmark": settings(reparameterize=True, iters=2)}
    result = benchmark.benchmark_model(model, cfg)
    assert [r["status"] for r in rows_by(result, form="reparam")] == ["ok"]
    assert result["checks"]["reparam_ok"] and result["checks"]["reparam_rel_diff"] < benchmark.REL_TOL
    assert result["checks"]["reparam_max_abs_diff"] is not None
    assert result["forms"]["reparam"]["params"] < result["forms"]["trained"]["params"]
    assert result["gmacs"] == pytest.approx(result["flops"] / 2e9)


def test_reparam_that_changes_outputs_is_flagged_not_timed(monkeypatch):
    def broken(model):
        fused = Tiny()
        fused.head.bias.data += 1.0  # a "fused" model whose outputs drift
        fused.conv.load_state_dict(model.conv.state_dict())
        return fused

    monkeypatch.setattr(benchmark, "reparameterized", broken)
    result = benchmark.benchmark_model(Tiny(), {"img_size": 16, "benchmark": settings(reparameterize=True)})
    row = rows_by(result, form="reparam")[0]
    assert result["checks"]["reparam_ok"] is False
    assert row["status"] == "error" and "differ" in row["error"] and row["latency_ms_p50"] is None


def test_reparam_that_raises_keeps_trained_rows(monkeypatch):
    def raising(model):
        raise RuntimeError("fuse() exploded")

    monkeypatch.setattr(benchmark, "reparameterized", raising)
    result = benchmark.benchmark_model(Tiny(), {"img_size": 16, "benchmark": settings(reparameterize=True)})
    assert rows_by(result, form="trained")[0]["status"] == "ok"
    assert "fuse() exploded" in rows_by(result, form="reparam")[0]["error"] and not result["checks"]["reparam_ok"]


def test_non_reparameterizable_model_has_no_reparam_form():
    cfg = {"img_size": 32, "benchmark": settings(reparameterize=True)}
    result = benchmark.benchmark_model(models.create("resnet18", 4), cfg)
    assert not rows_by(result, form="reparam") and result["checks"]["reparam_max_abs_diff"] is None


def test_compile_without_a_compiler_says_what_is_missing_and_skips():
    from torch._inductor import config as inductor_config

    cfg = {"img_size": 16, "benchmark": settings(compile=True, batch_sizes=[1, 2])}
    with inductor_config.patch({"cpp.cxx": (None, "no-such-c++-compiler")}):  # torch's own config override
        result = benchmark.benchmark_model(Tiny(), cfg)
    compiled = rows_by(result, form="compiled")
    assert len(compiled) == 2 and {r["status"] for r in compiled} == {"skipped"}
    assert "C++ compiler" in compiled[0]["error"] and "no-such-c++-compiler" in compiled[0]["error"]
    assert [r["status"] for r in rows_by(result, form="trained")] == ["ok", "ok"]


@pytest.mark.slow
def test_compile_where_a_compiler_exists_is_checked_then_timed():
    if devices.compiler_missing(torch.device("cpu")):
        pytest.skip(devices.compiler_missing(torch.device("cpu")))
    result = benchmark.benchmark_model(Tiny(), {"img_size": 16, "benchmark": settings(compile=True)})
    compiled = rows_by(result, form="compiled")
    assert len(compiled) == 1 and compiled[0]["status"] == "ok", compiled
    assert compiled[0]["fp32_rel_diff"] <= timing.REL_TOL and compiled[0]["fp32_top1_agreement"] == 1.0


def test_defaults_are_the_schemas():
    resolved = benchmark.resolve_settings({})
    schema = config.schema_defaults("benchmark")
    assert resolved["batch_sizes"] == schema["batch_sizes"] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert {k: resolved[k] for k in ("iters", "warmup", "precisions", "onnx_threads")} == {
        k: schema[k] for k in ("iters", "warmup", "precisions", "onnx_threads")
    }
    assert resolved["onnx_int8"] == []  # an old config's boolean still works: true = every form
    assert benchmark.resolve_settings({"onnx_int8": True})["onnx_int8"] == ["static", "static_conv", "dynamic"]
    assert benchmark.resolve_settings({"onnx_int8": ["dynamic"]})["onnx_int8"] == ["dynamic"]


@pytest.mark.parametrize(
    ("section", "says"),
    [
        ({"precisions": ["fp8"]}, "'benchmark.precisions.0' is 'fp8'; expected one of fp32, fp16, bf16"),
        ({"onnx_int8": ["fast"]}, "'benchmark.onnx_int8.0' is 'fast'; expected one of static, static_conv, dynamic"),
        ({"batch_sizes": [0]}, "benchmark.batch_sizes.0"),
        ({"iter": 3}, "'benchmark.iter' is not allowed here; did you mean iters?"),
        ({"warmup": 0}, "benchmark.warmup"),  # cuDNN autotuning and torch.compile would land in the timed loop
    ],
)
def test_bad_settings_give_one_line_errors_naming_the_key(section, says):
    with pytest.raises(benchmark.LcnnError, match="config key") as err:
        benchmark.resolve_settings(section)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_onnx_path_matches_eager_and_reports_speedup(tmp_path):
    """The ONNX path on a random model, without a manifest: static int8 says it needs one, dynamic is judged by
    agreement (the int8 check on a trained model and real images is in test_onnx.py)."""
    onnx_out = tmp_path / "m.onnx"
    bench = settings(onnx=True, onnx_int8=True, onnx_threads=1, iters=3, onnx_out=str(onnx_out))
    result = benchmark.benchmark_model(models.create("mobilenetv3_large_100", 10), {"img_size": 64, "benchmark": bench})
    onnx_rows = rows_by(result, engine="onnxruntime")
    assert [r["form"] for r in onnx_rows] == ["onnx", "onnx_int8_static", "onnx_int8_static_conv", "onnx_int8_dynamic"]
    onnx, static, static_conv, dynamic = onnx_rows
    assert onnx["status"] == "ok" and onnx["threads"] == 1
    assert all(r["status"] == "error" and "--val-manifest" in r["error"] for r in (static, static_conv))
    assert dynamic["status"] == "ok" and dynamic["precision"] == "int8" and dynamic["iters"] == 3
    checks = result["checks"]
    assert checks["onnx_max_abs_diff"] < 1e-3 and checks["onnx_ok"]
    assert checks["onnx_vs_eager_speedup_b1"] == pytest.approx(checks["onnx_eager_b1_p50_ms"] / onnx["latency_ms_p50"])
    assert 0.0 <= dynamic["fp32_top1_agreement"] <= 1.0 and "random inputs" in checks["onnx_int8_check"]
    assert checks["onnx_int8_dynamic_fp32_top1_agreement"] == dynamic["fp32_top1_agreement"]
    assert onnx_out.stat().st_size > 0


def test_output_has_contract_keys():
    result = benchmark.benchmark_model(Tiny(), {"model_name": "t", "img_size": 16, "benchmark": settings()})
    assert CONTRACT_TOP_KEYS <= set(result) and CONTRACT_CHECKS <= set(result["checks"])
    assert result["env"]["packages"]["torch"]
    assert result["host_other_cpu_share"] is None or 0.0 <= result["host_other_cpu_share"] <= 1.0
    assert len(result["rows"]) == 1
    for row in result["rows"]:
        assert CONTRACT_ROW_KEYS <= set(row) and set(row) == set(timing.ROW_KEYS)
    json.dumps(result)  # serializable as is


def test_cli_end_to_end(tmp_path, capsys):
    section = tmp_path / "bench.json"
    section.write_text(json.dumps({"variant": "baseline", "batch_sizes": [1, 2, 4], "precisions": ["fp32"]}))
    out = tmp_path / "resnet.json"
    argv = ["--model-name", "r18", "--timm-name", "resnet18", "--num-classes", "4", "--img-size", "32"]
    argv += ["--config-json", str(section), "--batch-sizes", "1,2", "--precisions", "fp32,fp16"]
    argv += ["--channels-last", "off", "--iters", "2", "--warmup", "1", "--no-onnx", "--out", str(out)]
    weights = tmp_path / "w.safetensors"
    models.save_weights(models.create("resnet18", 4), weights)
    benchmark.main([*argv, "--weights", str(weights)])
    result = json.loads(out.read_text())
    assert result["model"] == "r18" and result["img_size"] == 32 and result["weights"] == str(weights)
    expected = {(p, b) for p in ("fp32", "fp16") for b in (1, 2)}  # CLI flags override the config file
    assert {(r["precision"], r["batch_size"]) for r in result["rows"]} == expected
    assert "trained   fp32 cl=off b=1" in capsys.readouterr().err


def test_cli_takes_model_from_run_config(tmp_path):
    run_config = tmp_path / "config.json"
    run_config.write_text(json.dumps({"model": "r18", "timm_name": "resnet18", "num_classes": 3, "img_size": 32}))
    out = tmp_path / "b.json"
    argv = ["--run-config", str(run_config), "--config-json", '{"batch_sizes": [1], "precisions": ["fp32"]}']
    benchmark.main([*argv, "--channels-last", "off", "--iters", "2", "--no-onnx", "--no-reparam", "--out", str(out)])
    result = json.loads(out.read_text())
    got = (result["model"], result["timm_name"], result["num_classes"], result["img_size"])
    assert got == ("r18", "resnet18", 3, 32)


@pytest.mark.parametrize("extra", [["--precisions", "fp8"], ["--weights", "missing.safetensors"]])
def test_cli_user_errors_exit_2(tmp_path, capsys, extra):
    argv = ["--timm-name", "resnet18", "--num-classes", "4", "--img-size", "32", "--no-onnx", *extra]
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*argv, "--out", str(tmp_path / "x.json")])
    assert exc.value.code == 2 and capsys.readouterr().err.strip().splitlines()[-1].startswith("lcnn error:")


def test_timm_parity_method_times_a_sleeping_forward():
    from lcnn.tools import timm_parity

    result = timm_parity.timm_method(Tiny(sleep_s=0.010), timing.make_input(2, 16, torch.device("cpu")), 1, 4)
    assert result["step_time_ms"] >= 10.0
    assert result["samples_per_sec"] <= 2 * 1000 / result["step_time_ms"] * (1 + 1e-9)


def test_config_json_accepts_inline_file_and_whole_config(tmp_path):
    whole = tmp_path / "config.json"
    whole.write_text(json.dumps({"seeds": [0], "benchmark": {"iters": 7}}))
    assert benchmark._config_section('{"iters": 3}') == {"iters": 3}
    assert benchmark._config_section(str(whole)) == {"iters": 7}
    with pytest.raises(benchmark.LcnnError):
        benchmark._config_section("[1, 2]")


def test_int8_bench_goal_needs_a_faster_form_within_the_top1_drop():
    from lcnn.tools import int8_bench

    def result(static_ms, static_change):
        rows = [{"form": "onnx", "p50": 2.0}, {"form": "onnx_int8_static", "p50": static_ms}]
        rows += [{"form": "onnx_int8_dynamic", "p50": 9.0}, {"form": "onnx_int8_static_conv", "p50": 3.0}]
        rows = [
            timing.make_row(form=r["form"], engine="onnxruntime", status="ok", latency_ms_p50=r["p50"]) for r in rows
        ]
        checks = {"onnx_fp32_top1": 50.0, "onnx_int8_static_top1_change": static_change}
        checks |= {"onnx_int8_dynamic_top1_change": 0.0, "onnx_int8_static_conv_top1_change": 0.0}
        return {"rows": rows, "checks": checks, "host_other_cpu_share": 0.0}

    fast_ok = int8_bench.summary_row("m", result(1.0, -0.4), {"top1": 50.0}, 0.5)
    assert fast_ok["best_int8"] == "static" and fast_ok["static_speedup"] == 2.0 and fast_ok["goal_met"]
    too_far = int8_bench.summary_row("m", result(1.0, -1.0), {"top1": 50.0}, 0.5)  # the fastest moves top-1 too much
    assert too_far["best_int8"] == "static_conv" and not too_far["goal_met"]  # the best accurate one is slower
    assert not int8_bench.summary_row("m", result(2.5, 0.0), {"top1": 50.0}, 0.5)["goal_met"]  # no form is faster


def test_int8_bench_quantizes_the_studys_own_architectures(tmp_path):
    """The demo trains smaller siblings of the largest models; the int8 figures must be of the deployed ones."""
    from lcnn.tools import int8_bench

    cfg = int8_bench.study_config(tmp_path, img_size=64, epochs=1, per_class=9, val_per_class=5)
    study_models = yaml.safe_load((REPO / "config.yaml").read_text())["models"]
    assert {m: s["timm"] for m, s in cfg["models"].items()} == {m: s["timm"] for m, s in study_models.items()}
    assert cfg["data"]["source"] == "builtin" and cfg["baseline"]["img_size"] == 64  # the rest is the demo's


class ConvBN(nn.Module):
    """A conv + batch-norm pair with timm's ``fuse()`` hook, which reparameterize_model replaces by one conv.

    ``broken`` folds the norm in with a wrong sign under the square root, as a fuse with a bug might: the
    fused weights are NaN (the trained form stays finite)."""

    def __init__(self, broken=False):
        super().__init__()
        self.conv, self.bn, self.broken = nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), broken

    def forward(self, x):
        return self.bn(self.conv(x))

    def fuse(self):
        var = -self.bn.running_var if self.broken else self.bn.running_var
        scale = self.bn.weight / torch.sqrt(var + self.bn.eps)
        fused = nn.Conv2d(3, 8, 3)
        fused.weight.data = self.conv.weight.data * scale[:, None, None, None]
        fused.bias.data = self.bn.bias.data - self.bn.running_mean * scale
        return fused


class Fusable(nn.Module):
    def __init__(self, broken=False, width=8):
        super().__init__()
        self.block, self.head = ConvBN(broken), nn.Linear(8, width)

    def forward(self, x):
        return self.head(self.block(x).mean((2, 3)))


def test_nan_outputs_fail_every_equivalence_check():
    """max(0.0, nan) is 0.0 and nan > tol is False: a check written either way passes a NaN model. A fused form
    whose outputs are NaN must neither be timed nor become the deployment form, and an all-NaN ONNX export must
    not read as matching eager."""
    bench = settings(reparameterize=True, onnx=True, onnx_threads=1, iters=2)
    result = benchmark.benchmark_model(Fusable(broken=True).eval(), {"img_size": 16, "benchmark": bench})
    reparam = rows_by(result, form="reparam")
    assert [r["status"] for r in reparam] == ["nan"] and "not finite" in reparam[0]["error"]
    assert result["checks"]["reparam_ok"] is False and result["checks"]["onnx_source_form"] == "trained"
    assert result["checks"]["onnx_ok"] is True  # the trained form it fell back to exports fine
    nan_model = Tiny()
    nan_model.head.bias.data[:] = float("nan")  # eager and ONNX Runtime both give NaN
    result = benchmark.benchmark_model(nan_model, {"img_size": 16, "benchmark": settings(onnx=True, onnx_threads=1)})
    onnx = rows_by(result, form="onnx")
    assert result["checks"]["onnx_ok"] is False and [r["status"] for r in onnx] == ["nan"]
    assert onnx[0]["latency_ms_p50"] is None


def test_a_working_fuse_is_the_deployment_form():
    result = benchmark.benchmark_model(Fusable().eval(), {"img_size": 16, "benchmark": settings(reparameterize=True)})
    assert [r["status"] for r in rows_by(result, form="reparam")] == ["ok"] and result["checks"]["reparam_ok"]


def test_a_compile_or_autotuning_step_is_never_timed():
    """With warm-up 0, the first call (where torch.compile compiles and cuDNN autotunes) would be a timed one."""
    calls = []
    for compiled, expected in ((True, 4), (False, 3)):
        calls.clear()
        got = timing.measure(lambda: calls.append(1), warmup=0, iters=3, budget_s=None, compiled=compiled)
        assert len(got["latencies_ms"]) == 3 and len(calls) == expected


def test_an_unreadable_manifest_is_said_and_recorded(tmp_path, capsys):
    """The fp16/bf16 agreement check falls back to random images (logit error only) when the validation
    manifest cannot be read: one warning line, even under --quiet, and the reason in the result's settings."""
    missing = tmp_path / "nowhere" / "val.csv"
    bench = settings(precisions=["fp32", "bf16"], val_manifest=str(missing))
    result = benchmark.benchmark_model(models.create("resnet18", 4), {"img_size": 16, "benchmark": bench})
    lines = [line for line in capsys.readouterr().err.splitlines() if "validation images unusable" in line]
    assert len(lines) == 1 and "falls back to random images" in lines[0] and "warning" in lines[0]
    assert "nowhere" in result["settings"]["val_manifest_error"]
    assert "seeded random images" in result["checks"]["fp32_agreement_inputs"]
    assert rows_by(result, precision="bf16")[0]["status"] == "ok"
    clean = benchmark.benchmark_model(Tiny(), {"img_size": 16, "benchmark": settings(precisions=["fp32", "bf16"])})
    assert clean["settings"]["val_manifest_error"] is None  # no manifest given: nothing fell back


def test_a_sticky_cuda_error_while_compiling_fails_the_job(tmp_path, monkeypatch):
    """torch.compile's first call is inside the agreement check, where a failure makes the compiled rows
    "skipped": an illegal memory access there poisons the process all the same, and must fail the job."""

    def compiled_then_poisoned(model, n_shapes):
        def call(x):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

        return call

    monkeypatch.setattr(benchmark, "_compiled", compiled_then_poisoned)  # no GPU here to poison
    monkeypatch.setattr(devices, "compiler_missing", lambda device: None)
    monkeypatch.setattr(models, "create", lambda *a, **k: Tiny())
    out = tmp_path / "tiny.json"
    cfg = {"timm_name": "tiny", "img_size": 16, "out": str(out), "benchmark": settings(compile=True)}
    with pytest.raises(benchmark.LcnnError, match="GPU failed with 'torch.compile failed: RuntimeError: CUDA error"):
        benchmark.run(cfg)
    rows = json.loads(out.read_text())["rows"]
    assert [(r["form"], r["status"]) for r in rows] == [("trained", "ok"), ("compiled", "skipped")]


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def one_off_first_call(mib: int):
    """A module whose first call holds ``mib`` MiB for a moment, as cuDNN's autotuning does with its workspaces."""
    calls = []

    def module(x):
        if not calls:
            torch.ones(mib * 2**18, device=x.device).sum()  # float32: 4 bytes each, written so the pages are touched
        calls.append(1)
        return x * 2

    return module


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, needs_gpu])])
def test_peak_memory_is_that_of_the_timed_calls_not_the_warm_ups_one_off_work(device):
    device = torch.device(device)
    probe = timing.MemProbe(device)
    probe.reset()
    if not probe.can_reset:
        pytest.skip("this kernel cannot reset VmHWM")
    row = timing.time_torch(
        one_off_first_call(256), device=device, precision="fp32", channels_last=False, batch=1, img_size=8,
        settings={"warmup": 1, "iters": 5, "time_budget_s": None}, probe=probe,
    )  # fmt: skip
    assert row["iters"] == 5 and row["peak_mem_mb"] is not None and row["peak_mem_mb"] < 64, row


@pytest.mark.gpu
@needs_gpu
def test_peak_memory_on_the_gpu_counts_only_the_configuration_timed():
    """The agreement check's images and logits stay on the host, and the trained model leaves the GPU while its
    fused form is timed: either would otherwise count in every row's peak_mem_mb. The head holds 72 MiB of
    weights in each form, so with both resident a fused row would peak 72 MiB above its trained twin."""
    model = Fusable(width=2**24 // 8).eval()  # an 8 x 2M head
    head_mb = sum(p.numel() for p in model.head.parameters()) * 4 / 2**20
    bench = settings(device="cuda", precisions=["fp32", "bf16"], reparameterize=True, onnx=False)
    result = benchmark.benchmark_model(model, {"img_size": 64, "benchmark": bench})
    for precision in ("fp32", "bf16"):
        (trained,) = rows_by(result, form="trained", precision=precision)
        (fused,) = rows_by(result, form="reparam", precision=precision)
        assert trained["status"] == fused["status"] == "ok", (trained, fused)
        assert fused["peak_mem_mb"] < trained["peak_mem_mb"] + head_mb / 2, (precision, trained, fused)
    reference = bench_checks.Reference.for_model(model.cuda(), benchmark.resolve_settings({}), 64, torch.device("cuda"))
    assert {x.device.type for x, _ in reference.batches} == {"cpu"} and reference.logits[0].device.type == "cpu"

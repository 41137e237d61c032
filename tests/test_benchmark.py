"""lcnn.benchmark: honest timing, failure isolation (oom/error), deployment-form checks, ONNX path and CLI.

Everything runs on the CPU at tiny resolutions; no assertion depends on how fast this machine is, except the
lower bound a sleeping forward pass must respect.
"""

from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from lcnn import benchmark, models

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
    for row in result["rows"]:
        assert row["status"] == "ok" and row["iters"] == 6
        assert row["latency_ms_p50"] >= 10.0 and row["latency_ms_mean"] >= 10.0
        assert row["latency_ms_p50"] <= row["latency_ms_p90"] <= row["latency_ms_p99"] <= row["latency_ms_max"]
        # images/s = batch * iters / wall time of the timed loop, so it cannot beat batch / mean latency
        ratio = row["throughput_ips"] * row["latency_ms_mean"] / (1000 * row["batch_size"])
        assert 0.8 < ratio <= 1.0 + 1e-9


def test_time_budget_stops_early_but_keeps_minimum_iterations():
    cfg = {"img_size": 16, "benchmark": settings(iters=1000, time_budget_s=0.05)}
    row = benchmark.benchmark_model(Tiny(sleep_s=0.010), cfg)["rows"][0]
    assert benchmark.MIN_ITERS <= row["iters"] < 20


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


def test_error_in_one_configuration_keeps_the_others():
    def fail_at_2(x):
        if x.shape[0] == 2:
            raise ValueError("boom at batch 2")

    cfg = {"img_size": 16, "benchmark": settings(batch_sizes=[1, 2, 4])}
    result = benchmark.benchmark_model(Tiny(fail=fail_at_2), cfg)
    status = {r["batch_size"]: (r["status"], r["error"]) for r in result["rows"]}
    assert status[1] == ("ok", None) and status[4] == ("ok", None)
    assert status[2] == ("error", "ValueError: boom at batch 2")


def test_fp16_on_cpu_is_unsupported_not_timed():
    result = benchmark.benchmark_model(Tiny(), {"img_size": 16, "benchmark": settings(precisions=["fp16", "bf16"])})
    fp16, bf16 = rows_by(result, precision="fp16")[0], rows_by(result, precision="bf16")[0]
    assert fp16["status"] == "unsupported" and "CPU" in fp16["error"] and fp16["latency_ms_p50"] is None
    assert bf16["status"] == "ok"


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


def write_manifest(root, n_classes=2, per_class=3):
    """A tiny val.csv + classes.txt in the data stage's layout."""
    from PIL import Image

    lines = ["path,wnid,label"]
    for label in range(n_classes):
        (root / "val" / f"c{label}").mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40, 40), (60 * label, 20 * i, 90)).save(root / "val" / f"c{label}" / f"{i}.png")
            lines.append(f"val/c{label}/{i}.png,c{label},{label}")
    (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(n_classes)))
    (root / "val.csv").write_text("\n".join(lines) + "\n")
    return root / "val.csv"


def test_onnx_path_matches_eager_and_reports_speedup(tmp_path):
    onnx_out = tmp_path / "m.onnx"
    manifest = write_manifest(tmp_path / "data")
    bench = settings(onnx=True, onnx_int8=True, onnx_threads=1, iters=3, onnx_out=str(onnx_out))
    bench.update(val_manifest=str(manifest), val_limit=4)
    result = benchmark.benchmark_model(models.create("mobilenetv3_large_100", 10), {"img_size": 64, "benchmark": bench})
    onnx, int8 = rows_by(result, form="onnx")[0], rows_by(result, form="onnx_int8")[0]
    assert onnx["status"] == "ok" and onnx["engine"] == "onnxruntime" and onnx["threads"] == 1
    assert int8["status"] == "ok" and int8["precision"] == "int8"
    checks = result["checks"]
    assert checks["onnx_max_abs_diff"] < 1e-3 and checks["onnx_ok"]
    assert checks["onnx_vs_eager_speedup_b1"] == pytest.approx(checks["onnx_eager_b1_p50_ms"] / onnx["latency_ms_p50"])
    assert 0.0 <= checks["onnx_int8_top1_agreement"] <= 1.0 and "4 images" in checks["onnx_int8_check"]
    assert checks["onnx_int8_top1_change"] == checks["onnx_int8_top1"] - checks["onnx_fp32_top1"]
    assert onnx_out.stat().st_size > 0


def test_output_has_contract_keys():
    result = benchmark.benchmark_model(Tiny(), {"model_name": "t", "img_size": 16, "benchmark": settings()})
    assert CONTRACT_TOP_KEYS <= set(result) and CONTRACT_CHECKS <= set(result["checks"])
    assert result["env"]["packages"]["torch"]
    assert result["host_other_cpu_share"] is None or 0.0 <= result["host_other_cpu_share"] <= 1.0
    for row in result["rows"]:
        assert CONTRACT_ROW_KEYS <= set(row) and set(row) == set(benchmark.ROW_KEYS)
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

    result = timm_parity.timm_method(Tiny(sleep_s=0.010), benchmark.make_input(2, 16, torch.device("cpu")), 1, 4)
    assert result["step_time_ms"] >= 10.0
    assert result["samples_per_sec"] <= 2 * 1000 / result["step_time_ms"] * (1 + 1e-9)


def test_config_json_accepts_inline_file_and_whole_config(tmp_path):
    whole = tmp_path / "config.json"
    whole.write_text(json.dumps({"seeds": [0], "benchmark": {"iters": 7}}))
    assert benchmark._config_section('{"iters": 3}') == {"iters": 3}
    assert benchmark._config_section(str(whole)) == {"iters": 7}
    with pytest.raises(benchmark.LcnnError):
        benchmark._config_section("[1, 2]")

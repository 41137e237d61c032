"""Numbers in the report, checked against values worked out by hand from small, hand-made study files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lcnn import report, report_claims, report_write, stats

T975_DF2 = 4.302652729911275  # Student t quantiles, for the hand calculations below
T975_DF4 = 2.7764451051977987
REPORT_CFG = {"gain_range": [1.5, 3.5], "fast_models": ["fastnet", "slownet", "ghostnet"]}
REPORT_CFG |= {"latency_ms": 5.0, "throughput_ips": 9800}

# model -> variant -> (axis, per-seed top-1; None = that seed diverged)
STUDY = {
    "fastnet": {
        "baseline": ("baseline", [70.0, 71.0, 72.0]),
        "cosine": ("schedule", [73.0, 74.0, 75.0]),
        "adamw": ("optimizer", [71.5, None, 72.5]),
        "lion": ("optimizer", [None, None, None]),
    },
    "slownet": {
        "baseline": ("baseline", [60.0, 62.0]),
        "cosine": ("schedule", [61.0, 64.0]),
        "randaug": ("augmentation", [65.0]),
    },
}


def _metrics(model: str, variant: str, axis: str, seed: int, top1: float | None, device: str) -> dict:
    div = top1 is None
    return {
        "model": model, "timm_name": f"{model}_timm", "variant": variant, "axis": axis, "seed": seed,
        "status": "diverged" if div else "ok", "top1": top1, "top5": None if div else min(top1 + 20, 100.0),
        "best_top1": top1, "best_epoch": 3, "epochs": 3, "epochs_completed": 1 if div else 3,
        "train_images": 100, "val_images": 50, "train_seconds": 36.0, "device": device,
        "device_type": "cuda" if device.startswith("cuda") else "cpu", "num_devices": 1, "device_hours": 0.01,
        "peak_mem_mb": 100.0, "params": 1_000_000, "slurm_job_id": None,
        # fastnet: the claims' conditions (224 px, ImageNet-1K's 1000 classes); slownet: a small CPU study
        "img_size": 224 if model == "fastnet" else 32, "num_classes": 1000 if model == "fastnet" else 10,
        "diverged_at": {"epoch": 2, "step": 7} if div else None,
        "data_wait_fraction": None if seed == 2 else 0.1 * (seed + 1),  # seed 2: a run from before it was measured
    }  # fmt: skip


def _row(form, device, precision, batch, p50, thr, status="ok", engine="torch") -> dict:
    ok = status == "ok"
    return {
        "form": form, "engine": engine, "device": device, "precision": precision, "channels_last": False,
        "batch_size": batch, "status": status, "error": None if ok else "CUDA out of memory",
        "latency_ms_mean": p50 if ok else None, "latency_ms_p50": p50 if ok else None,
        "latency_ms_p90": p50 if ok else None, "latency_ms_p99": p50 * 1.5 if ok else None,
        "throughput_ips": thr if ok else None, "peak_mem_mb": 10.0, "iters": 50,
    }  # fmt: skip


BENCH = {
    "fastnet": {
        "img_size": 224,  # the claims' conditions: 224 px on an L40S
        "env": {"device_name": "NVIDIA L40S", "cpu_model": "Intel Xeon Gold"},
        "checks": {"reparam_max_abs_diff": 1e-6, "onnx_max_abs_diff": 0.05, "onnx_ok": True},  # large logits
        "rows": [
            _row("trained", "cuda", "fp32", 1, 4.0, 250.0),
            _row("trained", "cuda", "fp16", 1, 2.5, 400.0),
            _row("onnx", "cpu", "fp32", 1, 1.0, 1000.0, engine="onnxruntime"),  # other device: never counts
            _row("trained", "cuda", "fp16", 256, 20.0, 12000.0),
            _row("trained", "cuda", "fp16", 512, None, None, status="oom"),
        ],
    },
    "slownet": {
        "env": {"device_name": "Intel Xeon Gold", "cpu_model": "Intel Xeon Gold"},
        "checks": {"reparam_max_abs_diff": 0.5},  # broken re-parameterization: its speed is not honest
        "rows": [
            _row("trained", "cpu", "fp32", 1, 30.0, 33.0),
            _row("reparam", "cpu", "fp32", 1, 10.0, 100.0),
            _row("trained", "cpu", "fp32", 8, 40.0, 200.0),
        ],
    },
}


@pytest.fixture()
def study(tmp_path: Path) -> dict:
    """Write results, histories (with metrics/config JSON beside them) and benchmarks under tmp_path."""
    results, histories, benchmarks = [], [], []
    for model, variants in STUDY.items():
        device = "cuda" if model == "fastnet" else "cpu"
        for variant, (axis, tops) in variants.items():
            runs = []
            for seed, top1 in enumerate(tops):
                m = _metrics(model, variant, axis, seed, top1, device)
                runs.append(m)
                run_dir = tmp_path / "runs" / model / variant / f"seed{seed}"
                run_dir.mkdir(parents=True)
                (run_dir / "metrics.json").write_text(json.dumps(m))
                (run_dir / "config.json").write_text(json.dumps({"model": model, "variant": variant, "seed": seed}))
                last = top1 if top1 is not None else float("nan")
                hist = pd.DataFrame({"epoch": [1, 2, 3], "top1": [last - 10, last - 5, last], "top5": [0.0] * 3})
                hist.to_csv(run_dir / "history.csv", index=False)
                histories.append(str(run_dir / "history.csv"))
            res = {"model": model, "variant": variant, "axis": axis, "timm_name": f"{model}_timm"}
            res |= {"seeds": list(range(len(tops))), "runs": runs, "top1_mean": 0.0, "n_seeds": len(tops)}
            path = tmp_path / "results" / model / f"{variant}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res))
            results.append(str(path))
        bench = {"model": model, "timm_name": f"{model}_timm", "img_size": 32, "num_classes": 10}
        bench |= {"params": 2_500_000, "gmacs": 0.3, "flops": 0.6e9} | BENCH[model]
        path = tmp_path / "benchmarks" / f"{model}.json"
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(bench))
        benchmarks.append(str(path))
    cfg = {"results": results, "histories": histories, "benchmarks": benchmarks, "report": REPORT_CFG}
    return cfg | {"out_dir": str(tmp_path / "results" / "report")}


@pytest.fixture()
def built(study: dict) -> dict:
    summary = report.run(study)
    out = Path(study["out_dir"])
    tables = {n: pd.read_csv(out / f"{n}.csv", keep_default_na=False, na_values=[""]) for n in report.TABLES}
    return {"summary": summary, "out": out, "tables": tables}


def _row_of(df: pd.DataFrame, **keys) -> pd.Series:
    sel = df
    for k, v in keys.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, f"expected one row for {keys}, got {len(sel)}"
    return sel.iloc[0]


def test_mean_ci_by_hand() -> None:
    st = stats.mean_ci([70.0, 71.0, 72.0])
    assert st["n"] == 3 and st["mean"] == pytest.approx(71.0) and st["std"] == pytest.approx(1.0)
    half = T975_DF2 / math.sqrt(3)
    assert (st["ci_lo"], st["ci_hi"]) == pytest.approx((71.0 - half, 71.0 + half))


def test_intervals_are_clipped_to_where_an_accuracy_can_lie() -> None:
    """Two seeds far apart give a t interval past 100 %; clipped, it keeps its coverage and reads sensibly."""
    raw, clipped = stats.mean_ci([92.0, 99.0]), stats.mean_ci([92.0, 99.0], bounds=stats.PERCENT)
    assert raw["ci_hi"] > 100 and raw["ci_lo"] < 92.0
    assert (clipped["ci_lo"], clipped["ci_hi"]) == (raw["ci_lo"], 100.0) and clipped["ci_half"] == raw["ci_half"]
    raw_gain = stats.welch_gain([10.0, 60.0], [90.0, 91.0])
    gain = stats.welch_gain([10.0, 60.0], [90.0, 91.0], bounds=stats.PERCENT_GAIN)
    assert raw_gain["ci_lo"] < -100 and (gain["ci_lo"], gain["ci_hi"]) == (-100.0, 100.0) < (-100.0, raw_gain["ci_hi"])
    assert gain["significant"] == raw_gain["significant"]  # decided on the t interval, before clipping


def test_single_seed_has_no_ci() -> None:
    st = stats.mean_ci([65.0, float("nan"), None])
    assert st["n"] == 1 and st["mean"] == 65.0
    assert math.isnan(st["std"]) and math.isnan(st["ci_lo"]) and math.isnan(st["ci_hi"])
    assert stats.welch_gain([65.0], [60.0, 62.0])["significant"] is None


def test_welch_gain_by_hand() -> None:
    g = stats.welch_gain([73.0, 74.0, 75.0], [70.0, 71.0, 72.0])
    se = math.sqrt(1 / 3 + 1 / 3)
    assert g["gain"] == pytest.approx(3.0) and g["df"] == pytest.approx(4.0)
    assert (g["ci_lo"], g["ci_hi"]) == pytest.approx((3 - T975_DF4 * se, 3 + T975_DF4 * se))
    assert g["significant"] is True
    noisy = stats.welch_gain([71.5, 72.5], [70.0, 71.0, 72.0])
    assert noisy["gain"] == pytest.approx(1.0) and noisy["significant"] is False
    assert noisy["ci_lo"] < 0 < noisy["ci_hi"]
    worse = stats.welch_gain([60.0, 60.5, 61.0], [70.0, 71.0, 72.0])
    assert worse["significant"] is True and worse["ci_hi"] < 0  # a significant loss is still "CI excludes 0"


def test_pareto_mask() -> None:
    latency = [1.0, 2.0, 3.0, 2.0, float("nan"), 1.0]
    top1 = [70.0, 75.0, 74.0, 60.0, 99.0, 70.0]
    # 3 is dominated by 2, 4 by 1; the NaN point is never on the front; equal points do not dominate each other
    assert stats.pareto_mask(latency, top1) == [True, True, False, False, False, True]
    thr = [100.0, 50.0, 200.0]
    assert stats.pareto_mask(thr, [70.0, 80.0, 60.0], minimize_cost=False) == [True, True, True]
    assert stats.pareto_mask(thr, [70.0, 60.0, 60.0], minimize_cost=False) == [True, False, True]


def test_welch_interval_matches_scipy_with_unequal_variances() -> None:
    from scipy import stats as sps

    variant, base = [80.1, 79.0, 83.5, 78.2, 81.9], [75.0, 75.4, 74.8]  # spreads differ by an order of magnitude
    g = stats.welch_gain(variant, base, 0.9)
    ref = sps.ttest_ind(variant, base, equal_var=False)
    ci = ref.confidence_interval(0.9)
    assert (g["ci_lo"], g["ci_hi"], g["df"]) == pytest.approx((ci.low, ci.high, ref.df))
    va, vb = np.var(variant, ddof=1) / 5, np.var(base, ddof=1) / 3  # Welch-Satterthwaite by hand
    assert g["df"] == pytest.approx((va + vb) ** 2 / (va**2 / 4 + vb**2 / 2)) and g["df"] != pytest.approx(6)
    pooled = sps.ttest_ind(variant, base, equal_var=True).confidence_interval(0.9)
    assert g["ci_hi"] - g["ci_lo"] != pytest.approx(pooled.high - pooled.low)  # not the equal-variance interval


def test_bonferroni_and_binomial_interval() -> None:
    assert stats.bonferroni(0.95, 4) == pytest.approx(0.9875) and stats.bonferroni(0.95, 0) == pytest.approx(0.95)
    lo, hi = stats.binomial_ci(80.0, 500)
    p, n, z = 0.8, 500, 1.959963984540054  # Wilson's score interval by hand
    centre, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    half /= 1 + z * z / n
    assert (lo, hi) == pytest.approx((100 * (centre - half), 100 * (centre + half)))
    assert stats.binomial_ci(100.0, 50)[1] == pytest.approx(100.0) and stats.binomial_ci(100.0, 50)[0] < 100


def _claim_rows(device_class: str, device: str, img_size: int, p50: float, thr: float) -> pd.DataFrame:
    models = pd.DataFrame(
        [{"model": "m", "device": device, "device_class": device_class, "bench_img_size": img_size}
         | {"b1_p50_ms": p50, "b1_p99_ms": p50, "b1_config": "trained, fp16", "max_throughput_ips": thr}
         | {"max_throughput_batch": 256, "max_throughput_config": "trained, fp16"}]
    )  # fmt: skip
    rep = report.report_settings(REPORT_CFG | {"fast_models": ["m"]})
    no_gains = pd.DataFrame(columns=["model", "variant", "axis", "gain", "n", "n_runs"])
    claims = report_claims.claims_table(no_gains, models, pd.DataFrame(), pd.DataFrame(), rep)
    assert list(claims["claim_id"]) == ["b", "c"]
    return claims


@pytest.mark.parametrize(
    ("device_class", "device", "img_size", "p50", "thr", "holds"),
    [
        ("GPU", "NVIDIA L40S (cuda)", 224, 2.0, 12000.0, ["yes", "yes"]),  # the claim's conditions, within bounds
        ("GPU", "NVIDIA L40S (cuda)", 224, 6.0, 5000.0, ["no", "no"]),
        ("CPU", "AMD EPYC 7B13 (cpu)", 32, 1.0, 20000.0, ["not comparable (32 px, CPU)"] * 2),  # the CPU demo
        ("CPU", "AMD EPYC 7B13 (cpu)", 224, 1.0, 20000.0, ["not comparable (224 px, CPU)"] * 2),  # size alone
        ("GPU", "NVIDIA L40S (cuda)", 32, 1.0, 20000.0, ["not comparable (32 px, GPU)"] * 2),  # device alone
        ("GPU", "NVIDIA H100 (cuda)", 224, 1.0, 20000.0, ["not comparable (224 px, NVIDIA H100)"] * 2),
    ],
)
def test_timing_claims_compare_like_with_like(device_class, device, img_size, p50, thr, holds) -> None:
    claims = _claim_rows(device_class, device, img_size, p50, thr)
    assert list(claims["holds"]) == holds
    assert f"p50 {p50:.2f} ms" in claims["measured"].iloc[0]  # what it measured is always shown


def test_claim_device_name_null_accepts_any_gpu() -> None:
    h100 = {"model": "m", "device": "NVIDIA H100 (cuda)", "device_class": "GPU", "bench_img_size": 224}
    rep = report.report_settings(REPORT_CFG | {"claim_device_name": None})
    assert report_claims.incomparable(h100, rep) is None and report_claims.claim_conditions(rep) == "224 px, GPU"
    assert report_claims.incomparable(h100 | {"device_class": "CPU"}, rep) == "224 px, CPU"


def test_accuracy_table(built: dict) -> None:
    acc = built["tables"]["accuracy"]
    base = _row_of(acc, model="fastnet", variant="baseline")
    assert base["top1_mean"] == pytest.approx(71.0) and base["top1_std"] == pytest.approx(1.0)
    assert base["top1_ci_hi"] - base["top1_mean"] == pytest.approx(T975_DF2 / math.sqrt(3))
    assert base["top5_mean"] == pytest.approx(91.0)
    adamw = _row_of(acc, model="fastnet", variant="adamw")  # the diverged seed is excluded, not a zero
    assert adamw["top1_mean"] == pytest.approx(72.0) and adamw["n_ok"] == 2 and adamw["n_diverged"] == 1
    assert str(adamw["diverged_seeds"]) == "1" and adamw["status"] == "partly diverged"
    lion = _row_of(acc, model="fastnet", variant="lion")
    assert lion["status"] == "diverged" and lion["n_diverged"] == 3 and math.isnan(lion["top1_mean"])
    one = _row_of(acc, model="slownet", variant="randaug")
    assert one["top1_mean"] == 65.0 and math.isnan(one["top1_std"]) and math.isnan(one["top1_ci_lo"])
    md = (built["out"] / "accuracy.md").read_text()
    assert "n/a" in md and "diverged" in md


def test_gains_table(built: dict) -> None:
    gains = built["tables"]["gains"]
    assert set(gains["variant"]) == {"cosine", "adamw", "lion", "randaug"}  # no baseline-vs-itself row
    cos = _row_of(gains, model="fastnet", variant="cosine")
    se = math.sqrt(2 / 3)
    assert cos["gain"] == pytest.approx(3.0) and cos["gain_ci_lo"] == pytest.approx(3 - T975_DF4 * se)
    assert cos["significant"] == "yes"
    assert cos["significant_corrected"] == "no" and cos["n_compared"] == 3  # Bonferroni over 3 variants
    adamw = _row_of(gains, model="fastnet", variant="adamw")
    assert adamw["gain"] == pytest.approx(1.0) and adamw["n"] == 2 and adamw["n_diverged"] == 1
    assert adamw["significant"] == "no"
    lion = _row_of(gains, model="fastnet", variant="lion")
    assert math.isnan(lion["gain"]) and lion["significant"] == "n/a" and lion["note"] == "all runs diverged"
    one = _row_of(gains, model="slownet", variant="randaug")
    assert one["gain"] == pytest.approx(4.0) and one["significant"] == "n/a" and math.isnan(one["gain_ci_lo"])


def test_best_variants(built: dict) -> None:
    best, axis = built["tables"]["best_variants"], built["tables"]["best_per_axis"]
    assert _row_of(best, model="fastnet")["best_variant"] == "cosine"
    assert _row_of(best, model="slownet")["best_variant"] == "randaug"
    assert _row_of(axis, model="fastnet", axis="optimizer")["best_variant"] == "adamw"  # lion diverged
    assert _row_of(axis, model="slownet", axis="schedule")["gain"] == pytest.approx(1.5)


def test_runs_and_compute(built: dict) -> None:
    runs = built["tables"]["runs"]
    assert len(runs) == 17 and (runs["status"] == "diverged").sum() == 4
    div = _row_of(runs, model="fastnet", variant="adamw", seed=1)
    assert div["diverged_at"] == "epoch 2 step 7" and div["hours_unit"] == "GPU-hours"
    md = (built["out"] / "runs.md").read_text()
    assert "| diverged " in md
    comp = built["tables"]["compute"]
    assert _row_of(comp, model="fastnet", hours_unit="GPU-hours")["device_hours"] == pytest.approx(0.12)
    assert _row_of(comp, model="ALL", hours_unit="CPU-hours")["device_hours"] == pytest.approx(0.05)
    assert _row_of(comp, model="fastnet", hours_unit="GPU-hours")["epochs_completed"] == 3 * 8 + 1 * 4
    # the loader's share of training time, over the runs that measured it (equal training seconds here)
    fast = runs[(runs["model"] == "fastnet") & (runs["hours_unit"] == "GPU-hours")]
    waited = fast["seed"].map({0: 10.0, 1: 20.0}).dropna()
    assert len(waited) < len(fast)  # some runs did not measure it and are left out, not counted as 0
    assert _row_of(comp, model="fastnet", hours_unit="GPU-hours")["loader_wait_pct"] == pytest.approx(waited.mean())
    assert "loader_wait_pct" in (built["out"] / "compute.md").read_text()


def test_latency_and_models(built: dict) -> None:
    lat = built["tables"]["latency"]
    assert len(lat) == 8
    assert "| oom " in (built["out"] / "latency.md").read_text()  # never a zero for a run that did not fit
    models = built["tables"]["models"]
    fast = _row_of(models, model="fastnet")
    assert fast["b1_p50_ms"] == 2.5 and fast["b1_config"] == "trained, fp16"  # the CPU ONNX row does not count
    assert pd.isna(fast["excluded_forms"]) and lat[lat["form"] == "onnx"]["equivalent"].all()  # benchmark's verdict
    assert fast["max_throughput_ips"] == 12000 and fast["max_throughput_batch"] == 256
    assert fast["params_M"] == pytest.approx(2.5) and fast["gmacs"] == pytest.approx(0.3)
    assert fast["best_top1"] == pytest.approx(74.0) and fast["device"] == "NVIDIA L40S (cuda)"
    slow = _row_of(models, model="slownet")
    assert (fast["device_class"], fast["bench_img_size"], slow["device_class"], slow["bench_img_size"]) == (
        "GPU",
        224,
        "CPU",
        32,
    )
    assert slow["b1_p50_ms"] == 30.0 and slow["excluded_forms"] == "reparam"  # broken reparam is not honest
    assert fast["pareto_latency"] == "yes" and slow["pareto_latency"] == "no"  # fastnet is faster and better


def test_a_gain_whose_whole_ci_is_below_zero_is_called_a_loss_not_noise() -> None:
    """The demo's ConvNeXt-Atto: -2.00 points, 95 % CI [-3.01, -0.99]. That is no gain within seed noise. The
    verdict rests on where the best true gain lies: wholly below the range is "no", straddling it "inconclusive"."""
    best = pd.DataFrame(
        [
            {"model": m, "best_variant": "kaiming", "axis": "initialization", "gain": g, "gain_ci_lo": lo}
            | {"gain_ci_hi": hi, "significant": s, "significant_corrected": s, "n": 2, "n_baseline": 2, "n_compared": 4}
            | {"best_gain_lo": lo - 1, "best_gain_hi": hi + 1}
            for m, g, lo, hi, s in [("lossnet", -2.0, -3.01, -0.99, "yes"), ("noisenet", -2.0, -9.0, 5.0, "no")]
        ]
    )
    runs = pd.DataFrame([{"model": m, "device": "cpu", "img_size": 224, "num_classes": 1000} for m in best["model"]])
    loss, noise = report_claims._gain_claims(best, runs, report.report_settings({"gain_range": [1.5, 3.5]}))
    assert loss["beyond_seed_noise"] == "no (a loss)" and loss["holds"] == "no"
    assert "below 0" in loss["note"] and "includes 0" not in loss["note"]
    assert noise["beyond_seed_noise"] == "no" and noise["holds"] == "inconclusive" and "includes 0" in noise["note"]


def test_claims(built: dict) -> None:
    claims = built["tables"]["claims"]
    a_fast = _row_of(claims, claim_id="a", model="fastnet")  # beyond noise at 95 %, but not once corrected
    assert a_fast["in_range"] == "yes" and a_fast["beyond_seed_noise"] == "yes"
    assert a_fast["holds"] == "inconclusive" and "Bonferroni" in a_fast["note"]
    assert "best true gain in [-0.23, 6.23]" in a_fast["measured"]  # cosine's corrected interval (adamw lost a seed)
    assert (
        "ranked without variants that lost seeds: adamw (1/3 seeds diverged; +1.00 on the rest); lion (3/3"
        in (a_fast["note"])
    )
    a_slow = _row_of(claims, claim_id="a", model="slownet")  # +4 from one seed at 32 px on 10 classes
    assert a_slow["in_range"] == "no" and a_slow["beyond_seed_noise"] == "n/a"
    assert a_slow["holds"] == "not comparable (32 px, 10 classes)" and "ImageNet-1K" in a_slow["note"]
    b_fast = _row_of(claims, claim_id="b", model="fastnet")  # 224 px on an L40S, 2.5 ms under 5 ms: holds
    assert b_fast["holds"] == "yes" and "L40S" in b_fast["device"] and "2.50 ms" in b_fast["measured"]
    assert "(224 px, L40S GPU)" in b_fast["claim"]
    b_slow = _row_of(claims, claim_id="b", model="slownet")  # 32 px on a CPU: what it measured, but no verdict
    assert b_slow["holds"] == "not comparable (32 px, CPU)" and "10.00 ms" not in b_slow["measured"]
    assert "p50 30.00 ms" in b_slow["measured"] and "cannot test it" in b_slow["note"]
    assert "Intel Xeon Gold (cpu)" in b_slow["device"]
    assert _row_of(claims, claim_id="c", model="fastnet")["holds"] == "yes"
    assert _row_of(claims, claim_id="c", model="slownet")["holds"] == "not comparable (32 px, CPU)"
    assert _row_of(claims, claim_id="b", model="ghostnet")["holds"] == "n/a"  # not benchmarked: not refuted


def test_claim_in_range_but_noisy(study: dict) -> None:
    study["report"] = REPORT_CFG | {"gain_range": [0.5, 5.0]}
    claims = pd.DataFrame(report.run(study)["claims"])
    row = _row_of(claims, claim_id="a", model="fastnet")  # in range, beyond noise, but best of 3: not corrected
    assert row["in_range"] == "yes" and row["holds"] == "inconclusive" and "Bonferroni" in row["note"]
    study["report"] = REPORT_CFG | {"gain_range": [0.0, 1.2]}  # adamw's +1 would be in range, but best is +3
    row = _row_of(pd.DataFrame(report.run(study)["claims"]), claim_id="a", model="fastnet")
    assert row["in_range"] == "no" and row["holds"] == "inconclusive"  # [-0.23, 6.23] straddles 1.2
    study["report"] = REPORT_CFG | {"gain_range": [10.0, 20.0]}
    row = _row_of(pd.DataFrame(report.run(study)["claims"]), claim_id="a", model="fastnet")
    assert row["holds"] == "no"  # the best true gain is below 6.23: a claim of 10 to 20 points is refuted


def test_files_written(built: dict) -> None:
    out, summary = built["out"], built["summary"]
    for name in report.TABLES:
        for fmt in report_write.TABLE_FORMATS:
            path = out / f"{name}.{fmt}"
            assert path.stat().st_size > 0, path
            assert summary["tables"][name][fmt] == str(path)
    assert "\\begin{tabular}" in (out / "claims.tex").read_text()
    assert "<table>" in (out / "claims.html").read_text()
    for name in report.FIGURES:
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert summary["figures"][name] == str(out / f"{name}.png")
    index = json.loads((out / "summary.json").read_text())
    assert index["runs"] == {"total": 17, "ok": 13, "diverged": 4} and len(index["claims"]) == 8
    assert (out / "report.md").exists()


def test_cli(study: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg_file = tmp_path / "report_config.json"
    cfg_file.write_text(json.dumps({"report": REPORT_CFG, "baseline_variant": "baseline"}))
    out = tmp_path / "cli_out"
    argv = ["--config-json", str(cfg_file), "--results", *study["results"], "--histories", *study["histories"]]
    report.main([*argv, "--benchmarks", *study["benchmarks"], "--out-dir", str(out)])
    assert (out / "summary.json").exists() and "wrote" in capsys.readouterr().out
    inline = ["--config-json", json.dumps({"report": REPORT_CFG}), *argv[2:]]  # how the Snakemake rule passes it
    report.main([*inline, "--out-dir", str(out / "nobench")])  # no benchmarks: timing claims say n/a, still writes
    claims = pd.read_csv(out / "nobench" / "claims.csv", keep_default_na=False)
    assert set(claims[claims["claim_id"] != "a"]["holds"]) == {"n/a"}
    assert (out / "nobench" / "pareto.png").exists()
    cfg_file.write_text(json.dumps({"report": {"gain_range": [3, 1], "latency_ms": 5, "throughput_ips": 1}}))
    with pytest.raises(SystemExit) as err:
        report.main([*argv, "--out-dir", str(out)])
    assert err.value.code == 2 and "reversed" in capsys.readouterr().err


def _runs(study: dict) -> pd.DataFrame:
    """A runs table as lcnn.report_load builds it, from {model: {variant: (axis, per-seed top-1)}}."""
    rows = [
        {"model": model, "variant": variant, "axis": axis, "seed": seed, "device": "cpu"}
        | {"status": "diverged" if top1 is None else "ok", "top1": np.nan if top1 is None else top1}
        | {"img_size": 224, "num_classes": 1000}  # the gain claim's conditions
        for model, variants in study.items()
        for variant, (axis, tops) in variants.items()
        for seed, top1 in enumerate(tops)
    ]
    return pd.DataFrame(rows)


def _gain_claims(study: dict, gain_range=(1.5, 3.5)) -> tuple[pd.DataFrame, pd.DataFrame]:
    from lcnn import report_tables

    runs = _runs(study)
    best, _ = report_tables.best_tables(report_tables.gains_table(runs))
    rep = report.report_settings({"gain_range": list(gain_range)})
    return best, pd.DataFrame(report_claims._gain_claims(best, runs, rep))


def test_a_variant_that_lost_seeds_never_backs_a_yes() -> None:
    """Averaged over the seeds that survived, a variant that diverged on one seed outranks a steady one; it may
    show its gain, but the claim rests on variants that kept every seed, or reads "unclear"."""
    base = ("baseline", [70.0, 70.1, 70.2, 70.3])
    steady, flaky = ("schedule", [72.0, 72.1, 72.2, 72.3]), ("optimizer", [73.0, 73.1, None, 73.2])
    best, claims = _gain_claims({"m": {"baseline": base, "steady": steady, "flaky": flaky}})
    row, claim = best.iloc[0], claims.iloc[0]
    assert row["best_variant"] == "steady" and row["gain"] == pytest.approx(2.0)  # flaky's +2.95 is not ranked
    assert row["excluded_variants"] == "flaky (1/4 seeds diverged; +2.95 on the rest)"
    assert claim["holds"] == "yes" and "flaky (1/4 seeds diverged" in claim["note"]
    # no variant kept every seed: the flaky one is the best there is, and the claim cannot rest on it
    best, claims = _gain_claims({"m": {"baseline": base, "flaky": flaky}})
    claim = claims.iloc[0]
    assert best.iloc[0]["best_variant"] == "flaky" and best.iloc[0]["n_diverged"] == 1
    assert claim["in_range"] == "yes" and claim["beyond_seed_noise"] == "yes"
    assert claim["holds"] == "unclear (1/4 diverged)" and "1 of 4 seeds of flaky diverged" in claim["note"]
    assert "n=3 of 4 (1 diverged) vs 4" in claim["measured"]
    # a baseline that lost a seed is the reference, a mean over its survivors: the note says so
    shaky_base = ("baseline", [70.0, 70.1, None, 70.3])
    claim = _gain_claims({"m": {"baseline": shaky_base, "steady": steady}})[1].iloc[0]
    assert "1 of 4 baseline seeds diverged: the baseline mean is over the rest" in claim["note"]


def test_holds_needs_the_bonferroni_corrected_test() -> None:
    """The best of many variants clears an uncorrected 95 % interval by chance too often: "holds" needs the
    corrected one. +3 points over 3 seeds, 1 point of spread: beyond noise alone, not as the best of 15."""
    base = ("baseline", [70.0, 71.0, 72.0])
    study = {"m": {"baseline": base} | {f"v{i:02d}": ("schedule", [69.0, 70.0, 71.0]) for i in range(14)}}
    study["m"]["winner"] = ("schedule", [73.0, 74.0, 75.0])
    best, claims = _gain_claims(study)
    row, claim = best.iloc[0], claims.iloc[0]
    assert row["best_variant"] == "winner" and row["n_compared"] == 15
    assert row["significant"] == "yes" and row["significant_corrected"] == "no"
    assert claim["beyond_seed_noise"] == "yes" and claim["in_range"] == "yes" and claim["holds"] == "inconclusive"
    assert "Bonferroni correction over 15 variants" in claim["note"]
    study["m"]["winner"] = ("schedule", [73.4, 73.5, 73.6])  # +2.5, tight seeds: significant once corrected too
    study["m"]["baseline"] = ("baseline", [70.9, 71.0, 71.1])
    best, claims = _gain_claims(study)
    assert best.iloc[0]["significant_corrected"] == "yes" and claims.iloc[0]["beyond_seed_noise"] == "yes"
    # but 14 noisy variants (-1, one point of spread) could each truly gain up to +5: the best true gain may lie
    # above 3.5, so the claim of 1.5 to 3.5 is not shown
    assert best.iloc[0]["best_gain_hi"] > 3.5 and claims.iloc[0]["holds"] == "inconclusive"
    study["m"] |= {f"v{i:02d}": ("schedule", [69.9, 70.0, 70.1]) for i in range(14)}  # tight too: -1 for sure
    best, claims = _gain_claims(study)
    assert 1.5 < best.iloc[0]["best_gain_lo"] < best.iloc[0]["best_gain_hi"] < 3.5
    assert claims.iloc[0]["holds"] == "yes" and "judged on where the best true gain lies" in claims.iloc[0]["note"]


def test_pretrained_weights_are_not_tuning_and_stay_out_of_the_gain_claim() -> None:
    """ImageNet-1K weights start a run near the published accuracy: ranked with the tuning variants they win every
    model by tens of points, and the claim would test them instead of the tuning. They stay in the tables."""
    from lcnn import report_tables

    runs = _runs(
        {
            "m": {
                "baseline": ("baseline", [40.0, 40.1, 40.2]),
                "randaugment": ("augmentation", [42.4, 42.5, 42.6]),
                "pretrained": ("initialization", [76.0, 76.1, 76.2]),
            }
        }
    )
    gains = report_tables.gains_table(runs)
    assert report_tables.best_tables(gains)[0].iloc[0]["best_variant"] == "pretrained"
    rep = report.report_settings({"fast_models": []})
    claim = report_claims.claims_table(gains, pd.DataFrame(columns=["model"]), pd.DataFrame(), runs, rep)
    claim = claim[claim["claim_id"] == "a"].iloc[0]
    assert claim["measured"].startswith("best randaugment (augmentation): +2.40 pts") and claim["holds"] == "yes"
    assert "not tuning, left out of this claim (report.gain_claim_excludes): pretrained" in claim["note"]
    # a model with no tuning variant still has its row: n/a, saying why, not a silent gap
    only = _runs({"p": {"baseline": ("baseline", [40.0, 40.1]), "pretrained": ("initialization", [76.0, 76.1])}})
    claims = report_claims.claims_table(
        report_tables.gains_table(only), pd.DataFrame(columns=["model"]), pd.DataFrame(), only, rep
    )
    assert claims[["claim_id", "model", "holds"]].values.tolist() == [["a", "p", "n/a"]]
    assert claims.iloc[0]["measured"] == "no tuning variant: only pretrained (report.gain_claim_excludes)"


def test_figures_judged_against_a_threshold_never_print_as_it() -> None:
    assert report_claims.shown(4.996, (5.0,), 2) == "4.996" and report_claims.shown(4.9, (5.0,), 2) == "4.90"
    assert (
        report_claims.shown(3.504, (1.5, 3.5), 2, "+") == "+3.504"
        and report_claims.shown(1.497, (1.5, 3.5), 2) == "1.497"
    )
    assert (
        report_claims.shown(9800.4, (9800,), 0) == "9800.4" and report_claims.shown(math.inf, (1.5,), 2) == "unbounded"
    )


def test_zero_spread_on_both_sides_is_noise_unmeasurable_not_significant(study: dict) -> None:
    """Two seeds each, every one the same top-1 (a small validation set's coarse steps): a zero-width interval
    would call any difference real. There is no measured noise, so there is no verdict on it either."""
    g = stats.welch_gain([72.0, 72.0], [70.0, 70.0])
    assert g["gain"] == pytest.approx(2.0) and g["significant"] is None and g["noise"] == stats.NOISE_UNMEASURABLE
    assert math.isnan(g["ci_lo"]) and math.isnan(g["ci_hi"])
    # no spread on one side: Welch would take that side as noise-free (CI [1.50, 2.50] below), so no CI either
    one_flat = stats.welch_gain([90.0, 90.0, 90.0], [87.8, 88.0, 88.2])
    assert one_flat["significant"] is None and one_flat["noise"] == stats.NOISE_UNMEASURABLE
    assert stats.mean_ci([94.33, 94.33])["std"] == 0 and math.isnan(stats.mean_ci([94.33, 94.33])["ci_lo"])
    from lcnn import report_tables

    runs = _runs({"m": {"baseline": ("baseline", [70.0, 70.0]), "flat": ("schedule", [72.0, 72.0])}})
    gains = report_tables.gains_table(runs)
    assert gains.iloc[0]["significant"] == "n/a" and "unmeasurable" in gains.iloc[0]["note"]
    claim = _gain_claims({"m": {"baseline": ("baseline", [70.0, 70.0]), "flat": ("schedule", [72.0, 72.0])}})[1]
    assert claim.iloc[0]["holds"] == "inconclusive" and claim.iloc[0]["beyond_seed_noise"] == "n/a"
    assert "unmeasurable" in claim.iloc[0]["note"]


def _int8_bench(tmp_path: Path, checks: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A benchmark run on the CPU, where the ORT rows are main-device rows: int8 at 2 ms, eager at 10 ms."""
    bench = {"model": "m", "timm_name": "m_timm", "img_size": 224, "params": 1_000_000, "gmacs": 0.2}
    bench |= {"env": {"cpu_model": "AMD EPYC"}, "checks": {"onnx_ok": True, "onnx_max_abs_diff": 1e-6} | checks}
    bench["rows"] = [
        _row("trained", "cpu", "fp32", 1, 10.0, 100.0),
        _row("onnx", "cpu", "fp32", 1, 5.0, 200.0, engine="onnxruntime"),
        _row("onnx_int8_static", "cpu", "int8", 1, 2.0, 500.0, engine="onnxruntime"),
    ]
    path = tmp_path / "m.json"
    path.write_text(json.dumps(bench))
    from lcnn import report_load

    return report_load.load_benchmarks([str(path)])


@pytest.mark.parametrize(
    ("checks", "admitted"),
    [
        ({"onnx_int8_static_top1_change": -82.8, "onnx_int8_static_fp32_top1_agreement": 0.1}, False),  # broken
        ({"onnx_int8_static_top1_change": 0.6, "onnx_int8_static_fp32_top1_agreement": 0.99}, False),  # past 0.5
        ({"onnx_int8_static_fp32_top1_agreement": 0.97}, False),  # no validation images: top-1 change unknown
        ({"onnx_int8_static_top1_change": float("nan"), "onnx_int8_static_fp32_top1_agreement": 0.9}, False),
        ({"onnx_int8_static_top1_change": -0.4}, False),  # agreement not recorded
        ({"onnx_int8_static_top1_change": -0.4, "onnx_int8_static_fp32_top1_agreement": 0.99}, True),
    ],
)
def test_int8_rows_back_a_claim_only_within_half_a_point_of_top1(tmp_path: Path, checks, admitted) -> None:
    """int8 changes results, so it is judged by what it did to top-1 (the README's goal: at most 0.5 points):
    a broken int8 form is shown, with its row, but never sets the latency a claim and the Pareto front read."""
    rows, bench_models = _int8_bench(tmp_path, checks)
    assert _row_of(rows, form="onnx_int8_static")["equivalent"] == admitted
    assert _row_of(rows, form="onnx")["equivalent"] and _row_of(rows, form="onnx_int8_static")["main_device"]
    acc = pd.DataFrame([{"model": "m", "variant": "baseline", "top1_mean": 80.0, "n_ok": 2, "n_runs": 2}])
    from lcnn import report_tables

    models = report_tables.models_table(acc, pd.DataFrame(), rows, bench_models, "baseline")
    m = models.iloc[0]
    assert m["b1_p50_ms"] == (2.0 if admitted else 5.0) and m["max_throughput_ips"] == (500 if admitted else 200)
    assert ("onnx_int8_static" in m["excluded_forms"]) != admitted
    assert len(report_tables.latency_table(rows)) == 3  # shown either way


def test_pareto_pairs_latency_with_accuracy_trained_at_the_benchmarks_resolution(tmp_path: Path) -> None:
    """A variant trained at 288 px scores higher, but the latency was timed at 224 px: the Pareto point and
    best_top1 take the best variant at 224 px, and the note names the one left out."""
    from lcnn import report_tables

    rows, bench_models = _int8_bench(tmp_path, {})
    bench_models["img_size"] = 224
    runs = pd.DataFrame(
        [
            {"model": "m", "variant": v, "axis": "x", "seed": s, "status": "ok", "top1": t + s, "top5": 99.0}
            | {"img_size": size}
            for v, t, size in [("baseline", 70.0, 224), ("cosine", 72.0, 224), ("res288", 78.0, 288)]
            for s in (0, 1)
        ]
    )
    acc = report_tables.accuracy_table(runs)
    assert dict(zip(acc["variant"], acc["img_size"])) == {"baseline": 224, "cosine": 224, "res288": 288}
    m = report_tables.models_table(acc, pd.DataFrame(), rows, bench_models, "baseline").iloc[0]
    assert (m["best_variant"], m["best_top1"]) == ("cosine", 72.5)
    assert "res288 (78.50) trained at 288 px, not the benchmark's 224 px" in m["benchmark_note"]
    bench_models["img_size"] = 288  # timed at 288 px: now the 288-px variant is the like-for-like one
    m = report_tables.models_table(acc, pd.DataFrame(), rows, bench_models, "baseline").iloc[0]
    assert (m["best_variant"], m["benchmark_note"]) == ("res288", "")


def test_a_search_of_unknown_cost_leaves_the_compute_totals_unknown() -> None:
    """A search summary told before lcnn recorded device-hours (or over several device types) has no cost to add:
    its model's row shows none, and so does the ALL row, rather than a total that silently leaves it out."""
    from lcnn import report_tables

    runs = pd.DataFrame(
        [
            {"model": m, "variant": "baseline", "status": "ok", "device_type": "cuda", "device_hours": 1.0}
            | {"epochs_completed": 9, "train_seconds": 3600.0, "data_wait_fraction": None}
            for m in ("a", "b")
        ]
    )
    known = {"model": "a", "compute": {"epochs": 30, "device_hours": 2.5, "device_type": "cuda"}}
    table = report_tables.compute_table(runs, [known]).set_index("model")
    assert table.loc["a", "search_device_hours"] == table.loc["ALL", "search_device_hours"] == 2.5
    table = report_tables.compute_table(runs, [known, {"model": "b", "epochs": 30}]).set_index("model")
    assert table.loc["a", "search_device_hours"] == 2.5 and pd.isna(table.loc["b", "search_device_hours"])
    assert pd.isna(table.loc["ALL", "search_device_hours"]) and table.loc["ALL", "device_hours"] == 2.0

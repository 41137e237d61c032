"""Aggregate the study into tables, figures and a claims check (``python -m lcnn.report``).

Everything is recomputed from the per-run metrics inside ``results/{model}/{variant}.json``, the per-epoch
``history.csv`` files and ``benchmarks/{model}.json``, so the report never trusts a pre-computed mean.
Seed-to-seed noise is always shown next to a gain: a gain whose confidence interval includes 0 is reported
as not significant, whatever its size, and runs that diverged are counted in their own column instead of
being averaged in as zeros.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from lcnn.utils import LcnnError, atomic_write_json, atomic_write_text, cli, environment, json_arg, read_json

TABLES = ("claims", "accuracy", "gains", "best_variants", "best_per_axis", "runs", "compute", "latency", "models")
TABLES += ("halving",)  # halving vs grid (lcnn.search); no rows unless a halving search is given
FIGURES = ("pareto", "gain_heatmap", "learning_curves", "throughput_vs_batch")
TABLE_FORMATS = ("md", "csv", "tex", "html")
LATENCY_FIELDS = ("form", "engine", "device", "precision", "channels_last", "batch_size", "status", "error")
LATENCY_FIELDS += ("latency_ms_p50", "latency_ms_p99", "throughput_ips")
EQUIVALENCE_TOL = 1e-2  # a deployment form whose outputs differ more than this from eager is not an honest speed-up


# ----------------------------------------------------------------------------------------------- statistics
def t_quantile(p: float, df: float) -> float:
    """Quantile ``p`` of Student's t with ``df`` degrees of freedom (scipy; NaN when df is not positive)."""
    if not df or not math.isfinite(df) or df <= 0:
        return math.nan
    try:
        from scipy import stats
    except ImportError:  # pragma: no cover - scipy is a dependency of the environment
        raise LcnnError("scipy is needed for t-distribution confidence intervals; pip install scipy") from None
    return float(stats.t.ppf(p, df))


def _finite(values: Any) -> list[float]:
    out = []
    for v in values if values is not None else []:
        try:
            f = float(v)
        except (TypeError, ValueError):
            continue
        if math.isfinite(f):
            out.append(f)
    return out


def mean_ci(values: Any, confidence: float = 0.95) -> dict[str, float]:
    """Mean, sample std (ddof=1) and a t-based confidence interval of the mean.

    With one value the std and CI are NaN (one seed says nothing about seed noise); with none, all are NaN.
    """
    xs = _finite(values)
    n = len(xs)
    nan = math.nan
    if n == 0:
        return {"n": 0, "mean": nan, "std": nan, "ci_lo": nan, "ci_hi": nan, "ci_half": nan}
    mean = sum(xs) / n
    if n == 1:
        return {"n": 1, "mean": mean, "std": nan, "ci_lo": nan, "ci_hi": nan, "ci_half": nan}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "ci_lo": mean - half, "ci_hi": mean + half, "ci_half": half}


def welch_gain(variant: Any, baseline: Any, confidence: float = 0.95) -> dict[str, Any]:
    """Gain ``mean(variant) - mean(baseline)`` with a Welch (unequal-variance) t confidence interval.

    ``significant`` is True/False when the CI excludes/includes 0 and None when it cannot be computed
    (fewer than two finite values on either side). Zero spread on both sides gives a zero-width CI.
    """
    a, b = _finite(variant), _finite(baseline)
    na, nb = len(a), len(b)
    nan = math.nan
    out: dict[str, Any] = {"gain": nan, "ci_lo": nan, "ci_hi": nan, "df": nan, "significant": None, "n": na}
    out["n_baseline"] = nb
    if na == 0 or nb == 0:
        return out
    ma, mb = sum(a) / na, sum(b) / nb
    out["gain"] = ma - mb
    if na < 2 or nb < 2:
        return out
    va = sum((x - ma) ** 2 for x in a) / (na - 1) / na
    vb = sum((x - mb) ** 2 for x in b) / (nb - 1) / nb
    se = math.sqrt(va + vb)
    if se == 0:
        df, half = float(na + nb - 2), 0.0
    else:
        df = (va + vb) ** 2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
        half = t_quantile(0.5 + confidence / 2, df) * se
    lo, hi = out["gain"] - half, out["gain"] + half
    out.update(ci_lo=lo, ci_hi=hi, df=df, significant=bool(lo > 0 or hi < 0))
    return out


def pareto_mask(cost: Any, value: Any, minimize_cost: bool = True) -> list[bool]:
    """Which points are Pareto-optimal: no other point is at least as good on both axes and better on one.

    ``cost`` is minimized (or maximized when ``minimize_cost`` is False, e.g. throughput); ``value``
    (accuracy) is maximized. Points with a missing coordinate are never on the front.
    """
    pts = []
    for c, v in zip(cost, value, strict=True):
        c, v = float(c) if c is not None else math.nan, float(v) if v is not None else math.nan
        pts.append((c if minimize_cost else -c, v))
    mask = []
    for i, (ci, vi) in enumerate(pts):
        if not (math.isfinite(ci) and math.isfinite(vi)):
            mask.append(False)
            continue
        dominated = any(
            j != i and math.isfinite(cj) and math.isfinite(vj) and cj <= ci and vj >= vi and (cj < ci or vj > vi)
            for j, (cj, vj) in enumerate(pts)
        )
        mask.append(not dominated)
    return mask


# -------------------------------------------------------------------------------------------------- loading
RUN_FIELDS = ("seed", "status", "top1", "top5", "best_top1", "best_epoch", "epochs", "epochs_completed")
RUN_FIELDS += ("train_seconds", "device", "device_type", "num_devices", "device_hours", "params", "diverged_at")


def load_runs(paths: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per training run (from results JSON ``runs``) and one row per model x variant file."""
    runs, variants = [], []
    for path in paths:
        res = read_json(path)
        if not isinstance(res, dict) or "model" not in res or "variant" not in res or "runs" not in res:
            raise LcnnError(f"{path} is not a results file (needs model, variant, runs); rebuild it")
        variants.append({k: res.get(k) for k in ("model", "variant", "axis", "timm_name")} | {"path": str(path)})
        for m in res["runs"] or []:
            row = {"model": res["model"], "variant": res["variant"], "axis": res.get("axis") or m.get("axis")}
            row |= {k: m.get(k) for k in RUN_FIELDS}
            runs.append(row)
    runs_df = pd.DataFrame(runs, columns=["model", "variant", "axis", *RUN_FIELDS])
    for col in ("top1", "top5", "best_top1", "device_hours", "train_seconds", "epochs", "epochs_completed"):
        runs_df[col] = pd.to_numeric(runs_df[col], errors="coerce")
    return runs_df, pd.DataFrame(variants, columns=["model", "variant", "axis", "timm_name", "path"])


def load_histories(paths: list[str]) -> pd.DataFrame:
    """Per-epoch validation accuracy of every run, labelled from the run directory's metrics/config JSON."""
    frames = []
    for path in paths:
        path = Path(path)
        try:
            hist = pd.read_csv(path)
        except FileNotFoundError:
            raise LcnnError(f"{path} does not exist; build the run first (e.g. `snakemake {path}`)") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise LcnnError(f"{path} is not a readable CSV ({err}); delete the run and retrain it") from None
        if not {"epoch", "top1"} <= set(hist.columns):
            raise LcnnError(f"{path} lacks the epoch/top1 columns; it is not a training history")
        meta: dict[str, Any] = {}
        for name in ("config.json", "metrics.json"):
            if (path.parent / name).exists():
                meta |= read_json(path.parent / name)
        parts = path.parts
        seed_dir = parts[-2] if len(parts) >= 2 else ""
        hist = hist.assign(
            model=meta.get("model", parts[-4] if len(parts) >= 4 else "?"),
            variant=meta.get("variant", parts[-3] if len(parts) >= 3 else "?"),
            seed=meta.get("seed", seed_dir.removeprefix("seed")),
            status=meta.get("status", "ok"),
        )
        frames.append(hist)
    cols = ["model", "variant", "seed", "status", "epoch", "top1"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def _device_label(device: Any, env: dict) -> str:
    dev = str(device or "?")
    name = env.get("device_name") if dev.startswith("cuda") else (env.get("cpu_model") or env.get("device_name"))
    return f"{name or 'unknown'} ({dev})"


def _equivalent(checks: dict, form: str, tol: float) -> bool:
    """Whether a deployment form computes the same function as the eager model, so its speed may back a claim.

    The benchmark's own verdict (``{form}_ok``, based on a relative difference) wins; without one, the
    absolute output difference must stay within ``tol``.
    """
    if checks.get(f"{form}_ok") is not None:
        return bool(checks[f"{form}_ok"])
    diff = checks.get(f"{form}_max_abs_diff")
    return diff is None or float(diff) <= tol


def load_benchmarks(paths: list[str], tol: float = EQUIVALENCE_TOL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All benchmark rows (with the device named) and one row per model (params, GMACs, main device)."""
    rows, models = [], []
    for path in paths:
        bench = read_json(path)
        if not isinstance(bench, dict) or "model" not in bench or "rows" not in bench:
            raise LcnnError(f"{path} is not a benchmark file (needs model, rows); rebuild it")
        env, checks = bench.get("env") or {}, bench.get("checks") or {}
        torch_devs = [r.get("device") for r in bench["rows"] if r.get("engine", "torch") == "torch"]
        all_devs = torch_devs or [r.get("device") for r in bench["rows"]]
        main = Counter(all_devs).most_common(1)[0][0] if all_devs else None
        bad_forms = {form for form in ("reparam", "onnx") if not _equivalent(checks, form, tol)}
        models.append(
            {
                "model": bench["model"],
                "timm_name": bench.get("timm_name"),
                "params": bench.get("params"),
                "gmacs": bench.get("gmacs"),
                "img_size": bench.get("img_size"),
                "device": _device_label(main, env) if main else "n/a",
                "excluded_forms": ",".join(sorted(bad_forms)),
            }
        )
        for r in bench["rows"]:
            rows.append(
                {"model": bench["model"], "device_name": _device_label(r.get("device"), env)}
                | {k: r.get(k) for k in LATENCY_FIELDS}
                | {"main_device": r.get("device") == main, "equivalent": r.get("form") not in bad_forms}
            )
    rows_df = pd.DataFrame(rows, columns=["model", "device_name", *LATENCY_FIELDS, "main_device", "equivalent"])
    for col in ("batch_size", "latency_ms_p50", "latency_ms_p99", "throughput_ips"):
        rows_df[col] = pd.to_numeric(rows_df[col], errors="coerce")
    cols = ["model", "timm_name", "params", "gmacs", "img_size", "device", "excluded_forms"]
    return rows_df, pd.DataFrame(models, columns=cols)


# --------------------------------------------------------------------------------------------------- tables
def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


def _yn(flag: Any) -> str:
    return "n/a" if flag is None or (isinstance(flag, float) and math.isnan(flag)) else ("yes" if flag else "no")


def _variant_order(variants: Any, baseline: str) -> list[str]:
    return sorted(set(variants), key=lambda v: (v != baseline, v))


def accuracy_table(runs: pd.DataFrame, conf: float = 0.95, baseline: str = "baseline") -> pd.DataFrame:
    """Top-1/top-5 mean, std and CI over the seeds that did not diverge; diverged seeds get their own columns."""
    rows = []
    for model in sorted(runs["model"].unique()):
        sub = runs[runs["model"] == model]
        for variant in _variant_order(sub["variant"], baseline):
            grp = sub[sub["variant"] == variant]
            ok, div = _ok(grp), grp[grp["status"] == "diverged"]
            row = {"model": model, "variant": variant, "axis": grp["axis"].iloc[0], "n_runs": len(grp)}
            row |= {"n_ok": len(ok), "n_diverged": len(div), "diverged_seeds": " ".join(str(s) for s in div["seed"])}
            for metric in ("top1", "top5"):
                st = mean_ci(ok[metric], conf)
                row |= {f"{metric}_{k}": st[k] for k in ("mean", "std", "ci_lo", "ci_hi")}
            row["status"] = "ok" if len(ok) == len(grp) else ("diverged" if len(ok) == 0 else "partly diverged")
            rows.append(row)
    return pd.DataFrame(rows)


def gains_table(
    runs: pd.DataFrame, baseline: str = "baseline", conf: float = 0.95, searched: dict[str, int] | None = None
) -> pd.DataFrame:
    """Top-1 gain of each variant over its model's baseline, with a Welch CI and a significance flag.

    ``significant_corrected`` repeats the test at a Bonferroni-corrected level over the model's variants,
    because picking the best of many variants inflates the best gain even when nothing works. After a halving
    search, ``searched`` gives each model's number of candidate variants: the finalists were picked from all of
    them, so the correction counts them all, not only the few that reached the full budget.
    """
    rows = []
    for model in sorted(runs["model"].unique()):
        sub = runs[runs["model"] == model]
        base = _ok(sub[sub["variant"] == baseline])["top1"]
        variants = [v for v in _variant_order(sub["variant"], baseline) if v != baseline]
        k = max(len(variants), (searched or {}).get(model, 0), 1)
        for variant in variants:
            grp = sub[sub["variant"] == variant]
            ok = _ok(grp)
            g = welch_gain(ok["top1"], base, conf)
            gc = welch_gain(ok["top1"], base, 1 - (1 - conf) / k)
            if len(base) == 0:
                note = f"no successful '{baseline}' run to compare with"
            elif len(ok) == 0:
                note = "all runs diverged"
            elif g["significant"] is None:
                note = "fewer than 2 seeds on a side: no CI, noise unknown"
            else:
                note = ""
            rows.append(
                {"model": model, "variant": variant, "axis": grp["axis"].iloc[0], "n": g["n"]}
                | {"n_baseline": g["n_baseline"], "n_diverged": int((grp["status"] == "diverged").sum())}
                | {"baseline_top1": mean_ci(base)["mean"], "top1_mean": mean_ci(ok["top1"])["mean"]}
                | {"gain": g["gain"], "gain_ci_lo": g["ci_lo"], "gain_ci_hi": g["ci_hi"], "welch_df": g["df"]}
                | {"significant": _yn(g["significant"]), "significant_corrected": _yn(gc["significant"])}
                | {"n_compared": max(len(variants), (searched or {}).get(model, 0)), "note": note}
            )
    cols = ["model", "variant", "axis", "n", "n_baseline", "n_diverged", "baseline_top1", "top1_mean", "gain"]
    cols += ["gain_ci_lo", "gain_ci_hi", "welch_df", "significant", "significant_corrected", "n_compared", "note"]
    return pd.DataFrame(rows, columns=cols)


def _best(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    cols = keys + ["best_variant"] + [c for c in df.columns if c not in ("model", "variant", "note", *keys)]
    rows = []
    for key, grp in df.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        usable = grp[grp["gain"].notna()]
        if usable.empty:
            rows.append(dict(zip(keys, key, strict=True)) | {"best_variant": "n/a"})
            continue
        top = usable.sort_values(["gain", "variant"], ascending=[False, True]).iloc[0]
        rows.append(top.drop(["variant", "note"]).to_dict() | {"best_variant": top["variant"]})
    return pd.DataFrame(rows, columns=cols)


def best_tables(gains: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best variant (highest mean gain) per model, and per model x axis."""
    return _best(gains, ["model"]), _best(gains, ["model", "axis"])


def _hours_unit(device_type: Any) -> str:
    return {"cuda": "GPU-hours", "cpu": "CPU-hours"}.get(str(device_type), f"{device_type}-hours")


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run with its status, epochs and compute; diverged runs keep their row (accuracy shown as status)."""
    df = runs.copy()
    df["hours_unit"] = df["device_type"].map(_hours_unit)
    df["diverged_at"] = [
        f"epoch {d.get('epoch')} step {d.get('step')}" if isinstance(d, dict) else "" for d in df["diverged_at"]
    ]
    return df.drop(columns=["params"]).sort_values(["model", "variant", "seed"], kind="stable")


def compute_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Epochs and device-hours per model and in total, split by device type (GPU-hours vs CPU-hours)."""
    df = runs.assign(hours_unit=runs["device_type"].map(_hours_unit))
    rows = []
    for model_key, grp in [*df.groupby(["model", "hours_unit"], sort=True), *df.groupby(["hours_unit"], sort=True)]:
        model, unit = model_key if len(model_key) == 2 else ("ALL", model_key[0])
        rows.append(
            {"model": model, "hours_unit": unit, "runs": len(grp), "runs_ok": int((grp["status"] == "ok").sum())}
            | {"runs_diverged": int((grp["status"] == "diverged").sum())}
            | {"epochs_completed": grp["epochs_completed"].sum(), "device_hours": grp["device_hours"].sum()}
        )
    cols = ["model", "hours_unit", "runs", "runs_ok", "runs_diverged", "epochs_completed", "device_hours"]
    return pd.DataFrame(rows, columns=cols)


def latency_table(bench: pd.DataFrame) -> pd.DataFrame:
    """Latency p50/p99 and throughput per model x form x precision x memory format x batch, any status."""
    cols = ["model", "device_name", "form", "engine", "precision", "channels_last", "batch_size", "status"]
    cols += ["latency_ms_p50", "latency_ms_p99", "throughput_ips", "main_device", "equivalent"]
    keys = ["model", "form", "engine", "precision", "channels_last", "batch_size"]
    return bench[cols].sort_values(keys, kind="stable", key=lambda s: s.astype(str) if s.dtype == object else s)


def _usable(bench: pd.DataFrame, model: str) -> pd.DataFrame:
    """Rows that may back a speed claim: ok, on the benchmark's main device, and numerically equivalent."""
    b = bench[(bench["model"] == model) & (bench["status"] == "ok")]
    return b[b["main_device"].astype(bool) & b["equivalent"].astype(bool)]


def _config(row: pd.Series) -> str:
    return f"{row['form']}, {row['precision']}{', channels_last' if row['channels_last'] else ''}"


def models_table(
    acc: pd.DataFrame, best: pd.DataFrame, bench: pd.DataFrame, bench_models: pd.DataFrame, baseline: str
) -> pd.DataFrame:
    """One row per model: size, accuracy (baseline and best), batch-1 latency, peak throughput, Pareto flags."""
    rows = []
    for model in sorted(set(acc["model"]) | set(bench_models["model"])):
        a = acc[(acc["model"] == model) & acc["top1_mean"].notna()]
        info = bench_models[bench_models["model"] == model]
        info = info.iloc[0].to_dict() if len(info) else {}
        base = a[a["variant"] == baseline]["top1_mean"]
        top = a.sort_values(["top1_mean", "variant"], ascending=[False, True]).head(1)
        row = {"model": model, "timm_name": info.get("timm_name"), "device": info.get("device", "n/a")}
        params = info.get("params")
        row |= {"params_M": float(params) / 1e6 if params is not None else math.nan, "gmacs": info.get("gmacs")}
        row |= {"baseline_top1": base.iloc[0] if len(base) else math.nan}
        row |= {"best_variant": top["variant"].iloc[0] if len(top) else "n/a"}
        row |= {"best_top1": top["top1_mean"].iloc[0] if len(top) else math.nan}
        u = _usable(bench, model)
        b1 = u[u["batch_size"] == 1].dropna(subset=["latency_ms_p50"])
        if len(b1):
            r = b1.loc[b1["latency_ms_p50"].idxmin()]
            row |= {"b1_p50_ms": r["latency_ms_p50"], "b1_p99_ms": r["latency_ms_p99"], "b1_config": _config(r)}
        thr = u.dropna(subset=["throughput_ips"])
        if len(thr):
            r = thr.loc[thr["throughput_ips"].idxmax()]
            row |= {"max_throughput_ips": r["throughput_ips"], "max_throughput_batch": r["batch_size"]}
            row |= {"max_throughput_config": _config(r)}
        row["excluded_forms"] = info.get("excluded_forms", "")
        rows.append(row)
    cols = ["model", "timm_name", "device", "params_M", "gmacs", "baseline_top1", "best_variant", "best_top1"]
    cols += ["b1_p50_ms", "b1_p99_ms", "b1_config", "max_throughput_ips", "max_throughput_batch"]
    cols += ["max_throughput_config", "excluded_forms"]
    df = pd.DataFrame(rows, columns=cols)
    df["pareto_latency"] = [_yn(m) for m in pareto_mask(df["b1_p50_ms"], df["best_top1"])]
    df["pareto_throughput"] = [_yn(m) for m in pareto_mask(df["max_throughput_ips"], df["best_top1"], False)]
    return df


def _num(x: Any, spec: str = ".2f") -> str:
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return format(f, spec) if math.isfinite(f) else "n/a"


def _gain_claims(best: pd.DataFrame, runs: pd.DataFrame, lo: float, hi: float) -> list[dict]:
    rows = []
    for _, b in best.iterrows():
        devices = ", ".join(sorted({str(d) for d in runs[runs["model"] == b["model"]]["device"].dropna()})) or "n/a"
        row = {"claim_id": "a", "claim": f"tuning alone gains {lo:g} to {hi:g} top-1 points", "model": b["model"]}
        row["device"] = f"training: {devices}"
        if b["best_variant"] == "n/a" or pd.isna(b.get("gain")):
            rows.append(row | {"measured": "no comparable variant", "in_range": "n/a", "beyond_seed_noise": "n/a"})
            rows[-1] |= {"holds": "n/a", "note": "needs successful baseline and variant runs"}
            continue
        g, sig = float(b["gain"]), b["significant"]
        ci = f"95% CI [{_num(b['gain_ci_lo'])}, {_num(b['gain_ci_hi'])}]" if sig != "n/a" else "CI n/a"
        measured = f"best {b['best_variant']} ({b['axis']}): {g:+.2f} pts, {ci}, n={b['n']} vs {b['n_baseline']}"
        in_range = lo <= g <= hi
        beyond = "n/a" if sig == "n/a" else _yn(float(b["gain_ci_lo"]) > 0)
        if beyond == "n/a":
            note = "one seed on a side: seed noise unknown, so the gain cannot be called real"
        elif beyond == "no":
            note = "the CI includes 0: the gain is within seed-to-seed noise"
        elif b["significant_corrected"] != "yes":
            note = f"not significant after Bonferroni correction over {b['n_compared']} variants (best-of-many)"
        else:
            note = ""
        holds = _yn(in_range and beyond == "yes")
        row |= {"measured": measured, "in_range": _yn(in_range), "beyond_seed_noise": beyond, "holds": holds}
        rows.append(row | {"note": note})
    return rows


def claims_table(
    best: pd.DataFrame, models: pd.DataFrame, bench: pd.DataFrame, runs: pd.DataFrame, rep: dict
) -> pd.DataFrame:
    """Each headline claim next to what this run measured, with a yes/no verdict and the device named."""
    lo, hi = rep["gain_range"]
    rows = _gain_claims(best, runs, lo, hi)
    for model in rep["fast_models"]:
        m = models[models["model"] == model]
        m = m.iloc[0] if len(m) else pd.Series({"device": "n/a"})
        device = m.get("device", "n/a")
        base = {"model": model, "device": f"benchmark: {device}", "in_range": "", "beyond_seed_noise": "n/a (timing)"}
        p50 = m.get("b1_p50_ms", math.nan)
        row = base | {"claim_id": "b", "claim": f"batch-1 latency under {rep['latency_ms']:g} ms"}
        if pd.isna(p50):
            rows.append(row | {"measured": "no successful batch-1 measurement", "holds": "n/a", "note": "not measured"})
        else:
            measured = f"p50 {p50:.2f} ms (p99 {_num(m['b1_p99_ms'])} ms; {m['b1_config']}, batch 1)"
            note = "best p50 over forms/precisions on the benchmark device"
            rows.append(row | {"measured": measured, "holds": _yn(p50 < rep["latency_ms"]), "note": note})
        thr = m.get("max_throughput_ips", math.nan)
        row = base | {"claim_id": "c", "claim": f"throughput above {rep['throughput_ips']:g} images/s"}
        if pd.isna(thr):
            rows.append(row | {"measured": "no successful measurement", "holds": "n/a", "note": "not measured"})
        else:
            measured = f"{thr:.0f} images/s at batch {int(m['max_throughput_batch'])} ({m['max_throughput_config']})"
            note = "best batch size on the benchmark device"
            rows.append(row | {"measured": measured, "holds": _yn(thr > rep["throughput_ips"]), "note": note})
    cols = ["claim_id", "model", "claim", "measured", "holds", "in_range", "beyond_seed_noise", "device", "note"]
    return pd.DataFrame(rows, columns=cols)


def _halving_claims(claims: pd.DataFrame, summaries: list[dict], rep: dict) -> pd.DataFrame:
    """A halving search that carried no variant to the full budget leaves no gain to test: say so per model."""
    have = set(claims.loc[claims["claim_id"] == "a", "model"])
    lo, hi = rep["gain_range"]
    rows = []
    for s in summaries:
        if s["model"] in have:
            continue
        last = s["rungs"][-1] if s["rungs"] else {}
        best = next((v for v in last.get("ranking", []) if v != "baseline"), "n/a")
        rows.append(
            {"claim_id": "a", "model": s["model"], "claim": f"tuning alone gains {lo:g} to {hi:g} top-1 points"}
            | {"measured": f"halving kept no variant to the full budget (winner: {s['winner']})", "holds": "n/a"}
            | {"in_range": "n/a", "beyond_seed_noise": "n/a", "device": "training: see runs"}
            | {"note": f"every variant was eliminated by rung {last.get('rung')} (best then: {best}); no gain measured"}
        )
    if not rows:
        return claims
    out = pd.concat([claims, pd.DataFrame(rows, columns=claims.columns)], ignore_index=True)
    return out.sort_values(["claim_id", "model"], kind="stable", ignore_index=True)


# -------------------------------------------------------------------------------------------------- writing
_SPECS = {"device_hours": ".4g", "welch_df": ".1f", "params_M": ".2f", "gmacs": ".3f", "throughput_ips": ".1f"}
_SPECS |= {k: ".0f" for k in ("batch_size", "max_throughput_batch", "epochs", "epochs_completed", "best_epoch")}
_SPECS |= {k: ".0f" for k in ("max_throughput_ips", "num_devices", "seed", "train_seconds")}
_SPECS |= {k: ".4g" for k in ("halving_device_hours", "grid_device_hours")}
_SPECS |= {k: ".0f" for k in ("halving_epochs", "grid_epochs")}
_STATUS_CELLS = {"runs": ("top1", "top5"), "latency": ("latency_ms_p50", "latency_ms_p99", "throughput_ips")}


def display_frame(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: 2 decimals, "n/a" for missing, and a failed run's status ("diverged", "oom") in its
    number cells, so that nothing is ever shown as a zero it never measured."""
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_float_dtype(s):
            out[col] = [_num(v, _SPECS.get(col, ".2f")) for v in s]
        else:
            out[col] = ["" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v) for v in s]
    for col in _STATUS_CELLS.get(name, ()):
        if col in out.columns:
            bad = df["status"] != "ok"
            out.loc[bad, col] = df.loc[bad, "status"].astype(str)
    return out.reset_index(drop=True)


def _tab(shown: pd.DataFrame, fmt: str) -> str:
    from tabulate import tabulate

    if shown.empty and fmt != "latex_booktabs":
        return "<p>(no rows)</p>" if fmt == "html" else "(no rows)"
    return tabulate(shown, headers="keys", tablefmt=fmt, showindex=False, disable_numparse=True)


def write_table(df: pd.DataFrame, name: str, out_dir: Path) -> dict[str, str]:
    """Write one table as CSV (raw numbers), Markdown, LaTeX and HTML (formatted), atomically."""
    shown = display_frame(name, df)
    paths = {fmt: out_dir / f"{name}.{fmt}" for fmt in TABLE_FORMATS}
    atomic_write_text(paths["csv"], df.to_csv(index=False))
    atomic_write_text(paths["md"], f"## {name}\n\n{_tab(shown, 'github')}\n")
    atomic_write_text(paths["tex"], _tab(shown, "latex_booktabs") + "\n")
    atomic_write_text(paths["html"], _HTML.format(title=name, body=_tab(shown, "html")))
    return {fmt: str(p) for fmt, p in paths.items()}


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; font-size: 13px; margin: 8px; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 2px 6px; text-align: left; white-space: nowrap; }}
th {{ background: #eee; }}
</style></head><body><h3>{title}</h3>
{body}
</body></html>
"""


def write_markdown_report(tables: dict[str, pd.DataFrame], figures: dict[str, str], path: Path) -> str:
    """One Markdown page with every table and figure, for reading the study outside Snakemake's report."""
    parts = ["# lcnn study report\n"]
    for name, df in tables.items():
        shown = display_frame(name, df)
        parts.append(f"## {name}\n\n{_tab(shown, 'github')}\n")
    parts += [f"![{name}]({Path(p).name})\n" for name, p in figures.items()]
    atomic_write_text(path, "\n".join(parts))
    return str(path)


# ---------------------------------------------------------------------------------------------------- run
def _check_report_cfg(rep: dict) -> dict:
    try:
        lo, hi = (float(x) for x in rep["gain_range"])
        out = {"gain_range": [lo, hi], "fast_models": list(rep.get("fast_models") or [])}
        out |= {"latency_ms": float(rep["latency_ms"]), "throughput_ips": float(rep["throughput_ips"])}
    except (KeyError, TypeError, ValueError) as err:
        raise LcnnError(f"report config needs gain_range [lo, hi], latency_ms and throughput_ips ({err!r})") from None
    if lo > hi:
        raise LcnnError(f"report.gain_range {rep['gain_range']} is reversed; write it as [low, high]")
    return rep | out


def run(cfg: dict) -> dict:
    """Build every table and figure under ``cfg['out_dir']`` and return the summary index."""
    from lcnn import figures, search

    rep = _check_report_cfg(cfg.get("report") or {})
    if not cfg.get("results"):
        raise LcnnError("no results files given; train at least one model x variant first")
    baseline = cfg.get("baseline_variant") or "baseline"
    conf = float(cfg.get("confidence", 0.95))
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    runs, _ = load_runs(cfg["results"])
    if runs.empty:
        raise LcnnError("the results files hold no runs; rebuild them from the runs' metrics.json (snakemake results)")
    hist = load_histories(cfg.get("histories") or [])
    tol = float(rep.get("equivalence_tol", EQUIVALENCE_TOL))
    bench_rows, bench_models = load_benchmarks(cfg.get("benchmarks") or [], tol)

    # halving vs grid: in grid mode the results are the grid; in halving mode a finished grid may be given too
    summaries = [read_json(p) for p in cfg.get("search") or []]
    halving = cfg.get("search_mode") == "halving"
    grid_paths = (cfg.get("grid_results") or []) if halving else cfg["results"]
    searched = {s["model"]: len([v for v in s["candidates"] if v != baseline]) for s in summaries} if halving else None

    acc = accuracy_table(runs, conf, baseline)
    gains = gains_table(runs, baseline, conf, searched)
    best, best_axis = best_tables(gains)
    models = models_table(acc, best, bench_rows, bench_models, baseline)
    tables = {
        "claims": _halving_claims(claims_table(best, models, bench_rows, runs, rep), summaries, rep),
        "accuracy": acc,
        "gains": gains,
        "best_variants": best,
        "best_per_axis": best_axis,
        "runs": runs_table(runs),
        "compute": compute_table(runs),
        "latency": latency_table(bench_rows),
        "models": models,
        "halving": search.halving_table(summaries, [read_json(p) for p in grid_paths] if summaries else []),
    }
    written: dict[str, Any] = {"tables": {}, "figures": {}}
    for name in TABLES:
        written["tables"][name] = write_table(tables[name], name, out_dir)
    written["figures"] = {
        "pareto": figures.pareto(models, out_dir / "pareto.png"),
        "gain_heatmap": figures.gain_heatmap(best_axis, out_dir / "gain_heatmap.png"),
        "learning_curves": figures.learning_curves(hist, baseline, out_dir / "learning_curves.png"),
        "throughput_vs_batch": figures.throughput_vs_batch(bench_rows, out_dir / "throughput_vs_batch.png"),
    }
    written["report_md"] = write_markdown_report(tables, written["figures"], out_dir / "report.md")
    summary = {
        "out_dir": str(out_dir),
        **written,
        "inputs": {k: len(cfg.get(k) or []) for k in ("results", "histories", "benchmarks")},
        "runs": {"total": len(runs), "ok": int((runs["status"] == "ok").sum())}
        | {"diverged": int((runs["status"] == "diverged").sum())},
        "baseline_variant": baseline,
        "confidence": conf,
        "report_config": rep,
        "claims": tables["claims"].to_dict(orient="records"),
        "search_mode": cfg.get("search_mode", "grid"),
        "halving": json.loads(tables["halving"].to_json(orient="records")),
        "env": environment(),  # where the report was built (its SLURM job id on a cluster)
    }
    atomic_write_json(out_dir / "summary.json", summary)
    return summary


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lcnn.report", description=__doc__.splitlines()[0])
    p.add_argument(
        "--config-json",
        required=True,
        help='{"report": {...}, "baseline_variant": "baseline"} as a JSON file, or inline (starting with "{")',
    )
    p.add_argument("--results", nargs="+", required=True, help="results/{model}/{variant}.json files")
    p.add_argument("--histories", nargs="*", default=[], help="runs/{model}/{variant}/seed{seed}/history.csv files")
    p.add_argument("--benchmarks", nargs="*", default=[], help="benchmarks/{model}.json files")
    p.add_argument("--search", nargs="*", default=[], help="search/{model}/halving.json of a halving search")
    p.add_argument("--grid-results", nargs="*", default=[], help="halving mode: grid results to compare with")
    p.add_argument("--out-dir", default="results/report", help="where tables, figures and summary.json go")
    return p


def _config_json(arg: str) -> dict:
    """``--config-json``: inline JSON (how the Snakemake rule passes it) or a file, holding a ``report`` object."""
    conf = json_arg(arg)
    if not isinstance(conf.get("report"), dict):
        raise LcnnError("--config-json must be a JSON object with a 'report' object (the config's report section)")
    return conf


@cli
def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point: parse paths, then :func:`run`."""
    args = _parser().parse_args(argv)
    cfg = _config_json(args.config_json)
    cfg |= {"results": args.results, "histories": args.histories, "benchmarks": args.benchmarks}
    cfg |= {"search": [p for p in args.search if p], "grid_results": [p for p in args.grid_results if p]}
    summary = run(cfg | {"out_dir": args.out_dir})
    n = sum(len(v) for v in summary["tables"].values()) + len(summary["figures"])
    print(f"lcnn report: wrote {n + 2} files to {args.out_dir} (index: {args.out_dir}/summary.json)")
    return summary


if __name__ == "__main__":
    main()

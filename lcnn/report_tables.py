"""The study's tables, each a DataFrame with raw numbers: accuracy, gains, best variants, runs, compute, latency.

Seed-to-seed noise is shown next to every gain: a gain whose confidence interval includes 0 is reported as not
significant, whatever its size, and runs that diverged are counted in their own column instead of being averaged
in as zeros. The statistics come from :mod:`lcnn.stats`.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lcnn.stats import PERCENT, PERCENT_GAIN, bonferroni, mean_ci, pareto_mask, welch_gain


def yn(flag: Any) -> str:
    """A table cell for a verdict: yes, no, or n/a when it could not be decided."""
    return "n/a" if flag is None or (isinstance(flag, float) and math.isnan(flag)) else ("yes" if flag else "no")


def num(x: Any, spec: str = ".2f") -> str:
    """A number as people read it, "n/a" when there is none."""
    try:
        f = float(x)
    except (TypeError, ValueError):
        return "n/a"
    return format(f, spec) if math.isfinite(f) else "n/a"


def _ok(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"]


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
                st = mean_ci(ok[metric], conf, PERCENT)
                row |= {f"{metric}_{k}": st[k] for k in ("mean", "std", "ci_lo", "ci_hi")}
            row["status"] = "ok" if len(ok) == len(grp) else ("diverged" if len(ok) == 0 else "partly diverged")
            sizes = pd.to_numeric(grp.get("img_size", pd.Series(dtype=float)), errors="coerce").dropna()
            row["img_size"] = int(sizes.iloc[0]) if len(sizes) else math.nan  # the training resolution
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
        base_runs = sub[sub["variant"] == baseline]
        base = _ok(base_runs)["top1"]
        variants = [v for v in _variant_order(sub["variant"], baseline) if v != baseline]
        k = max(len(variants), (searched or {}).get(model, 0), 1)
        for variant in variants:
            grp = sub[sub["variant"] == variant]
            ok = _ok(grp)
            g = welch_gain(ok["top1"], base, conf, PERCENT_GAIN)
            gc = welch_gain(ok["top1"], base, bonferroni(conf, k), PERCENT_GAIN)
            if len(base) == 0:
                note = f"no successful '{baseline}' run to compare with"
            elif len(ok) == 0:
                note = "all runs diverged"
            elif g["significant"] is None:
                note = f"no CI: seed noise {g['noise']}"
            else:
                note = ""
            rows.append(
                {"model": model, "variant": variant, "axis": grp["axis"].iloc[0], "n": g["n"], "n_runs": len(grp)}
                | {"n_baseline": g["n_baseline"], "n_baseline_runs": len(base_runs)}
                | {"n_diverged": int((grp["status"] == "diverged").sum())}
                | {"baseline_top1": mean_ci(base)["mean"], "top1_mean": mean_ci(ok["top1"])["mean"]}
                | {"gain": g["gain"], "gain_ci_lo": g["ci_lo"], "gain_ci_hi": g["ci_hi"], "welch_df": g["df"]}
                | {"significant": yn(g["significant"]), "significant_corrected": yn(gc["significant"])}
                | {"gain_ci_lo_corrected": gc["ci_lo"], "gain_ci_hi_corrected": gc["ci_hi"]}
                | {"n_compared": max(len(variants), (searched or {}).get(model, 0)), "note": note}
            )
    cols = ["model", "variant", "axis", "n", "n_runs", "n_baseline", "n_baseline_runs", "n_diverged"]
    cols += ["baseline_top1", "top1_mean"]
    cols += ["gain"]
    cols += ["gain_ci_lo", "gain_ci_hi", "welch_df", "significant", "significant_corrected"]
    cols += ["gain_ci_lo_corrected", "gain_ci_hi_corrected", "n_compared", "note"]
    return pd.DataFrame(rows, columns=cols)


def _lost_seeds(row: Any) -> str:
    """E.g. "adamw (1/3 seeds diverged; +3.50 on the rest)": a variant left out of the ranking, and why."""
    lost = f"{int(row['n_runs'] - row['n'])}/{int(row['n_runs'])} seeds diverged"
    return f"{row['variant']} ({lost}" + (f"; {row['gain']:+.2f} on the rest)" if pd.notna(row["gain"]) else ")")


def best_gain_interval(ranked: pd.DataFrame) -> tuple[float, float]:
    """Where the best true gain among ``ranked`` variants lies, from their Bonferroni-corrected intervals.

    The corrected intervals hold every variant's true gain at once (at the report's confidence), so the largest
    true gain is at least the largest lower bound and at most the largest upper bound, whichever variant it is:
    unlike the winner's own interval, this is not inflated by having picked the winner on the same seeds. A
    variant without an interval (one seed, no spread) could gain anything: the upper end is then unbounded.
    """
    lo, hi = ranked["gain_ci_lo_corrected"], ranked["gain_ci_hi_corrected"]
    upper = math.inf if hi.isna().any() else float(hi.max())
    return (float(lo.max()) if lo.notna().any() else math.nan), upper


def _best(df: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The variant with the highest mean gain per group, ranked among the variants whose every seed finished.

    A variant that lost seeds (diverged) is averaged over the seeds that survived, which flatters it: the seeds
    that blew up are often the ones that would have scored low. It is ranked only where no variant of its group
    kept every seed, and ``excluded_variants`` names the variants left out of the ranking.
    """
    cols = keys + ["best_variant"] + [c for c in df.columns if c not in ("model", "variant", "note", *keys)]
    cols += ["best_gain_lo", "best_gain_hi", "excluded_variants"]
    rows = []
    for key, grp in df.groupby(keys, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        usable = grp[grp["gain"].notna()]
        lost_all = grp[(grp["n"] == 0) & (grp["n_runs"] > 0)]  # every seed diverged: no gain, still not ranked
        if usable.empty:
            left_out = "; ".join(_lost_seeds(r) for _, r in lost_all.sort_values("variant").iterrows())
            rows.append(dict(zip(keys, key, strict=True)) | {"best_variant": "n/a", "excluded_variants": left_out})
            continue
        complete = usable["n"] == usable["n_runs"]
        ranked, excluded = (usable[complete], usable[~complete]) if complete.any() else (usable, usable.iloc[:0])
        top = ranked.sort_values(["gain", "variant"], ascending=[False, True]).iloc[0]
        excluded = pd.concat([excluded, lost_all]).sort_values("variant")
        left_out = "; ".join(_lost_seeds(r) for _, r in excluded.iterrows())
        lo, hi = best_gain_interval(ranked)
        rows.append(
            top.drop(["variant", "note"]).to_dict()
            | {"best_variant": top["variant"], "best_gain_lo": lo, "best_gain_hi": hi, "excluded_variants": left_out}
        )
    return pd.DataFrame(rows, columns=cols)


def best_tables(gains: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Best variant (highest mean gain among those that kept every seed) per model, and per model x axis."""
    return _best(gains, ["model"]), _best(gains, ["model", "axis"])


def _hours_unit(device_type: Any) -> str:
    return {"cuda": "GPU-hours", "cpu": "CPU-hours"}.get(str(device_type), f"{device_type}-hours")


def runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run with its status, epochs and compute; diverged runs keep their row (accuracy shown as status)."""
    df = runs.copy()
    df["hours_unit"] = df["device_type"].map(_hours_unit)
    df["diverged_at"] = [
        (d.get("reason") or f"epoch {d.get('epoch')} step {d.get('step')}") if isinstance(d, dict) else ""
        for d in df["diverged_at"]
    ]
    return df.drop(columns=["params"]).sort_values(["model", "variant", "seed"], kind="stable")


def compute_table(runs: pd.DataFrame, searches: list[dict] | None = None) -> pd.DataFrame:
    """Epochs and device-hours per model and in total, split by device type (GPU-hours vs CPU-hours), and the share
    of training time the step waited for the loader (over the runs that measured it, weighted by their training
    time): a loader-bound model is paying device-hours for an idle GPU.

    ``searches`` (the models' search summaries) adds what each search spent, as ``search_epochs`` and
    ``search_device_hours``: after a halving search the runs are the finalists only, and the search's cost includes
    the eliminated runs; after an Optuna search, the runs are the named variants' grid and the search's cost is its
    trials'. A search summary that did not record its device-hours leaves them empty."""
    df = runs.assign(hours_unit=runs["device_type"].map(_hours_unit))
    spent: dict[tuple[str, str], tuple] = {}
    for s in searches or []:
        c = s.get("compute") or {}
        spent[s["model"], _hours_unit(c.get("device_type"))] = (c.get("epochs"), c.get("device_hours"))
    # a search whose cost is unknown (not recorded, or over several device types) leaves every total unknown
    known = all(None not in v and u in ("GPU-hours", "CPU-hours") for (_, u), v in spent.items())
    for unit in {u for _, u in spent}:
        cols = list(zip(*(v for (m, u), v in spent.items() if u == unit)))
        spent["ALL", unit] = tuple(sum(col) if known else None for col in cols)
    rows = []
    for model_key, grp in [*df.groupby(["model", "hours_unit"], sort=True), *df.groupby(["hours_unit"], sort=True)]:
        model, unit = model_key if len(model_key) == 2 else ("ALL", model_key[0])
        rows.append(
            {"model": model, "hours_unit": unit, "runs": len(grp), "runs_ok": int((grp["status"] == "ok").sum())}
            | {"runs_diverged": int((grp["status"] == "diverged").sum())}
            | {"epochs_completed": grp["epochs_completed"].sum(), "device_hours": grp["device_hours"].sum()}
            | {"loader_wait_pct": _loader_wait_pct(grp)}
        )
        if searches:
            rows[-1] |= dict(zip(("search_epochs", "search_device_hours"), spent.get((model, unit), (None, None))))
    cols = ["model", "hours_unit", "runs", "runs_ok", "runs_diverged", "epochs_completed", "device_hours"]
    cols += ["loader_wait_pct"] + (["search_epochs", "search_device_hours"] if searches else [])
    return pd.DataFrame(rows, columns=cols)


def _loader_wait_pct(runs: pd.DataFrame) -> float:
    measured = runs[runs["data_wait_fraction"].notna() & (runs["train_seconds"] > 0)]
    seconds = measured["train_seconds"].sum()
    return 100 * (measured["data_wait_fraction"] * measured["train_seconds"]).sum() / seconds if seconds else math.nan


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
    """One row per model: size, accuracy (baseline and best), batch-1 latency, peak throughput, Pareto flags, and
    the device class and resolution the benchmark ran at (a claim compares only like with like)."""
    rows = []
    for model in sorted(set(acc["model"]) | set(bench_models["model"])):
        a = acc[(acc["model"] == model) & acc["top1_mean"].notna()]
        info = bench_models[bench_models["model"] == model]
        info = info.iloc[0].to_dict() if len(info) else {}
        base = a[a["variant"] == baseline]["top1_mean"]
        whole = a[a["n_ok"] == a["n_runs"]]  # as in _best: a variant that lost seeds ranks only if all did
        ranked = (whole if len(whole) else a).sort_values(["top1_mean", "variant"], ascending=[False, True])
        size = info.get("img_size")
        # the accuracy a Pareto point pairs with the benchmark's latency: trained at the resolution it was timed at,
        # where any variant was (a study trained at one size and timed at another on purpose keeps its pairing)
        at_size = ranked["img_size"] == size if size and "img_size" in ranked else None
        same = at_size | ranked["img_size"].isna() if at_size is not None and at_size.any() else None
        top = (ranked[same] if same is not None else ranked).head(1)
        other = ranked.head(1) if same is not None and len(ranked) and not same.iloc[0] else None
        row = {"model": model, "timm_name": info.get("timm_name"), "device": info.get("device", "n/a")}
        row |= {"device_class": info.get("device_class", "n/a"), "bench_img_size": info.get("img_size")}
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
        notes = [info.get("benchmark_note") or ""]  # e.g. why it was not benchmarked
        if other is not None:
            o = other.iloc[0]
            notes.append(
                f"{o['variant']} ({o['top1_mean']:.2f}) trained at {int(o['img_size'])} px, not the benchmark's "
                f"{int(size)} px: left out of best_top1 and the Pareto front"
            )
        row["benchmark_note"] = "; ".join(filter(None, notes))
        rows.append(row)
    cols = ["model", "timm_name", "device", "device_class", "bench_img_size", "params_M", "gmacs", "baseline_top1"]
    cols += ["best_variant", "best_top1", "b1_p50_ms", "b1_p99_ms", "b1_config", "max_throughput_ips"]
    cols += ["max_throughput_batch", "max_throughput_config", "excluded_forms", "benchmark_note"]
    df = pd.DataFrame(rows, columns=cols)
    df["pareto_latency"] = [yn(m) for m in pareto_mask(df["b1_p50_ms"], df["best_top1"])]
    df["pareto_throughput"] = [yn(m) for m in pareto_mask(df["max_throughput_ips"], df["best_top1"], False)]
    return df

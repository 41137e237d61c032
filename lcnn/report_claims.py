"""The claims table: each headline claim of the study next to what this run measured, with its verdict.

A gain claim holds only when the gain is in the claimed range and beyond seed-to-seed noise, also after the
Bonferroni correction over the model's variants (the best of many gains is inflated), and only for a variant
whose every seed finished: one that lost seeds reads "unclear (1/3 diverged)". A latency or
throughput claim was made under conditions (``report.claim_img_size`` px on a ``report.claim_device`` such as
an L40S GPU): a benchmark at another resolution or on another device can say what it measured, but it can
neither make the claim hold nor refute it, so its verdict reads "not comparable (32 px, CPU)".
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd

from lcnn.report_tables import best_tables, num, yn

CLAIM_CLASSES = 1000  # the study trains on ImageNet-1K: a gain on fewer classes answers another question
CLAIM_COLUMNS = ["claim_id", "model", "claim", "measured", "holds", "in_range", "beyond_seed_noise", "device", "note"]


def claim_conditions(rep: dict) -> str:
    """The conditions a timing claim was made under, e.g. "224 px, L40S GPU"."""
    device = " ".join(filter(None, [rep["claim_device_name"], rep["claim_device"].upper()]))
    return f"{rep['claim_img_size']} px, {device}"


def incomparable(model_row: Any, rep: dict) -> str | None:
    """Why a benchmark cannot test a timing claim (e.g. "32 px, CPU"), or None when it ran under its conditions.

    The resolution and device class must match the claim's; when the claim names a device (``claim_device_name``,
    e.g. L40S), the benchmark's device name must contain it too, since another GPU says nothing about that one.
    """
    size = model_row.get("bench_img_size")
    size = None if size is None or pd.isna(size) else int(size)
    cls = str(model_row.get("device_class") or "n/a")
    where = f"{size} px" if size is not None else "unknown size"
    if size != rep["claim_img_size"] or cls != rep["claim_device"].upper():
        return f"{where}, {cls}"
    device = str(model_row.get("device") or "n/a").rsplit(" (", 1)[0]  # "NVIDIA L40S (cuda)" -> "NVIDIA L40S"
    name = rep["claim_device_name"]
    if name and name.lower() not in device.lower():
        return f"{where}, {device}"
    return None


def gain_claim(rep: dict) -> str:
    """Claim (a) in words, e.g. "tuning alone gains 1.5 to 3.5 top-1 points"."""
    low, high = rep["gain_range"]
    return f"tuning alone gains {low:g} to {high:g} top-1 points"


def _untested_gain(model: str, rep: dict, measured: str, note: str) -> dict:
    """Claim (a)'s row for a model with no gain to test: n/a, with what there is and why."""
    return {"claim_id": "a", "model": model, "claim": gain_claim(rep), "measured": measured, "holds": "n/a"} | {
        "in_range": "n/a",
        "beyond_seed_noise": "n/a",
        "device": "training: see runs",
        "note": note,
    }


def gain_incomparable(runs: pd.DataFrame, rep: dict) -> str | None:
    """Why a model's runs cannot test the gain claim (e.g. "32 px, 10 classes"), or None when they were trained at
    the claim's resolution on ImageNet-1K's 1000 classes (the published study's conditions)."""
    sizes = sorted({int(v) for v in pd.to_numeric(runs.get("img_size"), errors="coerce").dropna()})
    classes = sorted({int(v) for v in pd.to_numeric(runs.get("num_classes"), errors="coerce").dropna()})
    if sizes == [rep["claim_img_size"]] and classes == [CLAIM_CLASSES]:
        return None
    size = f"{'/'.join(map(str, sizes))} px" if sizes else "unknown size"
    return f"{size}, {'/'.join(map(str, classes)) or 'unknown number of'} classes"


def shown(value: float, thresholds: tuple[float, ...], digits: int, sign: str = "") -> str:
    """``value`` to ``digits`` decimals, or to as many more as it takes not to print a threshold it is judged
    against (4.996 ms under 5 ms reads 4.996, not 5.00); ``sign`` "+" prints a plus on a positive value."""
    if not math.isfinite(value):
        return "unbounded" if value > 0 else num(value)
    for d in range(digits, digits + 6):
        text = f"{value:{sign}.{d}f}"
        if all(value == t or float(text) != t for t in thresholds):
            return text
    return f"{value:{sign}.{digits + 6}f}"


def gain_verdict(lo: float, hi: float, low: float, high: float) -> str:
    """yes: the best true gain lies in [low, high]; no: it lies wholly outside; inconclusive: the interval
    [lo, hi] where it lies (:func:`lcnn.report_tables.best_gain_interval`) straddles an end of the range."""
    if math.isnan(lo):
        return "inconclusive"
    if low <= lo and hi <= high:
        return "yes"
    if hi < low or lo > high:
        return "no"
    return "inconclusive"


def _gain_claims(best: pd.DataFrame, runs: pd.DataFrame, rep: dict, conf: float = 0.95) -> list[dict]:
    low, high = rep["gain_range"]
    label = f"{100 * conf:g}%"
    rows = []
    for _, b in best.iterrows():
        mine = runs[runs["model"] == b["model"]]
        devices = ", ".join(sorted({str(d) for d in mine["device"].dropna()})) or "n/a"
        row = {"claim_id": "a", "claim": gain_claim(rep), "model": b["model"]}
        row["device"] = f"training: {devices}"
        if b["best_variant"] == "n/a" or pd.isna(b.get("gain")):
            rows.append(row | {"measured": "no comparable variant", "in_range": "n/a", "beyond_seed_noise": "n/a"})
            rows[-1] |= {"holds": "n/a", "note": "needs successful baseline and variant runs"}
            continue
        g, sig = float(b["gain"]), b["significant"]
        n, n_runs = int(b["n"]), int(b.get("n_runs", b["n"] + b.get("n_diverged", 0)))
        ci = f"{label} CI [{num(b['gain_ci_lo'])}, {num(b['gain_ci_hi'])}]" if sig != "n/a" else "CI n/a"
        seeds = f"n={n}" + (f" of {n_runs} ({n_runs - n} diverged)" if n < n_runs else "")
        ends = (low, high)
        measured = f"best {b['best_variant']} ({b['axis']}): {shown(g, ends, 2, '+')} pts, {ci}, {seeds} vs "
        measured += str(b["n_baseline"])
        lo, hi = float(b.get("best_gain_lo", math.nan)), float(b.get("best_gain_hi", math.nan))
        if not math.isnan(lo):
            measured += f"; best true gain in [{shown(lo, ends, 2)}, {shown(hi, ends, 2)}]"
        in_range = low <= g <= high
        beyond = "n/a" if sig == "n/a" else yn(float(b["gain_ci_lo"]) > 0)
        corrected = b["significant_corrected"] == "yes"
        if beyond == "n/a" and min(n, int(b["n_baseline"])) >= 2:  # two seeds a side, every one alike
            note = "no spread on a side: seed noise unmeasurable, so the gain cannot be called real"
        elif beyond == "n/a":
            note = "one seed on a side: seed noise unknown, so the gain cannot be called real"
        elif float(b["gain_ci_hi"]) < 0:  # the whole CI below 0: a real loss, not noise
            beyond = "no (a loss)"
            note = "the CI lies below 0: the best variant loses top-1 beyond seed-to-seed noise"
        elif beyond == "no":
            note = "the CI includes 0: the gain is within seed-to-seed noise"
        elif not corrected:  # the best of many variants: its uncorrected CI excludes 0 by chance too often
            note = f"not significant after Bonferroni correction over {b['n_compared']} variants (best-of-many)"
        else:
            note = ""
        holds = gain_verdict(lo, hi, low, high)
        notes = [note]
        notes.append(
            "no interval for the best true gain (seed noise unmeasured)"
            if math.isnan(lo)
            else f"judged on where the best true gain lies ({label} over all {b['n_compared']} variants at once, "
            "Bonferroni), not on the winner's own gain, which was picked on the same seeds and runs high"
        )
        if n < n_runs:  # its mean leaves out the seeds that blew up: the gain is not shown to be robust
            holds = f"unclear ({n_runs - n}/{n_runs} diverged)" if holds == "yes" else holds
            notes.append(f"{n_runs - n} of {n_runs} seeds of {b['best_variant']} diverged")
        n_base_runs = int(b.get("n_baseline_runs", b["n_baseline"]))
        if int(b["n_baseline"]) < n_base_runs:  # the reference itself is a mean over the seeds that survived
            lost = n_base_runs - int(b["n_baseline"])
            notes.append(f"{lost} of {n_base_runs} baseline seeds diverged: the baseline mean is over the rest")
        if b.get("excluded_variants"):
            notes.append(f"ranked without variants that lost seeds: {b['excluded_variants']}")
        trained = set(mine["variant"].dropna()) if "variant" in mine else set()
        not_tuning = ", ".join(sorted(set(rep.get("gain_claim_excludes") or []) & trained))
        if not_tuning:
            notes.append(f"not tuning, left out of this claim (report.gain_claim_excludes): {not_tuning}")
        why_not = gain_incomparable(mine, rep)
        if why_not:
            holds = f"not comparable ({why_not})"
            notes.insert(0, f"the claim is for {rep['claim_img_size']} px on ImageNet-1K ({CLAIM_CLASSES} classes); "
                         f"these runs trained at {why_not}, so they cannot test it")  # fmt: skip
        row |= {"measured": measured, "in_range": yn(in_range), "beyond_seed_noise": beyond, "holds": holds}
        rows.append(row | {"note": "; ".join(filter(None, notes))})
    return rows


def _timing_claim(row: dict, value: float, measured: str, passed: bool, why_not: str | None, rep: dict) -> dict:
    """One latency/throughput verdict: yes/no under the claim's conditions, "not comparable (...)" otherwise."""
    if pd.isna(value):
        return row | {"measured": measured, "holds": "n/a", "note": "not measured"}
    if why_not:
        note = f"the claim is for {claim_conditions(rep)}; this benchmark ran at {why_not}, so it cannot test it"
        return row | {"measured": measured, "holds": f"not comparable ({why_not})", "note": note}
    return row | {"measured": measured, "holds": yn(passed), "note": row["note"]}


def claims_table(
    gains: pd.DataFrame, models: pd.DataFrame, bench: pd.DataFrame, runs: pd.DataFrame, rep: dict, conf: float = 0.95
) -> pd.DataFrame:
    """Each headline claim next to what this run measured, with its verdict and the device named.

    The gain claim is about tuning: its best variant is ranked without ``report.gain_claim_excludes`` (pretrained
    weights, trained on all of ImageNet-1K, would win every model by tens of points and hide the tuning's gain);
    the other tables rank every variant."""
    excluded = gains["variant"].isin(rep["gain_claim_excludes"])
    best, _ = best_tables(gains[~excluded])
    rows = _gain_claims(best, runs, rep, conf)
    for model in sorted(set(gains.loc[excluded, "model"]) - set(best["model"])):  # nothing but non-tuning variants
        names = ", ".join(sorted(gains.loc[excluded & (gains["model"] == model), "variant"]))
        measured = f"no tuning variant: only {names} (report.gain_claim_excludes)"
        rows.append(_untested_gain(model, rep, measured, "the variants trained are not tuning; train a tuning variant "
                                   "to test the claim"))  # fmt: skip
    where = claim_conditions(rep)
    for model in rep["fast_models"]:
        m = models[models["model"] == model]
        m = m.iloc[0] if len(m) else pd.Series({"device": "n/a"})
        why_not = incomparable(m, rep)
        base = {"model": model, "device": f"benchmark: {m.get('device', 'n/a')}", "in_range": ""}
        base["beyond_seed_noise"] = "n/a (timing)"
        p50 = m.get("b1_p50_ms", math.nan)
        row = base | {"claim_id": "b", "claim": f"batch-1 latency under {rep['latency_ms']:g} ms ({where})"}
        row["note"] = "best p50 over forms/precisions on the benchmark device"
        measured = m.get("benchmark_note") or "no successful batch-1 measurement"
        if not pd.isna(p50):
            p99 = f"p99 {num(m['b1_p99_ms'])} ms; {m['b1_config']}, batch 1"
            measured = f"p50 {shown(p50, (rep['latency_ms'],), 2)} ms ({p99})"
        rows.append(_timing_claim(row, p50, measured, p50 < rep["latency_ms"], why_not, rep))
        thr = m.get("max_throughput_ips", math.nan)
        row = base | {"claim_id": "c", "claim": f"throughput above {rep['throughput_ips']:g} images/s ({where})"}
        row["note"] = "best batch size on the benchmark device"
        measured = m.get("benchmark_note") or "no successful measurement"
        if not pd.isna(thr):
            at = f"batch {int(m['max_throughput_batch'])} ({m['max_throughput_config']})"
            measured = f"{shown(thr, (rep['throughput_ips'],), 0)} images/s at {at}"
        rows.append(_timing_claim(row, thr, measured, thr > rep["throughput_ips"], why_not, rep))
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def halving_claims(claims: pd.DataFrame, summaries: list[dict], rep: dict) -> pd.DataFrame:
    """A halving search that carried no variant to the full budget leaves no gain to test: say so per model."""
    have = set(claims.loc[claims["claim_id"] == "a", "model"])
    rows = []
    for s in summaries:
        if s["model"] in have:
            continue
        last = s["rungs"][-1] if s["rungs"] else {}
        best = next((v for v in last.get("ranking", []) if v != "baseline"), "n/a")
        measured = f"halving kept no variant to the full budget (winner: {s['winner']})"
        note = f"every variant was eliminated by rung {last.get('rung')} (best then: {best}); no gain measured"
        rows.append(_untested_gain(s["model"], rep, measured, note))
    if not rows:
        return claims
    out = pd.concat([claims, pd.DataFrame(rows, columns=claims.columns)], ignore_index=True)
    return out.sort_values(["claim_id", "model"], kind="stable", ignore_index=True)

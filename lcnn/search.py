"""Successive halving over one model's variants: rank a rung, keep the best ceil(n/eta), account the compute.

The workflow (rules/search.smk) trains every candidate to the first rung's epochs, then ``select`` keeps the best
``ceil(n / eta)`` by mean validation top-1 over the seeds; those go on from their saved state to the next rung,
and the last rung's survivors reach the full budget. The baseline (and the benchmarked variant) always reach the
full budget as references, so gains are still measured against the same baseline as in the grid.
:func:`summarize_halving` adds up what was spent and names the winner; :func:`halving_table` sets that against the
full grid.

Promotion (``search.promote``): ``mean`` keeps the best ceil(n/eta) by mean top-1; ``overlap`` keeps those plus
every variant whose interval overlaps the best one's, so no variant is dropped on a difference within noise. The
interval (:func:`promotion_intervals`) pools the seed-to-seed variance over the rung's variants, which share their
seeds: two or three seeds per variant say little about that variant's own spread, and two seeds that agree to the
image would count as certainty. It is never narrower than the validation set's binomial interval. Each selection
records which rule and intervals decided.

Selection is deterministic: higher mean top-1 first, then lower mean validation loss (early rungs often leave
several variants at chance accuracy, where the loss still tells them apart), then higher top-5, then the variant
name. A variant with a diverged seed never survives (a diverged run cannot go on). Winner and grid winner are
picked the same way among all candidates, the baseline included: the question is which recipe each search ships.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

import pandas as pd

from lcnn.stats import binomial_ci, mean_ci, t_quantile
from lcnn.utils import LcnnError, atomic_write_json, cli, json_arg, read_json

RUN_KEYS = ("top1", "top5", "status", "epochs_completed", "train_seconds", "device_hours", "device_type")
RUN_KEYS += ("val_images", "val_loss")


# ------------------------------------------------------------------------------------------------ selection
PROMOTE_RULES = ("mean", "overlap")


def score(runs: list[dict[str, Any]], confidence: float = 0.95) -> dict[str, Any]:
    """One variant's standing at a rung: means over its seeds and the confidence interval of the mean top-1 (see
    :func:`interval`); any diverged (or missing) seed disqualifies it."""
    ok = [r for r in runs if r.get("status") == "ok" and r.get("top1") is not None]
    mean = {k: statistics.fmean(r[k] for r in ok) if ok else None for k in ("top1", "top5")}
    losses = [r.get("val_loss") for r in ok]
    loss = statistics.fmean(losses) if ok and all(x is not None and math.isfinite(x) for x in losses) else None
    lo, hi, basis = interval(runs, confidence)
    sd = statistics.stdev(r["top1"] for r in ok) if len(ok) >= 2 else None
    images = next((r.get("val_images") for r in ok if r.get("val_images")), None)
    return {"top1_mean": mean["top1"], "top5_mean": mean["top5"], "val_loss_mean": loss} | {
        "top1_sd": sd,
        "val_images": images,
        "top1_ci_lo": lo if math.isfinite(lo) else None,
        "top1_ci_hi": hi if math.isfinite(hi) else None,
        "ci_basis": basis,
        "n_seeds": len(runs),
        "n_ok": len(ok),
        "diverged": not runs or len(ok) < len(runs),
    }


def rank_key(variant: str, sc: dict[str, Any]) -> tuple:
    """Sort key: usable before diverged, then higher top-1, lower validation loss, higher top-5, and the name (so
    ties never flip). A missing loss (grid results carry none) sorts after a known one."""
    neg = [-sc[k] if sc.get(k) is not None else math.inf for k in ("top1_mean", "top5_mean")]
    loss = sc.get("val_loss_mean")
    return (bool(sc["diverged"]), neg[0], loss if loss is not None else math.inf, neg[1], variant)


def promotion_intervals(
    scores: dict[str, dict[str, Any]], names: list[str], confidence: float = 0.95
) -> tuple[dict[str, tuple[float, float]], str]:
    """Each usable variant's interval of its mean top-1 at one rung, and what it rests on.

    The seed-to-seed variance is pooled over the rung's usable variants (they train on the same seeds, to the same
    epochs): t with df = sum(n_i - 1), half-width t * s_pooled / sqrt(n_i). Each interval is widened, where
    narrower, to the validation set's binomial interval of the mean (the seeds share those images), so zero spread
    never reads as certainty. With one seed only the binomial interval is left.
    """
    usable = [v for v in names if not scores[v]["diverged"] and scores[v].get("top1_mean") is not None]
    multi = [v for v in usable if scores[v].get("top1_sd") is not None]
    df = sum(scores[v]["n_ok"] - 1 for v in multi)
    pooled = math.sqrt(sum((scores[v]["n_ok"] - 1) * scores[v]["top1_sd"] ** 2 for v in multi) / df) if df else None
    t = t_quantile(0.5 + confidence / 2, df) if df else math.nan
    out = {}
    for v in usable:
        sc = scores[v]
        mean, images = sc["top1_mean"], sc.get("val_images")
        lo, hi = binomial_ci(mean, images, confidence) if images else (math.inf, -math.inf)
        if pooled is not None and sc.get("top1_sd") is not None:
            half = t * pooled / math.sqrt(sc["n_ok"])
            lo, hi = min(lo, max(mean - half, 0.0)), max(hi, min(mean + half, 100.0))
        if math.isfinite(lo):
            out[v] = (lo, hi)
    if pooled is not None:
        basis = f"seeds pooled (t, df={df}, sd {pooled:.2f}) or val binomial, the wider"
    elif out:
        images = sorted({scores[v]["val_images"] for v in out})
        basis = f"val binomial (1 seed, {'/'.join(map(str, images))} images)"
    else:
        basis = "n/a"
    return out, basis


def select(
    scores: dict[str, dict[str, Any]],
    competing: list[str],
    references: list[str],
    pinned: list[str],
    eta: int,
    promote: str = "mean",
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Keep the best ceil(n/eta) of the ``n`` competing variants by the ``promote`` rule (``overlap``: plus every
    one whose interval overlaps the best one's); pinned ones that lose stay on as references.

    Returns the ranking, the survivors (still competing), the eliminated, the references carried on, and
    ``next``: every variant that trains in the next rung. Diverged variants are dropped, references included.
    """
    if eta < 2:
        raise LcnnError(f"search.eta is {eta}; it must be at least 2 so that each rung keeps fewer variants")
    if promote not in PROMOTE_RULES:
        raise LcnnError(f"search.promote is {promote!r}; use one of {', '.join(PROMOTE_RULES)}")
    missing = sorted((set(competing) | set(references)) - set(scores))
    if missing:
        raise LcnnError(f"no metrics for {', '.join(missing)} at this rung; rebuild the rung's runs")
    ranking = sorted(competing, key=lambda v: rank_key(v, scores[v]))
    keep = math.ceil(len(competing) / eta)
    usable = [v for v in ranking if not scores[v]["diverged"]]
    survivors = usable[:keep]
    why = {v: f"top {keep} by mean" for v in survivors}
    intervals, basis = promotion_intervals(scores, [*competing, *references], confidence)
    if promote == "overlap" and usable and usable[0] in intervals:
        best_lo = intervals[usable[0]][0]
        for v in usable[keep:]:
            if v in intervals and intervals[v][1] >= best_lo:
                survivors.append(v)
                why[v] = f"interval overlaps {usable[0]}'s"
    eliminated = [v for v in ranking if v not in survivors]
    carried = [v for v in dict.fromkeys([*pinned, *references]) if v in scores and v not in survivors]
    refs = [v for v in carried if not scores[v]["diverged"]]
    dropped = [v for v in carried if scores[v]["diverged"]]
    decided = promote if promote == "mean" else f"{promote} ({basis.split(' (')[0]})"
    return {"ranking": ranking, "keep": keep, "survivors": survivors, "eliminated": eliminated} | {
        "promote": promote,
        "decided_by": decided,
        "intervals": {v: list(iv) for v, iv in intervals.items()},
        "interval_basis": basis,
        "kept_because": why,
        "references": refs,
        "dropped_references": dropped,
        "next": survivors + refs,
    }


def _group(metrics: list[dict[str, Any]], model: str) -> dict[str, dict[int, dict[str, Any]]]:
    """variant -> seed -> the few metrics the search keeps, checking that every file is one of this model's runs."""
    out: dict[str, dict[int, dict[str, Any]]] = {}
    for m in metrics:
        if m.get("model") != model:
            raise LcnnError(f"metrics of model '{m.get('model')}' given to the search of '{model}'; pass its own runs")
        out.setdefault(m["variant"], {})[int(m["seed"])] = {k: m.get(k) for k in RUN_KEYS}
    return out


def _check_rung_runs(runs: dict[str, dict[int, dict]], entrants: list[str], seeds: list[int], epochs: int) -> None:
    for v in entrants:
        got = sorted(runs.get(v, {}))
        if got != sorted(seeds):
            raise LcnnError(f"rung runs of '{v}' cover seeds {got}, expected {sorted(seeds)}; rebuild the rung")
        for seed, r in runs[v].items():
            if r["status"] == "ok" and r["epochs_completed"] != epochs:
                raise LcnnError(
                    f"'{v}' seed {seed} has {r['epochs_completed']} epochs where this rung ends at {epochs}; "
                    "its metrics.json is stale: delete it and rerun"
                )
    extra = sorted(set(runs) - set(entrants))
    if extra:
        raise LcnnError(f"metrics of {', '.join(extra)} given, but they do not train in this rung")


def select_rung(cfg: dict[str, Any], metrics: list[dict[str, Any]], previous: dict[str, Any] | None) -> dict[str, Any]:
    """The selection after rung ``cfg['rung']``: who entered, their scores, and who trains in the next rung."""
    if previous is None:
        competing, references = list(cfg["candidates"]), []
    else:
        competing, references = list(previous["survivors"]), list(previous["references"])
    runs = _group(metrics, cfg["model"])
    _check_rung_runs(runs, competing + references, cfg["seeds"], cfg["epochs"])
    conf = cfg.get("confidence", 0.95)
    scores = {v: score(list(seeds.values()), conf) for v, seeds in runs.items()}
    chosen = select(scores, competing, references, cfg["pinned"], cfg["eta"], cfg.get("promote", "mean"), conf)
    head = {k: cfg[k] for k in ("model", "rung", "epochs", "budget", "eta", "seeds")}
    return head | {"competing": competing, "entering_references": references, "scores": scores, "runs": runs} | chosen


# -------------------------------------------------------------------------------------------------- summary
def summarize_halving(cfg: dict[str, Any], rungs: list[dict[str, Any]], final: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything one model's halving did: rungs, eliminations, winner at the full budget, and its compute."""
    rungs = sorted(rungs, key=lambda r: r["rung"])
    if [r["rung"] for r in rungs] != list(range(1, len(rungs) + 1)):
        raise LcnnError(f"rung selections {[r['rung'] for r in rungs]} are not 1..n; rebuild search/{cfg['model']}")
    entrants = rungs[-1]["next"] if rungs else list(cfg["candidates"])
    runs = _group(final, cfg["model"])
    _check_rung_runs(runs, entrants, cfg["seeds"], cfg["budget"])
    scores = {v: score(list(seeds.values())) for v, seeds in runs.items()}
    order = sorted(scores, key=lambda v: rank_key(v, scores[v]))
    winner = order[0] if order and not scores[order[0]]["diverged"] else None
    stages = [r["runs"] for r in rungs] + [{v: {str(s): r for s, r in seeds.items()} for v, seeds in runs.items()}]
    eliminated = {v: r["rung"] for r in rungs for v in r["eliminated"]}
    dropped = {v: r["rung"] for r in rungs for v in r["dropped_references"]}
    survivors = rungs[-1]["survivors"] if rungs else list(cfg["candidates"])
    final_rows = {
        v: {"role": "survivor" if v in survivors else "reference", **sc, "top1": [runs[v][s]["top1"] for s in runs[v]]}
        for v, sc in scores.items()
    }
    return {
        "model": cfg["model"],
        "mode": "halving",
        "eta": cfg["eta"],
        "promote": cfg.get("promote", "mean"),
        "rung_epochs": cfg["schedule"],
        "budget": cfg["budget"],
        "seeds": cfg["seeds"],
        "candidates": list(cfg["candidates"]),
        "rungs": [
            {k: r[k] for k in ("rung", "epochs", "competing", "ranking", "keep", "survivors", "eliminated")}
            | {"references": r["references"], "scores": r["scores"], "decided_by": r.get("decided_by", "mean")}
            for r in rungs
        ],
        "eliminated_at": eliminated,
        "dropped_references": dropped,
        "final": final_rows,
        "winner": winner,
        "winner_top1": scores[winner]["top1_mean"] if winner else None,
        "compute": compute(stages, cfg),
    }


def compute(stages: list[dict[str, dict[str, dict]]], cfg: dict[str, Any]) -> dict[str, Any]:
    """Epochs and device-hours halving spent (each rung's runs minus where they started), and the full grid's.

    The grid's device-hours are estimated from each candidate's cost per epoch in the first rung, where every
    candidate trains; a measured grid (lcnn.tools.search_vs_grid, or the report) replaces the estimate.
    """
    done: dict[tuple[str, str], dict[str, float]] = {}
    epochs = hours = 0.0
    for stage in stages:
        for v, seeds in stage.items():
            for s, r in seeds.items():
                before = done.get((v, str(s)), {"epochs_completed": 0, "device_hours": 0.0})
                epochs += (r["epochs_completed"] or 0) - before["epochs_completed"]
                hours += (r["device_hours"] or 0.0) - before["device_hours"]
                done[(v, str(s))] = {"epochs_completed": r["epochs_completed"] or 0, "device_hours": r["device_hours"]}
    per_epoch = {}
    for v, seeds in (stages[0] if stages else {}).items():
        rates = [r["device_hours"] / r["epochs_completed"] for r in seeds.values() if r["epochs_completed"]]
        if rates:
            per_epoch[v] = statistics.fmean(rates)
    fallback = statistics.median(per_epoch.values()) if per_epoch else math.nan
    n_seeds, budget = len(cfg["seeds"]), cfg["budget"]
    grid_hours = sum(per_epoch.get(v, fallback) * budget * n_seeds for v in cfg["candidates"])
    grid_epochs = len(cfg["candidates"]) * budget * n_seeds
    types = {r.get("device_type") for st in stages for seeds in st.values() for r in seeds.values()}
    return {
        "epochs": int(epochs),
        "device_hours": hours,
        "device_type": ",".join(sorted(str(t) for t in types if t)) or None,
        "grid_epochs": grid_epochs,
        "grid_device_hours_estimate": grid_hours,
        "epoch_fraction": epochs / grid_epochs if grid_epochs else math.nan,
    }


# ----------------------------------------------------------------------------------------------- vs. grid
def winner_of(results: dict[str, dict[str, Any]]) -> str | None:
    """The best variant of a grid (``variant -> results/{model}/{variant}.json``), ranked like the halving."""
    scores = {v: score(res.get("runs") or []) for v, res in results.items()}
    order = sorted(scores, key=lambda v: rank_key(v, scores[v]))
    return order[0] if order and not scores[order[0]]["diverged"] else None


def interval(runs: list[dict[str, Any]], confidence: float = 0.95) -> tuple[float, float, str]:
    """Confidence interval of a variant's mean top-1: over seeds (t) with 2+ seeds that differ, else the validation
    set's binomial (Wilson) interval of the one run (or of the seeds' common top-1), which shows val-sampling noise
    only (seed noise is unknown, or unmeasured where every seed gave the same top-1)."""
    ok = [r["top1"] for r in runs if r.get("status") == "ok" and r.get("top1") is not None]
    if len(ok) >= 2:
        st = mean_ci(ok, confidence)
        if math.isfinite(st["ci_lo"]):
            return st["ci_lo"], st["ci_hi"], f"seeds (t, n={len(ok)})"
    n = next((r.get("val_images") for r in runs if r.get("val_images")), None)
    if ok and n:
        lo, hi = binomial_ci(ok[0], n, confidence)
        seeds = "1 seed" if len(ok) == 1 else f"{len(ok)} seeds alike"
        return lo, hi, f"val binomial ({seeds}, {n} images)"
    return math.nan, math.nan, "n/a"


def compare(summary: dict[str, Any], grid: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One model's halving against its grid (``variant -> grid result``; empty = no grid results to compare)."""
    comp = summary["compute"]
    rungs = summary["rung_epochs"]
    elim = ", ".join(
        f"{v}@r{r}" + (" (kept as reference)" if v in summary["final"] else "")
        for v, r in sorted(summary["eliminated_at"].items(), key=lambda x: (x[1], x[0]))
    )
    win = summary["winner"]
    row = {
        "model": summary["model"],
        "candidates": len(summary["candidates"]),
        "rungs": "/".join(str(e) for e in rungs),
        # which promotion rule (and which interval) decided each rung's selection
        "promoted_by": "; ".join(dict.fromkeys(r.get("decided_by", "mean") for r in summary["rungs"])) or "n/a",
        "eliminated": elim,
        "halving_winner": win or "n/a",
        # a reference won: the selection itself had dropped it, only the always-kept baseline reached the budget
        "winner_role": summary["final"][win]["role"] if win else "n/a",
        "halving_top1": summary["winner_top1"],
        "halving_epochs": comp["epochs"],
        "halving_device_hours": comp["device_hours"],
    }
    grid = {v: g for v, g in grid.items() if v in summary["candidates"]}
    missing = [v for v in summary["candidates"] if v not in grid]
    gw = winner_of(grid) if grid else None
    if not grid:
        row |= {"grid_epochs": comp["grid_epochs"], "grid_device_hours": comp["grid_device_hours_estimate"]}
        row |= {"grid_basis": "estimated (no grid results)", "grid_winner": "n/a", "verdict": "n/a"}
    else:
        g_epochs = sum(r.get("epochs_completed") or 0 for g in grid.values() for r in g.get("runs") or [])
        g_hours = sum(r.get("device_hours") or 0.0 for g in grid.values() for r in g.get("runs") or [])
        row |= {"grid_epochs": g_epochs, "grid_device_hours": g_hours}
        row["grid_basis"] = "measured" + (f" (grid lacks {', '.join(missing)})" if missing else "")
        row["grid_winner"] = gw or "n/a"
    row["epoch_fraction"] = comp["epochs"] / row["grid_epochs"] if row["grid_epochs"] else math.nan
    row["hours_fraction"] = comp["device_hours"] / row["grid_device_hours"] if row["grid_device_hours"] else math.nan
    if gw:
        lo, hi, basis = interval(grid[gw]["runs"])
        row |= {"grid_top1": score(grid[gw]["runs"])["top1_mean"], "grid_ci_lo": lo, "grid_ci_hi": hi}
        row["ci_basis"] = basis
        mine = score(grid[win]["runs"])["top1_mean"] if win in grid else None
        row["winner_in_grid_top1"] = mine
        if win == gw:
            row["verdict"] = "same"
        elif mine is not None and math.isfinite(lo) and mine >= lo:
            row["verdict"] = "within CI"
        else:
            row["verdict"] = "no" if mine is not None else "n/a"
    elif grid:
        row["verdict"] = "n/a"
    return row


HALVING_COLUMNS = ["model", "candidates", "rungs", "promoted_by", "eliminated", "halving_winner", "winner_role"]
HALVING_COLUMNS += ["halving_top1"]
HALVING_COLUMNS += ["grid_winner"]
HALVING_COLUMNS += ["grid_top1", "grid_ci_lo", "grid_ci_hi", "ci_basis", "winner_in_grid_top1", "verdict"]
HALVING_COLUMNS += ["halving_epochs", "grid_epochs", "epoch_fraction", "halving_device_hours", "grid_device_hours"]
HALVING_COLUMNS += ["hours_fraction", "grid_basis"]


def halving_table(summaries: list[dict[str, Any]], grid_results: list[dict[str, Any]]) -> pd.DataFrame:
    """Halving vs the full grid per model, plus an ALL row: matches, and epochs and device-hours spent."""
    by_model: dict[str, dict[str, dict]] = {}
    for res in grid_results:
        by_model.setdefault(res["model"], {})[res["variant"]] = res
    rows = [compare(s, by_model.get(s["model"], {})) for s in sorted(summaries, key=lambda s: s["model"])]
    if rows:
        df = pd.DataFrame(rows)
        judged = df[df["verdict"].isin(["same", "within CI", "no"])]
        hit = judged["verdict"].isin(["same", "within CI"])
        via_ref = int((hit & (judged["winner_role"] == "reference")).sum())
        verdict = f"{int(hit.sum())}/{len(judged)} same or within CI ({via_ref} won by a kept reference)"
        total = {"model": "ALL", "candidates": int(df["candidates"].sum())}
        total |= {"verdict": verdict if len(judged) else "n/a"}
        for col in ("halving_epochs", "grid_epochs", "halving_device_hours", "grid_device_hours"):
            total[col] = df[col].sum()
        total["epoch_fraction"] = total["halving_epochs"] / total["grid_epochs"] if total["grid_epochs"] else math.nan
        gh = total["grid_device_hours"]
        total["hours_fraction"] = total["halving_device_hours"] / gh if gh else math.nan
        total["grid_basis"] = ", ".join(sorted(set(df["grid_basis"].str.split(" \\(").str[0])))
        rows.append(total)
    df = pd.DataFrame(rows, columns=HALVING_COLUMNS)
    for col in ("halving_top1", "grid_top1", "grid_ci_lo", "grid_ci_hi", "winner_in_grid_top1", "epoch_fraction"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    for col in ("halving_device_hours", "grid_device_hours", "hours_fraction"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


# ---------------------------------------------------------------------------------------------------- CLI
def read_run(metrics_path: str | Path) -> dict[str, Any]:
    """A run's metrics.json plus the validation loss of its last epoch, from the history.csv beside it (both are
    outputs of the same training job)."""
    m = read_json(metrics_path)
    history = Path(metrics_path).parent / "history.csv"
    if history.is_file() and m.get("status") == "ok":
        rows = pd.read_csv(history)
        last = rows[rows["epoch"] == m.get("epochs_completed")]
        m["val_loss"] = float(last["val_loss"].iloc[-1]) if len(last) else None
    return m


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg['command']`` is ``select`` (one rung's selection) or ``summarize`` (one model's whole search)."""
    metrics = [read_run(p) for p in cfg["metrics"]]
    if cfg["command"] == "select":
        previous = read_json(cfg["previous"]) if cfg.get("previous") else None
        out = select_rung(cfg, metrics, previous)
        _check_states(cfg["metrics"], metrics, out, int(cfg["rung"]), list(cfg.get("schedule") or []))
    else:
        out = summarize_halving(cfg, [read_json(p) for p in cfg.get("rungs") or []], metrics)
    atomic_write_json(cfg["out"], out)
    if cfg["command"] == "select" and not cfg.get("keep_checkpoint"):
        from lcnn import checkpoint

        for path, m in zip(cfg["metrics"], metrics):  # a run that goes no further never resumes: free its state
            if m["variant"] not in out["next"]:
                checkpoint.remove(Path(path).parent / "state")
    return out


def _rung_finished(folder: Path, schedule: list[int]) -> bool:
    """Whether the rung run in ``folder`` (``.../rung{r}``) finished to the epochs ``schedule`` gives rung r."""
    r = int(folder.name.removeprefix("rung"))
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    done = all((folder / name).exists() for name in ("metrics.json", "model.safetensors"))
    return done and r <= len(schedule) and saved.get("stop_epoch") == schedule[r - 1]


def _check_states(
    paths: list[str], metrics: list[dict[str, Any]], out: dict[str, Any], rung: int, schedule: list[int]
) -> None:
    """Every run that goes on must have the state it goes on from. A selection rerun under another rule (search.promote,
    eta, the candidates) can promote a run whose state an earlier selection freed: say so here, not in a failed job.
    A run whose next rung has already finished, to the epochs the schedule now asks of it, needs no state (a
    selection rerun after a setting that decides nothing changed: the next rung's jobs read the selection as an
    ancient input and are not rerun)."""
    from lcnn import checkpoint  # imports torch: only here

    lost = [Path(p).parent for p, m in zip(paths, metrics) if m["variant"] in out["next"]]
    lost = [d for d in lost if not _rung_finished(d.parent / f"rung{rung + 1}", schedule)]
    lost = [d for d in lost if checkpoint.find(d / "state") is None]
    if lost:
        raise LcnnError(
            f"{', '.join(map(str, lost))} go on to the next rung, but an earlier selection freed their training state "
            "(search.promote, eta or the candidates changed since); delete those folders and rerun to retrain them"
        )


def _config_json(arg: str) -> dict[str, Any]:
    conf = json_arg(arg)
    need = {"model", "eta", "budget", "seeds", "candidates", "pinned"}
    if need - set(conf):
        raise LcnnError(f"--config-json needs {', '.join(sorted(need))}; let rules/search.smk write it")
    return conf


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lcnn.search", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["select", "summarize"], help="select: one rung; summarize: one model")
    parser.add_argument("metrics", nargs="+", help="metrics.json of the rung's runs (summarize: of the last rung)")
    parser.add_argument("--config-json", required=True, help="model, rung, epochs, budget, eta, seeds, candidates")
    parser.add_argument("--previous", nargs="*", default=[], help="select: the previous rung's selection, if any")
    parser.add_argument("--rungs", nargs="*", default=[], help="summarize: every rung's selection JSON")
    parser.add_argument("--out", required=True, type=Path, help="where the JSON goes")
    args = parser.parse_args(argv)
    cfg = _config_json(args.config_json) | {"command": args.command, "metrics": args.metrics, "out": args.out}
    previous = [p for p in args.previous if p]
    if len(previous) > 1:
        raise LcnnError(f"--previous takes one selection file, got {len(previous)}")
    out = run(cfg | {"previous": previous[0] if previous else None, "rungs": [p for p in args.rungs if p]})
    if args.command == "select":
        print(f"{out['model']} rung {out['rung']} ({out['epochs']} epochs): next {', '.join(out['next'])}")
    else:
        print(f"{out['model']}: winner {out['winner']} ({out['compute']['epochs']} epochs)")


if __name__ == "__main__":
    main()

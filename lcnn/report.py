"""Aggregate the study into tables, figures and a claims check (``python -m lcnn.report``).

The work is split by concern: :mod:`lcnn.report_load` reads the results, histories and benchmarks,
:mod:`lcnn.report_tables` and :mod:`lcnn.report_claims` build the tables (statistics from :mod:`lcnn.stats`),
:mod:`lcnn.figures` draws, and :mod:`lcnn.report_write` writes. This module names the outputs and runs the stage.
It imports nothing heavy at the top, because rules/report.smk reads :data:`TABLES` when the workflow is parsed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from lcnn.config import validate_section
from lcnn.utils import LcnnError, atomic_write_json, cli, environment, json_arg, read_json

TABLES = ("claims", "accuracy", "gains", "best_variants", "best_per_axis", "runs", "compute", "latency", "models")
TABLES += ("halving",)  # halving vs grid (lcnn.search); no rows unless a halving search is given
TABLES += ("optuna",)  # optuna's best trial vs the grid's best (lcnn.optuna_search); rows only in optuna mode
FIGURES = ("pareto", "gain_heatmap", "learning_curves", "throughput_vs_batch")


def report_settings(section: dict) -> dict:
    """The config's report section, checked against the schema and completed with its defaults."""
    rep = validate_section("report", section)
    lo, hi = rep["gain_range"]
    if lo > hi:
        raise LcnnError(f"report.gain_range {rep['gain_range']} is reversed; write it as [low, high]")
    return rep


def run(cfg: dict) -> dict:
    """Build every table and figure under ``cfg['out_dir']`` and return the summary index."""
    # imported here, not at the top: the workflow imports this module at parse time for TABLES
    from lcnn import figures, optuna_search, report_claims, report_load, report_write, search
    from lcnn import report_tables as tab

    rep = report_settings(cfg.get("report") or {})
    if not cfg.get("results"):
        raise LcnnError("no results files given; train at least one model x variant first")
    baseline = cfg.get("baseline_variant") or "baseline"
    conf = float(cfg.get("confidence", 0.95))
    out_dir = Path(cfg["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)

    runs, _ = report_load.load_runs(cfg["results"])
    if runs.empty:
        raise LcnnError("the results files hold no runs; rebuild them from the runs' metrics.json (snakemake results)")
    hist = report_load.load_histories(cfg.get("histories") or [])
    bench_rows, bench_models = report_load.load_benchmarks(cfg.get("benchmarks") or [])

    # halving vs grid: in grid mode the results are the grid; in halving mode a finished grid may be given too
    summaries = [read_json(p) for p in cfg.get("search") or []]
    halving = cfg.get("search_mode") == "halving"
    # optuna mode: the results are the grid of named variants, the summaries each model's model-based search
    studies, summaries = (summaries, []) if cfg.get("search_mode") == "optuna" else ([], summaries)
    grid_paths = (cfg.get("grid_results") or []) if halving else cfg["results"]
    searched = {s["model"]: len([v for v in s["candidates"] if v != baseline]) for s in summaries} if halving else None

    acc = tab.accuracy_table(runs, conf, baseline)
    gains = tab.gains_table(runs, baseline, conf, searched)
    best, best_axis = tab.best_tables(gains)
    models = tab.models_table(acc, best, bench_rows, bench_models, baseline)
    tables = {
        "claims": report_claims.halving_claims(
            report_claims.claims_table(gains, models, bench_rows, runs, rep, conf), summaries, rep
        ),
        "accuracy": acc,
        "gains": gains,
        "best_variants": best,
        "best_per_axis": best_axis,
        "runs": tab.runs_table(runs),
        "compute": tab.compute_table(runs, summaries if halving else studies),
        "latency": tab.latency_table(bench_rows),
        "models": models,
        "halving": search.halving_table(summaries, [read_json(p) for p in grid_paths] if summaries else []),
        "optuna": optuna_search.optuna_table(studies, [read_json(p) for p in cfg["results"]] if studies else []),
    }
    written: dict[str, Any] = {"tables": {}, "figures": {}}
    for name in TABLES:
        written["tables"][name] = report_write.write_table(tables[name], name, out_dir)
    written["figures"] = {
        "pareto": figures.pareto(models, out_dir / "pareto.png"),
        "gain_heatmap": figures.gain_heatmap(best_axis, out_dir / "gain_heatmap.png"),
        "learning_curves": figures.learning_curves(hist, baseline, out_dir / "learning_curves.png"),
        "throughput_vs_batch": figures.throughput_vs_batch(bench_rows, out_dir / "throughput_vs_batch.png"),
    }
    written["report_md"] = report_write.write_markdown_report(tables, written["figures"], out_dir / "report.md")
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
        "optuna": json.loads(tables["optuna"].to_json(orient="records")),
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
    p.add_argument("--search", nargs="*", default=[], help="search/{model}/halving.json (or optuna.json)")
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

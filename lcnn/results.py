"""Per model x variant result over all seeds: the per-seed metrics plus their mean and spread.

Diverged seeds stay in ``runs`` with their status but are left out of the means, so a diverged run
never reads as a zero-accuracy one.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from lcnn.config import recipe_changes
from lcnn.utils import LcnnError, atomic_write_json, cli, json_arg, read_json


def combine_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine one model x variant's per-seed metrics into the fixed-key result record."""
    if not runs:
        raise LcnnError("no per-seed metrics given; pass runs/{model}/{variant}/seed*/metrics.json")
    keys = {(r["model"], r["variant"]) for r in runs}
    if len(keys) != 1:
        raise LcnnError(f"metrics of different runs mixed together: {sorted(keys)}; pass one model x variant")
    runs = sorted(runs, key=lambda r: r["seed"])
    ok = [r for r in runs if r["status"] == "ok"]
    out = {
        "model": runs[0]["model"],
        "variant": runs[0]["variant"],
        "axis": runs[0]["axis"],
        "timm_name": runs[0]["timm_name"],
        "seeds": [r["seed"] for r in runs],
        "runs": runs,
        "n_seeds": len(ok),
        "n_diverged": len(runs) - len(ok),
        "status": "ok" if len(ok) == len(runs) else ("diverged" if not ok else "partly_diverged"),
    }
    for metric in ("top1", "top5"):
        values = [r[metric] for r in ok]
        out[f"{metric}_mean"] = statistics.fmean(values) if values else None
        out[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else None
    out["device_hours"] = sum(r["device_hours"] for r in runs)
    out["epochs_completed"] = sum(r["epochs_completed"] for r in runs)
    return out


# the metrics.json keys a result is built from (lcnn.train writes them all; see the contract)
REQUIRED = ("model", "variant", "axis", "timm_name", "seed", "status", "top1", "top5", "device_hours")
REQUIRED += ("epochs_completed",)
STATUSES = ("ok", "diverged")


def read_metrics(path: str | Path) -> dict[str, Any]:
    """One seed's metrics.json, refused with the file named when it is not a finished run's record."""
    metrics = read_json(path)
    missing = [k for k in REQUIRED if not isinstance(metrics, dict) or k not in metrics]
    if missing:
        raise LcnnError(f"{path} lacks {', '.join(missing)}; it was not written by lcnn.train, delete it and retrain")
    if metrics["status"] not in STATUSES:
        raise LcnnError(f"{path} has status {metrics['status']!r}, not one of {STATUSES}; delete it and retrain")
    return metrics


def check_recipe(path: str | Path, recipe: dict[str, Any]) -> None:
    """Refuse a seed trained under another recipe than the config's, beside the metrics (``config.json``).

    Snakemake reruns a job whose params changed only if it recorded the job's params: a run that finished while the
    main Snakemake was not running (a SLURM job outliving it) has no record, and an edited recipe would skip it.
    """
    saved_path = Path(path).parent / "config.json"
    if not saved_path.exists():  # a run written by hand or by an older lcnn: nothing to compare
        return
    changed = recipe_changes(read_json(saved_path), recipe)
    if changed:
        raise LcnnError(
            f"{Path(path).parent} was trained under another recipe than the config's ({', '.join(changed[:4])} "
            "differ) and Snakemake did not rerun it (e.g. it finished while Snakemake was not running, so no record "
            "of its params was kept); delete its metrics.json and rerun to train it under the current recipe"
        )


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    for path in cfg["metrics"] if cfg.get("recipe") else []:
        check_recipe(path, cfg["recipe"])
    result = combine_seeds([read_metrics(p) for p in cfg["metrics"]])
    atomic_write_json(cfg["out"], result)
    return result


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Summarize one model x variant over its seeds.")
    parser.add_argument("metrics", nargs="+", type=Path, help="runs/{model}/{variant}/seed*/metrics.json")
    parser.add_argument("--out", required=True, type=Path, help="results/{model}/{variant}.json")
    parser.add_argument("--recipe-json", help="the variant's recipe (lcnn.config.run_recipe, without the seed)")
    args = parser.parse_args(argv)
    recipe = json_arg(args.recipe_json, "--recipe-json") if args.recipe_json else None
    result = run({"metrics": args.metrics, "out": args.out, "recipe": recipe})
    print(f"{result['model']}/{result['variant']}: top1 {result['top1_mean']} over {result['n_seeds']} seeds")


if __name__ == "__main__":
    main()

"""Set finished searches against a finished grid study: halving's winner and optuna's best trial against the
grid's best variant (same, or within its CI), and the epochs and device-hours each spent
(``python -m lcnn.tools.search_vs_grid --grid DIR [--halving DIR] [--optuna DIR]``).

The folders may be one workdir (halving writes ``search/{model}/halving.json`` and ``results/halving/``, optuna
``search/{model}/optuna.json``, the grid ``results/{model}/``) or several. For halving the grid results are read for
its candidate variants only, so a grid that trained more variants is not charged for them; optuna is set against
every variant the grid has for the model (the named variants it has to beat).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lcnn.optuna_search import optuna_table
from lcnn.report_write import display_frame, write_table
from lcnn.search import halving_table
from lcnn.utils import LcnnError, cli, read_json


def _halving(grid_dir: Path, halving_dir: Path) -> tuple[Any, list[str]]:
    paths = sorted(halving_dir.glob("search/*/halving.json"))
    if not paths:
        raise LcnnError(f"no search/*/halving.json under {halving_dir}; run the study with search.mode halving there")
    summaries = [read_json(p) for p in paths]
    grid, missing = [], []
    for s in summaries:
        for variant in s["candidates"]:
            path = grid_dir / "results" / s["model"] / f"{variant}.json"
            if path.is_file():
                grid.append(read_json(path))
            else:
                missing.append(f"{s['model']}/{variant}")
    return halving_table(summaries, grid), missing


def _optuna(grid_dir: Path, optuna_dir: Path) -> tuple[Any, list[str]]:
    paths = sorted(optuna_dir.glob("search/*/optuna.json"))
    if not paths:
        raise LcnnError(f"no search/*/optuna.json under {optuna_dir}; run the search with search.mode optuna there")
    summaries = [read_json(p) for p in paths]
    grid = [read_json(p) for s in summaries for p in sorted((grid_dir / "results" / s["model"]).glob("*.json"))]
    missing = [s["model"] for s in summaries if not any(g["model"] == s["model"] for g in grid)]
    return optuna_table(summaries, grid), missing


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the comparisons from ``cfg['grid']`` and the ``halving`` / ``optuna`` workdirs given; write them under
    ``cfg['out_dir']`` (halving_vs_grid.*, optuna_vs_grid.*)."""
    if not cfg.get("halving") and not cfg.get("optuna"):
        raise LcnnError("give --halving DIR, --optuna DIR or both: the searches to set against the grid")
    grid_dir, out = Path(cfg["grid"]), {"tables": {}, "missing": {}, "written": {}}
    for name, build in (("halving", _halving), ("optuna", _optuna)):
        if cfg.get(name):
            out["tables"][name], out["missing"][name] = build(grid_dir, Path(cfg[name]))
            if cfg.get("out_dir"):
                out["written"][name] = write_table(out["tables"][name], f"{name}_vs_grid", Path(cfg["out_dir"]))
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lcnn.tools.search_vs_grid", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="workdir of the finished grid study (has results/{model}/)")
    parser.add_argument("--halving", help="workdir of a finished halving search (has search/*/halving.json)")
    parser.add_argument("--optuna", help="workdir of a finished optuna search (has search/*/optuna.json)")
    parser.add_argument("--out-dir", help="also write halving_vs_grid.* / optuna_vs_grid.* (md, csv, tex, html) here")
    args = parser.parse_args(argv)
    out = run({"grid": args.grid, "halving": args.halving, "optuna": args.optuna, "out_dir": args.out_dir})
    from tabulate import tabulate

    for name, table in out["tables"].items():
        print(f"## {name} vs grid\n")
        shown = display_frame(name, table)
        print(tabulate(shown, headers="keys", tablefmt="github", showindex=False, disable_numparse=True) + "\n")
        if out["missing"][name]:
            print(f"grid results missing for {len(out['missing'][name])}: {', '.join(out['missing'][name])}")


if __name__ == "__main__":
    main()

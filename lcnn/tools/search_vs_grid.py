"""Set a finished halving search against a finished grid study: same winner (or within the grid's CI), and the
epochs and device-hours each spent (``python -m lcnn.tools.search_vs_grid --grid DIR --halving DIR``).

The two may be one workdir (halving writes ``search/`` and ``results/halving/``, the grid ``results/{model}/``)
or two. The grid results are read for the halving's candidate variants only, so a grid that trained more
variants is not charged for them.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from lcnn.report_write import display_frame, write_table
from lcnn.search import halving_table
from lcnn.utils import LcnnError, cli, read_json


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the comparison from ``cfg['grid']`` and ``cfg['halving']`` workdirs; write it under ``cfg['out_dir']``."""
    grid_dir, halving_dir = Path(cfg["grid"]), Path(cfg["halving"])
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
    table = halving_table(summaries, grid)
    written = write_table(table, "halving_vs_grid", Path(cfg["out_dir"])) if cfg.get("out_dir") else {}
    return {"table": table, "missing": missing, "written": written}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lcnn.tools.search_vs_grid", description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="workdir of the finished grid study (has results/{model}/)")
    parser.add_argument("--halving", required=True, help="workdir of the finished halving search (has search/)")
    parser.add_argument("--out-dir", help="also write halving_vs_grid.{md,csv,tex,html} here")
    args = parser.parse_args(argv)
    out = run({"grid": args.grid, "halving": args.halving, "out_dir": args.out_dir})
    from tabulate import tabulate

    shown = display_frame("halving", out["table"])
    print(tabulate(shown, headers="keys", tablefmt="github", showindex=False, disable_numparse=True))
    if out["missing"]:
        print(f"grid results missing for {len(out['missing'])} candidates: {', '.join(out['missing'])}")


if __name__ == "__main__":
    main()

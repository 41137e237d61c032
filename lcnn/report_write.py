"""Write the report's tables (Markdown, CSV, LaTeX, HTML) and its one-page Markdown report, atomically.

CSV keeps the raw numbers; the other formats are for people: 2 decimals, "n/a" for what was not measured, and a
failed run's status in its number cells, so that nothing is ever shown as a zero it never measured.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from lcnn.report_tables import num
from lcnn.utils import atomic_write_text

TABLE_FORMATS = ("md", "csv", "tex", "html")
_SPECS = {"device_hours": ".4g", "welch_df": ".1f", "params_M": ".2f", "gmacs": ".3f", "throughput_ips": ".1f"}
_SPECS |= {k: ".0f" for k in ("batch_size", "max_throughput_batch", "epochs", "epochs_completed", "best_epoch")}
_SPECS |= {k: ".0f" for k in ("max_throughput_ips", "num_devices", "seed", "train_seconds")}
_SPECS |= {k: ".4g" for k in ("halving_device_hours", "grid_device_hours", "search_device_hours")}
_SPECS["search_epochs"] = ".0f"
_SPECS["loader_wait_pct"] = ".1f"
_SPECS |= {k: ".0f" for k in ("halving_epochs", "grid_epochs", "bench_img_size", "optuna_epochs", "trials")}
_STATUS_CELLS = {"runs": ("top1", "top5"), "latency": ("latency_ms_p50", "latency_ms_p99", "throughput_ips")}


def display_frame(name: str, df: pd.DataFrame) -> pd.DataFrame:
    """Strings for people: 2 decimals, "n/a" for missing, and a failed run's status ("diverged", "oom") in its
    number cells, so that nothing is ever shown as a zero it never measured."""
    out = pd.DataFrame(index=df.index)
    for col in df.columns:
        s = df[col]
        if pd.api.types.is_float_dtype(s):
            out[col] = [num(v, _SPECS.get(col, ".2f")) for v in s]
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

"""Figures of the study report (matplotlib, Agg backend, so they render on a headless node).

Every function takes the tables built by :mod:`lcnn.report_tables`, writes one PNG atomically and returns its path.
An empty input still gives a PNG that says so, because Snakemake expects every declared output to exist.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib import ticker  # noqa: E402

from lcnn.utils import atomic_save  # noqa: E402

DPI = 120


def _save(fig: plt.Figure, path: Path) -> str:
    atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=DPI, bbox_inches="tight", format="png"))
    plt.close(fig)
    return str(path)


def _plain_log(axis) -> None:
    """Log axis with plain numbers (1, 2, 5, 10, ...) instead of overlapping 3x10^0 labels."""
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def _empty(path: Path, title: str, why: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 2.5))
    ax.set_axis_off()
    ax.set_title(title)
    ax.text(0.5, 0.5, why, ha="center", va="center", wrap=True)
    return _save(fig, path)


def pareto(models: pd.DataFrame, path: Path) -> str:
    """Accuracy vs batch-1 latency and vs peak throughput; Pareto members are filled and joined by a step line."""
    title = "Top-1 vs speed (Pareto front)"
    panels = [
        ("b1_p50_ms", "pareto_latency", "batch-1 latency p50 (ms, log)", True),
        ("max_throughput_ips", "pareto_throughput", "throughput at best batch (images/s, log)", False),
    ]
    if models.empty or models[["b1_p50_ms", "max_throughput_ips"]].isna().all().all():
        return _empty(path, title, "no benchmark measurements to plot")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for ax, (xcol, flag, xlabel, lower_is_better) in zip(axes, panels, strict=True):
        d = models.dropna(subset=[xcol, "best_top1"])
        on = d[d[flag] == "yes"].sort_values(xcol, ascending=lower_is_better)
        ax.scatter(d[xcol], d["best_top1"], facecolors="none", edgecolors="tab:blue", s=50, label="best variant")
        ax.scatter(on[xcol], on["best_top1"], color="tab:blue", s=50, label="Pareto front")
        if len(on) > 1:
            ax.step(on[xcol], on["best_top1"], where="post", color="tab:blue", alpha=0.5)
        base = d.dropna(subset=["baseline_top1"])
        ax.scatter(base[xcol], base["baseline_top1"], marker="x", color="grey", label="baseline")
        for _, r in d.iterrows():
            ax.annotate(r["model"], (r[xcol], r["best_top1"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xscale("log")
        _plain_log(ax.xaxis)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("top-1 (%, mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    devices = sorted({str(x) for x in models["device"].dropna() if str(x) != "n/a"})
    mixed = " (different devices: speeds are not comparable)" if len(devices) > 1 else ""
    fig.suptitle(f"{title} - device: {', '.join(devices) or 'n/a'}{mixed}", fontsize=10)
    return _save(fig, path)


def gain_heatmap(best_axis: pd.DataFrame, path: Path) -> str:
    """Best mean top-1 gain per model x axis; * marks a CI that excludes 0, grey cells have no comparison."""
    title = "Best top-1 gain over baseline per axis (points)"
    d = best_axis.dropna(subset=["gain"]) if "gain" in best_axis else best_axis.iloc[0:0]
    if d.empty:
        return _empty(path, title, "no variant could be compared with its baseline")
    grid = d.pivot(index="model", columns="axis", values="gain")
    sig = d.pivot(index="model", columns="axis", values="significant").reindex_like(grid)
    vmax = float(np.nanmax(np.abs(grid.to_numpy()))) or 1.0
    fig, ax = plt.subplots(figsize=(1.6 * grid.shape[1] + 3, 0.55 * grid.shape[0] + 1.8))
    cmap = plt.get_cmap("RdBu").with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(grid.to_numpy(dtype=float)), cmap=cmap, vmin=-vmax, vmax=vmax, aspect="auto")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid.iat[i, j]
            if not (isinstance(v, float) and math.isnan(v)):
                ax.text(j, i, f"{v:+.2f}{'*' if sig.iat[i, j] == 'yes' else ''}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
    ax.set_yticks(range(grid.shape[0]), grid.index)
    fig.colorbar(im, ax=ax, label="gain (top-1 points)")
    ax.set_title(f"{title}\n* = 95% CI excludes 0 (Welch)", fontsize=10)
    return _save(fig, path)


def learning_curves(hist: pd.DataFrame, baseline: str, path: Path) -> str:
    """Validation top-1 per epoch, one panel per model, variants overlaid (mean over seeds that did not diverge).

    Diverged runs are drawn individually as dotted lines so that they stay visible instead of vanishing.
    """
    title = "Validation top-1 per epoch"
    d = hist.dropna(subset=["epoch"])
    if d.empty:
        return _empty(path, title, "no training histories")
    models = sorted(d["model"].unique())
    ncols = min(3, len(models))
    nrows = math.ceil(len(models) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows), squeeze=False)
    variants = sorted(d["variant"].unique(), key=lambda v: (v != baseline, v))
    colors = {v: plt.get_cmap("tab20")(i % 20) for i, v in enumerate(variants)}
    for ax, model in zip(axes.flat, models, strict=False):
        m = d[d["model"] == model]
        for variant in sorted(m["variant"].unique(), key=lambda v: (v != baseline, v)):
            v = m[m["variant"] == variant]
            ok = v[v["status"] == "ok"]
            style = {"color": "black", "lw": 2.2} if variant == baseline else {"color": colors[variant], "lw": 1.2}
            if len(ok):
                curve = ok.groupby("epoch")["top1"].mean()
                ax.plot(curve.index, curve.to_numpy(), label=variant, **style)
            for i, (_, run) in enumerate(v[v["status"] != "ok"].groupby("seed")):
                label = f"{variant} (diverged)" if i == 0 else None
                ax.plot(run["epoch"], run["top1"], ls=":", label=label, **style)
        ax.set_title(model)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(models) :]:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def throughput_vs_batch(bench: pd.DataFrame, path: Path) -> str:
    """Best throughput over forms/precisions at each batch size (log-log); an x marks the batch where it ran OOM."""
    title = "Throughput vs batch size"
    main = bench[bench["main_device"].astype(bool) & bench["equivalent"].astype(bool)] if len(bench) else bench
    ok = main[main["status"] == "ok"].dropna(subset=["throughput_ips", "batch_size"]) if len(main) else main
    if ok.empty:
        return _empty(path, title, "no successful benchmark rows")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([], [], marker="x", color="grey", label="out of memory at this batch")
    for i, (model, grp) in enumerate(ok.groupby("model", sort=True)):
        color = plt.get_cmap("tab10")(i % 10)
        curve = grp.groupby("batch_size")["throughput_ips"].max()
        ax.plot(curve.index, curve.to_numpy(), marker="o", ms=3, color=color, label=model)
        oom = main[(main["model"] == model) & (main["status"] == "oom")]["batch_size"].dropna()
        if len(oom):
            ax.scatter([oom.min()], [curve.iloc[-1]], marker="x", color=color, s=60)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_log(ax.yaxis)
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("batch size (log2)")
    ax.set_ylabel("images/s (log, best form/precision)")
    devices = ", ".join(sorted(ok["device_name"].dropna().astype(str).unique()))
    ax.set_title(f"{title} - {devices}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)

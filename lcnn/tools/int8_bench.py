"""Is int8 worth it? fp32 ONNX Runtime against static (QDQ) and dynamic int8, on trained weights and real images.

One command trains each model briefly on the built-in data (the MNIST digits of the demo, 10 classes, at a small
size: nothing is downloaded), then runs lcnn.benchmark's ONNX path on the trained weights with the study's
validation images: fp32 ORT; static int8 calibrated on validation images the top-1 check does not use, with every
op quantized ("static") and with Conv/MatMul/Gemm only ("static_conv"); and dynamic int8; all at batch 1 on
``--threads`` threads. Per model it prints the p50 latencies, each int8 form's top-1 change against fp32 ORT, and
whether the goal holds: the best int8 form faster than fp32 ORT with at most ``--max-top1-drop`` points of change.

    python -m lcnn.tools.int8_bench --img-size 64 --epochs 3 --out int8_bench.json

Trained weights are kept under ``--workdir`` and reused by a later call with the same settings.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

import yaml

from lcnn import config as study
from lcnn.utils import LcnnError, atomic_write_json, cli, read_json

REPO = Path(__file__).resolve().parents[2]
FORMS = ("dynamic", "static", "static_conv")  # lcnn.benchmark.INT8_FORMS, in table order
DEMO_OVERLAY = REPO / "profiles" / "demo" / "study.yaml"
# the recipe the README's int8 figures were trained with (the demo's of then), pinned here so that the demo's later
# tuning (batch 32 at lr 1.5e-3 for its small siblings) does not change them: at that recipe EfficientNetV2-S at
# 64 px was still at 12 % top-1 after 2 of its 3 epochs
RECIPE = {
    "baseline": {"batch_size": 16, "opt": "adamw", "lr_base": 0.016, "weight_decay": 0.05, "sched": "cosine",
                 "warmup_epochs": 0, "init": "trunc_normal", "hflip": 0.0, "scale": [0.8, 1.0]},
    # the per-tensor AdamW of then (the fused kernel rounds differently), no precise BN and NCHW (the demo's
    # precise BN and channels_last came later; NHWC rounds differently too, and so trains other weights)
    "train": {"fused_optimizer": False, "precise_bn_batches": 0, "channels_last": False},
}  # fmt: skip


def _merge(base: dict, over: dict) -> dict:
    """Snakemake's config-file merge: dicts recurse, everything else replaces."""
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def study_config(workdir: Path, img_size: int, epochs: int, per_class: int, val_per_class: int) -> dict[str, Any]:
    """config.yaml with the demo overlay (built-in digits, CPU, fp32), at ``img_size`` for ``epochs`` epochs.

    The models stay the study's own: the demo's smaller siblings of the largest four would not say how the
    deployed architectures quantize."""
    cfg = yaml.safe_load((REPO / "config.yaml").read_text())
    demo = yaml.safe_load(DEMO_OVERLAY.read_text())
    demo.pop("models", None)
    _merge(cfg, demo)
    _merge(cfg, copy.deepcopy(RECIPE))
    data = {
        "root": str(workdir / f"data_{img_size}px_{per_class}_{val_per_class}"),  # one prepared set per draw
        "short_side": img_size,
        "per_class": per_class,
        "val_per_class": val_per_class,
    }
    _merge(cfg, {"data": data})
    _merge(cfg, {"baseline": {"img_size": img_size, "epochs": epochs, "decay_epochs": epochs}})
    return study.validate(cfg)


def trained_weights(cfg: dict[str, Any], model: str, reuse_any: bool = False) -> tuple[Path, dict[str, Any]]:
    """(weights, metrics with the recipe trained) of ``model``'s baseline run: trained here unless a finished run with
    this recipe exists (with ``reuse_any``: any finished run under the workdir, whatever recipe it recorded)."""
    from lcnn import train

    recipe = study.run_recipe(cfg, model, "baseline", cfg["seeds"][0])
    run_cfg = study.merge_run(recipe, study.run_execution(cfg))
    out = Path(cfg["data"]["root"]) / "runs" / model
    metrics_path, config_path = out / "metrics.json", out / "config.json"
    if metrics_path.is_file() and config_path.is_file():
        saved = read_json(config_path)
        same = not study.recipe_changes(saved, recipe)
        if same or reuse_any:
            print(f"[int8] {model}: reusing {out} ({'same' if same else 'its own recorded'} recipe)", file=sys.stderr)
            recorded = {"recipe": saved.get("hparams"), "pretrained_tag": saved.get("pretrained_tag")}
            return out / "model.safetensors", {**read_json(metrics_path), **recorded}
    epochs, size = cfg["baseline"]["epochs"], cfg["baseline"]["img_size"]
    print(f"[int8] {model}: training {epochs} epochs at {size} px", file=sys.stderr)
    metrics = train.run({**run_cfg, "out_dir": str(out)})
    if metrics["status"] != "ok":
        raise LcnnError(f"{model} diverged while training for the int8 check; lower lr_base in the demo overlay")
    return out / "model.safetensors", {
        **metrics,
        "recipe": run_cfg["hparams"],
        "pretrained_tag": run_cfg["pretrained_tag"],
    }


def bench_model(
    cfg: dict[str, Any], model: str, weights: Path, num_classes: int, args, pretrained_tag: str | None = None
) -> dict[str, Any]:
    """lcnn.benchmark's ONNX path (fp32, static and dynamic int8) on the trained weights and validation images,
    normalised and cropped as the run that trained them (``pretrained_tag``)."""
    from lcnn import benchmark, models

    spec = cfg["models"][model]
    net = models.create(spec["timm"], num_classes, img_size=args.img_size, pretrained_tag=pretrained_tag)
    models.load_weights(net, weights)
    section = {
        "device": "cpu", "batch_sizes": [1], "precisions": ["fp32"], "channels_last": [False],
        "reparameterize": True, "warmup": args.warmup, "iters": args.iters, "time_budget_s": args.time_budget,
        "onnx": True, "onnx_threads": args.threads, "onnx_int8": list(FORMS), "val_limit": args.val_limit,
        "val_manifest": str(Path(cfg["data"]["root"]) / "val.csv"), "quiet": True,
    }  # fmt: skip
    cfg = {"model_name": model, "timm_name": spec["timm"], "img_size": args.img_size, "benchmark": section}
    return benchmark.benchmark_model(net, cfg)


def summary_row(model: str, result: dict[str, Any], metrics: dict[str, Any], max_drop: float) -> dict[str, Any]:
    """One table row: p50 of each ORT form at batch 1, each int8 form's top-1 change, and the verdict.

    The best int8 form is the fastest of those within ``max_drop`` points of top-1; the goal is met when it is
    faster than fp32 ORT.
    """
    checks = result["checks"]
    p50 = {r["form"]: r["latency_ms_p50"] for r in result["rows"] if r["engine"] == "onnxruntime"}
    status = {r["form"]: r["status"] for r in result["rows"] if r["engine"] == "onnxruntime"}
    row: dict[str, Any] = {
        "model": model,
        "trained_top1": metrics.get("top1"),
        "ort_fp32_top1": checks.get("onnx_fp32_top1"),
    }
    row["fp32_p50_ms"] = p50.get("onnx")
    best = None
    for form in FORMS:
        key = f"onnx_int8_{form}"
        row[f"{form}_p50_ms"] = p50.get(key) if status.get(key) == "ok" else None
        row[f"{form}_top1_change"] = checks.get(f"{key}_top1_change")
        row[f"{form}_speedup"] = row["fp32_p50_ms"] / row[f"{form}_p50_ms"] if row[f"{form}_p50_ms"] else None
        within = abs(row[f"{form}_top1_change"] or 0.0) <= max_drop  # a form that moves top-1 more is never best
        if row[f"{form}_speedup"] and within and (best is None or row[f"{form}_speedup"] > row[f"{best}_speedup"]):
            best = form
    for form in FORMS:
        row[f"{form}_fp32_agreement"] = checks.get(f"onnx_int8_{form}_fp32_top1_agreement")
    row["best_int8"] = best
    row["goal_met"] = bool(best and row[f"{best}_speedup"] > 1.0)
    share = result["host_other_cpu_share"]
    row["other_cpu_pct"] = 100 * share if share is not None else None
    row["errors"] = "; ".join(f"{r['form']}: {r['error']}" for r in result["rows"] if r["status"] != "ok")
    return row


def run(args: argparse.Namespace) -> dict[str, Any]:
    from lcnn import data

    workdir = Path(args.workdir)
    cfg = study_config(workdir, args.img_size, args.epochs, args.per_class, args.val_per_class)
    unknown = sorted(set(args.models) - set(cfg["models"]))
    if unknown:
        raise LcnnError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(cfg['models'])}")
    if not (Path(cfg["data"]["root"]) / "val.csv").is_file():
        data.run(copy.deepcopy(cfg["data"]))
    rows, results = [], {}
    for model in args.models:
        weights, metrics = trained_weights(cfg, model, args.reuse_weights)
        result = bench_model(cfg, model, weights, metrics["num_classes"], args, metrics.get("pretrained_tag"))
        results[model] = {k: result[k] for k in ("checks", "rows", "env", "host_other_cpu_share")}
        results[model]["train_metrics"] = metrics
        rows.append(summary_row(model, result, metrics, args.max_top1_drop))
        print(f"[int8] {model}: {rows[-1]}", file=sys.stderr)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    return {"settings": settings, "table": rows, "results": results}


def table_text(rows: list[dict[str, Any]]) -> str:
    """The README table: p50 ms at batch 1 and top-1 change (points) per form."""
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = {
        "model": "model", "ort_fp32_top1": "fp32 ORT top-1", "fp32_p50_ms": "fp32 ORT p50 ms",
        "dynamic_p50_ms": "dynamic int8 p50 ms", "dynamic_top1_change": "dynamic Δtop-1",
        "static_p50_ms": "static int8 p50 ms", "static_top1_change": "static Δtop-1",
        "static_conv_p50_ms": "static_conv int8 p50 ms", "static_conv_top1_change": "static_conv Δtop-1",
        "best_int8": "best int8",
        "goal_met": "goal met", "other_cpu_pct": "other processes' CPU %",
    }  # fmt: skip
    return df[list(cols)].rename(columns=cols).to_markdown(index=False, floatfmt=".2f")


@cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    names = list(yaml.safe_load((REPO / "config.yaml").read_text())["models"])
    p = argparse.ArgumentParser(description="fp32 vs static/dynamic int8 ONNX Runtime on briefly trained models.")
    p.add_argument("--models", nargs="+", default=names, help="study model names (default: all seven)")
    p.add_argument("--img-size", type=int, default=64, help="training and benchmark resolution")
    p.add_argument("--epochs", type=int, default=3, help="training epochs on the built-in digits")
    p.add_argument("--per-class", type=int, default=90, help="training images per class (10 classes)")
    p.add_argument("--val-per-class", type=int, default=50, help="validation images per class (10 classes)")
    p.add_argument("--val-limit", type=int, default=500, help="validation images in the top-1 check (at most)")
    p.add_argument("--threads", type=int, default=2, help="ORT intra-op threads")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--iters", type=int, default=100, help="timed iterations per form (at most)")
    p.add_argument("--time-budget", type=float, default=10.0, help="seconds per form (at most)")
    p.add_argument("--max-top1-drop", type=float, default=0.5, help="top-1 change (points) the goal allows")
    p.add_argument("--workdir", default="results/int8_bench", help="prepared data and trained runs (reused)")
    p.add_argument(
        "--reuse-weights", action="store_true", help="reuse finished runs under --workdir whatever their recipe"
    )
    p.add_argument("--out", help="also write the full result as JSON")
    args = p.parse_args(argv)
    result = run(args)
    if args.out:
        atomic_write_json(args.out, result)
    print(table_text(result["table"]))
    return result


if __name__ == "__main__":
    main()

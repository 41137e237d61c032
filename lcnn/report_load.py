"""Read the study's files into tables: runs from the results JSON, histories, and benchmark rows.

Everything the report shows is recomputed from these per-run records, so it never trusts a pre-computed mean.
A file that is not what its place says it is stops the report with a one-line error naming it.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from lcnn.utils import LcnnError, read_json

EQUIVALENCE_TOL = 1e-2  # a deployment form whose outputs differ more than this from eager is not an honest speed-up
INT8_MAX_TOP1_CHANGE = 0.5  # points of top-1 an int8 form may move and still back a claim (the README's int8 goal)
LATENCY_FIELDS = ("form", "engine", "device", "precision", "channels_last", "batch_size", "status", "error")
LATENCY_FIELDS += ("latency_ms_p50", "latency_ms_p99", "throughput_ips")
RUN_FIELDS = ("seed", "status", "top1", "top5", "best_top1", "best_epoch", "epochs", "epochs_completed")
RUN_FIELDS += ("train_seconds", "device", "device_type", "num_devices", "device_hours", "params", "diverged_at")
RUN_FIELDS += ("data_wait_fraction", "img_size", "num_classes")
DEVICE_CLASS = {"cuda": "GPU", "cpu": "CPU", "mps": "MPS"}  # torch device type -> the class a claim names
BENCH_MODEL_COLUMNS = [
    *("model", "timm_name", "params", "gmacs", "img_size", "device", "device_class", "excluded_forms"),
    "benchmark_note",  # why a model has no rows (its benchmarked run diverged)
]


def load_runs(paths: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per training run (from results JSON ``runs``) and one row per model x variant file."""
    runs, variants = [], []
    for path in paths:
        res = read_json(path)
        if not isinstance(res, dict) or "model" not in res or "variant" not in res or "runs" not in res:
            raise LcnnError(f"{path} is not a results file (needs model, variant, runs); rebuild it")
        variants.append({k: res.get(k) for k in ("model", "variant", "axis", "timm_name")} | {"path": str(path)})
        for m in res["runs"] or []:
            row = {"model": res["model"], "variant": res["variant"], "axis": res.get("axis") or m.get("axis")}
            row |= {k: m.get(k) for k in RUN_FIELDS}
            runs.append(row)
    runs_df = pd.DataFrame(runs, columns=["model", "variant", "axis", *RUN_FIELDS])
    numeric = ("top1", "top5", "best_top1", "device_hours", "train_seconds", "epochs", "epochs_completed")
    for col in (*numeric, "data_wait_fraction"):
        runs_df[col] = pd.to_numeric(runs_df[col], errors="coerce")
    return runs_df, pd.DataFrame(variants, columns=["model", "variant", "axis", "timm_name", "path"])


def load_histories(paths: list[str]) -> pd.DataFrame:
    """Per-epoch validation accuracy of every run, labelled from the run directory's metrics/config JSON."""
    frames = []
    for path in paths:
        path = Path(path)
        try:
            hist = pd.read_csv(path)
        except FileNotFoundError:
            raise LcnnError(f"{path} does not exist; build the run first (e.g. `snakemake {path}`)") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
            raise LcnnError(f"{path} is not a readable CSV ({err}); delete the run and retrain it") from None
        if not {"epoch", "top1"} <= set(hist.columns):
            raise LcnnError(f"{path} lacks the epoch/top1 columns; it is not a training history")
        meta: dict[str, Any] = {}
        for name in ("config.json", "metrics.json"):
            if (path.parent / name).exists():
                meta |= read_json(path.parent / name)
        parts = path.parts
        seed_dir = parts[-2] if len(parts) >= 2 else ""
        hist = hist.assign(
            model=meta.get("model", parts[-4] if len(parts) >= 4 else "?"),
            variant=meta.get("variant", parts[-3] if len(parts) >= 3 else "?"),
            seed=meta.get("seed", seed_dir.removeprefix("seed")),
            status=meta.get("status", "ok"),
        )
        frames.append(hist)
    cols = ["model", "variant", "seed", "status", "epoch", "top1"]
    return pd.concat(frames, ignore_index=True)[cols] if frames else pd.DataFrame(columns=cols)


def _device_label(device: Any, env: dict) -> str:
    """E.g. "NVIDIA L40S (cuda)": the GPU's name on CUDA, the CPU model otherwise."""
    dev = str(device or "?")
    name = env.get("device_name") if dev.startswith("cuda") else (env.get("cpu_model") or env.get("device_name"))
    return f"{name or 'unknown'} ({dev})"


def _equivalent(checks: dict, form: str, tol: float) -> bool:
    """Whether a deployment form computes the same function as the eager model, so its speed may back a claim.

    The benchmark's own verdict (``{form}_ok``, based on a relative difference) wins; without one, the
    absolute output difference must stay within ``tol``.
    """
    if checks.get(f"{form}_ok") is not None:
        return bool(checks[f"{form}_ok"])
    diff = checks.get(f"{form}_max_abs_diff")
    return diff is None or float(diff) <= tol


def _int8_admitted(checks: dict, form: str, tol: float) -> bool:
    """Whether an int8 form (``onnx_int8_static``, ...) may back a claim: int8 changes results, so it is judged by
    what it did to top-1 on validation images, which must be recorded and within INT8_MAX_TOP1_CHANGE points (in
    either direction), with its agreement with fp32 recorded too. Without a validation manifest there is no top-1
    change, so the form is shown but never backs a claim; nor does it when the fp32 export it came from failed."""
    change, agreement = checks.get(f"{form}_top1_change"), checks.get(f"{form}_fp32_top1_agreement")
    if change is None or agreement is None or not _equivalent(checks, "onnx", tol):
        return False
    return abs(float(change)) <= INT8_MAX_TOP1_CHANGE  # False for NaN


def load_benchmarks(paths: list[str], tol: float = EQUIVALENCE_TOL) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All benchmark rows (with the device named) and one row per model: size, resolution, main device."""
    rows, models = [], []
    for path in paths:
        bench = read_json(path)
        if not isinstance(bench, dict) or "model" not in bench or "rows" not in bench:
            raise LcnnError(f"{path} is not a benchmark file (needs model, rows); rebuild it")
        env, checks = bench.get("env") or {}, bench.get("checks") or {}
        torch_devs = [r.get("device") for r in bench["rows"] if r.get("engine", "torch") == "torch"]
        all_devs = torch_devs or [r.get("device") for r in bench["rows"]]
        main = Counter(all_devs).most_common(1)[0][0] if all_devs else None
        bad_forms = {form for form in ("reparam", "onnx") if not _equivalent(checks, form, tol)}
        int8 = {str(r.get("form")) for r in bench["rows"] if str(r.get("form")).startswith("onnx_int8_")}
        bad_forms |= {form for form in int8 if not _int8_admitted(checks, form, tol)}
        models.append(
            {"model": bench["model"], "timm_name": bench.get("timm_name"), "params": bench.get("params")}
            | {"gmacs": bench.get("gmacs"), "img_size": bench.get("img_size")}
            | {"device": _device_label(main, env) if main else "n/a"}
            | {"device_class": DEVICE_CLASS.get(str(main).split(":")[0], str(main)) if main else "n/a"}
            | {"excluded_forms": ",".join(sorted(bad_forms)), "benchmark_note": bench.get("reason")}
        )
        for r in bench["rows"]:
            rows.append(
                {"model": bench["model"], "device_name": _device_label(r.get("device"), env)}
                | {k: r.get(k) for k in LATENCY_FIELDS}
                | {"main_device": r.get("device") == main, "equivalent": r.get("form") not in bad_forms}
            )
    rows_df = pd.DataFrame(rows, columns=["model", "device_name", *LATENCY_FIELDS, "main_device", "equivalent"])
    for col in ("batch_size", "latency_ms_p50", "latency_ms_p99", "throughput_ips"):
        rows_df[col] = pd.to_numeric(rows_df[col], errors="coerce")
    return rows_df, pd.DataFrame(models, columns=BENCH_MODEL_COLUMNS)

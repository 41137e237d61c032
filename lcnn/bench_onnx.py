"""Edge path of lcnn.benchmark: ONNX export, ONNX Runtime (CPU) timing at batch 1, optional int8 quantization.

Why these choices:

* The deployment form is exported (reparameterized when that form passed its check), in fp32, batch axis
  dynamic, opset 17, with the TorchScript exporter (``dynamo=False``): it needs no network or onnxscript
  rewrite passes and gives compact graphs; the dynamo exporter is the fallback.
* Outputs are compared with eager PyTorch on fixed inputs (``onnx_max_abs_diff``); an export that drifts
  beyond REL_TOL is not timed (its row says why) instead of producing a fast-but-wrong number.
* ``onnx_vs_eager_speedup_b1`` compares like with like: eager PyTorch fp32, NCHW, batch 1 on the CPU with
  ``torch.set_num_threads(onnx_threads)`` against ORT with ``intra_op_num_threads = onnx_threads``, both p50.
  The eager number is taken from the sweep when that row ran on the CPU at the same thread count, else timed
  here (``onnx_eager_b1_source`` says which).
* int8 (``quantize_dynamic``, QInt8 weights) changes results, so it is judged by agreement, not by a
  tolerance: argmax agreement and max |diff| against ORT fp32 on random inputs, or, with a validation
  manifest, the top-1 of both on real images (timm's eval transform at the benchmark resolution).
"""

from __future__ import annotations

import contextlib
import copy
import io
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lcnn.benchmark import (
    REL_TOL,
    MemProbe,
    _error_text,
    _log,
    bench_torch,
    make_input,
    make_row,
    measure,
    progress_line,
    summarize,
)

OPSET = 17
N_CHECK_INPUTS = 4  # batch-1 inputs compared between eager and ORT fp32
N_AGREE_INPUTS = 32  # random inputs for the int8 agreement check when there is no validation manifest


def export_onnx(model: nn.Module, img_size: int, path: Path) -> str:
    """Export ``model`` (CPU, fp32, eval) to ``path``; returns the exporter that worked."""
    x = make_input(1, img_size, torch.device("cpu"))
    errors = []
    for dynamo in (False, True):
        kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": OPSET}
        if dynamo:
            kwargs["external_data"] = False
        else:
            kwargs["dynamic_axes"] = {"input": {0: "batch"}, "logits": {0: "batch"}}
        sink = io.StringIO()  # both exporters print progress and (recoverable) tracebacks
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kwargs)
            return "dynamo" if dynamo else "torchscript"
        except Exception as err:  # try the other exporter, then report both failures
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {_error_text(err)}")
    raise RuntimeError("ONNX export failed: " + "; ".join(errors))


def ort_session(path: Path, threads: int):
    """A CPUExecutionProvider session with ``threads`` intra-op threads and full graph optimization."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _inputs(img_size: int, n: int) -> list[np.ndarray]:
    return [make_input(1, img_size, torch.device("cpu"), seed=i).numpy() for i in range(n)]


def compare_eager(model: nn.Module, session, img_size: int) -> tuple[float, float]:
    """(max |diff|, max |diff| / max |eager|) between eager fp32 and ORT over fixed batch-1 inputs."""
    abs_diff, scale = 0.0, 1e-12
    with torch.inference_mode():
        for x in _inputs(img_size, N_CHECK_INPUTS):
            ref = model(torch.from_numpy(x)).float().numpy()
            abs_diff = max(abs_diff, float(np.abs(ref - _run(session, x)).max()))
            scale = max(scale, float(np.abs(ref).max()))
    return abs_diff, abs_diff / scale


def time_ort(session, form: str, precision: str, img_size: int, settings: dict, probe: MemProbe) -> dict:
    x = _inputs(img_size, 1)[0]
    probe.reset()
    timing = measure(
        lambda: _run(session, x), warmup=settings["warmup"], iters=settings["iters"], budget_s=settings["time_budget_s"]
    )
    stats = summarize(timing["latencies_ms"], timing["total_s"], 1)
    return make_row(**_base(form, precision, settings), **stats, peak_mem_mb=probe.peak_mb(), status="ok")


def _base(form: str, precision: str, settings: dict) -> dict[str, Any]:
    return {
        "form": form,
        "engine": "onnxruntime",
        "device": "cpu",
        "precision": precision,
        "channels_last": False,
        "batch_size": 1,
        "threads": settings["onnx_threads"],
    }


def eager_b1(model: nn.Module, deploy_form: str, img_size: int, settings: dict, sweep_rows: list, probe) -> tuple:
    """(p50 ms, source) of eager fp32 NCHW batch 1 on the CPU at onnx_threads threads."""
    threads = settings["onnx_threads"]
    for row in sweep_rows:
        same = (row["form"], row["device"], row["precision"], row["channels_last"], row["batch_size"])
        if same == (deploy_form, "cpu", "fp32", False, 1) and row["threads"] == threads and row["status"] == "ok":
            return row["latency_ms_p50"], f"sweep row ({deploy_form}, {threads} threads)"
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stats = bench_torch(
            model, device=torch.device("cpu"), precision="fp32", channels_last=False, batch=1,
            img_size=img_size, settings=settings, probe=probe,
        )  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return stats["latency_ms_p50"], f"timed here ({deploy_form}, {threads} threads, {stats['iters']} it)"


def onnx_section(
    model: nn.Module, *, deploy_form: str, img_size: int, settings: dict, sweep_rows: list, probe: MemProbe
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (form "onnx", "onnx_int8") and checks of the ONNX Runtime path; failures become rows."""
    cpu = torch.device("cpu")
    cpu_probe = MemProbe(cpu, probe.baseline if probe.device.type == "cpu" else None)
    model = copy.deepcopy(model).to(cpu).float().eval().to(memory_format=torch.contiguous_format)
    checks: dict[str, Any] = {"onnx_max_abs_diff": None, "onnx_vs_eager_speedup_b1": None, "onnx_rel_diff": None}
    checks.update(onnx_ok=None, onnx_source_form=deploy_form, onnx_opset=OPSET, onnx_threads=settings["onnx_threads"])
    rows: list[dict[str, Any]] = []
    quiet = settings["quiet"]
    with tempfile.TemporaryDirectory(prefix="lcnn-onnx-") as tmp:
        fp32_path = Path(tmp) / "model.onnx"
        try:
            checks["onnx_exporter"] = export_onnx(model, img_size, fp32_path)
            session = ort_session(fp32_path, settings["onnx_threads"])
            abs_diff, rel_diff = compare_eager(model, session, img_size)
        except Exception as err:  # export/runtime failure: record it, keep the torch rows
            rows.append(make_row(**_base("onnx", "fp32", settings), status="error", error=_error_text(err)))
            _log(progress_line(rows[-1]), quiet)
            return rows, checks
        checks.update(onnx_max_abs_diff=abs_diff, onnx_rel_diff=rel_diff, onnx_ok=rel_diff <= REL_TOL)
        if settings["onnx_out"]:
            Path(settings["onnx_out"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fp32_path, settings["onnx_out"])
        if rel_diff > REL_TOL:
            error = f"ONNX Runtime outputs differ from eager (rel diff {rel_diff:.2e} > {REL_TOL}); not timed"
            rows.append(make_row(**_base("onnx", "fp32", settings), status="error", error=error))
        else:
            try:
                eager_p50, source = eager_b1(model, deploy_form, img_size, settings, sweep_rows, cpu_probe)
                rows.append(time_ort(session, "onnx", "fp32", img_size, settings, cpu_probe))
                checks.update(onnx_eager_b1_p50_ms=eager_p50, onnx_eager_b1_source=source)
                checks["onnx_ort_b1_p50_ms"] = rows[-1]["latency_ms_p50"]
                checks["onnx_vs_eager_speedup_b1"] = eager_p50 / rows[-1]["latency_ms_p50"]
            except Exception as err:
                rows.append(make_row(**_base("onnx", "fp32", settings), status="error", error=_error_text(err)))
        _log(progress_line(rows[-1]), quiet)
        if settings["onnx_int8"]:
            rows.append(_int8(fp32_path, session, model, img_size, settings, cpu_probe, checks))
            _log(progress_line(rows[-1]), quiet)
    return rows, checks


def _int8(fp32_path: Path, fp32_session, model: nn.Module, img_size: int, settings, probe, checks) -> dict:
    """Dynamic int8 quantization: time it and record how far its predictions move from fp32."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
        from onnxruntime.quantization.shape_inference import quant_pre_process

        pre_path, int8_path = fp32_path.with_name("model.pre.onnx"), fp32_path.with_name("model.int8.onnx")
        sink = io.StringIO()
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            # ORT's recommended pre-processing (shape inference + graph optimization); without it weights that the
            # exporter left behind shared/folded nodes are not seen as initializers and quantization fails
            quant_pre_process(str(fp32_path), str(pre_path))
            quantize_dynamic(str(pre_path), str(int8_path), weight_type=QuantType.QInt8)
        session = ort_session(int8_path, settings["onnx_threads"])
        if settings["val_manifest"]:
            checks.update(_val_top1(fp32_session, session, model, img_size, settings))
        else:
            outs = [(_run(fp32_session, x), _run(session, x)) for x in _inputs(img_size, N_AGREE_INPUTS)]
            agree = np.mean([a.argmax(-1)[0] == b.argmax(-1)[0] for a, b in outs])
            checks.update(
                onnx_int8_max_abs_diff=max(float(np.abs(a - b).max()) for a, b in outs),
                onnx_int8_top1_agreement=float(agree),
                onnx_int8_check=f"argmax agreement with ORT fp32 on {N_AGREE_INPUTS} random inputs (no accuracy)",
            )
        return time_ort(session, "onnx_int8", "int8", img_size, settings, probe)
    except Exception as err:
        return make_row(**_base("onnx_int8", "int8", settings), status="error", error=_error_text(err))


def _val_top1(fp32_session, int8_session, model: nn.Module, img_size: int, settings: dict) -> dict[str, Any]:
    """Top-1 of ORT fp32 and int8 on up to val_limit manifest images, and how often they agree."""
    from timm.data import create_transform, resolve_data_config

    from lcnn.data import ManifestDataset

    data_cfg = resolve_data_config({"input_size": (3, img_size, img_size)}, model=model)
    dataset = ManifestDataset(settings["val_manifest"], transform=create_transform(**data_cfg, is_training=False))
    # evenly spaced indices: manifests are sorted by class, so the first N images would cover few classes
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(len(dataset), settings["val_limit"])).astype(int))
    n = len(indices)
    hits, agree = np.zeros(2), 0
    for i in indices:
        image, label = dataset[int(i)]
        x = image.unsqueeze(0).numpy()
        preds = [int(_run(s, x).argmax(-1)[0]) for s in (fp32_session, int8_session)]
        hits += [p == label for p in preds]
        agree += preds[0] == preds[1]
    top1 = hits / max(n, 1) * 100
    return {
        "onnx_fp32_top1": float(top1[0]),
        "onnx_int8_top1": float(top1[1]),
        "onnx_int8_top1_change": float(top1[1] - top1[0]),
        "onnx_int8_top1_agreement": agree / max(n, 1),
        "onnx_int8_check": f"top-1 on {n} images of {settings['val_manifest']} (timm eval transform)",
    }

"""Edge path of lcnn.benchmark: ONNX export, ONNX Runtime (CPU) timing at batch 1, and int8 quantization.

Why these choices:

* The deployment form is exported (reparameterized when that form passed its check), in fp32, batch axis
  dynamic, opset 17, with the TorchScript exporter (``dynamo=False``): it needs no network or onnxscript
  rewrite passes and gives compact graphs; the dynamo exporter is the fallback.
* Outputs are compared with eager PyTorch on fixed inputs (``onnx_max_abs_diff``); an export that drifts
  beyond REL_TOL is not timed (its row says why) instead of producing a fast-but-wrong number.
* ``onnx_vs_eager_speedup_b1`` compares like with like: eager PyTorch fp32, NCHW, batch 1 on the CPU with
  ``torch.set_num_threads(onnx_threads)`` against ORT with ``intra_op_num_threads = onnx_threads``, both p50.
* int8 comes in three forms, each its own row. **static**: ``quantize_static`` in QDQ format, int8 weights per
  channel, uint8 activations (U8S8, ORT's x86 choice: S8S8 ran MobileNetV3-L 7x slower on the CI machine), ranges
  calibrated (99.99th percentile) on up to CALIB_IMAGES validation images that are not among the evaluated ones;
  ORT fuses the QDQ pairs into integer kernels, which is what makes int8 faster. It needs a validation manifest.
  Nodes that compute only from shapes and constants stay float (:func:`shape_only_nodes`): EfficientNetV2-S's
  TF-"same" padding works out its pad amounts in float arithmetic on the input's size, and quantized to uint8
  those amounts cost it 50-59 top-1 points (fp32 agreement 34 %); kept float, its static form is within 0.5
  top-1 points and faster than fp32.
  **static_conv**: the same with only Conv/MatMul/Gemm quantized, for models that quantizing every op breaks
  or slows (ConvNeXt-T ran faster so, and moved top-1 less).
  **dynamic**: ``quantize_dynamic`` (int8 weights, activations quantized at run time); its convolutions become
  ConvInteger, which ORT runs slowly, so on CNNs it is usually slower than fp32.
* int8 changes results, so it is judged by agreement, not by a tolerance: with a validation manifest, the top-1 of
  ORT fp32 and of each int8 form on the same ``val_limit`` images (``onnx_int8_<form>_top1_change``); without one,
  argmax agreement and max |diff| against ORT fp32 on random inputs. Non-finite outputs make the row "nan".
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

from lcnn import timing
from lcnn.timing import REL_TOL, MemProbe, error_text, log, make_input, make_row, progress_line

OPSET = 17
N_CHECK_INPUTS = 4  # batch-1 inputs compared between eager and ORT fp32
N_AGREE_INPUTS = 32  # random inputs for the int8 agreement check when there is no validation manifest
CALIB_IMAGES = 64  # validation images that calibrate static int8's activation ranges
CALIB_PERCENTILE = 99.99  # activation range = this percentile of |activations| (MinMax moved top-1 more here)
STATIC_CONV_OPS = ["Conv", "MatMul", "Gemm"]  # static_conv: only these go int8 (attention and norms stay fp32)
EVAL_BATCH = 16  # images per ORT call in the int8 top-1 check (the batch axis is dynamic)
ORT_ROUNDS = 5  # interleaved timing rounds of the ORT forms (see time_ort)


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
        try:
            with _quiet():
                torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kwargs)
            return "dynamo" if dynamo else "torchscript"
        except Exception as err:  # try the other exporter, then report both failures
            errors.append(f"{'dynamo' if dynamo else 'torchscript'} exporter: {error_text(err)}")
    raise RuntimeError("ONNX export failed: " + "; ".join(errors))


@contextlib.contextmanager
def _quiet():
    """Exporters and quantizers print progress and (recoverable) tracebacks; keep the benchmark log readable."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        yield


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


def run_session(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def _inputs(img_size: int, n: int) -> list[np.ndarray]:
    return [make_input(1, img_size, torch.device("cpu"), seed=i).numpy() for i in range(n)]


def compare_eager(model: nn.Module, session, img_size: int) -> tuple[float, float]:
    """(max |diff|, max |diff| / max |eager|) between eager fp32 and ORT over fixed batch-1 inputs; both NaN when
    either side's outputs are not finite (``max(0.0, nan)`` is 0.0, so a NaN must never reach the running max)."""
    abs_diff, scale = 0.0, 1e-12
    with torch.inference_mode():
        for x in _inputs(img_size, N_CHECK_INPUTS):
            ref = model(torch.from_numpy(x)).float().numpy()
            out = run_session(session, x)
            if not (np.isfinite(ref).all() and np.isfinite(out).all()):
                return float("nan"), float("nan")
            abs_diff = max(abs_diff, float(np.abs(ref - out).max()))
            scale = max(scale, float(np.abs(ref).max()))
    return abs_diff, abs_diff / scale


def time_ort(pending: list[tuple[Any, dict]], img_size: int, settings: dict, probe: MemProbe) -> list[dict]:
    """An "ok" row per ``(session, row fields)``, all timed at batch 1 on one fixed input, in interleaved rounds.

    Each form gets ``iters`` iterations (and ``time_budget_s``) split over ORT_ROUNDS rounds, and each round times
    every form once. This host's speed drifts between regimes: one session's p50 over 100 iterations moved
    between 0.93 and 1.36 ms (MobileNetV3-L, 64 px) from one block to the next. Timed one after another, two
    forms can land in different regimes, and their ratio (the int8 speed-up) says more about the host than about
    int8; interleaved, every form samples the same regimes.
    """
    x = _inputs(img_size, 1)[0]
    rounds = max(1, min(ORT_ROUNDS, settings["iters"]))
    budget = settings["time_budget_s"] / rounds if settings["time_budget_s"] is not None else None
    latencies: list[list[float]] = [[] for _ in pending]
    wall, peaks = [0.0] * len(pending), [None] * len(pending)
    for r in range(rounds):
        iters = settings["iters"] // rounds + (r < settings["iters"] % rounds)
        for i, (session, _) in enumerate(pending):
            got = timing.measure(
                lambda session=session: run_session(session, x),
                warmup=settings["warmup"] if r == 0 else 1,
                iters=iters,
                budget_s=budget,
                on_warm=probe.reset,  # the peak of the timed calls, as for the torch rows
            )
            latencies[i] += got["latencies_ms"]
            wall[i] += got["total_s"]
            if (peak := probe.peak_mb()) is not None:  # None: this host cannot reset its peak-RSS mark
                peaks[i] = peak if peaks[i] is None else max(peaks[i], peak)
    return [
        make_row(**fields, **timing.latency_stats(latencies[i], wall[i], 1), peak_mem_mb=peaks[i], status="ok")
        for i, (_, fields) in enumerate(pending)
    ]


def _timed(rows: list[Any], img_size: int, settings: dict, probe: MemProbe) -> list[dict]:
    """``rows`` with every ``(session, fields)`` entry replaced by its row from one interleaved :func:`time_ort`."""
    pending = [entry for entry in rows if isinstance(entry, tuple)]
    timed = iter(time_ort(pending, img_size, settings, probe))
    return [next(timed) if isinstance(entry, tuple) else entry for entry in rows]


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
    with timing.torch_threads(threads):
        stats = timing.time_torch(
            model, device=torch.device("cpu"), precision="fp32", channels_last=False, batch=1,
            img_size=img_size, settings=settings, probe=probe,
        )  # fmt: skip
    return stats["latency_ms_p50"], f"timed here ({deploy_form}, {threads} threads, {stats['iters']} it)"


def onnx_section(
    model: nn.Module, *, deploy_form: str, img_size: int, settings: dict, sweep_rows: list, probe: MemProbe
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows (form "onnx", "onnx_int8_static", "onnx_int8_dynamic") and checks of the ONNX Runtime path."""
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
            rows.append(make_row(**_base("onnx", "fp32", settings), status="error", error=error_text(err)))
            log(progress_line(rows[-1]), quiet)
            return rows, checks
        checks.update(onnx_max_abs_diff=abs_diff, onnx_rel_diff=rel_diff, onnx_ok=rel_diff <= REL_TOL)
        if settings["onnx_out"]:
            Path(settings["onnx_out"]).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(fp32_path, settings["onnx_out"])
        if not np.isfinite(rel_diff):
            error = "eager or ONNX Runtime outputs are not finite; not timed"
            rows.append(make_row(**_base("onnx", "fp32", settings), status="nan", error=error))
        elif not rel_diff <= REL_TOL:
            error = f"ONNX Runtime outputs differ from eager (rel diff {rel_diff:.2e} > {REL_TOL}); not timed"
            rows.append(make_row(**_base("onnx", "fp32", settings), status="error", error=error))
        else:
            rows.append((session, _base("onnx", "fp32", settings)))
        if settings["onnx_int8"]:
            rows += int8_rows(fp32_path, session, model, img_size, settings, checks)
        try:
            rows = _timed(rows, img_size, settings, cpu_probe)
        except Exception as err:
            rows = [_failed(row, err) for row in rows]
        if rows[0]["status"] == "ok":
            try:
                eager_p50, source = eager_b1(model, deploy_form, img_size, settings, sweep_rows, cpu_probe)
                checks.update(onnx_eager_b1_p50_ms=eager_p50, onnx_eager_b1_source=source)
                checks["onnx_ort_b1_p50_ms"] = rows[0]["latency_ms_p50"]
                checks["onnx_vs_eager_speedup_b1"] = eager_p50 / rows[0]["latency_ms_p50"]
            except Exception as err:
                rows[0] = make_row(**_base("onnx", "fp32", settings), status="error", error=error_text(err))
        for row in rows:
            log(progress_line(row), quiet)
    return rows, checks


def _failed(entry: Any, err: BaseException) -> dict:
    """An error row for an entry still waiting to be timed (a finished row stays as it is)."""
    return make_row(**entry[1], status="error", error=error_text(err)) if isinstance(entry, tuple) else entry


class _Calibration:
    """The CalibrationDataReader protocol over fixed image batches (ORT calls get_next until it returns None)."""

    def __init__(self, input_name: str, batches: list[np.ndarray]):
        self._feeds = iter([{input_name: x} for x in batches])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


class Int8Data:
    """The images int8 is calibrated and judged on: validation images (disjoint when the manifest allows it)."""

    def __init__(self, model: nn.Module, img_size: int, settings: dict):
        self.labels: np.ndarray | None = None
        self.calib: list[np.ndarray] = []
        if not settings["val_manifest"]:
            self.eval = _inputs(img_size, N_AGREE_INPUTS)
            self.text = f"argmax agreement with ORT fp32 on {N_AGREE_INPUTS} random inputs (no accuracy)"
            return
        dataset = timing.val_images(settings["val_manifest"], model, img_size)
        eval_idx = timing.val_indices(len(dataset), settings["val_limit"])
        rest = np.setdiff1d(np.arange(len(dataset)), eval_idx)
        calib_idx = rest[timing.val_indices(len(rest), CALIB_IMAGES)] if len(rest) else eval_idx[:CALIB_IMAGES]
        batches = timing.image_batches(dataset, eval_idx, EVAL_BATCH)
        self.eval = [x.numpy() for x, _ in batches]
        self.labels = np.concatenate([y.numpy() for _, y in batches])
        # one image per feed: ORT's percentile calibrator stacks the feeds' outputs, so they must have one shape
        self.calib = [x.numpy() for x, _ in timing.image_batches(dataset, calib_idx, 1)]
        overlap = "disjoint from them" if len(rest) else "the same images: the manifest has no others"
        self.text = (
            f"top-1 on {len(eval_idx)} images of {settings['val_manifest']} (the trainer's eval transform); "
            f"static int8 calibrated on {len(calib_idx)} validation images, {overlap}"
        )

    def logits(self, session) -> np.ndarray:
        return np.concatenate([run_session(session, x) for x in self.eval])


def quantize(form: str, pre_path: Path, out: Path, calib: list[np.ndarray]) -> None:
    """Write the ``form`` ("static", "static_conv" or "dynamic") int8 model of the pre-processed fp32 model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with _quiet():
        if form == "dynamic":
            quantize_dynamic(str(pre_path), str(out), weight_type=QuantType.QInt8)
            return
        if not calib:
            raise ValueError("static int8 needs validation images to calibrate on; pass --val-manifest")
        import onnx

        graph = onnx.load(str(pre_path), load_external_data=False).graph
        name = graph.input[0].name
        quantize_static(
            str(pre_path), str(out), _Calibration(name, calib), quant_format=QuantFormat.QDQ, per_channel=True,
            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Percentile, extra_options={"CalibPercentile": CALIB_PERCENTILE},
            op_types_to_quantize=STATIC_CONV_OPS if form == "static_conv" else None,
            nodes_to_exclude=shape_only_nodes(graph),
        )  # fmt: skip


def shape_only_nodes(graph) -> list[str]:
    """Names of the nodes of ``graph`` whose every input derives from shapes and constants, not from the image.

    Such nodes do arithmetic on sizes: TF-"same" padding (timm's ``tf_`` models) casts the input's height and width
    to float and computes its pad amounts with Div, Ceil, Sub and Clip; reshapes build their targets from Shape.
    ``quantize_static`` quantizes every float op it knows, these included, and calibrated uint8 cannot hold a pad
    amount exactly, so the padding (and every layer after it) goes wrong without an error.
    """
    derived = {t.name for t in graph.initializer}
    names = []
    for node in graph.node:  # ONNX stores nodes in topological order
        if node.op_type == "Shape" or all(not i or i in derived for i in node.input):
            derived.update(node.output)
            names.append(node.name)
    return names


def _pre_process(src: Path, dst: Path) -> None:
    """ORT's quantization pre-processing, falling back to ONNX's own shape inference where ORT's symbolic one fails.

    TinyViT's graph fails it ("Incomplete symbolic shape inference"), and ORT then dumps the model (~80 MB of
    external data) into the current directory; running it from a temporary one keeps the user's folder clean.
    """
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = src.resolve(), dst.resolve()
    with tempfile.TemporaryDirectory(prefix="lcnn_quant_") as scratch, contextlib.chdir(scratch):
        try:
            quant_pre_process(str(src), str(dst))
        except Exception as err:
            if "symbolic shape" not in str(err):
                raise
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)


def int8_rows(fp32_path: Path, fp32_session, model: nn.Module, img_size: int, settings, checks) -> list:
    """Per int8 form in ``settings['onnx_int8']``, a ``(session, row fields)`` to time, or a finished row where the
    form failed or gave non-finite outputs; each form's agreement with ORT fp32 goes in ``checks``."""
    rows = []
    try:
        data = Int8Data(model, img_size, settings)
        pre_path = fp32_path.with_name("model.pre.onnx")
        with _quiet():
            # ORT's recommended pre-processing (shape inference + graph optimization); without it weights that the
            # exporter left behind shared/folded nodes are not seen as initializers and quantization fails
            _pre_process(fp32_path, pre_path)
        ref = data.logits(fp32_session)
    except Exception as err:
        error = error_text(err)
        return [
            make_row(**_base(f"onnx_int8_{f}", "int8", settings), status="error", error=error)
            for f in settings["onnx_int8"]
        ]
    checks["onnx_int8_check"] = data.text
    if data.labels is not None:
        checks["onnx_fp32_top1"] = float((ref.argmax(-1) == data.labels).mean() * 100)
    for form in settings["onnx_int8"]:
        base = _base(f"onnx_int8_{form}", "int8", settings)
        try:
            path = fp32_path.with_name(f"model.int8.{form}.onnx")
            quantize(form, pre_path, path, data.calib)
            session = ort_session(path, settings["onnx_threads"])
            out = data.logits(session)
            agreement = _agreement(out, ref)
            checks.update({f"onnx_int8_{form}_{k}": v for k, v in agreement.items()})
            if data.labels is not None:
                top1 = float((out.argmax(-1) == data.labels).mean() * 100)
                checks.update({f"onnx_int8_{form}_top1": top1})
                checks[f"onnx_int8_{form}_top1_change"] = top1 - checks["onnx_fp32_top1"]
            if not np.isfinite(agreement["fp32_max_abs_diff"]):
                rows.append(make_row(**base, **agreement, status="nan", error="int8 outputs are not finite; not timed"))
                continue
            rows.append((session, {**base, **agreement}))
        except Exception as err:
            rows.append(make_row(**base, status="error", error=error_text(err)))
    return rows


def _agreement(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """Row fields: how far int8 logits are from ORT fp32's on the same images."""
    abs_diff = float(np.abs(out - ref).max()) if np.isfinite(out).all() else float("nan")
    return {
        "fp32_max_abs_diff": abs_diff,
        "fp32_rel_diff": abs_diff / max(float(np.abs(ref).max()), 1e-12),
        "fp32_top1_agreement": float((out.argmax(-1) == ref.argmax(-1)).mean()),
    }

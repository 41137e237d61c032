"""Inference benchmark of one model: per-batch latency distribution, throughput, memory and deployment checks.

Why it is built this way (what a deployment engineer needs to trust the numbers):

* Timing, memory and row shape come from :mod:`lcnn.timing`, shared with the ONNX path: per-batch latencies
  (CUDA events on the GPU), warm-up and a time budget per configuration; the row's ``iters`` says how many ran.
* Precisions are autocast dtypes (fp32 weights, activations in fp16/bf16). fp16 on the CPU is recorded as
  "unsupported" rather than timed through slow fallback kernels.
* **Numerics before speed** (lcnn.bench_checks): every fp16/bf16 and every compiled configuration is first
  compared with the trained model in exact fp32 (TF32 off), on validation images when a manifest is given; its
  rows record ``fp32_max_abs_diff``, ``fp32_rel_diff`` and ``fp32_top1_agreement``, and outputs that are not
  finite ("nan") or that disagree ("mismatch") are never timed.
* ``peak_mem_mb``: GPU = ``torch.cuda.max_memory_allocated`` during the configuration, which counts every tensor of
  the process, so the check images stay on the host and the trained model leaves the GPU once the fused form is
  what is timed (:func:`_parked`); CPU = peak RSS minus the process RSS before the model was built (:func:`run`),
  an upper-side estimate (see :class:`lcnn.timing.MemProbe`).
* An out-of-memory batch (``torch.cuda.OutOfMemoryError``, or a CPU allocator's RuntimeError/MemoryError) becomes
  an "oom" row: memory is freed, larger batches of that configuration are recorded as "oom" without running, and
  the next configuration starts again from the smallest batch. Any other exception becomes an "error" row; the
  sweep goes on and the JSON is always written. A sticky CUDA error (:class:`DeviceLost`) ends the sweep at its
  row, with no further CUDA call; the JSON of the rows so far is written and the job fails in one line.
* Deployment forms: "trained", "reparam" (``timm.utils.model.reparameterize_model`` when it changes the model:
  RepVGG, MobileOne, FastViT, TinyViT's conv-bn; checked equal to the trained form with TF32 off, so TF32 noise
  cannot reject it), "compiled" (``torch.compile``; where no compiler is found, or compiling fails, its rows are
  "skipped" with the reason), and the ONNX Runtime edge path (lcnn.bench_onnx, with static and dynamic int8).

Defaults are the schema's (``schemas/config.schema.yaml``, section ``benchmark``): the standalone CLI and the
Snakemake rule resolve the same settings. The top level also records ``host_other_cpu_share``: the fraction of the
host's CPU time other processes used during the run; CPU timings above a few percent are not trustworthy.

``python -m lcnn.benchmark --timm-name resnet18 --num-classes 10`` benchmarks a random-init timm model.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lcnn import devices, timing
from lcnn.bench_checks import Reference, check_config, output_diff, reparameterized
from lcnn.config import schema_defaults, validate_section
from lcnn.timing import REL_TOL, MemProbe, error_text, log, make_input, make_row, progress_line
from lcnn.utils import LcnnError, atomic_write_json, cli, environment, exit_now, json_arg, read_json

PRECISIONS = ("fp32", "fp16", "bf16")
# CUDA errors that leave the process's CUDA context unusable: every later CUDA call fails with them
STICKY_CUDA_ERRORS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "illegal instruction",
    "misaligned address",
    "uncorrectable ECC error",
)
INT8_FORMS = ("static", "static_conv", "dynamic")
IGNORED_KEYS = {"variant"}  # benchmark-section keys that concern the workflow, not this tool
RUNTIME_DEFAULTS = {"val_manifest": None, "onnx_out": None, "quiet": False}  # tool settings, not config keys
DEFAULTS: dict[str, Any] = {
    **{k: v for k, v in schema_defaults("benchmark").items() if k not in IGNORED_KEYS},
    **RUNTIME_DEFAULTS,
}


def resolve_device(name: str) -> torch.device:
    """``auto``, ``cpu`` or ``cuda``: a job given a GPU that torch cannot see stops here (lcnn.devices)."""
    if name not in ("auto", "cpu", "cuda"):
        raise LcnnError(f"unsupported benchmark device '{name}'; use auto, cpu or cuda")
    return torch.device(devices.resolve(name, "benchmark.device"))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: int, device: torch.device) -> int | None:
    """FLOPs of one forward pass at batch 1 (FlopCounterMode counts a multiply-add as 2 FLOPs)."""
    from torch.utils.flop_counter import FlopCounterMode

    try:
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(make_input(1, img_size, device))
        return int(counter.get_total_flops())
    except Exception as err:  # an exotic op the counter cannot trace must not stop the benchmark
        log(f"[bench] FLOP counting failed: {type(err).__name__}: {err}")
        return None


def _compiled(model: nn.Module, n_shapes: int) -> Callable:
    """torch.compile with one static graph per batch size; the recompile limit is raised so that no batch size
    silently falls back to eager (dynamo's default limit is 8 graphs)."""
    torch._dynamo.reset()
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), n_shapes + 4))
    return torch.compile(model, dynamic=False)


class DeviceLost(Exception):
    """A sticky CUDA error: every later CUDA call of the process fails (freeing memory, moving a model), so the
    sweep ends at once, carrying the rows measured so far up to :func:`benchmark_model`."""

    def __init__(self, rows: list[dict[str, Any]]):
        super().__init__(rows[-1]["error"])
        self.rows = rows


def sweep_form(
    form: str, model: nn.Module, settings: dict, device: torch.device, img_size: int, probe: MemProbe,
    skip: tuple[str, str] | None = None, compile_model: bool = False, reference: Reference | None = None,
) -> list[dict[str, Any]]:  # fmt: skip
    """All precision x memory-format x batch-size rows of one form; failures become rows, never exceptions.

    ``skip`` = (status, why) records every row of the form untimed.
    """
    rows = []
    for precision in settings["precisions"]:
        unsupported = devices.precision_unsupported(precision, device.type)
        for cl in settings["channels_last"]:
            status, why = skip or (("unsupported", unsupported) if unsupported else (None, None))
            module: Callable = model
            agreement: dict[str, Any] = {}
            if status is None:
                model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
                if compile_model:
                    module = _compiled(model, len(settings["batch_sizes"]))
                agreement, status, why = check_config(module, precision, cl, device, reference, compile_model)
            try:
                rows += _sweep_batches(
                    form, module, precision, cl, settings, device, img_size, probe, agreement, status, why,
                    compiled=compile_model,
                )  # fmt: skip
            except DeviceLost as lost:
                raise DeviceLost(rows + lost.rows) from None
    model.to(memory_format=torch.contiguous_format)
    return rows


def _sweep_batches(
    form, module, precision, cl, settings, device, img_size, probe, agreement, status, why, compiled=False
) -> list:
    """One configuration's rows, smallest batch first; after an OOM the larger batches are not run."""
    rows: list[dict[str, Any]] = []
    oom_at = None
    for batch in settings["batch_sizes"]:
        base = {"form": form, "engine": "torch", "device": device.type, "precision": precision}
        base.update(channels_last=cl, batch_size=batch, threads=torch.get_num_threads(), **agreement)
        if status is not None:
            rows.append(make_row(**base, status=status, error=why))
            if batch != settings["batch_sizes"][0]:
                continue  # one progress line for the whole configuration
        elif oom_at is not None:
            rows.append(make_row(**base, status="oom", error=f"skipped: batch {oom_at} already ran out of memory"))
        else:
            failure = None
            try:
                stats = timing.time_torch(
                    module, device=device, precision=precision, channels_last=cl, batch=batch,
                    img_size=img_size, settings=settings, probe=probe, compiled=compiled,
                )  # fmt: skip
                rows.append(make_row(**base, **stats, status="ok"))
            except Exception as err:  # one configuration's failure must not lose the others
                failure = ("oom" if timing.is_oom(err) else "error", error_text(err))
            if failure:  # outside the except block, so the traceback's tensors can be freed
                rows.append(make_row(**base, status=failure[0], error=failure[1]))
                if _sticky_cuda_error(rows[-1]):
                    log(progress_line(rows[-1]), settings["quiet"])
                    break
                timing.free_memory(device)
                oom_at = batch if failure[0] == "oom" else None
        log(progress_line(rows[-1]), settings["quiet"])
    if rows and _sticky_cuda_error(rows[-1]):  # also a compiled configuration whose check failed so ("skipped")
        raise DeviceLost(rows)
    return rows


def _reparam_form(model, settings, img_size, device, forms, checks) -> tuple[nn.Module | None, tuple | None]:
    """(fused model or None, skip) after checking the fused form against the trained one in exact fp32."""
    fused, skip = None, None
    try:
        fused = reparameterized(model) if settings["reparameterize"] else None
        if fused is not None:
            abs_diff, rel_diff = output_diff(model, fused, img_size, device)  # NaN when an output is not finite
            checks.update(reparam_max_abs_diff=abs_diff, reparam_rel_diff=rel_diff, reparam_ok=rel_diff <= REL_TOL)
            forms["reparam"] = {"params": count_params(fused), "flops": count_flops(fused, img_size, device)}
            if not math.isfinite(rel_diff):
                skip = ("nan", "trained or reparameterized outputs are not finite; not timed")
            elif not rel_diff <= REL_TOL:
                skip = ("error", f"reparameterized outputs differ from trained (rel diff {rel_diff:.2e} > {REL_TOL})")
    except Exception as err:  # a broken fuse() must not lose the trained rows
        skip, fused = ("error", f"reparameterization failed: {error_text(err)}"), fused or model
        checks["reparam_ok"] = False
    return fused, skip


@contextlib.contextmanager
def _parked(model: nn.Module, device: torch.device, active: bool):
    """Keep ``model`` in host memory inside the block when ``active`` on a GPU, then put it back on ``device``.

    Once the fused form is what is timed, the trained model would otherwise stay resident and count in every
    later row's ``peak_mem_mb`` (``torch.cuda.max_memory_allocated`` sees all of the process's tensors). On the
    CPU there is nowhere else to keep it, and peak RSS is an upper-side estimate anyway.
    """
    if not active or device.type != "cuda":
        yield
        return
    model.to("cpu")
    timing.free_memory(device)
    try:
        yield
    except DeviceLost:
        raise  # the GPU takes no more calls: the model stays where it is
    except BaseException:
        model.to(device)
        raise
    model.to(device)


def benchmark_model(model: nn.Module, cfg: dict[str, Any], rss_baseline_mb: float | None = None) -> dict[str, Any]:
    """Benchmark an already built model; ``cfg`` as for :func:`run` (model_name, timm_name, ..., benchmark)."""
    settings = resolve_settings(cfg.get("benchmark") or {})
    device = resolve_device(settings["device"])
    img_size = settings["img_size"] or cfg.get("img_size") or _default_img_size(model)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    probe = MemProbe(device, rss_baseline_mb)
    env = environment()  # first: after a sticky CUDA error (DeviceLost) no CUDA call may be made
    load_start, cpu_start = timing.load_avg(), timing.host_cpu_times()
    model = model.eval().to(device)
    forms: dict[str, dict[str, Any]] = {"trained": {"params": count_params(model)}}
    forms["trained"]["flops"] = count_flops(model, img_size, device)
    checks: dict[str, Any] = {"reparam_max_abs_diff": None, "onnx_max_abs_diff": None}
    checks["onnx_vs_eager_speedup_b1"] = None
    needs_reference = settings["compile"] or any(p != "fp32" for p in settings["precisions"])
    reference = Reference.for_model(model, settings, img_size, device) if needs_reference else None
    checks["fp32_agreement_inputs"] = reference.source if reference else None
    settings["val_manifest_error"] = reference.fallback if reference else None  # set: the check fell back to noise
    rows: list[dict[str, Any]] = []
    try:
        _sweep_forms(rows, model, settings, device, img_size, probe, reference, forms, checks)
    except DeviceLost as lost:  # the rows so far; run() writes them and fails the job in one line
        rows += lost.rows
    other_share = timing.other_cpu_share(cpu_start, timing.host_cpu_times())
    if other_share is not None and other_share > 0.05:
        log(f"[bench] warning: other processes used {other_share:.0%} of this host's CPU time during the benchmark; "
            "CPU timings are unreliable, rerun on an idle host")  # fmt: skip
    return {
        "model": cfg.get("model_name") or cfg.get("timm_name") or type(model).__name__,
        "timm_name": cfg.get("timm_name"),
        "img_size": img_size,
        "num_classes": cfg.get("num_classes"),
        "weights": str(cfg["weights"]) if cfg.get("weights") else None,
        "device": device.type,
        "env": env,
        "params": forms["trained"]["params"],
        "gmacs": forms["trained"]["flops"] / 2e9 if forms["trained"]["flops"] is not None else None,
        "flops": forms["trained"]["flops"],
        "forms": forms,
        "rows": rows,
        "checks": checks,
        "settings": {**settings, **_backend_flags(device)},
        "host_load_avg_1m": {"start": load_start, "end": timing.load_avg()},
        "host_other_cpu_share": other_share,  # other work on the host skews CPU timings; ~0 means a clean run
    }


def _sweep_forms(rows: list, model, settings, device, img_size, probe, reference, forms, checks) -> None:
    """Add every form's rows to ``rows`` as each form ends (trained, reparameterized, compiled, ONNX Runtime), and
    fill in ``forms`` and ``checks``; a :class:`DeviceLost` carries the rows of the form it ended."""
    rows += sweep_form("trained", model, settings, device, img_size, probe, reference=reference)
    deploy, deploy_form = model, "trained"
    fused, skip = _reparam_form(model, settings, img_size, device, forms, checks)
    if fused is not None and skip is None:
        deploy, deploy_form = fused, "reparam"
    with _parked(model, device, deploy is not model):  # the trained model is not what is timed from here on
        if fused is not None:
            rows += sweep_form("reparam", fused, settings, device, img_size, probe, skip=skip, reference=reference)
        if settings["compile"]:
            missing = devices.compiler_missing(device)
            if missing:
                log(f"[bench] compile: {missing}; the compiled rows are recorded as skipped", settings["quiet"])
            skip = ("skipped", missing) if missing else None
            checks["compile_missing"] = missing
            rows += sweep_form(
                "compiled", deploy, settings, device, img_size, probe, skip=skip, compile_model=True,
                reference=reference,
            )  # fmt: skip
        if settings["onnx"]:
            from lcnn import bench_onnx  # imported lazily: onnx/onnxruntime are only needed for this path

            onnx_rows, onnx_checks = bench_onnx.onnx_section(
                deploy, deploy_form=deploy_form, img_size=img_size, settings=settings, sweep_rows=rows, probe=probe
            )
            rows += onnx_rows
            checks.update(onnx_checks)


def _backend_flags(device: torch.device) -> dict[str, Any]:
    flags: dict[str, Any] = {"torch_threads": torch.get_num_threads(), "cpu_capability": None}
    with contextlib.suppress(Exception):
        flags["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    if device.type == "cuda":  # TF32 changes what "fp32" means on Ampere and newer GPUs (timed rows keep it)
        flags.update(
            cuda_matmul_tf32=torch.backends.cuda.matmul.allow_tf32,
            cudnn_tf32=torch.backends.cudnn.allow_tf32,
            cudnn_benchmark=torch.backends.cudnn.benchmark,
        )
    return flags


def _default_img_size(model: nn.Module) -> int:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def int8_forms(value: bool | list[str]) -> list[str]:
    """``onnx_int8`` as a list of forms: true = all of INT8_FORMS, false = none, or the list as given."""
    if isinstance(value, bool):
        return list(INT8_FORMS) if value else []
    return list(dict.fromkeys(value))


def resolve_settings(section: dict[str, Any]) -> dict[str, Any]:
    """The benchmark section validated against the schema, over the schema's defaults, plus the tool settings."""
    runtime = {key: section.get(key, default) for key, default in RUNTIME_DEFAULTS.items()}
    values = {k: v for k, v in section.items() if k not in RUNTIME_DEFAULTS}
    if isinstance(values.get("channels_last"), bool):
        values["channels_last"] = [values["channels_last"]]
    s = validate_section("benchmark", values)
    for key in IGNORED_KEYS:
        s.pop(key, None)
    s["batch_sizes"] = sorted(set(s["batch_sizes"]))  # ascending, so an OOM can skip the larger ones
    s["precisions"] = list(dict.fromkeys(s["precisions"]))
    s["channels_last"] = list(dict.fromkeys(s["channels_last"]))
    s["onnx_int8"] = int8_forms(s["onnx_int8"])
    return {**s, **runtime}


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build the model (lcnn.models, weights optional), benchmark it and write ``cfg['out']`` atomically.

    cfg keys: timm_name, model_name (defaults to timm_name), num_classes (1000), img_size (training resolution;
    None = the model's default), pretrained_tag (whose normalisation and crop the run trained with), weights
    (safetensors path or None = random init), out (JSON path or None), benchmark (the config's benchmark section;
    missing keys take the schema's defaults).
    """
    from lcnn import models

    resolve_device(resolve_settings(cfg.get("benchmark") or {})["device"])  # fail fast, before building the model
    ran = read_json(cfg["run_metrics"]) if cfg.get("run_metrics") else None
    if ran is not None and ran.get("status") != "ok":  # a diverged run's weights are not worth timing
        return _not_benchmarked(cfg, ran)
    rss_baseline = timing.rss_mb()
    model = models.create(
        cfg["timm_name"], cfg.get("num_classes") or 1000, img_size=cfg.get("img_size"),
        pretrained_tag=cfg.get("pretrained_tag"),  # its normalisation and eval crop: the validation check's images
    )  # fmt: skip
    if cfg.get("weights"):
        models.load_weights(model, cfg["weights"])
    else:
        log("[bench] no --weights: benchmarking a random-init model (timing is valid, accuracy checks are not)")
    result = benchmark_model(model, cfg, rss_baseline_mb=rss_baseline)
    if cfg.get("out"):
        atomic_write_json(cfg["out"], result)
        counts: dict[str, int] = {}
        for row in result["rows"]:
            counts[row["status"]] = counts.get(row["status"], 0) + 1
        log(f"[bench] wrote {cfg['out']} ({', '.join(f'{n} {s}' for s, n in counts.items())})")
    poisoned = next((r["error"] for r in result["rows"] if _sticky_cuda_error(r)), None)
    if poisoned:  # its rows stay in the log; as a job that succeeded, its error rows would stand in the report
        raise LcnnError(
            f"the GPU failed with '{poisoned}', after which every CUDA call in the process fails: check the node's "
            "GPU and driver (nvidia-smi, Xid errors in dmesg) and rerun the benchmark, on another node if it recurs"
        )
    return result


def _sticky_cuda_error(row: dict[str, Any]) -> bool:
    """Whether a row's failure left the CUDA context unusable. A compiled configuration's first call is where
    compiling happens, and its failure is recorded as "skipped": a sticky CUDA error can surface there too."""
    return row["status"] in ("error", "skipped") and any(e in (row.get("error") or "") for e in STICKY_CUDA_ERRORS)


def _not_benchmarked(cfg: dict[str, Any], ran: dict[str, Any]) -> dict[str, Any]:
    """The benchmark file of a model whose benchmarked run did not finish ok: no rows, and the reason."""
    at = ran.get("diverged_at") or {}
    where = (f" ({at['reason']})" if at.get("reason") else f" at epoch {at['epoch']} step {at['step']}") if at else ""
    run = f"{ran.get('model')}/{ran.get('variant')}/seed{ran.get('seed')}"
    reason = f"not benchmarked: its benchmarked run {run} {ran.get('status')}{where}"
    result = {"model": cfg.get("model_name") or cfg["timm_name"], "timm_name": cfg["timm_name"], "rows": []}
    result |= {"status": ran.get("status"), "reason": reason, "img_size": cfg.get("img_size"), "checks": {}}
    result["env"] = environment()
    if cfg.get("out"):
        atomic_write_json(cfg["out"], result)
    log(f"[bench] {reason}; wrote {cfg.get('out')} without timing it")
    return result


def _csv(kind: Callable[[str], Any]) -> Callable[[str], list]:
    return lambda text: [kind(item.strip()) for item in text.split(",") if item.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark a timm model's inference (latency, throughput, ONNX).")
    p.add_argument("--timm-name", help="timm architecture, e.g. mobilenetv3_large_100 (or from --run-config)")
    p.add_argument("--model-name", help="study name for the output (default: the run config's model or timm name)")
    p.add_argument("--weights", help="safetensors weights (default: random init, for timing only)")
    p.add_argument("--run-config", help="a training run's config.json: supplies timm_name, num_classes, img_size")
    p.add_argument("--run-metrics", help="that run's metrics.json: a run that diverged is recorded, not timed")
    p.add_argument("--num-classes", type=int, help="classifier classes (default: run config's, else 1000)")
    p.add_argument("--img-size", type=int, help="training resolution (default: run config's, else the model's)")
    p.add_argument("--config-json", help="JSON file holding the config's benchmark section; flags override it")
    p.add_argument("--out", help="output JSON (default: benchmarks/{model}.json)")
    p.add_argument("--bench-img-size", type=int, dest="bench_img_size", help="benchmark resolution override")
    p.add_argument("--batch-sizes", type=_csv(int), help="e.g. 1,8,32")
    p.add_argument("--precisions", type=_csv(str), help="e.g. fp32,bf16")
    p.add_argument("--device", help="auto, cpu or cuda")
    p.add_argument("--iters", type=int, help="timed iterations per configuration (at most)")
    p.add_argument("--warmup", type=int, help="untimed warm-up iterations per configuration")
    p.add_argument("--time-budget", type=float, dest="time_budget_s", help="seconds per configuration (at most)")
    p.add_argument("--channels-last", choices=("both", "on", "off"))
    p.add_argument("--compile", action="store_const", const=True, help="also time torch.compile'd models")
    p.add_argument("--no-reparam", dest="reparameterize", action="store_const", const=False)
    p.add_argument("--no-onnx", dest="onnx", action="store_const", const=False)
    p.add_argument("--onnx-threads", type=int, help="intra-op threads for ORT and the eager comparison")
    p.add_argument("--onnx-int8", nargs="?", const=list(INT8_FORMS), type=_csv(str), metavar="FORMS",
                   help="also time ORT int8 forms (static,static_conv,dynamic; all with no value)")  # fmt: skip
    p.add_argument("--onnx-out", help="keep the exported ONNX model at this path")
    p.add_argument("--val-manifest", help="val.csv: real images for the fp16/bf16 and int8 checks and int8 calibration")
    p.add_argument("--val-limit", type=int, help="validation images used for the int8 check (default 500)")
    p.add_argument("--quiet", action="store_const", const=True, help="no progress lines on stderr")
    return p.parse_args(argv)


def _config_section(text: str) -> dict[str, Any]:
    """The benchmark section from --config-json: inline JSON or a file, holding the section or a whole config."""
    return dict(json_arg(text, "--config-json", section="benchmark"))


@cli
def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    section = _config_section(args.config_json) if args.config_json else {}
    overrides = {k: v for k, v in vars(args).items() if k in DEFAULTS and k != "img_size" and v is not None}
    if args.channels_last:
        overrides["channels_last"] = {"both": [False, True], "on": [True], "off": [False]}[args.channels_last]
    if args.bench_img_size:
        overrides["img_size"] = args.bench_img_size
    section.update(overrides)
    run_cfg = read_json(args.run_config) if args.run_config else {}
    timm_name = args.timm_name or run_cfg.get("timm_name")
    if not timm_name:
        raise LcnnError("name the model: --timm-name NAME, or --run-config runs/.../config.json")
    model_name = args.model_name or run_cfg.get("model") or timm_name
    cfg = {
        "model_name": model_name,
        "timm_name": timm_name,
        "weights": args.weights,
        "run_metrics": args.run_metrics,
        "num_classes": args.num_classes or run_cfg.get("num_classes") or 1000,
        "img_size": args.img_size or run_cfg.get("img_size"),
        "pretrained_tag": run_cfg.get("pretrained_tag"),
        "out": args.out or f"benchmarks/{model_name}.json",
        "benchmark": section,
    }
    return run(cfg)


if __name__ == "__main__":
    main()
    exit_now()

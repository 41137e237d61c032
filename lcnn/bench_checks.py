"""Numerics checks of lcnn.benchmark: a deployment form is timed only after its outputs are shown to match.

* The reparameterized form must match the trained one within REL_TOL, checked in exact fp32 (TF32 off, see
  :func:`lcnn.timing.exact_fp32`), so TF32 noise on Ampere and newer GPUs cannot reject RepVGG's fused form.
* Every fp16/bf16 configuration, and every compiled one, is compared with the trained model's exact-fp32 logits on
  the check inputs (:class:`Reference`): up to CHECK_IMAGES validation images when a manifest is given, else seeded
  random images. Outputs that are not finite give "nan"; a relative logit error above HALF_REL_TOL (REL_TOL for
  compiled fp32) or, on validation images, top-1 agreement below MIN_AGREEMENT gives "mismatch".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from lcnn import timing
from lcnn.timing import REL_TOL, error_text, exact_fp32, make_input

CPU = torch.device("cpu")  # where the check images and reference logits are kept between comparisons
CHECK_IMAGES = 256  # validation images (at most val_limit) in the fp16/bf16/compiled agreement check
CHECK_BATCHES = 4  # seeded random batches of 2 in that check when there is no validation manifest
MIN_AGREEMENT = 0.98  # least top-1 agreement with fp32 on validation images for an fp16/bf16/compiled configuration
# max |diff| / max |fp32 logit| accepted: a coarse screen for broken kernels (random-init EfficientNetV2-S reaches
# 0.09 in bf16 at 64 px with every argmax kept); top-1 agreement on validation images is the finer test
HALF_REL_TOL = {"fp16": 0.1, "bf16": 0.25}


def _signature(model: nn.Module) -> tuple:
    return tuple((n, type(m).__name__) for n, m in model.named_modules()) + tuple(model.state_dict())


def reparameterized(model: nn.Module) -> nn.Module | None:
    """timm's fused deployment form of ``model`` (a copy), or None when reparameterization changes nothing."""
    from timm.utils.model import reparameterize_model

    fused = reparameterize_model(model).eval()
    return fused if _signature(fused) != _signature(model) else None


def output_diff(reference: nn.Module, other: Callable[[torch.Tensor], Any], img_size: int, device) -> tuple:
    """(max |diff|, max |diff| / max |reference|) on a fixed batch of 2, eval mode, exact fp32 (TF32 off); both NaN
    when either output is not finite, so that no comparison with a tolerance can pass it."""
    x = make_input(2, img_size, device)
    with torch.inference_mode(), exact_fp32():
        ref = reference(x).float()
        out = torch.as_tensor(other(x)).float().to(ref.device)
    if not (bool(torch.isfinite(ref).all()) and bool(torch.isfinite(out).all())):
        return float("nan"), float("nan")
    abs_diff = float((ref - out).abs().max())
    return abs_diff, abs_diff / max(float(ref.abs().max()), 1e-12)


class Reference:
    """The trained model's exact-fp32 logits on the check inputs; fp16/bf16 and compiled configurations are
    compared with them before they are timed.

    The check images and logits stay on the CPU, and each batch goes to the device only while it is compared:
    256 images at 224 px are 147 MiB, which on the GPU would count in every timed row's ``peak_mem_mb``.
    ``fallback`` says why the check runs on random images when a manifest was given but could not be read.
    """

    def __init__(
        self, model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor | None]], source: str,
        device: torch.device = CPU, fallback: str | None = None,
    ):  # fmt: skip
        self.batches, self.source, self.error, self.fallback = batches, source, None, fallback
        self.labelled = all(y is not None for _, y in batches)
        try:
            with torch.inference_mode(), exact_fp32():
                self.logits = [model(x.to(device)).float().cpu() for x, _ in batches]
        except Exception as err:  # the configurations it would check are then recorded untimed, with this reason
            self.logits, self.error = [], error_text(err)

    @classmethod
    def for_model(cls, model: nn.Module, settings: dict, img_size: int, device: torch.device) -> Reference:
        """On validation images when the settings name a manifest, else on seeded random images."""
        why, fallback = "no val manifest", None
        if settings["val_manifest"]:
            try:
                dataset = timing.val_images(settings["val_manifest"], model, img_size)
                indices = timing.val_indices(len(dataset), min(settings["val_limit"], CHECK_IMAGES))
                batches = timing.image_batches(dataset, indices)
                source = f"{len(indices)} images of {settings['val_manifest']} (the trainer's eval transform)"
                return cls(model, batches, source, device)
            except Exception as err:  # a manifest this model cannot read must not stop the benchmark
                why = fallback = f"validation images unusable: {error_text(err)}"
                timing.log(  # a warning, so even under --quiet: the check the user asked for is not the one run
                    f"[bench] warning: {why}; the fp16/bf16/compiled agreement check falls back to random images "
                    "(logit error only, no top-1 agreement)"
                )
        batches = [(make_input(2, img_size, CPU, seed=timing.SEED + 1 + i), None) for i in range(CHECK_BATCHES)]
        source = f"{2 * CHECK_BATCHES} seeded random images ({why}: logit error only)"
        return cls(model, batches, source, device, fallback)

    def compare(self, module: Callable, precision: str, channels_last: bool, device: torch.device) -> dict:
        """Agreement of ``module`` at ``precision`` with the reference, as row fields."""
        abs_diff, scale, same, n, finite = 0.0, 1e-12, 0, 0, True
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.inference_mode(), timing.autocast(precision, device), exact_fp32():
            for (x, _), ref in zip(self.batches, self.logits, strict=True):
                out = module(x.to(device).contiguous(memory_format=fmt)).float().cpu()
                finite = finite and bool(torch.isfinite(out).all()) and bool(torch.isfinite(ref).all())
                abs_diff = max(abs_diff, float((out - ref).abs().max()))
                scale = max(scale, float(ref.abs().max()))
                same, n = same + int((out.argmax(-1) == ref.argmax(-1)).sum()), n + len(ref)
        if not finite:
            abs_diff = float("nan")
        return {"fp32_max_abs_diff": abs_diff, "fp32_rel_diff": abs_diff / scale, "fp32_top1_agreement": same / n}

    def verdict(self, agreement: dict, precision: str) -> tuple[str, str] | None:
        """("nan" | "mismatch", why) when the configuration must not be timed, else None."""
        if not np.isfinite(agreement["fp32_max_abs_diff"]):
            return "nan", f"{precision} outputs are not finite on {self.source}; not timed"
        tol = REL_TOL if precision == "fp32" else HALF_REL_TOL[precision]
        if not agreement["fp32_rel_diff"] <= tol:
            why = f"{precision} logits differ from fp32 (rel diff {agreement['fp32_rel_diff']:.2e} > {tol})"
            return "mismatch", f"{why} on {self.source}; not timed"
        if self.labelled and agreement["fp32_top1_agreement"] < MIN_AGREEMENT:
            why = f"{precision} top-1 agrees with fp32 on {agreement['fp32_top1_agreement']:.1%} of {self.source}"
            return "mismatch", f"{why} (< {MIN_AGREEMENT:.0%}); not timed"
        return None


def check_config(
    module: Callable, precision: str, cl: bool, device, reference: Reference | None, compiling: bool
) -> tuple[dict, str | None, str | None]:
    """(agreement fields, status, why) of one configuration before it is timed; status None = time it."""
    if reference is None or (precision == "fp32" and not compiling):
        return {}, None, None
    if reference.error:
        return {}, "error", f"no fp32 reference to check {precision} against ({reference.error}); not timed"
    try:
        agreement = reference.compare(module, precision, cl, device)
    except Exception as err:  # the first call of a compiled module is where compiling fails
        if compiling and not timing.is_oom(err):
            return {}, "skipped", f"torch.compile failed: {error_text(err)}"
        return {}, "oom" if timing.is_oom(err) else "error", error_text(err)
    verdict = reference.verdict(agreement, precision)
    return agreement, *(verdict or (None, None))

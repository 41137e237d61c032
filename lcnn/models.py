"""Model stage: build the study's timm architectures, initialise them, and move weights in and out.

Everything goes through ``timm.create_model``; lcnn only adds the study's initialization schemes and
clear errors for the mistakes users make (unknown names, weights that are not there offline, weights
that belong to another architecture).
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lcnn.utils import LcnnError, atomic_save, cli

INIT_SCHEMES = ("default", "trunc_normal", "kaiming", "xavier", "pretrained")


def create(
    timm_name: str,
    num_classes: int,
    img_size: int | None = None,
    init: str = "default",
    pretrained_file: str | None = None,
    drop_path: float = 0.0,
    pretrained_tag: str | None = None,
) -> nn.Module:
    """Create a timm model for ``num_classes`` classes with the study's initialization ``init``.

    ``img_size`` only reaches architectures whose pretrained config says their input size is fixed;
    the study's seven models are all size-agnostic. ``pretrained_tag`` picks which of timm's pretrained
    weights ``init: pretrained`` loads from the local cache (e.g. ``fb_in1k``; None = timm's default tag); under
    any other init the model carries that tag's pretrained config (its normalisation and crop), without weights.
    """
    if not timm.is_model(timm_name):
        close = timm.list_models(f"*{timm_name.split('_')[0]}*")[:5]
        raise LcnnError(f"unknown timm model '{timm_name}'; use a name from timm.list_models() (close: {close})")
    if init not in INIT_SCHEMES:
        raise LcnnError(f"unknown init '{init}'; use one of {', '.join(INIT_SCHEMES)}")
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if drop_path:
        kwargs["drop_path_rate"] = drop_path
    own_cfg = timm.models.get_pretrained_cfg(timm_name)
    if img_size and own_cfg and own_cfg.fixed_input_size and own_cfg.input_size[-1] != img_size:
        kwargs["img_size"] = img_size
    if init == "pretrained":
        model = _create_pretrained(timm_name, pretrained_tag, pretrained_file, kwargs)
    else:  # the tag's config (no weights) rides on the model: model.pretrained_cfg gives its normalisation and crop
        name = f"{timm_name}.{checked_tag(timm_name, pretrained_tag)}" if pretrained_tag else timm_name
        model = timm.create_model(name, pretrained=False, **kwargs)
    windows = _scaled_windows(model, img_size)
    if windows and init != "pretrained":
        model = timm.create_model(name, pretrained=False, window_sizes=windows, **kwargs)
    if init not in ("default", "pretrained"):
        reinitialize(model, init)
    return model


def _scaled_windows(model: nn.Module, img_size: int | None) -> tuple[int, ...] | None:
    """Attention windows scaled with the input, for windowed ViTs (TinyViT) trained below their native size.

    TinyViT pads every stage up to its fixed window (7, 7, 14, 7), so at 32 px it would cost as much as
    at 224 px. Scaling the windows keeps the same number of windows per side as at the native size.
    """
    sizes = getattr(model, "window_sizes", None) or _init_arg(model, "window_sizes")
    native = model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    if not sizes or not img_size or img_size >= native:
        return None
    return tuple(max(1, round(w * img_size / native)) for w in sizes)


def _init_arg(model: nn.Module, name: str):
    import inspect

    param = inspect.signature(type(model).__init__).parameters.get(name)
    return param.default if param is not None and param.default is not inspect.Parameter.empty else None


def checked_tag(timm_name: str, tag: str) -> str:
    """``tag`` if timm has pretrained weights ``timm_name.tag`` (a one-line error naming the tags it has if not)."""
    known = timm.list_pretrained(f"{timm_name}.*")
    if f"{timm_name}.{tag}" not in known:
        tags = ", ".join(t.split(".", 1)[1] for t in known)
        raise LcnnError(f"timm has no pretrained tag '{tag}' for {timm_name}; use one of {tags}")
    return tag


def _create_pretrained(
    timm_name: str, tag: str | None, pretrained_file: str | None, kwargs: dict[str, Any]
) -> nn.Module:
    """Load ImageNet weights from a local file or the local Hugging Face cache, never from the network."""
    name = f"{timm_name}.{checked_tag(timm_name, tag)}" if tag else timm_name
    if pretrained_file:
        if not Path(pretrained_file).is_file():
            raise LcnnError(
                f"pretrained_file {pretrained_file} does not exist; point baseline/variant pretrained_file at a "
                "local .safetensors/.pth file"
            )
        try:
            # timm loads non-strictly whenever num_classes differs from the weights' class count, which would
            # silently keep a random init for weights of another architecture: load strictly at theirs first
            file_classes = _file_classes(name, pretrained_file)
            overlay = {"file": str(pretrained_file), "num_classes": file_classes}
            if kwargs["num_classes"] != file_classes:
                timm.create_model(
                    name, pretrained=True, pretrained_cfg_overlay=overlay, **{**kwargs, "num_classes": file_classes}
                )
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
        except Exception as err:  # not a weights file, pickled code refused by weights_only, another architecture
            first = (str(err).strip().splitlines() or [""])[0][:160]
            raise LcnnError(
                f"pretrained_file {pretrained_file} does not load into {timm_name} ({type(err).__name__}: {first}); "
                f"point pretrained_file at {timm_name}'s own ImageNet weights"
            ) from None
    import huggingface_hub.constants as hf_constants

    # huggingface_hub reads HF_HUB_OFFLINE once, when timm first imports it, so setting the environment variable
    # here is ignored (the lookup then retries the network for ~50 s, or downloads): switch the constant itself.
    saved = hf_constants.HF_HUB_OFFLINE
    hf_constants.HF_HUB_OFFLINE = True
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # timm raises several types depending on where the lookup fails
        hub_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise LcnnError(
            f"pretrained weights for {name} are not in the local Hugging Face cache ({hub_home}); "
            'fetch them once on a machine with internet (python -c "import timm; '
            f"timm.create_model('{name}', pretrained=True)\") or set pretrained_file "
            f"[{type(err).__name__}]"
        ) from None
    finally:
        hf_constants.HF_HUB_OFFLINE = saved


def _file_classes(name: str, path: str) -> int:
    """The class count of a weights file, read from its classifier (timm's default when it has none)."""
    cfg = timm.models.get_pretrained_cfg(name)
    head = cfg.classifier if cfg and isinstance(cfg.classifier, str) else None
    weight = timm.models.load_state_dict(path, weights_only=True).get(f"{head}.weight") if head else None
    return int(weight.shape[0]) if weight is not None else getattr(cfg, "num_classes", None) or 1000


def reinitialize(model: nn.Module, scheme: str) -> nn.Module:
    """Re-initialise every conv and linear layer with ``scheme``; norms keep timm's ones/zeros."""
    for module in model.modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)):
            continue
        if scheme == "trunc_normal":
            nn.init.trunc_normal_(module.weight, std=0.02)
        elif scheme == "kaiming" and isinstance(module, nn.Conv2d):
            # fan-out per group, as timm's own Kaiming init (_init_weight_goog): torch's kaiming_normal_ counts a
            # depthwise conv's every output channel, which draws its weights sqrt(channels) times too small
            fan_out = module.out_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
            nn.init.normal_(module.weight, std=math.sqrt(2.0 / fan_out))
        elif scheme == "kaiming":
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif scheme == "xavier":
            nn.init.xavier_uniform_(module.weight)
        else:
            raise LcnnError(f"unknown re-initialization scheme '{scheme}'; use trunc_normal, kaiming or xavier")
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_weights(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> Path:
    """Save the model's weights as safetensors, atomically."""
    state = {k: v.detach().contiguous().cpu() for k, v in _unwrap(model).state_dict().items()}
    return atomic_save(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_weights(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load safetensors weights, refusing (with both sides named) weights of another architecture or class count."""
    path = Path(path)
    if not path.is_file():
        raise LcnnError(f"weights file {path} does not exist; train the model first (snakemake {path})")
    try:
        state = load_file(str(path))
    except Exception as err:
        raise LcnnError(f"{path} is not a readable safetensors file ({err}); delete it and retrain") from None
    own = _unwrap(model).state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shapes:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        detail = (
            f"{len(missing)} missing keys (e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})"
            if missing or unexpected
            else ", ".join(f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shapes[:2])
        )
        raise LcnnError(
            f"{path} does not fit {name} with {_num_classes(model)} classes: {detail}; "
            "load it into the architecture and class count it was trained with"
        )
    _unwrap(model).load_state_dict(state)
    return model


def _num_classes(model: nn.Module) -> int | str:
    return getattr(_unwrap(model), "num_classes", "?")


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Build a model, run one forward/backward pass at ``img_size`` and report its size (a smoke check)."""
    model = create(cfg["timm_name"], cfg.get("num_classes", 1000), init=cfg.get("init", "default"))
    size = cfg.get("img_size", 224)
    out = model(torch.randn(2, 3, size, size))
    out.float().sum().backward()
    return {"timm_name": cfg["timm_name"], "params": count_params(model), "output_shape": list(out.shape)}


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build a timm model the way lcnn does and smoke-test it.")
    parser.add_argument("timm_name")
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--init", default="default", choices=INIT_SCHEMES)
    args = parser.parse_args(argv)
    print(run(vars(args)))


if __name__ == "__main__":
    main()

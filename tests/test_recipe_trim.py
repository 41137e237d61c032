"""The settings a run's recipe leaves out (lcnn.config.unused_hparams) are ones timm never reads: building the
optimizer, the schedule and the transforms without them, or with other values for them, gives the same run."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml
from conftest import REPO

from lcnn import config as study
from lcnn import recipe

REAL = study.validate(yaml.safe_load((REPO / "config.yaml").read_text()))
# another value for every setting that can be left out, so that a left-out setting that mattered would show
OTHER = {
    "warmup_lr": 0.123,
    "min_lr": 0.0456,
    "decay_epochs": 3,
    "decay_milestones": [2, 5],
    "decay_rate": 0.37,
    "momentum": 0.42,
    "lr_base_size": 64,
    "color_jitter": 0.4,
    "pretrained_file": "elsewhere.safetensors",
}


def variants(**over):
    """Every variant of the real config, with ``over`` on top."""
    return {v: study.hparams(REAL, v) | over for v in study.all_variants(REAL)}


def lrs(hp, steps_per_epoch=3):
    """The lr of every step of the run's schedule (and the optimizer's settings), over all its epochs."""
    optimizer, _ = recipe.build_optimizer(torch.nn.Linear(2, 2), hp, 1, fused=False)
    scheduler = recipe.build_scheduler(optimizer, hp, steps_per_epoch)
    out = []
    for step in range(hp["epochs"] * steps_per_epoch + 1):
        if scheduler is not None:
            scheduler.step_update(step)
        out.append(optimizer.param_groups[0]["lr"])
    return type(optimizer), optimizer.defaults, out


@pytest.mark.parametrize("sched", ["step", "multistep", "cosine", "poly", "tanh", "none"])
@pytest.mark.parametrize("warmup", [0, 2])
def test_the_trimmed_recipe_trains_with_the_same_optimizer_and_schedule(sched, warmup):
    for name, hp in variants(sched=sched, warmup_epochs=warmup, epochs=12).items():
        trimmed = study.used_hparams(hp)
        other = copy.deepcopy(hp) | {k: v for k, v in OTHER.items() if k not in trimmed}
        assert lrs(trimmed) == lrs(hp) == lrs(other), name
        assert recipe.scaled_lr(trimmed, 4) == recipe.scaled_lr(other, 4)


@pytest.mark.parametrize("variant", ["randaugment", "autoaugment"])
def test_colour_jitter_is_left_out_only_where_timm_drops_it(variant):
    hp = study.hparams(REAL, variant)
    trimmed = study.used_hparams(hp)
    assert "color_jitter" not in trimmed and "color_jitter" in study.used_hparams(study.hparams(REAL, "baseline"))
    built = [repr(recipe.transforms(h, 32, "mobilenetv3_large_100")[0]) for h in (trimmed, hp | {"color_jitter": 0.4})]
    assert built[0] == built[1]

"""The demo overlays (profiles/demo): they must stay a faithful, small copy of the study's design.

`make demo` is the first thing a new user runs; a demo that drops a model or an axis, runs one seed, or times a
variant that is the baseline under another name would show numbers that cannot read like a study.
"""

from __future__ import annotations

import pytest
from conftest import REPO

from lcnn import config as study

DEMO = ["config.yaml", "profiles/demo/study.yaml"]
SEARCH = [*DEMO, "profiles/demo/search.yaml"]
AXES = {"schedule", "augmentation", "optimizer", "initialization"}


def load(names: list[str]) -> dict:
    return study.load_config([REPO / name for name in names])


def test_demo_keeps_the_studys_models_and_one_variant_per_axis_over_two_seeds():
    real, demo = load(["config.yaml"]), load(DEMO)
    assert study.selected_models(demo) == list(real["models"])  # all seven, in the study's order
    variants = [v for v in study.variant_names(demo) if v != study.BASELINE]
    assert len(variants) == len(AXES)
    assert sorted(study.hparams(demo, v)["axis"] for v in variants) == sorted(AXES)
    assert len(demo["seeds"]) >= 2  # every gain gets a seed interval
    assert len(study.runs(demo)) == len(real["models"]) * (len(AXES) + 1) * len(demo["seeds"])


def test_demo_models_are_the_studys_architectures_scaled_down():
    """A demo model may be a smaller sibling (ConvNeXt-Atto for ConvNeXt-T), never another architecture."""
    import timm
    import torch

    real, demo = load(["config.yaml"]), load(DEMO)
    swapped = 0
    for name, spec in real["models"].items():
        own = demo["models"][name]["timm"]
        with torch.device("meta"):
            study_model, demo_model = timm.create_model(spec["timm"]), timm.create_model(own)
        assert type(demo_model) is type(study_model), f"{name}: demo {own} is not a {spec['timm']}"
        assert sum(p.numel() for p in demo_model.parameters()) <= sum(p.numel() for p in study_model.parameters())
        swapped += own != spec["timm"]
    assert swapped <= 4  # only the four models above 20M parameters are scaled down


@pytest.mark.parametrize("names", [DEMO, SEARCH], ids=["demo", "search"])
def test_every_selected_variant_changes_the_baseline_recipe(names):
    cfg = load(names)
    base = {k: v for k, v in study.hparams(cfg, study.BASELINE).items() if k != "axis"}
    variants = [v for v in study.variant_names(cfg) if v != study.BASELINE]
    assert len(variants) >= len(AXES)
    for name in variants:
        recipe = {k: v for k, v in study.hparams(cfg, name).items() if k != "axis"}
        changed = sorted(k for k in recipe if recipe[k] != base[k])
        assert changed, f"variant {name} trains the baseline recipe under another name"


@pytest.mark.parametrize("names", [DEMO, SEARCH], ids=["demo", "search"])
def test_every_warmup_fits_inside_the_run(names):
    cfg = load(names)
    names_ = study.variant_names(cfg)
    assert len(names_) > 1
    for name in names_:
        hp = study.hparams(cfg, name)
        assert hp["warmup_epochs"] < hp["epochs"], f"{name}: warmup of {hp['warmup_epochs']} epochs never ends"

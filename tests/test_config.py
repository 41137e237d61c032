"""The config is validated before anything runs, and every error names the key and the fix."""

from __future__ import annotations

import copy

import pytest
import yaml
from conftest import REPO, tiny_config

from lcnn import config as study
from lcnn.utils import LcnnError

REAL = yaml.safe_load((REPO / "config.yaml").read_text())


def test_real_config_is_valid_and_covers_the_study():
    cfg = study.validate(copy.deepcopy(REAL))
    assert len(cfg["models"]) == 7
    axes = {v["axis"] for v in cfg["variants"].values()}
    assert {"schedule", "augmentation", "optimizer", "initialization"} <= axes
    assert "cosine" in cfg["variants"]
    assert len(study.runs(cfg)) == 7 * (len(cfg["variants"]) + 1) * len(cfg["seeds"])


def test_study_names_map_to_explicit_timm_models():
    expected = {
        "convnext_t": "convnext_tiny",
        "efficientnetv2_s": "tf_efficientnetv2_s",
        "mobilenetv3_l": "mobilenetv3_large_100",
        "mobilevitv2_s": "mobilevitv2_100",
        "mobilevitv2_xs": "mobilevitv2_050",
        "repvgg_a2": "repvgg_a2",
        "tinyvit": "tiny_vit_21m_224",
    }
    assert {k: v["timm"] for k, v in REAL["models"].items()} == expected
    study.check_models(copy.deepcopy(REAL))


def test_every_config_key_has_a_comment():
    for n, line in enumerate((REPO / "config.yaml").read_text().splitlines(), 1):
        stripped = line.strip()
        if stripped and not stripped.startswith("#") and ":" in stripped:
            assert "#" in line, f"config.yaml line {n} has no comment: {line!r}"


def test_variant_merges_onto_baseline():
    cfg = study.validate(copy.deepcopy(REAL))
    hp = study.hparams(cfg, "cosine")
    assert hp["sched"] == "cosine" and hp["warmup_epochs"] == 5
    assert hp["opt"] == cfg["baseline"]["opt"] and hp["axis"] == "schedule"
    assert study.hparams(cfg, "baseline")["axis"] == "baseline"


def test_grid_names_are_path_safe():
    cfg = copy.deepcopy(REAL)
    cfg["grid"] = {"opt": ["adamw", "sgd"], "lr_base": [0.001, 0.1], "auto_augment": ["rand-m9-mstd0.5", None]}
    cfg = study.validate(cfg)
    names = study.grid_variants(cfg)
    assert len(names) == 8
    assert all(study.SAFE_NAME.match(n) for n in names)
    assert study.hparams(cfg, "grid_auto_augment-rand-m9-mstd0.5_lr_base-0.001_opt-adamw")["opt"] == "adamw"


def test_select_restricts_runs():
    cfg = tiny_config()
    rows = study.runs(cfg)
    assert {r["model"] for r in rows} == {"mobilenetv3_l", "mobilevitv2_xs"}
    assert {r["variant"] for r in rows} == {"baseline", "cosine"}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda c: c["baseline"].update(opt="adamx"), "config key 'baseline.opt' is 'adamx'; expected one of"),
        (lambda c: c["baseline"].update(epochs="ten"), "config key 'baseline.epochs' is 'ten'; expected integer"),
        (lambda c: c["data"].update(per_clas=3), "'data.per_clas' is not allowed here; did you mean per_class?"),
        (lambda c: c["train"].update(epochs=3), "'train.epochs' is not allowed here; it belongs under baseline"),
        (lambda c: c["variants"].update({"a/b": {"axis": "schedule"}}), "must match"),
        (lambda c: c["variants"].update(x={"sched": "cosine"}), "missing a required key: axis"),
        (lambda c: c["select"].update(models=["resnet"]), "select.models names 'resnet'"),
        (lambda c: c["models"].update(bad={"timm": "not_a_model"}), "is not a timm model"),
        (lambda c: c["report"].update(gain_range=[3.5, 1.5]), "report.gain_range [3.5, 1.5] runs backwards"),
        (lambda c: c.update(grid={"opt": ["adamx"]}), "config key 'grid.opt' is 'adamx'; expected one of"),
        (lambda c: c.update(grid={"optt": ["sgd"]}), "'grid.optt' is not a hyperparameter; did you mean opt?"),
        (lambda c: c.update(grid={"a/b": [1]}), "'grid.a/b' is not a hyperparameter"),
        (lambda c: c.update(grid={"lr_base": [1e-3, 0.001]}), "'grid.lr_base' lists the same value twice"),
        (lambda c: c.update(grid={"auto_augment": ["rand-m9", "rand m9"]}), "both named grid_auto_augment-rand-m9"),
    ],
)
def test_bad_config_gives_one_line_naming_the_key(mutate, message):
    cfg = copy.deepcopy(REAL)
    mutate(cfg)
    with pytest.raises(LcnnError) as info:
        study.validate(cfg)
        study.check_models(cfg)
    text = str(info.value)
    assert message in text and "\n" not in text

"""The config is validated before anything runs, and every error names the key and the fix."""

from __future__ import annotations

import copy
import json

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
        (  # every run is normalised and cropped like the tag's weights: a wrong tag stops the study, not its jobs
            lambda c: c["models"]["convnext_t"].update(pretrained_tag="fb_in2k"),
            "models.convnext_t.pretrained_tag = 'fb_in2k' is not a timm pretrained tag of convnext_tiny",
        ),
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


# (variant of the real config, edit, whether that variant's run uses the edited setting). A run's recipe is its
# train rule's params: an edit to a setting it never reads must leave it unchanged (no rerun), one it reads must not
RECIPE_EDITS = [
    ("baseline", {"baseline": {"decay_milestones": [10, 20]}}, False),  # step schedule
    ("multistep", {"variants": {"multistep": {"decay_milestones": [10, 20]}}}, True),
    ("cosine", {"baseline": {"decay_epochs": 7}}, False),
    ("baseline", {"baseline": {"decay_epochs": 7}}, True),
    ("cosine", {"baseline": {"decay_rate": 0.5}}, False),  # cosine's cycle decay is timm's, not decay_rate
    ("poly", {"variants": {"poly": {"decay_rate": 0.5}}}, True),  # poly's power
    ("baseline", {"baseline": {"opt_eps": 1.0e-6}}, False),  # timm's SGD takes no epsilon
    ("adamw", {"baseline": {"opt_eps": 1.0e-6}}, True),
    ("baseline", {"baseline": {"opt_eps": None}}, False),  # timm's default: what a recipe without the key meant
    ("baseline", {"baseline": {"min_lr": 0.01}}, False),
    ("cosine", {"baseline": {"min_lr": 0.01}}, True),
    ("baseline", {"baseline": {"warmup_lr": 0.01}}, False),  # no warmup epochs
    ("cosine", {"baseline": {"warmup_lr": 0.01}}, True),
    ("adamw", {"baseline": {"momentum": 0.5}}, False),
    ("lion", {"baseline": {"momentum": 0.5}}, False),
    ("baseline", {"baseline": {"momentum": 0.5}}, True),  # SGD
    ("rmsprop", {"baseline": {"momentum": 0.5}}, True),
    ("randaugment", {"baseline": {"color_jitter": 0.4}}, False),  # timm drops colour jitter under RandAugment
    ("baseline", {"baseline": {"color_jitter": 0.4}}, True),
    ("baseline", {"baseline": {"pretrained_file": "weights.safetensors"}}, False),
    ("pretrained", {"baseline": {"pretrained_file": "weights.safetensors"}}, True),
    ("kaiming", {"models": {"convnext_t": {"pretrained_tag": "fb_in22k_ft_in1k"}}}, True),  # its normalisation
    ("pretrained", {"models": {"convnext_t": {"pretrained_tag": "fb_in22k_ft_in1k"}}}, True),
    ("baseline", {"baseline": {"lr_base_size": 512}}, True),
    ("baseline", {"baseline": {"lr_scale": "none", "lr_base_size": 512}}, "vs lr_scale none"),
]


@pytest.mark.parametrize(("variant", "edit", "used"), RECIPE_EDITS)
def test_a_runs_recipe_changes_only_with_the_settings_it_uses(variant, edit, used):
    before_cfg = study.validate(copy.deepcopy(REAL))
    if used == "vs lr_scale none":  # lr_base_size is unused once lr no longer scales with the batch
        before_cfg["baseline"]["lr_scale"], used = "none", False
    after_cfg = study.merge_config(copy.deepcopy(before_cfg), copy.deepcopy(edit))
    before = study.run_recipe(before_cfg, "convnext_t", variant, 0)
    after = study.run_recipe(after_cfg, "convnext_t", variant, 0)
    assert (before != after) is used, (before["hparams"], after["hparams"])


def test_the_pretrained_tag_reaches_every_run_and_the_file_only_pretrained_runs():
    cfg = study.validate(copy.deepcopy(REAL))
    plain, pretrained = (study.run_recipe(cfg, "convnext_t", v, 0) for v in ("baseline", "pretrained"))
    assert plain["pretrained_tag"] == pretrained["pretrained_tag"] == "fb_in1k"  # their normalisation and crop
    assert "pretrained_file" not in plain["hparams"] and "pretrained_file" in pretrained["hparams"]


def test_an_optuna_trial_keeps_the_settings_its_sampled_values_make_it_use():
    cfg = study.validate(copy.deepcopy(REAL))
    assert "decay_milestones" not in study.run_recipe(cfg, "convnext_t", "baseline", 0)["hparams"]
    trial = study.run_recipe(cfg, "convnext_t", "baseline", 0, overrides={"sched": "multistep"})
    assert trial["hparams"]["decay_milestones"] == REAL["baseline"]["decay_milestones"]


def test_rules_that_changed_with_no_setting_mark_the_runs_they_touch():
    """Kaiming's per-group fan-out and the augmentation fill changed what those runs train: their recipes carry a
    mark, so a run trained under the old rule reruns instead of standing beside new seeds; other runs are as
    they were."""
    cfg = study.validate(copy.deepcopy(REAL))
    hp = {v: study.run_recipe(cfg, "mobilenetv3_l", v, 0)["hparams"] for v in ("baseline", "kaiming", "randaugment")}
    assert hp["kaiming"]["kaiming_fan_out"] == "per_group" and hp["randaugment"]["augment_fill"] == "model_mean"
    assert not {"kaiming_fan_out", "augment_fill"} & hp["baseline"].keys()


def test_optimizers_without_an_epsilon_match_timms_registry():
    from timm.optim._optim_factory import default_registry

    opts = study.schema()["$defs"]["hparams"]["properties"]["opt"]["enum"]
    assert {o for o in opts if not default_registry.get_optimizer_info(o).has_eps} == study.NO_EPS_OPTS & set(opts)


def test_optimizers_without_momentum_match_timms_registry():
    from timm.optim._optim_factory import default_registry

    opts = study.schema()["$defs"]["hparams"]["properties"]["opt"]["enum"]
    no_momentum = {o for o in opts if not default_registry.get_optimizer_info(o).has_momentum}
    assert no_momentum == study.NO_MOMENTUM_OPTS & set(opts)


def test_the_data_definition_leaves_out_only_where_the_data_lives():
    cfg = study.validate(copy.deepcopy(REAL))
    cfg["data"]["stage_to"] = "/tmp/node"
    assert study.data_definition(cfg, with_root=True) == {k: v for k, v in cfg["data"].items() if k != "stage_to"}
    where = ("root", "stage_to", "imagenet")  # where the subset, its copies and raw ImageNet live
    assert study.data_definition(cfg) == {k: v for k, v in cfg["data"].items() if k not in where}


def test_data_is_redefined_only_when_the_prepared_report_records_another_subset(tmp_path):
    cfg = study.validate(copy.deepcopy(REAL))
    cfg["data"]["root"] = str(tmp_path)
    assert not study.data_redefined(cfg)  # nothing prepared yet (or purged): nothing to compare
    recorded = {**cfg["data"], "root": "/old/scratch", "stage_to": "/tmp/node"}  # moved and staged elsewhere
    recorded["imagenet"] = {**recorded["imagenet"], "train_dir": "/old/mount/train"}  # raw ImageNet moved too
    (tmp_path / "prepare_report.json").write_text(json.dumps({"config": recorded}))
    assert not study.data_redefined(cfg)
    cfg["data"]["per_class"] += 1
    assert study.data_redefined(cfg)

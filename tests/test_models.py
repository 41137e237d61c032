"""All seven study models build, run forward and backward, and carry their weights safely."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, tiny_config

from lcnn import config as study
from lcnn import models, recipe, timing
from lcnn.utils import LcnnError

MODELS = yaml.safe_load((REPO / "config.yaml").read_text())["models"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_forward_backward_small(name):
    model = models.create(MODELS[name]["timm"], num_classes=10, img_size=32)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 10)
    out.sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_reinit_schemes_change_the_weights():
    torch.manual_seed(0)
    default = models.create("mobilenetv3_large_100", 10)
    torch.manual_seed(0)
    kaiming = models.create("mobilenetv3_large_100", 10, init="kaiming")
    torch.manual_seed(0)
    trunc = models.create("mobilenetv3_large_100", 10, init="trunc_normal")
    w = "conv_stem.weight"
    assert not torch.equal(default.state_dict()[w], kaiming.state_dict()[w])
    assert trunc.state_dict()[w].std() < 0.05 < kaiming.state_dict()[w].std()


def test_tinyvit_windows_scale_with_small_inputs():
    small = models.create("tiny_vit_21m_224", 10, img_size=32)
    native = models.create("tiny_vit_21m_224", 10)
    assert [getattr(s.blocks[0], "window_size", None) for s in small.stages[1:]] == [1, 2, 1]
    assert [getattr(s.blocks[0], "window_size", None) for s in native.stages[1:]] == [7, 14, 7]


def test_weights_round_trip_and_mismatch_errors(tmp_path):
    model = models.create("mobilevitv2_050", 10)
    path = models.save_weights(model, tmp_path / "w.safetensors")
    other = models.create("mobilevitv2_050", 10)
    models.load_weights(other, path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    with pytest.raises(
        LcnnError, match=r"does not fit mobilevitv2_050 with 5 classes: head.fc.bias: file \(10,\) vs model \(5,\)"
    ):
        models.load_weights(models.create("mobilevitv2_050", 5), path)
    with pytest.raises(LcnnError, match=r"does not fit mobilenetv3_large_100 with 10 classes: \d+ missing keys"):
        models.load_weights(models.create("mobilenetv3_large_100", 10), path)


def test_unknown_model_and_missing_pretrained_weights(tmp_path, monkeypatch):
    with pytest.raises(LcnnError, match="unknown timm model 'convnext_tinyy'"):
        models.create("convnext_tinyy", 10)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    with pytest.raises(LcnnError, match="not in the local Hugging Face cache.*set pretrained_file"):
        models.create("mobilevitv2_050", 10, init="pretrained")
    with pytest.raises(LcnnError, match="pretrained_file .* does not exist"):
        models.create("mobilevitv2_050", 10, init="pretrained", pretrained_file=str(tmp_path / "nope.pth"))


def test_pretrained_from_local_file(tmp_path):
    source = models.create("mobilevitv2_050", 1000)
    path = models.save_weights(source, tmp_path / "imagenet.safetensors")
    model = models.create("mobilevitv2_050", 10, init="pretrained", pretrained_file=str(path))
    stem = "stem.conv.weight"
    assert torch.equal(model.state_dict()[stem], source.state_dict()[stem])
    assert model.state_dict()["head.fc.weight"].shape[0] == 10
    # the class count is the file's own, not timm's default for the tag: a 10-class file keeps its head
    small = models.save_weights(model, tmp_path / "ten.safetensors")
    again = models.create("mobilevitv2_050", 10, init="pretrained", pretrained_file=str(small))
    assert torch.equal(again.state_dict()["head.fc.weight"], model.state_dict()["head.fc.weight"])


def test_pretrained_tag_is_checked_and_named(tmp_path, monkeypatch):
    with pytest.raises(LcnnError, match="no pretrained tag 'in22k' for mobilevitv2_050; use one of cvnets_in1k"):
        models.create("mobilevitv2_050", 10, init="pretrained", pretrained_tag="in22k")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty_hf_cache"))
    with pytest.raises(LcnnError, match=r"weights for mobilevitv2_050\.cvnets_in1k are not in the local"):
        models.create("mobilevitv2_050", 10, init="pretrained", pretrained_tag="cvnets_in1k")


def test_every_run_of_a_model_is_normalised_and_cropped_like_its_configured_weights(built_data):
    """timm's default tag for convnext_tiny (in12k_ft_in1k) crops validation images at 0.95, the configured fb_in1k at
    0.875. Given only to pretrained runs, the tag made the initialization axis compare a 0.875 crop with every other
    run's 0.95; now the trainer's loaders and the benchmark's validation check crop every run alike."""
    assert recipe.normalization("convnext_tiny")["crop_pct"] == 0.95
    cfg = tiny_config(built_data)
    cfg["models"]["convnext_t"] = {"timm": "convnext_tiny", "pretrained_tag": "fb_in1k"}
    resizes = set()
    for variant in ("baseline", "kaiming", "pretrained"):
        rc = study.run_config(cfg, "convnext_t", variant, 0)
        rc["train"]["num_workers"] = 0
        resizes.add(recipe.build_loaders(rc, 224, 1).val.dataset.transform.transforms[0].size)
    model = models.create("convnext_tiny", 10, pretrained_tag="fb_in1k")  # no weights: the tag's config only
    assert model.pretrained_cfg["tag"] == "fb_in1k"
    resizes.add(timing.val_images(built_data / "val.csv", model, 224).transform.transforms[0].size)
    assert resizes == {256}  # 224 / 0.875

"""Tests of the data stage on a fake ImageNet tree (real photos, odd and broken files) and on the builtin MNIST."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from conftest import TINY_ARGS, copy_workflow, local_env, tiny_config  # noqa: E402
from data_helpers import FakeImageNet, build_fake_imagenet  # noqa: E402

from lcnn import config as study  # noqa: E402
from lcnn import data, dataset, prepare  # noqa: E402
from lcnn.utils import LcnnError  # noqa: E402

N_TRAIN, N_VAL = 6, 3


@pytest.fixture(scope="module")
def fake(tmp_path_factory: pytest.TempPathFactory) -> FakeImageNet:
    return build_fake_imagenet(tmp_path_factory.mktemp("imagenet"), N_TRAIN, N_VAL, corrupt=True)


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> FakeImageNet:
    return build_fake_imagenet(tmp_path_factory.mktemp("clean"), n_train=10, n_val=4, val_layout="folders")


def manifest(root: Path, split: str) -> list[dict[str, str]]:
    with open(root / f"{split}.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def sha1(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()


def seed_processing(fake: FakeImageNet, bad: list[Path]) -> int:
    """A seed whose draw of per_class=N_TRAIN reaches every ``bad`` file (it is not last in its permutation)."""
    for seed in range(50):
        if all(
            prepare._shuffled(sorted(map(str, p.parent.glob("*.JPEG"))), seed, "train", p.parent.name)[-1] != str(p)
            for p in bad
        ):
            return seed
    raise AssertionError("no seed found")


def test_prepare_flat_val_with_odd_corrupt_and_duplicate_files(fake: FakeImageNet, tmp_path: Path) -> None:
    seed = seed_processing(fake, [fake.corrupt[0], fake.duplicate[0]])
    root = tmp_path / "out"
    summary = data.run(fake.data_cfg(root, per_class=N_TRAIN, on_corrupt="skip", seed=seed), workers=2)
    assert summary["counts"] == {"train": 3 * N_TRAIN, "val": 3 * N_VAL}
    assert (root / "classes.txt").read_text().split() == fake.classes == sorted(fake.classes)
    train, val = manifest(root, "train"), manifest(root, "val")
    for rows, n in ((train, N_TRAIN), (val, N_VAL)):
        assert [sum(r["label"] == str(i) for r in rows) for i in range(3)] == [n] * 3  # balanced
        assert all(fake.classes[int(r["label"])] == r["wnid"] and r["path"].endswith(".jpg") for r in rows)
    # the odd-but-valid files of class 0 are all drawn (per_class = all its images)
    names = {Path(r["path"]).stem for r in train}
    assert {p.stem for p in fake.odd.values()} <= names
    # both truncated files are skipped and listed; the train twin of a val image is dropped, never used
    report = json.loads((root / "prepare_report.json").read_text())
    assert sorted(s["path"] for s in report["skipped"]) == sorted(map(str, fake.corrupt))
    assert report["n_skipped"] == 2 and report["counts"] == summary["counts"]
    assert [d["path"] for d in report["dropped_train_duplicates_of_val"]] == [str(fake.duplicate[0])]
    assert fake.duplicate[0].stem not in names and "README" not in names
    assert report["per_class"]["train"] == dict.fromkeys(fake.classes, N_TRAIN)
    # train and val never overlap, by path and by content (prepared files and their sources)
    assert not {r["path"] for r in train} & {r["path"] for r in val}
    assert not {sha1(root / r["path"]) for r in train} & {sha1(root / r["path"]) for r in val}
    assert {Path(r["path"]).stem for r in val} == {p.stem for files in fake.val_files.values() for p in files}
    for r in train + val:  # short side resized to 64, RGB JPEG
        with Image.open(root / r["path"]) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and min(img.size) == 64


def test_odd_files_load_and_truncated_raises(fake: FakeImageNet) -> None:
    for path in fake.odd.values():
        img = data.load_rgb(path)
        assert img.mode == "RGB" and img.size == (200, 150)
    with pytest.raises(OSError):
        data.load_rgb(fake.corrupt[0])


def test_corrupt_file_is_an_error_by_default(fake: FakeImageNet, tmp_path: Path) -> None:
    with pytest.raises(LcnnError, match=r"ILSVRC2012_val_\d+\.JPEG.*on_corrupt: skip"):
        data.run(fake.data_cfg(tmp_path / "out"))
    assert not (tmp_path / "out" / "train.csv").exists()


def test_too_few_usable_images(fake: FakeImageNet, tmp_path: Path) -> None:
    with pytest.raises(LcnnError, match=r"only 6 images but data.per_class=7"):
        data.run(fake.data_cfg(tmp_path / "a", per_class=7, on_corrupt="skip", classes=[fake.classes[0]]))
    with pytest.raises(LcnnError, match=r"usable images .* data.per_class=7"):  # 7 files, one truncated
        data.run(fake.data_cfg(tmp_path / "b", per_class=7, on_corrupt="skip", classes=[fake.classes[1]]))


def test_deterministic_draw_and_seed_changes_it(clean: FakeImageNet, tmp_path: Path) -> None:
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        data.run(clean.data_cfg(tmp_path / name, per_class=4, val_per_class=2, seed=seed))
        runs[name] = ((tmp_path / name / "train.csv").read_text(), (tmp_path / name / "val.csv").read_text())
    assert runs["a"] == runs["b"]
    assert runs["a"][0] != runs["c"][0] and runs["a"][1] != runs["c"][1]
    for name in ("a", "c"):
        rows = manifest(tmp_path / name, "val")
        assert len(rows) == 6 and all(r["path"].startswith(f"val/{r['wnid']}/ILSVRC2012_val_") for r in rows)


def test_class_subset_uses_standard_order(clean: FakeImageNet, tmp_path: Path) -> None:
    root = tmp_path / "out"
    data.run(clean.data_cfg(root, classes=[clean.classes[2], clean.classes[0]], per_class=2, short_side=None))
    assert data.read_classes(root) == [clean.classes[0], clean.classes[2]]
    assert {(r["wnid"], r["label"]) for r in manifest(root, "train")} == {
        (clean.classes[0], "0"),
        (clean.classes[2], "1"),
    }
    data.run(clean.data_cfg(root, per_class=1))  # re-running replaces the tree it wrote
    assert len(manifest(root, "train")) == 3
    assert sum(1 for _ in (root / "train").rglob("*.jpg")) == 3


def test_path_errors_name_the_key_and_fix(fake: FakeImageNet, clean: FakeImageNet, tmp_path: Path) -> None:
    cfg = fake.data_cfg(tmp_path / "out")
    data.check_paths(cfg)
    cases = [
        ({"train_dir": "/nonexistent/train"}, r"data.imagenet.train_dir=/nonexistent/train does not exist; set it"),
        ({"val_dir": None}, r"config key 'data.imagenet.val_dir' is None; expected string"),
        ({"val_labels": None}, r"val_dir=.* has no class folders; set data.imagenet.val_labels"),
        ({"val_labels": str(tmp_path / "nope.csv")}, r"data.imagenet.val_labels=.*nope.csv does not exist"),
        ({"val_dir": str(fake.train_dir)}, r"val_dir equals train_dir"),
    ]
    for change, message in cases:
        bad = {**cfg, "imagenet": {**cfg["imagenet"], **change}}
        with pytest.raises(LcnnError, match=message):
            data.check_paths(bad)
    folders = clean.data_cfg(tmp_path / "out2")
    folders["imagenet"] = {**folders["imagenet"], "val_labels": str(fake.val_labels)}
    with pytest.raises(
        LcnnError, match=r"val_dir=.* has class folders, not flat images; set data.imagenet.val_labels to null"
    ):
        data.check_paths(folders)
    with pytest.raises(LcnnError, match=r"lacks folders for 1 of 4 classes \(e.g. n01440764\)"):
        data.check_paths({**cfg, "classes": [*fake.classes, "n01440764"]})
    with pytest.raises(LcnnError, match=r"not ImageNet-1K wnids"):
        data.check_paths({**cfg, "classes": ["n99999999"]})
    with pytest.raises(LcnnError, match=r"overlaps data.imagenet.train_dir"):
        data.check_paths({**cfg, "root": str(fake.base)})
    with pytest.raises(LcnnError, match=r"config key 'data.on_corrupt' is 'maybe'; expected one of error, skip"):
        data.check_paths({**cfg, "on_corrupt": "maybe"})
    inside = fake.train_files[fake.classes[0]]  # "validation" images that are really training images
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"{p.name} {fake.classes[0]}\n" for p in inside))
    bad = {**cfg, "classes": fake.classes[:1]}
    bad["imagenet"] = {**cfg["imagenet"], "val_dir": str(inside[0].parent), "val_labels": str(labels)}
    with pytest.raises(LcnnError, match=r"holds both train and val images"):
        data.run(bad)
    empty = tmp_path / "empty_tree"
    for d in ("train/n01440764", "val/n01440764"):
        (empty / d).mkdir(parents=True)
    cfg = clean.data_cfg(tmp_path / "o", classes=["n01440764"])
    cfg["imagenet"] = {"train_dir": str(empty / "train"), "val_dir": str(empty / "val"), "val_labels": None}
    with pytest.raises(
        LcnnError,
        match=r"no train images \(.JPEG/.jpg/.png\) for class n01440764 in .*empty_tree/train/<wnid>; restore",
    ):
        data.run(cfg)


def test_refuses_a_root_it_did_not_write(clean: FakeImageNet, tmp_path: Path) -> None:
    (tmp_path / "train" / "precious").mkdir(parents=True)
    with pytest.raises(LcnnError, match=r"not written by lcnn.data"):
        data.run(clean.data_cfg(tmp_path, per_class=1))
    assert (tmp_path / "train" / "precious").is_dir()


def test_val_labels_formats(tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_text("ILSVRC2012_val_00000001.JPEG n01751748\nILSVRC2012_val_00000002.JPEG,n09193705\n")
    assert data.read_val_labels(plain) == {
        "ILSVRC2012_val_00000001": "n01751748",
        "ILSVRC2012_val_00000002": "n09193705",
    }
    devkit = tmp_path / "ILSVRC2012_validation_ground_truth.txt"
    devkit.write_text("490\n361\n")
    with pytest.raises(LcnnError, match="LOC_val_solution.csv"):
        data.read_val_labels(devkit)


def test_builtin_mnist(tmp_path: Path) -> None:
    cfg = {"source": "builtin", "root": str(tmp_path / "a"), "per_class": 20, "val_per_class": None, "short_side": 32}
    assert data.run(cfg)["counts"] == {"train": 200, "val": 1000}
    data.run({**cfg, "root": str(tmp_path / "b"), "seed": 1, "val_per_class": 10})
    a_train, a_val = manifest(tmp_path / "a", "train"), manifest(tmp_path / "a", "val")
    b_train, b_val = manifest(tmp_path / "b", "train"), manifest(tmp_path / "b", "val")
    assert data.read_classes(tmp_path / "a") == [str(d) for d in range(10)]
    assert [sum(r["label"] == str(d) for r in a_train) for d in range(10)] == [20] * 10
    assert all(r["wnid"] == r["label"] for r in a_train + a_val)
    # fixed pools: every val image of any seed comes from the same 100-per-digit pool, never from train pools
    rows = lambda ms: {Path(r["path"]).name for m in ms for r in m}  # noqa: E731
    assert rows([b_val]) <= rows([a_val]) and not rows([a_train, b_train]) & rows([a_val, b_val])
    assert {r["path"] for r in a_train} != {r["path"] for r in b_train}  # another seed draws other digits
    hashes = lambda root, ms: {sha1(root / r["path"]) for r in ms}  # noqa: E731
    assert not hashes(tmp_path / "a", a_train) & hashes(tmp_path / "a", a_val)
    with Image.open(tmp_path / "a" / a_train[0]["path"]) as img:
        assert img.format == "PNG" and img.mode == "RGB" and img.size == (32, 32)
    with pytest.raises(LcnnError, match=r"only 400 images but data.per_class=401"):
        data.run({**cfg, "per_class": 401})  # fails before touching the prepared tree
    assert manifest(tmp_path / "a", "train") == a_train


def test_manifest_dataset(tmp_path: Path) -> None:
    from torchvision.transforms import functional as tvf

    data.run({"source": "builtin", "root": str(tmp_path), "per_class": 2, "val_per_class": 1, "short_side": None})
    ds = data.ManifestDataset(tmp_path / "train.csv", transform=tvf.to_tensor)
    assert len(ds) == 20 and ds.num_classes == 10 == data.num_classes(tmp_path) and ds.root == tmp_path
    assert ds.labels == sorted(ds.labels) and set(ds.labels) == set(range(10))
    img, label = ds[5]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 28, 28) and label == ds.labels[5]
    assert torch.equal(img[0], img[1])  # grey digits stored as RGB
    batch, labels = next(iter(torch.utils.data.DataLoader(ds, batch_size=20)))
    assert batch.shape == (20, 3, 28, 28) and labels.tolist() == ds.labels
    raw, _ = data.ManifestDataset(tmp_path / "val.csv")[0]
    assert isinstance(raw, Image.Image) and raw.mode == "RGB"
    with pytest.raises(LcnnError, match="does not exist; prepare the data first"):
        data.ManifestDataset(tmp_path / "missing.csv")


def test_cli(clean: FakeImageNet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg_file = tmp_path / "data.json"
    cfg_file.write_text(json.dumps({"data": clean.data_cfg(tmp_path / "out")}))
    assert data.main(["--config-json", str(cfg_file), "--per-class", "2", "--val-per-class", "all"]) == 0
    assert json.loads(capsys.readouterr().out)["counts"] == {"train": 6, "val": 12}
    assert data.main(["--config-json", json.dumps(clean.data_cfg(tmp_path / "out")), "--check-only"]) == 0
    assert "look fine" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        data.main(["--config-json", str(cfg_file), "--train-dir", "/nope"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "lcnn error: data.imagenet.train_dir=/nope does not exist; set it to your ImageNet train folder "
        "(train/<wnid>/*.JPEG)"
    ]


def test_loader_bench_times_every_recipe(
    clean: FakeImageNet, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from lcnn.tools import loader_bench

    data.run(clean.data_cfg(tmp_path / "prep", per_class=2, short_side=80))
    argv = [
        "--prepared-root",
        str(tmp_path / "prep"),
        "--num-images",
        "4",
        "--min-seconds",
        "0.01",
        "--img-size",
        "32",
        "--repeats",
        "1",
    ]
    import torch

    threads = torch.get_num_threads()
    assert loader_bench.main([*argv, "--json", str(tmp_path / "b.json")]) == 0
    assert torch.get_num_threads() == threads  # it times one thread, and gives the caller its own count back
    result = json.loads((tmp_path / "b.json").read_text())
    cfg = study.load("config.yaml")
    grouped = [name for row in result["recipes"] for name in row["variants"]]
    assert sorted(grouped) == sorted(study.variant_names(cfg))  # every variant measured, each once
    assert len(result["recipes"]) < len(grouped)  # loss- and optimizer-only variants share the baseline's loader
    baseline = next(r for r in result["recipes"] if "baseline" in r["variants"])
    assert {"label_smoothing", "mixup_cutmix"} <= set(baseline["variants"])
    assert result["draft_short_side"] == math.ceil(32 / 0.875) and result["images"] == 4
    assert all(r[f"{p}_images_per_s"] > 0 for r in result["recipes"] for p in ("float", "draft", "uint8"))
    assert "uint8/float" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------------------- staging
def test_staging_copies_verifies_reuses_and_redoes(
    clean: FakeImageNet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root, local = tmp_path / "prep", tmp_path / "local"
    data.run(clean.data_cfg(root, per_class=2))
    assert data.stage(root, None) == root  # no stage_to: read in place
    staged = data.stage(root, str(local))
    rows = manifest(root, "train") + manifest(root, "val")
    assert staged.parent == local and len(rows) == 3 * 2 + 3 * 4
    assert all(sha1(staged / r["path"]) == sha1(root / r["path"]) for r in rows)
    assert (staged / "classes.txt").read_text() == (root / "classes.txt").read_text()
    reader = dataset.ManifestDataset(staged / "train.csv")
    assert reader.root == staged and len(reader) == 6
    # a complete copy is reused as it is (a file put there survives); a damaged one is made again
    (staged / "sentinel").write_text("reused copies keep me")
    assert data.stage(root, str(local)) == staged and (staged / "sentinel").exists()
    (staged / rows[0]["path"]).write_bytes(b"truncated")
    assert data.stage(root, str(local)) == staged and not (staged / "sentinel").exists()
    assert sha1(staged / rows[0]["path"]) == sha1(root / rows[0]["path"])
    (staged / rows[1]["path"]).unlink()  # an interrupted copy: a file and the stamp missing
    (staged / dataset.STAMP).unlink()
    assert data.stage(root, str(local)) == staged and sha1(staged / rows[1]["path"]) == sha1(root / rows[1]["path"])
    # a re-prepared subset (other manifests) never reuses the old copy
    data.run(clean.data_cfg(root, per_class=3))
    again = data.stage(root, str(local))
    assert again != staged and len(manifest(again, "train")) == 9
    # nor does the same subset re-prepared at another size: its manifests are the same, its images are not
    data.run(clean.data_cfg(root, per_class=3, short_side=48))
    resized = data.stage(root, str(local))
    assert resized != again and manifest(resized, "train") == manifest(again, "train")
    assert all(sha1(resized / r["path"]) == sha1(root / r["path"]) for r in manifest(root, "train"))
    monkeypatch.setenv("LCNN_TEST_LOCAL", str(tmp_path / "env"))
    assert data.stage(root, "$LCNN_TEST_LOCAL/lcnn").parent == tmp_path / "env" / "lcnn"
    with pytest.raises(LcnnError, match=r"data.stage_to=\$LCNN_UNSET_VARIABLE names an unset environment variable"):
        data.stage(root, "$LCNN_UNSET_VARIABLE")
    # a node-local folder too small for the subset: one line before anything is copied
    monkeypatch.setattr(dataset.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9, free=1000))
    small = tmp_path / "small"
    with pytest.raises(LcnnError, match=r"small has 0.00 GB free but the subset needs .* GB; point data.stage_to at"):
        data.stage(root, str(small))
    assert not any(p.is_file() for p in small.rglob("*") if p.name != ".lcnn_stage.lock")


# --------------------------------------------------------------------------------------------- workflow and trainer
@pytest.mark.slow
def test_parsing_the_workflow_imports_neither_torch_nor_timm(tmp_path: Path) -> None:
    """A real dry run under ``python -X importtime``: the parse (every SLURM job repeats it) stays light."""
    workdir = copy_workflow(tmp_path / "wf")
    cmd = [sys.executable, "-X", "importtime", "-m", "snakemake", "-n", *TINY_ARGS]
    proc = subprocess.run(cmd, cwd=workdir, env=local_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "This was a dry-run" in proc.stdout
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert {"snakemake.workflow", "lcnn.config", "lcnn.prepare", "pandas"} <= modules  # the parse was recorded
    assert sorted(m for m in modules if m.split(".")[0] in ("torch", "timm", "torchvision")) == []
    assert len(list((workdir / ".snakemake" / "lcnn").glob("timm_models_ok_*"))) == 1  # the names were checked


def test_timm_name_check_is_cached_per_names_and_never_hides_a_typo(tmp_path: Path) -> None:
    cfg = tiny_config()
    study.check_models(cfg, cache_dir=tmp_path)
    stamps = list(tmp_path.glob("timm_models_ok_*"))
    assert len(stamps) == 1
    # each architecture, and each with its pretrained tag (whose normalisation and crop its runs use)
    names = ["mobilenetv3_large_100", "mobilenetv3_large_100.ra_in1k", "mobilevitv2_050", "mobilevitv2_050.cvnets_in1k"]
    assert json.loads(stamps[0].read_text())["models"] == names
    cfg["models"]["mobilenetv3_l"]["timm"] = "mobilenetv3_larg_100"
    with pytest.raises(LcnnError, match=r"models.mobilenetv3_l.timm = 'mobilenetv3_larg_100' is not a timm model"):
        study.check_models(cfg, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("timm_models_ok_*"))) == 1  # a failure is never cached


@pytest.mark.slow
def test_one_epoch_on_prepared_imagenet_photos_through_the_real_loader(clean: FakeImageNet, tmp_path: Path) -> None:
    """The foolbox photos, prepared as JPEGs, train one full epoch through ManifestDataset, staged to local disk."""
    from lcnn import train

    root = tmp_path / "prep"
    data.run(clean.data_cfg(root, per_class=8, short_side=80))
    rc = study.run_config(tiny_config(root), "mobilenetv3_l", "baseline", 0)
    rc["hparams"].update(batch_size=8, epochs=1, img_size=64)
    rc["train"].update(log_every=1, max_steps_per_epoch=None, num_workers=0)
    rc.update(out_dir=str(tmp_path / "run"), data_stage_to=str(tmp_path / "local"))
    metrics = train.run(rc)
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == 1
    assert metrics["train_images"] == 24 and metrics["val_images"] == 12
    with open(tmp_path / "run" / "history.csv", newline="") as fh:
        history = list(csv.DictReader(fh))
    assert len(history) == 1
    assert math.isfinite(float(history[0]["train_loss"])) and 0 <= float(history[0]["top1"]) <= 100
    staged = list((tmp_path / "local").glob("lcnn_data_*"))
    assert len(staged) == 1 and (staged[0] / dataset.STAMP).is_file()


def test_a_partial_labels_file_is_named_instead_of_shrinking_validation(fake: FakeImageNet, tmp_path: Path) -> None:
    """ImageNet validation images that the labels file does not list would drop out of validation without a word;
    a byte-order mark before the header is not part of it."""
    rows = fake.val_labels.read_text().splitlines()
    bom = tmp_path / "bom.csv"
    bom.write_text("\ufeff" + "\n".join(rows) + "\n", encoding="utf-8")
    assert data.read_val_labels(bom) == data.read_val_labels(fake.val_labels)
    partial = tmp_path / "partial.csv"
    partial.write_text("\n".join(rows[:-2]) + "\n")
    cfg = fake.data_cfg(tmp_path / "out")
    cfg["imagenet"] = {**cfg["imagenet"], "val_labels": str(partial)}
    with pytest.raises(LcnnError, match=r"2 ImageNet validation images in .* have no label in .*partial.csv"):
        data.run(cfg)


def test_images_prepared_smaller_than_evaluation_resizes_to_are_named(fake: FakeImageNet, tmp_path: Path) -> None:
    """Evaluation resizes to img_size / crop_pct (256 px for 224 at 0.875): a subset prepared at 64 px would be
    upsampled for every validation image, and top-1 would drop without a word."""
    from lcnn import recipe

    root = tmp_path / "small"
    data.run(fake.data_cfg(root, per_class=2, val_per_class=1, short_side=64, on_corrupt="skip"))
    why = recipe.short_side_too_low(str(root), 224, 0.875)
    assert why == (
        "data.short_side 64 is below the 256 px that evaluation resizes to at img_size 224 (crop 0.875): validation "
        "images are upsampled; prepare the subset with short_side >= 256"
    )
    assert recipe.short_side_too_low(str(root), 56, 0.875) is None  # 64 px covers 56 / 0.875

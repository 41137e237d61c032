"""Tests of the data stage on a fake ImageNet tree (real photos, odd and broken files) and on the builtin MNIST."""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from data_helpers import FakeImageNet, build_fake_imagenet  # noqa: E402

from lcnn import data, prepare  # noqa: E402
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


def test_loader_bench_smoke(clean: FakeImageNet, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lcnn.tools import loader_bench

    data.run(clean.data_cfg(tmp_path / "prep", per_class=2))
    argv = ["--raw-dir", str(clean.train_dir), "--prepared-root", str(tmp_path / "prep"), "--num-images", "4"]
    assert (
        loader_bench.main([*argv, "--min-seconds", "0.01", "--img-size", "64", "--json", str(tmp_path / "b.json")]) == 0
    )
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["raw"]["images"] == 4 and result["prepared"]["decode_transform_images_per_s"] > 0
    assert "prepared/raw" in capsys.readouterr().out

"""Build a small fake ImageNet tree from real photos, for tests of the data stage and of later stages.

The photos are the 20 ImageNet validation samples shipped in the foolbox wheel (``imagenet_<i>_<label>.jpg``,
label = standard class index). They are read as files (foolbox itself is never imported) and cropped/flipped into
distinct images, because the data stage rejects train images identical to a validation image. The tree also holds
the awkward files real ImageNet has: a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG and, optionally, truncated
JPEGs (one in train, one in val) and a validation image byte-identical to a training image.
"""

from __future__ import annotations

import importlib.util
import io
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps

from lcnn.prepare import imagenet_synsets

# standard class index -> foolbox photo(s); 609 (jeep) has two photos
LABELS = (243, 559, 609)


def foolbox_photos() -> dict[int, list[Path]]:
    """The foolbox wheel's ImageNet samples, by standard class index (located without importing foolbox)."""
    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("foolbox is not installed; `pip install foolbox` (only its sample images are used)")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    photos: dict[int, list[Path]] = {}
    for path in sorted(data.glob("imagenet_*_*.jpg")):
        photos.setdefault(int(path.stem.split("_")[2]), []).append(path)
    return photos


def _variant(img: Image.Image, k: int, size: tuple[int, int] = (200, 150)) -> Image.Image:
    """The k-th distinct crop/flip of ``img`` (different k give different pixels)."""
    w, h = img.size
    cw, ch = w * 3 // 5, h * 3 // 5
    x, y = (k * 37) % (w - cw), (k * 53) % (h - ch)
    out = img.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
    return ImageOps.mirror(out) if k % 2 else out


def _jpeg(img: Image.Image, path: Path, **kw: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="JPEG", quality=85, **kw)
    return path


def _add(files: list[Path], path: Path) -> Path:
    files.append(path)
    return path


@dataclass
class FakeImageNet:
    """Paths of a fake ImageNet tree and what it holds."""

    base: Path
    train_dir: Path
    val_dir: Path
    val_labels: Path | None
    classes: list[str]  # wnids in standard (label) order
    train_files: dict[str, list[Path]] = field(default_factory=dict)
    val_files: dict[str, list[Path]] = field(default_factory=dict)
    odd: dict[str, Path] = field(default_factory=dict)  # name -> odd-but-valid train file
    corrupt: list[Path] = field(default_factory=list)  # truncated files (train first, then val)
    duplicate: tuple[Path, Path] | None = None  # (train file, identical val file)

    def data_cfg(self, root: Path, **overrides: Any) -> dict[str, Any]:
        """A ``data`` config section for this tree (small images)."""
        cfg = {
            "source": "imagenet",
            "root": str(root),
            "imagenet": {
                "train_dir": str(self.train_dir),
                "val_dir": str(self.val_dir),
                "val_labels": str(self.val_labels) if self.val_labels else None,
            },
            "per_class": 3,
            "val_per_class": None,
            "classes": list(self.classes),
            "short_side": 64,
            "seed": 0,
            "on_corrupt": "error",
        }
        cfg.update(overrides)
        return cfg


def build_fake_imagenet(
    base: Path, n_train: int = 6, n_val: int = 3, val_layout: str = "flat", corrupt: bool = False
) -> FakeImageNet:
    """Write a 3-class tree under ``base``: train/<wnid>/*.JPEG and a flat or per-class val folder.

    Every class has ``n_train`` usable training images and ``n_val`` validation images. Class 0's training images
    include a CMYK JPEG, a grayscale JPEG and a PNG named .JPEG (so per_class=n_train draws all of them). Class 2
    gets one extra training image that is byte-identical to one of its validation images (never usable). With
    ``corrupt=True`` class 1 gets an extra truncated training JPEG and class 2 an extra truncated validation JPEG.
    """
    synsets = imagenet_synsets()
    photos = foolbox_photos()
    wnids = [synsets[label] for label in LABELS]
    fake = FakeImageNet(
        base=base,
        train_dir=base / "train",
        val_dir=base / "val",
        val_labels=base / "LOC_val_solution.csv" if val_layout == "flat" else None,
        classes=wnids,
    )
    loc_rows = ["ImageId,PredictionString"]
    val_index = 0
    for c, (label, wnid) in enumerate(zip(LABELS, wnids, strict=True)):
        srcs = [Image.open(p).convert("RGB") for p in photos[label]]
        files = []
        for k in range(n_train):
            img = srcs[k % len(srcs)]
            name = f"{wnid}_{k + 1}.JPEG"
            if c == 0 and k == 0:
                fake.odd["cmyk"] = _add(files, _jpeg(_variant(img, k).convert("CMYK"), fake.train_dir / wnid / name))
            elif c == 0 and k == 1:
                fake.odd["gray"] = _add(files, _jpeg(_variant(img, k).convert("L"), fake.train_dir / wnid / name))
            elif c == 0 and k == 2:
                path = fake.train_dir / wnid / name
                _variant(img, k).save(path, format="PNG")
                fake.odd["png_as_jpeg"] = _add(files, path)
            elif k == n_train - 1:  # one full-size 512x512 original per class (exercises JPEG draft decoding)
                _add(files, _jpeg(ImageOps.mirror(img) if c else img, fake.train_dir / wnid / name))
            else:
                _add(files, _jpeg(_variant(img, k), fake.train_dir / wnid / name))
        fake.train_files[wnid] = files
        vals = []
        for k in range(n_val):
            val_index += 1
            img = _variant(srcs[k % len(srcs)], 100 + 7 * k, size=(180, 240)).rotate(90 * (k % 2 + 1), expand=True)
            name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
            path = (fake.val_dir / name) if val_layout == "flat" else (fake.val_dir / wnid / name)
            vals.append(_jpeg(img, path))
            loc_rows.append(f"ILSVRC2012_val_{val_index:08d},{wnid} 1 2 100 120 {wnid} 5 6 50 60")
        fake.val_files[wnid] = vals
        if c == 2:  # a training image identical to a validation image: must never be drawn
            twin = fake.train_dir / wnid / f"{wnid}_dup.JPEG"
            shutil.copyfile(vals[0], twin)
            fake.duplicate = (twin, vals[0])
        if corrupt and c in (1, 2):
            buf = io.BytesIO()
            _variant(srcs[0], 11).save(buf, format="JPEG", quality=85)
            data = buf.getvalue()[: len(buf.getvalue()) * 2 // 3]
            path = fake.train_dir / wnid / f"{wnid}_truncated.JPEG" if c == 1 else None
            if path is None:
                val_index += 1
                name = f"ILSVRC2012_val_{val_index:08d}.JPEG"
                path = (fake.val_dir / name) if val_layout == "flat" else (fake.val_dir / wnid / name)
                loc_rows.append(f"ILSVRC2012_val_{val_index:08d},{wnid} 1 2 3 4")
            path.write_bytes(data)
            fake.corrupt.append(path)
    (fake.train_dir / wnids[0] / "README.txt").write_text("not an image; the data stage must ignore it\n")
    # a labelled validation image of a class outside the selection (must be ignored) and a stray unlabelled file
    other = synsets[1]
    if val_layout == "flat":
        val_index += 1
        _jpeg(_variant(srcs[0], 3), fake.val_dir / f"ILSVRC2012_val_{val_index:08d}.JPEG")
        loc_rows.append(f"ILSVRC2012_val_{val_index:08d},{other} 1 1 2 2")
        _jpeg(_variant(srcs[0], 5), fake.val_dir / "unlabelled.JPEG")
        fake.val_labels.write_text("\n".join(loc_rows) + "\n")
    return fake

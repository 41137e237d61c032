"""Images/s one data-loader worker delivers for every augmentation recipe of the study, on the prepared subset.

Why: a GPU trains a small model at thousands of images/s, and each loader worker decodes and augments on one CPU
core. Dividing a model's GPU training rate by a recipe's per-worker rate gives the workers per GPU it needs::

    python -m lcnn.tools.loader_bench --prepared-root data/imagenet_subset --config config.yaml

Each variant of the config is mapped to its training transform (timm's ``create_transform`` through
:func:`lcnn.recipe.transforms`); variants with the same transform share one measurement (label smoothing and
optimizer variants load exactly like the baseline; Mixup/CutMix is a batch op the trainer applies on the device, so
its loader is the baseline's). Each transform is timed in this process with one torch thread, which is what one
DataLoader worker does: read, decode, seeded transform (:class:`lcnn.recipe.SeededTransforms`) and collate into
batches. Files are read once before timing, and the clock is the process's CPU time, so the figures are CPU cost
(images per CPU second) with a warm page cache, not storage speed.

Three paths are timed side by side for every transform:

- ``float``: the trainer with ``train.prefetcher: false`` (full JPEG decode, float32 normalised tensors made in the
  worker), the path the trainer ran before the prefetcher became its default;
- ``draft``: JPEG draft decoding at the smallest DCT scale that keeps the short side at least the eval resize
  (``img_size / crop_pct``); it gains only where the prepared ``short_side`` is twice that or more;
- ``uint8``: what the trainer runs by default (``train.prefetcher: true``, timm's ``use_prefetcher``): the worker
  hands over uint8 tensors and normalisation (and random erasing) runs on the device
  (:class:`lcnn.recipe.DeviceBatch`), as timm's train.py does; fewer copies and no float maths on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate
from torch.utils.data import DataLoader, Subset

from lcnn import config as study
from lcnn.dataset import ManifestDataset
from lcnn.recipe import SeededTransforms, transforms
from lcnn.timing import torch_threads
from lcnn.utils import LcnnError, atomic_write_json, cli, environment

TRANSFORM_KEYS = ("scale", "hflip", "color_jitter", "auto_augment", "re_prob")
TIMM_NAME = "mobilenetv3_large_100"  # only the normalisation constants depend on the model, not the cost
CROP_PCT = 0.875


def recipes(cfg: dict[str, Any]) -> dict[tuple, list[str]]:
    """Variants grouped by their training transform (the hparams that reach ``create_transform``)."""
    groups: dict[tuple, list[str]] = {}
    for name in study.variant_names(cfg):
        hp = study.hparams(cfg, name)
        key = tuple((k, json.dumps(hp[k])) for k in TRANSFORM_KEYS)
        groups.setdefault(key, []).append(name)
    return groups


def _transform(hp: dict[str, Any], img_size: int, path: str) -> Any:
    return transforms(hp, img_size, TIMM_NAME, prefetcher=path == "uint8")[0]


def rate(dataset: Any, batch_size: int, min_seconds: float) -> float:
    """Images per CPU second of one worker's loop (load, transform, collate), repeating until ``min_seconds``.

    CPU time, not wall time: it is what a worker with a core to itself delivers, and it does not change when other
    processes share the machine (wall-clock figures on a busy 2-core machine varied by a third between runs).
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)
    done, start = 0, time.process_time()
    while True:
        for images, _ in loader:
            done += len(images)
        elapsed = time.process_time() - start
        if elapsed >= min_seconds:
            return done / elapsed


def run(
    prepared_root: Path,
    cfg: dict[str, Any],
    img_size: int = 224,
    num_images: int = 128,
    min_seconds: float = 3.0,
    paths: tuple[str, ...] = ("float", "draft", "uint8"),
    repeats: int = 5,
) -> dict[str, Any]:
    """One row per distinct training transform: the variants that use it and each path's best images/s."""
    with torch_threads(1):  # a DataLoader worker runs with one thread
        return _run(prepared_root, cfg, img_size, num_images, min_seconds, paths, repeats)


def _run(
    prepared_root: Path,
    cfg: dict[str, Any],
    img_size: int,
    num_images: int,
    min_seconds: float,
    paths: tuple[str, ...],
    repeats: int,
) -> dict[str, Any]:
    draft = math.ceil(img_size / CROP_PCT)
    probe = ManifestDataset(prepared_root / "train.csv")
    if not len(probe):
        raise LcnnError(f"{prepared_root}/train.csv lists no images; prepare the data first")
    indices = random.Random(0).sample(range(len(probe)), min(num_images, len(probe)))
    for i in indices:  # warm the page cache
        (probe.root / str(probe.paths[i])).read_bytes()
    sizes = [probe[i][0].size for i in indices[:32]]
    rows = []
    for key, names in recipes(cfg).items():
        hp = study.hparams(cfg, names[0])
        row: dict[str, Any] = {"variants": names, **{k: json.loads(v) for k, v in key}}
        loaders = {
            path: Subset(
                SeededTransforms(
                    ManifestDataset(prepared_root / "train.csv", draft=draft if path == "draft" else None),
                    _transform(hp, img_size, path),
                    seed=0,
                ),
                indices,
            )
            for path in paths
        }
        print(f"loader_bench: {', '.join(names)} ...", file=sys.stderr, flush=True)
        rates: dict[str, list[float]] = {path: [] for path in paths}
        for _ in range(repeats):  # paths interleaved, so a busy moment of a shared CPU hits them alike
            for path, dataset in loaders.items():
                rates[path].append(rate(dataset, 32, min_seconds))
        row |= {f"{path}_images_per_s": round(max(r), 1) for path, r in rates.items()}  # best of: least disturbed
        rows.append(row)
    env = environment()
    return {
        "prepared_root": str(prepared_root),
        "img_size": img_size,
        "draft_short_side": draft,
        "images": len(indices),
        "mean_prepared_size": [
            round(sum(s[0] for s in sizes) / len(sizes)),
            round(sum(s[1] for s in sizes) / len(sizes)),
        ],
        "threads": 1,
        "repeats": repeats,
        "cpu_model": env["cpu_model"],
        "torch": torch.__version__,
        "pillow": _pillow_version(),
        "recipes": rows,
    }


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


@cli
def main(argv: list[str] | None = None) -> int:
    """Print images/s per worker for each recipe and path (and optionally save them as JSON)."""
    p = argparse.ArgumentParser(prog="python -m lcnn.tools.loader_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--prepared-root", type=Path, required=True, help="data.root written by python -m lcnn.data")
    p.add_argument("--config", default="config.yaml", help="the study config whose variants are measured")
    p.add_argument("--num-images", type=int, default=128, help="images sampled from train.csv")
    p.add_argument("--img-size", type=int, default=224, help="training crop size (the study trains at 224)")
    p.add_argument("--min-seconds", type=float, default=3.0, help="CPU seconds each measurement runs at least")
    p.add_argument("--paths", default="float,draft,uint8", help="comma-separated paths to time")
    p.add_argument("--repeats", type=int, default=5, help="timings of each path (the best is reported)")
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    paths = tuple(x.strip() for x in args.paths.split(",") if x.strip())
    unknown = sorted(set(paths) - {"float", "draft", "uint8"})
    if unknown:
        raise LcnnError(f"--paths has {unknown[0]!r}; use float, draft and/or uint8")
    cfg = study.load(args.config)
    result = run(args.prepared_root, cfg, args.img_size, args.num_images, args.min_seconds, paths, args.repeats)
    table = [
        [", ".join(r["variants"]), *(r[f"{p}_images_per_s"] for p in paths)]
        + ([round(r["uint8_images_per_s"] / r["float_images_per_s"], 2)] if {"float", "uint8"} <= set(paths) else [])
        for r in result["recipes"]
    ]
    headers = ["variants (same loader)", *(f"{p} img/s" for p in paths)]
    headers += ["uint8/float"] if {"float", "uint8"} <= set(paths) else []
    print(tabulate(table, headers=headers, maxcolwidths=[48]))
    w, h = result["mean_prepared_size"]
    print(
        f"best of {args.repeats}; one worker, one thread, {args.img_size} px crops of {result['images']} prepared "
        f"images (mean {w}x{h}), {result['cpu_model']}, torch {result['torch']}, Pillow {result['pillow']}"
    )
    if args.json:
        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Measure one data-loader worker's throughput on raw full-size JPEGs versus the prepared (resized) images.

Why: the data stage re-encodes the subset at a small ``short_side`` so that training small models is not
bottlenecked on JPEG decoding. This script checks that claim on your own files and CPU::

    python -m lcnn.tools.loader_bench --raw-dir /datasets/imagenet/train --prepared-root data/imagenet_subset

For each image set it times, in this single process with one torch thread (what one DataLoader worker does),
(a) read + decode to RGB and (b) read + decode + timm's training transform at ``--img-size`` (RandomResizedCrop,
flip, ToTensor, normalize). Files are read once before timing so the numbers are CPU cost with a warm page cache,
not storage speed; on a cold network file system raw images are slower still. Multiply by the loader's
``num_workers`` (up to the CPU count) for an upper bound on images/s per training job.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lcnn.data import IMAGE_EXTS, load_rgb
from lcnn.utils import LcnnError, atomic_write_json, cli, environment


def raw_files(raw_dir: Path, limit: int, seed: int) -> list[Path]:
    """Up to ``limit`` image files under ``raw_dir`` (recursive), a seeded sample spread across folders."""
    if not raw_dir.is_dir():
        raise LcnnError(f"--raw-dir {raw_dir} is not a folder; pass an ImageNet-style train folder")
    found: list[Path] = []
    for folder, dirs, names in os.walk(raw_dir):
        dirs.sort()
        found += [Path(folder) / n for n in sorted(names) if os.path.splitext(n)[1].lower() in IMAGE_EXTS]
        if len(found) >= 50 * limit:  # enough to sample from without listing all of ImageNet
            break
    if not found:
        raise LcnnError(f"--raw-dir {raw_dir} holds no .JPEG/.jpg/.png files")
    random.Random(seed).shuffle(found)
    return found[:limit]


def prepared_files(root: Path, limit: int, seed: int) -> list[Path]:
    """Up to ``limit`` images listed in ``root/train.csv`` (a prepared root written by ``python -m lcnn.data``)."""
    manifest = root / "train.csv"
    if not manifest.is_file():
        raise LcnnError(f"{manifest} does not exist; pass --prepared-root of a prepared dataset (python -m lcnn.data)")
    with open(manifest, newline="") as fh:
        files = [root / row["path"] for row in csv.DictReader(fh)]
    random.Random(seed).shuffle(files)
    return files[:limit]


def _rate(files: list[Path], fn: Callable[[Path], Any], min_seconds: float) -> float:
    """Images/s of ``fn`` over ``files``, repeating the list until ``min_seconds`` have passed."""
    done, start = 0, time.perf_counter()
    while True:
        for path in files:
            fn(path)
        done += len(files)
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed


def measure(files: list[Path], transform: Callable, min_seconds: float) -> dict[str, Any]:
    """Decode-only and decode+transform rates for one image set, plus what the images look like."""
    sizes = []
    for path in files:  # warm the page cache and record the image sizes
        img = load_rgb(path)
        sizes.append(img.size)
    torch.manual_seed(0)
    random.seed(0)
    decode = _rate(files, load_rgb, min_seconds)
    full = _rate(files, lambda p: transform(load_rgb(p)), min_seconds)
    return {
        "images": len(files),
        "mean_file_kb": round(sum(p.stat().st_size for p in files) / len(files) / 1024, 1),
        "mean_width": round(sum(s[0] for s in sizes) / len(sizes)),
        "mean_height": round(sum(s[1] for s in sizes) / len(sizes)),
        "decode_images_per_s": round(decode, 1),
        "decode_transform_images_per_s": round(full, 1),
    }


@cli
def main(argv: list[str] | None = None) -> int:
    """Print (and optionally save as JSON) images/s per loader worker for raw vs prepared images."""
    p = argparse.ArgumentParser(prog="python -m lcnn.tools.loader_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--raw-dir", type=Path, required=True, help="folder of original images (e.g. ImageNet train/)")
    p.add_argument("--prepared-root", type=Path, required=True, help="data.root written by python -m lcnn.data")
    p.add_argument("--num-images", type=int, default=200, help="images sampled from each set")
    p.add_argument("--img-size", type=int, default=224, help="training crop size of the timm transform")
    p.add_argument("--min-seconds", type=float, default=3.0, help="time each measurement for at least this long")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="also write the result here")
    args = p.parse_args(argv)
    from timm.data import create_transform

    torch.set_num_threads(1)  # a DataLoader worker runs with one thread
    transform = create_transform(args.img_size, is_training=True)
    result: dict[str, Any] = {"img_size": args.img_size, "threads": 1}
    for name, files in (
        ("raw", raw_files(args.raw_dir, args.num_images, args.seed)),
        ("prepared", prepared_files(args.prepared_root, args.num_images, args.seed)),
    ):
        print(f"loader_bench: timing {len(files)} {name} images ...", file=sys.stderr, flush=True)
        result[name] = measure(files, transform, args.min_seconds)
    raw, prep = result["raw"], result["prepared"]
    result["speedup_decode"] = round(prep["decode_images_per_s"] / raw["decode_images_per_s"], 2)
    result["speedup_decode_transform"] = round(
        prep["decode_transform_images_per_s"] / raw["decode_transform_images_per_s"], 2
    )
    env = environment()
    result["cpu_model"], result["pillow"] = env["cpu_model"], _pillow_version()
    print(f"{'images':<10}{'mean size':>12}{'mean KiB':>10}{'decode img/s':>14}{'+transform img/s':>18}")
    for name in ("raw", "prepared"):
        r = result[name]
        size = f"{r['mean_width']}x{r['mean_height']}"
        row = f"{size:>12}{r['mean_file_kb']:>10}{r['decode_images_per_s']:>14}{r['decode_transform_images_per_s']:>18}"
        print(f"{name:<10}{row}")
    print(
        f"prepared/raw: decode x{result['speedup_decode']}, decode+transform x{result['speedup_decode_transform']} "
        f"(one worker, one thread, {result['cpu_model']})"
    )
    if args.json:
        atomic_write_json(args.json, result)
    return 0


def _pillow_version() -> str:
    import PIL

    return PIL.__version__


if __name__ == "__main__":
    raise SystemExit(main())

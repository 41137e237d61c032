"""The data stage's public names in one place: the prepare step (:mod:`lcnn.prepare`) and the reader.

``python -m lcnn.data`` runs the prepare step. The reader (:mod:`lcnn.dataset`, which imports torch) is loaded
only when one of its names is asked for, so the Snakefile can import :func:`check_paths` from here without torch.
"""

from __future__ import annotations

from typing import Any

from lcnn.prepare import (
    IMAGE_EXTS,
    check_paths,
    imagenet_synsets,
    load_rgb,
    main,
    normalize,
    num_classes,
    read_classes,
    read_val_labels,
    run,
)

_READER = ("ManifestDataset", "stage")  # from lcnn.dataset, loaded on first use
__all__ = [
    *_READER,
    "IMAGE_EXTS",
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


def __getattr__(name: str) -> Any:
    if name in _READER:
        from lcnn import dataset

        return getattr(dataset, name)
    raise AttributeError(f"module 'lcnn.data' has no attribute {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())

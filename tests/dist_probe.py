"""Test-only entry point: lcnn.train.main, recording what each rank's loader produced.

Started in place of ``-m lcnn.train`` inside the launcher's exact torchrun command (tests/test_distributed.py).
Every sample a rank (or its loader worker) augments is appended to ``$LCNN_PROBE_DIR/samples-<pid>.tsv`` as
``rank, dataset size, epoch, index, digest``; the digest is of the augmented tensor, so equal digests mean equal
augmentation. Each rank's Mixup/CutMix draws go to ``mixup-<rank>.tsv``. Nothing the trainer computes is changed.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from timm.data import Mixup  # noqa: E402

from lcnn import recipe, train  # noqa: E402

_original = recipe.SeededTransforms.augment


def _recording_augment(self, index):
    image, label = _original(self, index)
    digest = hashlib.sha1(image.numpy().tobytes()).hexdigest()[:16]
    line = f"{os.environ.get('RANK', '0')}\t{len(self)}\t{self.epoch}\t{index}\t{digest}\n"
    with open(Path(os.environ["LCNN_PROBE_DIR"]) / f"samples-{os.getpid()}.tsv", "a") as fh:
        fh.write(line)
    return image, label


_original_params = Mixup._params_per_batch


def _recording_params(self):
    lam, use_cutmix = _original_params(self)
    with open(Path(os.environ["LCNN_PROBE_DIR"]) / f"mixup-{os.environ.get('RANK', '0')}.tsv", "a") as fh:
        fh.write(f"{lam!r}\t{int(use_cutmix)}\n")
    return lam, use_cutmix


recipe.SeededTransforms.augment = _recording_augment
Mixup._params_per_batch = _recording_params

if __name__ == "__main__":
    train.main()

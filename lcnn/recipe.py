"""The training recipe: turn one run's hyperparameters into timm's factory keyword arguments, in one place.

Each study axis maps onto a timm factory: the optimizer onto ``create_optimizer_v2``, the schedule onto
``create_scheduler_v2``, augmentation onto ``create_transform`` and ``Mixup``, plus the matching loss.
"""

from __future__ import annotations

import atexit
import functools
import inspect
import math
import os
import random
import signal
import sys
from typing import Any, NamedTuple

import numpy as np
import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, get_optimizer_class
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lcnn.config import SCHEDULE_KEYS, prepared_definition
from lcnn.dataset import ManifestDataset, stage
from lcnn.launch import STOP_SIGNALS
from lcnn.models import checked_tag
from lcnn.utils import LcnnError, kill_children


class SeededTransforms(Dataset):
    """Apply a random transform seeded by (seed, epoch, index), whichever rank, worker or step loads the sample.

    That makes augmentation independent of worker count and of where a resumed epoch restarts, and the
    global RNG streams are restored afterwards so the model's own randomness is not disturbed. The epoch lives in
    shared memory: persistent loader workers see :meth:`set_epoch`, and the trainer calls it itself, because
    Accelerate forwards a prepared loader's ``set_epoch`` to the dataset only when the loader is not sharded.
    """

    def __init__(self, dataset: ManifestDataset, transform: Any, seed: int) -> None:
        self.dataset, self.transform, self.seed = dataset, transform, seed
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, index: int) -> int:
        return (self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**31

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch, as DataLoader asks for it: the global RNG streams are saved and restored once per batch, not
        per sample (90 us a sample: a third of a demo epoch's loading, 0.87 -> 0.59 s)."""
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            return [self.augment(index) for index in indices]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    def augment(self, index: int) -> tuple[torch.Tensor, int]:
        """Sample ``index``, transformed under its own seed (this changes the global RNG streams)."""
        image, label = self.dataset[index]
        sample_seed = self.sample_seed(index)
        random.seed(sample_seed)
        np.random.seed(sample_seed)
        torch.default_generator.manual_seed(sample_seed)  # the CPU generator only: 1 us, torch.manual_seed 90 us
        return self.transform(image), label


def _loader_worker_init(_worker_id: int) -> None:
    """Loader workers ignore the stop signals, which SLURM, torchrun and Ctrl-C also deliver to them.

    The trainer turns the signal into a saved state at its next check, while its loader still runs; a worker that
    died by it would make the trainer fail before the state is saved. A multi-GPU job's workers can get SIGTERM
    twice (SLURM signals every process of the step, torchrun its workers' process groups), so they ignore it
    outright. They still end with the trainer: the DataLoader shuts them down, and a worker whose trainer is gone
    exits by itself (torch's watchdog); ``scancel``'s SIGKILL ends everything.
    """
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@functools.cache
def _kill_workers_at_exit() -> None:
    """Kill loader workers at the interpreter's exit, before multiprocessing's own exit handler waits on them.

    That handler sends each daemonic child SIGTERM, which these workers ignore, and joins it without a timeout. A
    trainer that died of an exception while its persistent workers lived (an out-of-memory step, a CUDA error, a
    corrupt image) printed its traceback and then hung, holding its GPUs until SLURM's time limit, and its retry hung
    again. atexit runs handlers last in, first out: this one, registered after multiprocessing's, runs first.
    """
    import multiprocessing.util  # noqa: F401  (registers multiprocessing's exit handler, if nothing did yet)

    atexit.register(kill_children)


def short_side_too_low(root: str, img_size: int, crop_pct: float) -> str | None:
    """Why the prepared images are too small for evaluation at ``img_size`` (None when they are not, or unknown).

    Evaluation resizes the short side to ``img_size / crop_pct`` and crops the centre; images prepared smaller are
    upsampled there, blurring every validation image alike, so top-1 drops without a word. (The built-in digits
    are 28 px drawings, upsampled whatever the size.)
    """
    prepared = prepared_definition(root) or {}
    short_side = prepared.get("short_side")
    needed = math.floor(img_size / crop_pct)  # as timm's create_transform resizes for evaluation
    if prepared.get("source") != "imagenet" or not short_side or short_side >= needed:
        return None
    return (
        f"data.short_side {short_side} is below the {needed} px that evaluation resizes to at img_size {img_size} "
        f"(crop {crop_pct}): validation images are upsampled; prepare the subset with short_side >= {needed}"
    )


def data_name(cfg: dict[str, Any]) -> str:
    """The timm name (``arch.tag``) whose pretrained config normalises and crops a run's images.

    The configured weights' for every init: timm's default tag can differ (ConvNeXt-T's in12k_ft_in1k crops at 0.95,
    the configured fb_in1k at 0.875), and the initialization axis must compare like with like.
    """
    tag = cfg.get("pretrained_tag")
    return f"{cfg['timm_name']}.{tag}" if tag else cfg["timm_name"]


def normalization(timm_name: str) -> dict[str, Any]:
    """The model's own input normalisation (mean, std, crop_pct) from its pretrained config, without building it."""
    import timm

    arch, _, tag = timm_name.partition(".")
    if not timm.is_model(arch):  # the first place a run touches its model: fail here, in one line
        raise LcnnError(f"unknown timm model '{arch}'; use a name from timm.list_models()")
    if tag:
        checked_tag(arch, tag)
    pretrained_cfg = timm.models.get_pretrained_cfg(timm_name)
    data_cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict() if pretrained_cfg else {})
    return {"mean": data_cfg["mean"], "std": data_cfg["std"], "crop_pct": data_cfg.get("crop_pct", 0.875)}


def transforms(hp: dict[str, Any], img_size: int, timm_name: str, prefetcher: bool = False) -> tuple[Any, Any]:
    """Training and evaluation transforms from timm's ``create_transform``, normalised like the model.

    ``prefetcher`` is timm's ``use_prefetcher``: the transforms end in uint8 tensors, and normalisation and random
    erasing are left to :class:`DeviceBatch` on the device.
    """
    norm = normalization(timm_name)
    # the mean also fills the pixels RandAugment/AutoAugment shift in (timm ignores it for normalisation under the
    # prefetcher), so the fill is the model's mean with or without the prefetcher, as in timm's train.py
    common: dict[str, Any] = {"interpolation": "bicubic", "use_prefetcher": prefetcher}
    common |= {"mean": norm["mean"], "std": norm["std"]}
    train = create_transform(
        img_size,
        is_training=True,
        scale=tuple(hp["scale"]),
        hflip=hp["hflip"],
        color_jitter=hp.get("color_jitter") or None,  # absent: unused, auto_augment disables it
        auto_augment=hp["auto_augment"],
        re_prob=0.0 if prefetcher else hp["re_prob"],
        re_mode="pixel",
        **common,
    )
    evaluation = create_transform(img_size, is_training=False, crop_pct=norm["crop_pct"], **common)
    return train, evaluation


class DeviceBatch:
    """timm's prefetcher step on a batch that is already on the device: uint8 to normalised float, then erasing.

    With ``train.prefetcher`` (the default, as in timm's train.py) the loader workers stop at uint8 tensors: a
    quarter of the bytes to pin and copy to the GPU, and no float maths on the workers' CPU cores. The batch is
    normalised here as timm's ``PrefetchLoader`` does it (mean and std times 255), and in training randomly erased
    with timm's ``RandomErasing`` on the device. It is a function of the batch, not a loader wrapper, so the loader
    Accelerate prepared (sharding, ``set_epoch``, ``skip_first_batches``) stays as it is. Without the prefetcher
    the batch is already normalised and passes through.
    """

    def __init__(self, timm_name: str, re_prob: float, device: Any, prefetcher: bool = True) -> None:
        self.prefetcher = prefetcher
        self.mean = self.std = self.erase = None
        if prefetcher:
            norm = normalization(timm_name)
            self.mean = torch.tensor([255 * m for m in norm["mean"]], device=device).view(1, -1, 1, 1)
            self.std = torch.tensor([255 * s for s in norm["std"]], device=device).view(1, -1, 1, 1)
            if re_prob > 0:
                self.erase = RandomErasing(probability=re_prob, mode="pixel", device=device)

    def __call__(self, images: torch.Tensor, train: bool = False) -> torch.Tensor:
        if not self.prefetcher:
            return images
        if images.dtype != torch.uint8:
            raise LcnnError(f"train.prefetcher expects uint8 batches from the loader, got {images.dtype}")
        images = images.float().sub_(self.mean).div_(self.std)
        return self.erase(images) if train and self.erase is not None else images


class Loaders(NamedTuple):
    train: DataLoader
    val: DataLoader
    mixup: Mixup | None  # the Mixup/CutMix batch transform, applied on the device after ``on_device``
    num_classes: int
    on_device: DeviceBatch  # normalises (and erases) uint8 batches on the device with ``train.prefetcher``


def build_loaders(
    cfg: dict[str, Any], img_size: int, num_processes: int, pin_memory: bool = False, device: Any = "cpu"
) -> Loaders:
    """Streaming train/val loaders over the prepared manifests, plus the batch transforms that run on ``device``.

    Workers persist across epochs and prefetch ``train.prefetch_factor`` batches each; ``pin_memory`` (on a GPU)
    lets the host-to-device copies run asynchronously.
    """
    hp, tcfg = cfg["hparams"], cfg["train"]
    root = stage(cfg["data_root"], cfg.get("data_stage_to"))  # node-local copy where data.stage_to is set
    train_set = ManifestDataset(f"{root}/train.csv")
    val_set = ManifestDataset(f"{root}/val.csv")
    if len(train_set.labels) and min(np.bincount(train_set.labels, minlength=train_set.num_classes)) == 0:
        raise LcnnError(
            f"{root}/train.csv has a class with no images; re-run the data step with enough images per class"
        )
    global_batch = hp["batch_size"] * num_processes
    if global_batch > len(train_set):
        raise LcnnError(
            f"batch_size {hp['batch_size']} x {num_processes} devices exceeds the {len(train_set)} training images "
            f"in {root}; lower baseline.batch_size (or the variant's) below {len(train_set)}"
        )
    timm_name = data_name(cfg)
    low = short_side_too_low(cfg["data_root"], img_size, normalization(timm_name)["crop_pct"])
    if low and int(os.environ.get("RANK", "0")) == 0:
        print(f"lcnn: warning: {low}", file=sys.stderr, flush=True)
    prefetcher = tcfg.get("prefetcher", True)
    train_tf, eval_tf = transforms(hp, img_size, timm_name, prefetcher)
    workers = tcfg.get("num_workers", 0)
    # each loader's own generator: starting an epoch's iterator (also a resumed one, mid-epoch) then never draws
    # from the process RNG, whose stream drop-path, Mixup and random erasing use and a saved state restores
    loader_kw: dict[str, Any] = {"num_workers": workers, "pin_memory": pin_memory}
    if workers:
        _kill_workers_at_exit()
        prefetch = tcfg.get("prefetch_factor", 4)
        loader_kw |= {"persistent_workers": True, "prefetch_factor": prefetch, "worker_init_fn": _loader_worker_init}
        # a stalled worker (a hung read on shared storage) would otherwise hold the job, and its GPUs, until SLURM's
        # time limit: the loop never reaches a check, so even the limit's SIGTERM saves nothing. A timeout fails it
        loader_kw["timeout"] = float(tcfg.get("loader_timeout_s", 600))
    train_loader = DataLoader(
        SeededTransforms(train_set, train_tf, cfg["seed"]),
        batch_size=hp["batch_size"],
        shuffle=True,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg["seed"]),
        **loader_kw,
    )
    val_loader = DataLoader(
        SeededTransforms(val_set, eval_tf, cfg["seed"]),
        batch_size=hp["batch_size"],
        generator=torch.Generator().manual_seed(cfg["seed"]),
        **loader_kw,
    )
    mixup = None
    if hp["mixup"] > 0 or hp["cutmix"] > 0:
        mixup = Mixup(
            mixup_alpha=hp["mixup"],
            cutmix_alpha=hp["cutmix"],
            label_smoothing=hp["smoothing"],
            num_classes=train_set.num_classes,
        )
    on_device = DeviceBatch(timm_name, hp["re_prob"], device, prefetcher)
    return Loaders(train_loader, val_loader, mixup, train_set.num_classes, on_device)


def build_loss(hp: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """Training loss for the augmentation axis (soft targets under Mixup), and plain CE for validation."""
    if hp["mixup"] > 0 or hp["cutmix"] > 0:
        train = SoftTargetCrossEntropy()
    elif hp["smoothing"] > 0:
        train = LabelSmoothingCrossEntropy(smoothing=hp["smoothing"])
    else:
        train = nn.CrossEntropyLoss()
    return train, nn.CrossEntropyLoss()


def scaled_lr(hp: dict[str, Any], num_processes: int) -> float:
    """lr_base rescaled from lr_base_size to the global batch (batch_size x processes), as timm's train.py does."""
    if hp["lr_scale"] == "none":  # lr_base_size is then left out of the recipe (lcnn.config.unused_hparams)
        return hp["lr_base"]
    ratio = hp["batch_size"] * num_processes / hp["lr_base_size"]
    return hp["lr_base"] * {"linear": ratio, "sqrt": math.sqrt(ratio)}[hp["lr_scale"]]


def has_fused(opt: str) -> bool:
    """Whether timm's optimizer ``opt`` is a torch optimizer with a fused kernel (AdamW, Adam, SGD; not LAMB).

    A ``lookahead_`` prefix wraps the named optimizer, as in ``create_optimizer_v2``, so the last part decides.
    """
    inner = get_optimizer_class(opt.lower().split("_")[-1], bind_defaults=False)
    return "fused" in inspect.signature(inner).parameters


def build_optimizer(
    model: nn.Module, hp: dict[str, Any], num_processes: int, fused: bool = True
) -> tuple[torch.optim.Optimizer, float]:
    """timm's ``create_optimizer_v2``; with ``fused``, torch's fused kernel where the optimizer has one.

    The fused step updates every parameter in one kernel instead of one per tensor (on this CPU, AdamW's step
    for MobileNetV3-L takes 4.7 ms instead of 29 ms), and under the fp16 GradScaler it skips an overflowed step
    on the device, so the scaler never reads ``found_inf`` back to the host.
    """
    lr = scaled_lr(hp, num_processes)
    extra = {"fused": True} if fused and has_fused(hp["opt"]) else {}
    if "momentum" in hp:  # absent for optimizers without momentum (lcnn.config.NO_MOMENTUM_OPTS): timm ignores it
        extra["momentum"] = hp["momentum"]
    if hp.get("opt_eps") is not None:  # else timm's default: 1e-8 for Adam-type, 1e-10 for RMSpropTF
        extra["eps"] = hp["opt_eps"]
    optimizer = create_optimizer_v2(model, opt=hp["opt"], lr=lr, weight_decay=hp["weight_decay"], **extra)
    zero_fused_momentum(optimizer)
    return optimizer, lr


def zero_fused_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Start fused SGD's momentum buffers at zero instead of leaving them to its first step.

    torch's fused SGD creates them on its first step with ``empty_like`` and fills them inside the kernel, which
    returns at once when the fp16 GradScaler flags an overflow (``found_inf``). A skipped first step, routine at the
    scaler's initial scale of 65536, so leaves them holding whatever memory they were given, and every later step
    adds that to the weights (a NaN or a 1e31 in a weight, with no error). With timm's ``dampening`` of 0 a zero
    buffer gives the same first step (``buf = grad``).
    """
    if not isinstance(optimizer, torch.optim.SGD):  # timm's Lookahead is stepped unfused by GradScaler: no found_inf
        return
    for group in optimizer.param_groups:
        if group.get("fused") and group["momentum"] and not group["dampening"]:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p))


def build_scheduler(optimizer: torch.optim.Optimizer, hp: dict[str, Any], steps_per_epoch: int):
    """timm scheduler updated every step (so short runs still see warmup and decay); None = constant lr.

    A schedule setting absent from ``hp`` is one this schedule never reads (lcnn.config.unused_hparams): timm's
    default stands in for it unread.
    """
    if hp["sched"] == "none":
        return None
    schedule = {k: hp[k] for k in SCHEDULE_KEYS if k in hp}
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=hp["sched"],
        num_epochs=hp["epochs"],
        **schedule,
        step_on_epochs=False,
        updates_per_epoch=steps_per_epoch,
    )
    return scheduler

"""The trainer: each study axis changes what it claims, runs are deterministic and survive preemption."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from accelerate import Accelerator
from conftest import REPO, tiny_config
from safetensors.torch import load_file
from timm.data.auto_augment import AutoAugment, RandAugment
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import Lamb, Lion, RMSpropTF

from lcnn import checkpoint, dataset, owner, recipe, train
from lcnn import config as study
from lcnn.models import create
from lcnn.tools import gpu_check
from lcnn.utils import LcnnError


def hp(**over):
    return {**study.hparams(tiny_config(), "baseline"), **over}


@pytest.mark.parametrize(
    ("opt", "cls"),
    [("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW), ("lamb", Lamb), ("rmsproptf", RMSpropTF), ("lion", Lion)],
)
def test_optimizer_axis_picks_the_timm_optimizer(opt, cls):
    optimizer, lr = recipe.build_optimizer(create("mobilevitv2_050", 10), hp(opt=opt, lr_base=0.01), 1)
    assert type(optimizer) is cls
    # torch's fused kernel where the optimizer has one; timm's own optimizers have none
    assert bool(optimizer.defaults.get("fused")) is (opt in ("sgd", "adamw"))
    assert lr == pytest.approx(0.01 * 16 / 256)  # the tiny study trains at batch 16


def test_fused_sgd_survives_a_grad_scaler_skipping_its_first_step():
    """fp16's GradScaler skips an overflowed step by handing ``found_inf`` to the fused kernel. On a first step torch's
    fused SGD has then already made its momentum buffers with ``empty_like``, and they stay unset (NaN, with
    deterministic algorithms filling uninitialised memory): the next step would write that into the weights. The
    real GradScaler (CPU) drives both optimizers; the fused one must end where unfused SGD does."""

    def train_two_steps(fused: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        optimizer, _ = recipe.build_optimizer(model, hp(opt="sgd", lr_base=0.4, momentum=0.9), 1, fused=fused)
        scaler = torch.amp.GradScaler("cpu")
        for scale_input in (1e38, 1.0):  # an overflowed step, then a normal one
            optimizer.zero_grad()
            scaler.scale(model(torch.full((8, 16), scale_input)).square().sum()).backward()
            scaler.step(optimizer)
            scaler.update()
        return model

    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    try:
        fused, plain = train_two_steps(True), train_two_steps(False)
    finally:
        torch.use_deterministic_algorithms(False)
        torch.utils.deterministic.fill_uninitialized_memory = fill
    assert torch.isfinite(fused.weight).all()
    torch.testing.assert_close(fused.state_dict(), plain.state_dict())


def test_a_grad_scaler_that_keeps_overflowing_counts_as_diverged():
    """Steps that overflow even unscaled keep a finite loss while the scaler halves its scale and skips them all;
    the check reads the scale (no scaler, as in bf16 and fp32: never). Driven through the real GradScaler."""
    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    assert train.loss_scale(None) == math.inf and train.loss_scale(scaler) == 2.0**16
    steps = 0
    while train.loss_scale(scaler) >= train.MIN_LOSS_SCALE:
        out = model(torch.ones(2, 4))
        loss = out.sum() + (out * 0).sqrt().sum()  # finite, but sqrt's slope at 0 makes every gradient non-finite
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        steps += 1
        assert torch.isfinite(loss) and steps < 100
    assert steps == 30  # 65536 halved 30 times is 6.1e-5


@pytest.mark.parametrize("saved_cl", [False, True])
def test_a_state_saved_in_another_memory_format_resumes_to_the_same_update(saved_cl):
    """Saved in NCHW and resumed with channels_last (or the reverse): the loaded momentum keeps the saved strides
    unless :func:`checkpoint.match_layouts` gives it the parameter's; the fused SGD step must equal a plain one."""
    fmt = torch.channels_last if saved_cl else torch.contiguous_format
    other = torch.contiguous_format if saved_cl else torch.channels_last
    x = torch.randn(2, 3, 8, 8)

    def step(model, optimizer):
        model(x.contiguous(memory_format=fmt)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    torch.manual_seed(0)
    saved = torch.nn.Conv2d(3, 4, 3).to(memory_format=fmt)
    saved_opt = torch.optim.SGD(saved.parameters(), lr=0.1, momentum=0.9, fused=True)
    step(saved, saved_opt)
    resumed = torch.nn.Conv2d(3, 4, 3)
    resumed.load_state_dict(saved.state_dict())
    resumed = resumed.to(memory_format=other)
    optimizer = torch.optim.SGD(resumed.parameters(), lr=0.1, momentum=0.9, fused=True)
    optimizer.load_state_dict(saved_opt.state_dict())
    assert optimizer.state[resumed.weight]["momentum_buffer"].stride() != resumed.weight.stride()  # what load left
    assert checkpoint.match_layouts(optimizer) == 1  # the weight's buffer (the bias is 1-D)
    assert checkpoint.match_layouts(optimizer) == 0
    step(saved, saved_opt)
    step(resumed, optimizer)
    torch.testing.assert_close(resumed.weight.contiguous(), saved.weight.contiguous())


def test_one_overflowed_fp16_step_is_skipped_not_a_divergence():
    """Under fp16 a step whose forward overflowed is one the GradScaler skips: the tally leaves its loss out of the
    mean and keeps no divergence (the scale check catches a run that keeps overflowing). Without a scaler (bf16,
    fp32) the same loss is a divergence at its step. A real GradScaler skips the step and keeps the weights."""
    losses = [torch.tensor(2.0), torch.tensor(math.inf), torch.tensor(4.0)]
    fp16, bf16 = (train.StepTally(0.0, 0, 10, torch.device("cpu"), scaled=s) for s in (True, False))
    for loss in losses:
        fp16.add(loss)
        bf16.add(loss)
    loss_sum, n_loss, first_bad = (float(v) for v in fp16.values())
    assert (loss_sum, n_loss, first_bad) == (6.0, 2.0, -1.0)  # the mean of the finite losses: 3.0
    assert float(bf16.values()[2]) == 12  # the 2nd step after step 10

    model = torch.nn.Linear(4, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, fused=True)
    scaler, before = torch.amp.GradScaler("cpu"), [p.clone() for p in model.parameters()]
    scaler.scale(model(torch.full((2, 4), math.inf)).sum()).backward()  # the forward overflows
    scaler.step(optimizer)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert train.loss_scale(scaler) == 2.0**15 > train.MIN_LOSS_SCALE  # halved once: the run goes on


def test_lr_scales_with_the_global_batch():
    assert recipe.scaled_lr(hp(lr_base=0.1, batch_size=64), 4) == pytest.approx(0.1)
    assert recipe.scaled_lr(hp(lr_base=0.1, batch_size=64, lr_scale="sqrt"), 1) == pytest.approx(0.05)


def lr_curve(**over):
    params = [torch.nn.Parameter(torch.zeros(1))]
    optimizer = torch.optim.SGD(params, lr=0.1)
    h = hp(epochs=10, **over)
    scheduler = recipe.build_scheduler(optimizer, h, steps_per_epoch=10)
    curve = []
    for step in range(100):
        scheduler.step_update(step)
        curve.append(optimizer.param_groups[0]["lr"])
    return curve


def test_schedule_axis_changes_the_lr_curve():
    step = lr_curve(sched="step", decay_epochs=5, warmup_epochs=0)
    cosine = lr_curve(sched="cosine", warmup_epochs=2, warmup_lr=1e-4)
    multistep = lr_curve(sched="multistep", decay_milestones=[3, 6], warmup_epochs=0)
    assert step[0] == pytest.approx(0.1) and step[60] == pytest.approx(0.01)
    assert cosine[0] == pytest.approx(1e-4) and max(cosine) == pytest.approx(0.1, rel=0.05)
    assert all(a >= b for a, b in zip(cosine[25:], cosine[26:]))  # monotone decay after warmup
    assert multistep[35] == pytest.approx(0.01) and multistep[65] == pytest.approx(0.001)


def study_lr_curve(cfg: dict, variant: str, steps_per_epoch: int = 4) -> list[float]:
    """The lr at every update of config.yaml's ``variant`` over its full epochs, as the trainer builds it."""
    h = study.run_recipe(cfg, "mobilenetv3_l", variant, 0)["hparams"]
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = recipe.build_scheduler(optimizer, h, steps_per_epoch=steps_per_epoch)
    curve = []
    for step in range(h["epochs"] * steps_per_epoch):
        scheduler.step_update(step)
        curve.append(optimizer.param_groups[0]["lr"])
    return curve


def test_every_schedule_variant_of_the_study_anneals_otherwise_than_the_baseline():
    """21 GPU jobs per variant: a schedule variant whose lr curve is the baseline's measures only seed noise (a
    multistep at the step schedule's 30/60/90 did), and one that never anneals measures "no annealing" under its
    name (timm's poly takes its power from decay_rate, whose 0.1 holds the lr near its peak to the last epochs)."""
    cfg = study.load(REPO / "config.yaml")
    base = study_lr_curve(cfg, "baseline")
    schedules = [v for v, spec in cfg["variants"].items() if spec["axis"] == "schedule"]
    assert {"cosine", "multistep", "poly"} <= set(schedules)
    for variant in schedules:
        curve = study_lr_curve(cfg, variant)
        differ = sum(not math.isclose(a, b, rel_tol=1e-3) for a, b in zip(curve, base, strict=True))
        assert differ > len(base) // 5, (variant, differ)
        assert max(curve[int(0.8 * len(curve)) :]) < 0.3 * max(curve), variant  # annealed by 80 % of training


def test_optimizer_variants_take_timms_recipe_settings():
    """RMSpropTF with timm's default eps (1e-10, inside the square root) makes every step sign-like, about 300 times
    the recipe's at the median gradient: the variant sets timm's recipe eps 1e-3. Adam-type and LAMB scale their lr
    with the square root of the global batch, as timm's train.py does."""
    cfg = study.load(REPO / "config.yaml")
    model = torch.nn.Linear(4, 2)

    def built(variant):
        return recipe.build_optimizer(model, study.run_recipe(cfg, "mobilenetv3_l", variant, 0)["hparams"], 1)

    rms, _ = built("rmsprop")
    assert isinstance(rms, RMSpropTF) and rms.defaults["eps"] == 1e-3
    assert "opt_eps" not in study.run_recipe(cfg, "mobilenetv3_l", "baseline", 0)["hparams"]  # timm's default
    for variant in ("adamw", "lamb"):
        _, lr = built(variant)
        spec = cfg["variants"][variant]
        assert lr == pytest.approx(spec["lr_base"] * math.sqrt(128 / 256)), variant


def test_kaiming_counts_a_grouped_convs_fan_out_per_group():
    """As timm's own Kaiming init does: torch's kaiming_normal_ counts every output channel of a depthwise conv,
    drawing its weights sqrt(channels) times too small."""
    from lcnn.models import reinitialize

    torch.manual_seed(0)
    depthwise, dense = torch.nn.Conv2d(256, 256, 3, groups=256), torch.nn.Conv2d(64, 256, 3)
    reinitialize(torch.nn.Sequential(depthwise, dense), "kaiming")
    assert float(depthwise.weight.std()) == pytest.approx(math.sqrt(2 / 9), rel=0.1)  # fan-out 1 x 3 x 3
    assert float(dense.weight.std()) == pytest.approx(math.sqrt(2 / (256 * 9)), rel=0.1)


def test_augmentation_axis_changes_the_transform():
    def ops(**over):
        return [type(t) for t in recipe.transforms(hp(**over), 32, "mobilevitv2_050")[0].transforms]

    assert RandAugment in ops(auto_augment="rand-m9-mstd0.5")
    assert AutoAugment in ops(auto_augment="original")
    assert RandomErasing in ops(re_prob=0.25)
    assert RandAugment not in ops() and RandomErasing not in ops()
    assert isinstance(recipe.build_loss(hp(mixup=0.8, cutmix=1.0))[0], SoftTargetCrossEntropy)
    assert isinstance(recipe.build_loss(hp(smoothing=0.1))[0], LabelSmoothingCrossEntropy)


@pytest.mark.parametrize("prefetcher", [False, True])
def test_augmentation_fills_with_the_models_own_mean_with_or_without_the_prefetcher(prefetcher):
    """MobileViT v2 normalises with mean 0: RandAugment's shifted-in pixels are black for it, not ImageNet's grey
    (the prefetcher once dropped the mean, and with it the fill)."""
    train_tf = recipe.transforms(hp(auto_augment="rand-m9-mstd0.5"), 32, "mobilevitv2_050", prefetcher)[0]
    (ra,) = [t for t in train_tf.transforms if isinstance(t, RandAugment)]
    assert {op.hparams["img_mean"] for op in ra.ops} == {(0, 0, 0)}


@pytest.mark.parametrize("variant", ["randaugment", "autoaugment", "random_erasing"])
def test_configured_augmentations_apply_to_real_images(variant):
    """Every shipped augmentation policy survives many draws (a bad policy can fail on rare magnitudes)."""
    from PIL import Image

    train_tf = recipe.transforms(study.hparams(tiny_config(), variant), 32, "mobilevitv2_050")[0]
    image = Image.fromarray(torch.randint(0, 255, (32, 32, 3), dtype=torch.uint8).numpy())
    torch.manual_seed(0)
    for _ in range(300):
        assert train_tf(image).shape == (3, 32, 32)


def test_prefetcher_batches_are_uint8_and_normalised_on_the_device_like_the_float_path():
    """timm's prefetcher form: uint8 from the worker, then the same normalised input the float path makes."""
    from PIL import Image

    h = hp(re_prob=1.0)
    float_train, float_eval = recipe.transforms(h, 32, "mobilevitv2_050")
    uint8_train, uint8_eval = recipe.transforms(h, 32, "mobilevitv2_050", prefetcher=True)
    assert RandomErasing not in [type(t) for t in uint8_train.transforms]  # erasing moved to the device
    images = [Image.fromarray(torch.randint(0, 255, (40, 44, 3), dtype=torch.uint8).numpy()) for _ in range(4)]
    batch = torch.stack([torch.as_tensor(uint8_eval(im)) for im in images])
    assert batch.dtype == torch.uint8 and batch.shape == (4, 3, 32, 32)
    on_device = recipe.DeviceBatch("mobilevitv2_050", h["re_prob"], "cpu")
    expected = torch.stack([float_eval(im) for im in images])
    torch.testing.assert_close(on_device(batch.clone()), expected, rtol=0, atol=1e-5)
    erased = on_device(batch.clone(), train=True)  # re_prob 1: every image gets a block of per-pixel noise
    changed = (erased != expected).flatten(1).float().mean(1)
    assert ((changed > 0.01) & (changed < 0.5)).all()
    with pytest.raises(LcnnError, match="expects uint8 batches"):
        on_device(expected)
    passthrough = recipe.DeviceBatch("mobilevitv2_050", 1.0, "cpu", prefetcher=False)
    assert passthrough(expected, train=True) is expected  # without the prefetcher the worker already normalised


def run_cfg(data_root, out_dir, model="mobilevitv2_xs", variant="baseline", **train_over):
    cfg = tiny_config(data_root)
    rc = study.run_config(cfg, model, variant, 0)
    rc["hparams"].update(batch_size=8, epochs=2)
    rc["train"].update({"log_every": 1, **train_over})
    rc["out_dir"] = str(out_dir)
    return rc


def train_subprocess(rc):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "lcnn.train", "--run-json", json.dumps(rc), "--out-dir", rc["out_dir"]]
    return subprocess.Popen(
        args, cwd=REPO, env=env, stderr=subprocess.STDOUT, stdout=subprocess.PIPE, text=True, start_new_session=True
    )


def test_precise_bn_changes_only_the_statistics_validation_uses(built_data, tmp_path):
    """The same run with and without precise BN: bit-identical weights (training normalises by the batch, and the
    extra forward passes leave the process RNG as they found it, though drop-path draws from it in them), other
    BatchNorm running statistics."""
    plain = run_cfg(built_data, tmp_path / "plain", log_with=[], max_steps_per_epoch=3)
    precise = run_cfg(built_data, tmp_path / "precise", log_with=[], max_steps_per_epoch=3, precise_bn_batches=2)
    for rc in (plain, precise):
        rc["hparams"]["drop_path"] = 0.2
        assert train.run(rc)["status"] == "ok"
    a, b = (load_file(f"{rc['out_dir']}/model.safetensors") for rc in (plain, precise))
    model = create(plain["timm_name"], 10)
    params = {name for name, _ in model.named_parameters()}
    stats = {name for name, _ in model.named_buffers() if name.endswith(("running_mean", "running_var"))}
    assert params and stats and a.keys() == b.keys() and params | stats <= set(a)
    assert all(torch.equal(a[name], b[name]) for name in params)
    assert not any(torch.equal(a[name], b[name]) for name in stats if "running_var" in name)


def test_precise_bn_replaces_statistics_that_lag_the_weights(built_data, tmp_path):
    """Running statistics as they stand early in a run (mean 0, variance 1: far from a small-init network's) make
    every validation image look alike; re-estimated on training batches, they are the weights' own again."""
    rc = run_cfg(built_data, tmp_path, log_with=[], precise_bn_batches=4)
    job = train.setup(rc)
    model = job.accelerator.unwrap_model(job.model)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
    images = job.on_device(next(iter(job.val_loader))[0])
    model.eval()
    with torch.no_grad():
        stale = model(images).std(dim=0).mean()
        train.precise_bn(job)
        fresh = model(images).std(dim=0).mean()
    job.accelerator.end_training()
    assert all(not torch.equal(m.running_var, torch.ones_like(m.running_var)) for m in norms)
    assert model.training is False and all(m.momentum == 0.1 for m in norms)  # update_bn restores both
    assert fresh > 10 * stale, (fresh, stale)  # the logits vary with the image again (measured: 0.2 against 7e-13)


def test_seeds_shuffle_and_draw_from_streams_no_other_seed_or_rank_uses(built_data, tmp_path):
    """Seed 1 must not replay seed 0's shuffles one epoch later (Accelerate seeds epoch e with data_seed + e), nor
    one seed's rank draw another's masks: the seeds' spread is the noise every gain is judged against."""
    orders = {}
    for seed in (0, 1):
        rc = run_cfg(built_data, tmp_path / f"seed{seed}", log_with=[])
        rc["seed"] = seed
        job = train.setup(rc)
        sampler = job.train_loader.get_sampler()
        for epoch in range(3):
            sampler.set_epoch(epoch)
            orders[seed, epoch] = list(sampler)
        job.accelerator.end_training()
        owner.release(rc["out_dir"])
    assert len({tuple(order) for order in orders.values()}) == len(orders), "two (seed, epoch) share a shuffle"
    assert sorted(orders[0, 0]) == sorted(orders[1, 0])  # a shuffle of the same images
    streams = {train.rank_seed(seed, rank) for seed in range(10) for rank in range(8)}
    assert len(streams) == 80 and train.rank_seed(0, 0) == 0


@pytest.mark.slow
def test_preempted_run_resumes_to_identical_weights(built_data, tmp_path):
    """SIGUSR1 mid-epoch saves the full state and exits 75; the rerun ends exactly like an uninterrupted run.

    The variant erases on the device (``train.prefetcher``), from the process RNG the saved state restores, and the
    interrupted run loads through a worker (the uninterrupted one in-process): augmentation does not depend on it.
    """
    whole = run_cfg(built_data, tmp_path / "whole", variant="random_erasing")
    assert train_subprocess(whole).wait(timeout=600) == 0

    # a loader worker that must keep loading after the signal (the next check is 7 steps on, 1 batch prefetched),
    # signalled twice, as SLURM and torchrun both signal a multi-GPU job's workers
    cut = run_cfg(built_data, tmp_path / "cut", variant="random_erasing", num_workers=1, prefetch_factor=1, log_every=8)
    proc = train_subprocess(cut)
    for line in proc.stdout:
        if "epoch 1 step 8/" in line:
            os.killpg(proc.pid, signal.SIGUSR1)
            time.sleep(0.05)  # a second signal, not one coalesced with the first
            os.killpg(proc.pid, signal.SIGUSR1)
            break
    proc.stdout.read()
    assert proc.wait(timeout=600) == train.EXIT_PREEMPTED
    assert checkpoint.find(tmp_path / "cut") == tmp_path / "cut" / "train_state"
    assert not (tmp_path / "cut" / "metrics.json").exists()

    changed = {**cut, "hparams": {**cut["hparams"], "lr_base": cut["hparams"]["lr_base"] * 2}}
    with pytest.raises(LcnnError, match="trained with other settings .*lr_base.*delete .*train_state"):
        train.run(changed)  # an edited variant never resumes from the old recipe's state
    # nor a state trained on other data: here the same manifests, their images prepared at another size
    other = shutil.copytree(built_data, tmp_path / "other_data", symlinks=True)
    report = json.loads((other / "prepare_report.json").read_text())
    report["config"]["short_side"] += 8
    (other / "prepare_report.json").write_text(json.dumps(report))
    with pytest.raises(LcnnError, match="trained with other settings .*data '[0-9a-f]{16}' -> '[0-9a-f]{16}'"):
        train.run({**cut, "data_root": str(other)})
    # a state saved by an older lcnn: no steps per epoch or data fingerprint, and settings its recipe does not use
    meta_path = checkpoint.find(tmp_path / "cut") / checkpoint.META_FILE
    meta = json.loads(meta_path.read_text())
    for key in train.NEWER_IDENTITY_KEYS:
        del meta["run"][key]
    meta["run"]["hparams"]["decay_milestones"] = [1, 2]  # read by multistep schedules only; this one is cosine
    assert meta["run"]["hparams"]["sched"] == "cosine"
    meta_path.write_text(json.dumps(meta))
    resumed = train_subprocess(cut)
    log = resumed.stdout.read()
    assert resumed.wait(timeout=600) == 0, log
    assert "resuming at epoch 1 step" in log
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "cut"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert (ma["top1"], ma["top5"]) == (mb["top1"], mb["top5"])
    assert 0 < ma["peak_mem_mb"] < 2048  # a job of its own (not this test process): streams from disk, stays small
    # the interrupted epoch's history row covers the whole epoch, not just the steps after the resume
    ha, hb = (pd.read_csv(tmp_path / d / "history.csv") for d in ("whole", "cut"))
    same = ["epoch", "train_loss", "val_loss", "top1", "top5", "lr"]
    pd.testing.assert_frame_equal(ha[same], hb[same])
    assert checkpoint.find(tmp_path / "cut") is None  # cleaned up after success


def test_a_second_trainer_on_a_run_folder_that_is_being_trained_stops_at_once_naming_the_first(built_data, tmp_path):
    """A Snakemake restarted while its jobs still run submits them again: the twin must stop before it touches the
    run folder (two trainers delete each other's saved state), and name the job to wait for or cancel."""
    rc = run_cfg(built_data, tmp_path / "run", log_every=1)
    rc["hparams"]["epochs"] = 50  # still training while the twin starts
    first = train_subprocess(rc)
    for line in first.stdout:
        if "step 1/" in line:  # training: the folder is claimed
            break
    twin = subprocess.run(
        [sys.executable, "-m", "lcnn.train", "--run-json", json.dumps(rc), "--out-dir", rc["out_dir"]],
        cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert twin.returncode != 0, twin.stdout[-2000:]
    last = twin.stderr.strip().splitlines()[-1]
    assert f"is being trained by pid {first.pid}" in last and "still running" in last, twin.stderr[-2000:]
    os.killpg(first.pid, signal.SIGTERM)  # the first trains on unharmed: it saves its state and exits as usual
    rest = first.stdout.read()
    assert first.wait(timeout=300) == train.EXIT_PREEMPTED, rest
    owner.claim(rc["out_dir"])  # its owner has ended: the retry takes the folder over
    assert json.loads((tmp_path / "run" / owner.OWNER).read_text())["pid"] == os.getpid()


def test_the_owner_record_is_released_only_by_its_own_process_and_a_same_job_twin_is_refused(tmp_path, monkeypatch):
    """A refused twin must not delete the record that refused it, though another node's trainer may have its pid;
    and trainers started inside one SLURM allocation share its job id, so there the process decides."""
    (tmp_path / owner.OWNER).write_text(json.dumps({"slurm_job_id": "999", "host": "gpu-node-7", "pid": os.getpid()}))
    owner.release(tmp_path)
    assert (tmp_path / owner.OWNER).exists()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        alive = {**owner.this_job(), "pid": sleeper.pid, "start": owner._start_time(sleeper.pid)}
        (tmp_path / owner.OWNER).write_text(json.dumps(alive))
        with pytest.raises(LcnnError, match=f"is being trained by SLURM job 77 on {alive['host']}"):
            owner.claim(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    owner.claim(tmp_path)  # that process has ended: the folder is this one's, and so is the record it releases
    owner.release(tmp_path)
    assert not (tmp_path / owner.OWNER).exists()


def test_a_stop_signal_during_validation_exits_after_the_epochs_save_not_a_check_later(
    built_data, tmp_path, monkeypatch, capfd
):
    """SLURM's SIGTERM that lands while the epoch validates: the epoch's state is saved as usual, and the job exits
    75 then, instead of training the next epoch up to its first check and saving again (time SLURM's 120 s notice
    may not leave)."""
    rc = run_cfg(built_data, tmp_path / "run", log_every=100)  # no check inside an epoch of 7 steps but its last
    validate = train.evaluate

    def signalled_evaluate(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        return validate(*args, **kwargs)

    monkeypatch.setattr(train, "evaluate", signalled_evaluate)
    before = {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS}
    try:
        with pytest.raises(SystemExit) as stopped:
            train.run(rc)
    finally:  # a stopped run ignores stop signals from then on; the children of later tests would inherit that
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert stopped.value.code == train.EXIT_PREEMPTED
    meta = checkpoint.read_meta(checkpoint.find(tmp_path / "run"))
    assert (meta["epoch"], meta["step"]) == (1, 0)  # epoch 1 done, not one step of epoch 2
    assert "got SIGUSR1: saved state at epoch 2 step 0" in capfd.readouterr().out
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_a_tracker_that_fails_to_close_costs_a_warning_not_the_run(built_data, tmp_path, monkeypatch, capfd):
    """The outputs are written when the trackers close: a failure then must not fail the job (Snakemake would delete
    them, and the freed training state would make the retry start over)."""
    rc = run_cfg(built_data, tmp_path, log_with=[], max_steps_per_epoch=2)
    rc["hparams"]["epochs"] = 1

    def unreachable(self):
        raise ConnectionError("MLflow server unreachable")

    monkeypatch.setattr(Accelerator, "end_training", unreachable)
    assert train.run(rc)["status"] == "ok"
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "ok"
    assert "closing the trackers failed after the outputs were written: MLflow server" in capfd.readouterr().err


def _stalled_read(self, index):
    time.sleep(8)  # a hung read on shared storage: the worker lives, but no batch comes
    raise AssertionError("the loader should have given up before this")


@pytest.mark.slow
def test_a_stalled_loader_worker_fails_the_job_instead_of_holding_it(built_data, tmp_path, monkeypatch):
    """Without a loader timeout the step loop waits forever for a stalled worker's batch, never reaching a check:
    the job holds its GPUs until SLURM's time limit, and even the limit's SIGTERM saves nothing."""
    rc = run_cfg(built_data, tmp_path, num_workers=1, loader_timeout_s=1)
    monkeypatch.setattr(dataset.ManifestDataset, "__getitem__", _stalled_read)  # forked workers inherit it
    loaders = recipe.build_loaders(rc, 32, 1)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="DataLoader timed out after 1"):
        next(iter(loaders.train))
    assert time.monotonic() - start < 6


@pytest.mark.slow
def test_a_crash_with_live_loader_workers_exits_with_its_error_instead_of_hanging(built_data, tmp_path):
    """Loader workers ignore SIGTERM (they must outlive a preemption's), and at exit multiprocessing sends its
    workers SIGTERM and joins them without a timeout. A trainer that crashed while its persistent workers lived (an
    out-of-memory step, a CUDA error; here a corrupt training image) printed its traceback, then hung until SLURM's
    time limit. It must exit 1 at once, its own error the log's last line."""
    data = tmp_path / "data"
    shutil.copytree(built_data, data)
    victim = sorted((data / "train").rglob("*.png"))[0]
    victim.write_bytes(b"not an image")
    proc = train_subprocess(run_cfg(data, tmp_path / "run", num_workers=2, log_with=[]))
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the trainer hung after its crash:\n{log[-2000:]}")
    assert proc.returncode == 1, log[-2000:]
    assert log.rstrip().splitlines()[-1].startswith("PIL.UnidentifiedImageError"), log[-2000:]
    assert victim.name in log


@pytest.mark.slow
def test_run_writes_every_output_with_fixed_keys(built_data, tmp_path):
    before = {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS}
    metrics = train.run(run_cfg(built_data, tmp_path, model="mobilenetv3_l"))
    # the stop handlers are the run's alone: workers this process forks later must still die by SIGTERM
    assert {sig: signal.getsignal(sig) for sig in train.STOP_SIGNALS} == before
    names = {p.name for p in tmp_path.iterdir()}
    assert {"model.safetensors", "history.csv", "config.json", "env.json", "metrics.json"} <= names
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == 2
    assert metrics["train_images"] == 120 and metrics["val_images"] == 60
    history = (tmp_path / "history.csv").read_text().splitlines()
    assert history[0] == ",".join(train.HISTORY_COLUMNS) and len(history) == 3
    env = json.loads((tmp_path / "env.json").read_text())
    assert env["packages"]["timm"] and "slurm_job_id" in env


@pytest.mark.slow
def test_divergent_variant_stops_early_and_says_so(built_data, tmp_path):
    rc = run_cfg(built_data, tmp_path)
    rc["hparams"].update(lr_base=1e12, warmup_epochs=0, sched="none")
    metrics = train.run(rc)
    assert metrics["status"] == "diverged"
    assert metrics["diverged_at"]["epoch"] == 1 and metrics["diverged_at"]["step"] >= 1
    assert metrics["diverged_at"]["reason"].startswith("loss is not finite at epoch 1 step")
    assert metrics["top1"] is None  # never reported as a zero-accuracy run


@pytest.mark.slow
@pytest.mark.parametrize("precise_bn_batches", [0, 2])
def test_batchnorm_statistics_an_overflow_left_non_finite_end_the_run_unless_precise_bn_renews_them(
    built_data, tmp_path, monkeypatch, precise_bn_batches
):
    """What an fp16 forward that overflows into a BatchNorm leaves: the GradScaler skips the step, the layer's
    running statistics keep the inf/NaN, and training (normalised by the batch) goes on. Here a real forward of an
    inf batch in train mode after the first epoch's steps. Without precise BN the validation loss is non-finite:
    the run is diverged at that epoch with its reason, never "ok" at chance. Precise BN renews the statistics
    before validating: the run is ok."""
    real = train.train_epoch

    def overflow_once(job, stop):
        diverged = real(job, stop)
        if job.progress.epoch == 0:
            with torch.no_grad():
                job.accelerator.unwrap_model(job.model)(torch.full((2, 3, job.img_size, job.img_size), math.inf))
        return diverged

    monkeypatch.setattr(train, "train_epoch", overflow_once)
    rc = run_cfg(built_data, tmp_path, log_with=[], max_steps_per_epoch=2, precise_bn_batches=precise_bn_batches)
    metrics = train.run(rc)
    history = (tmp_path / "history.csv").read_text().splitlines()
    if precise_bn_batches:
        assert metrics["status"] == "ok" and len(history) == 3
        return
    assert metrics["status"] == "diverged" and metrics["top1"] is None and len(history) == 2
    assert metrics["diverged_at"]["epoch"] == 1
    assert "validation loss is not finite after epoch 1" in metrics["diverged_at"]["reason"]
    assert "train.precise_bn_batches" in metrics["diverged_at"]["reason"]


@pytest.mark.slow
def test_a_run_under_a_marked_rule_trains_and_its_saved_config_matches_its_recipe(built_data, tmp_path):
    """The marks of rules that changed (lcnn.config.rule_marks) travel in the hparams: the trainer takes them, and
    the saved config matches the recipe the workflow compares it with (collect_seeds, int8_bench)."""
    rc = run_cfg(built_data, tmp_path, variant="kaiming", log_with=[], max_steps_per_epoch=2)
    rc["hparams"]["epochs"] = 1
    assert train.run(rc)["epochs_completed"] == 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hparams"]["kaiming_fan_out"] == "per_group"
    recipe = study.run_recipe(tiny_config(built_data), "mobilevitv2_xs", "kaiming", 0)
    edited = {"hparams.batch_size", "hparams.epochs", "train.max_steps_per_epoch"}  # what run_cfg and this test set
    assert set(study.recipe_changes(saved, recipe)) <= edited


def test_a_slow_loader_shows_as_loader_wait_in_the_log_history_and_metrics(built_data, tmp_path, monkeypatch, capfd):
    """Time the step spends waiting for its batch is time a GPU idles: every epoch measures it, and past the first
    a loader-bound epoch says so on its line. Here each image takes 20 ms more to load."""
    load = dataset.ManifestDataset.__getitem__

    def slow(self, index):
        time.sleep(0.02)
        return load(self, index)

    monkeypatch.setattr(dataset.ManifestDataset, "__getitem__", slow)
    metrics = train.run(run_cfg(built_data, tmp_path, model="mobilenetv3_l", num_workers=0))
    history = pd.read_csv(tmp_path / "history.csv")
    slept = metrics["train_images"] * 0.02  # every image of the epoch, loaded in this process while the step waited
    assert (history["data_wait_s"] >= slept).all() and (history["data_wait_s"] < 0.8 * history["seconds"]).all()
    # history.csv keeps 6 significant digits
    assert metrics["data_wait_fraction"] == pytest.approx(history["data_wait_s"][1] / history["seconds"][1], rel=1e-4)
    epoch_lines = [line for line in capfd.readouterr().out.splitlines() if "loader wait" in line]
    assert len(epoch_lines) == 2 and "loader-bound" not in epoch_lines[0]  # the first epoch also starts workers
    assert "loader-bound: raise train.num_workers" in epoch_lines[1]


def test_user_errors_stop_early_with_one_line(built_data, tmp_path):
    with pytest.raises(LcnnError, match="fp16 but there is no GPU, and the CPU has no fast fp16 kernels; use bf16"):
        train.run(run_cfg(built_data, tmp_path, precision="fp16"))
    rc = run_cfg(built_data, tmp_path)
    rc["hparams"]["batch_size"] = 1000
    with pytest.raises(LcnnError, match="exceeds the 120 training images"):
        train.run(rc)


def test_a_compiled_model_that_reaches_the_recompile_limit_fails_instead_of_running_eagerly():
    """Past torch's recompile limit a frame silently runs eagerly (one warning line): a compiled job fails instead.
    Graphs of earlier compiles in the process are dropped first, so they do not count against it."""
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=False):  # restored after
        model = train.compile_model(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)))
        model(torch.randn(3, 4))  # the training graph
        model.eval()  # another graph: past a limit of 1
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            model(torch.randn(3, 4))
    torch._dynamo.reset()


def test_train_compile_without_a_compiler_stops_in_one_line_before_anything_is_written(
    built_data, tmp_path, monkeypatch
):
    from torch._inductor import config as inductor_config

    message = "train.compile is true but torch.compile on the CPU needs a C.. compiler"
    with inductor_config.patch({"cpp.cxx": ("no-such-c++",)}), pytest.raises(LcnnError, match=message):
        train.run(run_cfg(built_data, tmp_path / "run", compile=True))
    monkeypatch.delattr(torch.compiler, "set_stance")  # torch before 2.6: precise BN could not run eagerly
    with pytest.raises(LcnnError, match="train.compile is true but it needs torch 2.6 or newer"):
        train.run(run_cfg(built_data, tmp_path / "run", compile=True))
    assert not (tmp_path / "run").exists()


def test_accelerate_variables_in_the_jobs_environment_change_nothing(built_data, tmp_path, monkeypatch, capsys):
    """sbatch exports the login shell's environment: an ACCELERATE_* variable there must not reach a job. Accelerate
    divides every loss by ACCELERATE_GRADIENT_ACCUMULATION_STEPS, which the loop (stepping every batch) would turn
    into a learning rate divided by it; ACCELERATE_USE_CPU would move a GPU job to the CPU."""
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    monkeypatch.setenv("ACCELERATE_LOG_LEVEL", "warning")  # logging only: kept
    accelerator, device = train.make_accelerator(run_cfg(built_data, tmp_path, precision="no"))
    assert (device, accelerator.mixed_precision, accelerator.gradient_accumulation_steps) == ("cpu", "no", 1)
    layer = torch.nn.Linear(3, 1)
    accelerator.backward(layer(torch.ones(1, 3)).sum())
    assert torch.equal(layer.weight.grad, torch.ones(1, 3))  # the loss's own gradient, not a quarter of it
    ignored = "ignoring ACCELERATE_GRADIENT_ACCUMULATION_STEPS, ACCELERATE_MIXED_PRECISION"
    assert ignored in capsys.readouterr().out and os.environ["ACCELERATE_LOG_LEVEL"] == "warning"


def host_reads(rc) -> list[int]:
    """Train ``rc`` and return the step of every host read (``item``, ``cpu``, ``bool``, ``float``, ...) the
    training step made, with the GPU check's own probe (reads inside the data loader are not counted)."""
    with gpu_check.step_syncs(cuda=False) as reads:
        metrics = train.run(rc)
    assert metrics["status"] == "ok" and metrics["epochs_completed"] == 2
    return reads


@pytest.mark.parametrize("opt", ["sgd", "adamw"])
def test_step_loop_reads_the_device_only_at_its_checks(built_data, tmp_path, opt):
    """No host read between two checks, which come every log_every steps: on a GPU each such read waits for the
    queued work. Every read the training step makes (forward, loss, backward, clipping, optimizer, Mixup/CutMix,
    bookkeeping) is counted with the step it happened at."""
    rc = run_cfg(built_data, tmp_path, variant="mixup_cutmix", log_every=5, grad_clip=1.0, log_with=[])
    rc["hparams"].update(opt=opt, momentum=0.9, re_prob=0.5)  # random erasing runs on the device too
    reads = host_reads(rc)
    assert reads, "no read counted: the probe is not looking where the loop runs"
    assert set(reads) == {5, 10, 15}  # 15 steps an epoch: the checks, and nowhere else


def test_unfused_adamw_reads_its_step_count_every_step(built_data, tmp_path):
    """The probe above tells the two apart: torch's per-tensor AdamW reads each parameter's step count on the host
    every step (the fused kernel keeps it on the device), which is why ``train.fused_optimizer`` is on."""
    rc = run_cfg(built_data, tmp_path, log_every=5, log_with=[], fused_optimizer=False)
    rc["hparams"].update(opt="adamw")
    assert set(range(1, 15)) <= set(host_reads(rc))  # every step, not only the checks


@pytest.mark.slow
def test_trackers_and_timm_outputs_read_back_with_their_own_readers(built_data, tmp_path, monkeypatch):
    """TensorBoard and MLflow logs of one run, read by TensorBoard's event reader and MLflow's client; timm's
    summary.csv and args.yaml beside the run's own outputs."""
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.chdir(tmp_path)  # trackers write under the working directory, as in a workflow job
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rc = run_cfg(built_data, tmp_path / "run", log_with=["tensorboard", "mlflow"], log_every=5)
    metrics = train.run(rc)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert len(history) == 2

    events = list((tmp_path / "logs/tb/mobilevitv2_xs/baseline/seed0").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    scalars = {}
    for path in events:
        acc = EventAccumulator(str(path))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend(acc.Scalars(tag))
    assert [e.step for e in scalars["train/loss"]] == [5, 10, 15, 20, 25, 30]  # every log_every steps
    tb_top1 = [e.value for e in scalars["eval/top1"]]
    assert tb_top1 == pytest.approx(list(history["top1"]), abs=1e-3)  # float32 against 6 digits
    (hparams_file,) = (tmp_path / "logs/tb").rglob("hparams.yml")  # HParams view: the recipe as hyperparameters
    assert yaml.safe_load(hparams_file.read_text())["opt"] == rc["hparams"]["opt"]

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "lcnn"]
    (mlrun,) = client.search_runs([experiment.experiment_id])
    assert mlrun.info.run_name == "mobilevitv2_xs/baseline/seed0"
    assert mlrun.data.params["variant"] == "baseline" and mlrun.data.params["opt"] == rc["hparams"]["opt"]
    top1 = client.get_metric_history(mlrun.info.run_id, "eval/top1")
    assert [m.value for m in sorted(top1, key=lambda m: m.step)] == pytest.approx(list(history["top1"]), abs=1e-3)
    assert mlrun.data.metrics["eval/top1"] == pytest.approx(metrics["top1"])

    summary = pd.read_csv(tmp_path / "run" / "summary.csv")  # timm train.py's columns
    assert list(summary.columns) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
    assert list(summary["eval_top1"]) == pytest.approx(list(history["top1"]), abs=1e-3)
    args = yaml.safe_load((tmp_path / "run" / "args.yaml").read_text())
    assert args["hparams"] == rc["hparams"] and args["seed"] == 0


def test_a_tracker_that_is_not_installed_is_one_line_before_training(built_data, tmp_path):
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    with pytest.raises(LcnnError, match=r"train.log_with includes wandb but wandb is not installed; pip install"):
        train.run(run_cfg(built_data, tmp_path, log_with=["wandb"]))
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_state_normalised_or_cropped_otherwise_is_refused_and_an_older_one_is_checked_by_the_old_rule(
    built_data, tmp_path
):
    """A resume must not switch a run's input normalisation or eval crop mid-run. States saved before every run took
    its configured tag's (only init: pretrained runs did) are checked against what the old rule gave them:
    ConvNeXt-T's baseline then cropped at 0.95 (timm's default tag), now at 0.875 (fb_in1k)."""
    cfg = tiny_config(built_data)
    cfg["models"]["convnext_t"] = {"timm": "convnext_tiny", "pretrained_tag": "fb_in1k"}
    job = SimpleNamespace(num_classes=10, img_size=224, accelerator=SimpleNamespace(num_processes=1), steps=5,
                          data="subset", out=tmp_path)  # fmt: skip
    for variant, old_rule_fits in (("baseline", False), ("pretrained", True)):
        job.cfg = study.run_config(cfg, "convnext_t", variant, 0)
        saved = train.identity(job)
        train._check_state_fits({"run": saved}, job, tmp_path)
        older = {k: v for k, v in saved.items() if k != "normalization"}
        if old_rule_fits:
            train._check_state_fits({"run": older}, job, tmp_path)
        else:
            with pytest.raises(LcnnError, match=r"other settings \(normalization .*0\.95.* -> .*0\.875"):
                train._check_state_fits({"run": older}, job, tmp_path)

"""Does lcnn's training loop cost anything? Compare its images/s with a bare PyTorch loop.

Both loops train the same timm model on the same prepared data, with the same batch size, transforms,
thread count and number of steps; the bare loop has no Accelerate, no seeded augmentation, no scheduler,
no checkpointing and no logging. Usage (after the demo's data step)::

    python -m lcnn.tools.loop_overhead --data-root data/builtin --model mobilenetv3_large_100 --steps 25
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
import yaml

from lcnn import config as study
from lcnn import recipe, train
from lcnn.data import ManifestDataset
from lcnn.models import create


def bare_loop(cfg: dict, steps: int) -> float:
    """images/s of the plainest correct loop: load, forward, loss, backward, step."""
    hp = cfg["hparams"]
    train_tf, _ = recipe.transforms(hp, hp["img_size"], cfg["timm_name"])
    data = ManifestDataset(f"{cfg['data_root']}/train.csv", transform=train_tf)
    loader = torch.utils.data.DataLoader(data, batch_size=hp["batch_size"], shuffle=True, drop_last=True)
    model = create(cfg["timm_name"], data.num_classes)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, time.perf_counter()
    for step, (images, targets) in enumerate(loader):
        if step == steps:
            break
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen += images.shape[0]
    return seen / (time.perf_counter() - start)


def run(cfg: dict) -> dict:
    base = yaml.safe_load(open(cfg["config"]))
    for overlay in cfg.get("overlays", []):
        for key, value in yaml.safe_load(open(overlay)).items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    base["data"]["root"] = cfg["data_root"]
    conf = study.validate(base)
    name = next(m for m, spec in conf["models"].items() if spec["timm"] == cfg["model"])
    rc = study.run_config(conf, name, "baseline", 0)
    rc["hparams"].update(epochs=1, img_size=cfg["img_size"], batch_size=cfg["batch_size"])
    rc["train"].update(max_steps_per_epoch=cfg["steps"], log_every=10**9, num_workers=0, device="cpu")
    torch.set_num_threads(cfg["threads"])
    bare, lcnn_ips = 0.0, 0.0
    for _ in range(cfg["repeats"]):  # interleaved, best of each: fair on a machine with other load
        bare = max(bare, bare_loop(rc, cfg["steps"]))
        with tempfile.TemporaryDirectory() as out:
            rc["out_dir"] = out
            train.run(rc)
            history = open(f"{out}/history.csv").read().splitlines()
        lcnn_ips = max(lcnn_ips, float(history[1].split(",")[train.HISTORY_COLUMNS.index("images_per_s")]))
    return {
        "model": cfg["model"],
        "batch_size": cfg["batch_size"],
        "steps": cfg["steps"],
        "threads": cfg["threads"],
        "repeats": cfg["repeats"],
        "bare_images_per_s": bare,
        "lcnn_images_per_s": lcnn_ips,
        "lcnn_vs_bare": lcnn_ips / bare,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="config.yaml")
    parser.add_argument("--overlays", nargs="*", default=["profiles/demo/study.yaml"])
    parser.add_argument("--data-root", default="data/builtin", help="prepared data (run the demo's data step first)")
    parser.add_argument("--model", default="mobilenetv3_large_100", help="a timm name from config.yaml's models")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    print(json.dumps(run(vars(parser.parse_args(argv))), indent=2))


if __name__ == "__main__":
    main()

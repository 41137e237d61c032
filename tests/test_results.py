"""lcnn.results: one model x variant over its seeds, with a diverged seed kept in the runs but out of the means."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from lcnn import results
from lcnn.utils import LcnnError


def seed_metrics(seed: int, top1: float | None, top5: float | None = None) -> dict:
    """A metrics.json with the keys lcnn.train writes that the result is built from."""
    ok = top1 is not None
    return {
        "model": "mobilenetv3_l", "variant": "cosine", "axis": "schedule", "timm_name": "mobilenetv3_large_100",
        "seed": seed, "status": "ok" if ok else "diverged", "top1": top1, "top5": top5, "device_hours": 0.5,
        "epochs_completed": 10 if ok else 4,
    }  # fmt: skip


def write_seeds(tmp_path: Path, *rows: dict) -> list[Path]:
    paths = []
    for m in rows:
        path = tmp_path / f"seed{m['seed']}" / "metrics.json"
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(m))
        paths.append(path)
    return paths


def test_three_seeds_one_diverged(tmp_path: Path) -> None:
    rows = [seed_metrics(2, 71.0, 90.0), seed_metrics(0, 70.0, 89.0), seed_metrics(1, None)]  # seed 1 diverged
    out = tmp_path / "result.json"
    res = results.run({"metrics": write_seeds(tmp_path, *rows), "out": out})
    assert json.loads(out.read_text()) == res
    assert len(res["runs"]) == 3 and res["seeds"] == [0, 1, 2]  # every seed kept, in seed order
    assert [r["status"] for r in res["runs"]] == ["ok", "diverged", "ok"]
    assert res["status"] == "partly_diverged" and res["n_seeds"] == 2 and res["n_diverged"] == 1
    assert res["top1_mean"] == pytest.approx(70.5) and res["top5_mean"] == pytest.approx(89.5)  # not (70+71+0)/3
    assert res["top1_std"] == pytest.approx(statistics.stdev([70.0, 71.0])) == pytest.approx(0.5**0.5)
    assert res["device_hours"] == pytest.approx(1.5) and res["epochs_completed"] == 24  # the diverged run cost too


def test_all_ok_all_diverged_and_one_seed() -> None:
    ok = results.combine_seeds([seed_metrics(0, 60.0, 80.0), seed_metrics(1, 62.0, 82.0)])
    assert ok["status"] == "ok" and ok["top1_mean"] == pytest.approx(61.0)
    dead = results.combine_seeds([seed_metrics(0, None), seed_metrics(1, None)])
    assert dead["status"] == "diverged" and dead["top1_mean"] is None and dead["top1_std"] is None
    one = results.combine_seeds([seed_metrics(0, 60.0, 80.0)])
    assert one["top1_mean"] == 60.0 and one["top1_std"] is None  # one seed: no spread to show


def test_bad_inputs_are_refused_with_the_file_named(tmp_path: Path) -> None:
    with pytest.raises(LcnnError, match="no per-seed metrics given"):
        results.combine_seeds([])
    with pytest.raises(LcnnError, match="metrics of different runs mixed together"):
        results.combine_seeds([seed_metrics(0, 60.0), seed_metrics(1, 61.0) | {"variant": "adamw"}])
    (path,) = write_seeds(tmp_path, {k: v for k, v in seed_metrics(0, 60.0).items() if k != "top5"})
    with pytest.raises(LcnnError, match=f"{path} lacks top5"):
        results.read_metrics(path)


def test_a_seed_trained_under_another_recipe_is_refused_naming_what_differs(tmp_path: Path) -> None:
    """A run that finished while Snakemake was down has no params record, so an edited recipe would not retrain
    it: its config.json shows the recipe it was trained under, and the result refuses to mix the two."""
    from lcnn import config as study

    cfg = study.load(Path(__file__).parents[1] / "config.yaml")
    recipe = {k: v for k, v in study.run_recipe(cfg, "mobilenetv3_l", "cosine", 0).items() if k != "seed"}
    paths = write_seeds(tmp_path, seed_metrics(0, 70.0, 89.0), seed_metrics(1, 71.0, 90.0))
    for seed, path in enumerate(paths):  # as lcnn.train saves it: the run config with its execution settings
        run = study.run_config(cfg, "mobilenetv3_l", "cosine", seed) | {"out_dir": str(path.parent), "img_size": 224}
        (path.parent / "config.json").write_text(json.dumps(run))
    out = tmp_path / "result.json"
    assert results.run({"metrics": paths, "out": out, "recipe": recipe})["n_seeds"] == 2
    saved = json.loads((paths[1].parent / "config.json").read_text())
    saved["hparams"]["lr_base"] *= 2
    (paths[1].parent / "config.json").write_text(json.dumps(saved))
    with pytest.raises(LcnnError, match=r"seed1 was trained under another recipe than the config's \(hparams.lr_base"):
        results.run({"metrics": paths, "out": out, "recipe": recipe})
    assert results.run({"metrics": paths, "out": out})["n_seeds"] == 2  # no recipe given (by hand): not checked

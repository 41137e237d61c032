"""Halving with a reference that diverges: only that model's benchmark and claims say why; the study goes on.

The baseline is both the reference every gain is measured against and the benchmarked variant. Here it diverges
in the first rung (its learning rate; the other candidate sets its own): every model's other variant must still
reach the full budget, and the report must be built, saying why there is no gain and no timing.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml
from conftest import OVERLAYS, copy_workflow, snakemake

pytestmark = pytest.mark.slow

OVERLAY = {
    "select": {"variants": ["adamw"]},  # adamw sets its own lr_base: it survives a diverging baseline
    "baseline": {"epochs": 2},
    "search": {"mode": "halving", "eta": 2, "rung_epochs": [1]},
}


def test_a_diverged_baseline_stops_only_its_own_models_benchmark(tmp_path):
    workdir = copy_workflow(tmp_path / "wf")
    overlay = OVERLAY | {"variants": {"adamw": {"axis": "optimizer", "opt": "adamw", "lr_base": 1.0e-3}}}
    # the baseline diverges for both models through its learning rate; adamw keeps its own
    overlay["baseline"] = {**overlay["baseline"], "lr_base": 1.0e12, "sched": "none", "warmup_epochs": 0}
    (workdir / "halving.yaml").write_text(yaml.safe_dump(overlay))
    proc = snakemake(workdir, "--cores", "2", "--configfile", *OVERLAYS, "halving.yaml")
    assert proc.returncode == 0
    for model in ("mobilenetv3_l", "mobilevitv2_xs"):
        selection = json.loads((workdir / f"search/{model}/rung1.json").read_text())
        assert "baseline" in selection["dropped_references"] and selection["next"] == ["adamw"]
        bench = json.loads((workdir / f"benchmarks/{model}.json").read_text())
        assert bench["rows"] == [] and bench["status"] == "diverged"
        assert bench["reason"].startswith(f"not benchmarked: its benchmarked run {model}/baseline/seed0 diverged")
        adamw = json.loads((workdir / f"results/halving/{model}/adamw.json").read_text())
        assert adamw["status"] == "ok" and adamw["runs"][0]["epochs_completed"] == 2  # went on to the budget
    claims = pd.read_csv(workdir / "results/report/claims.csv", keep_default_na=False)  # "n/a" stays a string
    timing = claims[claims["claim_id"].isin(["b", "c"])]
    assert len(timing) == 2  # report.fast_models of the tiny study: mobilenetv3_l
    assert timing["measured"].str.startswith("not benchmarked: its benchmarked run mobilenetv3_l/baseline").all()
    assert (timing["holds"] == "n/a").all()
    gains = claims[claims["claim_id"] == "a"]
    assert len(gains) == 2 and (gains["holds"] == "n/a").all()  # no baseline at the budget: no gain claimed

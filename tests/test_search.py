"""Successive halving: the selection rule, the rung schedule, rung resume == one continuous run, and the
halving study end to end through Snakemake checkpoints (DAG, results, report, nothing redone on a rerun)."""

from __future__ import annotations

import copy
import json
import math

import pandas as pd
import pytest
import torch
import yaml
from conftest import OVERLAYS, REPO, copy_workflow, snakemake, tiny_config
from safetensors.torch import load_file
from test_workflow import job_counts

from lcnn import checkpoint, search, stats, train
from lcnn import config as study
from lcnn.tools import search_vs_grid
from lcnn.utils import LcnnError

REAL = yaml.safe_load((REPO / "config.yaml").read_text())


def metrics(variant, seed, top1, top5=50.0, epochs=1, hours=0.001, model="m", status="ok", val_images=500):
    """A metrics.json as lcnn.train writes it, with just the keys the search reads."""
    ok = status == "ok"
    return {
        "model": model, "variant": variant, "seed": seed, "status": status, "top1": top1 if ok else None,
        "top5": top5 if ok else None, "epochs_completed": epochs, "train_seconds": hours * 3600,
        "device_hours": hours, "device_type": "cpu", "val_images": val_images,
    }  # fmt: skip


def scores(**top1):
    return {v: search.score([metrics(v, 0, t)]) for v, t in top1.items()}


# ------------------------------------------------------------------------------------------------ selection
@pytest.mark.parametrize(("n", "eta", "keep"), [(9, 3, 3), (10, 3, 4), (4, 3, 2), (3, 3, 1), (5, 2, 3), (2, 4, 1)])
def test_keeps_the_best_ceil_n_over_eta(n, eta, keep):
    names = [f"v{i}" for i in range(n)]
    sc = scores(**{v: float(i) for i, v in enumerate(names)})
    out = search.select(sc, names, [], [], eta)
    assert out["keep"] == keep
    assert out["survivors"] == names[::-1][:keep]  # highest top-1 first
    assert sorted(out["survivors"] + out["eliminated"]) == sorted(names)


def test_ties_are_broken_by_val_loss_top5_then_name_whatever_the_input_order():
    runs = {"b": (60.0, 90.0, 1.0), "a": (60.0, 90.0, 1.0), "c": (60.0, 95.0, 1.0), "d": (59.0, 99.0, 0.1)}
    runs |= {"e": (60.0, 10.0, 0.5), "f": (60.0, 99.0, None)}  # at equal top-1 a lower loss wins; none comes last
    sc = {v: search.score([metrics(v, 0, t1, t5) | {"val_loss": loss}]) for v, (t1, t5, loss) in runs.items()}
    for order in (list("abcdef"), list("fedcba"), list("bdface")):
        assert search.select(sc, order, [], [], 2)["ranking"] == ["e", "c", "a", "b", "f", "d"]


def test_val_loss_is_read_from_the_history_beside_the_metrics(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps(metrics("a", 0, 10.0, epochs=2)))
    (tmp_path / "history.csv").write_text("epoch,val_loss,top1\n1,2.5,10\n2,2.25,10\n")
    assert search.read_run(tmp_path / "metrics.json")["val_loss"] == 2.25


def test_mean_over_seeds_ranks_and_a_diverged_seed_disqualifies():
    sc = {
        "steady": search.score([metrics("steady", 0, 60.0), metrics("steady", 1, 62.0)]),
        "lucky": search.score([metrics("lucky", 0, 70.0), metrics("lucky", 1, 50.0)]),
        "boom": search.score([metrics("boom", 0, 99.0), metrics("boom", 1, None, status="diverged")]),
    }
    assert sc["steady"]["top1_mean"] == 61.0 and sc["boom"]["diverged"]
    out = search.select(sc, ["boom", "lucky", "steady"], [], [], 2)
    assert out["ranking"] == ["steady", "lucky", "boom"] and out["survivors"] == ["steady", "lucky"]
    everything_diverged = search.select(sc, ["boom"], [], [], 2)
    assert everything_diverged["survivors"] == [] and everything_diverged["eliminated"] == ["boom"]


def test_pinned_baseline_goes_on_as_a_reference_without_taking_a_place():
    sc = scores(baseline=10.0, a=50.0, b=40.0, c=30.0)
    out = search.select(sc, ["baseline", "a", "b", "c"], [], ["baseline"], 3)
    assert out["survivors"] == ["a", "b"] and out["references"] == ["baseline"]
    assert out["next"] == ["a", "b", "baseline"] and "baseline" in out["eliminated"]
    # a later rung: the reference does not compete again, and a diverged reference is dropped
    sc = scores(a=50.0, b=40.0) | {"baseline": search.score([metrics("baseline", 0, None, status="diverged")])}
    out = search.select(sc, ["a", "b"], ["baseline"], ["baseline"], 3)
    assert out["survivors"] == ["a"] and out["references"] == [] and out["dropped_references"] == ["baseline"]


def seeded(**top1s):
    """variant -> its score over several seeds (one top-1 per seed)."""
    return {v: search.score([metrics(v, s, t) for s, t in enumerate(ts)]) for v, ts in top1s.items()}


def test_seed_noise_is_pooled_over_the_rung_so_two_seeds_that_agree_are_not_certainty():
    """Two seeds that agree to the image (a zero spread) say nothing certain about a variant's noise: the interval
    pools the rung's variants (they share their seeds) and is never narrower than the validation binomial one."""
    sc = seeded(best=[88.0, 87.0], flat=[81.67, 81.67], close=[86.0, 88.7], far=[40.0, 44.0])
    for v in sc:
        sc[v]["val_images"] = 300
    # its own two seeds alike: no seed interval (zero width would be certainty), the 500 images' binomial one
    assert (sc["flat"]["top1_ci_lo"], sc["flat"]["top1_ci_hi"]) == stats.binomial_ci(81.67, 500)
    assert sc["flat"]["ci_basis"] == "val binomial (2 seeds alike, 500 images)"
    intervals, basis = search.promotion_intervals(sc, list(sc))
    pooled = math.sqrt(sum(sc[v]["top1_sd"] ** 2 for v in sc) / 4)  # equal n: the mean of the variances, df 4
    half = stats.t_quantile(0.975, 4) * pooled / math.sqrt(2)
    assert basis == f"seeds pooled (t, df=4, sd {pooled:.2f}) or val binomial, the wider"
    for v, (lo, hi) in intervals.items():
        mean, (b_lo, b_hi) = sc[v]["top1_mean"], stats.binomial_ci(sc[v]["top1_mean"], 300)
        assert (lo, hi) == pytest.approx((min(b_lo, mean - half), max(b_hi, mean + half)))
    assert intervals["flat"][1] - intervals["flat"][0] > 2 * half > 6  # not the zero width of its own seeds
    out = search.select(sc, ["far", "flat", "close", "best"], [], [], 4, promote="overlap")
    assert out["ranking"] == ["best", "close", "flat", "far"] and out["decided_by"] == "overlap (seeds pooled)"
    assert out["survivors"] == ["best", "close", "flat"] and out["eliminated"] == ["far"]
    assert out["intervals"]["flat"] == list(intervals["flat"])
    with pytest.raises(LcnnError, match="search.promote is 'lcb'; use one of mean, overlap"):
        search.select(sc, ["best"], [], [], 2, promote="lcb")


def test_overlap_keeps_every_variant_within_noise_of_the_best():
    sc = seeded(best=[70.0, 72.0, 71.0], close=[69.0, 70.5, 68.0], far=[40.0, 41.0, 42.0])
    sc["boom"] = search.score([metrics("boom", 0, 99.0), metrics("boom", 1, None, status="diverged")])
    out = search.select(sc, ["far", "close", "best", "boom"], [], [], 4, promote="overlap")
    assert out["keep"] == 1 and out["survivors"] == ["best", "close"] and out["eliminated"] == ["far", "boom"]
    assert out["kept_because"]["close"] == "interval overlaps best's" and out["decided_by"] == "overlap (seeds pooled)"


def test_one_seed_promotes_on_the_validation_sets_binomial_interval():
    # one seed: no seed interval, so the 60 validation images' binomial interval decides
    sc = {v: search.score([metrics(v, 0, t, val_images=60)]) for v, t in [("a", 50.0), ("b", 45.0), ("c", 10.0)]}
    assert sc["a"]["ci_basis"] == "val binomial (1 seed, 60 images)"
    lo, hi = stats.binomial_ci(50.0, 60)
    assert (sc["a"]["top1_ci_lo"], sc["a"]["top1_ci_hi"]) == (lo, hi)
    out = search.select(sc, ["a", "b", "c"], [], [], 3, promote="overlap")
    assert out["survivors"] == ["a", "b"] and out["decided_by"] == "overlap (val binomial)"  # 45 is within noise
    assert search.select(sc, ["a", "b", "c"], [], [], 3)["survivors"] == ["a"]
    with pytest.raises(LcnnError, match="search.promote is 'median'; use one of mean, overlap"):
        search.select(sc, ["a"], [], [], 3, promote="median")


def test_a_reselection_that_promotes_a_freed_run_says_what_to_delete(tmp_path):
    """Rerun under another promotion rule, a selection may promote a run whose state an earlier one freed."""
    cfg = {"model": "m", "rung": 1, "epochs": 1, "budget": 3, "eta": 2, "seeds": [0], "pinned": [], "schedule": [1, 3]}
    cfg |= {"candidates": ["a", "b"], "command": "select", "out": tmp_path / "rung1.json", "promote": "mean"}
    paths = []
    for v, top1 in (("a", 30.0), ("b", 20.0)):
        (tmp_path / v / "state" / checkpoint.STATE_DIR).mkdir(parents=True)
        paths.append(tmp_path / v / "metrics.json")
        paths[-1].write_text(json.dumps(metrics(v, 0, top1)))
    (tmp_path / "a" / "state" / checkpoint.STATE_DIR / checkpoint.META_FILE).write_text("{}")
    assert search.run(cfg | {"metrics": [str(p) for p in paths]})["next"] == ["a"]
    assert not (tmp_path / "b" / "state" / checkpoint.STATE_DIR).exists()  # b goes no further: freed
    overlap = cfg | {"metrics": [str(p) for p in paths], "promote": "overlap"}  # 30 vs 20 on 500 images: no overlap
    assert search.run(overlap)["next"] == ["a"]
    (tmp_path / "b" / "metrics.json").write_text(json.dumps(metrics("b", 0, 29.0)))  # now within a's interval
    with pytest.raises(LcnnError, match=r"b go on to the next rung, but an earlier selection freed"):
        search.run(overlap)


def test_a_reselection_after_the_next_rung_finished_needs_no_freed_state(tmp_path):
    """The next rung's runs finished and freed the states they went on from; the selection, rerun, keeps them, unless
    the schedule now asks another number of epochs of that rung (then it reruns and needs the state)."""
    cfg = {"model": "m", "rung": 1, "epochs": 1, "budget": 3, "eta": 2, "seeds": [0], "pinned": [], "schedule": [1, 3]}
    cfg |= {"candidates": ["a", "b"], "command": "select", "out": tmp_path / "rung1.json", "promote": "mean"}
    paths = []
    for v, top1 in (("a", 30.0), ("b", 20.0)):
        paths.append(tmp_path / v / "seed0" / "rung1" / "metrics.json")
        paths[-1].parent.mkdir(parents=True)
        paths[-1].write_text(json.dumps(metrics(v, 0, top1)))
    cfg["metrics"] = [str(p) for p in paths]
    with pytest.raises(LcnnError, match=r"a/seed0/rung1 go on to the next rung"):  # no state, no next rung yet
        search.run(cfg)
    rung2 = tmp_path / "a" / "seed0" / "rung2"
    rung2.mkdir()
    (rung2 / "metrics.json").write_text(json.dumps(metrics("a", 0, 40.0)))
    (rung2 / "model.safetensors").write_bytes(b"weights")
    (rung2 / "config.json").write_text(json.dumps({"stop_epoch": 2}))  # rung 2 of another schedule: it reruns
    with pytest.raises(LcnnError, match=r"a/seed0/rung1 go on to the next rung"):
        search.run(cfg)
    (rung2 / "config.json").write_text(json.dumps({"stop_epoch": 3}))  # finished to what the schedule asks
    assert search.run(cfg)["next"] == ["a"]


def test_the_halving_table_says_which_rule_decided():
    s = two_rung_search()
    assert search.compare(s, {})["promoted_by"] == "overlap (val binomial)"


def test_selection_refuses_stale_or_missing_metrics():
    cfg = {"model": "m", "rung": 1, "epochs": 2, "budget": 6, "eta": 3, "seeds": [0], "candidates": ["a", "b"]}
    cfg["pinned"] = ["a"]
    with pytest.raises(LcnnError, match="'b' seed 0 has 1 epochs where this rung ends at 2"):
        search.select_rung(cfg, [metrics("a", 0, 1.0, epochs=2), metrics("b", 0, 2.0, epochs=1)], None)
    with pytest.raises(LcnnError, match="rung runs of 'b' cover seeds \\[\\], expected \\[0\\]"):
        search.select_rung(cfg, [metrics("a", 0, 1.0, epochs=2)], None)


# ------------------------------------------------------------------------------------------------- schedule
def halving_cfg(**search_over):
    cfg = copy.deepcopy(REAL)
    cfg["search"] = {"mode": "halving", **search_over}
    return cfg


def test_rung_schedule_ends_at_the_budget():
    assert study.rung_schedule(study.validate(halving_cfg())) == [4, 11, 33, 100]  # 16 candidates, eta 3
    assert study.rung_schedule(study.validate(halving_cfg(rung_epochs=[10, 30]))) == [10, 30, 100]
    assert study.rung_schedule(study.validate(halving_cfg(rung_epochs=[10, 100]))) == [10, 100]
    cfg = tiny_config()  # 2 candidates: one selection, at a third of the budget
    cfg["baseline"]["epochs"] = 9
    assert study.rung_schedule(cfg) == [3, 9]


@pytest.mark.parametrize(
    ("search_over", "message"),
    [
        ({"rung_epochs": [30, 10]}, "search.rung_epochs [30, 10] must increase strictly"),
        ({"rung_epochs": [10, 10]}, "must increase strictly"),
        ({"rung_epochs": [10, 200]}, "goes past baseline.epochs (100)"),
        ({"rung_epochs": [100]}, "stops no run before baseline.epochs (100), so halving would eliminate nothing"),
        ({"rung_epochs": [0, 10]}, "config key 'search.rung_epochs.0': 0 is less than the minimum of 1"),
        ({"eta": 1}, "config key 'search.eta': 1 is less than the minimum of 2"),
        ({"mode": "hyperband"}, "config key 'search.mode' is 'hyperband'; expected one of grid, halving"),
        ({"rungs": [1]}, "config key 'search.rungs' is not allowed here"),
    ],
)
def test_bad_search_section_gives_one_line(search_over, message):
    with pytest.raises(LcnnError) as info:
        study.validate(halving_cfg(**search_over))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_halving_needs_variants_with_the_common_budget():
    cfg = halving_cfg()
    cfg["variants"]["long"] = {"axis": "schedule", "epochs": 200}
    with pytest.raises(LcnnError, match="variant 'long' sets its own epochs"):
        study.validate(cfg)
    with pytest.raises(LcnnError, match="needs at least 2 variants to choose between"):
        study.validate(halving_cfg() | {"variants": {}})
    cfg = copy.deepcopy(REAL)
    cfg["search"] = {"rung_epochs": [100]}  # harmless in grid mode
    assert study.validate(cfg)["search"]["mode"] == "grid"


# --------------------------------------------------------------------------------------- summary, vs grid
def two_rung_search():
    """A 4-candidate, eta-2 search over rungs [1, 3]: b and c survive rung 1, the baseline goes on as reference."""
    cfg = {"model": "m", "eta": 2, "budget": 3, "schedule": [1, 3], "seeds": [0], "pinned": ["baseline"]}
    cfg["promote"] = "overlap"
    cfg["candidates"] = ["baseline", "a", "b", "c"]
    rung1 = [metrics(v, 0, t, hours=h) for v, t, h in [("baseline", 10, 0.1), ("a", 5, 0.2), ("b", 30, 0.3)]]
    rung1.append(metrics("c", 0, 20, hours=0.4))
    sel = search.select_rung(cfg | {"rung": 1, "epochs": 1}, rung1, None)
    assert sel["survivors"] == ["b", "c"] and sel["next"] == ["b", "c", "baseline"]
    sel = json.loads(json.dumps(sel))  # as the next job reads it back from search/m/rung1.json
    final = [metrics(v, 0, t, epochs=3, hours=3 * h) for v, t, h in [("b", 70, 0.3), ("c", 80, 0.4)]]
    final.append(metrics("baseline", 0, 60, epochs=3, hours=0.3))
    return search.summarize_halving(cfg, [sel], final)


def test_summary_names_the_winner_and_adds_up_the_compute():
    s = two_rung_search()
    assert s["winner"] == "c" and s["winner_top1"] == 80
    assert s["eliminated_at"] == {"a": 1, "baseline": 1}
    assert s["final"]["baseline"]["role"] == "reference" and s["final"]["c"]["role"] == "survivor"
    comp = s["compute"]
    assert comp["epochs"] == 4 * 1 + 3 * 2  # everyone to epoch 1, then three runs 2 epochs further
    assert comp["device_hours"] == pytest.approx(0.1 + 0.2 + 0.3 + 0.4 + 0.6 + 0.8 + 0.2)
    assert comp["grid_epochs"] == 12 and comp["epoch_fraction"] == pytest.approx(10 / 12)
    assert comp["grid_device_hours_estimate"] == pytest.approx(3 * (0.1 + 0.2 + 0.3 + 0.4))


def grid_result(variant, top1s, hours=1.0, epochs=3):
    runs = [metrics(variant, s, t, epochs=epochs, hours=hours) for s, t in enumerate(top1s)]
    return {"model": "m", "variant": variant, "runs": runs}


def test_verdict_same_within_ci_or_not():
    s = two_rung_search()
    grid = {v: grid_result(v, [t]) for v, t in [("baseline", 60), ("a", 55), ("b", 70), ("c", 80)]}
    row = search.compare(s, grid)
    assert row["verdict"] == "same" and row["grid_winner"] == "c" and row["grid_epochs"] == 12
    assert row["winner_role"] == "survivor"
    assert row["grid_basis"] == "measured" and row["hours_fraction"] == pytest.approx(s["compute"]["device_hours"] / 4)
    # one seed: the CI is the validation set's binomial interval (500 images: about +-3.5 points at 80%)
    grid["a"] = grid_result("a", [82.0])
    row = search.compare(s, grid)
    assert row["grid_winner"] == "a" and row["ci_basis"].startswith("val binomial")
    assert row["grid_ci_lo"] < 80 < 82 < row["grid_ci_hi"] and row["verdict"] == "within CI"
    grid["a"] = grid_result("a", [95.0])
    assert search.compare(s, grid)["verdict"] == "no"
    # several seeds: a t interval over them
    grid = {v: grid_result(v, [t, t + 1, t + 2]) for v, t in [("baseline", 60), ("a", 79), ("b", 70), ("c", 78)]}
    row = search.compare(s, grid)
    lo = 80 - 4.302652729911275 * 1 / math.sqrt(3)
    assert row["ci_basis"] == "seeds (t, n=3)" and row["grid_ci_lo"] == pytest.approx(lo)
    assert row["winner_in_grid_top1"] == 79 and row["verdict"] == "within CI"


def test_table_without_grid_estimates_and_totals(tmp_path):
    table = search.halving_table([two_rung_search()], [])
    assert list(table["model"]) == ["m", "ALL"]
    assert table.loc[0, "grid_basis"].startswith("estimated") and table.loc[0, "verdict"] == "n/a"
    assert table.loc[1, "halving_epochs"] == 10 and table.loc[1, "grid_epochs"] == 12


def test_search_vs_grid_tool_reads_two_workdirs(tmp_path, capsys):
    halving, grid = tmp_path / "halving", tmp_path / "grid"
    (halving / "search" / "m").mkdir(parents=True)
    (halving / "search" / "m" / "halving.json").write_text(json.dumps(two_rung_search()))
    for v, t in [("baseline", 60), ("a", 55), ("b", 82), ("c", 80)]:
        (grid / "results" / "m").mkdir(parents=True, exist_ok=True)
        (grid / "results" / "m" / f"{v}.json").write_text(json.dumps(grid_result(v, [t])))
    search_vs_grid.main(["--grid", str(grid), "--halving", str(halving), "--out-dir", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "| m " in out and "within CI" in out and "1/1 same or within CI (0 won by a kept reference)" in out
    table = pd.read_csv(tmp_path / "out" / "halving_vs_grid.csv")
    assert table.loc[0, "grid_winner"] == "b" and table.loc[0, "halving_winner"] == "c"


# ------------------------------------------------------------------------------------------ resume == whole
@pytest.mark.slow
def test_rung_after_rung_equals_one_continuous_run(built_data, tmp_path):
    """Rung 1 stops after epoch 1 under the 3-epoch schedule; rung 2 goes on from its state to epoch 3."""
    cfg = tiny_config(built_data)

    def rc(out, **extra):
        run = study.run_config(cfg, "mobilevitv2_xs", "cosine", 0) | extra  # warmup + cosine: lr moves every step
        run["hparams"].update(batch_size=8, epochs=3, warmup_epochs=1)
        run["train"].update(max_steps_per_epoch=4)
        return run | {"out_dir": str(tmp_path / out)}

    whole = train.run(rc("whole"))
    first = train.run(rc("rung1", stop_epoch=1))
    assert first["epochs_completed"] == 1 and first["epochs"] == 3
    assert checkpoint.find(tmp_path / "rung1")  # kept: the next rung goes on from it
    last = train.run(rc("rung2", stop_epoch=3, init_state=str(tmp_path / "rung1")))
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "rung2"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (last["top1"], last["top5"], last["epochs_completed"]) == (whole["top1"], whole["top5"], 3)
    h_whole, h_rungs = (pd.read_csv(tmp_path / d / "history.csv") for d in ("whole", "rung2"))
    assert h_whole[["epoch", "lr", "top1", "train_loss"]].equals(h_rungs[["epoch", "lr", "top1", "train_loss"]])
    assert not checkpoint.find(tmp_path / "rung2")  # the full budget reached: cleaned up
    assert not checkpoint.find(tmp_path / "rung1")  # carried on into rung 2: freed
    with pytest.raises(LcnnError, match="no usable training state in .*nowhere"):
        train.run(rc("rung3", stop_epoch=3, init_state=str(tmp_path / "nowhere")))


# --------------------------------------------------------------------------------------------- workflow
HALVING_OVERLAY = {
    "select": {"variants": ["cosine", "adamw", "label_smoothing"]},  # 4 candidates with the baseline
    "baseline": {"epochs": 2},
    "search": {"mode": "halving", "eta": 3, "rung_epochs": [1, 2]},  # keep ceil(4/3) = 2 after rung 1
}
MODELS = ("mobilenetv3_l", "mobilevitv2_xs")


def first_table(log: str) -> str:
    """The first 'Job stats' table of a run's log (a real run logs to stderr, later DAG updates add more)."""
    head, table = log.split("Job stats:", 1)
    return "Job stats:" + table.split("\n\n", 1)[0]


@pytest.mark.slow
def test_halving_study_grows_its_dag_and_reruns_nothing(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "halving.yaml").write_text(yaml.safe_dump(HALVING_OVERLAY))
    args = ["--cores", "2", "--configfile", *OVERLAYS, "halving.yaml"]

    # before anything ran, the DAG knows rung 1 (the benchmark waits on the selections for its run's last rung)
    counts = job_counts(snakemake(workdir, "-n", *args).stdout)
    assert counts["train_rung"] == 2 * 4 and counts["select_rung"] == 2 and "train" not in counts
    assert "collect_halving" not in counts  # who reaches the budget is not known yet

    # an interrupted study: rung 1 and its selections done; the rest of the run must not redo any of it
    snakemake(workdir, *[f"search/{m}/rung1.json" for m in MODELS], *args)
    sel = {m: json.loads((workdir / f"search/{m}/rung1.json").read_text()) for m in MODELS}
    finalists = {m: sel[m]["next"] for m in MODELS}  # 2 survivors, and the baseline unless it is one of them
    for m in MODELS:  # a run that goes no further never resumes: its state is freed at the selection
        assert len(sel[m]["runs"]) == 4  # every candidate trained in rung 1
        states = {v: checkpoint.find(workdir / f"runs_halving/{m}/{v}/seed0/rung1/state") for v in sel[m]["runs"]}
        assert {v for v, p in states.items() if p} == set(finalists[m])
    proc = snakemake(workdir, *args)
    counts = job_counts(first_table(proc.stdout + proc.stderr))  # the jobs this second run had to do
    assert "select_rung" not in counts and "prepare_data" not in counts
    assert counts["train_rung"] == counts["collect_halving"] == sum(len(f) for f in finalists.values())

    for model in MODELS:
        assert sel[model]["keep"] == 2 and len(sel[model]["survivors"]) == 2
        assert set(finalists[model]) == set(sel[model]["survivors"]) | {"baseline"}
        summary = json.loads((workdir / f"search/{model}/halving.json").read_text())
        assert summary["compute"]["epochs"] == 4 + len(finalists[model]) and summary["compute"]["grid_epochs"] == 8
        assert summary["winner"] in finalists[model] and len(finalists[model]) in (2, 3)
        for variant in finalists[model]:
            result = json.loads((workdir / f"results/halving/{model}/{variant}.json").read_text())
            assert result["runs"][0]["epochs_completed"] == 2 and result["runs"][0]["epochs"] == 2
            history = pd.read_csv(workdir / f"runs_halving/{model}/{variant}/seed0/rung2/history.csv")
            assert list(history["epoch"]) == [1, 2]  # one continuous curve across the rungs
        gone = set(sel[model]["eliminated"]) - set(finalists[model])
        assert len(gone) == 4 - len(finalists[model]) >= 1  # 4 candidates, 2 or 3 of them go on
        for variant in gone:
            assert not (workdir / f"results/halving/{model}/{variant}.json").exists()
            assert not (workdir / f"runs_halving/{model}/{variant}/seed0/rung2").exists()
    assert not (workdir / "runs").exists() and not (workdir / "results" / MODELS[0]).exists()  # no grid runs
    assert not list(workdir.glob(f"runs_halving/**/{checkpoint.STATE_DIR}*"))  # every state freed once no rung needs it

    table = pd.read_csv(workdir / "results/report/halving.csv")
    spent = sum(4 + len(f) for f in finalists.values())
    assert list(table["model"]) == [*MODELS, "ALL"] and table["epoch_fraction"].iloc[-1] == pytest.approx(spent / 16)
    assert all(table["grid_basis"].str.startswith("estimated"))
    accuracy = pd.read_csv(workdir / "results/report/accuracy.csv")
    assert set(accuracy["model"]) == set(MODELS) and "baseline" in set(accuracy["variant"])

    proc = snakemake(workdir, "-n", *args)
    assert "Nothing to be done" in proc.stdout + proc.stderr

    # a setting that decides nothing here (the intervals' level, under promote: mean) reruns the selections and
    # retrains nothing: the next rung reads its selection as an ancient input, and a finished rung needs no state
    (workdir / "confidence.yaml").write_text(yaml.safe_dump({"search": {"confidence": 0.9}}))
    proc = snakemake(workdir, *args, "confidence.yaml")
    counts = job_counts(first_table(proc.stdout + proc.stderr))
    assert counts["select_rung"] == 2 and "train_rung" not in counts
    ran = proc.stdout + proc.stderr  # the benchmark waits on the selections, so it is listed until they are re-read
    assert "rule benchmark:" not in ran and "rule train_rung:" not in ran and "Finished jobid" in ran

    # a `git pull` that only reformats the training command retrains nothing under the SLURM profile's triggers
    common = workdir / "rules" / "common.smk"
    common.write_text(common.read_text().replace('" exec python -m lcnn.launch', '"  exec python -m lcnn.launch'))
    triggers = yaml.safe_load((REPO / "profiles/slurm/config.yaml").read_text())["rerun-triggers"]
    assert "code" not in triggers
    assert "train_rung" in job_counts(snakemake(workdir, "-n", *args, "confidence.yaml").stdout)  # the default's
    proc = snakemake(workdir, "-n", "--rerun-triggers", *triggers, *args, "confidence.yaml")
    assert "Nothing to be done" in proc.stdout + proc.stderr
    assert {m: json.loads((workdir / f"search/{m}/rung1.json").read_text())["next"] for m in MODELS} == finalists


@pytest.mark.slow
def test_report_declares_the_grid_only_under_halving_vs_grid(tmp_path):
    """The report reads only declared inputs: a grid to set the halving against is trained, never found on disk."""
    workdir = copy_workflow(tmp_path)
    (workdir / "halving.yaml").write_text(yaml.safe_dump(HALVING_OVERLAY))
    (workdir / "vs_grid.yaml").write_text(yaml.safe_dump({"report": {"halving_vs_grid": True}}))
    args = ["-n", "--cores", "2", "--configfile", *OVERLAYS, "halving.yaml"]
    alone = job_counts(snakemake(workdir, *args).stdout)
    assert "train" not in alone and "collect_seeds" not in alone and alone["report"] == 1
    both = job_counts(snakemake(workdir, *args, "vs_grid.yaml").stdout)
    assert both["train"] == both["collect_seeds"] == 2 * 4  # 2 models x 4 candidates x 1 seed, for the report
    assert both["train_rung"] == alone["train_rung"] and both["report"] == 1


def test_report_sets_halving_against_a_grid_next_to_it(tmp_path):
    """Halving mode: the report reads the finalists' results, the summary and a finished grid's results."""
    from lcnn import report

    s = two_rung_search()
    full = {k: 3 for k in ("epochs", "epochs_completed")}
    finals = {v: [metrics(v, 0, t) | full] for v, t in [("baseline", 60), ("b", 70), ("c", 80)]}
    paths = {"summary": tmp_path / "halving.json", "results": [], "grid": []}
    paths["summary"].write_text(json.dumps(s))
    for v, runs in finals.items():
        res = {"model": "m", "variant": v, "axis": "baseline" if v == "baseline" else "schedule", "runs": runs}
        paths["results"].append(tmp_path / f"final_{v}.json")
        paths["results"][-1].write_text(json.dumps(res | {"timm_name": "t"}))
    for v, t in [("baseline", 60), ("a", 55), ("b", 70), ("c", 80)]:
        paths["grid"].append(tmp_path / f"grid_{v}.json")
        paths["grid"][-1].write_text(json.dumps(grid_result(v, [t])))
    rep = {"gain_range": [1.5, 3.5], "fast_models": [], "latency_ms": 5.0, "throughput_ips": 9800}
    cfg = {"report": rep, "search_mode": "halving", "out_dir": str(tmp_path / "report")}
    cfg |= {"results": [str(p) for p in paths["results"]], "search": [str(paths["summary"])]}
    summary = report.run(cfg | {"grid_results": [str(p) for p in paths["grid"]]})
    table = pd.read_csv(tmp_path / "report" / "halving.csv")
    assert table.loc[0, "verdict"] == "same" and table.loc[0, "eliminated"] == "a@r1, baseline@r1 (kept as reference)"
    assert summary["halving"][0]["grid_basis"] == "measured"
    gains = pd.read_csv(tmp_path / "report" / "gains.csv")
    assert set(gains["variant"]) == {"b", "c"} and set(gains["n_compared"]) == {3}  # a, b, c were searched
    assert "halving" in (tmp_path / "report" / "report.md").read_text()
    # the finalists' runs are not all a search costs: the compute table adds what the search spent in all
    compute = pd.read_csv(tmp_path / "report" / "compute.csv").set_index("model")
    spent = s["compute"]["device_hours"]
    assert compute.loc["m", "search_device_hours"] == compute.loc["ALL", "search_device_hours"] == pytest.approx(spent)
    assert compute.loc["m", "search_epochs"] == s["compute"]["epochs"] and spent > compute.loc["m", "device_hours"]
    # a model whose search carried only the baseline to the budget still gets a claims row saying so
    only_base = s | {"model": "n", "winner": "baseline"}
    (tmp_path / "n.json").write_text(json.dumps(only_base))
    res = {"model": "n", "variant": "baseline", "axis": "baseline", "timm_name": "t"}
    (tmp_path / "n_baseline.json").write_text(json.dumps(res | {"runs": [metrics("baseline", 0, 50.0, model="n")]}))
    cfg["results"].append(str(tmp_path / "n_baseline.json"))
    cfg["search"].append(str(tmp_path / "n.json"))
    report.run(cfg)
    claims = pd.read_csv(tmp_path / "report" / "claims.csv", keep_default_na=False)
    row = claims[(claims["model"] == "n") & (claims["claim_id"] == "a")].iloc[0]
    assert row["holds"] == "n/a" and "halving kept no variant to the full budget" in row["measured"]

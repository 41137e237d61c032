"""Model-based search (search.mode optuna): the space checks, propose/tell against a real Optuna journal, exact
reruns, the optuna-vs-grid table, and the search end to end through Snakemake checkpoints."""

from __future__ import annotations

import copy
import json
import re
import shutil

import optuna
import pandas as pd
import pytest
import yaml
from conftest import OVERLAYS, REPO, copy_workflow, snakemake
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from test_search import metrics
from test_workflow import job_counts

from lcnn import config as study
from lcnn import optuna_search, search
from lcnn.utils import LcnnError

REAL = yaml.safe_load((REPO / "config.yaml").read_text())
SPACE = {
    "lr_base": {"type": "float", "low": 1e-3, "high": 0.5, "log": True},
    "opt": {"type": "categorical", "choices": ["sgd", "adamw"]},
    "auto_augment": {"type": "categorical", "choices": [None, "rand-m9-mstd0.5"]},
    "drop_path": {"type": "float", "low": 0.0, "high": 0.2},
}


def optuna_cfg(**search_over):
    cfg = copy.deepcopy(REAL)
    cfg["search"] |= {"mode": "optuna", **search_over}
    return study.validate(cfg)


def load(journal, model="m"):
    """The study as optuna-dashboard would read it: through Optuna's own API, from the journal file alone."""
    return optuna.load_study(study_name=f"lcnn_{model}", storage=JournalStorage(JournalFileBackend(str(journal))))


# ------------------------------------------------------------------------------------------------ config
def test_default_space_validates_and_schedules_each_round_through_rungs():
    cfg = optuna_cfg()
    optuna_search.check_space(cfg)
    assert optuna_search.rounds(cfg) == [8, 8, 8]  # 24 trials, 8 a round
    assert optuna_search.schedule(cfg) == [11, 33, 100]  # eta 3 over 8 trials: two selections, then the budget
    assert optuna_search.rounds(optuna_cfg(trials=10, trials_per_round=4)) == [4, 4, 2]
    assert optuna_search.schedule(optuna_cfg(rung_epochs=[10])) == [10, 100]
    assert optuna_search.schedule(optuna_cfg(optuna_halving=False)) == [100]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"lr": {"type": "float", "low": 0.1, "high": 1}}, "search.space.lr is not a hyperparameter"),
        ({"epochs": {"type": "int", "low": 1, "high": 9}}, "search.space.epochs is not a hyperparameter"),
        ({"lr_base": {"type": "float", "low": 1, "high": 0.1}}, "search.space.lr_base needs low < high"),
        ({"lr_base": {"type": "float", "low": 0, "high": 1, "log": True}}, "low must be > 0"),
        ({"opt": {"type": "categorical"}}, "search.space.opt is categorical but has no choices"),
        ({"opt": {"type": "categorical", "choices": ["sgd", "adamx"]}}, "allows 'adamx', which baseline.opt rejects"),
        ({"smoothing": {"type": "float", "low": 0.0, "high": 2.0}}, "allows 2.0, which baseline.smoothing rejects"),
        ({"opt": {"type": "choice", "choices": ["sgd"]}}, "config key 'search.space.opt.type' is 'choice'"),
    ],
)
def test_bad_space_gives_one_line(space, message):
    with pytest.raises(LcnnError) as info:
        optuna_search.check_space(optuna_cfg(space=space))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_trial_recipe_is_the_baseline_with_its_sampled_values():
    cfg = optuna_cfg()
    recipe = optuna_search.trial_recipe(cfg, "tinyvit", "optuna_r1_t000", 2, {"opt": "adamw", "lr_base": 0.003})
    base = study.run_recipe(cfg, "tinyvit", "baseline", 2)
    assert recipe["variant"] == "optuna_r1_t000" and recipe["seed"] == 2 and recipe["train"] == base["train"]
    sampled = study.hparams(cfg, "baseline") | {"opt": "adamw", "lr_base": 0.003, "axis": "optuna"}
    assert recipe["hparams"] == study.used_hparams(sampled) and "momentum" not in recipe["hparams"]  # AdamW has none
    assert "momentum" in base["hparams"]


# ------------------------------------------------------------------------------------------ propose, tell
def settings(tmp_path, rnd, size=3, seeds=(0, 1)):
    base = {"model": "m", "space": SPACE, "sampler_seed": 7, "startup_trials": None, "trials_per_round": 3}
    return base | {"round": rnd, "size": size, "seeds": list(seeds), "schedule": [1, 3], "journal": tmp_path / "j.log"}


def round_results(proposal, eta=3):
    """Rung 1 of the round (1 epoch, 2 seeds) and its selection; the survivor's metrics at the full budget."""
    names = [t["variant"] for t in proposal["trials"]]
    rung1 = [metrics(v, s, 10.0 * (i + 1) + s, model="m") for i, v in enumerate(names) for s in (0, 1)]
    cfg = {"model": "m", "rung": 1, "epochs": 1, "budget": 3, "eta": eta, "seeds": [0, 1], "candidates": names}
    sel = search.select_rung(cfg | {"pinned": [], "promote": "overlap"}, rung1, None)
    final = [metrics(v, s, 50.0 + s, epochs=3, hours=0.003, model="m") for v in sel["next"] for s in (0, 1)]
    return json.loads(json.dumps(sel)), final


def test_propose_asks_once_and_tell_records_pruned_and_complete_trials(tmp_path):
    first = optuna_search.propose(settings(tmp_path, 1), [])
    names = [t["variant"] for t in first["trials"]]
    assert names == ["optuna_r1_t000", "optuna_r1_t001", "optuna_r1_t002"]
    assert all(set(t["params"]) == set(SPACE) for t in first["trials"])
    assert all(1e-3 <= t["params"]["lr_base"] <= 0.5 for t in first["trials"])
    again = optuna_search.propose(settings(tmp_path, 1), [])  # a rerun of the same round: nothing new is asked
    assert again == first and len(load(tmp_path / "j.log").trials) == 3

    sel, final = round_results(first)
    told = optuna_search.tell(settings(tmp_path, 1), first, [sel], final)
    assert sel["survivors"] == ["optuna_r1_t002"] and sel["decided_by"] == "overlap (seeds pooled)"
    # its cost: 3 trials x 2 seeds at rung 1 (0.001 h each), then the survivor's 2 runs on to 0.003 h each
    assert told["device_hours"] == pytest.approx(6 * 0.001 + 2 * 0.002) and told["device_type"] == "cpu"
    trials = load(tmp_path / "j.log").trials
    assert len(trials) == 3 and [t.number for t in trials] == [0, 1, 2]
    by_name = {t.user_attrs["variant"]: t for t in trials}
    assert by_name["optuna_r1_t002"].state == optuna.trial.TrialState.COMPLETE
    assert by_name["optuna_r1_t002"].value == 50.5  # mean over the two seeds
    assert by_name["optuna_r1_t002"].intermediate_values == {1: 30.5, 3: 50.5}
    assert by_name["optuna_r1_t000"].state == optuna.trial.TrialState.PRUNED
    assert by_name["optuna_r1_t000"].intermediate_values == {1: 10.5}
    assert by_name["optuna_r1_t001"].params == first["trials"][1]["params"]
    assert told["epochs"] == (1 + 1 + 3) * 2 and [t["state"] for t in told["trials"]] == [
        "PRUNED",
        "PRUNED",
        "COMPLETE",
    ]
    assert optuna_search.tell(settings(tmp_path, 1), first, [sel], final) == told  # told twice: recorded once
    assert len(load(tmp_path / "j.log").trials) == 3
    other = settings(tmp_path, 1) | {"space": SPACE | {"smoothing": {"type": "float", "low": 0.0, "high": 0.1}}}
    with pytest.raises(LcnnError, match="j.log holds a search under other settings"):
        optuna_search.propose(other, [])  # the edited space reruns the proposal, which must not re-emit old trials


def test_a_lost_journal_is_rebuilt_from_the_told_rounds_and_proposes_the_same(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = optuna_search.propose(settings(tmp_path / "a", 1), [])
    sel, final = round_results(first)
    told = json.loads(json.dumps(optuna_search.tell(settings(tmp_path / "a", 1), first, [sel], final)))
    second = optuna_search.propose(settings(tmp_path / "a", 2), [told])
    assert [t["variant"] for t in second["trials"]] == ["optuna_r2_t003", "optuna_r2_t004", "optuna_r2_t005"]
    rebuilt = optuna_search.propose(settings(tmp_path / "b", 2), [told])  # journal b starts empty
    assert rebuilt["trials"] == second["trials"]
    assert {t.user_attrs["variant"]: t.state for t in load(tmp_path / "b" / "j.log").trials} == {
        t["variant"]: optuna.trial.TrialState[t["state"]] for t in told["trials"]
    } | {t["variant"]: optuna.trial.TrialState.RUNNING for t in second["trials"]}
    with pytest.raises(LcnnError, match="round 3 needs the told rounds 1..2"):
        optuna_search.propose(settings(tmp_path / "b", 3), [told])


def test_tell_rebuilds_a_journal_lost_since_the_proposal(tmp_path):
    first = optuna_search.propose(settings(tmp_path, 1), [])
    sel, final = round_results(first)
    told1 = json.loads(json.dumps(optuna_search.tell(settings(tmp_path, 1), first, [sel], final)))
    second = optuna_search.propose(settings(tmp_path, 2), [told1])
    (tmp_path / "j.log").unlink()  # lost while round 2 trained
    sel, final = round_results(second)
    told2 = optuna_search.tell(settings(tmp_path, 2), second, [sel], final, [told1])
    trials = load(tmp_path / "j.log").trials
    assert [t.user_attrs["variant"] for t in trials] == [t["variant"] for t in told1["trials"] + told2["trials"]]
    assert [t.number for t in trials] == list(range(6)) and all(t.state.is_finished() for t in trials)
    assert trials[5].value == 50.5 and trials[3].intermediate_values == {1: 10.5}


def test_a_diverged_trial_is_failed(tmp_path):
    first = optuna_search.propose(settings(tmp_path, 1, size=2, seeds=(0,)), [])
    names = [t["variant"] for t in first["trials"]]
    final = [metrics(names[0], 0, 40.0, epochs=3, model="m"), metrics(names[1], 0, None, status="diverged", model="m")]
    first["schedule"] = [3]  # no rungs: every trial to the budget
    told = optuna_search.tell(settings(tmp_path, 1, size=2, seeds=(0,)), first, [], final)
    assert [t["state"] for t in told["trials"]] == ["COMPLETE", "FAIL"]
    states = [t.state for t in load(tmp_path / "j.log").trials]
    assert states == [optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL]


# ------------------------------------------------------------------------------------------ vs. the grid
def summary(model, best_top1, epochs):
    best = {"variant": "optuna_r1_t001", "params": {"lr_base": 0.0123, "opt": "adamw"}, "value": best_top1}
    return {"model": model, "trials": [{}, {}], "best": best, "best_top1": best_top1, "epochs": epochs}


def test_optuna_table_sets_the_best_trial_against_the_grid():
    grid = []
    for model in ("a", "b", "c"):
        for variant, top1 in (("baseline", [60.0, 62.0]), ("cosine", [70.0, 72.0])):
            runs = [metrics(variant, s, t, epochs=3) for s, t in enumerate(top1)]
            grid.append({"model": model, "variant": variant, "runs": runs})
    table = optuna_search.optuna_table([summary("a", 75.0, 6), summary("b", 70.0, 6), summary("c", 40.0, 6)], grid)
    assert list(table["model"]) == ["a", "b", "c", "ALL"]
    assert list(table["verdict"]) == ["at least as good", "within CI", "no", "2/3 as good or within CI"]
    assert set(table["grid_best"][:3]) == {"cosine"} and table.loc[0, "grid_epochs"] == 12
    assert table.loc[0, "best_params"] == "lr_base=0.0123, opt=adamw" and table.loc[3, "epoch_fraction"] == 0.5


# ---------------------------------------------------------------------------------------------- workflow
OPTUNA_OVERLAY = {
    "select": {"models": ["mobilevitv2_xs"]},
    "baseline": {"epochs": 2},
    "train": {"max_steps_per_epoch": 2},
    "search": {"mode": "optuna", "trials": 4, "trials_per_round": 2, "rung_epochs": [1], "sampler_seed": 3},
}
MODEL = "mobilevitv2_xs"


@pytest.mark.slow
def test_optuna_search_runs_in_the_dag_and_reruns_exactly(tmp_path):
    workdir = copy_workflow(tmp_path)
    (workdir / "optuna.yaml").write_text(yaml.safe_dump(OPTUNA_OVERLAY))
    args = ["optuna", "--cores", "2", "--configfile", *OVERLAYS, "optuna.yaml"]
    counts = job_counts(snakemake(workdir, "-n", *args).stdout)
    assert counts["propose_round"] == counts["tell_round"] == counts["select_trial_rung"] == 2
    assert "train_trial" not in counts  # no trial is known before its round is proposed

    snakemake(workdir, *args)
    base = workdir / "search" / MODEL / "optuna"
    proposals = {r: json.loads((base / f"round{r}.json").read_text()) for r in (1, 2)}
    told = {r: json.loads((base / f"told{r}.json").read_text()) for r in (1, 2)}
    for r in (1, 2):
        assert len(proposals[r]["trials"]) == 2
        # eta 3 keeps ceil(2/3) = 1 trial after rung 1: one pruned at 1 epoch, one complete at 2
        assert sorted(t["state"] for t in told[r]["trials"]) == ["COMPLETE", "PRUNED"], told[r]
        assert told[r]["epochs"] == 1 + 2
        for t in proposals[r]["trials"]:
            run = json.loads((workdir / f"runs_optuna/{MODEL}/{t['variant']}/seed0/rung1/config.json").read_text())
            assert {k: run["hparams"][k] for k in t["params"]} == t["params"] and run["hparams"]["axis"] == "optuna"
    trials = load(base / "journal.log", MODEL).trials
    assert len(trials) == 4 and all(t.state.is_finished() for t in trials)
    names = [t["variant"] for r in (1, 2) for t in proposals[r]["trials"]]
    assert [t.user_attrs["variant"] for t in trials] == names
    assert [t.params for t in trials] == [t["params"] for r in (1, 2) for t in proposals[r]["trials"]]
    result = json.loads((workdir / f"search/{MODEL}/optuna.json").read_text())
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 2 and result["best_top1"] == max(t.value for t in complete) and result["epochs"] == 6
    proc = snakemake(workdir, "-n", *args)
    assert "Nothing to be done" in proc.stdout + proc.stderr

    # round 2 lost, the journal too: the rerun redoes round 2 only, and proposes exactly the same trials
    for path in [base / "round2.json", base / "round2_rung1.json", base / "told2.json", base / "journal.log"]:
        path.unlink()
    (workdir / f"search/{MODEL}/optuna.json").unlink()
    round1 = (base / "round1.json").stat().st_mtime_ns
    for t in proposals[2]["trials"]:
        shutil.rmtree(workdir / f"runs_optuna/{MODEL}/{t['variant']}")
    proc = snakemake(workdir, *args)
    counts = job_counts(proc.stdout + proc.stderr)
    assert counts["propose_round"] == 1 and "prepare_data" not in counts
    assert (base / "round1.json").stat().st_mtime_ns == round1
    assert json.loads((base / "round2.json").read_text()) == proposals[2]
    assert json.loads((base / "told1.json").read_text()) == told[1]
    trained = re.findall(r"wildcards: model=\w+, trial=(\w+), seed=0, rung=(\d)", proc.stdout + proc.stderr)
    assert len(trained) == 3 and all(t.startswith("optuna_r2_") for t, _ in trained)  # round 2's two, its survivor
    assert sorted(r for _, r in trained) == ["1", "1", "2"]
    assert len(load(base / "journal.log", MODEL).trials) == 4


def test_search_vs_grid_tool_reads_an_optuna_workdir(tmp_path, capsys):
    from lcnn.tools import search_vs_grid

    (tmp_path / "search" / "m").mkdir(parents=True)
    (tmp_path / "search" / "m" / "optuna.json").write_text(json.dumps(summary("m", 71.5, 20)))
    (tmp_path / "results" / "m").mkdir(parents=True)
    for variant, top1 in (("baseline", 60.0), ("cosine", 72.0)):
        res = {"model": "m", "variant": variant, "runs": [metrics(variant, 0, top1, epochs=9, val_images=300)]}
        (tmp_path / "results" / "m" / f"{variant}.json").write_text(json.dumps(res))
    search_vs_grid.main(["--grid", str(tmp_path), "--optuna", str(tmp_path), "--out-dir", str(tmp_path / "out")])
    assert "## optuna vs grid" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "out" / "optuna_vs_grid.csv")
    assert list(table["model"]) == ["m", "ALL"] and table.loc[0, "verdict"] == "within CI"  # 71.5 vs 72 on 300 images
    assert table.loc[0, "ci_basis"] == "val binomial (1 seed, 300 images)" and table.loc[0, "grid_epochs"] == 18
    with pytest.raises(LcnnError, match="give --halving DIR, --optuna DIR or both"):
        search_vs_grid.run({"grid": str(tmp_path)})


def test_report_in_optuna_mode_adds_the_optuna_table(tmp_path):
    """Optuna mode: the results are the grid of named variants, the search summaries go to the optuna table."""
    from lcnn import report

    results = []
    for variant, top1 in (("baseline", 60.0), ("cosine", 72.0)):
        res = {"model": "m", "variant": variant, "axis": "baseline" if variant == "baseline" else "schedule"}
        res |= {"timm_name": "t", "runs": [metrics(variant, 0, top1, epochs=9) | {"epochs": 9}]}
        results.append(tmp_path / f"{variant}.json")
        results[-1].write_text(json.dumps(res))
    compute = {"epochs": 40, "device_hours": 0.5, "device_type": "cpu"}  # the trials' cost, besides the grid's
    (tmp_path / "optuna.json").write_text(json.dumps(summary("m", 75.0, 40) | {"compute": compute}))
    rep = {"gain_range": [1.5, 3.5], "fast_models": [], "latency_ms": 5.0, "throughput_ips": 9800}
    cfg = {"report": rep, "search_mode": "optuna", "out_dir": str(tmp_path / "report")}
    out = report.run(cfg | {"results": [str(p) for p in results], "search": [str(tmp_path / "optuna.json")]})
    table = pd.read_csv(tmp_path / "report" / "optuna.csv")
    assert list(table["model"]) == ["m", "ALL"] and table.loc[0, "verdict"] == "at least as good"
    assert table.loc[0, "grid_best"] == "cosine" and table.loc[0, "epoch_fraction"] == pytest.approx(40 / 18)
    assert len(out["optuna"]) == 2 and out["halving"] == []  # the optuna summaries are not read as halving's
    cost = pd.read_csv(tmp_path / "report" / "compute.csv").set_index("model")
    assert cost.loc["m", "search_device_hours"] == cost.loc["ALL", "search_device_hours"] == 0.5
    assert cost.loc["m", "search_epochs"] == 40 and cost.loc["m", "device_hours"] == pytest.approx(0.002)

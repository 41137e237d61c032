"""Model-based search (``search.mode: optuna``) inside the DAG: Optuna's TPE proposes, the workflow trains.

Per model and round, ``propose`` asks the seeded TPE sampler for the round's trials and writes them as ordinary
path-safe variants (``optuna_r1_t003``) with their sampled hyperparameters; the workflow trains each through the
rungs (successive halving inside the round, as in BOHB), and ``tell`` gives Optuna the results: a finalist's mean
top-1 over the seeds as its value, an eliminated trial as pruned with its rung values as intermediate steps.

The study lives in one Optuna journal file per model (``JournalStorage`` over a ``JournalFileBackend``), written
only by these two local steps, one at a time per model: no database server and no concurrent writers, and
``optuna-dashboard`` opens it. The decision files are the record: the journal is rebuilt from the told rounds when
it is missing, a round already asked for is re-emitted instead of asked again, and the sampler's seed depends on
the round only, so a rerun proposes exactly what the first run did.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from lcnn.utils import LcnnError, atomic_write_json, cli, json_arg, read_json

TRIAL_PATTERN = r"optuna_r\d+_t\d+"
STUDY_NAME = "lcnn_{model}"
KINDS = ("float", "int", "categorical")


# ------------------------------------------------------------------------------------------------ config
def trial_name(rnd: int, number: int) -> str:
    return f"optuna_r{rnd}_t{number:03d}"


def check_space(cfg: dict[str, Any]) -> None:
    """One-line errors for a search space that cannot be sampled (the schema checks the shapes)."""
    import jsonschema

    from lcnn import config as study

    search = cfg.get("search") or {}
    if study.search_mode(cfg) != "optuna":
        return
    space = search.get("space") or {}
    if not space:
        raise LcnnError("search.mode optuna needs a search.space; add e.g. lr_base: {type: float, low: 0.01, high: 1}")
    hp = study.schema()["$defs"]["hparams"]
    check = jsonschema.Draft202012Validator({"$defs": study.schema()["$defs"], "$ref": "#/$defs/hparams"})
    for key, dim in space.items():
        if key not in hp["properties"] or key in ("axis", "epochs"):
            raise LcnnError(f"search.space.{key} is not a hyperparameter optuna may tune; use a key of baseline")
        if dim["type"] == "categorical":
            if not dim.get("choices"):
                raise LcnnError(f"search.space.{key} is categorical but has no choices; add choices: [...]")
            values = dim["choices"]
        else:
            if "low" not in dim or "high" not in dim or not dim["low"] < dim["high"]:
                raise LcnnError(f"search.space.{key} needs low < high (got {dim.get('low')}, {dim.get('high')})")
            if dim.get("log") and dim["low"] <= 0:
                raise LcnnError(f"search.space.{key} is log-uniform, so low must be > 0 (got {dim['low']})")
            values = [dim["low"], dim["high"]]
        for value in values:
            if list(check.iter_errors({key: value})):
                raise LcnnError(f"search.space.{key} allows {value!r}, which baseline.{key} rejects; narrow it")
    if search["trials_per_round"] > search["trials"]:
        raise LcnnError(f"search.trials_per_round ({search['trials_per_round']}) exceeds search.trials; lower it")


def rounds(cfg: dict[str, Any]) -> list[int]:
    """How many trials each round proposes: trials_per_round, the last round the remainder."""
    total, per = cfg["search"]["trials"], cfg["search"]["trials_per_round"]
    return [min(per, total - i) for i in range(0, total, per)]


def schedule(cfg: dict[str, Any]) -> list[int]:
    """Rung epochs of every trial: eta-spaced over one round's trials (or search.rung_epochs) with
    search.optuna_halving, else the full budget in one go."""
    search, budget = cfg["search"], cfg["baseline"]["epochs"]
    if not search.get("optuna_halving"):
        return [budget]
    rungs = [r for r in (search.get("rung_epochs") or []) if r < budget]
    if not rungs:
        n, k, eta = search["trials_per_round"], 0, search["eta"]
        while n > 1:
            n, k = math.ceil(n / eta), k + 1
        rungs = sorted({max(1, round(budget / eta**i)) for i in range(k, 0, -1)} - {budget})
    return [*rungs, budget]


def trial_recipe(cfg: dict[str, Any], model: str, variant: str, seed: int, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's run recipe: the baseline's with the sampled hyperparameters on top (axis ``optuna``)."""
    from lcnn import config as study

    # the sampled values go on before the recipe drops the settings this trial does not use (a sampled sched
    # decides whether decay_milestones is read)
    recipe = study.run_recipe(cfg, model, study.BASELINE, seed, overrides={**params, "axis": "optuna"})
    recipe["variant"] = variant
    return recipe


# ------------------------------------------------------------------------------------------------- optuna
def distributions(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import optuna.distributions as d

    out = {}
    for key, dim in sorted(space.items()):
        if dim["type"] == "categorical":
            out[key] = d.CategoricalDistribution(list(dim["choices"]))
        elif dim["type"] == "int":
            out[key] = d.IntDistribution(int(dim["low"]), int(dim["high"]), log=bool(dim.get("log")))
        else:
            out[key] = d.FloatDistribution(float(dim["low"]), float(dim["high"]), log=bool(dim.get("log")))
    return out


SETTINGS_KEYS = ("space", "sampler_seed", "startup_trials", "trials_per_round", "schedule", "seeds")


def fingerprint(cfg: dict[str, Any]) -> str:
    """What the trials in a journal were proposed under: another space, seed or schedule is another search."""
    return json.dumps({k: cfg.get(k) for k in SETTINGS_KEYS}, sort_keys=True)


def open_study(cfg: dict[str, Any], sampler: Any = None) -> Any:
    """The model's study in its journal file, created on first use (maximize mean validation top-1); a journal
    written under other search settings is refused rather than mixed in."""
    import optuna
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # Optuna 3.x names it JournalFileStorage
        from optuna.storages import JournalFileStorage as JournalFileBackend

    journal = Path(cfg["journal"])
    journal.parent.mkdir(parents=True, exist_ok=True)
    storage = JournalStorage(JournalFileBackend(str(journal)))
    name = STUDY_NAME.format(model=cfg["model"])
    study = optuna.create_study(
        study_name=name, storage=storage, sampler=sampler, direction="maximize", load_if_exists=True
    )
    mine = fingerprint(cfg)
    held = study.user_attrs.get("settings")
    if held is None:
        study.set_user_attr("settings", mine)
    elif held != mine:
        raise LcnnError(
            f"{journal} holds a search under other settings (space, seed, schedule or seeds changed); move "
            f"{journal.parent} aside (or delete it) to start the new search there"
        )
    return study


def sampler(cfg: dict[str, Any], rnd: int) -> Any:
    """TPE seeded by the study seed and the round: the same history gives the same proposals on any rerun."""
    import optuna

    startup = cfg.get("startup_trials")
    return optuna.samplers.TPESampler(
        seed=int(cfg["sampler_seed"]) * 1000 + rnd,
        n_startup_trials=cfg["trials_per_round"] if startup is None else startup,
        constant_liar=True,  # trials of one round are asked together: pending ones count as mediocre
    )


def _replay(study: Any, told: list[dict[str, Any]], dists: dict[str, Any]) -> None:
    """Put the told rounds' trials into a study that lacks them (a deleted or new journal), in their order."""
    import optuna

    have = {t.user_attrs.get("variant") for t in study.get_trials(deepcopy=False)}
    for rnd in sorted(told, key=lambda r: r["round"]):
        for t in rnd["trials"]:
            if t["variant"] in have:
                continue
            state = optuna.trial.TrialState[t["state"]]
            steps = sorted((int(k), v) for k, v in t["intermediate"].items())
            value = t["value"] if state == optuna.trial.TrialState.COMPLETE else None
            if state == optuna.trial.TrialState.PRUNED and steps:
                value = steps[-1][1]  # as Optuna's tell does for a pruned trial
            trial = optuna.trial.create_trial(
                params=t["params"],
                distributions={k: dists[k] for k in t["params"]},
                value=value,
                intermediate_values=dict(steps),
                state=state,
                user_attrs={"variant": t["variant"], "round": rnd["round"]},
            )
            study.add_trial(trial)


def propose(cfg: dict[str, Any], told: list[dict[str, Any]]) -> dict[str, Any]:
    """Round ``cfg['round']``'s trials: re-emitted when the journal already holds them, else asked of TPE."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rnd, size = int(cfg["round"]), int(cfg["size"])
    if sorted(r["round"] for r in told) != list(range(1, rnd)):
        raise LcnnError(f"round {rnd} needs the told rounds 1..{rnd - 1}, got {[r['round'] for r in told]}")
    dists = distributions(cfg["space"])
    study = open_study(cfg, sampler(cfg, rnd))
    _replay(study, told, dists)
    asked = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("round") == rnd]
    if not asked:
        for _ in range(size):
            trial = study.ask(dists)
            trial.set_user_attr("round", rnd)
            trial.set_user_attr("variant", trial_name(rnd, trial.number))
        asked = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("round") == rnd]
    if len(asked) != size:
        raise LcnnError(
            f"the journal holds {len(asked)} trials of round {rnd}, expected {size}; delete {cfg['journal']}"
        )
    trials = [{"variant": t.user_attrs["variant"], "number": t.number, "params": t.params} for t in asked]
    head = {k: cfg[k] for k in ("model", "round", "sampler_seed", "schedule", "seeds")}
    return head | {"trials": sorted(trials, key=lambda t: t["number"]), "journal": str(cfg["journal"])}


def outcomes(proposal: dict[str, Any], selections: list[dict[str, Any]], final: list[dict[str, Any]], conf=0.95):
    """Each trial's fate: rung values (mean top-1 at each rung's epochs), and its value where it reached the budget."""
    from lcnn import search

    rungs = sorted(selections, key=lambda s: s["rung"])
    by_variant: dict[str, list[dict]] = {}
    for m in final:
        by_variant.setdefault(m["variant"], []).append(m)
    out = []
    for t in proposal["trials"]:
        v, inter, state, value = t["variant"], {}, None, None
        for sel in rungs:
            if v not in sel["scores"]:
                break
            sc = sel["scores"][v]
            if sc["diverged"]:
                state = "FAIL"
                break
            inter[str(sel["epochs"])] = sc["top1_mean"]
            if v in sel["eliminated"]:
                state = "PRUNED"
                break
        if state is None:
            runs = by_variant.get(v) or []
            if len(runs) != len(proposal["seeds"]):
                raise LcnnError(f"{v} reached the last rung but has {len(runs)} of {len(proposal['seeds'])} runs")
            sc = search.score(runs, conf)
            state = "FAIL" if sc["diverged"] else "COMPLETE"
            value = sc["top1_mean"]
            if value is not None:
                inter[str(proposal["schedule"][-1])] = value
            top1 = [r["top1"] for r in sorted(runs, key=lambda r: r["seed"])]
            t = t | {"top1": top1, "ci_lo": sc["top1_ci_lo"], "ci_hi": sc["top1_ci_hi"], "ci_basis": sc["ci_basis"]}
        epochs = max([int(k) for k in inter] or [0])
        out.append(t | {"state": state, "value": value, "intermediate": inter, "epochs": epochs})
    return out


def tell(
    cfg: dict[str, Any], proposal: dict[str, Any], selections: list[dict], final: list[dict], told: list[dict] = ()
) -> dict:
    """Tell Optuna the round's results (once: a trial the journal already holds as finished is left as it is).

    A journal lost since the proposal is rebuilt from the earlier told rounds (``told``) and this round's results.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trials = outcomes(proposal, selections, final, cfg.get("confidence", 0.95))
    study = open_study(cfg | {"model": proposal["model"]})
    dists = distributions(cfg["space"])
    _replay(study, list(told), dists)
    _replay(study, [{"round": proposal["round"], "trials": trials}], dists)  # only what the journal lacks
    held = {t.user_attrs.get("variant"): t for t in study.get_trials(deepcopy=False)}
    for t in trials:
        frozen = held[t["variant"]]
        if frozen.number != t["number"]:
            raise LcnnError(f"{cfg['journal']} has {t['variant']} as trial {frozen.number}; delete it and rerun")
        if frozen.state.is_finished():
            continue
        trial = optuna.trial.Trial(study, frozen._trial_id)  # Optuna's way back to a pending trial by its id
        for step, value in sorted((int(k), v) for k, v in t["intermediate"].items()):
            trial.report(value, step)
        state = optuna.trial.TrialState[t["state"]]
        study.tell(t["number"], t["value"] if state == optuna.trial.TrialState.COMPLETE else None, state=state)
    n_seeds = len(proposal["seeds"])
    spent = sum(t["epochs"] for t in trials) * n_seeds
    head = {k: proposal[k] for k in ("model", "round", "schedule", "seeds")}
    # device-hours as halving counts them: each rung's runs, less what they started from
    from lcnn import search

    last: dict[str, dict[str, dict]] = {}
    for m in final:
        last.setdefault(m["variant"], {})[str(m["seed"])] = m
    stages = [s["runs"] for s in sorted(selections, key=lambda s: s["rung"])] + [last]
    cost = search.compute(stages, {"seeds": proposal["seeds"], "budget": proposal["schedule"][-1], "candidates": []})
    return head | {"trials": trials, "epochs": spent} | {k: cost[k] for k in ("device_hours", "device_type")}


# ------------------------------------------------------------------------------------------------ summary
def summarize(cfg: dict[str, Any], told: list[dict[str, Any]]) -> dict[str, Any]:
    """One model's whole search: every trial, the best finished one, and the epochs spent."""
    rounds_ = sorted(told, key=lambda r: r["round"])
    trials = [t | {"round": r["round"]} for r in rounds_ for t in r["trials"]]
    done = [t for t in trials if t["state"] == "COMPLETE" and t["value"] is not None]
    best = max(done, key=lambda t: (t["value"], -t["number"])) if done else None
    return {
        "model": cfg["model"],
        "mode": "optuna",
        "rounds": len(rounds_),
        "trials": trials,
        "schedule": rounds_[0]["schedule"] if rounds_ else [],
        "seeds": rounds_[0]["seeds"] if rounds_ else [],
        "best": best,
        "best_top1": best["value"] if best else None,
        "epochs": sum(r["epochs"] for r in rounds_),
        "compute": compute(rounds_),
        "journal": cfg.get("journal"),
    }


def compute(rounds_: list[dict[str, Any]]) -> dict[str, Any]:
    """The trials' cost over every told round, for the report's compute table (a round told by an older lcnn
    recorded epochs only: its device-hours are unknown, and so is the total)."""
    hours = [r.get("device_hours") for r in rounds_]
    types = {t for r in rounds_ for t in (r.get("device_type") or "").split(",") if t}
    return {
        "epochs": sum(r["epochs"] for r in rounds_),
        "device_hours": sum(hours) if None not in hours else None,
        "device_type": ",".join(sorted(types)) or None,
    }


OPTUNA_COLUMNS = ["model", "trials", "best_trial", "best_top1", "best_params", "grid_best", "grid_top1"]
OPTUNA_COLUMNS += ["grid_ci_lo", "ci_basis", "verdict", "optuna_epochs", "grid_epochs", "epoch_fraction"]


def optuna_table(summaries: list[dict[str, Any]], grid_results: list[dict[str, Any]]) -> Any:
    """Each model's best trial against the best variant of a grid (same winner rule, the grid's CI), plus ALL."""
    import pandas as pd

    from lcnn import search

    by_model: dict[str, dict[str, dict]] = {}
    for res in grid_results:
        by_model.setdefault(res["model"], {})[res["variant"]] = res
    rows = []
    for s in sorted(summaries, key=lambda s: s["model"]):
        best, grid = s["best"], by_model.get(s["model"], {})
        row = {"model": s["model"], "trials": len(s["trials"]), "optuna_epochs": s["epochs"]}
        row |= {"best_trial": best["variant"] if best else "n/a", "best_top1": s["best_top1"]}
        row["best_params"] = ", ".join(f"{k}={_short(v)}" for k, v in sorted(best["params"].items())) if best else ""
        gw = search.winner_of(grid) if grid else None
        row["grid_epochs"] = sum(r.get("epochs_completed") or 0 for g in grid.values() for r in g.get("runs") or [])
        row["grid_best"] = gw or "n/a"
        row["verdict"] = "n/a"
        if gw and best:
            lo, _, basis = search.interval(grid[gw]["runs"])
            row |= {"grid_top1": search.score(grid[gw]["runs"])["top1_mean"], "grid_ci_lo": lo, "ci_basis": basis}
            ok = row["best_top1"] >= row["grid_top1"] or (math.isfinite(lo) and row["best_top1"] >= lo)
            row["verdict"] = (
                ("at least as good" if row["best_top1"] >= row["grid_top1"] else "within CI") if ok else "no"
            )
        row["epoch_fraction"] = row["optuna_epochs"] / row["grid_epochs"] if row["grid_epochs"] else math.nan
        rows.append(row)
    if rows:
        df = pd.DataFrame(rows)
        judged = df[df["verdict"] != "n/a"]
        hits = int(judged["verdict"].isin(["at least as good", "within CI"]).sum())
        total = {
            "model": "ALL",
            "trials": int(df["trials"].sum()),
            "verdict": f"{hits}/{len(judged)} as good or within CI",
        }
        total |= {k: df[k].sum() for k in ("optuna_epochs", "grid_epochs")}
        total["epoch_fraction"] = total["optuna_epochs"] / total["grid_epochs"] if total["grid_epochs"] else math.nan
        rows.append(total)
    df = pd.DataFrame(rows, columns=OPTUNA_COLUMNS)
    for col in ("best_top1", "grid_top1", "grid_ci_lo", "epoch_fraction"):
        df[col] = pd.to_numeric(df[col], errors="coerce")
    return df


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------- CLI
def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg['command']``: ``propose`` (a round's trials), ``tell`` (its results) or ``summarize`` (the model)."""
    told = [read_json(p) for p in cfg.get("told") or []]
    if cfg["command"] == "propose":
        out = propose(cfg, told)
    elif cfg["command"] == "tell":
        from lcnn import search

        final = [search.read_run(p) for p in cfg.get("metrics") or []]
        rungs = [read_json(p) for p in cfg.get("rungs") or []]
        out = tell(cfg, read_json(cfg["proposal"]), rungs, final, told)
    else:
        out = summarize(cfg, told)
    atomic_write_json(cfg["out"], out)
    return out


@cli
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lcnn.optuna_search", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["propose", "tell", "summarize"])
    parser.add_argument("--config-json", required=True, help="model, round, journal, space, ...: rules/optuna.smk")
    parser.add_argument(
        "--told", nargs="*", default=[], help="the told rounds so far (earlier ones for propose and tell)"
    )
    parser.add_argument("--proposal", help="tell: the round's proposal")
    parser.add_argument("--rungs", nargs="*", default=[], help="tell: the round's rung selections")
    parser.add_argument("--metrics", nargs="*", default=[], help="tell: last-rung metrics of the round's finalists")
    parser.add_argument("--out", required=True, type=Path, help="where the JSON goes")
    args = parser.parse_args(argv)
    cfg = json_arg(args.config_json) | {"command": args.command, "out": args.out, "proposal": args.proposal}
    out = run(cfg | {k: [p for p in getattr(args, k) if p] for k in ("told", "rungs", "metrics")})
    if args.command == "summarize":
        print(f"{out['model']}: best {out['best'] and out['best']['variant']} ({out['epochs']} epochs)")
    else:
        print(f"{out['model']} round {out['round']}: {', '.join(t['variant'] for t in out['trials'])}")


if __name__ == "__main__":
    main()

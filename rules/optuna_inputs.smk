# Input functions of the model-based search (rules/optuna.smk, which includes this file): each round's trials are
# read from its proposal (a checkpoint), each rung's entrants from the previous rung's selection (a checkpoint).
import json
import re

from snakemake.exceptions import WorkflowError

from lcnn import optuna_search  # noqa: E402

try:
    optuna_search.check_space(config)
except LcnnError as err:
    raise WorkflowError(f"lcnn config error: {err}") from None

OPTUNA = study.search_mode(config) == "optuna"
# trials per round, and the epochs at the end of each rung every trial goes through (the last: baseline.epochs)
OPTUNA_ROUNDS = optuna_search.rounds(config) if OPTUNA else []
OPTUNA_SCHEDULE = optuna_search.schedule(config) if OPTUNA else []
OPTUNA_DIR = "search/{model}/optuna"
TRIAL_DIR = "runs_optuna/{model}/{trial}/seed{seed}/rung{rung}"


def trial_file(model, trial, seed, rung, name):
    return f"{TRIAL_DIR}/{name}".format(model=model, trial=trial, seed=seed, rung=rung)


def optuna_settings(model, **extra):
    """What lcnn.optuna_search needs (a params value: editing the space or the seed re-decides)."""
    search = config["search"]
    keys = ("space", "sampler_seed", "startup_trials", "trials_per_round", "confidence")
    settings = {k: search[k] for k in keys} | {"model": model, "seeds": SEEDS}
    settings["schedule"] = OPTUNA_SCHEDULE
    settings["journal"] = f"{OPTUNA_DIR.format(model=model)}/journal.log"
    return json.dumps(settings | extra, sort_keys=True)


def proposal(model, rnd):
    """Round ``rnd``'s proposal (a checkpoint: asking before it exists defers the caller)."""
    path = checkpoints.propose_round.get(model=model, round=rnd).output[0]
    with open(path) as fh:
        return json.load(fh)


def trial_round(trial):
    return int(re.match(r"optuna_r(\d+)_t", trial).group(1))


def trial_rung_selection(model, rnd, rung):
    path = checkpoints.select_trial_rung.get(model=model, round=rnd, rung=rung).output[
        0
    ]
    with open(path) as fh:
        return json.load(fh)


def trial_entrants(model, rnd, rung):
    """Trials of round ``rnd`` that train in ``rung``: all of them, then each selection's survivors."""
    if rung == 1:
        return [t["variant"] for t in proposal(model, rnd)["trials"]]
    return trial_rung_selection(model, rnd, rung - 1)["next"]


def get_told_before(wildcards):
    """propose_round: every earlier round's told results (the journal is rebuilt from them if it is gone)."""
    rnd = int(wildcards.round)
    if not 1 <= rnd <= len(OPTUNA_ROUNDS):
        raise WorkflowError(
            f"optuna round {rnd} does not exist: search.trials gives rounds 1..{len(OPTUNA_ROUNDS)}"
        )
    return [
        f"{OPTUNA_DIR}/told{r}.json".format(model=wildcards.model)
        for r in range(1, rnd)
    ]


def get_propose_json(wildcards):
    rnd = int(wildcards.round)
    return optuna_settings(wildcards.model, round=rnd, size=OPTUNA_ROUNDS[rnd - 1])


def get_trial_inputs(wildcards):
    """Data, the proposal that made this trial, and for a later rung the selection that let it through."""
    rnd, rung = trial_round(wildcards.trial), int(wildcards.rung)
    if not 1 <= rung <= len(OPTUNA_SCHEDULE):
        raise WorkflowError(
            f"rung {rung} does not exist: trials have rungs 1..{len(OPTUNA_SCHEDULE)}"
        )
    if wildcards.trial not in trial_entrants(wildcards.model, rnd, rung):
        raise WorkflowError(
            f"{wildcards.model}/{wildcards.trial} does not train in rung {rung}"
        )
    inputs = {
        # ancient, with params.data: as in rule train
        "train": MANIFESTS["train"],
        "val": MANIFESTS["val"],
        # ancient, as in halving (rules/search_inputs.smk): a re-proposed round asks the same trials, and a trial's
        # sampled values are its params
        "proposal": ancient(
            f"{OPTUNA_DIR}/round{rnd}.json".format(model=wildcards.model)
        ),
    }
    if rung > 1:
        inputs["selection"] = ancient(
            f"{OPTUNA_DIR}/round{rnd}_rung{rung - 1}.json".format(model=wildcards.model)
        )
        inputs["previous"] = trial_file(
            wildcards.model, wildcards.trial, wildcards.seed, rung - 1, "metrics.json"
        )
    return inputs


def get_trial_run_json(wildcards):
    """A trial's recipe at one rung: its sampled hyperparameters (read from the proposal) on the baseline."""
    rnd, rung = trial_round(wildcards.trial), int(wildcards.rung)
    params = {
        t["variant"]: t["params"] for t in proposal(wildcards.model, rnd)["trials"]
    }
    run = optuna_search.trial_recipe(
        config,
        wildcards.model,
        wildcards.trial,
        int(wildcards.seed),
        params[wildcards.trial],
    )
    run["stop_epoch"] = OPTUNA_SCHEDULE[rung - 1]
    run["handoff_dir"] = trial_file(
        wildcards.model, wildcards.trial, wildcards.seed, rung, "state"
    )
    if rung > 1:
        run["init_state"] = trial_file(
            wildcards.model, wildcards.trial, wildcards.seed, rung - 1, "state"
        )
    return json.dumps(run, sort_keys=True)


def get_trial_rung_metrics(wildcards):
    """select_trial_rung: the metrics of every trial of the round that trained in this rung."""
    rnd, rung = int(wildcards.round), int(wildcards.rung)
    if not 1 <= rung < len(OPTUNA_SCHEDULE):
        raise WorkflowError(f"no selection after rung {rung} of an optuna round")
    return [
        trial_file(wildcards.model, t, s, rung, "metrics.json")
        for t in trial_entrants(wildcards.model, rnd, rung)
        for s in SEEDS
    ]


def get_trial_previous_selection(wildcards):
    rung = int(wildcards.rung)
    path = f"{OPTUNA_DIR}/round{{round}}_rung{rung - 1}.json"
    return (
        [path.format(model=wildcards.model, round=wildcards.round)] if rung > 1 else []
    )


def get_trial_select_json(wildcards):
    """The halving settings of one round's rung selection, handed to lcnn.search."""
    rung = int(wildcards.rung)
    trials = trial_entrants(wildcards.model, int(wildcards.round), 1)
    search = {
        "model": wildcards.model,
        "eta": config["search"]["eta"],
        "promote": config["search"]["promote"],
        "confidence": config["search"]["confidence"],
        "budget": config["baseline"]["epochs"],
        "schedule": OPTUNA_SCHEDULE,
        "seeds": SEEDS,
        "candidates": trials,
        "pinned": [],
        "keep_checkpoint": config["train"]["keep_checkpoint"],
        "rung": rung,
        "epochs": OPTUNA_SCHEDULE[rung - 1],
    }
    return json.dumps(search, sort_keys=True)


def get_tell_rungs(wildcards):
    """tell_round: every rung selection of the round."""
    base = OPTUNA_DIR.format(model=wildcards.model)
    return [
        f"{base}/round{wildcards.round}_rung{k}.json"
        for k in range(1, len(OPTUNA_SCHEDULE))
    ]


def get_tell_metrics(wildcards):
    """tell_round: the last-rung metrics of the round's finalists, every seed."""
    rnd, last = int(wildcards.round), len(OPTUNA_SCHEDULE)
    return [
        trial_file(wildcards.model, t, s, last, "metrics.json")
        for t in trial_entrants(wildcards.model, rnd, last)
        for s in SEEDS
    ]


def optuna_summary_files(wildcards=None):
    return [f"search/{m}/optuna.json" for m in MODELS] if OPTUNA else []

# Input functions of successive halving (rules/search.smk, which includes this file): which variants train in each
# rung, read from the previous rung's selection (a checkpoint), and the settings handed to lcnn.search.
import json

from snakemake.exceptions import WorkflowError


def rung_file(model, variant, seed, rung, name):
    return f"{RUNG_DIR}/{name}".format(
        model=model, variant=variant, seed=seed, rung=rung
    )


def rung_selection(model, rung):
    """The selection after ``rung`` (a checkpoint: asking for it before it exists defers the caller)."""
    path = checkpoints.select_rung.get(model=model, rung=rung).output[0]
    with open(path) as fh:
        return json.load(fh)


def rung_entrants(model, rung):
    """Variants that train in ``rung``: every candidate in rung 1, then the previous selection's survivors
    and references."""
    if rung == 1:
        return list(VARIANTS)
    return rung_selection(model, rung - 1)["next"]


def finalists(model):
    return rung_entrants(model, len(SCHEDULE))


def _check_rung(wildcards, last):
    rung = int(wildcards.rung)
    if not 1 <= rung <= last:
        raise WorkflowError(f"rung {rung} does not exist: search has rungs 1..{last}")
    if rung == 1 and wildcards.variant not in VARIANTS:
        raise WorkflowError(
            f"{wildcards.variant} is not a candidate: select.variants leaves it out"
        )
    if wildcards.variant not in rung_entrants(wildcards.model, rung):
        selection = f"search/{wildcards.model}/rung{rung - 1}.json"
        why = "was eliminated"
        if (
            wildcards.variant
            in rung_selection(wildcards.model, rung - 1)["dropped_references"]
        ):
            why = "diverged, so it has no run at the full budget to report or benchmark"
        raise WorkflowError(
            f"{wildcards.model}/{wildcards.variant} does not train in rung {rung}: it {why} (see {selection})"
        )
    return rung


def get_rung_inputs(wildcards):
    """Data, and for a later rung the selection that let this variant through plus the run it goes on from."""
    rung = _check_rung(wildcards, len(SCHEDULE))
    inputs = {
        # ancient, with params.data: as in rule train
        "train": MANIFESTS["train"],
        "val": MANIFESTS["val"],
    }
    if rung > 1:
        # ancient: a rerun selection (a setting that decides nothing changed) retrains no run it keeps; one it
        # drops is no longer asked for, and the run's recipe is its params
        inputs["selection"] = ancient(f"search/{wildcards.model}/rung{rung - 1}.json")
        inputs["previous"] = rung_file(
            wildcards.model, wildcards.variant, wildcards.seed, rung - 1, "metrics.json"
        )
    return inputs


def get_rung_run_json(wildcards):
    """The run config of one rung: the run's own config, the rung's stopping epoch, and where to go on from.

    The schedule is built for the full budget in every rung, so rung after rung equals one continuous run.
    """
    rung = int(wildcards.rung)
    run = study.run_recipe(
        config, wildcards.model, wildcards.variant, int(wildcards.seed)
    )
    run["stop_epoch"] = SCHEDULE[rung - 1]
    # a rung that stops before the budget leaves its state in state/: the next rung goes on from there, and a
    # rerun of this rung starts again from the previous rung instead of from its own finished state
    run["handoff_dir"] = rung_file(
        wildcards.model, wildcards.variant, wildcards.seed, rung, "state"
    )
    if rung > 1:
        run["init_state"] = rung_file(
            wildcards.model, wildcards.variant, wildcards.seed, rung - 1, "state"
        )
    return json.dumps(run, sort_keys=True)


def get_rung_metrics(wildcards):
    """select_rung: the metrics of every run that trained in this rung."""
    rung = int(wildcards.rung)
    if not 1 <= rung < len(SCHEDULE):
        raise WorkflowError(
            f"no selection after rung {rung}: selections follow rungs 1..{len(SCHEDULE) - 1}"
        )
    return [
        rung_file(wildcards.model, v, s, rung, "metrics.json")
        for v in rung_entrants(wildcards.model, rung)
        for s in SEEDS
    ]


def get_previous_selection(wildcards):
    rung = int(wildcards.rung)
    return [f"search/{wildcards.model}/rung{rung - 1}.json"] if rung > 1 else []


def search_json(model, rung=None):
    """Settings handed to lcnn.search (a params value, so editing them reruns the selection)."""
    search = {
        "model": model,
        "eta": config["search"]["eta"],
        "promote": config["search"]["promote"],
        "confidence": config["search"]["confidence"],
        "budget": config["baseline"]["epochs"],
        "schedule": SCHEDULE,
        "seeds": SEEDS,
        "candidates": VARIANTS,
        "pinned": study.pinned_variants(config),
        "keep_checkpoint": config["train"]["keep_checkpoint"],
    }
    if rung is not None:
        search |= {"rung": int(rung), "epochs": SCHEDULE[int(rung) - 1]}
    return json.dumps(search, sort_keys=True)


def get_halving_seed_metrics(wildcards):
    """collect_halving: the last rung's metrics of one variant, one per seed."""
    last = len(SCHEDULE)
    if wildcards.variant not in finalists(wildcards.model):
        raise WorkflowError(
            f"{wildcards.model}/{wildcards.variant} did not reach the full budget in the halving search "
            f"(see search/{wildcards.model}/); only the finalists have results"
        )
    return [
        rung_file(wildcards.model, wildcards.variant, s, last, "metrics.json")
        for s in SEEDS
    ]


def get_final_metrics(wildcards):
    """summarize_halving: the last rung's metrics of every finalist and seed."""
    last = len(SCHEDULE)
    return [
        rung_file(wildcards.model, v, s, last, "metrics.json")
        for v in finalists(wildcards.model)
        for s in SEEDS
    ]


def get_final_results(wildcards):
    """summarize_halving: the finalists' results files, so that the default target builds them too."""
    return [
        HALVING_RESULT.format(model=wildcards.model, variant=v)
        for v in finalists(wildcards.model)
    ]

# Validation of the config, the table of runs, and every input function the rules use.
import json
import os
import re
import sys

import pandas as pd
from snakemake.exceptions import WorkflowError

sys.path.insert(
    0, workflow.basedir
)  # `lcnn` imports even where the package is not pip-installed

# every job imports lcnn from this checkout too, whatever its working directory or software environment
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != workflow.basedir:
    os.environ["PYTHONPATH"] = os.pathsep.join(
        filter(None, [workflow.basedir, os.environ.get("PYTHONPATH")])
    )

from lcnn import config as study  # noqa: E402
from lcnn.data import check_paths  # noqa: E402
from lcnn.utils import LcnnError  # noqa: E402

try:
    study.validate(config)
    study.check_models(config)
    check_paths(config["data"])
except LcnnError as err:
    raise WorkflowError(f"lcnn config error: {err}") from None

# One row per training job: model x variant x seed. Targets, wildcards and `rule all` come from it.
RUNS = pd.DataFrame(study.runs(config))
MODELS = study.selected_models(config)
VARIANTS = study.variant_names(config)
SEEDS = config["seeds"]
DATA = config["data"]["root"]
RUN_DIR = "runs/{model}/{variant}/seed{seed}"
# search.mode halving (rules/search.smk): rung r of a run lives in RUNG_DIR; its selection in search/{model}/
HALVING = study.search_mode(config) == "halving"
# epochs reached at the end of each rung; the last is baseline.epochs
SCHEDULE = study.rung_schedule(config)
RUNG_DIR = "runs_halving/{model}/{variant}/seed{seed}/rung{rung}"
HALVING_RESULT = "results/halving/{model}/{variant}.json"
# what a training job asks for (rules train and train_rung); profiles/slurm maps them onto partitions and GPUs
TRAIN_THREADS = max(1, config["train"]["num_workers"])
TRAIN_NPROC = config["train"][
    "gpus_per_job"
]  # one training process per GPU, all on one node
TRAIN_RESOURCES = dict(
    gpu=TRAIN_NPROC,
    nodes=1,  # a job's GPUs are never split across nodes
    cpus_per_gpu=config["train"]["num_workers"] + 1,
    mem_mb=32000,
    # a time limit that grows with each retry; a preempted job resumes from its saved state
    runtime=lambda wildcards, attempt: 720 * attempt,
)
# How every training job runs (log_every, num_workers, device, data root, ...): handed to the trainer on its command
# line, not as params, so editing it never retrains anything; each job's recipe is its params (get_run_json).
TRAIN_EXEC = json.dumps(study.run_execution(config), sort_keys=True)
# rules train and train_rung: exec the launcher, so on SLURM's SIGTERM (profiles/slurm: 120 s before the time limit,
# or a preemption) Snakemake's job process waits while the trainer saves its state and exits 75 for the retry
TRAIN_SHELL = (
    "export OMP_NUM_THREADS={threads};"
    " exec python -m lcnn.launch --nproc {TRAIN_NPROC} -- --run-json {params.run:q} --exec-json {TRAIN_EXEC:q}"
    " --out-dir {params.out_dir:q} > {log:q} 2>&1"
)


wildcard_constraints:
    model="|".join(map(re.escape, config["models"])),
    variant="|".join(map(re.escape, study.all_variants(config))),
    seed=r"\d+",
    rung=r"\d+",


def result_files(wildcards=None):
    """What the report reads: every grid result, or (halving) the results of the runs that reached the budget."""
    if HALVING:
        return [
            HALVING_RESULT.format(model=m, variant=v)
            for m in MODELS
            for v in finalists(m)
        ]
    pairs = RUNS[["model", "variant"]].drop_duplicates()
    return [f"results/{m}/{v}.json" for m, v in pairs.itertuples(index=False)]


def history_files(wildcards=None):
    if HALVING:  # the last rung's history holds every epoch since the first rung
        return [
            rung_file(m, v, s, len(SCHEDULE), "history.csv")
            for m in MODELS
            for v in finalists(m)
            for s in SEEDS
        ]
    return [
        f"runs/{r.model}/{r.variant}/seed{r.seed}/history.csv"
        for r in RUNS.itertuples()
    ]


def benchmark_files(wildcards=None):
    return [f"benchmarks/{m}.json" for m in MODELS]


def search_summary_files(wildcards=None):
    return [f"search/{m}/halving.json" for m in MODELS] if HALVING else []


def get_final_outputs():
    """The default target's inputs: grid results, or (halving) each model's search summary, which reaches the
    results through the rung selections; then benchmarks and the report. Reads no checkpoint: runs at parse time.
    """
    results = search_summary_files() if HALVING else result_files()
    return results + benchmark_files() + list(rules.report.output)


def get_seed_metrics(wildcards):
    return [
        f"runs/{wildcards.model}/{wildcards.variant}/seed{s}/metrics.json"
        for s in SEEDS
    ]


def get_run_json(wildcards):
    """The run's recipe handed to lcnn.train: a params value, so editing what changes its weights reruns it."""
    run = study.run_recipe(
        config, wildcards.model, wildcards.variant, int(wildcards.seed)
    )
    return json.dumps(run, sort_keys=True)


def get_benchmark_run(wildcards):
    """The run whose weights are benchmarked: benchmark.variant, first seed.

    Halving always carries benchmark.variant to the full budget, so its last rung is known without reading a
    selection (the benchmark rule's named inputs must not wait on a checkpoint).
    """
    variant = config["benchmark"]["variant"]
    run_dir = RUN_DIR.format(model=wildcards.model, variant=variant, seed=SEEDS[0])
    if HALVING:
        run_dir = RUNG_DIR.format(
            model=wildcards.model, variant=variant, seed=SEEDS[0], rung=len(SCHEDULE)
        )
    return {
        "weights": f"{run_dir}/model.safetensors",
        "run_config": f"{run_dir}/config.json",
    }


# ------------------------------------------------------------------ successive halving (search.mode: halving)
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
        "train": rules.prepare_data.output.train,
        "val": rules.prepare_data.output.val,
    }
    if rung > 1:
        inputs["selection"] = f"search/{wildcards.model}/rung{rung - 1}.json"
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


def report_search_files(wildcards, input):
    """Halving summaries for the report: this run's (halving), or a finished halving's found on disk (grid)."""
    if HALVING:
        return list(input.search)
    return [
        f for f in (f"search/{m}/halving.json" for m in MODELS) if os.path.exists(f)
    ]


def report_grid_results(wildcards):
    """Grid results to set the halving against: read when a grid study already finished here, never built."""
    if not HALVING:
        return []
    files = [f"results/{m}/{v}.json" for m in MODELS for v in VARIANTS]
    return [f for f in files if os.path.exists(f)]

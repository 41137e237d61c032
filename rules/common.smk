# Validation of the config, the table of runs, and the input functions shared by several stages (halving's and the
# report's own live in rules/search_inputs.smk and rules/report_inputs.smk).
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
_pythonpath = [
    workflow.basedir,
    *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep)),
]
os.environ.update(
    PYTHONPATH=os.pathsep.join(dict.fromkeys(_pythonpath))
)  # set, not required: no envvars

from lcnn import config as study  # noqa: E402
from lcnn import owner  # noqa: E402
from lcnn.prepare import check_paths  # noqa: E402
from lcnn.utils import LcnnError  # noqa: E402

# parsing imports neither torch nor timm: every SLURM job re-parses this file
try:
    study.validate(config)
    if (
        workflow.is_main_process
    ):  # a job's re-parse skips these: the main process checked before submitting (and a GPU node may not mount
        # the raw ImageNet folders that only the data step reads)
        study.check_models(config, cache_dir=".snakemake/lcnn")
        check_paths(config["data"])
except LcnnError as err:
    raise WorkflowError(f"lcnn config error: {err}") from None


onstart:
    # the main Snakemake, about to submit to SLURM (not a dry run, not a job): an earlier Snakemake's jobs that still
    # wait or run would be submitted again, and a twin that starts after its first has finished retrains the run
    if getattr(workflow.executor_plugin, "name", None) == "slurm":
        try:
            owner.check_no_study_jobs(workflow.workdir_init)
        except LcnnError as err:
            raise WorkflowError(f"lcnn: {err}") from None


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
# what a training job asks for (rules train, train_rung and train_trial); profiles/slurm maps them onto partitions
# and GPUs
TRAIN_THREADS = max(1, config["train"]["num_workers"])
TRAIN_NPROC = config["train"][
    "gpus_per_job"
]  # one training process per GPU, all on one node
TRAIN_RESOURCES = dict(
    gpu=TRAIN_NPROC,
    nodes=1,  # a job's GPUs are never split across nodes
    cpus_per_gpu=config["train"]["num_workers"] + 1,
    mem_mb=32000,
    # a time limit that grows on the first retry (profiles/slurm caps it under the partition's MaxTime the same
    # way); a preempted or timed-out job resumes from its saved state
    runtime=lambda wildcards, attempt: min(720 * attempt, 1440),
)
# rules train, train_rung and train_trial: exec the launcher, so on SLURM's SIGTERM (profiles/slurm: 120 s before
# the time limit, or a preemption) Snakemake's job process waits while the trainer saves its state and exits 75 for
# the retry
TRAIN_SHELL = (
    "export OMP_NUM_THREADS={threads};"
    " exec python -m lcnn.launch --nproc {params.nproc} -- --run-json {params.run:q} --exec-json {params.exec:q}"
    " --out-dir {params.out_dir:q} > {log:q} 2>&1"
)


wildcard_constraints:
    model="|".join(map(re.escape, config["models"])),
    variant="|".join(map(re.escape, study.all_variants(config))),
    seed=r"\d+",
    rung=r"\d+",


def benchmark_files(wildcards=None):
    return [f"benchmarks/{m}.json" for m in MODELS]


def get_final_outputs():
    """The default target's inputs: grid results, or (halving) each model's search summary, which reaches the
    results through the rung selections; then benchmarks and the report. Reads no checkpoint: runs at parse time.
    result_files and search_summary_files live in rules/report_inputs.smk: `rule all` calls this after every include.
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


def get_variant_recipe_json(wildcards):
    """A variant's recipe without the seed: collect_seeds checks every seed's config.json against it."""
    run = study.run_recipe(config, wildcards.model, wildcards.variant, 0)
    return json.dumps({k: v for k, v in run.items() if k != "seed"}, sort_keys=True)


def get_exec_json(wildcards, input):
    """How every training job runs (log_every, num_workers, device, ...) and where its data is (its input's folder).

    Snakemake counts a params function of the job's input as derived from it, not among the params whose edits
    trigger a rerun: editing these settings never retrains anything, and moving the data shows up as an input change.
    """
    execution = study.run_execution(config)
    execution["data_root"] = os.path.dirname(input.train)
    return json.dumps(execution, sort_keys=True)


def get_benchmark_run(wildcards):
    """The run whose weights are benchmarked (benchmark.variant, first seed), with its metrics: a run that diverged
    is recorded as such by the benchmark, not timed.

    Halving: the last rung that run trained in. Reading the selections defers the benchmark until they exist, and
    a pinned variant that diverged in an early rung ends there, so only this model's benchmark says so.
    """
    variant = config["benchmark"]["variant"]
    run_dir = RUN_DIR.format(model=wildcards.model, variant=variant, seed=SEEDS[0])
    if HALVING:
        rung = 1
        while rung < len(SCHEDULE) and variant in rung_entrants(
            wildcards.model, rung + 1
        ):
            rung += 1
        run_dir = RUNG_DIR.format(
            model=wildcards.model, variant=variant, seed=SEEDS[0], rung=rung
        )
    return {
        "weights": f"{run_dir}/model.safetensors",
        "run_config": f"{run_dir}/config.json",
        "metrics": f"{run_dir}/metrics.json",
    }


def benchmark_input(name):
    """One named input of the benchmark rule: a named function each, since unpack() of a function that waits on a
    checkpoint leaves the names undefined until then (and a dry run formats the shell command before that).
    """
    return lambda wildcards: get_benchmark_run(wildcards)[name]

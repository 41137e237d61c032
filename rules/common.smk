# Validation of the config, the table of runs, and every input function the rules use.
import json
import sys

import pandas as pd
from snakemake.exceptions import WorkflowError

sys.path.insert(
    0, workflow.basedir
)  # `lcnn` imports even where the package is not pip-installed

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


wildcard_constraints:
    model="|".join(config["models"]),
    variant="|".join(study.all_variants(config)),
    seed=r"\d+",


def result_files(wildcards=None):
    pairs = RUNS[["model", "variant"]].drop_duplicates()
    return [f"results/{m}/{v}.json" for m, v in pairs.itertuples(index=False)]


def history_files(wildcards=None):
    return [
        f"runs/{r.model}/{r.variant}/seed{r.seed}/history.csv"
        for r in RUNS.itertuples()
    ]


def benchmark_files(wildcards=None):
    return [f"benchmarks/{m}.json" for m in MODELS]


def get_final_outputs():
    return result_files() + benchmark_files() + list(rules.report.output)


def get_seed_metrics(wildcards):
    return [
        f"runs/{wildcards.model}/{wildcards.variant}/seed{s}/metrics.json"
        for s in SEEDS
    ]


def get_run_json(wildcards):
    """The resolved run config handed to lcnn.train (a params value, so edits to it trigger reruns)."""
    run = study.run_config(
        config, wildcards.model, wildcards.variant, int(wildcards.seed)
    )
    return json.dumps(run, sort_keys=True)


def get_train_launcher(wildcards):
    """Plain python on one device; `accelerate launch` across the GPUs of a multi-GPU job."""
    gpus = config["train"]["gpus_per_job"]
    if gpus <= 1:
        return "python"
    return (
        f"accelerate launch --num_processes {gpus} --num_machines 1 "
        f"--mixed_precision {config['train']['precision']} --dynamo_backend no"
    )


def get_benchmark_run(wildcards):
    """The run whose weights are benchmarked: benchmark.variant, first seed."""
    run_dir = RUN_DIR.format(
        model=wildcards.model, variant=config["benchmark"]["variant"], seed=SEEDS[0]
    )
    return {
        "weights": f"{run_dir}/model.safetensors",
        "run_config": f"{run_dir}/config.json",
    }

# lcnn: a hyperparameter study of seven lightweight timm classifiers, from data to deployment benchmark.
#   snakemake --profile profiles/slurm      the real study on a SLURM GPU cluster
#   snakemake --profile profiles/demo       the same study, scaled down, on built-in data on the CPU
#   snakemake report                        everything up to the report tables and figures
#   --config search='{"mode": "halving"}'   successive halving over the variants instead of the full grid
import os

from snakemake.utils import min_version

min_version("9.0")


# the working directory's config.yaml, else the checkout's (`snakemake -s <checkout>/Snakefile --directory <dir>`)
configfile: "config.yaml" if os.path.exists("config.yaml") else f"{workflow.basedir}/config.yaml"


report: "report/workflow.rst"


include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/search.smk"
include: "rules/optuna.smk"
include: "rules/benchmark.smk"
include: "rules/report.smk"


rule all:
    default_target: True
    input:
        get_final_outputs(),

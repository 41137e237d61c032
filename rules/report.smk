# Report stage: every result, history and benchmark -> tables, figures and the claims check under results/report/.
# `snakemake report` builds the whole study up to here; `snakemake --report report.html` then packs the
# HTML tables and PNG figures wrapped in report() below into one self-contained page.
import json
import os

# common.smk (included first) puts the repository on sys.path, so lcnn imports here
from lcnn.report import TABLES as REPORT_TABLES

REPORT_DIR = "results/report"


# what the report reads: rules/report_inputs.smk
include: "report_inputs.smk"


# Every file the report reads is a declared input, so Snakemake builds it, tracks it, and reruns the report when
# it changes; nothing is read because it happens to exist. A grid study and a halving search in one folder are set
# against each other only with report.halving_vs_grid (halving mode): that declares every candidate's grid result
# too, so the grid is trained when it is not there yet, and the halving table measures it instead of estimating.
rule report:
    input:
        results=result_files,
        histories=history_files,
        benchmarks=benchmark_files,
        search=search_summary_files,
        grid=report_grid_results,
    output:
        claims=report(
            f"{REPORT_DIR}/claims.html",
            caption="../report/claims.rst",
            category="Claims",
            labels={"table": "claims"},
        ),
        accuracy=report(
            f"{REPORT_DIR}/accuracy.html",
            caption="../report/accuracy.rst",
            category="Tables",
            labels={"table": "accuracy"},
        ),
        gains=report(
            f"{REPORT_DIR}/gains.html",
            caption="../report/gains.rst",
            category="Tables",
            labels={"table": "gains"},
        ),
        best_variants=report(
            f"{REPORT_DIR}/best_variants.html",
            caption="../report/best_variants.rst",
            category="Tables",
            labels={"table": "best_variants"},
        ),
        best_per_axis=report(
            f"{REPORT_DIR}/best_per_axis.html",
            caption="../report/best_per_axis.rst",
            category="Tables",
            labels={"table": "best_per_axis"},
        ),
        runs=report(
            f"{REPORT_DIR}/runs.html",
            caption="../report/runs.rst",
            category="Tables",
            labels={"table": "runs"},
        ),
        compute=report(
            f"{REPORT_DIR}/compute.html",
            caption="../report/compute.rst",
            category="Tables",
            labels={"table": "compute"},
        ),
        latency=report(
            f"{REPORT_DIR}/latency.html",
            caption="../report/latency.rst",
            category="Tables",
            labels={"table": "latency"},
        ),
        models=report(
            f"{REPORT_DIR}/models.html",
            caption="../report/models.rst",
            category="Tables",
            labels={"table": "models"},
        ),
        halving=report(
            f"{REPORT_DIR}/halving.html",
            caption="../report/halving.rst",
            category="Tables",
            labels={"table": "halving"},
        ),
        pareto=report(
            f"{REPORT_DIR}/pareto.png",
            caption="../report/pareto.rst",
            category="Figures",
            labels={"figure": "pareto"},
        ),
        gain_heatmap=report(
            f"{REPORT_DIR}/gain_heatmap.png",
            caption="../report/gain_heatmap.rst",
            category="Figures",
            labels={"figure": "gain_heatmap"},
        ),
        learning_curves=report(
            f"{REPORT_DIR}/learning_curves.png",
            caption="../report/learning_curves.rst",
            category="Figures",
            labels={"figure": "learning_curves"},
        ),
        throughput_vs_batch=report(
            f"{REPORT_DIR}/throughput_vs_batch.png",
            caption="../report/throughput_vs_batch.rst",
            category="Figures",
            labels={"figure": "throughput_vs_batch"},
        ),
        tables=expand(
            f"{REPORT_DIR}/{{name}}.{{fmt}}",
            name=REPORT_TABLES,
            fmt=["md", "csv", "tex"],
        ),
        markdown=f"{REPORT_DIR}/report.md",
        summary=f"{REPORT_DIR}/summary.json",
    log:
        "logs/report/report.log",
    conda:
        "../envs/lcnn.yaml"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
    params:
        # the report section travels as one quoted JSON argument: no temp file, no unquoted config strings
        cfg=json.dumps(
            {
                "report": config["report"],
                "baseline_variant": "baseline",
                "search_mode": config["search"]["mode"],
            },
            sort_keys=True,  # reordered config keys are the same settings: no rerun
        ),
        out_dir=lambda wildcards, output: os.path.dirname(output.summary),
    shell:
        "python -m lcnn.report --config-json {params.cfg:q}"
        " --results {input.results:q} --histories {input.histories:q}"
        " --benchmarks {input.benchmarks:q} --search {input.search:q} --grid-results {input.grid:q}"
        " --out-dir {params.out_dir:q} > {log:q} 2>&1"

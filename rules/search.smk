# Successive halving (search.mode: halving), per model: every candidate trains to the first rung's epochs; the
# checkpoint select_rung keeps the best ceil(n/eta) (the baseline always goes on as the reference); those go on
# from their saved state to the next rung, and so on until the last rung's survivors reach baseline.epochs.
# Each rung's runs are ordinary jobs (on SLURM: ordinary training jobs), and the DAG grows as selections finish:
# `snakemake -n` lists what is known so far, and a rerun after an interruption redoes nothing that finished.
#
# The state a rung hands to the next (rung{r}/state/train_state/) is deliberately not a declared output:
# Snakemake deletes a failed job's outputs, which would throw away the state a preempted rung saved to resume
# from, and a declared file that is cleaned up after the study would make Snakemake retrain to rebuild it.


# the input functions of these rules: rules/search_inputs.smk (snakemake --lint keeps rules and functions apart)
include: "search_inputs.smk"


localrules:
    select_rung,
    collect_halving,
    summarize_halving,


rule train_rung:
    input:
        unpack(get_rung_inputs),
    output:
        weights=f"{RUNG_DIR}/model.safetensors",
        history=f"{RUNG_DIR}/history.csv",
        config=f"{RUNG_DIR}/config.json",
        env=f"{RUNG_DIR}/env.json",
        metrics=f"{RUNG_DIR}/metrics.json",
    log:
        "logs/train_rung/{model}/{variant}/seed{seed}/rung{rung}.log",
    conda:
        "../envs/lcnn.yaml"
    # the same as rule train: a rung job is a training job
    threads: TRAIN_THREADS
    resources:
        **TRAIN_RESOURCES,
    params:
        run=get_rung_run_json,
        exec=get_exec_json,
        data=DATA_DEFINITION,  # with the ancient manifests (get_rung_inputs): as in rule train
        nproc=TRAIN_NPROC,
        out_dir=RUNG_DIR,
    shell:
        TRAIN_SHELL


checkpoint select_rung:
    input:
        metrics=get_rung_metrics,
        previous=get_previous_selection,
    output:
        "search/{model}/rung{rung}.json",
    log:
        "logs/search/{model}/rung{rung}.log",
    conda:
        "../envs/lcnn.yaml"
    params:
        search=lambda wildcards: search_json(wildcards.model, wildcards.rung),
    shell:
        "python -m lcnn.search select {input.metrics:q} --config-json {params.search:q}"
        " --previous {input.previous:q} --out {output:q} > {log:q} 2>&1"


rule collect_halving:
    input:
        get_halving_seed_metrics,
    output:
        HALVING_RESULT,
    log:
        "logs/results_halving/{model}/{variant}.log",
    conda:
        "../envs/lcnn.yaml"
    params:
        recipe=get_variant_recipe_json,  # as in collect_seeds: every seed's last rung trained this recipe
    shell:
        "python -m lcnn.results --out {output:q} --recipe-json {params.recipe:q} {input:q} > {log:q} 2>&1"


rule summarize_halving:
    input:
        rungs=lambda wildcards: [
            f"search/{wildcards.model}/rung{r}.json" for r in range(1, len(SCHEDULE))
        ],
        metrics=get_final_metrics,
        results=get_final_results,
    output:
        "search/{model}/halving.json",
    log:
        "logs/search/{model}/halving.log",
    conda:
        "../envs/lcnn.yaml"
    params:
        search=lambda wildcards: search_json(wildcards.model),
    shell:
        "python -m lcnn.search summarize {input.metrics:q} --config-json {params.search:q}"
        " --rungs {input.rungs:q} --out {output:q} > {log:q} 2>&1"

# Model-based search (search.mode: optuna), per model and round: the checkpoint propose_round asks Optuna's seeded
# TPE sampler for the round's trials (ordinary path-safe variants, their hyperparameters in the proposal); each
# trial trains through the rungs as an ordinary training job (successive halving inside the round, as in BOHB);
# tell_round gives Optuna the results, and the next round's proposal waits for it. The study is one Optuna journal
# file per model (search/{model}/optuna/journal.log, `optuna-dashboard` opens it), written only by these local
# rules, one at a time per model: no database server, no concurrent writers. The decision files are the record: a
# rerun re-emits the trials of a round already proposed, and rebuilds a missing journal from the told rounds.


# the input functions of these rules: rules/optuna_inputs.smk (snakemake --lint keeps rules and functions apart)
include: "optuna_inputs.smk"


localrules:
    propose_round,
    select_trial_rung,
    tell_round,
    summarize_optuna,


checkpoint propose_round:
    input:
        told=get_told_before,
    output:
        f"{OPTUNA_DIR}/round{{round}}.json",
    log:
        "logs/optuna/{model}/round{round}.log",
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../envs/lcnn.yaml"
    params:
        search=get_propose_json,
    shell:
        "python -m lcnn.optuna_search propose --config-json {params.search:q}"
        " --told {input.told:q} --out {output:q} > {log:q} 2>&1"


rule train_trial:
    input:
        unpack(get_trial_inputs),
    output:
        weights=f"{TRIAL_DIR}/model.safetensors",
        history=f"{TRIAL_DIR}/history.csv",
        config=f"{TRIAL_DIR}/config.json",
        env=f"{TRIAL_DIR}/env.json",
        metrics=f"{TRIAL_DIR}/metrics.json",
    log:
        "logs/train_trial/{model}/{trial}/seed{seed}/rung{rung}.log",
    wildcard_constraints:
        trial=optuna_search.TRIAL_PATTERN,
    conda:
        "../envs/lcnn.yaml"
    # the same as rule train: a trial is a training job
    threads: TRAIN_THREADS
    resources:
        **TRAIN_RESOURCES,
    params:
        run=get_trial_run_json,
        exec=get_exec_json,
        data=DATA_DEFINITION,  # with the ancient manifests (get_trial_inputs): as in rule train
        nproc=TRAIN_NPROC,
        out_dir=TRIAL_DIR,
    shell:
        TRAIN_SHELL


checkpoint select_trial_rung:
    input:
        proposal=f"{OPTUNA_DIR}/round{{round}}.json",  # the round's candidates (params)
        metrics=get_trial_rung_metrics,
        previous=get_trial_previous_selection,
    output:
        f"{OPTUNA_DIR}/round{{round}}_rung{{rung}}.json",
    log:
        "logs/optuna/{model}/round{round}_rung{rung}.log",
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../envs/lcnn.yaml"
    params:
        search=get_trial_select_json,
    shell:
        "python -m lcnn.search select {input.metrics:q} --config-json {params.search:q}"
        " --previous {input.previous:q} --out {output:q} > {log:q} 2>&1"


rule tell_round:
    input:
        told=get_told_before,  # a lost journal is rebuilt from them
        proposal=f"{OPTUNA_DIR}/round{{round}}.json",
        rungs=get_tell_rungs,
        metrics=get_tell_metrics,
    output:
        f"{OPTUNA_DIR}/told{{round}}.json",
    log:
        "logs/optuna/{model}/told{round}.log",
    wildcard_constraints:
        round=r"\d+",
    conda:
        "../envs/lcnn.yaml"
    params:
        search=lambda wildcards: optuna_settings(wildcards.model),
    shell:
        "python -m lcnn.optuna_search tell --config-json {params.search:q} --told {input.told:q}"
        " --proposal {input.proposal:q} --rungs {input.rungs:q} --metrics {input.metrics:q}"
        " --out {output:q} > {log:q} 2>&1"


rule summarize_optuna:
    input:
        told=lambda wildcards: [
            f"{OPTUNA_DIR}/told{r}.json".format(model=wildcards.model)
            for r in range(1, len(OPTUNA_ROUNDS) + 1)
        ],
    output:
        "search/{model}/optuna.json",
    log:
        "logs/optuna/{model}/summary.log",
    conda:
        "../envs/lcnn.yaml"
    params:
        search=lambda wildcards: optuna_settings(wildcards.model),
    shell:
        "python -m lcnn.optuna_search summarize --config-json {params.search:q}"
        " --told {input.told:q} --out {output:q} > {log:q} 2>&1"


rule optuna:
    input:
        optuna_summary_files,

# Training stage: one job per model x variant x seed, then one result per model x variant over its seeds.


localrules:
    collect_seeds,  # a small JSON merge: not worth a queue wait


rule train:
    input:
        # ancient (rules/data.smk): the manifests' dates retrain nothing; a changed subset (params.data) does
        train=MANIFESTS["train"],
        val=MANIFESTS["val"],
    output:
        weights=f"{RUN_DIR}/model.safetensors",
        history=f"{RUN_DIR}/history.csv",
        config=f"{RUN_DIR}/config.json",
        env=f"{RUN_DIR}/env.json",
        metrics=f"{RUN_DIR}/metrics.json",
    log:
        "logs/train/{model}/{variant}/seed{seed}.log",
    conda:
        "../envs/lcnn.yaml"
    threads: TRAIN_THREADS
    resources:
        **TRAIN_RESOURCES,
    params:
        run=get_run_json,
        exec=get_exec_json,
        data=DATA_DEFINITION,
        nproc=TRAIN_NPROC,
        out_dir=RUN_DIR,
    # the launcher (rules/common.smk): plain python on one device, torchrun across the job's GPUs
    shell:
        TRAIN_SHELL


rule collect_seeds:
    input:
        get_seed_metrics,
    output:
        "results/{model}/{variant}.json",
    log:
        "logs/results/{model}/{variant}.log",
    conda:
        "../envs/lcnn.yaml"
    params:
        recipe=get_variant_recipe_json,
    shell:
        "python -m lcnn.results --out {output:q} --recipe-json {params.recipe:q} {input:q} > {log:q} 2>&1"

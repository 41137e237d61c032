# Data stage: draw the class-balanced subset and write it, resized, with its manifests.

# what the prepared subset is, without where it lives: a params value of every rule that reads the manifests
# (train, train_rung, train_trial, benchmark). Their manifest inputs (MANIFESTS, below) are ancient(), so a touched,
# re-copied or re-prepared but identical subset reruns nothing, and a changed definition still reruns them.
DATA_DEFINITION = json.dumps(study.data_definition(config), sort_keys=True)


rule prepare_data:
    output:
        train=report(
            f"{DATA}/train.csv",
            caption="../report/manifest.rst",
            category="Data",
            labels={"manifest": "train"},
        ),
        val=report(
            f"{DATA}/val.csv",
            caption="../report/manifest.rst",
            category="Data",
            labels={"manifest": "validation"},
        ),
        classes=f"{DATA}/classes.txt",
        report=report(
            f"{DATA}/prepare_report.json",
            caption="../report/prepare_report.rst",
            category="Data",
            labels={"manifest": "counts and skipped files"},
        ),
    log:
        "logs/data/prepare_data.log",
    conda:
        "../envs/lcnn.yaml"
    threads: 4
    resources:
        runtime=240,
        mem_mb=8000,
    params:
        # what the prepared subset depends on (stage_to only says where jobs read it)
        data=json.dumps(study.data_definition(config, with_root=True), sort_keys=True),
    shell:
        "python -m lcnn.data --config-json {params.data:q} --workers {threads} > {log:q} 2>&1"


# the manifests as the training and benchmark rules take them: ancient, unless the prepared subset was drawn under
# another definition (Snakemake would then rerun prepare_data but, all their inputs from it being ancient, never
# check those rules' params: plain inputs make the changed subset retrain in the same invocation)
DATA_REDEFINED = study.data_redefined(config)
MANIFESTS = {
    name: path if DATA_REDEFINED else ancient(path)
    for name, path in rules.prepare_data.output.items()
    if name in ("train", "val")
}

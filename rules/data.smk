# Data stage: draw the class-balanced subset and write it, resized, with its manifests.


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
        data=json.dumps({k: v for k, v in config["data"].items() if k != "stage_to"}),
    shell:
        "python -m lcnn.data --config-json {params.data:q} --workers {threads} > {log:q} 2>&1"

# Data stage: draw the class-balanced subset and write it, resized, with its manifests.


rule prepare_data:
    output:
        train=f"{DATA}/train.csv",
        val=f"{DATA}/val.csv",
        classes=f"{DATA}/classes.txt",
        report=f"{DATA}/prepare_report.json",
    log:
        "logs/data/prepare_data.log",
    conda:
        "../envs/lcnn.yaml"
    threads: 4
    resources:
        runtime=240,
        mem_mb=8000,
    params:
        data=json.dumps(config["data"]),
    shell:
        "python -m lcnn.data --config-json {params.data:q} --workers {threads} > {log:q} 2>&1"

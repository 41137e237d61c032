# Benchmark stage: latency and throughput of each model's trained weights, on the benchmark partition.


rule benchmark:
    input:
        weights=benchmark_input("weights"),
        run_config=benchmark_input("run_config"),
        metrics=benchmark_input("metrics"),
        # real images for the fp16/bf16 agreement check, int8 calibration and top-1 (ancient, with params.data: as
        # in rule train)
        val=MANIFESTS["val"],
    output:
        "benchmarks/{model}.json",
    log:
        "logs/benchmark/{model}.log",
    conda:
        "../envs/lcnn.yaml"
    threads: config["benchmark"]["onnx_threads"]
    resources:
        gpu=1,
        mem_mb=32000,
        runtime=lambda wildcards, attempt: 120 * attempt,
    params:
        bench=json.dumps(config["benchmark"], sort_keys=True),
        data=DATA_DEFINITION,
        timm_name=lambda wildcards: config["models"][wildcards.model]["timm"],
    shell:
        "python -m lcnn.benchmark --model-name {wildcards.model} --timm-name {params.timm_name:q}"
        " --weights {input.weights:q} --run-config {input.run_config:q} --run-metrics {input.metrics:q}"
        " --config-json {params.bench:q} --val-manifest {input.val:q} --out {output:q} > {log:q} 2>&1"

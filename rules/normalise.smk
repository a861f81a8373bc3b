# Text-only causal-LM key layout (model.*, lm_head.*) that mergekit merges reliably.


rule normalise_base:
    input:
        unpack(get_base_inputs),
    output:
        maybe_temp(directory("results/text/{base}/_base")),
    log:
        "logs/normalise_base/{base}.log",
    benchmark:
        "benchmarks/normalise_base/{base}.tsv"
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    shell:
        "mergebake normalise --src {input.base} --out {output} > {log} 2>&1"


rule normalise_baked:
    input:
        "results/baked/{base}/{adapter}",
    output:
        maybe_temp(directory("results/text/{base}/{adapter}")),
    log:
        "logs/normalise_baked/{base}/{adapter}.log",
    benchmark:
        "benchmarks/normalise_baked/{base}/{adapter}.tsv"
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    shell:
        "mergebake normalise --src {input} --out {output} > {log} 2>&1"

# Text-only causal-LM key layout (model.*, lm_head.*) that mergekit merges reliably.


rule normalise_base:
    input:
        unpack(get_base_inputs),
    output:
        maybe_temp(directory(LAYOUT["text_base"])),
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
    params:
        cmd=get_command("normalise_base"),
    shell:
        "{params.cmd} > {log:q} 2>&1"


rule normalise_baked:
    input:
        LAYOUT["baked"],
    output:
        maybe_temp(directory(LAYOUT["text"])),
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
    params:
        cmd=get_command("normalise_baked"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

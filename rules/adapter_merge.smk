# Adapter-space cells (methods with space: adapter): PEFT's add_weighted_adapter merges the
# group's LoRA adapters into one adapter, which is baked into the base once, normalised and
# verified like every merged cell, into the same folder (results/merged/...).


rule adapter_merge:
    input:
        unpack(get_adapter_merge_inputs),
    output:
        directory(LAYOUT["merged_adapter"]),
    log:
        "logs/adapter_merge/{base}/{group}__{method}.log",
    benchmark:
        "benchmarks/adapter_merge/{base}/{group}__{method}.tsv"
    wildcard_constraints:
        method=ADAPTER_METHODS,
    priority: 50
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("adapter_merge"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"


rule bake_cell:
    input:
        base=get_base_dir,
        adapter=LAYOUT["merged_adapter"],
    output:
        maybe_temp(directory(LAYOUT["baked_cell"])),
    log:
        "logs/bake_cell/{base}/{group}__{method}.log",
    benchmark:
        "benchmarks/bake_cell/{base}/{group}__{method}.tsv"
    wildcard_constraints:
        method=ADAPTER_METHODS,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
        gpu=get_gpu,
    params:
        cmd=get_command("bake_cell"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"


rule normalise_cell:
    input:
        baked=LAYOUT["baked_cell"],
        base=LAYOUT["text_base"],
        adapter=LAYOUT["merged_adapter"],
    output:
        directory(LAYOUT["merged"]),
    log:
        "logs/normalise_cell/{base}/{group}__{method}.log",
    benchmark:
        "benchmarks/normalise_cell/{base}/{group}__{method}.tsv"
    wildcard_constraints:
        method=ADAPTER_METHODS,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("normalise_cell"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

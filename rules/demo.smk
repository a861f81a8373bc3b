# Offline demo grid: a tiny synthetic Gemma-3 family, trained LoRA adapters, lm-eval tasks.


rule demo_base:
    output:
        directory(LAYOUT["base"]),
    log:
        "logs/demo_base/{base}.log",
    benchmark:
        "benchmarks/demo_base/{base}.tsv"
    wildcard_constraints:
        base=DEMO_BASES,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("demo_base"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"


rule demo_adapter:
    input:
        base=get_base_dir,
    output:
        directory(LAYOUT["adapter"]),
    log:
        "logs/demo_adapter/{base}/{adapter}.log",
    benchmark:
        "benchmarks/demo_adapter/{base}/{adapter}.tsv"
    wildcard_constraints:
        adapter=DEMO_ADAPTERS,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("demo_adapter"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"


rule demo_tasks:
    output:
        directory(LAYOUT["demo_tasks"]),
    log:
        "logs/demo_tasks/demo_tasks.log",
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("demo_tasks"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

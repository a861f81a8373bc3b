# Offline demo grid: a tiny synthetic Gemma-3 family, trained LoRA adapters, lm-eval tasks.


rule demo_base:
    output:
        directory("resources/bases/{base}"),
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
        spec=get_demo_base,
    shell:
        "mergebake demo-base --out {output} --arch {params.spec[arch]}"
        " --layers {params.spec[layers]} --seed {params.spec[seed]}"
        " --threads {threads} > {log} 2>&1"


rule demo_adapter:
    input:
        base=get_base_dir,
    output:
        directory("resources/adapters/{base}/{adapter}"),
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
        spec=get_demo_adapter,
    shell:
        "mergebake demo-adapter --base {input.base} --out {output}"
        " --skill {params.spec[skill]} --seed {params.spec[seed]}"
        " --threads {threads} > {log} 2>&1"


rule demo_tasks:
    output:
        directory(DEMO_TASKS_DIR),
    log:
        "logs/demo_tasks/demo_tasks.log",
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    shell:
        "mergebake demo-tasks --out {output} > {log} 2>&1"

# lm-eval on every merged cell and on the baselines (base, base + single adapter).


rule eval_cell:
    input:
        model=LAYOUT["merged"],
        tasks=get_task_inputs,
    output:
        json=LAYOUT["eval_cell"],
        samples=LAYOUT["eval_cell_samples"],
    log:
        "logs/eval_cell/{base}/{group}__{method}.log",
    benchmark:
        "benchmarks/eval_cell/{base}/{group}__{method}.tsv"
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
        gpu=get_gpu,
    params:
        cmd=get_command("eval_cell"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"


rule eval_baseline:
    input:
        model=LAYOUT["baseline_model"],
        tasks=get_task_inputs,
    output:
        json=LAYOUT["eval_baseline"],
        samples=LAYOUT["eval_baseline_samples"],
    log:
        "logs/eval_baseline/{base}/{row}.log",
    benchmark:
        "benchmarks/eval_baseline/{base}/{row}.tsv"
    wildcard_constraints:
        row=BASELINE_ROWS,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
        gpu=get_gpu,
    params:
        cmd=get_command("eval_baseline"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"


# Checkpoint selection: a Snakemake checkpoint, so merges of <adapter>@best are planned
# once the choice is known, and depend on the chosen checkpoint only.
checkpoint select_checkpoint:
    input:
        get_selection_scores,
    output:
        LAYOUT["selection"],
    log:
        "logs/select_checkpoint/{base}/{adapter}.log",
    wildcard_constraints:
        adapter=SELECTED,
    localrule: True
    conda:
        ENV
    params:
        cmd=get_command("select_checkpoint"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

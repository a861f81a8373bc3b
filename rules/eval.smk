# lm-eval on every merged cell and on the baselines (base, base + single adapter).


rule eval_cell:
    input:
        model="results/merged/{base}/{group}__{method}",
        tasks=get_task_inputs,
    output:
        json="results/eval/{base}/{group}__{method}.json",
        samples="results/eval/{base}/{group}__{method}.samples.json.gz",
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
        flags=get_eval_flags,
    shell:
        "mergebake eval --model {input.model} --out {output.json} {params.flags}"
        " --threads {threads} > {log} 2>&1"


rule eval_baseline:
    input:
        model="results/text/{base}/{row}",
        tasks=get_task_inputs,
    output:
        json="results/eval/{base}/{row}.json",
        samples="results/eval/{base}/{row}.samples.json.gz",
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
        flags=get_eval_flags,
    shell:
        "mergebake eval --model {input.model} --out {output.json} {params.flags}"
        " --threads {threads} > {log} 2>&1"

# One mergekit run per cell; the output counts only once verified against the base.


rule merge:
    input:
        base=LAYOUT["text_base"],
        models=get_merge_models,
        recipe=get_recipe,
    output:
        directory(LAYOUT["merged"]),
    log:
        "logs/merge/{base}/{group}__{method}.log",
    benchmark:
        "benchmarks/merge/{base}/{group}__{method}.tsv"
    wildcard_constraints:
        method=WEIGHT_METHODS,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
        gpu=get_gpu,
    params:
        cmd=get_command("merge"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"

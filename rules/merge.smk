# One mergekit run per cell; the output counts only once verified against the base.


rule merge:
    input:
        base="results/text/{base}/_base",
        models=get_merge_models,
        recipe=get_recipe,
    output:
        directory("results/merged/{base}/{group}__{method}"),
    log:
        "logs/merge/{base}/{group}__{method}.log",
    benchmark:
        "benchmarks/merge/{base}/{group}__{method}.tsv"
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
        gpu=get_gpu,
    params:
        parameters=get_cell_parameters,
        models=get_model_args,
        flags=get_merge_flags,
    shell:
        "mergebake merge --recipe {input.recipe} --base {input.base} {params.models}"
        " --parameters {params.parameters:q} {params.flags} --out {output}"
        " --threads {threads} > {log} 2>&1"

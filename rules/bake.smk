# Each adapter is baked into its base once (W' = W + scale·B·A), shared by every cell.


rule bake:
    input:
        unpack(get_bake_inputs),
    output:
        maybe_temp(directory("results/baked/{base}/{adapter}")),
    log:
        "logs/bake/{base}/{adapter}.log",
    benchmark:
        "benchmarks/bake/{base}/{adapter}.tsv"
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
        gpu=get_gpu,
    params:
        flags=get_bake_flags,
    shell:
        "mergebake bake --base {input.base} --adapter {input.adapter} --out {output}"
        " {params.flags} --threads {threads} > {log} 2>&1"

# Each adapter is baked into its base once (W' = W + scale·B·A), shared by every cell.


rule bake:
    input:
        unpack(get_bake_inputs),
    output:
        maybe_temp(directory(LAYOUT["baked"])),
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
        cmd=get_command("bake"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"

# GGUF export for llama.cpp (export.gguf): llama.cpp's own converter and quantiser, each
# file checked by llama.cpp against the cell before it counts as built.


# The converter comes from PyPI (the pinned llama-cpp-python sdist): fetched where
# Snakemake runs, like Hub fetches (cluster compute nodes often have no internet).
localrules:
    gguf_tools,


rule gguf_tools:
    output:
        GGUF_TOOLS,
    log:
        "logs/gguf_tools/gguf_tools.log",
    conda:
        ENV
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("gguf_tools"),
    shell:
        "{params.cmd} > {log:q} 2>&1"


rule export_gguf:
    input:
        cell=LAYOUT["merged"],
        tools=GGUF_TOOLS,
    output:
        gguf=LAYOUT["gguf"],
        sidecar=LAYOUT["gguf"] + ".json",
    log:
        "logs/export_gguf/{base}/{group}__{method}.{type}.log",
    benchmark:
        "benchmarks/export_gguf/{base}/{group}__{method}.{type}.tsv"
    wildcard_constraints:
        type=GGUF_TYPE_NAMES,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("export_gguf"),
    shell:
        "{params.cmd} --threads {threads} > {log:q} 2>&1"

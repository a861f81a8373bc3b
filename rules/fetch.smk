# Bases and adapters from the Hugging Face Hub, pinned to a commit: a branch or tag is
# resolved once (rule pin, logged) and every fetch of that repo@revision uses that commit.


# Hub traffic runs where Snakemake runs (cluster compute nodes often have no internet).
localrules:
    pin,
    fetch_base,
    fetch_adapter,


rule pin:
    output:
        LAYOUT["pin"],
    log:
        "logs/pin/{pin}.log",
    wildcard_constraints:
        pin=PIN_NAMES,
    conda:
        ENV
    params:
        cmd=get_command("pin"),
    shell:
        "{params.cmd} > {log:q} 2>&1"


rule fetch_base:
    input:
        pin=get_base_pin,
    output:
        directory(LAYOUT["base"]),
    log:
        "logs/fetch_base/{base}.log",
    wildcard_constraints:
        base=HUB_BASES,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("fetch_base"),
    shell:
        "{params.cmd} > {log:q} 2>&1"


rule fetch_adapter:
    input:
        pin=get_adapter_pin,
    output:
        directory(LAYOUT["adapter"]),
    log:
        "logs/fetch_adapter/{base}/{adapter}.log",
    wildcard_constraints:
        adapter=HUB_ADAPTERS,
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("fetch_adapter"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

# Bases and adapters from the Hugging Face Hub, pinned to a commit: a branch or tag is
# resolved once (rule pin, logged) and every fetch of that repo@revision uses that commit.


# Hub traffic runs where Snakemake runs (cluster compute nodes often have no internet).
localrules:
    pin,
    fetch_base,
    fetch_adapter,


rule pin:
    output:
        "resources/pins/{pin}.json",
    log:
        "logs/pin/{pin}.log",
    wildcard_constraints:
        pin=PIN_NAMES,
    conda:
        ENV
    params:
        args=get_pin_args,
    shell:
        "mergebake pin {params.args} --out {output} > {log} 2>&1"


rule fetch_base:
    input:
        pin=get_base_pin,
    output:
        directory("resources/bases/{base}"),
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
        src=get_hub_base,
        flags=get_fetch_base_flags,
    shell:
        "mergebake fetch --repo {params.src[repo]} --revision {params.src[revision]}"
        " {params.flags} --out {output} > {log} 2>&1"


rule fetch_adapter:
    input:
        pin=get_adapter_pin,
    output:
        directory("resources/adapters/{base}/{adapter}"),
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
        src=get_hub_adapter,
        flags=get_fetch_adapter_flags,
    shell:
        "mergebake fetch --repo {params.src[repo]} --revision {params.src[revision]}"
        " {params.flags} --out {output} > {log} 2>&1"

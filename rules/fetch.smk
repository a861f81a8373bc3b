# Bases and adapters from the Hugging Face Hub, pinned to the resolved commit.


rule fetch_base:
    output:
        directory("resources/bases/{base}"),
    log:
        "logs/fetch_base/{base}.log",
    wildcard_constraints:
        base=HUB_BASES,
    conda:
        ENV
    params:
        src=get_hub_base,
        subfolder=lambda wc: get_subfolder_arg(get_hub_base(wc)),
    shell:
        "mergebake fetch --repo {params.src[repo]} --revision {params.src[revision]}"
        " {params.subfolder} --out {output} > {log} 2>&1"


rule fetch_adapter:
    output:
        directory("resources/adapters/{base}/{adapter}"),
    log:
        "logs/fetch_adapter/{base}/{adapter}.log",
    wildcard_constraints:
        adapter=HUB_ADAPTERS,
    conda:
        ENV
    params:
        src=get_hub_adapter,
        subfolder=lambda wc: get_subfolder_arg(get_hub_adapter(wc)),
    shell:
        "mergebake fetch --repo {params.src[repo]} --revision {params.src[revision]}"
        " {params.subfolder} --out {output} > {log} 2>&1"

# One Hub folder per cell with its model card, then the repo README (grid table); with
# hub.enabled false, the cards and README are written locally with dry-run receipts.


# Hub traffic runs where Snakemake runs (cluster compute nodes often have no internet).
localrules:
    upload,
    hub_readme,


rule upload:
    input:
        cell="results/merged/{base}/{group}__{method}",
        scores="results/eval/{base}/{group}__{method}.json",
        baseline=get_hub_baseline_eval,
        sources=get_hub_sources,
    output:
        receipt="results/uploaded/{base}/{group}__{method}.json",
        card="results/cards/{base}/{group}__{method}.md",
    log:
        "logs/upload/{base}/{group}__{method}.log",
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        flags=get_upload_flags,
        path_in_repo="{base}/{group}__{method}",
        card=get_hub_card,
    shell:
        "mergebake upload --cell {input.cell} --scores {input.scores} --card {params.card:q}"
        " --card-out {output.card} --receipt {output.receipt}"
        " --path-in-repo {params.path_in_repo} {params.flags} > {log} 2>&1"


rule hub_readme:
    input:
        receipts=get_hub_receipts,
    output:
        receipt=HUB_README_RECEIPT,
        readme="results/cards/README.md",
    log:
        "logs/hub_readme/hub_readme.log",
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        flags=get_upload_flags,
        rows=get_hub_readme_rows,
        meta=get_hub_meta,
    shell:
        "mergebake hub-readme --rows {params.rows:q} --meta {params.meta:q}"
        " --receipt {output.receipt} --readme-out {output.readme} {params.flags} > {log} 2>&1"

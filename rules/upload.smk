# One Hub folder per cell with its model card, then the repo README (grid table); with
# hub.enabled false, the cards and README are written locally with dry-run receipts.


# Hub traffic runs where Snakemake runs (cluster compute nodes often have no internet).
localrules:
    upload,
    hub_readme,


rule upload:
    input:
        cell=LAYOUT["merged"],
        scores=LAYOUT["eval_cell"],
        baseline=get_hub_baseline_eval,
        sources=get_hub_sources,
        card=get_card_payload,
        gguf=get_gguf_files,
        adapter=get_cell_adapter,
    output:
        receipt=LAYOUT["receipt"],
        card=LAYOUT["card"],
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
        cmd=get_command("upload"),
    shell:
        "{params.cmd} > {log:q} 2>&1"


rule hub_readme:
    input:
        receipts=get_hub_receipts,
        rows=payload("hub_readme_rows"),
        meta=payload("hub_meta"),
    output:
        receipt=LAYOUT["hub_readme_receipt"],
        readme=LAYOUT["hub_readme"],
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
        cmd=get_command("hub_readme"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

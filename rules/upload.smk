# One Hub folder per cell; with hub.enabled false, a receipt of what would be uploaded.


rule upload:
    input:
        cell="results/merged/{base}/{group}__{method}",
        scores="results/eval/{base}/{group}__{method}.json",
    output:
        "results/uploaded/{base}/{group}__{method}.json",
    log:
        "logs/upload/{base}/{group}__{method}.log",
    conda:
        ENV
    params:
        flags=get_upload_flags,
        path_in_repo="{base}/{group}__{method}",
    shell:
        "mergebake upload --cell {input.cell} --receipt {output}"
        " --path-in-repo {params.path_in_repo} {params.flags} > {log} 2>&1"

# Pivot of every cell and baseline, Δ against the configured baseline, method ranking.


rule report:
    input:
        evals=get_report_evals,
        rows=payload("report_rows"),
    output:
        REPORT_OUTPUTS,
    log:
        "logs/report/report.log",
    conda:
        ENV
    threads: get_threads
    resources:
        mem_mb=get_mem_mb,
        runtime=get_runtime,
        disk_mb=get_disk_mb,
    params:
        cmd=get_command("report"),
    shell:
        "{params.cmd} > {log:q} 2>&1"

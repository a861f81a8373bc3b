# Pivot of every cell and baseline, Δ against the configured baseline, method ranking.


rule report:
    input:
        get_report_evals,
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
        rows=get_report_rows,
        baseline=config["report"]["baseline"],
        metrics=get_report_metrics,
    shell:
        "mergebake report --rows {params.rows:q} --out-dir results/report"
        " --baseline {params.baseline} {params.metrics} > {log} 2>&1"

# Pivot of every cell and baseline, Δ against the configured baseline, method ranking.


rule report:
    input:
        evals=get_report_evals,
        rows=payload("report_rows"),
    output:
        csv=report(
            LAYOUT["report_csv"],
            caption="../report/pivot.rst",
            category="Merge evaluation",
            subcategory="Tables",
        ),
        md=LAYOUT["report_md"],
        html=report(
            LAYOUT["report_html"],
            caption="../report/report.rst",
            category="Merge evaluation",
            subcategory="Tables",
        ),
        heatmap=report(
            LAYOUT["report_scores_png"],
            caption="../report/heatmap.rst",
            category="Merge evaluation",
            subcategory="Plots",
        ),
        ranking=report(
            LAYOUT["report_ranking_png"],
            caption="../report/ranking.rst",
            category="Merge evaluation",
            subcategory="Plots",
        ),
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

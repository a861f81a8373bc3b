# Pivot of every cell and baseline, Δ against the configured baseline, method ranking.


rule report:
    input:
        get_report_evals,
    output:
        csv=report(
            "results/report/merge_eval_pivot.csv",
            caption="../report/pivot.rst",
            category="Merge evaluation",
            subcategory="Tables",
        ),
        md="results/report/merge_eval_report.md",
        html=report(
            "results/report/merge_eval_report.html",
            caption="../report/report.rst",
            category="Merge evaluation",
            subcategory="Tables",
        ),
        heatmap=report(
            "results/report/merge_eval_scores.png",
            caption="../report/heatmap.rst",
            category="Merge evaluation",
            subcategory="Plots",
        ),
        ranking=report(
            "results/report/method_ranking.png",
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
        rows=get_report_rows,
        baseline=config["report"]["baseline"],
        metrics=get_report_metrics,
        oracle=json.dumps(config["report"]["oracle"], sort_keys=True),
        stats=f"--min-gain {config['report']['min_gain']} --bootstrap {config['report']['bootstrap']} --seed {config['seed']}",
    shell:
        "mergebake report --rows {params.rows:q} --out-dir results/report"
        " --baseline {params.baseline} {params.metrics} --oracle {params.oracle:q}"
        " {params.stats} > {log} 2>&1"

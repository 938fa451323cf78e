# Stage 7: the report (the paper's tables and figures from this run) and Snakemake's own report.


rule report:
    input:
        evaluations=report_evaluations,
        skipped=rules.eval_skipped.output[0],
        dynamics=report_dynamics,
        prm=rules.train_prm.output.metrics,
        decontamination=rules.decontaminate.output.report,
        sft=rules.sft.output.metrics,
    output:
        html=report("results/report/report.html", caption="../report/report.rst", category="Report"),
        markdown="results/report/report.md",
        tables=directory("results/report/tables"),
        figures=report(directory("results/report/figures"), patterns=["{name}.png"],
                       caption="../report/figures.rst", category="Report", subcategory="Figures"),
    params:
        config=config,
        code=code_digest("report.py"),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        "../envs/balancedbio.yaml"
    script:
        "../scripts/report.py"

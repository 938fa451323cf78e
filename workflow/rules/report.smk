# Stage 7: the report (the paper's tables and figures from this run) and Snakemake's own report.
# Every file the report reads is a declared input, and the lists come from the config alone,
# so the plan never depends on what is lying in results/.


rule report:
    input:
        evaluations=expand(
            rules.evaluate.output.result,
            model=eval_models(),
            benchmark=config["eval"]["benchmarks"],
        ),
        eval_items=expand(
            rules.evaluate.output.predictions,
            model=eval_models(),
            benchmark=config["eval"]["benchmarks"],
        ),
        heldout=expand(rules.heldout_rewards.output.result, model=eval_models()),
        heldout_items=expand(rules.heldout_rewards.output.item_rewards, model=eval_models()),
        dynamics=expand(rules.grpo.output.dynamics, variant=report_variants()),
        skipped=rules.eval_skipped.output[0],
        prm=rules.train_prm.output.metrics,
        decontamination=rules.decontaminate.output.report,
        sft=rules.sft.output.metrics,
    output:
        html=report(
            "results/report/report.html",
            caption="../report/report.rst",
            category="Report",
        ),
        markdown="results/report/report.md",
        tables=directory("results/report/tables"),
        figures=report(
            directory("results/report/figures"),
            patterns=["{name}.png"],
            caption="../report/figures.rst",
            category="Report",
            subcategory="Figures",
        ),
    log:
        "logs/report.log",
    benchmark:
        "benchmarks/report.tsv"
    conda:
        "../envs/balancedbio.yaml"
    params:
        config=config,
        out_dir=lambda wildcards, output: os.path.dirname(output.html),
        code=code_digest("report", "templates/report.md.j2", "templates/report.html.j2"),
    script:
        "../scripts/report.py"

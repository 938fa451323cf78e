# Stage 4: supervised fine-tuning of the prepared base model on the clean SFT conversations.

import json

from balancedbio.sft import sft_settings


rule sft:
    input:
        model=rules.prepare_model.output[0],
        data=rules.decontaminate.output.sft,
    output:
        model=directory("results/models/sft"),
        metrics=report("results/sft/metrics.json", caption="../report/sft.rst", category="SFT"),
        loss_plot=report("results/sft/loss.png", caption="../report/sft.rst", category="SFT"),
    log:
        "logs/sft.log",
    benchmark:
        "benchmarks/sft.tsv"
    # The longest chain (data -> PRM, SFT -> GRPO -> its evaluations): run it before the
    # evaluations of base and sft, which can fill the cores at any time.
    priority: 20
    conda:
        "../envs/balancedbio.yaml"
    threads: rule_resources("sft")["cpus_per_task"]
    resources:
        **rule_resources("sft"),
    params:
        launch=training_launcher("sft"),
        settings=json.dumps(sft_settings(config), sort_keys=True),
        # Not an output: Snakemake would delete it before a rerun, and resuming needs it.
        checkpoints="results/sft/checkpoints",
        code=code_digest("sft.py", "models.py", "train.py", "checkpoints.py"),
    shell:
        "{params.launch} -m balancedbio.train sft --model {input.model} --data {input.data}"
        " --out {output.model} --metrics {output.metrics} --loss-plot {output.loss_plot}"
        " --checkpoints {params.checkpoints} --settings {params.settings:q} > {log} 2>&1"

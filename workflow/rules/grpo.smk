# Stage 5: capability-aware GRPO, one job per variant: `full` (the paper's method), the
# ablations of Table 2, the DWA / PCGrad / GradVac baselines and the group-size sweep.

import json

from balancedbio.variants import (
    ABLATION_VARIANTS,
    GROUP_SIZES,
    VARIANT_PATTERN,
    variant_settings,
)


wildcard_constraints:
    variant=VARIANT_PATTERN,


rule grpo:
    input:
        model=rules.sft.output.model,
        mcq=rules.decontaminate.output.mcq_train,
        prompts=rules.decontaminate.output.prompts,
        # The no_prm ablation neither waits for nor loads the process reward model.
        prm=lambda wc: [] if wc.variant == "no_prm" else rules.train_prm.output.model,
    output:
        model=directory("results/models/grpo_{variant}"),
        dynamics="results/grpo_{variant}/dynamics.jsonl",
        figure=report(
            "results/grpo_{variant}/dynamics.png",
            caption="../report/grpo.rst",
            category="GRPO",
            subcategory="{variant}",
        ),
    log:
        "logs/grpo_{variant}.log",
    benchmark:
        "benchmarks/grpo_{variant}.tsv"
    # The longest chain (data -> PRM, SFT -> GRPO -> its evaluations): run it before the
    # evaluations of base and sft, which can fill the cores at any time.
    priority: 10
    conda:
        "../envs/balancedbio.yaml"
    threads: rule_resources("grpo")["cpus_per_task"]
    resources:
        **rule_resources("grpo"),
    params:
        launch=training_launcher("grpo"),
        settings=lambda wc: json.dumps(variant_settings(config, wc.variant), sort_keys=True),
        prm=lambda wc, input: f"--prm {input.prm}" if input.prm else "",
        checkpoints="results/grpo_{variant}/checkpoints",
        # Every module a GRPO job's results depend on (the answer parser and the step splitter
        # shape the rewards; the rollout copy, the typed config and the models module the run).
        code=code_digest(
            "grpo",
            "ppo.py",
            "aoc.py",
            "weights.py",
            "rewards.py",
            "prm.py",
            "answers.py",
            "ifeval.py",
            "data/reasoning.py",
            "data/formatting.py",
            "rollout.py",
            "training_args.py",
            "variants.py",
            "models.py",
            "train.py",
            "checkpoints.py",
        ),
    shell:
        "{params.launch} -m balancedbio.train grpo --model {input.model} --mcq {input.mcq}"
        " --prompts {input.prompts} {params.prm} --out {output.model} --dynamics {output.dynamics}"
        " --figure {output.figure} --checkpoints {params.checkpoints} --settings {params.settings:q}"
        " > {log} 2>&1"


rule ablations:
    input:
        grpo_targets(["full", "static_weights", *ABLATION_VARIANTS]),


rule group_size_sweep:
    input:
        grpo_targets([f"g{g}" for g in GROUP_SIZES]),

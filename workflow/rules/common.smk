# Shared helpers: config validation, per-rule resources, target lists.

import os

from snakemake.utils import validate
from snakemake_interface_executor_plugins.settings import DeploymentMethod

from balancedbio.config import apply_environment_overrides, check_schema, check_semantics
from balancedbio.versions import check_trackers, check_versions

# Schema first (one short line per wrong key, then Snakemake fills the defaults), then the
# env overrides and the checks the schema cannot express; all stop the run before any rule.
check_schema(config, workflow.source_path("../schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml", set_default=True)
apply_environment_overrides(config, os.path.dirname(workflow.basedir))
check_semantics(config)
check_trackers(config["logging"]["report_to"])
USES_CONDA = DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
# This process's libraries run the rules unless --sdm conda gives them their own (pinned) env.
if not USES_CONDA:
    check_versions()
# The conda env file installs the package from this checkout: Snakemake copies env files to
# .snakemake/conda/ before creating them, so the env names the path through this variable (pip
# expands ${BALANCEDBIO_SOURCE}); env creation runs as a child of this process and inherits it.
os.environ.update(BALANCEDBIO_SOURCE=os.path.dirname(workflow.basedir))


def rule_resources(rule_name):
    """The `default` resources overlaid with the rule's own entry from config['resources']."""
    merged = dict(config["resources"]["default"])
    merged.update(config["resources"].get(rule_name) or {})
    return merged


def verbatim(value):
    """A params value Snakemake passes as it is: it formats a params string's braces as
    wildcards (a chat template's '{{ eos_token }}' stops the DAG), but not a function's result."""
    return lambda wildcards: value


def code_digest(*relative_paths):
    """Digest of package source files: a rule whose logic changed reruns (Snakemake's own code
    trigger only sees the thin script, not the package it calls)."""
    import hashlib

    package = os.path.join(workflow.basedir, "..", "src", "balancedbio")
    digest = hashlib.sha256()
    for rel in relative_paths:
        path = os.path.join(package, rel)
        files = (
            sorted(
                os.path.join(root, f) for root, _, names in os.walk(path) for f in names if f.endswith((".py", ".yaml"))
            )
            if os.path.isdir(path)
            else [path]
        )
        for file in files:
            with open(file, "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()[:16]


def final_targets():
    return [
        "results/models/base",
        "results/data/decontamination.json",
        "results/prm/metrics.json",
        "results/sft/metrics.json",
        *grpo_targets(config["grpo"]["variants"]),
        "results/eval/skipped.json",
        *heldout_targets(),
        "results/report/report.html",
    ]


def heldout_targets():
    return [f"results/eval/{m}/heldout_rewards.json" for m in eval_models()]


def eval_models():
    """base, sft and every GRPO variant the default target trains (or config eval.models)."""
    return config["eval"]["models"] or ["base", "sft", *[f"grpo_{v}" for v in config["grpo"]["variants"]]]


def evaluation_targets():
    return [f"results/eval/{m}/{b}.json" for m in eval_models() for b in config["eval"]["benchmarks"]]


def benchmark_files(wildcards):
    """The benchmark's local files when present, so that a changed file reruns its evaluations."""
    from balancedbio.evaluation import BENCHMARKS

    bench = BENCHMARKS[wildcards.benchmark]
    root = config["benchmarks_dir"]
    if not root:
        return []
    names = [n for n in (bench.test_file, bench.dev_file) if n]
    return [p for p in (os.path.join(root, n) for n in names) if os.path.isfile(p)]


def grpo_targets(variants):
    return [f"results/grpo_{v}/dynamics.jsonl" for v in variants]


def training_launcher(rule_name):
    """`python` on one device, `accelerate launch` (+ DeepSpeed when configured) on several."""
    from balancedbio.launch import launch_prefix

    # Under --sdm conda the job's shell has the rule's env activated: its `python`, not the
    # interpreter that runs Snakemake.
    return launch_prefix(
        int(rule_resources(rule_name).get("gpu", 0)),
        deepspeed_config=config["training"]["deepspeed_config"],
        bf16=config["training"]["bf16"],
        python="python" if USES_CONDA else None,
    )


def external_datasets():
    return [d["name"] for d in config["ingest"]]


def ingest_spec(name):
    return next(d for d in config["ingest"] if d["name"] == name)


def benchmark_test_files(wildcards):
    """The benchmark test sets present under benchmarks_dir (absent ones are reported, not required)."""
    root = config["benchmarks_dir"]
    if not root:
        return []
    names = config["decontamination"]["benchmarks"]
    return [p for p in (os.path.join(root, n, "test.jsonl") for n in names) if os.path.isfile(p)]


# The report's inputs, from the config alone (never from what is lying in results/).
def report_variants():
    """The config's GRPO variants and every evaluated one (their dynamics go into the report)."""
    evaluated = [m[len("grpo_") :] for m in eval_models() if m.startswith("grpo_")]
    return list(dict.fromkeys([*config["grpo"]["variants"], *evaluated]))

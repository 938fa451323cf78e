# Shared helpers: config validation, per-rule resources, target lists.

import os

from snakemake.utils import validate

from balancedbio.config import apply_environment_overrides, check_schema, check_semantics


# Schema first (one short line per wrong key, then Snakemake fills the defaults), then the
# env overrides and the checks the schema cannot express; all stop the run before any rule.
check_schema(config, workflow.source_path("../schemas/config.schema.yaml"))
validate(config, "../schemas/config.schema.yaml", set_default=True)
apply_environment_overrides(config, os.path.dirname(workflow.basedir))
check_semantics(config)


def rule_resources(rule_name):
    """The `default` resources overlaid with the rule's own entry from config['resources']."""
    merged = dict(config["resources"]["default"])
    merged.update(config["resources"].get(rule_name) or {})
    return merged


def code_digest(*relative_paths):
    """Digest of package source files: a rule whose logic changed reruns (Snakemake's own code
    trigger only sees the thin script, not the package it calls)."""
    import hashlib

    package = os.path.join(workflow.basedir, "..", "src", "balancedbio")
    digest = hashlib.sha256()
    for rel in relative_paths:
        path = os.path.join(package, rel)
        files = sorted(
            os.path.join(root, f)
            for root, _, names in os.walk(path)
            for f in names
            if f.endswith((".py", ".yaml"))
        ) if os.path.isdir(path) else [path]
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

    return launch_prefix(int(rule_resources(rule_name).get("gpu", 0)),
                         deepspeed_config=config["training"]["deepspeed_config"],
                         bf16=config["training"]["bf16"])


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


def trained_variants():
    """GRPO variants of the config plus any trained earlier (ablations, sweep) that are on disk."""
    import re

    pattern = re.compile(r"^grpo_(full|static_weights|no_prm|no_aoc|ppo|dwa|pcgrad|gradvac|g[0-9]+)$")
    on_disk = [m.group(1) for d in sorted(os.listdir("results/models")) if (m := pattern.match(d))] \
        if os.path.isdir("results/models") else []
    return list(dict.fromkeys([*config["grpo"]["variants"], *on_disk]))


def report_evaluations(wildcards):
    models = list(dict.fromkeys([*eval_models(), *[f"grpo_{v}" for v in trained_variants()]]))
    return [f"results/eval/{m}/{b}.json" for m in models for b in config["eval"]["benchmarks"]]


def report_dynamics(wildcards):
    return grpo_targets(trained_variants())

"""config/evidence.yaml (issue 23): an overlay of config.yaml that trains four variants from one SFT model for the
same steps with learning curves on, and evaluates only what the evidence needs."""

from __future__ import annotations

import yaml

from conftest import REPO, run_snakemake

EVIDENCE = REPO / "config" / "evidence.yaml"
VARIANTS = ("full", "static_weights", "no_aoc", "gdpo")


def test_evidence_config_merges_over_the_default_and_trains_four_variants_alike_with_curves():
    from balancedbio.config import load_config
    from balancedbio.variants import grpo_recipe, variant_settings

    default = load_config(REPO / "config" / "config.yaml")
    merged = load_config(REPO / "config" / "config.yaml",
                         overrides=yaml.safe_load(EVIDENCE.read_text(encoding="utf-8")))
    assert default["grpo"]["heldout_eval_steps"] == 0  # the CPU default draws no curves
    assert tuple(merged["grpo"]["variants"]) == VARIANTS
    steps, every = merged["grpo"]["max_steps"], merged["grpo"]["heldout_eval_steps"]
    assert steps >= 40 and 0 < every <= steps
    assert merged["model"] == default["model"] and merged["sft"] == default["sft"]  # the default's SFT model
    paths = {key: f"/x/{key}" for key in ("model", "mcq", "prompts", "prm", "out", "dynamics", "checkpoints")}
    recipes = {v: grpo_recipe(variant_settings(merged, v), paths) for v in VARIANTS}
    assert {r["max_steps"] for r in recipes.values()} == {steps}
    assert {r["model_name_or_path"] for r in recipes.values()} == {"/x/model"}
    # What the variants change, and nothing else: weights, AOC, the advantage aggregation.
    assert recipes["static_weights"]["weights_mode"] == "static" and recipes["full"]["weights_mode"] == "pid"
    assert recipes["no_aoc"]["aoc_mode"] == "monitor" and recipes["full"]["aoc_mode"] == "penalty"
    assert recipes["gdpo"]["advantage_aggregation"] == "normalize_then_sum"
    assert merged["eval"]["benchmarks"] == []
    assert {"base", *[f"grpo_{v}" for v in VARIANTS]} <= set(merged["eval"]["models"])


def test_evidence_config_plans_the_four_variants_with_their_curve_sets(tmp_path):
    result = run_snakemake("-n", "--cores", "2", "--configfile", str(EVIDENCE), workdir=tmp_path)
    plan = result.stdout + result.stderr
    for variant in VARIANTS:
        assert f"results/grpo_{variant}/heldout_curve_set.json" in plan
        assert f"results/grpo_{variant}/dynamics.jsonl" in plan
        assert f"results/eval/grpo_{variant}/heldout_rewards.json" in plan
    assert "results/eval/base/heldout_rewards.json" in plan and "results/report/report.html" in plan
    assert "rule evaluate:" not in plan  # no lm-eval benchmark: the evidence is the held-out rewards
    assert "This was a dry-run" in plan

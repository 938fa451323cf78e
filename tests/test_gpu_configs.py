"""paper.yaml and qwen05b.yaml are overlays: Snakemake deep-merges them over config.yaml, the CPU
default. Every value config.yaml tuned for 2 CPU cores must be set by the GPU config itself."""

from __future__ import annotations

import pytest
import yaml

from balancedbio.config import _deep_merge
from conftest import REPO

# config.yaml's values sized or measured for the CPU default (its comments say so).
CPU_TUNED = ["sft.max_examples", "sft.val_examples", "prm.max_train_examples", "prm.max_eval_questions",
             "training.bf16", "grpo.num_generations", "grpo.prompts_per_step", "grpo.resample_constant_groups",
             "grpo.max_completion_length", "grpo.max_steps", "grpo.rollout_weights", "aoc.interval", "aoc.tau",
             "aoc.micro_batch_rows", "eval.limit", "eval.batch_size", "eval.generation_batch_size", "eval.dtype",
             "eval.ifeval_max_tokens", "eval.heldout_rewards", "resources.default", "resources.prepare_model",
             "resources.grpo", "resources.evaluate"]
# Of those, the ones whose CPU value would be wrong on a GPU whatever the model (sizes of CPU budgets).
CPU_SIZED = ["sft.val_examples", "grpo.resample_constant_groups", "eval.generation_batch_size",
             "eval.heldout_rewards", "eval.ifeval_max_tokens", "resources.default"]


def _load(name: str) -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text(encoding="utf-8"))


def _get(config: dict, dotted: str):
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            raise KeyError(dotted)
        node = node[key]
    return node


def test_the_cpu_tuned_keys_exist_in_config_yaml():
    cpu = _load("config.yaml")
    for key in CPU_TUNED:
        _get(cpu, key)  # a renamed key would make the GPU checks below vacuous


@pytest.mark.parametrize("name", ["paper.yaml", "qwen05b.yaml"])
def test_gpu_configs_set_every_cpu_tuned_value_themselves(name):
    overlay = _load(name)
    missing = []
    for key in CPU_TUNED:
        try:
            _get(overlay, key)
        except KeyError:
            missing.append(key)
    assert not missing, f"{name} inherits config.yaml's CPU-tuned {missing}"


@pytest.mark.parametrize("name", ["paper.yaml", "qwen05b.yaml"])
def test_merged_gpu_configs_carry_none_of_the_cpu_sized_values(name):
    cpu = _load("config.yaml")
    merged = _deep_merge(cpu, _load(name))  # what Snakemake runs: config.yaml, then --configfile
    for key in CPU_SIZED:
        assert _get(merged, key) != _get(cpu, key), key
    assert merged["grpo"]["resample_constant_groups"] <= 1  # at most one more vLLM round a step
    assert merged["aoc"]["tau"] == pytest.approx(0.1)  # the paper's, not the 135M model's measured 0.02

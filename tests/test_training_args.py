"""The typed GRPO configuration: schema-generated fields, checks naming the field, YAML recipes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

pytest.importorskip("trl")

from balancedbio.defaults import schema_default  # noqa: E402
from balancedbio.grpo import grpo_config, variant_settings  # noqa: E402
from balancedbio.training_args import FIELD_KEYS, BalancedGRPOConfig, GRPOScriptArguments  # noqa: E402

CPU = dict(bf16=False, use_cpu=True, report_to=[])


def test_every_added_field_is_documented_and_defaults_to_the_schema(tmp_path):
    config = BalancedGRPOConfig(output_dir=str(tmp_path), **CPU)
    for name, (section, key) in FIELD_KEYS.items():
        field = next(f for f in dataclasses.fields(BalancedGRPOConfig) if f.name == name)
        assert field.metadata["help"].startswith(f"{section}.{key}")
        assert getattr(config, name) == schema_default(section, key), name
    assert config.aoc_mode == "penalty" == schema_default("aoc", "mode")  # one default, not penalty here, off there
    assert config.advantage_aggregation == "weighted_components"


@pytest.mark.parametrize("field, value, message", [
    ("aoc_tau", 2.0, r"aoc_tau \(aoc\.tau\): 2\.0 is greater than the maximum of 1"),
    ("weights_mode", "fuzzy", r"weights_mode \(weights\.mode\): 'fuzzy' is not one of"),
    ("advantage_std_floor", 0.0, r"advantage_std_floor \(grpo\.advantage_std_floor\)"),
    ("weights_min_weight", 20.0, r"weights_min_weight \(20\.0\) must be below weights_max_weight"),
    ("weights_initial", "{not json", r"weights_initial: not a JSON object"),
])
def test_a_bad_field_is_named_in_the_error(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        BalancedGRPOConfig(output_dir=str(tmp_path), **CPU, **{field: value})


def test_the_workflow_settings_arrive_unchanged(smoke_config, tmp_path):
    settings = variant_settings(smoke_config, "gdpo")
    args = grpo_config(settings, str(tmp_path), 1)
    assert isinstance(args, BalancedGRPOConfig)
    for section in ("weights", "aoc", "ppo", "rewards"):
        assert args.section(section) == settings[section]
    assert args.advantage_aggregation == "normalize_then_sum" == args.multi_objective_aggregation
    grpo = settings["grpo"]
    assert args.per_device_train_batch_size == grpo["prompts_per_step"] * grpo["num_generations"]
    assert args.learning_rate == settings["grpo"]["learning_rate"] and args.report_to == settings["report_to"]


def test_a_yaml_recipe_parses_through_trl_parser(tmp_path):
    from trl import ModelConfig, TrlParser

    recipe = {"model_name_or_path": "results/models/sft", "mcq": "mcq.jsonl", "prompts": "prompts.jsonl",
              "prm": "results/models/prm", "out": "out", "dynamics": "dynamics.jsonl", "checkpoints": "ck",
              "num_generations": 2, "prompts_per_step": 4, "max_steps": 3, "bf16": False, "use_cpu": True,
              "report_to": [], "weights_kp": 1.5, "weights_initial": {"instruction": 2.0}, "aoc_mode": "monitor",
              "use_peft": True, "lora_r": 4}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    parser = TrlParser((GRPOScriptArguments, BalancedGRPOConfig, ModelConfig))
    paths, args, model = parser.parse_args_and_config(["--config", str(path), "--aoc_tau", "0.3"])
    assert (paths.mcq, paths.prm, model.model_name_or_path, model.lora_r) == ("mcq.jsonl", "results/models/prm",
                                                                              "results/models/sft", 4)
    assert args.weights_kp == 1.5 and args.weights_initial == {"instruction": 2.0}
    assert args.aoc_mode == "monitor" and args.aoc_tau == 0.3  # the command line overrides the recipe
    assert args.per_device_train_batch_size == 8 and args.section("aoc")["tau"] == 0.3
    path.write_text(yaml.safe_dump({**recipe, "aoc_tau": 3.0}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"aoc_tau \(aoc\.tau\)"):
        parser.parse_args_and_config(["--config", str(path)])

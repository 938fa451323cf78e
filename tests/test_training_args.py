"""The typed GRPO configuration: explicit fields equal to the schema, checks naming the field, YAML recipes."""

from __future__ import annotations

import dataclasses
import typing

import pytest
import yaml

pytest.importorskip("trl")

from balancedbio.defaults import _properties, schema_default  # noqa: E402
from balancedbio.grpo.run import grpo_config, parse_recipe  # noqa: E402
from balancedbio.training_args import FIELD_KEYS, BalancedGRPOConfig, GRPOScriptArguments  # noqa: E402
from balancedbio.variants import (GRPO_EXTRA_KEYS, PREFIXED_SECTIONS, TRL_GRPO_KEYS, grpo_recipe,  # noqa: E402
                                  recipe_settings, variant_settings)

CPU = dict(bf16=False, use_cpu=True, report_to=[])


def test_every_config_key_is_a_documented_field_with_the_schemas_default_and_choices(tmp_path):
    expected = {f"{section}_{key}": (section, key) for section in PREFIXED_SECTIONS for key in _properties(section)}
    expected.update({key: ("grpo", key) for key in GRPO_EXTRA_KEYS})
    assert FIELD_KEYS == expected  # no schema key without a field, no field without a schema key
    config = BalancedGRPOConfig(output_dir=str(tmp_path), **CPU)
    hints = typing.get_type_hints(BalancedGRPOConfig)
    for name, (section, key) in FIELD_KEYS.items():
        field = next(f for f in dataclasses.fields(BalancedGRPOConfig) if f.name == name)
        assert field.metadata["help"].startswith(f"{section}.{key} in the workflow config. "), name
        assert len(field.metadata["help"]) > len(f"{section}.{key} in the workflow config. ") + 10, name
        assert getattr(config, name) == schema_default(section, key), name
        spec = _properties(section)[key]
        if "enum" in spec:
            assert typing.get_args(hints[name]) == tuple(spec["enum"]), name
    assert config.aoc_mode == "penalty" == schema_default("aoc", "mode")  # one default, not penalty here, off there
    assert config.advantage_aggregation == "weighted_components"
    # TRL's own fields the recipe fills from the grpo section are GRPOConfig's, under the same names.
    trl_fields = {f.name for f in dataclasses.fields(BalancedGRPOConfig)}
    assert set(TRL_GRPO_KEYS) <= trl_fields and not set(TRL_GRPO_KEYS) & set(FIELD_KEYS)


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


def test_the_workflow_settings_arrive_unchanged_through_the_recipe(smoke_config, tmp_path):
    settings = variant_settings(smoke_config, "gdpo")
    paths = {"model": "results/models/sft", "mcq": "mcq.jsonl", "prompts": "prompts.jsonl", "prm": "prm",
             "out": "out", "dynamics": "d.jsonl", "figure": None, "checkpoints": str(tmp_path / "ck")}
    recipe = grpo_recipe(settings, paths)
    # What the rule writes is YAML: the file and the dict parse to the same configs.
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe), encoding="utf-8")
    from_file, from_dict = parse_recipe(tmp_path / "recipe.yaml"), parse_recipe(recipe)
    assert [c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c) for c in from_file] == \
        [c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c) for c in from_dict]
    script, args, model_args = from_file
    assert isinstance(args, BalancedGRPOConfig)
    assert (script.mcq, script.prm, model_args.model_name_or_path) == ("mcq.jsonl", "prm", "results/models/sft")
    read_back = recipe_settings(args, model_args)
    for section in ("weights", "aoc", "ppo", "rewards"):
        assert args.section(section) == settings[section] == read_back[section]
    grpo = settings["grpo"]
    assert {key: read_back["grpo"][key] for key in (*TRL_GRPO_KEYS, *GRPO_EXTRA_KEYS)} == \
        {key: grpo[key] for key in (*TRL_GRPO_KEYS, *GRPO_EXTRA_KEYS)}
    assert args.advantage_aggregation == "normalize_then_sum" == args.multi_objective_aggregation
    assert args.per_device_train_batch_size == grpo["prompts_per_step"] * grpo["num_generations"]
    assert args.learning_rate == grpo["learning_rate"] and args.report_to == settings["report_to"] == ["tensorboard"]
    lora = settings["training"]["lora"]
    assert (model_args.use_peft, model_args.lora_r, model_args.lora_alpha, model_args.lora_target_modules) == \
        (True, lora["r"], lora["alpha"], lora["target_modules"])
    assert args.logging_steps == 1 and args.deepspeed is None and args.output_dir == str(tmp_path / "ck")
    assert grpo_config(settings, str(tmp_path)).to_dict() == {**args.to_dict(), "output_dir": str(tmp_path)}


def test_the_recipe_builds_the_lora_config_the_workflow_always_used(smoke_config):
    from trl import get_peft_config

    from balancedbio.models import lora_config

    settings = variant_settings(smoke_config, "full")
    paths = {"model": "m", "mcq": "q", "prompts": "p", "out": "o", "dynamics": "d", "checkpoints": "c"}
    _, _, model_args = parse_recipe(grpo_recipe(settings, paths))
    assert get_peft_config(model_args).to_dict() == lora_config(settings["training"]).to_dict()


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


def test_training_bf16_without_cuda_trains_on_the_cpu_instead_of_failing(monkeypatch, tmp_path):
    """training.bf16 on a machine without CUDA: the GRPO config says use_cpu (as SFT does) instead of
    transformers' raw "Your setup doesn't support bf16/gpu" late in the rule."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = BalancedGRPOConfig(output_dir=str(tmp_path), bf16=True, report_to=[])
    assert args.bf16 and args.use_cpu
    assert not BalancedGRPOConfig(output_dir=str(tmp_path), bf16=False, report_to=[]).use_cpu

"""Configuration: the three shipped configs validate; wrong keys and types are named."""

from __future__ import annotations

import pytest
import yaml

from balancedbio.config import BENCHMARKS_DIR_ENV, ConfigError, load_config

from conftest import REPO


@pytest.mark.parametrize("config_path", ["config/config.yaml", "config/paper.yaml", ".test/config/config.yaml"])
def test_shipped_configs_validate_and_get_defaults(config_path):
    config = load_config(REPO / config_path)
    assert config["model"]["trust_remote_code"] is False
    assert config["resources"]["default"]["gpu"] >= 0
    assert "revision" in config["model"]  # filled from the schema's default


def test_paper_config_matches_section_5_3():
    config = load_config(REPO / "config" / "paper.yaml")
    assert config["model"]["source"] == "Qwen/Qwen2.5-7B-Instruct"
    assert config["grpo"]["num_generations"] == 16
    assert config["grpo"]["beta"] == pytest.approx(0.04)
    assert config["training"]["learning_rate"] == pytest.approx(1e-6)
    assert config["training"]["lr_scheduler_type"] == "cosine"
    assert config["training"]["max_length"] == 2048


def _write(tmp_path, data):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named_with_a_suggestion(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.sorce: unknown key \(did you mean 'source'\?\)"):
        load_config(_write(tmp_path, {"model": {"sorce": "embedded:smollm2-135m-instruct"}}))


def test_wrong_type_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo\.num_generations: 'four' is not of type 'integer'"):
        load_config(_write(tmp_path, {"grpo": {"num_generations": "four"}}))


def test_out_of_range_gpu_count_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"resources\.default\.gpu: -1 is less than the minimum of 0"):
        load_config(_write(tmp_path, {"resources": {"default": {"gpu": -1}}}))


def test_bad_model_source_is_reported_under_its_key(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.source: Unknown embedded model"):
        load_config(_write(tmp_path, {"model": {"source": "embedded:nope"}}))


def test_benchmarks_dir_env_override(tmp_path, monkeypatch):
    monkeypatch.setenv(BENCHMARKS_DIR_ENV, str(tmp_path))
    assert load_config(REPO / "config" / "config.yaml")["benchmarks_dir"] == str(tmp_path)
    monkeypatch.delenv(BENCHMARKS_DIR_ENV)
    expected = (REPO / ".." / "shared" / "benchmarks").resolve()
    assert load_config(REPO / "config" / "config.yaml")["benchmarks_dir"] == str(expected)


def test_rollout_copy_with_vllm_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo\.rollout_weights: auto .*use_vllm is true"):
        load_config(_write(tmp_path, {"grpo": {"use_vllm": True, "rollout_weights": "auto"}}))
    assert load_config(_write(tmp_path, {"grpo": {"use_vllm": True, "rollout_weights": "policy"}}))


def test_unknown_rollout_weights_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"grpo\.rollout_weights: 'fp16' is not one of"):
        load_config(_write(tmp_path, {"grpo": {"rollout_weights": "fp16"}}))


@pytest.mark.parametrize("overrides, message", [
    # Each used to pass the config check and fail late or silently (issue 17.8).
    ({"training": {"max_length": 16}}, r"training\.max_length: 16 is less than the minimum of 128"),
    ({"instruct": {"min_instructions": 3, "max_instructions": 1}},
     r"instruct\.min_instructions: 3 is more than instruct\.max_instructions: 1"),
    ({"sft_data": {"min_instructions": 4, "max_instructions": 2}},
     r"sft_data\.min_instructions: 4 is more than sft_data\.max_instructions: 2"),
    ({"grpo": {"prompts_per_step": 8, "max_prompts": 2}},
     r"grpo\.prompts_per_step: 8 distinct prompts per step, but grpo\.max_prompts: 2"),
    ({"grpo": {"prompts_per_step": 8}, "instruct": {"num_prompts": 3}},
     r"grpo\.prompts_per_step: 8 needs 4 instruction prompts per step, but instruct\.num_prompts is 3"),
])
def test_cross_field_mistakes_are_named_at_config_time(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(_write(tmp_path, overrides))


@pytest.mark.parametrize("files, message", [
    ({"pytorch_model.bin": b"pickle"}, r"holds only pickled weights \(pytorch_model\.bin\)"),
    ({}, r"has no weights \(no \*\.safetensors file\)"),
])
@pytest.mark.parametrize("key", ["model.source", "prm.encoder"])
def test_model_folder_without_safetensors_is_refused_at_config_time(tmp_path, files, message, key):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    for name, data in files.items():
        (folder / name).write_bytes(data)
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=rf"{key.replace('.', chr(92) + '.')}: Model folder '.*model' {message}"):
        load_config(_write(tmp_path, {section: {field: str(folder)}}))

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


# --- issue 24: settings that gave silently wrong results or failed late ------------------------

@pytest.mark.parametrize("overrides, key", [
    ({"sft": {"learning_rate": float("inf")}}, r"sft\.learning_rate: inf"),
    ({"sft": {"learning_rate": float("nan")}}, r"sft\.learning_rate: nan"),
    ({"rewards": {"gamma": float("nan")}}, r"rewards\.gamma: nan"),
    ({"grpo": {"beta": float("-inf")}}, r"grpo\.beta: -inf"),
])
def test_non_finite_numbers_are_named_at_config_time(tmp_path, overrides, key):
    """NaN passes every schema minimum and maximum; .inf passes a one-sided bound. Both used to
    train silently (a NaN model, or R_reas dropped as 'does not apply')."""
    with pytest.raises(ConfigError, match=key + " is not a finite number"):
        load_config(_write(tmp_path, overrides))


def test_non_finite_numbers_written_as_yaml_are_named(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("sft:\n  learning_rate: .inf\nrewards:\n  gamma: .nan\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "sft.learning_rate: inf is not a finite number" in str(caught.value)
    assert "rewards.gamma: nan is not a finite number" in str(caught.value)


def test_unknown_eval_model_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"eval\.models: 'grpo_nonexistent' is no model this workflow trains"):
        load_config(_write(tmp_path, {"eval": {"models": ["base", "grpo_nonexistent"]}}))
    assert load_config(_write(tmp_path, {"eval": {"models": ["sft", "grpo_g8", "grpo_no_prm"]}}))


def test_nli_model_that_cannot_load_offline_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    with pytest.raises(ConfigError, match=r"rewards\.nli_model: hub model 'someone/no-such-nli' is not in the local "
                                          r"Hugging Face cache and HF_HUB_OFFLINE is set"):
        load_config(_write(tmp_path, {"rewards": {"nli_model": "someone/no-such-nli"}}))
    with pytest.raises(ConfigError, match=r"rewards\.nli_model: Model source 'not a model!' is neither"):
        load_config(_write(tmp_path, {"rewards": {"nli_model": "not a model!"}}))
    # A sentence encoder is no NLI classifier: no 'entailment' label.
    with pytest.raises(ConfigError, match=r"rewards\.nli_model: 'embedded:all-minilm-l6-v2' has no 'entailment' label"):
        load_config(_write(tmp_path, {"rewards": {"nli_model": "embedded:all-minilm-l6-v2"}}))


def test_nli_model_in_the_cache_passes_offline(tmp_path, monkeypatch):
    """The offline check reads the real cache layout: a cached NLI config passes."""
    cache = tmp_path / "hub"
    snapshot = cache / "models--someone--nli" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"id2label": {"0": "ENTAILMENT", "1": "neutral", "2": "contradiction"}}')
    (cache / "models--someone--nli" / "refs").mkdir()
    (cache / "models--someone--nli" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    assert load_config(_write(tmp_path, {"rewards": {"nli_model": "someone/nli"}}))["rewards"]["nli_model"]


@pytest.mark.parametrize("targets, bad", [(["q_proj", "v_projj"], "'v_projj'"), ("mlp", "'mlp'"),
                                          (["self_attn"], "'self_attn'")])
def test_lora_target_modules_are_checked_against_the_models_layers(tmp_path, targets, bad):
    """Against the embedded model's architecture (read from its GGUF header, built empty on the
    meta device): a typo or a block that is no layer used to fail inside peft, in the SFT rule."""
    with pytest.raises(ConfigError, match=rf"training\.lora\.target_modules: {bad} names no layer LoRA can adapt in "
                                          r"embedded:smollm2-135m-instruct; its layers are: .*q_proj.*v_proj"):
        load_config(_write(tmp_path, {"training": {"lora": {"target_modules": targets}}}))
    for good in (["q_proj", "v_proj"], ".*self_attn\\.(q|v)_proj", "all-linear"):
        assert load_config(_write(tmp_path, {"training": {"lora": {"target_modules": good}}}))
    # With LoRA off the setting is unused, so not checked.
    assert load_config(_write(tmp_path, {"training": {"use_lora": False, "lora": {"target_modules": targets}}}))


def test_chat_template_is_not_read_as_a_wildcard(tmp_path):
    """A Jinja template is full of braces; Snakemake used to read them as wildcards (WildcardError
    in rule prepare_model before any rule ran)."""
    from conftest import TEST_CONFIG, run_snakemake

    extra = tmp_path / "template.yaml"
    extra.write_text(yaml.safe_dump({"model": {"chat_template": TEMPLATE}}))
    result = run_snakemake("-n", "results/models/base", "--configfile", str(TEST_CONFIG), str(extra),
                           workdir=tmp_path, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "WildcardError" not in result.stdout + result.stderr


def test_config_errors_stop_snakemake_naming_the_key(tmp_path):
    from conftest import TEST_CONFIG, run_snakemake

    extra = tmp_path / "bad.yaml"
    extra.write_text("eval:\n  models: [grpo_nonexistent]\nsft:\n  learning_rate: .inf\n")
    result = run_snakemake("-n", "--configfile", str(TEST_CONFIG), str(extra), workdir=tmp_path, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "sft.learning_rate: inf is not a finite number" in output
    assert "MissingInputException" not in output


TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
            "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.slow
def test_chat_template_reaches_the_prepared_model(tmp_path):
    """The rule runs for real and the prepared model's tokenizer carries the template, braces and all."""
    import json

    from conftest import TEST_CONFIG, run_snakemake

    extra = tmp_path / "template.yaml"
    extra.write_text(yaml.safe_dump({"model": {"chat_template": TEMPLATE}}))
    run_snakemake("--cores", "1", "results/models/base", "--configfile", str(TEST_CONFIG), str(extra),
                  workdir=tmp_path)
    base = tmp_path / "results" / "models" / "base"
    saved = json.loads((base / "tokenizer_config.json").read_text()).get("chat_template")
    if saved is None and (base / "chat_template.jinja").exists():
        saved = (base / "chat_template.jinja").read_text()
    assert saved == TEMPLATE

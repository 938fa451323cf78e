"""Run configuration: schema validation (with defaults), environment overrides, semantic checks.

The Snakefile validates with ``snakemake.utils.validate`` against ``workflow/schemas/config.schema.yaml``;
``load_config`` does the same outside Snakemake (tests, notebooks, scripts).
"""

from __future__ import annotations

import copy
import difflib
import os
from pathlib import Path
from typing import Any

import yaml

from balancedbio.models import ModelResolutionError, resolve_model

BENCHMARKS_DIR_ENV = "BALANCEDBIO_BENCHMARKS_DIR"
REPO_ROOT = Path(__file__).resolve().parents[2]
from balancedbio.defaults import SCHEMA_PATH  # noqa: E402 (package data)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the offending key."""


def schema_errors(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> list[str]:
    """Every schema violation as one short line that starts with the dotted key."""
    import jsonschema

    with open(schema_path, encoding="utf-8") as handle:
        schema = yaml.safe_load(handle)
    validator = jsonschema.Draft202012Validator(schema)
    messages = []
    for error in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(part) for part in error.absolute_path)
        if error.validator == "additionalProperties":
            allowed = sorted(error.schema.get("properties", {}))
            unknown = sorted(set(error.instance) - set(allowed))
            for key in unknown:
                hint = difflib.get_close_matches(key, allowed, n=1)
                suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
                messages.append(f"{where + '.' if where else ''}{key}: unknown key{suggestion}; "
                                f"allowed keys: {', '.join(allowed)}")
        else:
            messages.append(f"{where or '<top level>'}: {error.message}")
    return messages


def check_schema(config: dict[str, Any], schema_path: str | os.PathLike = SCHEMA_PATH) -> None:
    """Raise ConfigError listing every violation, one line each, naming the keys."""
    errors = schema_errors(config, schema_path)
    if errors:
        raise ConfigError("Invalid configuration:\n  " + "\n  ".join(errors))


def apply_environment_overrides(config: dict[str, Any], base_dir: str | os.PathLike = REPO_ROOT) -> dict[str, Any]:
    """Let ``BALANCEDBIO_BENCHMARKS_DIR`` override ``benchmarks_dir``; make config paths absolute.

    Relative paths in a config are relative to the workflow folder (``base_dir``), so a run
    with ``--directory elsewhere`` reads the same files. Changes ``config`` in place.
    """
    override = os.environ.get(BENCHMARKS_DIR_ENV)
    if override:
        config["benchmarks_dir"] = str(Path(override).expanduser().resolve())
    elif config.get("benchmarks_dir"):
        config["benchmarks_dir"] = _absolute(config["benchmarks_dir"], base_dir)
    if config["training"].get("deepspeed_config"):
        config["training"]["deepspeed_config"] = _absolute(config["training"]["deepspeed_config"], base_dir)
    return config


def _absolute(path: str, base_dir: str | os.PathLike) -> str:
    expanded = Path(path).expanduser()
    return str(expanded if expanded.is_absolute() else (Path(base_dir) / expanded).resolve())


def check_semantics(config: dict[str, Any]) -> None:
    """Checks the JSON schema cannot express; raise ConfigError naming the key."""
    try:
        resolve_model(config["model"]["source"])
    except ModelResolutionError as err:
        raise ConfigError(f"model.source: {err}") from None

    if config["model"]["trust_remote_code"] and config["model"]["source"].startswith("embedded:"):
        raise ConfigError("model.trust_remote_code: embedded models need no remote code; leave it false.")

    ds_config = config["training"].get("deepspeed_config")
    if ds_config and not Path(ds_config).is_file():
        raise ConfigError(f"training.deepspeed_config: file '{ds_config}' does not exist.")
    if ds_config and config.get("aoc", {}).get("mode", "off") != "off":
        import json

        stage = json.loads(Path(ds_config).read_text(encoding="utf-8")).get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            raise ConfigError(
                f"aoc.mode: {config['aoc']['mode']} needs each rank's whole gradient of the trainable weights, "
                f"which DeepSpeed ZeRO-3 ({ds_config}) shards away; use ZeRO-2 "
                "(config/deepspeed_zero2.json) or set aoc.mode: off.")
    _check_local_model(config.get("prm", {}).get("encoder"), "prm.encoder")
    for section in ("instruct", "sft_data"):
        low, high = config.get(section, {}).get("min_instructions"), config.get(section, {}).get("max_instructions")
        if low is not None and high is not None and low > high:
            raise ConfigError(f"{section}.min_instructions: {low} is more than {section}.max_instructions: {high}; "
                              "each prompt draws between min and max instructions.")
    grpo = config.get("grpo", {})
    per_step = grpo.get("prompts_per_step", 2)
    if grpo.get("max_prompts") is not None and per_step > grpo["max_prompts"]:
        raise ConfigError(f"grpo.prompts_per_step: {per_step} distinct prompts per step, but grpo.max_prompts: "
                          f"{grpo['max_prompts']} keeps only that many, so every step would repeat prompts; raise "
                          "max_prompts or lower prompts_per_step.")
    instruction_prompts = config.get("instruct", {}).get("num_prompts")
    if instruction_prompts is not None and per_step // 2 > instruction_prompts:
        raise ConfigError(f"grpo.prompts_per_step: {per_step} needs {per_step // 2} instruction prompts per step, "
                          f"but instruct.num_prompts is {instruction_prompts}.")
    if per_step % 2:
        raise ConfigError(f"grpo.prompts_per_step: {per_step} cannot split evenly between the "
                          "medical and the instruction prompts; use an even number.")
    if grpo.get("use_vllm") and grpo.get("rollout_weights", "policy") != "policy":
        raise ConfigError(f"grpo.rollout_weights: {grpo['rollout_weights']} selects a transformers sampling copy, "
                          "but grpo.use_vllm is true and vLLM samples; set rollout_weights: policy.")


def _check_local_model(source: str | None, key: str) -> None:
    """A local model folder must hold safetensors weights (checked here, before any rule runs)."""
    from balancedbio.models import _looks_like_path

    if source and (_looks_like_path(source) or Path(source).expanduser().is_dir()):
        try:
            resolve_model(source)
        except ModelResolutionError as err:
            raise ConfigError(f"{key}: {err}") from None


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None,
                base_dir: str | os.PathLike = REPO_ROOT) -> dict[str, Any]:
    """Read a YAML config, validate it against the schema (filling defaults) and check it."""
    from snakemake.utils import validate

    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    if overrides:
        config = _deep_merge(config, overrides)
    try:
        check_schema(config)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    validate(config, str(SCHEMA_PATH), set_default=True)  # fills the schema's defaults
    apply_environment_overrides(config, base_dir)
    check_semantics(config)
    return config


def _deep_merge(base: dict, extra: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged

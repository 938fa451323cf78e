"""Run configuration: schema validation (with defaults), environment overrides, semantic checks.

The Snakefile validates with ``snakemake.utils.validate`` against ``workflow/schemas/config.schema.yaml``;
``load_config`` does the same outside Snakemake (tests, notebooks, scripts).
"""

from __future__ import annotations

import copy
import difflib
import math
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
    # NaN passes every minimum and maximum (each comparison is false), and .inf passes those
    # without a bound on its side: both are named here, before the schema is asked.
    messages = non_finite_keys(config)
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


def non_finite_keys(value: Any, where: str = "") -> list[str]:
    """One line per non-finite number (YAML .inf, -.inf, .nan) anywhere in ``value``, naming its key."""
    if isinstance(value, float) and not math.isfinite(value):
        return [f"{where or '<top level>'}: {value} is not a finite number"]
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return []
    return [line for key, item in items for line in non_finite_keys(item, f"{where}.{key}" if where else str(key))]


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
    _check_eval_models(config.get("eval", {}).get("models"))
    _check_nli_model(config.get("rewards", {}))
    training = config.get("training", {})
    if training.get("use_lora"):
        _check_lora_targets(training.get("lora", {}).get("target_modules", "all-linear"), config["model"])
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


def _check_eval_models(models: list[str] | None) -> None:
    """Each eval.models entry is a model some rule trains: base, sft or grpo_<a known variant>."""
    from balancedbio.variants import ABLATION_VARIANTS, DEFAULT_VARIANTS, is_variant

    for model in models or []:
        if model in ("base", "sft") or (model.startswith("grpo_") and is_variant(model[len("grpo_"):])):
            continue
        known = ", ".join(f"grpo_{v}" for v in (*DEFAULT_VARIANTS, *ABLATION_VARIANTS))
        raise ConfigError(f"eval.models: '{model}' is no model this workflow trains; use base, sft, or grpo_ and "
                          f"a variant ({known}, or grpo_g<group size>).")


def _check_nli_model(rewards: dict[str, Any]) -> None:
    """rewards.nli_model resolves, has an 'entailment' label where its config can be read here,
    and, with HF_HUB_OFFLINE set, a hub id is in the local cache (else it could never load)."""
    from balancedbio.models import hub_offline

    source = rewards.get("nli_model")
    if not source:
        return
    try:
        resolved = resolve_model(source)
    except ModelResolutionError as err:
        raise ConfigError(f"rewards.nli_model: {err}") from None
    if resolved.is_gguf:
        raise ConfigError(f"rewards.nli_model: '{source}' is a GGUF language model, not an NLI classifier.")
    config_file: str | None = None
    if resolved.kind == "hub":
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(resolved.location, "config.json", revision=rewards.get("nli_revision"))
        config_file = cached if isinstance(cached, str) else None
        if config_file is None and hub_offline():
            raise ConfigError(f"rewards.nli_model: hub model '{source}' is not in the local Hugging Face cache and "
                              "HF_HUB_OFFLINE is set, so it cannot load; download it first (huggingface-cli "
                              f"download {source}) or unset HF_HUB_OFFLINE.")
    else:
        config_file = str(Path(resolved.location) / "config.json")
    if config_file and Path(config_file).is_file():
        import json

        labels = json.loads(Path(config_file).read_text(encoding="utf-8")).get("id2label") or {}
        if "entailment" not in {str(v).lower() for v in labels.values()}:
            raise ConfigError(f"rewards.nli_model: '{source}' has no 'entailment' label (its labels: "
                              f"{sorted(labels.values())}); use an NLI model.")


# Module types peft's LoRA can wrap (torch.nn names): a target naming anything else fails in peft.
_LORA_MODULE_TYPES = ("Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Conv1D")


def _check_lora_targets(targets: str | list[str], model: dict[str, Any]) -> None:
    """training.lora.target_modules against the model's module names, with peft's matching rules
    (a string is a regex over full names, a list holds names or name suffixes), when the model's
    architecture can be read here without the network; else peft checks it in the rule."""
    import re

    if targets == "all-linear":
        return
    names = lora_module_names(model["source"], revision=model.get("revision"),
                              trust_remote_code=model.get("trust_remote_code", False))
    if names is None:
        return
    suffixes = sorted({name.rsplit(".", 1)[-1] for name in names})
    if isinstance(targets, str):
        try:
            unmatched = [] if any(re.fullmatch(targets, name) for name in names) else [targets]
        except re.error as err:
            raise ConfigError(f"training.lora.target_modules: '{targets}' is not a valid regular expression "
                              f"({err}).") from None
    else:
        unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ConfigError(f"training.lora.target_modules: {', '.join(map(repr, unmatched))} names no layer LoRA can "
                          f"adapt in {model['source']}; its layers are: {', '.join(suffixes)} (or 'all-linear').")


def lora_module_names(source: str, *, revision: str | None = None, trust_remote_code: bool = False) -> list[str] | None:
    """Full names of the modules of ``source``'s architecture that LoRA can wrap, from its config
    alone (an empty model on the meta device, one layer deep); None when the config cannot be
    read without the network or without running remote code."""
    import json

    try:
        resolved = resolve_model(source)
    except ModelResolutionError:
        return None
    config_dict: dict[str, Any] | None = None
    if resolved.is_gguf:
        architecture = gguf_architecture(Path(resolved.location) / resolved.gguf_file)
        config_dict = {"model_type": architecture} if architecture else None
    else:
        if resolved.kind == "hub":
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(resolved.location, "config.json", revision=revision)
            config_file = Path(cached) if isinstance(cached, str) else None
        else:
            config_file = Path(resolved.location) / "config.json"
        if config_file and config_file.is_file():
            config_dict = json.loads(config_file.read_text(encoding="utf-8"))
    if not config_dict or not config_dict.get("model_type") or (config_dict.get("auto_map") and not trust_remote_code):
        return None
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        extra = {k: v for k, v in config_dict.items() if k not in ("model_type", "auto_map", "architectures")}
        config = AutoConfig.for_model(config_dict["model_type"], **extra)
        for depth_key in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(config, depth_key):
                setattr(config, depth_key, 1)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # an architecture this transformers cannot build: peft will say it in the rule
    return [name for name, module in model.named_modules() if type(module).__name__ in _LORA_MODULE_TYPES]


_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str | os.PathLike) -> str | None:
    """``general.architecture`` from a GGUF file's header, read up to that key (gguf's own
    reader parses every tensor and token first: seconds, where this takes microseconds)."""
    import struct

    def read(handle, fmt):
        return struct.unpack("<" + fmt, handle.read(struct.calcsize(fmt)))[0]

    def skip(handle, kind):
        if kind == _GGUF_STRING:
            handle.seek(read(handle, "Q"), os.SEEK_CUR)
        elif kind == _GGUF_ARRAY:
            item_kind, count = read(handle, "I"), read(handle, "Q")
            if item_kind in _GGUF_SCALAR_SIZES:
                handle.seek(count * _GGUF_SCALAR_SIZES[item_kind], os.SEEK_CUR)
            else:
                for _ in range(count):
                    skip(handle, item_kind)
        else:
            handle.seek(_GGUF_SCALAR_SIZES[kind], os.SEEK_CUR)

    try:
        with open(path, "rb") as handle:
            if handle.read(4) != b"GGUF" or read(handle, "I") < 2:
                return None
            _tensors, pairs = read(handle, "Q"), read(handle, "Q")
            for _ in range(pairs):
                key = handle.read(read(handle, "Q")).decode("utf-8", "replace")
                kind = read(handle, "I")
                if key == "general.architecture" and kind == _GGUF_STRING:
                    return handle.read(read(handle, "Q")).decode("utf-8", "replace")
                skip(handle, kind)
    except (OSError, struct.error, KeyError):
        return None
    return None


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

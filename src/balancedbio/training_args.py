"""Typed GRPO settings: ``BalancedGRPOConfig`` (a ``trl.GRPOConfig``) and the recipe's paths.

TRL's own fields (``num_generations``, ``beta``, ``learning_rate``, ``report_to`` ...) keep
their TRL names and meaning. The fields this project adds are generated from the config schema
(``workflow/schemas/config.schema.yaml``), so the schema stays the one source of their
defaults, types and help texts:

- ``weights_<key>``, ``aoc_<key>``, ``ppo_<key>``, ``rewards_<key>``: every key of those
  config sections (``weights_kp`` is ``weights.kp``, ``aoc_mode`` is ``aoc.mode`` ...);
- ``prompts_per_step``, ``max_prompts``, ``rollout_weights``, ``advantage_aggregation``,
  ``advantage_std_floor``, ``resample_constant_groups``: the ``grpo`` keys TRL does not have. ``prompts_per_step`` sets
  ``per_device_train_batch_size`` (= prompts_per_step * num_generations);
- ``variant``, ``use_prm``, ``advantage_estimator``: what a variant changes besides those.

``__post_init__`` validates each section against the schema and raises ``ValueError`` naming
the field (``aoc_tau (aoc.tau): 2 is greater than the maximum of 1``). A YAML recipe with
these fields, ``GRPOScriptArguments``' paths and TRL's ``ModelConfig`` (LoRA as
``use_peft``/``lora_r``...) runs as ``python -m balancedbio.train grpo --config recipe.yaml``
through ``trl.TrlParser``; the Snakemake rule builds the same config from the run's config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import GRPOConfig

from balancedbio.defaults import _properties, schema_description

# Config sections that become prefixed fields, and the grpo keys TRL has no field for.
PREFIXED_SECTIONS = ("weights", "aoc", "ppo", "rewards")
GRPO_EXTRA_KEYS = ("prompts_per_step", "max_prompts", "rollout_weights", "advantage_aggregation",
                   "advantage_std_floor", "resample_constant_groups")
FIELD_KEYS: dict[str, tuple[str, str]] = {}  # generated field -> (config section, key)


def _field_type(spec: dict) -> Any:
    if "enum" in spec:
        return Literal[tuple(spec["enum"])]
    kinds = spec.get("type")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    nullable = "null" in kinds
    base = {"number": float, "integer": int, "boolean": bool, "string": str, "object": dict | str,
            "array": list[str]}[next(k for k in kinds if k != "null")]
    if base is dict | str:
        return dict | str | None  # a YAML mapping, or JSON text on the command line
    return base | None if nullable else base


def _schema_fields() -> list[tuple[str, Any, Any]]:
    fields = []
    for section in PREFIXED_SECTIONS:
        for key, spec in _properties(section).items():
            fields.append((f"{section}_{key}", section, key, spec))
    for key in GRPO_EXTRA_KEYS:
        fields.append((key, "grpo", key, _properties("grpo")[key]))
    made = []
    for name, section, key, spec in fields:
        FIELD_KEYS[name] = (section, key)
        default = spec.get("default")
        help_text = f"{section}.{key} in the workflow config. {schema_description(section, key)}".strip()
        if isinstance(default, (dict, list)):
            value = field(default_factory=lambda d=default: json.loads(json.dumps(d)),
                          metadata={"help": help_text})
        else:
            value = field(default=default, metadata={"help": help_text})
        made.append((name, _field_type(spec), value))
    return made


@dataclass
class _BalancedFields(GRPOConfig):
    variant: str = field(default="full", metadata={"help": "Name of the GRPO variant (balancedbio.variants)."})
    use_prm: bool = field(default=True, metadata={"help": "Score reasoning with the process reward model "
                                                          "(R_reas); off in the no_prm ablation."})
    advantage_estimator: Literal["group", "critic"] = field(
        default="group", metadata={"help": "group = GRPO's group-relative advantages; critic = the ppo "
                                           "ablation's learned value function with GAE."})


def _post_init(self) -> None:
    import jsonschema

    for name in ("weights_initial",):
        if isinstance(getattr(self, name), str):  # JSON text from the command line
            try:
                setattr(self, name, json.loads(getattr(self, name)))
            except json.JSONDecodeError as err:
                raise ValueError(f"{name}: not a JSON object ({err})") from None
    for section in (*PREFIXED_SECTIONS, "grpo"):
        values = self.section(section)
        schema = {"type": "object", "properties": {k: _properties(section)[k] for k in values}}
        for error in jsonschema.Draft202012Validator(schema).iter_errors(values):
            key = error.absolute_path[0] if error.absolute_path else "?"
            name = f"{section}_{key}" if section != "grpo" else key
            raise ValueError(f"BalancedGRPOConfig.{name} ({section}.{key}): {error.message}")
    if not self.weights_min_weight < self.weights_max_weight:
        raise ValueError(f"BalancedGRPOConfig.weights_min_weight ({self.weights_min_weight}) must be below "
                         f"weights_max_weight ({self.weights_max_weight})")
    if self.advantage_estimator not in ("group", "critic"):
        raise ValueError(f"BalancedGRPOConfig.advantage_estimator: {self.advantage_estimator!r} is not "
                         "'group' or 'critic'")
    if self.num_generations is not None:
        # The batch is prompts_per_step distinct prompts, each sampled num_generations times.
        self.per_device_train_batch_size = self.prompts_per_step * self.num_generations
    if self.advantage_aggregation != "weighted_components":
        self.multi_objective_aggregation = self.advantage_aggregation  # TRL computes those two itself
    GRPOConfig.__post_init__(self)


def _section(self, name: str) -> dict:
    """One config section's values (``weights``, ``aoc``, ``ppo``, ``rewards`` or the ``grpo`` extras)."""
    if name == "grpo":
        return {key: getattr(self, key) for key in GRPO_EXTRA_KEYS}
    return {key: getattr(self, name_) for name_, (section, key) in FIELD_KEYS.items() if section == name}


BalancedGRPOConfig = dataclasses.make_dataclass(
    "BalancedGRPOConfig", _schema_fields(), bases=(_BalancedFields,),
    namespace={"__post_init__": _post_init, "section": _section,
               "__doc__": "``trl.GRPOConfig`` plus the settings of capability-aware GRPO (see the module doc)."})
BalancedGRPOConfig.__module__ = __name__


@dataclass
class GRPOScriptArguments:
    """Where a GRPO run reads its prompts and writes its results (a recipe's paths).

    The model the policy starts from is TRL's ``ModelConfig.model_name_or_path``.
    """

    mcq: str = field(metadata={"help": "Medical multiple-choice prompts (JSONL)."})
    prompts: str = field(metadata={"help": "IFEval-style instruction prompts (JSONL)."})
    out: str = field(metadata={"help": "Folder the merged, trained model is written to."})
    dynamics: str = field(metadata={"help": "Where the per-step dynamics.jsonl goes."})
    checkpoints: str = field(metadata={"help": "Checkpoint folder (a run resumes from its newest checkpoint)."})
    prm: str | None = field(default=None, metadata={"help": "The process reward model folder (use_prm)."})
    figure: str | None = field(default=None, metadata={"help": "Optional PNG of the dynamics."})

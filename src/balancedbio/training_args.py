"""Typed GRPO settings: ``BalancedGRPOConfig`` (a ``trl.GRPOConfig``) and the recipe's paths.

TRL's own fields (``num_generations``, ``beta``, ``learning_rate``, ``report_to`` ...) keep
their TRL names and meaning. The fields this project adds are written out below, each with its
default and a help text (``--help`` shows them); they mirror the workflow config:

- ``weights_<key>``, ``aoc_<key>``, ``ppo_<key>``, ``rewards_<key>``: every key of those
  config sections (``weights_kp`` is ``weights.kp``, ``aoc_mode`` is ``aoc.mode`` ...);
- ``prompts_per_step``, ``max_prompts``, ``rollout_weights``, ``advantage_aggregation``,
  ``advantage_std_floor``, ``resample_constant_groups``, ``precision``: the ``grpo`` keys TRL
  does not have.
  ``prompts_per_step`` sets ``per_device_train_batch_size`` (= prompts_per_step * num_generations);
- ``variant``, ``use_prm``, ``advantage_estimator``: what a variant changes besides those.

The config schema (``balancedbio/schemas/config.schema.yaml``) stays the reference: a test keeps
every field's name and default equal to it, and ``__post_init__`` validates each section against it,
raising ``ValueError`` naming the field (``aoc_tau (aoc.tau): 2 is greater than the maximum of 1``).

A YAML recipe with these fields, ``GRPOScriptArguments``' paths and TRL's ``ModelConfig`` (the
starting model as ``model_name_or_path``, LoRA as ``use_peft``/``lora_r``...) runs as
``balancedbio train grpo --config recipe.yaml``; the Snakemake rule writes such a recipe for every
variant (``balancedbio.variants.grpo_recipe``) and runs the same command.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from trl import GRPOConfig

from balancedbio.defaults import _properties
from balancedbio.variants import GRPO_EXTRA_KEYS, PREFIXED_SECTIONS


_CONFIG_KEY = re.compile(r"^(\w+)\.(\w+) in the workflow config\.")


def _setting(section: str, key: str, default: Any, help_text: str) -> Any:
    """A field that is ``section.key`` of the workflow config; its help text starts by naming it (and
    ``FIELD_KEYS`` reads it there: TRL's parser passes every metadata entry on to argparse)."""
    metadata = {"help": f"{section}.{key} in the workflow config. {help_text}"}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: json.loads(json.dumps(default)), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class BalancedGRPOConfig(GRPOConfig):
    """``trl.GRPOConfig`` plus the settings of capability-aware GRPO (see the module doc)."""

    # -- what a variant changes ---------------------------------------------------------------
    variant: str = field(default="full", metadata={"help": "Name of the GRPO variant (balancedbio.variants)."})
    use_prm: bool = field(default=True, metadata={"help": "Score reasoning with the process reward model "
                                                          "(R_reas); off in the no_prm ablation."})
    advantage_estimator: Literal["group", "critic"] = field(
        default="group", metadata={"help": "group = GRPO's group-relative advantages; critic = the ppo "
                                           "ablation's learned value function with GAE."})

    # -- weights: the reward-weight controller (eq. 10) ------------------------------------------
    weights_mode: Literal["pid", "static", "dwa"] = _setting(
        "weights", "mode", "pid", "pid = the paper's controller; static = fixed weights (Table 2 row b); "
        "dwa = Dynamic Weight Average.")
    weights_initial: dict | str | None = _setting(
        "weights", "initial", {}, "Starting weight per component ({accuracy: 1.0, ...}; JSON on the command line); "
        "missing components start at 1.")
    weights_ema: float = _setting("weights", "ema", 0.1, "EMA rate of the success rates S_k.")
    weights_kp: float = _setting("weights", "kp", 2.0, "Proportional gain on log w.")
    weights_ki: float = _setting("weights", "ki", 0.2, "Integral gain on log w.")
    weights_kd: float = _setting("weights", "kd", 0.0, "Derivative gain on log w.")
    weights_min_weight: float = _setting("weights", "min_weight", 0.1, "Lower bound (never reached) of a weight.")
    weights_max_weight: float = _setting("weights", "max_weight", 10.0, "Upper bound (never reached) of a weight.")
    weights_integral_limit: float = _setting("weights", "integral_limit", 5.0, "Anti-windup clip of the integral.")
    weights_saturation: float = _setting(
        "weights", "saturation", 0.95, "Anti-windup: past this fraction of the log half-width, a weight pushed "
        "further out stops integrating.")
    weights_normalize: bool = _setting("weights", "normalize", True, "Rescale the weights to geometric mean 1.")
    weights_dwa_temperature: float = _setting("weights", "dwa_temperature", 2.0, "Temperature of DWA's softmax.")

    # -- aoc: Active Orthogonality Control (eqs. 4-6) --------------------------------------------
    aoc_mode: Literal["penalty", "project", "monitor", "off"] = _setting(
        "aoc", "mode", "penalty", "penalty = L_orth on the update (the paper); project = PCGrad/GradVac; "
        "monitor = measure S_cos only; off = TRL's step.")
    aoc_interval: int = _setting("aoc", "interval", 1, "Apply AOC every N optimizer steps.")
    aoc_tau: float = _setting("aoc", "tau", 0.1, "The penalty acts only when |S_cos| > tau (eq. 6).")
    aoc_lambda: float = _setting("aoc", "lambda", 0.6, "Strength of the orthogonality penalty.")
    aoc_lambda_scaling: Literal["gradient_norm", "constant"] = _setting(
        "aoc", "lambda_scaling", "gradient_norm", "gradient_norm = lambda * min(1, |g_R + g_I| / |grad S_cos^2|); "
        "constant = lambda.")
    aoc_penalty_gradient: Literal["finite_difference", "hessian_vector", "exact"] = _setting(
        "aoc", "penalty_gradient", "finite_difference", "How the gradient of L_orth is computed: forward "
        "differences of fp32 per-capability gradients, exact Hessian-vector products at the training's "
        "precision, or a double backward of the whole penalty (~10x memory).")
    aoc_fd_step: float = _setting("aoc", "fd_step", 0.001, "Finite-difference step, relative to the weights' norm.")
    aoc_micro_batch_rows: int | None = _setting(
        "aoc", "micro_batch_rows", 8, "Completions per capability pass (null = all at once); bounds memory only.")
    aoc_eps: float = _setting("aoc", "eps", 1e-08, "Added to the norms in S_cos.")
    aoc_projection: Literal["pcgrad", "gradvac"] = _setting("aoc", "projection", "pcgrad",
                                                             "The projection of mode project.")
    aoc_gradvac_beta: float = _setting("aoc", "gradvac_beta", 0.01, "EMA rate of GradVac's target cosine.")

    # -- ppo: the critic of the ppo ablation -----------------------------------------------------
    ppo_gamma: float = _setting("ppo", "gamma", 1.0, "Discount of GAE.")
    ppo_gae_lambda: float = _setting("ppo", "gae_lambda", 0.95, "Lambda of GAE.")
    ppo_critic_learning_rate: float = _setting("ppo", "critic_learning_rate", 1e-05, "The critic's learning rate.")
    ppo_critic_max_grad_norm: float = _setting("ppo", "critic_max_grad_norm", 1.0, "The critic's gradient clip.")

    # -- rewards: R_acc, R_reas, R_inst ---------------------------------------------------------
    rewards_gamma: float = _setting("rewards", "gamma", 0.001, "Weight of the length term in R_reas (eq. 8).")
    rewards_length_target: int = _setting("rewards", "length_target", 200,
                                          "L_target in words; longer completions get no more length reward.")
    rewards_prm_aggregate: Literal["mean", "min"] = _setting("rewards", "prm_aggregate", "mean",
                                                             "How the PRM's step scores become R_reas.")
    rewards_instruction_mode: Literal["strict", "loose"] = _setting(
        "rewards", "instruction_mode", "strict", "IFEval's strict or loose instruction check.")
    rewards_nli_model: str | None = _setting("rewards", "nli_model", None,
                                             "Hub NLI model for open answers (safetensors only); off by default.")
    rewards_nli_revision: str | None = _setting("rewards", "nli_revision", None,
                                                "Hub revision (branch, tag or commit) of rewards_nli_model.")

    # -- grpo keys TRL does not have -----------------------------------------------------------
    prompts_per_step: int = _setting("grpo", "prompts_per_step", 2, "Distinct prompts per device per step "
                                     "(each sampled num_generations times); half medical, half instruction.")
    max_prompts: int | None = _setting("grpo", "max_prompts", None,
                                       "Use at most this many training prompts (half per capability).")
    rollout_weights: Literal["policy", "float32", "bfloat16", "auto"] = _setting(
        "grpo", "rollout_weights", "policy", "What generation samples from without vLLM: the policy itself, or a "
        "merged copy in float32 / bfloat16 (auto: bfloat16 where it is faster).")
    advantage_aggregation: Literal["weighted_components", "sum_then_normalize", "normalize_then_sum"] = _setting(
        "grpo", "advantage_aggregation", "weighted_components", "weighted_components = eq. 11 (A = sum_k w_k A_k); "
        "sum_then_normalize = TRL's default; normalize_then_sum = TRL's GDPO.")
    advantage_std_floor: float = _setting("grpo", "advantage_std_floor", 0.1,
                                          "The least batch std a component's centred rewards are divided by.")
    resample_constant_groups: int = _setting(
        "grpo", "resample_constant_groups", 0, "Dynamic sampling (DAPO): rounds per step that replace groups with "
        "all-equal rewards by fresh prompts of the same capability; 0 = off.")
    precision: Literal["auto", "bf16", "fp32"] = _setting(
        "grpo", "precision", "fp32", "bf16 autocast for GRPO's passes on fp32 weights: auto = where this "
        "device multiplies bf16 faster, bf16 = always, fp32 = never (training.bf16 implies bf16).")

    def __post_init__(self) -> None:
        import jsonschema

        if isinstance(self.weights_initial, str):  # JSON text from the command line
            try:
                self.weights_initial = json.loads(self.weights_initial)
            except json.JSONDecodeError as err:
                raise ValueError(f"weights_initial: not a JSON object ({err})") from None
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
        if not self.bf16 and self.precision != "fp32":
            from balancedbio.models import bf16_autocast

            # Resolved where the run runs (a SLURM node, not the head node that wrote the recipe).
            self.bf16 = bf16_autocast(self.precision, "grpo.precision")
        if self.bf16 and not self.use_cpu:
            import torch

            # training.bf16 on a machine without CUDA: bf16 on the CPU, as SFT does, instead of
            # transformers' "Your setup doesn't support bf16/gpu" late in the rule.
            self.use_cpu = not torch.cuda.is_available()
        super().__post_init__()

    def section(self, name: str) -> dict:
        """One config section's values (``weights``, ``aoc``, ``ppo``, ``rewards`` or the ``grpo`` extras)."""
        return {key: getattr(self, field_name) for field_name, (section, key) in FIELD_KEYS.items()
                if section == name}


# Field -> (config section, key), for every field above that mirrors the workflow config.
FIELD_KEYS: dict[str, tuple[str, str]] = {
    f.name: match.groups() for f in dataclasses.fields(BalancedGRPOConfig)
    if (match := _CONFIG_KEY.match(f.metadata.get("help", "")))}
assert tuple(key for section, key in FIELD_KEYS.values() if section == "grpo") == GRPO_EXTRA_KEYS


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

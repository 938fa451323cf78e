"""Capability-aware GRPO (section 4, Algorithm 1): a subclass of TRL's ``GRPOTrainer``.

TRL keeps doing what it does (sampling G completions per prompt, clipped ratio, KL against
the reference policy); this subclass adds:

- **Stratified batches** (appendix B): ``StratifiedRepeatSampler`` interleaves medical and
  instruction prompts so every generation batch, and every device's slice of it, holds both.
- **Composite reward** over accuracy, reasoning, instruction (``balancedbio.rewards``). A
  component that does not apply to a prompt returns ``None`` (NaN in TRL's reward matrix): an
  instruction prompt has no R_acc and no R_reas, a multiple-choice prompt has no R_inst.
- **Advantages of eq. 11** (``grpo.advantage_aggregation: weighted_components``):
  A = sum_k w_k A_k with each A_k centred in its group and scaled by its own batch-level std
  (``weighted_component_advantages``), so a weight sets its capability's share of the update.
  TRL's ``sum_then_normalize`` / ``normalize_then_sum`` remain selectable; TRL computes them.
- **Dynamic weights** (eq. 10, ``balancedbio.weights``): after the rewards of a batch are
  computed, each component's success rate updates the controller and the new weights are used
  for *this* batch's advantages (Algorithm 1, lines 13-15).
- **Active Orthogonality Control** (eqs. 4-6, ``balancedbio.aoc``): every ``aoc.interval``
  optimizer steps ``training_step`` computes TRL's own loss on the medical rows and on the
  instruction rows of the micro-batch (scaled so they sum exactly to the full loss), takes
  one ``torch.autograd.grad`` per capability over the trainable parameters (the LoRA
  weights when LoRA is on), and then, by mode: ``penalty`` adds the gradient of L_orth
  (finite-difference Hessian-vector products, or a double backward), ``project`` combines
  them with PCGrad/GradVac, ``monitor`` only logs S_cos; ``off`` leaves TRL's step untouched.
  These gradients and probes run in fp32 (autocast off). Under DDP/DeepSpeed they are averaged
  across ranks before S_cos, every branch is taken from the averaged values, and the update is
  one ``accelerator.backward`` (see ``orthogonality_step``).
- One JSON line per optimizer step in ``dynamics.jsonl`` and checkpoints that carry the
  controller state, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
import random
import shutil
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Sampler
from transformers import TrainerCallback
from trl import GRPOTrainer

from balancedbio.aoc import (Projector, add_gradients, average_across_ranks, cosine_from_gramian,
                             cosine_gradient_directions, dynamic_lambda, gramian, orthogonality_penalty)
from balancedbio.models import lora_config, save_merged  # noqa: F401 (re-exported: recipes and bench use them)
from balancedbio.ppo import CriticAdvantage
from balancedbio.weights import WeightController, build_weight_controller

log = logging.getLogger(__name__)

STATE_FILE = "balancedbio_state.json"
CAPABILITIES = ("medical", "instruction")

# Variant names and settings live in a torch-free module: the Snakefile imports them to build the DAG.
from balancedbio.variants import ABLATION_VARIANTS, DEFAULT_VARIANTS, GROUP_SIZES, variant_settings  # noqa: E402,F401


class StratifiedRepeatSampler(Sampler):
    """TRL's ``RepeatSampler`` contract, with every batch interleaving the capabilities.

    Each batch of ``batch_size`` distinct prompts takes them round-robin from the per-capability
    pools (medical, instruction, medical, ...), each pool walked in its own shuffled order and
    reshuffled when exhausted, so the smaller pool is cycled rather than starving the batch.
    Every prompt is yielded ``mini_repeat_count`` times in a row (the G completions) and each
    batch ``repeat_count`` times (reuse over iterations), exactly as TRL expects.
    """

    def __init__(self, capabilities: Sequence[str], batch_size: int, mini_repeat_count: int = 1,
                 repeat_count: int = 1, shuffle: bool = True, seed: int | None = None):
        pools: dict[str, list[int]] = {}
        for index, capability in enumerate(capabilities):
            pools.setdefault(capability, []).append(index)
        order = {name: i for i, name in enumerate(CAPABILITIES)}
        self.pools = [pools[name] for name in sorted(pools, key=lambda c: (order.get(c, len(order)), c))]
        if len(self.pools) > 1 and batch_size < len(self.pools):
            raise ValueError(f"a batch of {batch_size} prompt(s) cannot hold all {len(self.pools)} capabilities "
                             f"({', '.join(sorted(pools))}); raise grpo.prompts_per_step")
        self.batch_size, self.mini_repeat_count, self.repeat_count = batch_size, mini_repeat_count, repeat_count
        self.shuffle = shuffle
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)
        largest = max(len(pool) for pool in self.pools)
        self.num_batches = max(1, math.ceil(largest * len(self.pools) / batch_size))

    def _walk(self, pool: list[int]):
        while True:
            order = torch.randperm(len(pool), generator=self.generator).tolist() if self.shuffle else range(len(pool))
            for i in order:
                yield pool[i]

    def __iter__(self):
        walkers = [self._walk(pool) for pool in self.pools]
        for _ in range(self.num_batches):
            chunk = [next(walkers[i % len(walkers)]) for i in range(self.batch_size)]
            for _ in range(self.repeat_count):
                for index in chunk:
                    for _ in range(self.mini_repeat_count):
                        yield index

    def __len__(self) -> int:
        return self.num_batches * self.batch_size * self.mini_repeat_count * self.repeat_count


def _rng_state() -> tuple:
    return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


class _restored_rng:
    """Run a block with a saved RNG state, then put the current one back."""

    def __init__(self, state: tuple):
        self.state = state

    def __enter__(self):
        self.saved = _rng_state()
        torch.set_rng_state(self.state[0])
        if self.state[1] is not None:
            torch.cuda.set_rng_state_all(self.state[1])

    def __exit__(self, *exc):
        torch.set_rng_state(self.saved[0])
        if self.saved[1] is not None:
            torch.cuda.set_rng_state_all(self.saved[1])
        return False


class _quiet_loss:
    """TRL's ``_compute_loss`` without its metrics, its collectives or its entropy controller's update.

    AOC evaluates extra losses (per capability, at shifted weights) that TRL must not log, and
    under data parallel a rank may run fewer of them than another (one capability only on it):
    a gather there would wait for ranks that never join. Inside the block the accelerator's
    gather/reduce act on the local tensor only (they feed metrics alone in ``_compute_loss``).
    """

    _COLLECTIVES = ("gather", "gather_for_metrics", "reduce")
    _CONTROLLER = ("entropy_coef", "_last_world_entropy", "_entropy_window_stats")

    def __init__(self, trainer):
        self.trainer = trainer

    def __enter__(self):
        trainer, accelerator = self.trainer, self.trainer.accelerator
        self.metrics = trainer._metrics
        trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.controller = {name: getattr(trainer, name) for name in self._CONTROLLER if hasattr(trainer, name)}
        accelerator.gather = lambda tensor: tensor
        accelerator.gather_for_metrics = lambda tensor, *args, **kwargs: tensor
        accelerator.reduce = lambda tensor, reduction="sum", scale=1.0: tensor
        return self

    def __exit__(self, *exc):
        trainer = self.trainer
        for name in self._COLLECTIVES:
            trainer.accelerator.__dict__.pop(name, None)
        trainer._metrics = self.metrics
        for name, value in self.controller.items():
            setattr(trainer, name, value)
        return False


class _fp32_forward:
    """Forward passes in the weights' own precision: autocast off, also inside the wrappers.

    With ``bf16`` and fp32 master weights, accelerate wraps the model's forward in a bf16
    autocast and TRL's log-prob helper opens ``accelerator.autocast()``; AOC's gradients and
    finite-difference probes need fp32 (a forward difference of bf16 gradients is noise), so
    both are switched off for the block.
    """

    def __init__(self, trainer, model):
        self.trainer, self.model = trainer, model

    def __enter__(self):
        self.wrapped_forward, self.autocast = None, None
        if any(p.dtype != torch.float32 for p in self.model.parameters()):
            return self  # bf16 weights (a DeepSpeed bf16 engine) need autocast: their own precision it is
        if "_original_forward" in self.model.__dict__:  # accelerate's autocast wrapper
            self.wrapped_forward = self.model.__dict__.get("forward")
            self.model.forward = self.model.__dict__["_original_forward"]
        self.trainer.accelerator.autocast = lambda *args, **kwargs: contextlib.nullcontext()
        device = next(self.model.parameters()).device.type
        self.autocast = torch.autocast(device_type=device, enabled=False)
        self.autocast.__enter__()
        return self

    def __exit__(self, *exc):
        if self.autocast is None:
            return False
        self.autocast.__exit__(*exc)
        self.trainer.accelerator.__dict__.pop("autocast", None)
        if self.wrapped_forward is not None:
            self.model.forward = self.wrapped_forward
        return False


def _select_rows(inputs: dict, mask: torch.Tensor) -> dict:
    rows = mask.shape[0]
    return {key: value[mask] if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == rows
            else value for key, value in inputs.items()}


def _instruction_share(advantages: torch.Tensor, instruction: torch.Tensor) -> float | None:
    """Share of sum |A| on the instruction rows (None when no row has an advantage)."""
    magnitude = advantages.abs().reshape(advantages.shape[0], -1).sum(dim=1).to(instruction.device)
    total = float(magnitude.sum())
    return float(magnitude[instruction].sum()) / total if total > 0 else None


ADVANTAGE_AGGREGATIONS = ("weighted_components", "sum_then_normalize", "normalize_then_sum")


def weighted_component_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, num_generations: int,
                                  std_floor: float) -> torch.Tensor:
    """Eq. 11's advantages, A = sum_k w_k A_k, for a (rows, K) reward matrix (NaN = not applicable).

    A_k is R_k minus its group mean over the group's rows where R_k applies, divided by
    max(std of those centred values over the whole batch, ``std_floor``); a component that does
    not apply to a row adds 0 to it. Because the scale of A_k does not depend on w_k, raising w_k
    raises the share of the update that component k's rows get, unlike group-normalising
    sum_k w_k R_k, where a weight cancels in any group in which only its component varies.
    """
    rewards = rewards_per_func.to(torch.float32)
    rows, components = rewards.shape
    if rows % num_generations:
        raise ValueError(f"{rows} completions do not split into groups of {num_generations}")
    applies = ~torch.isnan(rewards)
    grouped = torch.where(applies, rewards, 0.0).view(-1, num_generations, components)
    counts = applies.view(-1, num_generations, components).sum(dim=1, keepdim=True)
    means = grouped.sum(dim=1, keepdim=True) / counts.clamp(min=1)
    centred = torch.where(applies, (grouped - means).view(rows, components), 0.0)
    # Batch-level scale of each component: the root mean square of its centred values (their mean is 0).
    scale = (centred.pow(2).sum(dim=0) / applies.sum(dim=0).clamp(min=1)).sqrt().clamp(min=std_floor)
    return (centred / scale * weights.to(centred.device, torch.float32)).sum(dim=1)


class StratifiedGRPOTrainer(GRPOTrainer):
    """TRL's ``GRPOTrainer`` with batches that interleave the capabilities, nothing else.

    The base of ``BalancedGRPOTrainer``, and on its own the fair "vanilla TRL" baseline of the
    step-time benchmark (same prompts in every step as the full trainer). ``rollout_weights``
    other than ``policy`` samples from a merged copy of the policy (``balancedbio.rollout``)
    instead of the training model; ``policy`` is TRL's behaviour.
    """

    def __init__(self, *args, rollout_weights: str = "policy", **kwargs):
        super().__init__(*args, **kwargs)
        self._rollout_copy = None
        if rollout_weights != "policy":
            if self.use_vllm:
                raise ValueError("grpo.rollout_weights applies to transformers generation; with use_vllm, vLLM "
                                 "samples (set rollout_weights: policy)")
            from balancedbio.rollout import RolloutCopy

            self._rollout_copy = RolloutCopy(self.accelerator.unwrap_model(self.model), rollout_weights)

    def _generate_single_turn(self, *args, **kwargs):
        if self._rollout_copy is None:  # TRL's own path (never set together with vLLM: __init__ refuses)
            return super()._generate_single_turn(*args, **kwargs)
        # TRL unwraps self.model_wrapped for generation: point it at the copy, synced to this step's policy.
        self._rollout_copy.sync(self.accelerator.unwrap_model(self.model))
        wrapped = self.model_wrapped
        self.model_wrapped = self._rollout_copy.model
        try:
            return super()._generate_single_turn(*args, **kwargs)
        finally:
            self.model_wrapped = wrapped

    def _get_train_sampler(self, dataset=None) -> Sampler:
        dataset = self.train_dataset if dataset is None else dataset
        return StratifiedRepeatSampler(
            dataset["capability"], batch_size=self.args.generation_batch_size // self.num_generations,
            mini_repeat_count=self.num_generations,
            repeat_count=self.num_iterations * self.args.steps_per_generation,
            shuffle=self.shuffle_dataset, seed=self.args.seed)


class BalancedGRPOTrainer(StratifiedGRPOTrainer):
    """``GRPOTrainer`` + stratified batches, dynamic reward weights and AOC (see module doc)."""

    def __init__(self, *args, weight_controller: WeightController, aoc_config: dict | None = None,
                 advantage_aggregation: str | None = None, advantage_std_floor: float | None = None, **kwargs):
        from balancedbio.defaults import schema_default, with_defaults

        self.weight_controller = weight_controller
        self.aoc = with_defaults("aoc", aoc_config)  # the schema holds the defaults (mode: penalty)
        config = kwargs.get("args")
        # A BalancedGRPOConfig carries both settings; explicit arguments win, then the schema's defaults.
        self.advantage_aggregation = (advantage_aggregation or getattr(config, "advantage_aggregation", None)
                                      or schema_default("grpo", "advantage_aggregation"))
        self.advantage_std_floor = float(advantage_std_floor or getattr(config, "advantage_std_floor", None)
                                         or schema_default("grpo", "advantage_std_floor"))
        if self.advantage_aggregation not in ADVANTAGE_AGGREGATIONS:
            raise ValueError(f"unknown grpo.advantage_aggregation {self.advantage_aggregation!r}: expected one of "
                             f"{', '.join(ADVANTAGE_AGGREGATIONS)}")
        if self.advantage_aggregation != "weighted_components" and config is not None:
            config.multi_objective_aggregation = self.advantage_aggregation  # TRL computes these two itself
        super().__init__(*args, **kwargs)
        names = [getattr(f, "name", getattr(f, "__name__", str(f))) for f in self.reward_funcs]
        if names != weight_controller.names:
            raise ValueError(f"weight controller components {weight_controller.names} != reward functions {names}")
        self.reward_weights = torch.tensor(weight_controller.weights, dtype=torch.float32)
        if self.aoc["mode"] not in {"penalty", "project", "monitor", "off"}:
            raise ValueError(f"unknown aoc.mode {self.aoc['mode']!r}: expected penalty, project, monitor or off")
        distributed = self.is_deepspeed_enabled or self.accelerator.num_processes > 1
        if self.aoc["mode"] == "project" and distributed:
            raise ValueError("aoc.mode=project rewrites the gradients in place, which DeepSpeed and multi-process "
                             "data parallel do not allow; use penalty or monitor there, or run on one device")
        if distributed and self.aoc["mode"] == "penalty" and self.aoc["penalty_gradient"] == "exact":
            raise ValueError("aoc.penalty_gradient=exact differentiates each rank's own gradients, which the "
                             "cross-rank average does not carry; use finite_difference under DeepSpeed or "
                             "multi-process data parallel")
        # Under DeepSpeed / DDP the update must go through accelerator.backward (their hooks reduce and
        # partition gradients): AOC's gradients are averaged across ranks for S_cos and the penalty's
        # probes, and the update is one backward of TRL's loss plus a surrogate of the penalty.
        self._aoc_through_backward = distributed
        self.projector = Projector(self.aoc["projection"], self.aoc["gradvac_beta"]) \
            if self.aoc["mode"] == "project" else None
        self._step_record: dict[str, Any] = {}
        self._check_dynamic_sampling()

    # -- dynamic weights and advantages --------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from accelerate.utils import gather_object

        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # gathered: every process's rows, in process order
        if not self.model.training:
            return rewards_per_func
        rates = []
        for func in self.reward_funcs:
            # The success rate is the policy's over every completion sampled for this step, the ones
            # dynamic sampling discarded included: a rate over the kept groups alone would be pulled
            # towards 1/2 (all-pass and all-fail groups are what it discards).
            discarded = getattr(self, "_discarded_success", {}).get(func.name, [])
            success = gather_object(list(getattr(func, "last_success", None) or []) + list(discarded))
            applicable = [bool(s) for s in success if s is not None]
            rates.append(sum(applicable) / len(applicable) if applicable else None)
        weights = self.weight_controller.update(rates)
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        record = self._step_record
        for name, rate, s, w, e in zip(self.weight_controller.names, rates, self.weight_controller.success,
                                       weights, self.weight_controller.errors()):
            record[f"batch_success_{name}"] = rate
            record[f"success_{name}"] = s
            record[f"weight_{name}"] = w
            record[f"error_{name}"] = e
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        # _generate (dynamic sampling) replaces the rows of groups it resamples in this very list,
        # which TRL then scores; _calculate_rewards counts the discarded rows' successes too.
        self._generation_inputs, self._discarded_success = inputs, {}
        try:
            output = super()._generate_and_score_completions(inputs)
        finally:
            self._generation_inputs = None
        device = output["completion_ids"].device
        rows = output["completion_ids"].shape[0]
        num_generations = self.num_generations if self.model.training else self.num_generations_eval
        rewards_per_func = self._last_rewards_per_func
        if self.advantage_aggregation == "weighted_components":
            advantages = weighted_component_advantages(rewards_per_func, self.reward_weights, num_generations,
                                                       self.advantage_std_floor)
        else:  # TRL's own (sum_then_normalize / normalize_then_sum), already in output["advantages"]
            advantages = None
        # TRL gathers the rewards of all processes, then keeps this process's contiguous slice.
        offset = self.accelerator.process_index * rows
        if advantages is not None:
            output["advantages"] = advantages[offset:offset + rows].to(device=device, dtype=output["advantages"].dtype)
        if self.model.training and "instruction" in self.weight_controller.names:
            # Share of sum |A| on the instruction rows: how much of this batch's policy-gradient signal
            # goes to instruction following, over all processes' rows (eq. 11's advantages are computed
            # for all of them already; TRL's are gathered, on every rank alike).
            instruction = ~torch.isnan(rewards_per_func[:, self.weight_controller.names.index("instruction")])
            if advantages is None:
                from accelerate.utils import gather

                advantages = gather(output["advantages"].reshape(rows, -1).abs().sum(dim=1))
            self._step_record["update_share_instruction"] = _instruction_share(advantages, instruction)
            if self.advantage_aggregation == "weighted_components":
                # The same batch's share had every weight been 1: what the weights changed in this very
                # update (the report compares the two; eq. 11 moves the share up when w_inst is above
                # its equal share 1/K of sum w, down when below).
                equal = weighted_component_advantages(rewards_per_func, torch.ones_like(self.reward_weights),
                                                      num_generations, self.advantage_std_floor)
                self._step_record["update_share_instruction_equal_weights"] = _instruction_share(equal, instruction)
        output["is_medical"] = torch.tensor([row.get("capability") == "medical" for row in inputs],
                                            dtype=torch.bool, device=device)
        return output

    # -- dynamic sampling: replace groups that carry no gradient (DAPO) ---------------------
    @property
    def _resample_rounds(self) -> int:
        return int(getattr(self.args, "resample_constant_groups", 0) or 0)

    def _generate(self, prompts):
        result = super()._generate(prompts)
        inputs = getattr(self, "_generation_inputs", None)
        if self._resample_rounds and self.model.training and inputs is not None:
            result = self._resample_constant_groups(prompts, inputs, result, self._resample_rounds)
        return result

    def _check_dynamic_sampling(self) -> None:
        if not self._resample_rounds:
            return
        if self.rollout_func is not None or self.tools or self.environment_factories is not None:
            raise ValueError("grpo.resample_constant_groups replaces whole prompt groups of plain generation; it "
                             "does not support a rollout_func, tools or environments (set it to 0)")
        if not all(callable(f) and not isinstance(f, torch.nn.Module) and not inspect.iscoroutinefunction(f)
                   for f in self.reward_funcs):
            raise ValueError("grpo.resample_constant_groups scores candidate groups with the reward functions "
                             "and needs plain synchronous callables (set it to 0)")
        rows = self.args.per_device_train_batch_size * self.args.steps_per_generation
        if rows % self.num_generations:
            raise ValueError(f"grpo.resample_constant_groups needs whole groups on each process: "
                             f"{rows} rows per process do not split into groups of {self.num_generations}")

    def _score_rows(self, inputs: list, prompts: list, completions: list, completion_ids: list):
        """(rows, K) rewards (NaN = not applicable) and each component's per-row success, scored locally."""
        keys = [key for key in inputs[0] if key not in ("prompt", "completion", "completion_ids")]
        columns = {key: [row[key] for row in inputs] for key in keys}
        columns.update(trainer_state=self.state, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None)
        values = torch.full((len(prompts), len(self.reward_funcs)), float("nan"))
        success = []
        for k, func in enumerate(self.reward_funcs):
            scores = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
            values[:, k] = torch.tensor([float("nan") if r is None else float(r) for r in scores])
            flags = list(getattr(func, "last_success", None) or [None] * len(prompts))
            success.append(flags)
        return values, success

    def _constant(self, values: torch.Tensor) -> bool:
        """True when no component varies within the group: every advantage of it is 0, whatever the weights."""
        for column in values.T:
            column = column[~torch.isnan(column)]
            if column.numel() > 1 and float(column.max() - column.min()) > 1e-6:
                return False
        return True

    def _global_sum(self, values: list[int]) -> list[int]:
        if self.accelerator.num_processes == 1:
            return values
        total = self.accelerator.reduce(torch.tensor(values, device=self.accelerator.device), reduction="sum")
        return [int(v) for v in total.tolist()]

    @staticmethod
    def _row_key(row: dict) -> str:
        return str(row["key"]) if row.get("key") is not None else json.dumps(row["prompt"], sort_keys=True)

    def _draw_prompts(self, capabilities: list[str], exclude: set, round_index: int) -> list[int]:
        """Dataset indices of fresh prompts, one per requested capability, seeded by (seed, step, rank, round)."""
        if not hasattr(self, "_capability_pools"):
            self._capability_pools: dict[str, list[int]] = {}
            for index, capability in enumerate(self.train_dataset["capability"]):
                self._capability_pools.setdefault(capability, []).append(index)
            self._dataset_keys = [self._row_key(row) for row in self.train_dataset]
        rng = random.Random(f"{self.args.seed}-{self.state.global_step}-{self.accelerator.process_index}-"
                            f"{round_index}")
        picks = []
        for capability in capabilities:
            pool = self._capability_pools[capability]
            fresh = [i for i in pool if self._dataset_keys[i] not in exclude]
            index = rng.choice(fresh or pool)  # a pool smaller than a step's draws repeats prompts
            exclude.add(self._dataset_keys[index])
            picks.append(index)
        return picks

    def _resample_constant_groups(self, prompts: list, inputs: list, result: tuple, rounds: int) -> tuple:
        """Dynamic sampling (DAPO, Yu et al. 2025): a group whose rewards are all equal gets zero advantage in
        every component and adds nothing to the update, nor to S_cos. Up to ``rounds`` times, draw a fresh
        prompt of the same capability for every such group, sample G completions for it, and put it in the
        group's place when its rewards vary. The step keeps its size and its capability mix. Under data
        parallel every process draws as many groups per round as the process with the most constant groups
        (TRL's generation gathers, so every process must generate the same number of rows)."""
        prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images = result
        prompt_ids, completion_ids, completions = list(prompt_ids), list(completion_ids), list(completions)
        logprobs = list(logprobs) if logprobs is not None else None
        size = self.num_generations
        snapshot = [(f, dict(f.stats), f.last_success) for f in self.reward_funcs if hasattr(f, "stats")]
        discarded = self._discarded_success

        def discard(success: list, start: int) -> None:
            for name, flags in zip(self.weight_controller.names, success):  # == the reward functions' names
                discarded.setdefault(name, []).extend(flags[start:start + size])

        values, success = self._score_rows(inputs, prompts, completions, completion_ids)
        constant = [g for g in range(len(prompts) // size) if self._constant(values[g * size:(g + 1) * size])]
        constant_before = len(constant)
        drawn = 0
        try:
            for round_index in range(rounds):
                need = self.accelerator.gather(torch.tensor([len(constant)], device=self.accelerator.device)).max()
                need = int(need)
                if need == 0:
                    break
                wanted = [inputs[g * size]["capability"] for g in constant] or [inputs[0]["capability"]]
                capabilities = [wanted[i % len(wanted)] for i in range(need)]
                exclude = {self._row_key(row) for row in inputs}
                picks = self._draw_prompts(capabilities, exclude, round_index)
                new_inputs = [dict(self.train_dataset[i]) for i in picks for _ in range(size)]
                new_prompts = [row["prompt"] for row in new_inputs]
                kept = {key: len(values_) for key, values_ in self._metrics["train"].items()}
                generated = super()._generate(new_prompts)
                new_prompt_ids, new_completion_ids, _, new_completions, new_logprobs, *_ = generated
                for key, length in kept.items():  # TRL's completion metrics describe the step's first sampling
                    del self._metrics["train"][key][length:]
                drawn += need
                new_values, new_success = self._score_rows(new_inputs, new_prompts, new_completions,
                                                           new_completion_ids)
                varied = [j for j in range(need) if not self._constant(new_values[j * size:(j + 1) * size])]
                still, used = [], set()
                for g in constant:
                    j = next((j for j in varied if capabilities[j] == inputs[g * size]["capability"]), None)
                    if j is None:
                        still.append(g)
                        continue
                    varied.remove(j)
                    used.add(j)
                    discard(success, g * size)
                    rows, source = slice(g * size, (g + 1) * size), slice(j * size, (j + 1) * size)
                    inputs[rows], prompts[rows] = new_inputs[source], new_prompts[source]
                    prompt_ids[rows], completion_ids[rows] = new_prompt_ids[source], new_completion_ids[source]
                    completions[rows] = new_completions[source]
                    if logprobs is not None:
                        logprobs[rows] = new_logprobs[source]
                    for flags, new_flags in zip(success, new_success):
                        flags[rows] = new_flags[source]
                for j in set(range(need)) - used:  # candidates not used: their completions still sampled the policy
                    discard(new_success, j * size)
                constant = still
        finally:
            for func, stats, last in snapshot:
                func.stats, func.last_success = stats, last
        totals = self._global_sum([constant_before, drawn, len(constant)])
        self._step_record.update(constant_groups_sampled=totals[0], groups_resampled=totals[1],
                                 constant_groups_kept=totals[2])
        return prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images

    # -- Active Orthogonality Control -------------------------------------------------------
    def _capability_loss_scale(self, part: dict, whole: dict) -> float:
        """Factor that makes the sub-batch losses sum to the full-batch loss for this loss type."""
        if self.loss_type in {"grpo", "sapo", "luspo", "dr_grpo"}:  # mean over sequences
            return part["completion_ids"].shape[0] / whole["completion_ids"].shape[0]
        if self.loss_type == "bnpo":  # mean over the micro-batch's tokens
            return float(part["completion_mask"].sum() / whole["completion_mask"].sum().clamp(min=1))
        return 1.0  # dapo, cispo, vespo: normalised by the global token count already

    def capability_losses(self, model, inputs: dict, differentiable: bool = False, quiet: bool = False
                          ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """TRL's loss on the medical rows and on the instruction rows (``None`` for one absent here).

        ``quiet``: without TRL's metrics and collectives (data parallel: the update's own forward
        logs them once on every rank, and a rank may hold one capability only).
        """
        is_medical = inputs["is_medical"]
        self._double_backward = differentiable
        # Remember each part (and its RNG state, for LoRA dropout) to re-evaluate it at shifted weights.
        self._capability_parts = []
        losses = []
        try:
            for rows in (is_medical, ~is_medical):
                if not bool(rows.any()):
                    self._capability_parts.append(None)
                    losses.append(None)
                    continue
                part = _select_rows(inputs, rows)
                rng = _rng_state()
                scale = self._capability_loss_scale(part, inputs)
                with (_quiet_loss(self) if quiet else contextlib.nullcontext()), self.compute_loss_context_manager():
                    losses.append(self._compute_loss(model, part) * scale)
                self._capability_parts.append([(part, scale, rng)])
        finally:
            self._double_backward = False
        return losses[0], losses[1]

    def _chunks(self, rows: torch.Tensor) -> list[torch.Tensor]:
        """Row masks of at most ``aoc.micro_batch_rows`` of the selected rows each (the whole selection for null)."""
        indices = rows.nonzero().flatten()
        size = self.aoc.get("micro_batch_rows") or max(1, indices.numel())
        masks = []
        for chunk in indices.split(size):
            mask = torch.zeros_like(rows)
            mask[chunk] = True
            masks.append(mask)
        return masks

    def capability_gradients(self, model, inputs: dict, params: list, differentiable: bool = False,
                             quiet: bool = False) -> tuple[list, list, torch.Tensor]:
        """g_R and g_I (the gradients of TRL's loss on the medical and on the instruction rows) and the loss.

        Each capability's rows are taken ``aoc.micro_batch_rows`` at a time, and each chunk's graph is
        freed once its gradient is taken, so memory does not grow with the batch. Every chunk's loss is
        scaled by its share of the batch (``_capability_loss_scale``), so the chunks' gradients add up
        to the capability's, and g_R + g_I is the gradient of TRL's loss on the whole batch. A
        capability absent here gives ``None`` for every parameter. With ``differentiable`` (the exact
        penalty gradient) the gradients keep their graphs (``create_graph``).
        """
        self._capability_parts = []
        gradients, total = [], torch.zeros((), device=params[0].device)
        self._double_backward = differentiable
        try:
            for rows in (inputs["is_medical"], ~inputs["is_medical"]):
                if not bool(rows.any()):
                    self._capability_parts.append(None)
                    gradients.append([None] * len(params))
                    continue
                chunks, summed = [], [None] * len(params)
                for mask in self._chunks(rows):
                    part = _select_rows(inputs, mask)
                    rng = _rng_state()  # LoRA dropout: a probe re-evaluates the chunk with the same masks
                    scale = self._capability_loss_scale(part, inputs)
                    with (_quiet_loss(self) if quiet else contextlib.nullcontext()), self.compute_loss_context_manager():
                        loss = self._compute_loss(model, part) * scale
                    grads = torch.autograd.grad(loss, params, create_graph=differentiable, allow_unused=True)
                    summed = add_gradients(summed, grads)
                    total = total + loss.detach()
                    chunks.append((part, scale, rng))
                self._capability_parts.append(chunks)
                gradients.append(summed)
        finally:
            self._double_backward = False
        return gradients[0], gradients[1], total

    def _gradient_at_shift(self, model, params, part_index: int, direction: list, step: float) -> list:
        """Gradient of one capability's loss at theta + step * direction (same chunks, same dropout).

        No autograd graph is alive here, and the weights are restored by copying the saved
        tensors back (exact, unlike adding and subtracting the shift); ``None`` everywhere when
        this rank holds no row of the capability.
        """
        chunks = self._capability_parts[part_index]
        if chunks is None:
            return [None] * len(params)
        saved = [p.detach().clone() if d is not None else None for p, d in zip(params, direction)]
        summed = [None] * len(params)
        try:
            with torch.no_grad():
                for p, d in zip(params, direction):
                    if d is not None:
                        p.add_(d.to(p.dtype), alpha=step)
            for part, scale, rng in chunks:
                with _restored_rng(rng), _quiet_loss(self), _fp32_forward(self, model), \
                        self.compute_loss_context_manager():
                    loss = self._compute_loss(model, part) * scale
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                summed = add_gradients(summed, grads)
        finally:
            with torch.no_grad():
                for p, original in zip(params, saved):
                    if original is not None:
                        p.copy_(original)
        return summed

    def _penalty_gradient_fd(self, model, params, grads_r, grads_i, cosine: float, gram: torch.Tensor) -> list:
        """grad of S_cos^2 = 2 S (H_R v_R + H_I v_I), each H v by a forward difference of gradients.

        ``grads_r``/``grads_i`` are the global (rank-averaged) gradients, so the directions, the
        step sizes and hence the probes are the same on every rank; the shifted gradients of both
        probes are then averaged in one collective.
        """
        v_r, v_i = cosine_gradient_directions(grads_r, grads_i, cosine, gram)
        theta_norm = math.sqrt(sum(float(p.detach().float().pow(2).sum()) for p in params))
        probes = []  # (step, base gradient, shifted gradient)
        for index, (direction, base) in enumerate(((v_r, grads_r), (v_i, grads_i))):
            v_norm = math.sqrt(sum(float(d.float().pow(2).sum()) for d in direction if d is not None))
            if v_norm == 0:
                continue
            step = self.aoc["fd_step"] * max(theta_norm, 1.0) / v_norm
            probes.append((step, base, self._gradient_at_shift(model, params, index, direction, step)))
        if self._aoc_through_backward and probes:
            flat = [g if g is not None else torch.zeros_like(p, dtype=torch.float32)
                    for _, _, shifted in probes for g, p in zip(shifted, params)]
            averaged = average_across_ranks(flat)
            probes = [(step, base, averaged[i * len(params):(i + 1) * len(params)])
                      for i, (step, base, _) in enumerate(probes)]
        total = [None] * len(params)
        for step, base, shifted in probes:
            for k, (g1, g0) in enumerate(zip(shifted, base)):
                if g1 is None and g0 is None:
                    continue
                g1 = g1.float() if g1 is not None else torch.zeros_like(g0, dtype=torch.float32)
                g0 = g0.detach().float() if g0 is not None else torch.zeros_like(g1)
                hv = (g1 - g0) / step
                total[k] = hv if total[k] is None else total[k] + hv
        return [None if t is None else 2.0 * cosine * t for t in total]

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep,
                                           batch_size=None, compute_entropy=False, compute_aux_loss=False,
                                           **kwargs):
        if not getattr(self, "_double_backward", False):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size=batch_size,
                compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **kwargs)
        # The penalty needs grad-of-grad; TRL's fused log-prob kernel has a first-order backward
        # only, so this path scores the completion with plain (twice differentiable) ops. Same
        # numbers for text models without logit scaling/soft-capping (Llama, Qwen, SmolLM).
        # Fused attention kernels (flash, memory-efficient) lack a double backward too: use the math one.
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from trl.trainer.utils import entropy_from_logits, selective_log_softmax

        with self.accelerator.autocast(), sdpa_kernel([SDPBackend.MATH]):
            logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                           logits_to_keep=logits_to_keep + 1).logits
        logits = logits[:, :-1, :] / self.temperature
        logps = selective_log_softmax(logits, input_ids[:, -logits_to_keep:])
        entropies = None
        if compute_entropy:
            with torch.no_grad():
                entropies = entropy_from_logits(logits)
        return logps, entropies, None

    def _aoc_due(self) -> bool:
        return self.aoc["mode"] != "off" and self.state.global_step % max(1, self.aoc["interval"]) == 0

    def training_step(self, model, inputs, num_items_in_batch):
        if not (self.model.training and self._aoc_due()):
            return super().training_step(model, inputs, num_items_in_batch)
        started = time.perf_counter()
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        loss = self.orthogonality_step(model, inputs)
        # The bookkeeping of GRPOTrainer.training_step, which this path replaces.
        self._step += 1
        self._current_train_step_time += time.perf_counter() - started
        if self._step % self.current_gradient_accumulation_steps == 0:
            self._metrics["train"]["step_time"].append(self._current_train_step_time)
            self._current_train_step_time = 0.0
        return loss

    def orthogonality_step(self, model, inputs: dict) -> torch.Tensor:
        """Forward/backward of one micro-batch with AOC; leaves the gradients in ``p.grad``.

        Single process: the per-capability gradients (fp32) are combined and written to
        ``p.grad``. Data parallel (DDP, DeepSpeed): they are taken on the unwrapped model (no
        reduction hooks fire), averaged across ranks in one collective, every decision is made
        from the averaged values (so every rank takes the same branch), the finite-difference
        probes run with no graph alive, and the update is one ``accelerator.backward`` of TRL's
        loss plus the surrogate sum(p * g_orth): g_orth is the same on every rank, so after the
        wrapper's averaging the update is the single-process one.
        """
        mode = self.aoc["mode"]
        record = self._step_record
        distributed = self._aoc_through_backward
        differentiable = mode == "penalty" and self.aoc["penalty_gradient"] == "exact"
        module = self.accelerator.unwrap_model(model) if distributed else model
        params = [p for p in module.parameters() if p.requires_grad]
        is_medical, advantages = inputs["is_medical"], inputs["advantages"]
        if not distributed and (bool(is_medical.all()) or not bool(is_medical.any())):
            # One capability only in this micro-batch: S_cos is undefined, TRL's step as it is.
            record.update(s_cos=math.nan, l_orth=0.0, aoc_lambda=0.0, aoc_fired=False, aoc_note="single capability")
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            self.accelerator.backward(loss)
            return loss.detach()
        with _fp32_forward(self, module):
            # Under data parallel a rank may hold one capability only: its other gradient is zero here.
            grads_r, grads_i, capability_loss = self.capability_gradients(module, inputs, params, differentiable,
                                                                           quiet=distributed)
        # A capability whose groups all had zero reward variance has all-zero advantages: its policy
        # gradient is zero up to the KL term's rounding, so the cosine means nothing there.
        signal = torch.tensor([float(bool(advantages[rows].ne(0).any())) for rows in (is_medical, ~is_medical)],
                              device=advantages.device)
        if distributed:  # global g_R, g_I and signal flags, one collective on every rank
            flat = [g if g is not None else torch.zeros_like(p, dtype=torch.float32)
                    for grads in (grads_r, grads_i) for g, p in zip(grads, params)]
            averaged = average_across_ranks([*flat, signal.to(params[0].device)])
            grads_r, grads_i, signal = averaged[:len(params)], averaged[len(params):-1], averaged[-1]
        # One pass over the gradients: the Gramian gives S_cos, both norms and |g_R + g_I|.
        gram = gramian(grads_r, grads_i)
        cosine = cosine_from_gramian(gram, self.aoc["eps"])
        rr, ri, ii = (float(gram[0, 0].detach()), float(gram[0, 1].detach()), float(gram[1, 1].detach()))
        norm_r, norm_i = math.sqrt(rr), math.sqrt(ii)
        policy_norm = math.sqrt(max(rr + ii + 2 * ri, 0.0))
        no_signal = [name for name, flag in zip(CAPABILITIES, signal.tolist()) if flag == 0]
        if no_signal:
            cosine = torch.tensor(math.nan)
            record["aoc_note"] = f"zero advantages: {', '.join(no_signal)}"
        penalty, lam, grads_orth, unit_norm = None, 0.0, None, 0.0
        if mode == "penalty":
            unit_penalty = orthogonality_penalty(cosine, 1.0, self.aoc["tau"])
            if unit_penalty is not None:
                if differentiable:
                    grads_unit = torch.autograd.grad(unit_penalty, params, allow_unused=True)
                else:
                    grads_unit = self._penalty_gradient_fd(module, params, grads_r, grads_i,
                                                           float(cosine.detach()), gram)
                unit_norm = math.sqrt(sum(float(g.float().pow(2).sum()) for g in grads_unit if g is not None))
                lam = (dynamic_lambda(self.aoc["lambda"], policy_norm, unit_norm)
                       if self.aoc["lambda_scaling"] == "gradient_norm" else self.aoc["lambda"])
                penalty = (lam * unit_penalty).detach()
                grads_orth = [None if g is None else lam * g.detach() for g in grads_unit]
        record.update(s_cos=float(cosine.detach()), l_orth=float(penalty) if penalty is not None else 0.0,
                      aoc_lambda=lam, aoc_fired=penalty is not None, grad_norm_medical=norm_r,
                      grad_norm_instruction=norm_i, grad_norm_penalty=lam * unit_norm)

        if distributed:
            # TRL's loss through the DDP/DeepSpeed wrapper: one backward per micro-batch for its hooks,
            # and TRL's metrics and collectives once on every rank.
            with self.compute_loss_context_manager():
                loss = self.compute_loss(model, inputs)
            objective = loss
            if grads_orth is not None:  # a surrogate whose gradient is g_orth
                objective = loss + sum((p * g.to(p.dtype)).sum() for p, g in zip(params, grads_orth) if g is not None)
            self.accelerator.backward(objective)
            return loss.detach() + (penalty if penalty is not None else 0.0)

        if mode == "project" and not math.isnan(float(cosine.detach())):
            # One weighting call per step: GradVac's EMA target must advance once, not twice.
            coefficients = self.projector.combination(grads_r, grads_i, gram)
            combined = self.projector.apply(coefficients, [g.detach() if g is not None else None for g in grads_r],
                                            [g.detach() if g is not None else None for g in grads_i])
            record["projection_weights"] = list(coefficients)
        else:
            combined = [None if a is None and b is None else
                        (a.detach() if a is not None else 0) + (b.detach() if b is not None else 0)
                        for a, b in zip(grads_r, grads_i)]
        if grads_orth is not None:
            combined = add_gradients(combined, grads_orth)
        for param, grad in zip(params, combined):
            if grad is None:
                continue
            grad = grad.detach().to(param.dtype)
            param.grad = grad.clone() if param.grad is None else param.grad + grad
        return capability_loss + (penalty if penalty is not None else 0.0)

    # -- logging, checkpoints -----------------------------------------------------------------
    def pop_step_record(self) -> dict:
        record, self._step_record = self._step_record, {}
        return record

    def extra_state(self) -> dict:
        return {"weights": self.weight_controller.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.weight_controller.load_state_dict(state["weights"])
        self.reward_weights = torch.tensor(self.weight_controller.weights, dtype=torch.float32)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = Path(self._get_output_dir(trial=trial)) / f"checkpoint-{self.state.global_step}"
            (folder / STATE_FILE).write_text(json.dumps(self.extra_state()), encoding="utf-8")

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and (Path(checkpoint) / STATE_FILE).exists():
            self.load_extra_state(json.loads((Path(checkpoint) / STATE_FILE).read_text(encoding="utf-8")))
            log.info("restored reward weights %s from %s", self.weight_controller.weights, checkpoint)


class CriticAdvantageTrainer(CriticAdvantage, BalancedGRPOTrainer):
    """The ``ppo`` ablation: ``BalancedGRPOTrainer`` with a learned critic's GAE advantages (``balancedbio.ppo``)."""


# Keys of TRL's logs copied into dynamics.jsonl, under shorter names.
_TRL_LOG_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "reward": "reward",
                 "reward_std": "reward_std", "kl": "kl", "entropy": "entropy",
                 "clip_ratio/region_mean": "clip_fraction", "completions/mean_length": "completion_length",
                 "step_time": "step_seconds", "frac_reward_zero_std": "frac_reward_zero_std",
                 "value_loss": "value_loss"}


class DynamicsWriter(TrainerCallback):
    """Appends one JSON line per logged training step (``logging_steps=1``: every step)."""

    def __init__(self, path: str | os.PathLike, trainer_ref: list):
        self.path = Path(path)
        self.trainer_ref = trainer_ref  # filled once the trainer exists (callbacks come first)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs or not self.trainer_ref or not state.is_world_process_zero:
            return
        trainer = self.trainer_ref[0]
        row: dict[str, Any] = {"step": state.global_step, "epoch": logs.get("epoch")}
        for key, name in _TRL_LOG_KEYS.items():
            if key in logs:
                row[name] = logs[key]
        for func in trainer.weight_controller.names:
            if f"rewards/{func}/mean" in logs:
                row[f"reward_{func}"] = logs[f"rewards/{func}/mean"]
        row.update(trainer.pop_step_record())
        row.setdefault("s_cos", None)
        row.setdefault("l_orth", None)
        row.setdefault("aoc_fired", None)
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(row) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def truncate_dynamics(path: Path, last_step: int) -> None:
    """Drop lines past the checkpoint a run resumes from (they will be recomputed); a torn line too."""
    from balancedbio.checkpoints import truncate_step_log

    truncate_step_log(path, last_step)


def build_prompt_dataset(mcq_path: str, prompts_path: str, *, max_prompts: int | None = None, seed: int = 0):
    """Medical multiple-choice prompts + IFEval-style instruction prompts, one dataset."""
    from datasets import Dataset

    from balancedbio.data.formatting import format_mcq_prompt
    from balancedbio.io import read_jsonl

    medical, instruction = [], []
    for row in read_jsonl(mcq_path):
        medical.append({"prompt": [{"role": "user", "content": format_mcq_prompt(row["question"], row["options"])}],
                        "capability": "medical", "answer": row["answer"], "options": row["options"],
                        "question": row["question"], "instruction_id_list": [], "kwargs": [],
                        "prompt_text": None, "key": row["id"]})
    for row in read_jsonl(prompts_path):
        instruction.append({"prompt": [{"role": "user", "content": row["prompt"]}], "capability": "instruction",
                            "answer": None, "options": None, "question": None,
                            "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"],
                            "prompt_text": row["prompt"], "key": str(row["key"])})
    if not medical or not instruction:
        raise ValueError(f"GRPO needs both capabilities: {len(medical)} medical prompts in {mcq_path}, "
                         f"{len(instruction)} instruction prompts in {prompts_path}")
    rng = random.Random(seed)
    if max_prompts:
        rng.shuffle(medical)
        rng.shuffle(instruction)
        medical, instruction = medical[:max_prompts // 2], instruction[:max_prompts - max_prompts // 2]
    return Dataset.from_list(medical + instruction)


def grpo_config(settings: dict, output_dir: str, world_size: int = 1, deepspeed: str | None = None):
    """The ``BalancedGRPOConfig`` of one variant's settings (``balancedbio.variants.variant_settings``)."""
    from balancedbio.training_args import GRPO_EXTRA_KEYS, PREFIXED_SECTIONS, BalancedGRPOConfig

    grpo, training = settings["grpo"], settings["training"]
    same_name = {key: grpo[key] for key in ("num_generations", "max_completion_length", "temperature", "beta",
                                            "epsilon", "loss_type", "scale_rewards", "max_steps", "save_steps",
                                            "use_vllm")}
    ours = {f"{section}_{key}": value for section in PREFIXED_SECTIONS for key, value in settings[section].items()}
    ours.update({key: grpo[key] for key in GRPO_EXTRA_KEYS if key in grpo})
    return BalancedGRPOConfig(
        output_dir=output_dir,
        **same_name,
        **ours,
        variant=settings["variant"],
        use_prm=settings["use_prm"],
        advantage_estimator=settings["advantage"],
        gradient_accumulation_steps=1,
        learning_rate=grpo.get("learning_rate") or training["learning_rate"],
        lr_scheduler_type=training["lr_scheduler_type"],
        warmup_steps=training["warmup_ratio"],  # transformers 5: a float < 1 is a ratio
        logging_steps=1,
        save_strategy="steps",
        save_total_limit=2,
        bf16=training["bf16"],
        gradient_checkpointing=training["gradient_checkpointing"],
        seed=settings["seed"],
        report_to=list(settings.get("report_to") or []),  # the run's logging.report_to (variant_settings)
        vllm_mode="colocate",
        deepspeed=deepspeed if world_size > 1 else None,
        log_completions=False,
        dataloader_num_workers=0,
    )


def build_trainer(*, model_dir: str, mcq_path: str, prompts_path: str, prm_dir: str | None, output_dir: str,
                  settings: dict | None = None, args=None, peft_config=None, trust_remote_code: bool = False,
                  world_size: int = 1, deepspeed: str | None = None, callbacks: Sequence = (),
                  vanilla: bool = False, generation_kwargs: dict | None = None):
    """The trainer of one variant (or, with ``vanilla``, TRL's GRPOTrainer on the same setup and batches).

    Either ``settings`` (a variant's settings dict, as the Snakemake rule passes them) or ``args``
    (a ``BalancedGRPOConfig``, as a recipe gives it, with ``peft_config`` and ``trust_remote_code``).
    """
    from balancedbio.models import load_causal_lm, load_tokenizer, training_dtype
    from balancedbio.rewards import build_reward_functions

    if settings is not None:
        args = grpo_config(settings, output_dir, world_size, deepspeed)
        peft_config = lora_config(settings["training"]) if settings["training"]["use_lora"] else None
        trust_remote_code = settings["trust_remote_code"]
    elif args is None:
        raise ValueError("build_trainer needs settings or args")
    dataset = build_prompt_dataset(mcq_path, prompts_path, max_prompts=args.max_prompts, seed=args.seed)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_dir, dtype=training_dtype(args.bf16, peft_config is not None, args.aoc_mode),
                           trust_remote_code=trust_remote_code)
    reward_funcs = build_reward_functions(args.section("rewards"), prm_dir if args.use_prm else None)
    if generation_kwargs:
        args.generation_kwargs = {**(args.generation_kwargs or {}), **generation_kwargs}
    kwargs = dict(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                  processing_class=tokenizer, peft_config=peft_config, callbacks=list(callbacks))
    if vanilla:  # TRL's own step, sampling from the policy as TRL does
        return StratifiedGRPOTrainer(**kwargs), tokenizer
    kwargs["rollout_weights"] = args.rollout_weights
    kwargs.update(weight_controller=build_weight_controller(args.section("weights"), [f.name for f in reward_funcs]),
                  aoc_config=args.section("aoc"))
    if args.advantage_estimator == "critic":
        return CriticAdvantageTrainer(**kwargs, critic_model_dir=model_dir, ppo_config=args.section("ppo")), tokenizer
    return BalancedGRPOTrainer(**kwargs), tokenizer


def run_grpo(*, model_dir: str, mcq_path: str, prompts_path: str, prm_dir: str | None, out_dir: str,
             dynamics_path: str, checkpoint_dir: str, settings: dict | None = None, args=None, peft_config=None,
             trust_remote_code: bool = False, callbacks: Sequence = ()) -> dict:
    """Train one variant; resumes from the newest checkpoint in ``checkpoint_dir``.

    ``settings`` (the Snakemake rule's) or ``args`` + ``peft_config`` (a recipe's), as in ``build_trainer``.
    """
    from transformers import set_seed

    from balancedbio.checkpoints import CompletionMarker, last_complete_checkpoint, training_fingerprint

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    checkpoint_root = Path(checkpoint_dir)
    if settings is not None:
        args = grpo_config(settings, str(checkpoint_root), world_size, settings["training"].get("deepspeed_config"))
        peft_config = lora_config(settings["training"]) if settings["training"]["use_lora"] else None
        trust_remote_code = settings["trust_remote_code"]
    elif args is None:
        raise ValueError("run_grpo needs settings or args")
    else:
        args.output_dir = str(checkpoint_root)  # checkpoints and resume live there
    set_seed(args.seed)
    checkpoint_root.mkdir(parents=True, exist_ok=True)
    live_dynamics = checkpoint_root / "dynamics.jsonl"
    # Resume only a checkpoint of this very run (same settings and inputs); claims the folder.
    fingerprint = training_fingerprint(settings if settings is not None else args.to_dict(), {"model": model_dir, "mcq": mcq_path, "prompts": prompts_path,
                                                  "prm": prm_dir})
    last = last_complete_checkpoint(checkpoint_root, fingerprint)
    if last:
        step = int(Path(last).name.split("-")[-1])
        log.info("resuming %s from %s (step %d)", args.variant, last, step)
        truncate_dynamics(live_dynamics, step)
    else:
        live_dynamics.unlink(missing_ok=True)

    trainer_ref: list = []
    trainer, tokenizer = build_trainer(
        model_dir=model_dir, mcq_path=mcq_path, prompts_path=prompts_path, prm_dir=prm_dir, args=args,
        peft_config=peft_config, trust_remote_code=trust_remote_code, output_dir=str(checkpoint_root),
        callbacks=[DynamicsWriter(live_dynamics, trainer_ref), CompletionMarker(fingerprint), *callbacks])
    controller, reward_funcs, dataset = trainer.weight_controller, trainer.reward_funcs, trainer.train_dataset
    trainer_ref.append(trainer)
    log.info("GRPO %s: %d prompts (%d medical), G=%d, %d prompts/step, %d steps, weights=%s, aoc=%s, "
             "advantages=%s", args.variant, len(dataset), sum(c == "medical" for c in dataset["capability"]),
             args.num_generations, args.prompts_per_step, args.max_steps, args.weights_mode, args.aoc_mode,
             args.advantage_aggregation)
    result = trainer.train(resume_from_checkpoint=last)
    summary = {"variant": args.variant, "global_step": trainer.state.global_step,
               "train_runtime_s": result.metrics.get("train_runtime"), "resumed_from": last,
               "final_weights": dict(zip(controller.names, controller.weights)),
               "final_success": dict(zip(controller.names, controller.success)),
               "reward_stats": {f.name: dict(getattr(f, "stats", {})) for f in reward_funcs},
               "settings": settings if settings is not None else _recipe_settings(args)}
    if trainer.accelerator.is_main_process:
        save_merged(trainer, tokenizer, out_dir, {"balancedbio_training.json": summary})
        from balancedbio.io import atomic_file

        with atomic_file(dynamics_path) as handle:
            handle.write(live_dynamics.read_text(encoding="utf-8"))
        shutil.rmtree(checkpoint_root, ignore_errors=True)
    return summary


def _recipe_settings(args) -> dict:
    """What a recipe run trained with, in the sections of the workflow config (for the model's summary)."""
    from balancedbio.training_args import PREFIXED_SECTIONS

    return {"variant": args.variant, "use_prm": args.use_prm, "advantage": args.advantage_estimator,
            "seed": args.seed, **{section: args.section(section) for section in (*PREFIXED_SECTIONS, "grpo")}}


def read_dynamics(path: str | os.PathLike) -> list[dict]:
    from balancedbio.io import read_jsonl

    return list(read_jsonl(path))


def plot_dynamics(dynamics_path: str, figure_path: str, title: str = "") -> None:
    """Weights, success rates, reward components and S_cos against the step (Figures 3-4)."""
    from balancedbio.io import pyplot, save_figure

    plt = pyplot()
    rows = read_dynamics(dynamics_path)
    steps = [r["step"] for r in rows]
    names = sorted({k[len("weight_"):] for r in rows for k in r if k.startswith("weight_")})
    fig, axes = plt.subplots(3, 2, figsize=(10, 9), sharex=True)
    panels = [("weight_", "reward weight w_k"), ("success_", "success rate S_k (EMA)"),
              ("reward_", "reward component mean")]
    for ax, (prefix, label) in zip(axes.flat, panels):
        for name in names:
            values = [r.get(prefix + name) for r in rows]
            if any(v is not None for v in values):
                ax.plot(steps, [float("nan") if v is None else v for v in values], marker="o", markersize=2,
                        label=name)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax = axes.flat[3]
    s_cos = [float("nan") if r.get("s_cos") is None else r["s_cos"] for r in rows]
    ax.plot(steps, s_cos, marker="o", markersize=2, color="tab:purple", label="S_cos")
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_ylabel("S_cos (medical vs instruction gradient)")
    # Symmetric about 0 and scaled to the values: at |S_cos| ~ 0.03 a [-1, 1] axis shows a flat line.
    finite = [abs(v) for v in s_cos if not math.isnan(v)]
    limit = min(1.05, max(0.05, 1.2 * max(finite))) if finite else 1.05
    ax.set_ylim(-limit, limit)
    ax.grid(alpha=0.3)
    ax = axes.flat[4]
    if "instruction" in names:  # eq. 11: the instruction rows' share of sum |A| follows w_inst / sum w
        shares = [r.get("weight_instruction") / sum(r[f"weight_{n}"] for n in names)
                  if all(r.get(f"weight_{n}") is not None for n in names) else float("nan") for r in rows]
        ax.plot(steps, shares, marker="o", markersize=2, label="w_inst / sum w")
    ax.plot(steps, [float("nan") if r.get("update_share_instruction") is None else r["update_share_instruction"]
                    for r in rows], marker="o", markersize=2, label="instruction share of sum |A|")
    ax.set_ylabel("instruction share")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes.flat[5]
    ax.plot(steps, [float("nan") if r.get("kl") is None else r["kl"] for r in rows], marker="o", markersize=2,
            color="tab:brown")
    ax.set_ylabel("KL to the reference")
    ax.grid(alpha=0.3)
    for ax in axes[2]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title or "GRPO training dynamics")
    save_figure(fig, figure_path)

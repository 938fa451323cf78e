"""Capability-aware GRPO (section 4, Algorithm 1): a subclass of TRL's ``GRPOTrainer``.

TRL keeps doing what it does (sampling G completions per prompt, clipped ratio, KL against
the reference policy); this subclass adds:

- **Stratified batches** (appendix B): ``StratifiedRepeatSampler`` interleaves medical and
  instruction prompts so every generation batch, and every device's slice of it, holds both.
- **Composite reward** over accuracy, reasoning, instruction (``balancedbio.rewards``). A
  component that does not apply to a prompt returns ``None`` (NaN in TRL's reward matrix): an
  instruction prompt has no R_acc and no R_reas, a multiple-choice prompt has no R_inst. Each
  reports its per-sample success flags through TRL's ``log_extra`` hook (the column
  ``success/<name>``), which the weight controller reads; the functions keep no state.
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
  The penalty's gradients and probes run in fp32 (autocast and TF32 off; ``monitor`` and ``project``
  on CUDA at the training precision, as measured in bench/README.md). Under DDP/DeepSpeed they are averaged
  across ranks before S_cos, every branch is taken from the averaged values, and the update is
  one ``accelerator.backward`` (see ``orthogonality_step``).
- The method's signals (w_k, S_k, S_cos, L_orth, the instruction share, dynamic sampling's
  counts) go to TRL's metrics under ``weights/``, ``success/``, ``aoc/`` and ``sampling/``
  (``grpo.signals``): every ``report_to`` tracker and ``state.log_history`` get them, and
  checkpoints carry the controller state, so a killed run resumes where it stopped.
"""


from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler
from trl import GRPOTrainer

from balancedbio.aoc import Projector
from balancedbio.grpo.advantages import ADVANTAGE_AGGREGATIONS, _instruction_share, weighted_component_advantages
from balancedbio.grpo.aoc import OrthogonalityMixin
from balancedbio.grpo.dynamic_sampling import DynamicSamplingMixin
from balancedbio.grpo.sampler import StratifiedRepeatSampler
from balancedbio.grpo.signals import flush_signals
from balancedbio.ppo import CriticAdvantage
from balancedbio.rewards import success_name
from balancedbio.weights import WeightController

log = logging.getLogger(__name__)

STATE_FILE = "balancedbio_state.json"


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


class BalancedGRPOTrainer(DynamicSamplingMixin, OrthogonalityMixin, StratifiedGRPOTrainer):
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
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        if self.aoc["mode"] != "off" and (getattr(plugin, "zero_stage", 0) == 3 or self.is_fsdp_enabled):
            raise ValueError(f"aoc.mode={self.aoc['mode']} needs each rank's whole gradient of the trainable weights "
                             "and the weights themselves for its probes, which DeepSpeed ZeRO-3 / FSDP shard away; "
                             "use ZeRO-2 (config/deepspeed_zero2.json) or set aoc.mode: off")
        if distributed and self.aoc["mode"] == "penalty" and self.aoc["penalty_gradient"] == "exact":
            raise ValueError("aoc.penalty_gradient=exact differentiates each rank's own gradients, which the "
                             "cross-rank average does not carry; use finite_difference under DeepSpeed or "
                             "multi-process data parallel")
        # Under DeepSpeed / DDP the update must go through accelerator.backward (their hooks reduce and
        # partition gradients): AOC's gradients are averaged across ranks for S_cos and the penalty's
        # probes, and the update is one backward of TRL's loss plus a surrogate of the penalty or projection.
        self._aoc_through_backward = distributed
        self.projector = Projector(self.aoc["projection"], self.aoc["gradvac_beta"]) \
            if self.aoc["mode"] == "project" else None
        # This step's signals, by short name (the mixins write here too); flushed into TRL's metrics.
        self._step_record: dict[str, Any] = {}
        self._signal_text: dict[str, str] = {}
        self._batch_success: dict[str, list] = {}  # this batch's success flags per reward function
        self._check_dynamic_sampling()

    # -- dynamic weights and advantages --------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        from accelerate.utils import gather_object

        self._batch_success = {}  # filled through TRL's log_extra hook while TRL calls the reward functions
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._last_rewards_per_func = rewards_per_func  # gathered: every process's rows, in process order
        if not self.model.training:
            return rewards_per_func
        rates = []
        for name in self.weight_controller.names:  # == the reward functions' names (checked in __init__)
            # The success rate is the policy's over every completion sampled for this step, the ones
            # dynamic sampling discarded included: a rate over the kept groups alone would be pulled
            # towards 1/2 (all-pass and all-fail groups are what it discards).
            discarded = getattr(self, "_discarded_success", {}).get(name, [])
            success = gather_object(self._batch_success.get(name, []) + list(discarded))
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

    def _log_completion_extra(self, column: str, values: list) -> None:
        # TRL hands this hook to every reward function as `log_extra`; a function reports its per-sample
        # success flags as the column success/<name> (balancedbio.rewards.SUCCESS_COLUMN), which the
        # completions table shows too. No reward function keeps them.
        name = success_name(column)
        if name is not None:
            self._batch_success[name] = list(values)
        super()._log_completion_extra(column, values)

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

    # -- logging, checkpoints -----------------------------------------------------------------
    def pop_step_record(self) -> dict:
        """The signals written since the last flush (by short name), and a fresh record."""
        record, self._step_record = self._step_record, {}
        return record

    def training_step(self, model, inputs, num_items_in_batch):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Once per micro-step, like TRL's own metrics: log() then averages them over the logging window.
        flush_signals(self.pop_step_record(), self._metrics["train"], self._signal_text)
        return loss

    def log(self, logs: dict, start_time: float | None = None) -> None:
        if self.model.training and self._signal_text:  # text (aoc/note): the window's last, as it is
            logs.update(self._signal_text)
            self._signal_text = {}
        super().log(logs, start_time)

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



"""Learning curves: the held-out rewards of the policy every k GRPO steps, as TRL metrics.

A *curve set* (``write_curve_set``, rule ``heldout_curve_set``) fixes the items once per run: the very
held-out items of ``balancedbio.heldout`` (kg test questions scored by ``R_acc`` and, with the run's PRM,
``R_reas``; fresh instruction prompts scored by ``R_inst``; GRPO-formatted, none of them a GRPO training
prompt), the interval
``grpo.heldout_eval_steps`` and the generation settings of ``eval.heldout_rewards``. It lies beside the
variant's ``dynamics.jsonl`` (``curve_set_path``), where the run finds it.

``HeldoutCurves`` (a ``TrainerCallback``) answers the set greedily, batched, from a merged copy of the
policy (``balancedbio.rollout.RolloutCopy``: the adapters folded in, bf16 where this CPU multiplies it
faster, as the evaluations run) every ``every_steps`` optimizer steps before the last (the last is the
trained model's end-point table, rule ``heldout_rewards``: the same items, not answered twice), scores the
answers with the training rewards (``heldout.score_items``) and appends the means, their n and 95%
intervals (``heldout.summarise``: Wilson for R_acc) to the trainer's step metrics under
``balancedbio/heldout_<component>[_n|_low|_high]``. TRL's ``log`` sends them to every ``report_to``
tracker and ``state.log_history``, and ``dynamics.jsonl`` carries them as ``heldout_<component>...``
(``signals.record_name``); steps without an evaluation have no such keys.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from transformers import TrainerCallback

from balancedbio.grpo.signals import metric_key
from balancedbio.heldout import COMPONENTS, greedy_answers, score_items, summarise

log = logging.getLogger(__name__)

CURVE_SET_NAME = "heldout_curve_set.json"
# The dynamics.jsonl columns of one component (the report's curves read these).
CURVE_FIELDS = ("", "_n", "_low", "_high")


def curve_set_path(dynamics_path: str | os.PathLike) -> Path:
    """Where a run's curve set lies: beside its ``dynamics.jsonl``."""
    return Path(dynamics_path).with_name(CURVE_SET_NAME)


def check_disjoint(items: list[dict], train_mcq: str, train_prompts: str) -> None:
    """Raise if a held-out prompt is, verbatim, a GRPO training prompt (medical or instruction)."""
    from balancedbio.data.formatting import format_mcq_prompt
    from balancedbio.io import read_jsonl

    trained = {format_mcq_prompt(row["question"], row["options"]) for row in read_jsonl(train_mcq)}
    trained |= {row["prompt"] for row in read_jsonl(train_prompts)}
    leaked = [item["id"] for item in items if item["prompt"] in trained]
    if leaked:
        raise ValueError(f"held-out curve set: {len(leaked)} items are GRPO training prompts ({leaked[:5]}); "
                         f"{train_mcq} / {train_prompts} must not contain the held-out questions or prompts")


def write_curve_set(out: str, *, every_steps: int, mcq_test: str, graph: str, train_mcq: str, train_prompts: str,
                    settings: dict, instruct_config: dict, instruction_mode: str, seed: int,
                    benchmarks_dir: str | None) -> dict:
    """Rule heldout_curve_set: the fixed held-out items of ``eval.heldout_rewards`` (the same seed and sizes,
    so a curve's last point is the end-point table's model) and how often to answer them; every_steps 0 =
    no curves (an empty set, so the run never evaluates)."""
    from balancedbio.heldout import heldout_instruction_prompts, heldout_questions
    from balancedbio.io import write_json

    items: list[dict] = []
    if every_steps:
        items = heldout_questions(mcq_test, settings["questions"], seed)
        items += heldout_instruction_prompts(graph, mcq_test, train_prompts, instruct_config=instruct_config,
                                             num_prompts=settings["instruction_prompts"], seed=seed,
                                             benchmarks_dir=benchmarks_dir)
        check_disjoint(items, train_mcq, train_prompts)
    curve_set = {"every_steps": every_steps, "max_new_tokens": settings["max_new_tokens"],
                 "batch_size": settings["batch_size"], "dtype": settings["dtype"],
                 "instruction_mode": instruction_mode, "seed": seed, "items": items}
    write_json(out, curve_set)
    return curve_set


def load_curve_set(path: str | os.PathLike) -> dict | None:
    """The curve set at ``path``; None when there is none or it turns curves off."""
    path = Path(path)
    if not path.is_file():
        return None
    curve_set = json.loads(path.read_text(encoding="utf-8"))
    for key in ("every_steps", "max_new_tokens", "batch_size", "items"):
        if key not in curve_set:
            raise ValueError(f"{path}: a held-out curve set needs {key!r} (written by rule heldout_curve_set)")
    return curve_set if curve_set["every_steps"] and curve_set["items"] else None


def curve_metrics(rows: list[dict]) -> dict[str, float]:
    """The record names (``heldout_accuracy``, ``_n``, ``_low``, ``_high`` ...) of scored item rows."""
    record = {}
    for component, summary in summarise(rows).items():
        if summary["n"]:
            record[f"heldout_{component}"] = summary["mean"]
            record[f"heldout_{component}_n"] = float(summary["n"])
            record[f"heldout_{component}_low"] = summary["ci_low"]
            record[f"heldout_{component}_high"] = summary["ci_high"]
    return record


class HeldoutCurves(TrainerCallback):
    """Every ``every_steps`` steps (before the last), the held-out rewards of the policy into the step's metrics."""

    def __init__(self, trainer, curve_set: dict):
        self.trainer, self.curve_set = trainer, curve_set
        self.every_steps = int(curve_set["every_steps"])
        if self.every_steps < 1:
            raise ValueError(f"grpo.heldout_eval_steps: expected >= 1 to draw curves, got {self.every_steps}")
        self._copy = None

    def due(self, step: int, max_steps: int) -> bool:
        # Not the last step: the trained model's end-point table (rule heldout_rewards, the same items and
        # generation) is that point, and the report's figure ends each curve with it.
        return 0 < step < max_steps and step % self.every_steps == 0

    def reasoning_reward(self):
        """The run's own R_reas (its PRM), which the held-out answers are scored by too; None without a PRM."""
        from balancedbio.rewards import ReasoningReward

        return next((f for f in self.trainer.reward_funcs if isinstance(f, ReasoningReward)), None)

    def merged_copy(self, policy):
        """The policy merged into a copy in the curve set's dtype, synced: the trainer's rollout copy where
        its dtype is that one (one merged copy in memory, not two), else the callback's own."""
        from balancedbio.rollout import RolloutCopy, copy_dtype

        if self._copy is None:
            shared = getattr(self.trainer, "_rollout_copy", None)
            wanted = self.curve_set.get("dtype") or "auto"
            reuse = shared is not None and shared.dtype == copy_dtype(wanted, policy)
            self._copy = shared if reuse else RolloutCopy(policy, wanted)
        self._copy.sync(policy)
        return self._copy

    def evaluate(self, model, tokenizer) -> dict[str, float]:
        """Answer the set with the current policy (a merged copy, so the policy's mode and weights stay as they are)."""
        started = time.perf_counter()
        copy = self.merged_copy(self.trainer.accelerator.unwrap_model(model))
        items = self.curve_set["items"]
        answers = greedy_answers(copy.model, tokenizer, [item["prompt"] for item in items],
                                 max_new_tokens=self.curve_set["max_new_tokens"],
                                 batch_size=self.curve_set["batch_size"])
        record = curve_metrics(score_items(items, answers, self.curve_set.get("instruction_mode", "strict"),
                                           self.reasoning_reward()))
        record["heldout_seconds"] = time.perf_counter() - started
        return record

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self.due(state.global_step, state.max_steps) or not self.trainer.accelerator.is_main_process:
            return
        record = self.evaluate(model, processing_class)
        # on_step_end runs before the step's log: TRL's log() averages these lists into this step's entry.
        metrics = self.trainer._metrics["train"]
        for name, value in record.items():
            metrics[metric_key(name)].append(math.nan if value is None else float(value))
        log.info("step %d held-out rewards: %s (%.0f s)", state.global_step,
                 {c: round(record[f"heldout_{c}"], 4) for c in COMPONENTS if f"heldout_{c}" in record},
                 record["heldout_seconds"])


def add_heldout_curves(trainer, dynamics_path: str | os.PathLike) -> HeldoutCurves | None:
    """Register ``HeldoutCurves`` on ``trainer`` when the run's curve set (beside its dynamics) turns curves on."""
    curve_set = load_curve_set(curve_set_path(dynamics_path))
    if curve_set is None:
        return None
    callback = HeldoutCurves(trainer, curve_set)
    trainer.add_callback(callback)
    log.info("learning curves: %d held-out items every %d steps", len(curve_set["items"]), callback.every_steps)
    return callback

"""The method's per-step signals as TRL metrics, and ``dynamics.jsonl`` rebuilt from ``state.log_history``.

The trainer and its mixins write one step's signals into ``trainer._step_record`` under short names
(``weight_accuracy``, ``s_cos``, ``aoc_fired`` ...). ``flush_signals`` appends them to TRL's
``trainer._metrics["train"]`` under grouped keys, beside TRL's own ``rewards/...``:

- ``weights/<k>`` (w_k), ``weights/error_<k>`` (the controller's e_k), ``weights/update_share_instruction``
  (the instruction rows' share of sum |A|) and ``..._equal_weights`` (the same batch at w = 1);
- ``success/<k>`` (the EMA S_k) and ``success/batch_<k>`` (this batch's rate);
- ``aoc/s_cos``, ``aoc/l_orth``, ``aoc/lambda``, ``aoc/fired`` (1.0 / 0.0), ``aoc/grad_norm_<part>``,
  ``aoc/projection_weight_<capability>``; ``aoc/note`` is text (TensorBoard's text tab);
- ``sampling/constant_groups_sampled``, ``sampling/groups_resampled``, ``sampling/constant_groups_kept``.

TRL's ``log`` averages each list over the logging window and skips NaN, giving None when no step of
the window has a value; an undefined signal (a batch success rate with no applicable row) is therefore
appended as NaN, so it never pulls a defined value of the window towards anything. S_cos, L_orth and
``aoc_fired``, undefined on many steps (one capability, zero advantages), are left out instead: no
tracker is handed a None (TensorBoard warns on each), and every dynamics row has them anyway. From there the
values reach every ``report_to`` tracker and ``state.log_history``, which checkpoints carry, so a
resumed run's history is right without any file of its own. ``dynamics_rows`` turns the history
back into the rows ``dynamics.jsonl`` has always had (the report reads those names).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from balancedbio.grpo.sampler import CAPABILITIES

# Keys of TRL's logs copied into dynamics.jsonl, under shorter names.
TRL_LOG_KEYS = {"loss": "loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm", "reward": "reward",
                "reward_std": "reward_std", "kl": "kl", "entropy": "entropy",
                "clip_ratio/region_mean": "clip_fraction", "completions/mean_length": "completion_length",
                "step_time": "step_seconds", "frac_reward_zero_std": "frac_reward_zero_std",
                "value_loss": "value_loss"}
SAMPLING_COUNTS = ("constant_groups_sampled", "groups_resampled", "constant_groups_kept")
_AOC_NAMES = ("s_cos", "l_orth")
# Always in a dynamics row (None when the step did not compute them): the report indexes them.
ALWAYS_IN_A_ROW = ("s_cos", "l_orth", "aoc_fired")


def metric_key(name: str) -> str:
    """The TRL metric key of a step-record name: ``weight_accuracy`` -> ``weights/accuracy``."""
    for prefix, group in (("batch_success_", "success/batch_"), ("success_", "success/"),
                          ("weight_", "weights/"), ("error_", "weights/error_"), ("aoc_", "aoc/")):
        if name.startswith(prefix):
            return group + name[len(prefix):]
    if name.startswith("update_share_"):
        return f"weights/{name}"
    if name in SAMPLING_COUNTS:
        return f"sampling/{name}"
    if name in _AOC_NAMES or name.startswith("grad_norm_"):
        return f"aoc/{name}"
    return f"balancedbio/{name}"


def record_name(key: str) -> str | None:
    """The inverse of ``metric_key`` (None for TRL's own keys)."""
    group, _, rest = key.partition("/")
    if group == "success":
        return f"batch_success_{rest[len('batch_'):]}" if rest.startswith("batch_") else f"success_{rest}"
    if group == "weights":
        return rest if rest.startswith(("error_", "update_share_")) else f"weight_{rest}"
    if group == "sampling":
        return rest if rest in SAMPLING_COUNTS else None  # TRL logs sampling/sampling_logp_difference/...
    if group == "aoc":
        return rest if rest in _AOC_NAMES or rest.startswith(("grad_norm_", "projection_weight_")) else f"aoc_{rest}"
    if group == "balancedbio":
        return rest
    return None


def flush_signals(record: dict[str, Any], metrics: dict[str, list], text: dict[str, str]) -> None:
    """Append one step's ``record`` to TRL's metric lists (numbers) or to ``text`` (strings, last one wins)."""
    for name, value in record.items():
        if name == "projection_weights":  # (a, b) of a g_R + b g_I, medical first
            for capability, coefficient in zip(CAPABILITIES, value):
                metrics[f"aoc/projection_weight_{capability}"].append(float(coefficient))
        elif isinstance(value, str):
            text[metric_key(name)] = value
        elif value is None or (isinstance(value, float) and math.isnan(value)):
            if name not in ALWAYS_IN_A_ROW:
                metrics[metric_key(name)].append(math.nan)
        else:
            metrics[metric_key(name)].append(float(value))


def dynamics_rows(log_history: Iterable[dict], reward_names: Iterable[str]) -> list[dict]:
    """One row per logged training step of ``log_history``, with the names ``dynamics.jsonl`` uses."""
    reward_names = list(reward_names)
    rows = []
    for entry in log_history:
        if "loss" not in entry:  # the end-of-training summary, evaluation logs
            continue
        row: dict[str, Any] = {"step": entry["step"], "epoch": entry.get("epoch")}
        row.update({name: entry[key] for key, name in TRL_LOG_KEYS.items() if key in entry})
        row.update({f"reward_{func}": entry[f"rewards/{func}/mean"] for func in reward_names
                    if f"rewards/{func}/mean" in entry})
        projection = {}
        for key, value in entry.items():
            name = record_name(key)
            if name is None:
                continue
            if name.startswith("projection_weight_"):
                projection[name[len("projection_weight_"):]] = value
            elif name in SAMPLING_COUNTS and value is not None:
                row[name] = int(round(value))
            elif name == "aoc_fired" and value is not None:
                row[name] = value >= 0.5  # logging_steps=1: the step's own 1.0 or 0.0
            else:
                row[name] = value
        if projection:
            row["projection_weights"] = [projection.get(capability) for capability in CAPABILITIES]
        for name in ALWAYS_IN_A_ROW:
            row.setdefault(name, None)
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    return rows

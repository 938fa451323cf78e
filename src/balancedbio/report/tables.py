"""The report's rows and tables: comparisons, alignment tax, AOC, weights, ablations, held-out rewards,
and ``Table``, one table in its display form (cells, CSS classes for significance, note)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from balancedbio.report.load import (COMPARED_CAPABILITIES, GENERAL_METRIC, IF_BENCHMARKS, IF_METRICS, MEDICAL, RunData,
                                     _instruction_items, _medical_items)
from balancedbio.report.stats import (COMPARISONS, MIN_DISCORDANT_FOR_TARGET, TARGET_MDE, paired_difference, pooled,
                                      wilson_interval)



def comparison_rows(data: RunData, seed: int = 0) -> list[dict]:
    """One row per (comparison, capability): the paired difference first minus second."""
    rows = []
    for first, second in COMPARISONS:
        if first not in data.models or second not in data.models:
            continue
        for cap in COMPARED_CAPABILITIES:
            diff = paired_difference(cap.scores(data, first), cap.scores(data, second), seed=seed)
            rows.append({"comparison": f"{first} - {second}", "first": first, "second": second,
                         "capability": cap.key, "label": cap.label, "diff": diff,
                         "target_mde": TARGET_MDE.get(cap.key)})
    return rows


def alignment_tax(data: RunData, baseline: str = "base", seed: int = 0) -> list[dict]:
    """Eq. 2: Delta = P(gen | base) - P(gen | model) on IFEval and IFBench strict, next to the
    domain gain P(med | model) - P(med | base)."""
    rows = []
    base_med = _medical_items(data, baseline)
    for model in data.models:
        if model == baseline:
            continue
        row = {"model": model, "domain_gain": paired_difference(_medical_items(data, model), base_med, seed=seed)}
        for benchmark in IF_BENCHMARKS:
            scores = _instruction_items(benchmark)
            row[f"tax_{benchmark}"] = paired_difference(scores(data, baseline), scores(data, model), seed=seed)
        rows.append(row)
    return rows


def _scaled(value: float | None, accuracy: bool) -> str:
    return "–" if value is None else (f"{100 * value:+.1f}" if accuracy else f"{value:+.3f}")


# -- training dynamics -----------------------------------------------------------------------

def _fired(row: dict) -> bool:
    """Whether AOC's penalty acted on this step: the trainer's flag, else a positive L_orth."""
    if "aoc_fired" in row and row["aoc_fired"] is not None:
        return bool(row["aoc_fired"])
    return (row.get("l_orth") or 0.0) > 0.0


def aoc_rows(dynamics: dict[str, list[dict]]) -> list[dict]:
    """Per variant: steps, steps with S_cos defined, steps the penalty fired on, mean/max |S_cos|."""
    rows = []
    for variant, steps in dynamics.items():
        defined = [r for r in steps if r.get("s_cos") is not None]
        magnitudes = [abs(r["s_cos"]) for r in defined]
        fired = sum(_fired(r) for r in defined)
        rows.append({"variant": variant, "steps": len(steps), "s_cos_defined": len(defined), "fired": fired,
                     "defined_fraction": len(defined) / len(steps) if steps else None,
                     "fired_fraction_of_defined": fired / len(defined) if defined else None,
                     "mean_abs_s_cos": float(np.mean(magnitudes)) if magnitudes else None,
                     "max_abs_s_cos": max(magnitudes) if magnitudes else None,
                     # Dynamic sampling (grpo.resample_constant_groups): None where it was off.
                     **{key: (sum(r.get(key) or 0 for r in steps) if any(key in r for r in steps) else None)
                        for key in ("constant_groups_sampled", "groups_resampled", "constant_groups_kept")}})
    return rows


def steering_rows(dynamics: dict[str, list[dict]], bounds: tuple[float, float] | None = None) -> list[dict]:
    """Per variant: whether the weights stayed inside their bounds and the update followed w_inst.

    ``weight_share_instruction`` is w_inst / sum_k w_k at a step; ``update_share_instruction`` the
    trainer's share of sum |A| on the instruction rows. Under eq. 11 the second follows the first
    (each A_k has a batch scale that does not depend on w_k), but only on steps where both
    capabilities carry a policy gradient: a step whose instruction (or medical) groups all had
    constant rewards has a share of 0 (or 1) whatever the weights. ``share_correlation`` is the
    Pearson r over the steps with a share strictly between 0 and 1 (None with fewer than 3 such
    steps, or where either series is constant, e.g. static weights).

    ``update_share_instruction_equal_weights`` (eq. 11 runs) is the same batch's share had every
    weight been 1: the weights' own effect on that update, free of the batch-to-batch variation
    of the rewards. Eq. 11 predicts the share to rise above it when w_inst / sum w > 1/K (K
    components) and to fall below it when < 1/K; ``share_moved_as_predicted`` counts the steps
    where it did, of ``counterfactual_steps`` (steps with both shares strictly inside (0, 1) and
    w_inst / sum w not exactly 1/K).
    """
    rows = []
    for variant, steps in dynamics.items():
        names = sorted({k[len("weight_"):] for r in steps for k in r if k.startswith("weight_")})
        weights = [[r.get(f"weight_{n}") for n in names] for r in steps]
        complete = [w for w in weights if w and all(v is not None for v in w)]
        lowest = min((min(w) for w in complete), default=None)
        highest = max((max(w) for w in complete), default=None)
        pairs, moves, equal_shares = [], [], []
        for r, w in zip(steps, weights):
            share = r.get("update_share_instruction")
            if share is None or "instruction" not in names or not w or any(v is None for v in w):
                continue
            if not 0.0 < share < 1.0:  # one capability had no policy gradient on this step
                continue
            pairs.append((w[names.index("instruction")] / sum(w), share))
            equal = r.get("update_share_instruction_equal_weights")
            if equal is not None and 0.0 < equal < 1.0:
                excess = w[names.index("instruction")] / sum(w) - 1.0 / len(w)
                if abs(excess) > 1e-9:
                    moves.append((excess > 0) == (share > equal))
                    equal_shares.append(equal)
        correlation = None
        if len(pairs) >= 3 and np.std([a for a, _ in pairs]) > 1e-9 and np.std([b for _, b in pairs]) > 1e-9:
            correlation = float(np.corrcoef(np.array(pairs).T)[0, 1])
        inside = None
        if bounds is not None and lowest is not None:
            inside = bool(bounds[0] < lowest and highest < bounds[1])
        rows.append({"variant": variant, "steps": len(steps), "min_weight": lowest, "max_weight": highest,
                     "strictly_inside_bounds": inside,
                     "mean_weight_share_instruction": float(np.mean([a for a, _ in pairs])) if pairs else None,
                     "mean_update_share_instruction": float(np.mean([b for _, b in pairs])) if pairs else None,
                     "share_correlation": correlation, "share_steps": len(pairs),
                     "mean_update_share_instruction_equal_weights":
                         float(np.mean(equal_shares)) if equal_shares else None,
                     "share_moved_as_predicted": sum(moves), "counterfactual_steps": len(moves)})
    return rows


def ablation_rows(data: RunData) -> list[dict]:
    rows = []
    for variant, steps in data.dynamics.items():
        model = f"grpo_{variant}"
        last = steps[-1] if steps else {}
        row = {"variant": variant, **{c.key: pooled(c.scores(data, model)) for c in COMPARED_CAPABILITIES},
               "steps": len(steps), **{k: last.get(k) for k in last if k.startswith("weight_")},
               "final_kl": last.get("kl"), "final_reward": last.get("reward")}
        rows.append(row)
    return rows


def heldout_rows(data: RunData) -> list[dict]:
    rows = []
    for model in data.models:
        entry = data.heldout.get(model)
        if entry is None:
            continue
        summary = entry["summary"]
        if summary["status"] != "ok":
            rows.append({"model": model, "component": None, "mean": None, "n": None, "ci_low": None,
                         "ci_high": None, "status": summary.get("reason", summary["status"])})
            continue
        for component, stats in summary["components"].items():
            rows.append({"model": model, "component": component, "mean": stats["mean"], "n": stats["n"],
                         "ci_low": stats.get("ci_low"), "ci_high": stats.get("ci_high"), "status": "ok"})
    return rows


def heldout_answer_rows(data: RunData) -> list[dict]:
    """Held-out R_acc split as P(answered) x P(right | answered), per model whose item rows say whether R_acc's
    parser found an answer: how often it answered, how often its answers were right (Wilson 95% CI) and the
    reward of a guess (``chance``). An interval that holds ``chance`` says the answers carry no knowledge of
    these questions: R_acc then grows only with the answer rate."""
    rows = []
    for model in data.models:
        answers = (data.heldout.get(model) or {}).get("answers") or []
        if not answers:
            continue
        answered = [reward for was_answered, reward, _ in answers if was_answered]
        right = sum(answered)
        chance = float(np.mean([chance for _, _, chance in answers]))
        low, high = wilson_interval(right / len(answered), len(answered)) if answered else (None, None)
        versus_guess = (None if not answered else "above" if low > chance else "below" if high < chance
                        else "indistinguishable from")
        rows.append({"model": model, "questions": len(answers), "answered": len(answered),
                     "answered_fraction": len(answered) / len(answers), "right": right,
                     "right_of_answered": right / len(answered) if answered else None, "ci_low": low, "ci_high": high,
                     "chance": chance, "above_chance": versus_guess == "above", "versus_guess": versus_guess})
    return rows


# -- display tables: strings for Markdown, the same cells with a CSS class each for HTML ---------

# HTML classes of a difference cell, and the marker shown before its text (legible without colour).
BETTER, WORSE, NOT_SIGNIFICANT = "sig-better", "sig-worse", "not-sig"
MARKERS = {BETTER: "▲ ", WORSE: "▼ "}


def significance_class(diff: dict | None, better_sign: int = 1) -> str:
    """BETTER / WORSE when the 95% interval excludes 0 (``better_sign`` -1 where a positive value
    is a loss, as for the alignment tax), NOT_SIGNIFICANT when it contains 0, "" without one."""
    if not diff or diff["ci_low"] is None:
        return ""
    if not diff["significant"]:
        return NOT_SIGNIFICANT
    return BETTER if better_sign * diff["value"] > 0 else WORSE


@dataclass
class Table:
    """One table of the report: display strings (``frame``, also the Markdown), optional CSS
    classes per cell for the HTML page (``classes``, same shape), and a note. The HTML template
    writes the cells itself, so Jinja2 escapes every one of them."""
    title: str
    frame: Any  # pandas.DataFrame of display strings
    note: str = ""
    classes: Any = None  # pandas.DataFrame of CSS class names ("" for none), or None

    @property
    def markdown(self) -> str:
        if self.frame.empty:
            return "_(nothing to show)_"
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(map(cell, self.frame.columns)) + " |", "|" + "---|" * len(self.frame.columns)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.frame.itertuples(index=False)]
        return "\n".join(lines)

    @property
    def header(self) -> list[str]:
        return [str(c) for c in self.frame.columns]

    @property
    def cells(self) -> list[list[tuple[str, str]]]:
        """(text, css class) per cell, row by row; significant cells carry their marker."""
        rows = []
        for i, row in enumerate(self.frame.itertuples(index=False)):
            classes = list(self.classes.iloc[i]) if self.classes is not None else [""] * len(row)
            rows.append([(MARKERS.get(css, "") + _fmt(value), css) for value, css in zip(row, classes)])
        return rows


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and (pct or isinstance(value, float)):  # JSON may hold 0 and 1 as ints
        return f"{100 * value:.1f}" if pct else f"{value:.3g}"
    return str(value)


def _with_ci(value, low, high, n=None, pct=True) -> str:
    text = f"{_fmt(value, pct)} [{_fmt(low, pct)}, {_fmt(high, pct)}]"
    return text + (f" (n={n})" if n is not None else "")


def _frame(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)


def main_table(data: RunData) -> list[dict]:
    rows = []
    short = {"prompt_level_strict_acc": "P-strict", "inst_level_strict_acc": "I-strict",
             "prompt_level_loose_acc": "P-loose", "inst_level_loose_acc": "I-loose"}
    for model in data.models:
        row = {"model": model}
        for benchmark in (*MEDICAL, "kg_mcq"):
            r = data.result(model, benchmark)
            row[benchmark] = (_with_ci(r["metrics"]["acc"]["value"], *r["metrics"]["acc"]["ci95"], n=r["n"])
                              if r else "not evaluated")
        med = _medical_items(data, model)
        row["BIOMED pooled"] = _with_ci(pooled(med), *wilson_interval(pooled(med), len(med)), n=len(med)) \
            if med else "–"
        for benchmark in IF_BENCHMARKS:
            r = data.result(model, benchmark)
            name = "IFEval" if benchmark == "ifeval" else "IFBench"
            for metric in IF_METRICS:
                value = r["metrics"][metric] if r else None
                row[f"{name} {short[metric]}"] = ((_with_ci(value["value"], *value["ci95"], n=r["n"])
                                                   if metric == GENERAL_METRIC else _fmt(value["value"], True))
                                                  if r else "not evaluated")
        rows.append(row)
    return rows


def _diff_columns(diff: dict | None) -> dict:
    return {"value": None if diff is None else diff["value"], "n": None if diff is None else diff["n"],
            "ci_low": None if diff is None else diff["ci_low"], "ci_high": None if diff is None else diff["ci_high"],
            "significant": None if diff is None else diff["significant"],
            "mde": None if diff is None else diff["mde"]}


def _diff_cell(diff: dict | None, accuracy: bool = True) -> str:
    if diff is None:
        return "not evaluated"
    if diff["ci_low"] is None:
        return f"{_scaled(diff['value'], accuracy)} (n={diff['n']}, no interval)"
    mark = "" if diff["significant"] else " n.s."
    return f"{_scaled(diff['value'], accuracy)} [{_scaled(diff['ci_low'], accuracy)}, " \
           f"{_scaled(diff['ci_high'], accuracy)}]{mark}"


def _mde_cell(diff: dict | None, target: float | None, accuracy: bool = True) -> str:
    if diff is None:
        return "–"
    if diff["mde"] is None:
        return "undefined (constant differences)" if diff["ci_low"] is not None else "–"
    text = _scaled(diff["mde"], accuracy).lstrip("+")
    if target is None:
        return text
    goal = f"the {100 * target:.0f}-pt target" if accuracy else f"the {target:g} target"
    if diff["mde"] > target:  # few differing items understate the spread, so a miss stays a miss
        return f"{text} (misses {goal})"
    if diff["discordant"] < MIN_DISCORDANT_FOR_TARGET:
        items = "item" if diff["discordant"] == 1 else "items"
        return f"{text} (from {diff['discordant']} differing {items}: too few to judge {goal})"
    return f"{text} (meets {goal})"



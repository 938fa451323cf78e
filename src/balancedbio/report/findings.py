"""The report's sentences: a three-line verdict for the top of the page, and the findings in full
(one sentence per difference, comparison, AOC and steering row) that say only what the intervals
support."""

from __future__ import annotations

from balancedbio.report.load import COMPARED_CAPABILITIES, COMPARED_CAPABILITY
from balancedbio.report.stats import COMPARISONS, TARGET_MDE
from balancedbio.report.tables import _diff_cell, _fmt, _scaled

# What the method must show (grpo_full against base): a significant gain on a medical capability
# and no significant loss on instruction following.
MEDICAL_GAINS = ("biomed", "kg_mcq", "heldout_accuracy", "heldout_reasoning")
INSTRUCTION_LOSSES = ("ifeval", "ifbench")
HEADLINE = ("biomed", "ifeval", "ifbench")  # the verdict's second line
SHORT_LABEL = {"biomed": "BIOMED", "ifeval": "IFEval strict", "ifbench": "IFBench strict",
               "heldout_accuracy": "R_acc", "heldout_reasoning": "R_reas", "heldout_instruction": "R_inst"}
# A run that evaluates no benchmark (config/evidence.yaml) is judged on its held-out rewards instead
# (issue 23): grpo_full above base on accuracy and on instruction following, each 95% interval above 0,
# at a sample size whose minimum detectable effect meets TARGET_MDE.
BENCHMARK_CAPABILITIES = ("biomed", "kg_mcq", "ifeval", "ifbench")
HELDOUT_CAPABILITIES = ("heldout_accuracy", "heldout_reasoning", "heldout_instruction")
HELDOUT_TARGET = ("heldout_accuracy", "heldout_instruction")


def describe_difference(name: str, diff: dict | None, accuracy: bool = True) -> str:
    if diff is None:
        return f"{name}: not computable (not evaluated for both models)."
    unit = " points" if accuracy else ""
    if diff["ci_low"] is None:
        return f"{name}: {_scaled(diff['value'], accuracy)}{unit} on {diff['n']} paired item, too few for an interval."
    interval = f"95% CI [{_scaled(diff['ci_low'], accuracy)}, {_scaled(diff['ci_high'], accuracy)}]"
    verdict = "significant" if diff["significant"] else "not significant (the interval contains 0)"
    mde = (f"minimum detectable effect {_scaled(diff['mde'], accuracy).lstrip('+')}{unit}" if diff["mde"] is not None
           else "minimum detectable effect undefined (the paired differences do not vary)")
    value = _scaled(diff["value"], accuracy)
    return f"{name}: {value}{unit} ({interval}, n={diff['n']} paired items; {mde}), {verdict}."


def heldout_answer_findings(rows: list[dict]) -> list[str]:
    """One sentence on what held-out R_acc is made of (``tables.heldout_answer_rows``): each model's answer
    rate and how often its answers were right, against a guess."""
    if not rows:
        return []
    parts = []
    for row in rows:
        if not row["answered"]:
            parts.append(f"{row['model']} answered none of {row['questions']}")
            continue
        parts.append(f"{row['model']} answered {row['answered']} of {row['questions']}, right on "
                     f"{_fmt(row['right_of_answered'], True)}% [{_fmt(row['ci_low'], True)}, "
                     f"{_fmt(row['ci_high'], True)}] of them ({row['versus_guess']} a guess)")
    chances = sorted({round(100 * row["chance"], 1) for row in rows})
    return [f"Held-out questions (R_acc = answer rate x right among answered; a guess is right "
            f"{' / '.join(f'{c:g}' for c in chances)}% of the time): {'; '.join(parts)}."]


def steering_findings(rows: list[dict], bounds: tuple[float, float] | None) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != "full" or row["min_weight"] is None:
            continue
        where = ("strictly inside" if row["strictly_inside_bounds"] else "not strictly inside") \
            + f" [{bounds[0]:g}, {bounds[1]:g}]" if bounds else "in"
        text = (f"Dynamic weights in grpo_full: {where} on all {row['steps']} steps "
                f"(lowest {_fmt(row['min_weight'])}, highest {_fmt(row['max_weight'])})")
        if row["share_correlation"] is not None:
            text += (f"; the instruction rows' share of sum |A| followed w_inst / sum w with r = "
                     f"{row['share_correlation']:.2f} over {row['share_steps']} steps")
        if row["counterfactual_steps"]:
            text += (f"; against the same batches at equal weights, the weights moved the instruction share "
                     f"the way eq. 11 predicts (up when w_inst / sum w > 1/K, down when below) on "
                     f"{row['share_moved_as_predicted']} of {row['counterfactual_steps']} steps (mean share "
                     f"{_fmt(row['mean_update_share_instruction'])} at the applied weights, "
                     f"{_fmt(row['mean_update_share_instruction_equal_weights'])} at equal weights)")
        lines.append(text + ".")
    return lines


# -- the target and the comparisons ------------------------------------------------------------

def _by_pair(comparisons: list[dict]) -> dict:
    return {(r["first"], r["second"], r["capability"]): r for r in comparisons}


def _significant(by_pair: dict, capability: str, sign: int) -> bool:
    diff = by_pair[("grpo_full", "base", capability)]["diff"]
    return bool(diff and diff["significant"] and sign * diff["value"] > 0)


def _measured(by_pair: dict) -> set[str]:
    """The capabilities on which at least one comparison has a paired difference."""
    return {cap for (_, _, cap), row in by_pair.items() if row["diff"] is not None}


def heldout_only(by_pair: dict) -> bool:
    """Whether the run compared models on held-out rewards only (no benchmark evaluated for any model)."""
    measured = _measured(by_pair)
    return not measured & set(BENCHMARK_CAPABILITIES) and bool(measured & set(HELDOUT_CAPABILITIES))


def shown_capabilities(comparisons: list[dict]) -> set[str]:
    """The capabilities the findings and the differences table speak of: all, but in a held-out-only run
    only the measured held-out rewards (there "not evaluated" on every benchmark row says nothing)."""
    by_pair = _by_pair(comparisons)
    return _measured(by_pair) if heldout_only(by_pair) else {c.key for c in COMPARED_CAPABILITIES}


def heldout_target_verdict(by_pair: dict) -> dict:
    """Issue 23's target on the held-out rewards: for each of HELDOUT_TARGET, whether grpo_full - base has
    a 95% interval above 0 and an MDE within TARGET_MDE; "met" when both hold for every one."""
    parts, state = [], "met"
    for cap in HELDOUT_TARGET:
        diff = by_pair[("grpo_full", "base", cap)]["diff"]
        if diff is None or diff["ci_low"] is None:
            parts.append(f"{COMPARED_CAPABILITY[cap].label} not evaluated for both")
            state = "cannot be judged"
            continue
        above = diff["ci_low"] > 0
        sized = diff["mde"] is not None and diff["mde"] <= TARGET_MDE[cap]
        mde = ("MDE undefined (constant differences)" if diff["mde"] is None else
               f"MDE {diff['mde']:.3f} ({'within' if sized else 'above'} {TARGET_MDE[cap]:g})")
        parts.append(f"{COMPARED_CAPABILITY[cap].label} {_scaled(diff['value'], False)} "
                     f"[{_scaled(diff['ci_low'], False)}, {_scaled(diff['ci_high'], False)}], "
                     f"{'above 0' if above else 'not above 0'}, {mde}")
        if state == "met" and not (above and sized):
            state = "not met"
    return {"kind": "heldout", "state": state, "parts": parts}


def _heldout_target_sentence(target: dict) -> str:
    goals = " and ".join(COMPARED_CAPABILITY[c].label for c in HELDOUT_TARGET)
    return (f"Held-out target (grpo_full minus base on the {goals}, each 95% interval above 0 at a minimum "
            f"detectable effect within its target): {target['state']}; {'; '.join(target['parts'])}.")


def target_verdict(by_pair: dict) -> dict | None:
    """"met" / "not met" / "cannot be judged" for grpo_full against base, with the significant
    gains and losses (capability keys) and the instruction benchmarks that were not evaluated for
    both; None when grpo_full or base was not evaluated. A held-out-only run gets
    ``heldout_target_verdict``."""
    if ("grpo_full", "base", "biomed") not in by_pair:
        return None
    if heldout_only(by_pair):
        return heldout_target_verdict(by_pair)
    gains = [c for c in MEDICAL_GAINS if _significant(by_pair, c, +1)]
    losses = [c for c in INSTRUCTION_LOSSES if _significant(by_pair, c, -1)]
    # Said beside the target, not part of it: a medical loss rules out the gain the target needs anyway.
    medical_losses = [c for c in MEDICAL_GAINS if _significant(by_pair, c, -1)]
    unjudged = [COMPARED_CAPABILITY[c].label for c in INSTRUCTION_LOSSES
                if (by_pair[("grpo_full", "base", c)]["diff"] or {}).get("ci_low") is None]
    state = "cannot be judged" if unjudged else "met" if gains and not losses else "not met"
    return {"kind": "benchmarks", "state": state, "gains": gains, "losses": losses, "medical_losses": medical_losses,
            "unjudged": unjudged}


def _labels(keys) -> str:
    return ", ".join(COMPARED_CAPABILITY[c].label for c in keys) or "none"


def _comparison_sentence(by_pair: dict, first: str, second: str) -> str:
    rows = [by_pair[(first, second, c.key)] for c in COMPARED_CAPABILITIES]
    sig = [f"{r['label']} {_scaled(r['diff']['value'], COMPARED_CAPABILITY[r['capability']].accuracy)}"
           for r in rows if r["diff"] and r["diff"]["significant"]]
    tested = [r["label"] for r in rows if r["diff"] and r["diff"]["ci_low"] is not None]
    name = "Dynamic vs static weights" if second == "grpo_static_weights" else f"{first} vs {second}"
    if sig:
        return (f"{name} ({first} minus {second}): significant on {'; '.join(sig)}; "
                f"not significant on the other {len(tested) - len(sig)} of {len(tested)} capabilities tested.")
    return (f"{name} ({first} minus {second}): no significant difference on any of the "
            f"{len(tested)} capabilities tested ({', '.join(tested) or 'none'}).")


def conclusions(comparisons: list[dict], aoc: list[dict]) -> list[str]:
    """Plain sentences that say only what the intervals support (the findings in full)."""
    lines = []
    by_pair = _by_pair(comparisons)
    target = target_verdict(by_pair)
    if target is not None:
        shown = shown_capabilities(comparisons)
        for cap in COMPARED_CAPABILITIES:
            if cap.key not in shown:
                continue
            row = by_pair[("grpo_full", "base", cap.key)]
            lines.append(describe_difference(f"grpo_full minus base, {cap.label}", row["diff"], cap.accuracy))
    if target is not None and target["kind"] == "heldout":
        lines.append(_heldout_target_sentence(target))
    elif target is not None:
        verdict = (f"cannot be judged ({', '.join(target['unjudged'])} not evaluated for both)"
                   if target["unjudged"] else target["state"])
        lines.append(f"Target (a significant medical gain of grpo_full over base, no significant loss on IFEval or "
                     f"IFBench strict): {verdict}; significant gains: {_labels(target['gains'])}; "
                     f"significant losses on IFEval/IFBench strict: {_labels(target['losses'])}; "
                     f"significant medical losses: {_labels(target['medical_losses'])}.")
    else:
        lines.append("grpo_full or base was not evaluated, so the method's gain is not reported.")
    for first, second in COMPARISONS:
        if (first, second) == ("grpo_full", "base") or (first, second, "biomed") not in by_pair:
            continue
        lines.append(_comparison_sentence(by_pair, first, second))
    if ("grpo_full", "grpo_static_weights", "biomed") not in by_pair:
        lines.append("The static-weights ablation was not evaluated, so dynamic and static weights are not compared.")
    for row in aoc:
        if row["variant"] in ("full", "no_aoc"):
            lines.append(f"AOC in grpo_{row['variant']}: S_cos defined on {row['s_cos_defined']} of {row['steps']} "
                         f"steps, penalty fired on {row['fired']} of them, mean |S_cos| "
                         f"{_fmt(row['mean_abs_s_cos'])}.")
    return lines


def verdict(comparisons: list[dict]) -> list[dict]:
    """Three short lines for the top of the page, each {"text", "state"} (state "good", "bad" or
    "open" colours the line): the target, grpo_full minus base on the headline capabilities, and
    dynamic against static weights."""
    by_pair = _by_pair(comparisons)
    target = target_verdict(by_pair)
    if target is None:
        return [{"text": "No verdict: grpo_full or base was not evaluated.", "state": "open"}]
    if target["kind"] == "heldout":
        state = {"met": "good", "not met": "bad"}.get(target["state"], "open")
        cells = [f"{SHORT_LABEL[c]} {_diff_cell(by_pair[('grpo_full', 'base', c)]['diff'], False)}"
                 for c in HELDOUT_CAPABILITIES]
        return [{"text": _heldout_target_sentence(target), "state": state},
                {"text": f"grpo_full minus base, held-out rewards with 95% CI: {'; '.join(cells)}".rstrip(".") + ".",
                 "state": "open"},
                _static_weights_line(by_pair)]
    if target["state"] == "cannot be judged":
        first = {"text": f"Target cannot be judged: {', '.join(target['unjudged'])} not evaluated for both "
                         f"grpo_full and base.", "state": "open"}
    elif target["state"] == "met":
        first = {"text": f"Target met: grpo_full gains significantly over base on {_labels(target['gains'])}, "
                         f"with no significant loss on IFEval or IFBench strict.", "state": "good"}
    else:
        first = {"text": f"Target not met: significant medical gains over base: {_labels(target['gains'])}; "
                         f"significant instruction-following losses: {_labels(target['losses'])}.", "state": "bad"}
    cells = [f"{SHORT_LABEL[c]} {_diff_cell(by_pair[('grpo_full', 'base', c)]['diff'])}" for c in HEADLINE]
    second = {"text": f"grpo_full minus base, points with 95% CI: {'; '.join(cells)}".rstrip(".") + ".",
              "state": "open"}
    return [first, second, _static_weights_line(by_pair)]


def _static_weights_line(by_pair: dict) -> dict:
    if ("grpo_full", "grpo_static_weights", "biomed") in by_pair:
        return {"text": _comparison_sentence(by_pair, "grpo_full", "grpo_static_weights"), "state": "open"}
    return {"text": "Dynamic vs static weights: not compared (the static-weights ablation was not evaluated).",
            "state": "open"}

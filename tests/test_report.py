"""The report from a small fixture of result files the test writes itself (hand-made outcomes whose
differences, intervals and counts are known)."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import subprocess

import numpy as np
import pytest

from balancedbio.report import (RunData, aoc_rows, alignment_tax, build_report, comparison_rows, detection_factor,
                                load_dynamics, load_heldout, load_results, minimum_detectable_effect, paired_difference,
                                significance_class, steering_findings, steering_rows, wilson_interval, _mde_cell)
from conftest import TEST_CONFIG, run_snakemake

Z_SUM = 1.959963984540054 + 0.8416212335729143  # z_0.975 + z_0.80

# Hand-made item outcomes per model: IFEval / IFBench strict per prompt, medical correctness per
# question, kg_mcq correctness, and held-out rewards per prompt.
MODELS = ("base", "sft", "grpo_full", "grpo_static_weights", "grpo_gdpo")
IFEVAL = {"base": [1, 1, 1, 0], "sft": [1, 1, 0, 0], "grpo_full": [1, 0, 1, 0], "grpo_static_weights": [0, 0, 1, 0],
          "grpo_gdpo": [1, 1, 1, 0]}
IFBENCH = {"base": [0, 0, 1, 0, 0, 1], "sft": [0, 0, 1, 0, 0, 1], "grpo_full": [1, 0, 1, 0, 0, 1],
           "grpo_static_weights": [0, 0, 1, 0, 0, 0], "grpo_gdpo": [0, 0, 1, 0, 0, 1]}
MEDICAL = {"base": [0, 0, 1, 1, 0, 0], "sft": [0, 1, 1, 1, 0, 0], "grpo_full": [1, 0, 1, 1, 1, 0],
           "grpo_static_weights": [0, 0, 1, 1, 0, 0], "grpo_gdpo": [0, 0, 1, 1, 1, 0]}
# kg_mcq on 40 questions: grpo_full answers all of them, base only the first 10 -> +75 points.
KG = {"base": [1] * 10 + [0] * 30, "sft": [1] * 12 + [0] * 28, "grpo_full": [1] * 40,
      "grpo_static_weights": [1] * 20 + [0] * 20, "grpo_gdpo": [1] * 30 + [0] * 10}
HELDOUT = {"base": ([0.2, 0.4, 0.6], [0.5, 0.5]), "sft": ([0.3, 0.4, 0.6], [0.5, 0.6]),
           "grpo_full": ([0.5, 0.7, 0.9], [0.4, 0.5]), "grpo_static_weights": ([0.2, 0.4, 0.6], [0.5, 0.5]),
           "grpo_gdpo": ([0.2, 0.4, 0.6], [0.5, 0.5])}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _instruction_result(folder, model, benchmark, outcomes):
    _jsonl(folder / f"{benchmark}.items.jsonl",
           [{"task": f"bb_{benchmark}", "doc_id": i, "prompt_level_strict_acc": bool(v),
             "inst_level_strict_acc": [bool(v)], "instruction_id_list": ["x:y"]} for i, v in enumerate(outcomes)])
    p = sum(outcomes) / len(outcomes)
    metric = {"value": p, "ci95": [max(0, p - 0.3), min(1, p + 0.3)]}
    (folder / f"{benchmark}.json").write_text(json.dumps({
        "benchmark": benchmark, "model": model, "status": "ok", "n": len(outcomes),
        "metrics": {m: metric for m in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                                        "inst_level_loose_acc")} | {"n_instructions": len(outcomes)}}))


def _mcq_result(folder, model, benchmark, items, per_subject=None):
    _jsonl(folder / f"{benchmark}.items.jsonl", items)
    acc = sum(i["correct"] for i in items) / len(items)
    (folder / f"{benchmark}.json").write_text(json.dumps({
        "benchmark": benchmark, "model": model, "status": "ok", "n": len(items),
        "metrics": {"acc": {"value": acc, "ci95": [max(0, acc - 0.3), min(1, acc + 0.3)]}},
        "per_subject": per_subject}))


def _write_model(root, model):
    folder = root / "eval" / model
    folder.mkdir(parents=True)
    _instruction_result(folder, model, "ifeval", IFEVAL[model])
    _instruction_result(folder, model, "ifbench", IFBENCH[model])
    medical = MEDICAL[model]
    subjects = {"anatomy": medical[:3], "college_biology": medical[3:]}
    items = [{"task": f"bb_mmlu_med_{s}", "doc_id": i, "answer": "A", "correct": bool(v)}
             for s, outcomes in subjects.items() for i, v in enumerate(outcomes)]
    _mcq_result(folder, model, "mmlu_med", items,
                {s: {"n": len(o), "acc": sum(o) / len(o), "ci95": [0.0, 1.0]} for s, o in subjects.items()})
    _mcq_result(folder, model, "kg_mcq", [{"task": "bb_kg_mcq", "doc_id": i, "answer": "A", "correct": bool(v)}
                                          for i, v in enumerate(KG[model])])
    (folder / "cmexam.json").write_text(json.dumps({"benchmark": "cmexam", "model": model, "status": "skipped",
                                                    "reason": "cmexam/test.jsonl does not exist"}))
    (folder / "cmexam.items.jsonl").write_text("")
    accuracy, instruction = HELDOUT[model]
    _jsonl(folder / "heldout_rewards.items.jsonl",
           [{"id": f"kg{i}", "component": "accuracy", "reward": r} for i, r in enumerate(accuracy)]
           + [{"id": f"p{i}", "component": "instruction", "reward": r} for i, r in enumerate(instruction)])
    components = {name: {"mean": sum(v) / len(v), "n": len(v), "ci_low": min(v), "ci_high": max(v)}
                  for name, v in (("accuracy", accuracy), ("instruction", instruction))}
    (folder / "heldout_rewards.json").write_text(json.dumps({"status": "ok", "model": model, "components": components,
                                                             "settings": {"max_new_tokens": 8}}))


# AOC: full fires on 2 of the 4 steps where S_cos is defined (flag given); static_weights has no
# flag, so L_orth > 0 counts (1 step); no_aoc never fires.
DYNAMICS = {
    "full": [(0.3, True, 0.02), (None, False, 0.0), (-0.05, False, 0.0), (0.2, True, 0.01), (None, False, 0.0),
             (0.15, False, 0.0)],
    "static_weights": [(0.4, None, 0.03), (0.1, None, 0.0), (None, None, 0.0)],
    "no_aoc": [(0.5, False, 0.0), (-0.25, False, 0.0), (None, False, 0.0), (0.35, False, 0.0)],
}


@pytest.fixture()
def run_dir(tmp_path):
    results = tmp_path / "results"
    for model in MODELS:
        _write_model(results, model)
    for variant, steps in DYNAMICS.items():
        folder = results / f"grpo_{variant}"
        folder.mkdir()
        rows = []
        for step, (s_cos, fired, l_orth) in enumerate(steps, start=1):
            w = 1.0 + 0.1 * step if variant == "full" else 1.0
            row = {"step": step, "reward": 0.5, "kl": 0.01 * step, "completion_length": 60, "s_cos": s_cos,
                   "l_orth": l_orth, "weight_accuracy": w, "weight_instruction": 2 - w,
                   "reward_accuracy": 0.1 * step, "reward_instruction": 0.5}
            if fired is not None:
                row["aoc_fired"] = fired
            rows.append(row)
        _jsonl(folder / "dynamics.jsonl", rows)
    (results / "prm.json").write_text(json.dumps({
        "test": {"n": 10, "macro_f1": 0.9, "accuracy": 0.92,
                 "per_class_f1": {"valid": 0.9, "neutral": 0.95, "fallacious": 0.85}},
        "test_chain_ranking": {"pairs": 5, "sound_above_flawed": 1.0}}))
    (results / "decontamination.json").write_text(json.dumps({"outputs": {"sft": {
        "total": 10, "kept": 9, "dropped": 1, "dropped_by_benchmark": {"mmlu_med": 1}}}}))
    (results / "sft.json").write_text(json.dumps({"examples": 16, "first_logged_loss": 1.41,
                                                  "last_logged_loss": 1.2, "log_history": [{"loss": 1.41}]}))
    # A stray model and variant that no input list names: the report must not see them.
    stray = results / "eval" / "grpo_stray"
    stray.mkdir()
    _instruction_result(stray, "grpo_stray", "ifeval", [1, 1, 1, 1])
    (results / "grpo_stray").mkdir()
    _jsonl(results / "grpo_stray" / "dynamics.jsonl", [{"step": 1, "s_cos": 0.9, "aoc_fired": True}])
    return results


def _inputs(results, models=MODELS, variants=tuple(DYNAMICS),
            benchmarks=("ifeval", "ifbench", "mmlu_med", "kg_mcq", "cmexam")):
    return {"evaluations": [str(results / "eval" / m / f"{b}.json") for m in models for b in benchmarks],
            "eval_items": [str(results / "eval" / m / f"{b}.items.jsonl") for m in models for b in benchmarks],
            "heldout": [str(results / "eval" / m / "heldout_rewards.json") for m in models],
            "heldout_items": [str(results / "eval" / m / "heldout_rewards.items.jsonl") for m in models],
            "dynamics": [str(results / f"grpo_{v}" / "dynamics.jsonl") for v in variants]}


def _data(results, **kwargs):
    files = _inputs(results, **kwargs)
    return RunData(load_results(files["evaluations"], files["eval_items"]),
                   load_heldout(files["heldout"], files["heldout_items"]), load_dynamics(files["dynamics"]))


def _build(results, out, **kwargs):
    return build_report(out_dir=str(out), **_inputs(results, **kwargs), prm_metrics=str(results / "prm.json"),
                        decontamination=str(results / "decontamination.json"), sft_metrics=str(results / "sft.json"),
                        config={"run_name": "fixture", "model": {"source": "embedded:x"}, "seed": 1,
                                "aoc": {"tau": 0.1}}, versions={"torch": "x"})


def _csv(path):
    with open(path) as handle:
        return list(csv.DictReader(handle))


# -- statistics on cases with a known answer ---------------------------------------------------

def test_paired_difference_interval_excludes_zero_for_a_known_half_point_gain():
    # a right on all 100 items, b on the first 50: diff 0.5, SE = sd(d)/10 with sd(d) = sqrt(0.25*100/99).
    a = {str(i): 1.0 for i in range(100)}
    b = {str(i): float(i < 50) for i in range(100)}
    diff = paired_difference(a, b)
    se = math.sqrt(0.25 * 100 / 99) / 10
    assert diff["value"] == pytest.approx(0.5) and diff["n"] == 100 and diff["discordant"] == 50
    assert diff["se"] == pytest.approx(se)
    # The percentile bootstrap agrees with the normal interval 0.5 +- 1.96 * 0.05 within resampling noise.
    assert diff["ci_low"] == pytest.approx(0.5 - 1.96 * 0.05, abs=0.03)
    assert diff["ci_high"] == pytest.approx(0.5 + 1.96 * 0.05, abs=0.03)
    assert diff["significant"]
    assert diff["mde"] == pytest.approx(Z_SUM * se)


def test_paired_difference_interval_contains_zero_for_balanced_discordance():
    # 10 items only a gets right, 8 only b: +0.02 with SE ~0.042, so the interval contains 0.
    a = {str(i): float(i < 10 or i >= 90) for i in range(100)}
    b = {str(i): float(10 <= i < 18 or i >= 90) for i in range(100)}
    diff = paired_difference(a, b)
    assert diff["value"] == pytest.approx(0.02) and diff["discordant"] == 18
    assert diff["ci_low"] < 0 < diff["ci_high"] and not diff["significant"]
    # Identical models: a zero-width interval at 0, and no spread to derive an MDE from.
    same = paired_difference(a, dict(a))
    assert (same["ci_low"], same["ci_high"], same["significant"], same["mde"]) == (0.0, 0.0, False, None)
    assert paired_difference({"a": 1.0}, {"b": 1.0}) is None


def test_minimum_detectable_effect_from_the_discordance_of_paired_outcomes():
    assert detection_factor() == pytest.approx(Z_SUM, rel=1e-12)
    assert detection_factor(power=0.5) == pytest.approx(1.959964, rel=1e-6)
    assert minimum_detectable_effect(400, 0.1) == pytest.approx(Z_SUM * math.sqrt(0.1 / 400))
    # Balanced discordance (10 items only a right, 10 only b): the report's MDE from the observed
    # spread is the planning formula's at the same discordance, up to the sample variance's n / (n - 1).
    a = {str(i): float(i < 10 or i >= 150) for i in range(200)}
    b = {str(i): float(10 <= i < 20 or i >= 150) for i in range(200)}
    assert paired_difference(a, b)["mde"] == pytest.approx(minimum_detectable_effect(200, 0.1) * math.sqrt(200 / 199))
    # n = 200 pairs: 20 only a right (p10 = 0.1), 10 only b right (p01 = 0.05).
    n, p10, p01 = 200, 0.1, 0.05
    a = {str(i): float(i < 20 or i >= 150) for i in range(n)}
    b = {str(i): float(20 <= i < 30 or i >= 150) for i in range(n)}
    variance = (p10 + p01 - (p10 - p01) ** 2) * n / (n - 1)
    diff = paired_difference(a, b)
    assert diff["value"] == pytest.approx(p10 - p01)
    assert diff["mde"] == pytest.approx(Z_SUM * math.sqrt(variance / n))


def test_the_target_is_judged_only_from_enough_differing_items():
    """One item of 32 that differs gives a small MDE (8.8 points) from a spread that one value
    cannot estimate; the report says so instead of 'meets the target'."""
    base = {str(i): 0.0 for i in range(32)}
    one = paired_difference({**base, "0": 1.0}, base)
    assert one["discordant"] == 1 and one["mde"] < 0.10
    assert _mde_cell(one, 0.10).endswith("(from 1 differing item: too few to judge the 10-pt target)")
    three = paired_difference({**base, **{str(i): 1.0 for i in range(3)}}, base)
    assert three["mde"] > 0.10 and _mde_cell(three, 0.10).endswith("(misses the 10-pt target)"), \
        "a miss from few items stays a miss: more differing items would only widen the spread"
    many = paired_difference({str(i): float(i % 2) for i in range(400)}, {str(i): float(i % 3 == 0) for i in range(400)})
    assert many["mde"] < 0.10 and _mde_cell(many, 0.10).endswith("(meets the 10-pt target)")


# -- tables from the fixture -------------------------------------------------------------------

def test_comparisons_per_capability_on_the_hand_made_run(run_dir):
    rows = {(r["first"], r["second"], r["capability"]): r["diff"] for r in comparison_rows(_data(run_dir))}
    pairs = {(f, s) for f, s, _ in rows}
    assert pairs == {("sft", "base"), ("grpo_full", "sft"), ("grpo_full", "base"),
                     ("grpo_full", "grpo_static_weights"), ("grpo_full", "grpo_gdpo")}
    kg = rows[("grpo_full", "base", "kg_mcq")]
    assert kg["value"] == pytest.approx(0.75) and kg["n"] == 40 and kg["significant"]
    assert rows[("grpo_full", "base", "ifbench")]["value"] == pytest.approx(1 / 6)
    assert rows[("grpo_full", "base", "ifbench")]["n"] == 6
    assert rows[("grpo_full", "base", "heldout_accuracy")]["value"] == pytest.approx(0.3)
    assert rows[("grpo_full", "base", "heldout_accuracy")]["significant"]  # +0.3 on every prompt
    assert rows[("grpo_full", "base", "heldout_instruction")]["value"] == pytest.approx(-0.05)
    assert rows[("grpo_full", "grpo_gdpo", "biomed")]["value"] == pytest.approx(1 / 6)
    # Without gdpo evaluated, its comparison is not made.
    data = _data(run_dir, models=MODELS[:4])
    assert {(r["first"], r["second"]) for r in comparison_rows(data)} == pairs - {("grpo_full", "grpo_gdpo")}


def test_alignment_tax_on_ifeval_and_ifbench_and_domain_gain(run_dir):
    rows = {r["model"]: r for r in alignment_tax(_data(run_dir))}
    # base IFEval 3/4, grpo_full 2/4: tax +0.25; IFBench 2/6 -> 3/6: tax -1/6; medical 2/6 -> 4/6.
    assert rows["grpo_full"]["tax_ifeval"]["value"] == pytest.approx(0.25)
    assert rows["grpo_full"]["tax_ifbench"]["value"] == pytest.approx(-1 / 6)
    assert rows["grpo_full"]["domain_gain"]["value"] == pytest.approx(1 / 3)
    assert rows["grpo_static_weights"]["domain_gain"]["value"] == pytest.approx(0.0)
    tax = rows["grpo_full"]["tax_ifeval"]
    assert tax["ci_low"] <= tax["value"] <= tax["ci_high"] and not tax["significant"]  # 4 items: too few


def test_aoc_counts_from_a_hand_written_dynamics_file(run_dir):
    rows = {r["variant"]: r for r in aoc_rows(_data(run_dir).dynamics)}
    full = rows["full"]
    assert (full["steps"], full["s_cos_defined"], full["fired"]) == (6, 4, 2)
    assert full["mean_abs_s_cos"] == pytest.approx((0.3 + 0.05 + 0.2 + 0.15) / 4)
    assert full["fired_fraction_of_defined"] == pytest.approx(0.5)
    assert (rows["static_weights"]["s_cos_defined"], rows["static_weights"]["fired"]) == (2, 1)  # L_orth fallback
    assert (rows["no_aoc"]["fired"], rows["no_aoc"]["max_abs_s_cos"]) == (0, 0.5)


def test_steering_table_checks_bounds_and_the_update_share_against_the_weight_share():
    # w_inst / sum w = 0.25, 0.5, 0.75 and update shares that track it (r = 1), then a static run.
    dynamics = {
        "full": [{"step": i + 1, "weight_accuracy": a, "weight_instruction": b, "update_share_instruction": u}
                 for i, (a, b, u) in enumerate([(3.0, 1.0, 0.2), (1.0, 1.0, 0.45), (1.0, 3.0, 0.7)])],
        "static_weights": [{"step": i + 1, "weight_accuracy": 1.0, "weight_instruction": 1.0,
                            "update_share_instruction": u} for i, u in enumerate([0.4, 0.5, 0.6])],
        "at_the_clamp": [{"step": 1, "weight_accuracy": 10.0, "weight_instruction": 0.5}],
    }
    # A step without instruction signal (share 0) says nothing about the weights: left out of r.
    dynamics["full"].append({"step": 4, "weight_accuracy": 1.0, "weight_instruction": 2.0,
                             "update_share_instruction": 0.0})
    rows = {r["variant"]: r for r in steering_rows(dynamics, (0.1, 10.0))}
    full = rows["full"]
    assert (full["min_weight"], full["max_weight"], full["strictly_inside_bounds"]) == (1.0, 3.0, True)
    assert full["share_correlation"] == pytest.approx(np.corrcoef([0.25, 0.5, 0.75], [0.2, 0.45, 0.7])[0, 1])
    assert full["mean_weight_share_instruction"] == pytest.approx(0.5) and full["share_steps"] == 3
    assert rows["static_weights"]["share_correlation"] is None  # constant weights: r undefined
    assert rows["at_the_clamp"]["strictly_inside_bounds"] is False  # a weight on max_weight is not inside
    (line,) = steering_findings([full], (0.1, 10.0))
    assert "strictly inside [0.1, 10] on all 4 steps" in line and "r = 1.00 over 3 steps" in line
    assert full["counterfactual_steps"] == 0  # no equal-weight shares in these dynamics


def test_steering_counts_the_steps_where_the_weights_moved_the_share_as_eq_11_predicts():
    # K = 2: w_inst / sum w = 0.25 predicts a share below the equal-weight one, 0.75 above, 0.5 nothing.
    steps = [(3.0, 1.0, 0.2, 0.4), (1.0, 3.0, 0.7, 0.5), (1.0, 3.0, 0.3, 0.5), (1.0, 1.0, 0.5, 0.5),
             (1.0, 3.0, 0.0, 0.3)]  # the last: no instruction signal at the applied weights, left out
    dynamics = {"full": [{"step": i + 1, "weight_accuracy": a, "weight_instruction": b,
                          "update_share_instruction": u, "update_share_instruction_equal_weights": e}
                         for i, (a, b, u, e) in enumerate(steps)]}
    (row,) = steering_rows(dynamics, (0.1, 10.0))
    assert (row["share_moved_as_predicted"], row["counterfactual_steps"]) == (2, 3)
    assert row["mean_update_share_instruction_equal_weights"] == pytest.approx((0.4 + 0.5 + 0.5) / 3)
    (line,) = steering_findings([row], (0.1, 10.0))
    assert "the way eq. 11 predicts" in line and "on 2 of 3 steps" in line


def test_aoc_table_counts_dynamic_sampling():
    dynamics = {"full": [{"step": 1, "s_cos": 0.1, "constant_groups_sampled": 3, "groups_resampled": 4,
                          "constant_groups_kept": 1},
                         {"step": 2, "s_cos": None, "constant_groups_sampled": 2, "groups_resampled": 2,
                          "constant_groups_kept": 2}],
                "off": [{"step": 1, "s_cos": 0.2}]}
    rows = {r["variant"]: r for r in aoc_rows(dynamics)}
    assert (rows["full"]["constant_groups_sampled"], rows["full"]["groups_resampled"],
            rows["full"]["constant_groups_kept"]) == (5, 6, 3)
    assert rows["off"]["groups_resampled"] is None


def test_an_evaluated_result_needs_its_declared_items_file(run_dir):
    files = _inputs(run_dir)
    items = [p for p in files["eval_items"] if not p.endswith("grpo_full/ifbench.items.jsonl")]
    with pytest.raises(ValueError, match=r"grpo_full/ifbench\.json: its items file .* not among the report's inputs"):
        load_results(files["evaluations"], items)


def test_report_reads_only_the_files_it_is_given(run_dir, tmp_path):
    out = tmp_path / "report"
    summary = _build(run_dir, out)
    assert "grpo_stray" not in summary["models"] and set(summary["models"]) == set(MODELS)
    assert "grpo_stray" not in (out / "report.md").read_text()
    assert "stray" not in {r["variant"] for r in _csv(out / "tables" / "aoc.csv")}
    # Fewer files given, fewer models reported, although their folders are still there.
    smaller = _build(run_dir, tmp_path / "small", models=("base", "grpo_full"), variants=("full",))
    assert smaller["models"] == ["base", "grpo_full"]
    assert {r["variant"] for r in _csv(tmp_path / "small" / "tables" / "table2_ablations.csv")} == {"full"}


def test_report_builds_tables_figures_and_honest_wording(run_dir, tmp_path):
    out = tmp_path / "report"
    summary = _build(run_dir, out)
    table1 = _csv(out / "tables" / "table1_main.csv")
    assert {(r["model"], r["benchmark"]) for r in table1} == {
        (m, b) for m in MODELS for b in ("ifeval", "ifbench", "mmlu_med", "kg_mcq")}
    assert len([r for r in table1 if r["benchmark"] == "ifbench"]) == len(MODELS) * 4  # four metrics per model
    skipped = _csv(out / "tables" / "skipped.csv")
    assert ("base", "cmexam/test.jsonl does not exist") == (skipped[0]["model"], skipped[0]["reason"])
    ablations = {r["variant"]: r for r in _csv(out / "tables" / "table2_ablations.csv")}
    assert set(ablations) == set(DYNAMICS) and float(ablations["full"]["weight_accuracy"]) == pytest.approx(1.6)
    assert float(ablations["full"]["ifbench"]) == pytest.approx(0.5)
    taxes = {(r["model"], r["benchmark"]): r for r in _csv(out / "tables" / "alignment_tax.csv")}
    assert float(taxes[("grpo_full", "ifbench")]["value"]) == pytest.approx(-1 / 6)
    held = {(r["model"], r["component"]): r for r in _csv(out / "tables" / "heldout_rewards.csv")}
    assert float(held[("grpo_full", "accuracy")]["mean"]) == pytest.approx(0.7)
    assert float(held[("grpo_full", "accuracy")]["ci_low"]) == pytest.approx(0.5) and held[("base", "instruction")]
    diffs = _csv(out / "tables" / "paired_differences.csv")
    kg = next(r for r in diffs if r["comparison"] == "grpo_full - base" and r["capability"] == "kg_mcq")
    assert kg["significant"] == "True" and float(kg["mde"]) > 0
    assert len(diffs) == 5 * 7  # five comparisons x seven capabilities (held-out R_reas without rows here: blank)
    aoc = {r["variant"]: r for r in _csv(out / "tables" / "aoc.csv")}
    assert (aoc["full"]["s_cos_defined"], aoc["full"]["fired"]) == ("4", "2")
    for name in ("weights", "rewards", "aoc", "kl_length", "pareto", "differences"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 5000
    markdown = (out / "report.md").read_text()
    assert "| model | mmlu_med |" in markdown and "IFBench P-strict" in markdown
    assert re.search(r"grpo_full minus base, kg_mcq accuracy: \+75\.0 points \(95% CI \[\+\d", markdown)
    assert "minimum detectable effect" in markdown and "not significant" in markdown
    assert "AOC in grpo_full: S_cos defined on 4 of 6 steps, penalty fired on 2 of them" in markdown
    assert "| full | 4 / 6 | 2 / 4 |" in markdown
    # kg_mcq and the held-out accuracy reward rise significantly; IFEval/IFBench have no significant loss.
    assert ("IFBench strict): met; significant gains: kg_mcq accuracy, held-out accuracy reward; "
            "significant losses on IFEval/IFBench strict: none; significant medical losses: none.") in markdown
    assert "cmexam/test.jsonl does not exist" in markdown and "last_logged_loss" in markdown
    assert any(line.startswith("Dynamic vs static weights") for line in summary["findings"])
    assert "differences" in summary["figures"]


def test_dry_run_declares_the_report_inputs_from_the_config(tmp_path):
    # A leftover model folder must not change the plan.
    (tmp_path / "results" / "models" / "grpo_dwa").mkdir(parents=True)
    result = run_snakemake("results/report/report.html", "-n", "--configfile", str(TEST_CONFIG), workdir=tmp_path)
    plan = result.stdout + result.stderr
    lines = plan.splitlines()
    report_line = lines[lines.index("rule report:") + 1]
    assert report_line.lstrip().startswith("input:")
    for model in ("base", "grpo_full"):
        for benchmark in ("mmlu_med", "ifeval", "kg_mcq"):
            assert f"results/eval/{model}/{benchmark}.items.jsonl" in report_line
            assert f"results/eval/{model}/{benchmark}.json" in report_line
    assert "results/grpo_full/dynamics.jsonl" in report_line and "results/eval/skipped.json" in report_line
    assert "grpo_dwa" not in plan


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed (make test installs it)")
def test_report_html_opens_in_headless_chromium_and_shows_the_figures(run_dir, tmp_path):
    from PIL import Image, ImageStat

    out = tmp_path / "report"
    _build(run_dir, out)
    page = (out / "report.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    loaded = re.search(r'data-figures="(\d+)" data-figures-loaded="(\d+)"', dom.stdout)
    assert loaded and int(loaded.group(1)) >= 6 and loaded.group(1) == loaded.group(2), dom.stdout[:500]
    assert '<table class="dataframe data">' in dom.stdout and "Alignment tax" in dom.stdout and "IFBench" in dom.stdout
    shot = tmp_path / "shot.png"
    result = subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,3000", page],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("L")
    stat = ImageStat.Stat(image)
    assert stat.stddev[0] > 10, "the screenshot is blank"
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 50  # text, tables and plots, not one colour



def test_the_bootstrap_of_the_differences_is_scipys_paired_bootstrap():
    import numpy as np
    from scipy.stats import bootstrap

    rng = np.random.default_rng(3)
    x, y = (rng.random(300) < 0.6).astype(float), (rng.random(300) < 0.5).astype(float)
    paired = bootstrap((x, y), lambda u, v, axis: np.mean(u - v, axis=axis), paired=True, vectorized=True,
                       n_resamples=2000, method="percentile", rng=np.random.default_rng(0)).confidence_interval
    diff = paired_difference(dict(enumerate(x)), dict(enumerate(y)), seed=0)
    assert (diff["ci_low"], diff["ci_high"]) == pytest.approx((paired.low, paired.high))


def test_the_target_is_not_judged_without_ifbench(run_dir, tmp_path):
    # ifbench.json lies in every model folder, but it is not among the inputs.
    summary = _build(run_dir, tmp_path / "report", benchmarks=("ifeval", "mmlu_med", "kg_mcq"))
    target = next(line for line in summary["findings"] if line.startswith("Target"))
    assert "cannot be judged (IFBench prompt strict not evaluated for both)" in target
    assert any(line.startswith("grpo_full minus base, IFBench prompt strict: not computable")
               for line in summary["findings"])


def test_a_run_without_benchmarks_is_judged_on_its_held_out_rewards(run_dir, tmp_path):
    """config/evidence.yaml evaluates no benchmark: the findings, the verdict and the differences table speak
    of the held-out rewards only, and the target is issue 23's (R_acc and R_inst above base, MDE <= 0.05)."""
    summary = _build(run_dir, tmp_path / "report", benchmarks=())
    assert not any("not computable" in line for line in summary["findings"])
    assert any(line.startswith("grpo_full minus base, held-out accuracy reward: +0.300")
               for line in summary["findings"])
    target = next(line for line in summary["findings"] if line.startswith("Held-out target"))
    # R_acc +0.3 on every item is above 0; R_inst -0.05 is not; neither MDE is defined within 0.05 on 2-3 items.
    assert ": not met;" in target and "held-out instruction reward -0.050" in target and "not above 0" in target
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert markdown.split("## Verdict", 1)[1].lstrip().startswith("- Held-out target")
    assert "Table 1: models x benchmarks" not in markdown and "Alignment tax (eq. 2)" not in markdown
    differences = markdown.split("## Paired differences", 1)[1].split("\n## ", 1)[0]
    assert "held-out accuracy reward" in differences and "IFEval" not in differences and "kg_mcq" not in differences


def test_held_out_accuracy_is_split_into_answer_rate_and_right_among_answered(run_dir, tmp_path):
    """Items that say whether R_acc's parser found a letter give the report a table and a finding: base answers
    20 of 40 questions and is right on 5 (indistinguishable from a guess), grpo_full answers 36, right on 30 (above)."""
    def answers(model, answered, right):
        rows = [{"id": f"kg{i}", "component": "accuracy", "reward": float(i < right), "answered": i < answered,
                 "chance": 0.25} for i in range(40)]
        _jsonl(run_dir / "eval" / model / "heldout_rewards.items.jsonl",
               rows + [{"id": "p0", "component": "instruction", "reward": 0.5}])
    answers("base", 20, 5)
    answers("grpo_full", 36, 30)
    summary = _build(run_dir, tmp_path / "report", benchmarks=())
    rows = {r["model"]: r for r in _csv(tmp_path / "report" / "tables" / "heldout_answers.csv")}
    assert set(rows) == {"base", "grpo_full"}  # the other models' items predate the fields: no row
    low, high = wilson_interval(5 / 20, 20)
    assert (int(rows["base"]["answered"]), float(rows["base"]["right"])) == (20, 5.0)
    assert float(rows["base"]["ci_low"]) == pytest.approx(low) and float(rows["base"]["ci_high"]) == pytest.approx(high)
    assert rows["base"]["above_chance"] == "False" and rows["grpo_full"]["above_chance"] == "True"
    finding = next(line for line in summary["findings"] if line.startswith("Held-out questions"))
    assert "a guess is right 25% of the time" in finding
    assert f"base answered 20 of 40, right on 25.0% [{100 * low:.1f}, {100 * high:.1f}] of them (indistinguishable from a guess)" in finding
    assert "grpo_full answered 36 of 40, right on 83.3%" in finding and "(above a guess)" in finding
    markdown = (tmp_path / "report" / "report.md").read_text()
    table = markdown.split("## Held-out questions: how often", 1)[1].split("\n## ", 1)[0]
    assert "| grpo_full | 36 of 40 | 83.3 [" in table and "| 0.750 |" in table


def test_an_answered_row_without_its_chance_names_the_file_and_row(run_dir):
    items = run_dir / "eval" / "sft" / "heldout_rewards.items.jsonl"
    _jsonl(items, [{"id": "kg0", "component": "accuracy", "reward": 1.0, "answered": True, "chance": 0.25},
                   {"id": "kg1", "component": "accuracy", "reward": 0.0, "answered": False}])
    with pytest.raises(ValueError, match=rf"{re.escape(str(items))}: row 2 .*chance"):
        _data(run_dir)


def test_items_without_the_answer_fields_give_no_answer_table(run_dir, tmp_path):
    summary = _build(run_dir, tmp_path / "report", benchmarks=())
    assert not any(line.startswith("Held-out questions") for line in summary["findings"])
    assert "## Held-out questions: how often" not in (tmp_path / "report" / "report.md").read_text()
    assert _csv(tmp_path / "report" / "tables" / "heldout_answers.csv") == []


def _diff(value, low, high, mde):
    return {"value": value, "ci_low": low, "ci_high": high, "mde": mde, "n": 600, "significant": low > 0 or high < 0,
            "discordant": 100}


@pytest.mark.parametrize(("accuracy", "instruction", "state"), [
    (_diff(0.06, 0.02, 0.10, 0.04), _diff(0.05, 0.01, 0.09, 0.045), "met"),
    (_diff(0.06, 0.02, 0.10, 0.06), _diff(0.05, 0.01, 0.09, 0.045), "not met"),   # R_acc's sample too small
    (_diff(0.03, -0.01, 0.07, 0.04), _diff(0.05, 0.01, 0.09, 0.045), "not met"),  # R_acc's interval holds 0
])
def test_the_held_out_target_needs_both_intervals_above_zero_at_the_target_mde(accuracy, instruction, state):
    from balancedbio.report.findings import heldout_target_verdict

    by_pair = {("grpo_full", "base", "heldout_accuracy"): {"diff": accuracy},
               ("grpo_full", "base", "heldout_instruction"): {"diff": instruction}}
    assert heldout_target_verdict(by_pair)["state"] == state


def test_html_report_escapes_text_from_the_config_and_from_result_files(run_dir, tmp_path):
    """A config string and strings read from result files reach the page as text, never as markup;
    the Markdown report keeps them verbatim (it is not HTML)."""
    attack = '</pre><script>alert("x")</script>'
    skipped = run_dir / "eval" / "base" / "cmexam.json"
    skipped.write_text(json.dumps({**json.loads(skipped.read_text()), "reason": f"missing {attack}"}))
    mmlu = run_dir / "eval" / "grpo_full" / "mmlu_med.json"
    result = json.loads(mmlu.read_text())
    result["per_subject"][f"anatomy{attack}"] = result["per_subject"].pop("anatomy")
    mmlu.write_text(json.dumps(result))
    out = tmp_path / "report"
    build_report(out_dir=str(out), **_inputs(run_dir), config={"run_name": f"run{attack}", "seed": 1,
                                                             "model": {"source": f"embedded:{attack}"}})
    html = (out / "report.html").read_text()
    assert "<script>alert" not in html and "</pre><script>" not in html
    assert html.count("&lt;script&gt;alert(") >= 4  # title, run line, model line, skipped reason, subject
    assert html.count("<script>") == 1  # only the template's own figure-count script
    markdown = (out / "report.md").read_text()
    assert f"run{attack}" in markdown and "&lt;" not in markdown and "&#34;" not in markdown


def test_wilson_interval_is_scipys_and_refuses_a_share_that_is_not_a_count():
    z = 1.959963984540054
    for successes, n in ((0, 5), (3, 7), (12, 12), (157, 400)):
        p = successes / n
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        assert wilson_interval(p, n) == pytest.approx([max(0.0, centre - half), min(1.0, centre + half)], abs=1e-12)
    assert all(math.isnan(v) for v in wilson_interval(math.nan, 0))
    with pytest.raises(ValueError, match="not a count"):
        wilson_interval(0.55, 7)


def test_significance_class_says_better_or_worse_in_the_direction_that_is_good():
    gain = {"value": 0.2, "ci_low": 0.1, "ci_high": 0.3, "significant": True}
    assert significance_class(gain) == "sig-better"
    assert significance_class(gain, better_sign=-1) == "sig-worse"  # a positive alignment tax is a loss
    assert significance_class({**gain, "ci_low": -0.1, "significant": False}) == "not-sig"
    assert significance_class({**gain, "ci_low": None, "ci_high": None}) == ""
    assert significance_class(None) == ""


def test_html_leads_with_a_three_line_verdict_and_the_differences_figure(run_dir, tmp_path):
    out = tmp_path / "report"
    _build(run_dir, out)
    html = (out / "report.html").read_text()
    verdict = re.search(r'<ul class="verdict">(.*?)</ul>', html, re.S).group(1)
    lines = re.findall(r'<li class="(\w+)">(.*?)</li>', verdict)
    assert len(lines) == 3
    assert lines[0][0] == "good" and lines[0][1].startswith("Target met: grpo_full gains significantly over base on "
                                                            "kg_mcq accuracy, held-out accuracy reward")
    assert "BIOMED +33.3 [+0.0, +66.7] n.s.; IFEval strict -25.0" in lines[1][1]
    assert lines[2][1].startswith("Dynamic vs static weights (grpo_full minus grpo_static_weights): significant on")
    # The verdict, then the differences figure, then the findings folded away, then the first table.
    first_image = html.index("<img")
    assert html.index('<ul class="verdict">') < first_image < html.index("<details>") < html.index("<table")
    assert html[first_image:first_image + 60].startswith('<img class="figure" alt="differences"')
    assert "All findings in full (15)" in html  # held-out R_reas: "not computable" (no PRM rows in the fixture)
    # Significance at a glance: kg_mcq +75 is better, the held-out instruction reward -0.100 of
    # grpo_full against sft is worse, an interval containing 0 is greyed.
    assert '<td class="sig-better">▲ +75.0 [+' in html
    assert '<td class="sig-worse">▼ -0.100 [-0.100, -0.100]</td>' in html
    assert re.search(r'<td class="not-sig">-25\.0 \[-75\.0, \+0\.0\] n\.s\.</td>', html)
    assert '<td class="not-sig">+25.0 [+0.0, +75.0] n.s.</td>' in html  # grpo_full's IFEval alignment tax
    markdown = (out / "report.md").read_text()
    assert "▲" not in markdown and "## Verdict" in markdown and "- Target met:" in markdown

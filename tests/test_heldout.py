"""Held-out rewards (real reward functions on fixed answers, the table writer) and the power helpers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from balancedbio.heldout import (discordant_rate, mean_interval, minimum_detectable_effect, required_sample_size,
                                 score_items, write_heldout_table)

OPTIONS = {"A": "FBN1", "B": "CFTR", "C": "HBB", "D": "DMD"}
QUESTIONS = [
    {"id": "kg:q1", "component": "accuracy", "prompt": "Which gene?", "answer": "B", "options": OPTIONS},
    {"id": "kg:q2", "component": "accuracy", "prompt": "Which gene?", "answer": "C", "options": OPTIONS},
    {"id": "kg:q3", "component": "accuracy", "prompt": "Which gene?", "answer": "A", "options": OPTIONS},
]
IDS = ["punctuation:no_comma", "change_case:english_lowercase"]
PROMPT = ("Describe cystic fibrosis for a general audience. In your entire response, refrain from the use of any "
          "commas. Your entire response should be in English, and in all lowercase letters.")
INSTRUCTIONS = [{"id": f"inst:{i}", "component": "instruction", "prompt": PROMPT, "instruction_id_list": IDS,
                 "kwargs": [{}, {}]} for i in range(3)]


def test_rewards_of_fixed_answers_and_the_table(tmp_path):
    answers = ["Step 1: CFTR is the gene.\nAnswer: B",      # right
               "Answer: A",                                  # wrong (C)
               "The answer is (A) FBN1.",                    # right, parsed from prose
               "cystic fibrosis thickens mucus in the lungs and gut.",   # both constraints met
               "cystic fibrosis, a genetic disease, thickens mucus.",    # lowercase only
               "Cystic fibrosis, a genetic disease."]                    # neither
    rows = score_items(QUESTIONS + INSTRUCTIONS, answers, "strict")
    rewards = {r["id"]: r["reward"] for r in rows}
    assert rewards == {"kg:q1": 1.0, "kg:q2": 0.0, "kg:q3": 1.0, "inst:0": 1.0, "inst:1": 0.5, "inst:2": 0.0}
    assert {r["id"]: r["component"] for r in rows}["inst:1"] == "instruction"

    out_json, out_items = tmp_path / "heldout_rewards.json", tmp_path / "heldout_rewards.items.jsonl"
    result = write_heldout_table("sft", rows, {"max_new_tokens": 64}, str(out_json), str(out_items))
    written = json.loads(out_json.read_text())
    assert written == result and written["status"] == "ok" and written["model"] == "sft"
    accuracy, instruction = written["components"]["accuracy"], written["components"]["instruction"]
    assert accuracy["n"] == 3 and accuracy["mean"] == pytest.approx(2 / 3)
    assert instruction["n"] == 3 and instruction["mean"] == pytest.approx(0.5)
    for component in (accuracy, instruction):
        assert 0.0 <= component["ci_low"] < component["mean"] < component["ci_high"] <= 1.0
    assert accuracy["interval"] == "wilson" and instruction["interval"] == "t"
    items = [json.loads(line) for line in out_items.read_text().splitlines()]
    assert [(i["id"], i["component"], i["reward"]) for i in items] == [(r["id"], r["component"], r["reward"])
                                                                       for r in rows]


def test_accuracy_rows_say_whether_the_parser_found_an_answer_and_what_a_guess_earns():
    answers = ["Step 1: CFTR is the gene.\nAnswer: B",           # answered, right
               "Step 1: the gene is on chromosome 11.",          # no letter, no option named: not answered
               "I think (C) HBB, but also maybe something else."]  # answered from prose, wrong
    rows = score_items(QUESTIONS, answers, "strict")
    assert [(r["id"], r["answered"], r["reward"]) for r in rows] == [("kg:q1", True, 1.0), ("kg:q2", False, 0.0),
                                                                     ("kg:q3", True, 0.0)]
    assert all(r["chance"] == 0.25 for r in rows)
    instruction = score_items(INSTRUCTIONS[:1], ["plain text"], "strict")
    assert "answered" not in instruction[0] and "chance" not in instruction[0]


class KeywordScorer:
    """A stand-in PRM: a step naming CFTR is valid, any other fallacious; it records what it was asked."""

    def __init__(self):
        self.contexts = []

    def predict_proba(self, pairs):
        self.contexts += [context for context, _ in pairs]
        return np.array([[0.9, 0.05, 0.05] if "CFTR" in step else [0.05, 0.05, 0.9] for _, step in pairs])


def test_reasoning_rows_are_the_training_reward_on_the_same_answers():
    from balancedbio.rewards import ReasoningReward

    questions = [{**q, "question": f"Which gene causes disease {i}?"} for i, q in enumerate(QUESTIONS)]
    answers = ["Step 1: CFTR is the gene of this disease.\nStep 2: CFTR mutations cause it.\nAnswer: B",
               "Step 1: FBN1 is the gene of this disease.\nAnswer: C",
               "Answer: A"]                                                  # no reasoning step: 0
    scorer = KeywordScorer()
    reward = ReasoningReward(scorer, gamma=0.001, length_target=200)
    rows = score_items(questions + INSTRUCTIONS, answers + ["x"] * 3, "strict", reward)
    reasoning = {r["id"]: r["reward"] for r in rows if r["component"] == "reasoning"}
    assert set(reasoning) == {"kg:q1", "kg:q2", "kg:q3"}                    # kg questions only, their ids
    expected = ReasoningReward(KeywordScorer(), gamma=0.001, length_target=200)(
        prompts=[[{"role": "user", "content": q["prompt"]}] for q in questions], completions=answers,
        capability=["medical"] * 3, question=[q["question"] for q in questions],
        options=[q["options"] for q in questions], answer=[q["answer"] for q in questions])
    assert [reasoning[q["id"]] for q in questions] == expected              # exactly what GRPO was rewarded
    assert reasoning["kg:q1"] > 0.5 > reasoning["kg:q2"] and reasoning["kg:q3"] == 0.0
    # The PRM saw the question itself (as in training), not the formatted prompt with its options.
    assert scorer.contexts and all("Which gene causes disease" in c and "A. FBN1" not in c for c in scorer.contexts)
    assert len([r for r in rows if r["component"] == "accuracy"]) == 3    # R_acc rows unchanged beside them


def test_reasoning_intervals_are_not_clipped_at_one():
    values = [1.15, 1.18, 1.2, 1.1]  # sigmoid + gamma * length: above 1 is a valid R_reas
    summary = mean_interval(values, binary=False, bounds=(0.0, math.inf))
    assert summary["ci_high"] > 1.15 and summary["ci_low"] < summary["mean"]


def test_a_row_the_reward_does_not_apply_to_is_an_error():
    broken = [{**QUESTIONS[0], "answer": None}]
    with pytest.raises(ValueError, match="kg:q1: the accuracy reward does not apply"):
        score_items(broken, ["Answer: B"])


def test_t_interval_matches_scipy_and_wilson_handles_all_correct():
    from scipy import stats

    values = [0.0, 0.5, 0.5, 1.0, 1.0, 0.25]
    summary = mean_interval(values, binary=False)
    low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert summary["ci_low"] == pytest.approx(max(0.0, low)) and summary["ci_high"] == pytest.approx(min(1.0, high))
    perfect = mean_interval([1.0] * 20, binary=True)
    assert perfect["mean"] == 1.0 and perfect["ci_high"] == 1.0 and 0.8 < perfect["ci_low"] < 1.0


def test_minimum_detectable_effect_is_the_normal_approximation_and_its_inverse():
    from scipy.stats import norm

    expected = (norm.ppf(0.975) + norm.ppf(0.8)) * math.sqrt(0.2 / 157)
    assert minimum_detectable_effect(157, 0.2) == pytest.approx(expected)
    assert minimum_detectable_effect(628, 0.2) == pytest.approx(expected / 2)  # 4x the items, half the MDE
    assert minimum_detectable_effect(157, 0.2, power=0.9) > expected
    n = required_sample_size(0.10, 0.2)
    assert minimum_detectable_effect(n, 0.2) <= 0.10 < minimum_detectable_effect(n - 1, 0.2)
    with pytest.raises(ValueError, match="p_discordant"):
        minimum_detectable_effect(10, 1.5)


def test_a_true_difference_of_the_mde_is_detected_with_the_stated_power():
    """Simulated paired items: McNemar's exact test at alpha 0.05 rejects in about 80% of the runs."""
    from scipy.stats import binomtest

    n, p_discordant = 300, 0.25
    effect = minimum_detectable_effect(n, p_discordant)
    # Discordant items favour model B with probability (1 + effect / p_d) / 2: accuracy gap = effect.
    favour_b = (1 + effect / p_discordant) / 2
    rng = np.random.default_rng(0)
    rejections = 0
    runs = 1000
    for _ in range(runs):
        discordant = rng.binomial(n, p_discordant)
        b_wins = rng.binomial(discordant, favour_b)
        rejections += discordant > 0 and binomtest(b_wins, discordant, 0.5).pvalue < 0.05
    assert 0.72 <= rejections / runs <= 0.86, rejections / runs


def test_discordant_rate_counts_items_where_exactly_one_model_is_right():
    first = {"a": True, "b": False, "c": True, "d": False}
    second = {"a": True, "b": True, "c": False, "e": True}
    assert discordant_rate(first, second) == (pytest.approx(2 / 3), 3)
    assert math.isnan(discordant_rate({"a": True}, {"b": True})[0])


@pytest.mark.slow
def test_the_rule_writes_held_out_rewards_on_prompts_grpo_never_saw(smoke_workdir, smoke_config):
    from balancedbio.heldout import heldout_instruction_prompts
    from balancedbio.io import read_jsonl

    results = smoke_workdir / "results"
    result = json.loads((results / "eval" / "base" / "heldout_rewards.json").read_text())
    items = list(read_jsonl(results / "eval" / "base" / "heldout_rewards.items.jsonl"))
    # R_reas too: the rule scores the kg answers with the run's trained PRM.
    assert result["status"] == "ok" and set(result["components"]) == {"accuracy", "reasoning", "instruction"}
    for component in ("accuracy", "reasoning", "instruction"):
        rewards = [i["reward"] for i in items if i["component"] == component]
        assert result["components"][component]["n"] == len(rewards) > 0
        assert result["components"][component]["mean"] == pytest.approx(sum(rewards) / len(rewards))
    test_ids = {f"kg:{r['id']}" for r in read_jsonl(results / "data" / "kg" / "mcq_test.jsonl")}
    assert {i["id"] for i in items if i["component"] == "accuracy"} == test_ids
    assert {i["id"] for i in items if i["component"] == "reasoning"} == test_ids
    # The same prompts again (deterministic), none of them among the GRPO training prompts.
    prompts = heldout_instruction_prompts(
        str(results / "data" / "kg" / "graph.json.gz"), str(results / "data" / "kg" / "mcq_test.jsonl"),
        str(results / "data" / "clean" / "prompts.jsonl"), instruct_config=smoke_config["instruct"],
        num_prompts=smoke_config["eval"]["heldout_rewards"]["instruction_prompts"], seed=smoke_config["seed"],
        benchmarks_dir=smoke_config["benchmarks_dir"])
    assert [p["id"] for p in prompts] == [i["id"] for i in items if i["component"] == "instruction"]
    trained = {r["prompt"] for r in read_jsonl(results / "data" / "clean" / "prompts.jsonl")}
    assert prompts and not {p["prompt"] for p in prompts} & trained

"""Reward functions on real strings, answer extraction, step splitting, and a fuzz of junk."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancedbio.answers import extract_choice
from balancedbio.prm import MAX_STEP_CHARS, LABEL2ID, reasoning_steps, split_steps
from balancedbio.rewards import AccuracyReward, InstructionReward, ReasoningReward

OPTIONS = {"A": "Liver", "B": "Pancreas", "C": "Spleen", "D": "Kidney"}


@pytest.mark.parametrize("text, letter", [
    ("Answer: B", "B"),
    ("Step 1: Insulin comes from beta cells.\nAnswer: B", "B"),
    ("The correct answer is (B).", "B"),
    ("the answer is b.", "B"),
    ('{"answer": "B", "reason": "beta cells"}', "B"),
    ("Final answer: **B**", "B"),
    ("Answer: Pancreas", "B"),
    ("I think it is (B).", "B"),
    ("B", "B"),
    ("Answer: A\nWait, that is wrong. The answer is B.", "B"),  # the last answer wins
    ("A. Liver is wrong. Answer: B", "B"),
])
def test_answer_extraction_reads_the_committed_letter(text, letter):
    assert extract_choice(text, OPTIONS).letter == letter


@pytest.mark.parametrize("text, status", [
    ("The answer is A or B.", "hedge"),
    ("Answer: B/D", "hedge"),
    ("", "no_answer"),
    ("I am not sure.", "no_answer"),
    ("The answer is a difficult one.", "no_answer"),
])
def test_hedges_and_non_answers_get_no_letter(text, status):
    result = extract_choice(text, OPTIONS)
    assert (result.letter, result.status) == (None, status)


def test_accuracy_reward_on_plain_and_chat_completions():
    reward = AccuracyReward()
    completions = ["Step 1: beta cells.\nAnswer: B", [{"role": "assistant", "content": "Answer: C"}],
                   "The answer is A or B.", "Answer: B"]
    result = reward.evaluate(prompts=["q"] * 4, completions=completions, answer=["B", "B", "B", None],
                             options=[OPTIONS] * 4)
    assert result.scores == [1.0, 0.0, 0.0, None]  # no answer column: not applicable
    assert result.success == [True, False, False, None]
    assert result.counts["parse_hedge"] == 1 and result.counts["not_applicable"] == 1


def test_instruction_reward_is_the_fraction_of_constraints_met():
    reward = InstructionReward()
    ids = ["change_case:english_lowercase", "detectable_format:number_bullet_lists", "startend:end_checker"]
    kwargs = [{}, {"num_bullets": 2}, {"end_phrase": "Any other questions?"}]
    good = "* insulin comes from the pancreas\n* beta cells make it\nany other questions?"
    two_of_three = "* Insulin comes from the pancreas\n* beta cells make it\nAny other questions?"
    bad = "Insulin comes from the pancreas."
    result = reward.evaluate(prompts=["p"] * 4, completions=[good, two_of_three, bad, "x"],
                             instruction_id_list=[ids, ids, ids, []], kwargs=[kwargs, kwargs, kwargs, []])
    values = result.scores
    assert values[0] == 1.0
    assert values[1] == pytest.approx(2 / 3)  # capital letters break only the lower-case rule
    assert values[2] == 0.0
    assert values[3] is None
    assert result.success == [True, False, False, None]


def test_instruction_reward_counts_sentences_offline():
    reward = InstructionReward()
    ids, kwargs = ["length_constraints:number_sentences"], [{"num_sentences": 3, "relation": "less than"}]
    values = reward(prompts=["p", "p"], completions=["Dr. Lee saw him. He was fine.", "One. Two. Three. Four."],
                    instruction_id_list=[ids, ids], kwargs=[kwargs, kwargs])
    assert values == [1.0, 0.0]


def test_loose_mode_forgives_a_leading_line():
    ids, kwargs = ["startend:quotation"], [{}]
    text = 'Sure, here it is:\n"Insulin is made in the pancreas."'
    strict = InstructionReward()(prompts=["p"], completions=[text], instruction_id_list=[ids], kwargs=[kwargs])
    loose = InstructionReward(loose=True)(prompts=["p"], completions=[text], instruction_id_list=[ids], kwargs=[kwargs])
    assert strict == [0.0] and loose == [1.0]


class FakeScorer:
    """A stand-in PRM: every step gets margin +2, a step saying 'wrong' -3 (tests the arithmetic)."""

    MARGIN = {"valid": 2.0, "wrong": -3.0}

    def predict_proba(self, pairs):
        rows = []
        for _, step in pairs:
            margin = self.MARGIN["wrong" if "wrong" in step else "valid"]
            valid = 1 / (1 + math.exp(-margin))
            rows.append([valid, 0.0, 1 - valid])  # log p(valid) - log p(fallacious) = margin
        return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_reasoning_reward_is_sigmoid_plus_capped_length_term():
    reward = ReasoningReward(FakeScorer(), gamma=0.01, length_target=5)
    question = ["Which organ makes insulin?"] * 5
    good = "Step 1: insulin is fine.\nStep 2: the organ is fine again.\nAnswer: B"
    mixed = "Step 1: insulin is fine.\nStep 2: the organ is wrong.\nAnswer: B"
    filler = "Step 1: lorem ipsum dolor.\nStep 2: sit amet.\nAnswer: B"
    result = reward.evaluate(prompts=["q"] * 5, completions=[good, mixed, "", good, filler],
                             capability=["medical", "medical", "medical", "instruction", "medical"], question=question)
    values = result.scores
    # Two reasoning steps and the conclusion from the answer line, weighted half and half;
    # 9 distinct words, capped at 5.
    assert values[0] == pytest.approx(_sigmoid(0.5 * 2 + 0.5 * 2) + 0.01 * 5, abs=1e-5)
    assert values[1] == pytest.approx(_sigmoid(0.5 * (2 - 3) / 2 + 0.5 * 2) + 0.01 * 5, abs=1e-5)
    assert values[2] == 0.0
    assert values[3] is None  # instruction prompts get no reasoning reward
    assert values[4] == 0.0, "no step names anything the question is about: no reward, not even for length"
    assert result.success == [True, True, False, None, False]
    assert result.counts["no_steps"] == 2
    min_mixed = ReasoningReward(FakeScorer(), gamma=0.01, length_target=5, aggregate="min")(
        prompts=["q"], completions=[mixed], question=question[:1])[0]
    assert min_mixed == pytest.approx(_sigmoid(0.5 * -3 + 0.5 * 2) + 0.01 * 5, abs=1e-5)


def test_the_answer_key_sets_the_conclusions_sign():
    """With an answer key, the right letter's conclusion counts at least 0 and any other at most
    -1, whatever the PRM says of it (here it calls every conclusion valid, +2)."""
    reward = ReasoningReward(FakeScorer(), gamma=0.0)
    text = "Step 1: Beta cells of the pancreas make insulin.\nAnswer: {}"
    values = reward(prompts=["q"] * 4, completions=[text.format(x) for x in "BAB"] + [text.format("A or B")],
                    question=[QUESTION] * 4, answer=["B", "B", None, "B"])
    # One step, so a neutral second one (MIN_SCORED_STEPS): the steps' mean is (2 + 0) / 2.
    assert values[0] == pytest.approx(_sigmoid(0.5 * 1 + 0.5 * 2), abs=1e-5)
    assert values[1] == pytest.approx(_sigmoid(0.5 * 1 + 0.5 * -1), abs=1e-5)
    assert values[2] == values[0], "no key: the PRM's own verdict on the conclusion"
    assert values[3] == values[1], "a hedge is not the right letter"


@pytest.mark.parametrize("text, steps", [
    ("Step 1: A.\nStep 2: B.\nAnswer: C", ["A.", "B."]),
    ("Step 1: A. Step 2: B.", ["A.", "B."]),
    ("1. first\n2) second\n- third", ["first", "second", "third"]),
    ("First this. Then that. So C.", ["First this.", "Then that.", "So C."]),
    ("", []),
])
def test_split_steps(text, steps):
    assert split_steps(text) == steps


def test_steps_are_capped_on_long_inputs():
    many = "\n".join(f"Step {i}: insulin fact {i}." for i in range(1, 5001))
    assert split_steps(many) == [f"insulin fact {i}." for i in range(1, 33)]
    assert len(split_steps(many, max_steps=4)) == 4
    # Runs of blanks between inline markers are split correctly, not just quickly.
    assert split_steps("Step 1: a." + " " * 20_000 + "Step 2: b.") == ["a.", "b."]
    giant = split_steps("x" * 1_000_000)
    assert len(giant) == 1 and len(giant[0]) == MAX_STEP_CHARS
    assert split_steps(" " * 1_000_000) == split_steps("\n" * 1_000_000) == []
    assert extract_choice("\n" * 100_000 + "Answer: C", OPTIONS).letter == "C"
    assert extract_choice("Answer: B\n" + "Answer: " * 10_000, OPTIONS).letter is None


QUESTION = "Which organ makes insulin?\n\nA. Liver\nB. Pancreas\nC. Spleen\nD. Kidney\n\nThink step by step."
LOREM = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor incididunt ut labore. "


def test_answer_line_becomes_the_conclusion_step():
    text = "Step 1: Beta cells of the pancreas make insulin.\nStep 2: The liver stores glycogen.\nAnswer: B"
    assert reasoning_steps(QUESTION, text) == ["Beta cells of the pancreas make insulin.",
                                               "The liver stores glycogen.",
                                               "Therefore, the answer is B: Pancreas."]
    # Options given as a column win over the prompt's; an unreadable answer line is kept as it is.
    assert reasoning_steps("Which organ makes insulin?", text.replace("B", "C"), {"C": "Spleen"})[-1] == \
        "Therefore, the answer is C: Spleen."
    assert reasoning_steps(QUESTION, "Insulin comes from it.\nAnswer: not sure")[-1] == "Answer: not sure"
    assert reasoning_steps(QUESTION, "Answer: B") == [], "an answer alone is not reasoning"


@pytest.mark.parametrize("junk", [LOREM * 10_000, "A" * 100_000 + "!", " " * 1_000_000, "\n" * 1_000_000,
                                  "[" * 500_000 + "]" * 500_000, LOREM * 100 + "\nAnswer: B",
                                  "Step 1: " + "the of and " * 1000 + "\nAnswer: B"])
def test_junk_has_no_reasoning_step(junk):
    assert reasoning_steps(QUESTION, junk) == []
    reward = ReasoningReward(FakeScorer())
    assert reward(prompts=["q"], completions=[junk], question=[QUESTION]) == [0.0]


def test_instruction_checkers_see_a_capped_response():
    from balancedbio.ifeval import MAX_CHECKED_CHARS

    ids, kwargs = ["length_constraints:number_sentences"], [{"num_sentences": 5, "relation": "at least"}]
    huge = "One sentence here. " * 100_000
    assert InstructionReward()(prompts=["p"], completions=[huge], instruction_id_list=[ids], kwargs=[kwargs]) == [1.0]
    # A comma after the cap is not seen: the checker reads the first MAX_CHECKED_CHARS only.
    no_comma = ["punctuation:no_comma"]
    late_comma = "a" * MAX_CHECKED_CHARS + ", b"
    assert InstructionReward()(prompts=["p", "p"], completions=[late_comma, "a, b"],
                               instruction_id_list=[no_comma, no_comma], kwargs=[[{}], [{}]]) == [1.0, 0.0]


def test_label_ids_are_stable():
    assert LABEL2ID == {"valid": 0, "neutral": 1, "fallacious": 2}


junk = st.one_of(
    st.text(max_size=400),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.text(alphabet="{}[]\":,ABCDE \n*()", max_size=200),
    st.just("{" * 5000),
    st.just("Answer: " * 2000),
)


@settings(max_examples=150, deadline=None)
@given(text=junk)
def test_rewards_never_raise_on_junk(text):
    acc = AccuracyReward()(prompts=["q"], completions=[text], answer=["B"], options=[OPTIONS])
    assert acc[0] in (0.0, 1.0)
    inst = InstructionReward()(prompts=["q"], completions=[text],
                               instruction_id_list=[["detectable_format:json_format", "keywords:forbidden_words"]],
                               kwargs=[[{}, {"forbidden_words": ["cure"]}]])
    assert 0.0 <= inst[0] <= 1.0
    reas = ReasoningReward(FakeScorer())(prompts=["q"], completions=[text], question=[QUESTION])
    assert reas[0] is not None and 0.0 <= reas[0] <= 1.0 + 0.001 * 200
    assert isinstance(split_steps(text), list)


def test_placeholder_count_is_ifevals_own_on_any_text_and_linear_on_unclosed_brackets():
    """The linear placeholder checker agrees with lm-eval's regex checker on random text of
    brackets, letters and line breaks, and counts a real response's placeholders."""
    import random

    from lm_eval.tasks.ifeval import instructions

    from balancedbio.ifeval import follows, instruction_registry

    linear = instruction_registry()["detectable_content:number_placeholders"]
    assert linear is not instructions.PlaceholderChecker
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice("[]a\n ") for _ in range(rng.randint(0, 30)))
        wanted = rng.randint(0, 4)
        ours, theirs = linear("p"), instructions.PlaceholderChecker("p")
        ours.build_description(num_placeholders=wanted)
        theirs.build_description(num_placeholders=wanted)
        assert ours.check_following(text) == theirs.check_following(text), (text, wanted)
    kwargs = [{"num_placeholders": 2}]
    assert follows("p", ["detectable_content:number_placeholders"], kwargs, "Dear [name], at [address].") == [True]
    assert follows("p", ["detectable_content:number_placeholders"], kwargs, '{"a": [' * 50_000) == [False]

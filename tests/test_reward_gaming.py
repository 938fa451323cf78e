"""Reward gaming (issue 24): repetition, hedges, padding and degenerate outputs against the real
reward functions; the farming example of the issue against the trained default PRM (slow)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from balancedbio.answers import extract_choice
from balancedbio.data.formatting import format_reasoning
from balancedbio.rewards import MAX_SCORED_STEPS, AccuracyReward, ReasoningReward, scored_steps

from conftest import SHARED_BENCHMARKS

QUESTION = ("Which organ makes insulin?\n\nA. Liver\nB. Pancreas\nC. Spleen\nD. Kidney\n\n"
            "Think step by step, then give the final answer on the last line as 'Answer: <letter>'.")
OPTIONS = {"A": "Liver", "B": "Pancreas", "C": "Spleen", "D": "Kidney"}
FACTS = ["Insulin is secreted by the beta cells of the islets of Langerhans.",
         "The islets of Langerhans lie in the pancreas.",
         "The liver stores glycogen but does not secrete insulin."]


class KeywordPRM:
    """A stand-in PRM that a farmer would love: every step and every conclusion is valid (+4),
    except steps containing 'liver' (+1). The reward's arithmetic must hold against it."""

    def predict_proba(self, pairs):
        rows = []
        for _, step in pairs:
            valid = 1 / (1 + math.exp(-(1.0 if "liver" in step.lower() else 4.0)))
            rows.append([valid, 0.0, 1 - valid])
        return np.array(rows, dtype=np.float64).reshape(-1, 3)


def _reasoning(texts, *, answer="B", aggregate="mean", scorer=None, gamma=0.001):
    reward = ReasoningReward(scorer or KeywordPRM(), gamma=gamma, length_target=200, aggregate=aggregate)
    n = len(texts)
    return reward(prompts=[QUESTION] * n, completions=texts, question=[QUESTION] * n, options=[OPTIONS] * n,
                  answer=[answer] * n, capability=["medical"] * n)


@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_repeating_a_step_scores_what_writing_it_once_scores(aggregate):
    once = format_reasoning(FACTS[:1], "B")
    repeated = format_reasoning(FACTS[:1] * 30, "B")
    # Near duplicates too: numbered, re-cased, re-punctuated, a word changed.
    variants = format_reasoning(FACTS[:1] + [f"{FACTS[0]} ({i})" for i in range(30)]
                                + [FACTS[0].upper(), FACTS[0].replace("secreted", "made") + "!"], "B")
    values = _reasoning([once, repeated, variants], aggregate=aggregate)
    assert values[0] == values[1] == values[2]
    assert scored_steps(QUESTION, repeated, OPTIONS)[0] == FACTS[:1]


def test_a_negation_is_not_a_near_duplicate():
    text = format_reasoning(["The liver secretes insulin.", "The liver does not secrete insulin."], "B")
    assert len(scored_steps(QUESTION, text, OPTIONS)[0]) == 2


@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_a_wrong_final_letter_always_lowers_the_reasoning_reward(aggregate):
    """Whatever precedes it (one step, thirty copies, the whole chain) and even from a PRM that
    calls every conclusion valid: with the answer key known, a wrong letter scores lower."""
    bodies = [FACTS, FACTS[:1], FACTS[:1] * 30, FACTS[1:] * 10, [f"{FACTS[1]} ({i})" for i in range(40)]]
    for body in bodies:
        right, *wrong = _reasoning([format_reasoning(body, x) for x in "BACD"], aggregate=aggregate)
        assert all(w < right for w in wrong), (body[:2], right, wrong)
    # The farmed chain with a wrong letter loses to the sound chain with the right one.
    sound, farmed_wrong = _reasoning([format_reasoning(FACTS, "B"), format_reasoning(FACTS[1:2] * 30, "A")],
                                     aggregate=aggregate)
    assert farmed_wrong < sound


@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_a_chain_that_never_answers_earns_nothing(aggregate):
    """With the answer key known, steps without an answer line score 0, below the same steps with a
    wrong letter: under a completion budget, writing more steps must not pay more than concluding
    (the 2026-12-05 evidence run's policies learnt exactly that when it did)."""
    chain = "\n".join(f"Step {k}: {fact}" for k, fact in enumerate(FACTS, 1))
    unanswered, wrong, right = _reasoning([chain, format_reasoning(FACTS, "A"), format_reasoning(FACTS, "B")],
                                          aggregate=aggregate)
    assert unanswered == 0.0 < wrong < right
    reward = ReasoningReward(KeywordPRM(), gamma=0.001, length_target=200, aggregate=aggregate)
    result = reward.evaluate([QUESTION] * 2, [chain, chain], question=[QUESTION] * 2, options=[OPTIONS] * 2,
                             answer=["B", None], capability=["medical"] * 2)
    assert result.counts["no_answer_line"] == 1 and result.success[0] is False
    assert result.scores[1] > 0.5, "no key (an open question): the steps are scored as before"


@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_one_good_fact_alone_does_not_outscore_a_sound_chain(aggregate):
    """The farmer's next move after repetition: the single best-scored fact, written once. The
    missing steps count as neutral, so it scores below the two-fact chain it was taken from."""
    chain = [FACTS[0], FACTS[1]]
    sound, alone, alone_repeated = _reasoning([format_reasoning(chain, "B"), format_reasoning(FACTS[:1], "B"),
                                               format_reasoning(FACTS[:1] * 30, "B")], aggregate=aggregate)
    assert alone == alone_repeated < sound


def test_padding_adds_nothing():
    """The length term counts the distinct words of the scored steps: filler lines, repeated
    words, an extra copy of the chain, or a step padded with its own words earn nothing."""
    base = format_reasoning(FACTS, "B")
    lorem = "Lorem ipsum dolor sit amet, consectetur adipiscing elit. " * 20
    padded = [
        lorem + "\n" + base,
        base.replace(FACTS[1], FACTS[1] + " insulin" * 150),
        format_reasoning(FACTS * 10, "B"),
        base.replace(FACTS[0], (FACTS[0][:-1] + " ") * 12),
    ]
    values = _reasoning([base, *padded])
    assert all(v <= values[0] + 1e-12 for v in values[1:]), values
    # The length term is real: the same chain with gamma 0.01 gains 0.01 per distinct word.
    words = {w for step in FACTS for w in step.lower().replace(",", " ").replace(".", " ").split()}
    assert _reasoning([base], gamma=0.01)[0] - _reasoning([base], gamma=0.0)[0] == pytest.approx(0.01 * len(words))


def test_step_count_is_capped_near_the_trained_chain_lengths():
    """Distinct steps beyond MAX_SCORED_STEPS are not scored: forty 'valid' steps cannot dilute
    a weak one into nothing, nor do they add to the score."""
    distinct = [f"Insulin fact number {word} concerns the pancreas." for word in
                "alpha beta gamma delta epsilon zeta theta iota kappa lambda sigma omega".split()]
    assert len(distinct) > MAX_SCORED_STEPS
    text = format_reasoning(["The liver is involved.", *distinct], "B")
    steps = scored_steps(QUESTION, text, OPTIONS)[0]
    assert len(steps) == MAX_SCORED_STEPS and steps[0] == "The liver is involved."
    capped = _reasoning([text])[0]
    first_eight = _reasoning([format_reasoning(["The liver is involved.", *distinct[:MAX_SCORED_STEPS - 1]], "B")])[0]
    assert capped == first_eight


@pytest.mark.parametrize("text", [
    "", "Answer: B", "Answer: B\n" * 30, "B", "Step 1: .\nStep 2: ...\nAnswer: B",
    "Step 1: " + "the of and " * 500 + "\nAnswer: B", "\u200b" * 1000 + "\nAnswer: B",
    "Lorem ipsum dolor sit amet.\n" * 50 + "Answer: B",
])
def test_degenerate_outputs_earn_no_reasoning_reward(text):
    assert _reasoning([text]) == [0.0]


def test_a_nan_reward_is_an_error_not_does_not_apply():
    class NaNPRM:
        def predict_proba(self, pairs):
            return np.full((len(pairs), 3), np.nan)

    with pytest.raises(FloatingPointError, match="non-finite"):
        _reasoning([format_reasoning(FACTS, "B")], scorer=NaNPRM())
    with pytest.raises(ValueError, match="rewards.gamma"):
        ReasoningReward(KeywordPRM(), gamma=float("nan"))

    class Broken(AccuracyReward):
        def score(self, prompts, texts, columns, counts):
            return [float("nan")] * len(texts), [None] * len(texts)

    # TRL would read the NaN as "does not apply" and silently drop the component.
    with pytest.raises(FloatingPointError, match=r"accuracy reward is nan for sample 0 of 1"):
        Broken()(prompts=["q"], completions=["Answer: B"], answer=["B"])


class HedgeCase:
    LONG = {"A": "Disclose the error to the patient and put it in the operative report after discussing it with "
                 "the attending physician and the hospital's risk management office",
            "B": "Report the physician to the ethics committee", "C": "Refuse to dictate the operative report",
            "D": "Tell the attending that he cannot fail to disclose this mistake"}


@pytest.mark.parametrize("text", [
    f"Answer: {HedgeCase.LONG['A']} or {HedgeCase.LONG['B']}",
    f"Answer: {HedgeCase.LONG['A']}, or {HedgeCase.LONG['D'].lower()}",
    f"The answer is (A) {HedgeCase.LONG['A']} or (C) {HedgeCase.LONG['C']}.",
    "Answer: A or C", "Answer: a or c", "**Answer:** A/C", "Answer: A, C", f"Answer: A or {HedgeCase.LONG['B']}",
    f"Answer: A\nActually: the answer is {HedgeCase.LONG['C']} or {HedgeCase.LONG['A']}",
])
def test_hedges_earn_no_accuracy(text):
    reward = AccuracyReward()
    result = reward.evaluate(prompts=["q"], completions=[text], answer=["A"], options=[HedgeCase.LONG])
    assert result.scores == [0.0]
    assert result.counts.get("parse_hedge") == 1


def test_option_text_hedges_on_medqa_earn_nothing():
    """Each MedQA question: 'Answer: <right option text> or <wrong option text>' for every wrong
    option. The issue measured 7 of 48 questions credited (the second text past 120 characters)."""
    path = SHARED_BENCHMARKS / "medqa" / "test.jsonl"
    if not path.exists():
        pytest.skip(f"{path}: the MedQA benchmark is not here (set BALANCEDBIO_BENCHMARKS_DIR)")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:200]]
    reward = AccuracyReward()
    credited, asked = [], 0
    for row in rows:
        right = row["options"][row["answer"]]
        for letter, wrong in row["options"].items():
            if letter == row["answer"]:
                continue
            for text in (f"Answer: {right} or {wrong}", f"Answer: {wrong} or {right}"):
                asked += 1
                if reward(prompts=["q"], completions=[text], answer=[row["answer"]], options=[row["options"]])[0]:
                    credited.append((row["id"], text[:80]))
    assert asked > 1000 and credited == [], credited[:5]


@pytest.mark.parametrize("line", [
    "**Answer: B**", "**Answer:** B", "**Answer:** b", "__Answer__: (b)", "### Answer: C", "## answer: c",
    "*Answer*: d", "**Final Answer:** *b*", "Answer: **b**", "ANSWER: b", "answer: (D)", "**Answer:** `C`",
    "> **Answer:** B", "Answer: __B__", "**The correct answer is (c).**", "FINAL ANSWER - b",
])
def test_markdown_answer_lines_are_read_in_any_case(line):
    letter = next(ch for ch in reversed(line) if ch.upper() in "ABCD" and ch.isalpha())
    text = f"Step 1: {FACTS[0]}\n{line}"
    assert extract_choice(text, OPTIONS).letter == letter.upper()
    assert AccuracyReward()(prompts=["q"], completions=[text], answer=[letter.upper()], options=[OPTIONS]) == [1.0]


def test_articles_and_abbreviations_are_not_letters():
    assert extract_choice("Answer: a pancreas, which makes insulin", OPTIONS).letter == "B"
    assert extract_choice("Answer: e.g. the pancreas", OPTIONS).letter == "B"
    assert extract_choice("Answer: the pancreas, not the liver.", OPTIONS).letter is None


# --- the trained default PRM ------------------------------------------------------------------

def _held_out_sound_chains(workdir, n):
    from balancedbio.io import read_jsonl

    chains = [c for c in read_jsonl(workdir / "results" / "data" / "clean" / "steps.jsonl")
              if c["split"] == "test" and c["chain"] == "sound"]
    return chains[:n]


@pytest.mark.slow
@pytest.mark.parametrize("aggregate", ["mean", "min"])
def test_farming_the_trained_prm_does_not_pay(default_prm_workdir, aggregate):
    """The issue's example on held-out questions: each valid fact of the sound chain repeated 30
    times (the farmer's best), with the right and with a wrong letter, against the sound chain.
    Before: the farmed chain won on 37 of 37 questions, with either letter (measured again on
    2026-12-04: 40 of 40, mean R_reas 1.033 against 0.659). Now repetition scores what the fact
    scores once, which is below the sound chain with either letter (0 of 40 here; mean 0.625 right
    letter, 0.320 wrong, 0.707 sound; the PRM trained on the CI machine let the right-letter farm
    win 1 of 40)."""
    from balancedbio.prm import PRMScorer

    reward = ReasoningReward(PRMScorer(default_prm_workdir / "results" / "models" / "prm"), gamma=0.001,
                             length_target=200, aggregate=aggregate)
    chains = _held_out_sound_chains(default_prm_workdir, 40)
    assert len(chains) >= 30
    rows = []
    for chain in chains:
        facts = [s["text"] for s in chain["steps"] if s["label"] == "valid" and s["fact"]["relation"] != "conclusion"]
        wrong = next(x for x in chain["options"] if x != chain["answer"])
        texts = ([format_reasoning(facts, chain["answer"])]
                 + [format_reasoning([f] * 30, chain["answer"]) for f in facts]
                 + [format_reasoning([f], chain["answer"]) for f in facts]
                 + [format_reasoning([f] * 30, wrong) for f in facts])
        n = len(texts)
        values = reward(prompts=[chain["question"]] * n, completions=texts, capability=["medical"] * n,
                        question=[chain["question"]] * n, options=[chain["options"]] * n,
                        answer=[chain["answer"]] * n)
        k = len(facts)
        assert values[1:1 + k] == values[1 + k:1 + 2 * k], "thirty copies score what one copy scores"
        rows.append((values[0], max(values[1:1 + k]), max(values[1 + 2 * k:])))
    sound, farmed_right, farmed_wrong = np.array(rows).T
    # With a wrong letter the conclusion's margin is at most -1: farming never pays.
    assert (farmed_wrong < sound).all(), (int((farmed_wrong >= sound).sum()), len(rows))
    # With the right letter the farmer's best fact is still a trained model's guess per question: the
    # PRM trained on another CPU (bf16 autocast) let it win 1 question of 40 by 0.03 (CI, 2026-12-04),
    # so the claim is the one that matters for RL: it rarely wins and loses on average, clearly.
    gap = sound - farmed_right
    wins = int((gap <= 0).sum())
    low = stats.t.interval(0.95, len(gap) - 1, loc=gap.mean(), scale=stats.sem(gap))[0]
    assert wins <= len(gap) // 10 and low > 0, (wins, len(gap), float(gap.mean()), float(low))


@pytest.mark.parametrize("line", ["**Answer: B**", "**Answer:** B", "__Answer__: (b)", "### Answer: B", "## answer: b",
                                  "*Answer*: b", "**Final Answer:** *b*", "> **Answer:** B", "ANSWER: b"])
def test_markdown_answer_lines_are_the_conclusion_the_prm_scores(line):
    """R_reas splits off the answer line as the conclusion (scored with the key's sign); a markdown answer line
    read as one more reasoning step would leave no conclusion, the right letter scored as a wrong one."""
    text = f"Step 1: {FACTS[0]}\nStep 2: {FACTS[1]}\n{line}"
    steps, conclusion, letter = scored_steps("Which organ makes insulin?", text, OPTIONS)
    assert len(steps) == 2, steps  # the two facts; the answer line is not a third step
    assert conclusion is not None and letter == "B", (conclusion, letter)

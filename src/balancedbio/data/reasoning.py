"""Reasoning chains with step labels (for the PRM) and SFT conversations, from graph facts.

For every question two chains are written:
- a *sound* chain: a restatement of what is asked (neutral), the facts that support the key
  (valid), a true fact that does not decide between the options (neutral), facts that rule
  out distractors (valid) and the correct conclusion (valid);
- a *flawed* chain in one of three shapes: a corrupted fact (a claim the graph contradicts),
  a wrong inference (a true premise followed by a false claim), or a conclusion that does
  not follow from the steps before it.

Each step is labelled on its own merits and carries the fact it states, so a test can
check every label against the graph: valid/neutral facts hold, fallacious facts do not
(or the conclusion names a wrong letter).
"""

from __future__ import annotations

import random

from balancedbio.data.formatting import format_mcq_prompt, format_reasoning
from balancedbio.data.kg import KnowledgeGraph
from balancedbio.data.mcq import QUESTION_KINDS, candidate_from_row, lower_first

VALID, NEUTRAL, FALLACIOUS = "valid", "neutral", "fallacious"
LABELS = (VALID, NEUTRAL, FALLACIOUS)


def render_fact(kg: KnowledgeGraph, fact: dict) -> str:
    """One sentence stating a fact record (or its negation)."""
    relation, negated = fact["relation"], fact.get("negated", False)
    s, o = fact["subject"], fact["object"]
    if relation == "caused_by_gene":
        return (f"{o} is not a known cause of {kg.name(s)}." if negated
                else f"{kg.name(s)} is caused by pathogenic variants in {o}.")
    if relation == "has_phenotype":
        return (f"{kg.name(o)} is not a recognised feature of {kg.name(s)}." if negated
                else f"{kg.name(o)} is a recognised feature of {kg.name(s)}.")
    if relation == "has_inheritance":
        mode = lower_first(kg.name(o))
        return (f"{kg.name(s)} does not show {mode}." if negated
                else f"{kg.name(s)} shows {mode}.")
    if relation == "icd_chapter":
        return (f"'{kg.name(s)}' is not in the ICD-10-CM chapter {kg.name(o)}." if negated
                else f"In ICD-10-CM, '{kg.name(s)}' ({s}) belongs to the chapter {kg.name(o)}.")
    if relation == "icd_block":
        return (f"'{kg.name(s)}' is not in the ICD-10-CM block {kg.name(o)}." if negated
                else f"In ICD-10-CM, '{kg.name(s)}' ({s}) belongs to the block {kg.name(o)}.")
    if relation == "icd_code":
        return f"'{o}' is the ICD-10-CM category {s}."
    raise ValueError(f"unknown relation {relation!r}")


def _step(text: str, label: str, fact: dict | None) -> dict:
    return {"text": text, "label": label, "fact": fact}


def conclusion_text(letter: str, option_text: str | None) -> str:
    """The conclusion step as the chains word it (the PRM reads a completion's answer line so too)."""
    return f"Therefore, the answer is {letter}: {option_text}." if option_text else f"Therefore, the answer is {letter}."


def _conclusion(letter: str, option_text: str) -> dict:
    return _step(conclusion_text(letter, option_text), None, {"relation": "conclusion", "object": letter})


FLAW_SHAPES = ("corrupted_fact", "wrong_inference", "non_sequitur")


def build_chains(kg: KnowledgeGraph, row: dict, rng: random.Random, flawed_per_question: int = 2) -> list[dict]:
    """The sound chain and ``flawed_per_question`` flawed chains (distinct shapes) for one question."""
    kind = QUESTION_KINDS[row["kind"]]
    cand = candidate_from_row(row)
    letter_of = {node: letter for letter, node in row["option_ids"].items()}
    distractors = list(cand.distractors)
    rng.shuffle(distractors)
    restate = _step(f"The question asks for {kind.asks_for()}.", NEUTRAL, None)
    support = [_step(render_fact(kg, f), VALID, f) for f in kind.support(kg, cand)]
    irrelevant_fact = kind.irrelevant(kg, cand, rng)
    irrelevant = [_step(render_fact(kg, irrelevant_fact), NEUTRAL, irrelevant_fact)] if irrelevant_fact else []
    eliminations = [_step(render_fact(kg, f), VALID, f)
                    for f in (kind.eliminate(kg, cand, d) for d in distractors[:2])]
    # One elimination in the sound chain keeps the three labels near balance overall.
    right = _conclusion(row["answer"], row["answer_text"])
    right["label"] = VALID

    sound = [restate, *support, *irrelevant, *eliminations[:1], right]
    chains_made = [("sound", sound, None)]

    shapes = rng.sample(FLAW_SHAPES, min(flawed_per_question, len(FLAW_SHAPES)))
    for number, shape in enumerate(shapes):
        wrong_node = distractors[number % len(distractors)]
        wrong = _conclusion(letter_of[wrong_node], row["options"][letter_of[wrong_node]])
        wrong["label"] = FALLACIOUS
        false_fact = kind.corrupt(kg, cand, wrong_node)
        if shape == "corrupted_fact":
            flawed = [restate, _step(render_fact(kg, false_fact), FALLACIOUS, false_fact), *irrelevant, wrong]
        elif shape == "wrong_inference":
            # A true premise that does not imply the (false) claim drawn from it.
            premise = (irrelevant or support)[0]["text"].rstrip(".")
            claim = lower_first(render_fact(kg, false_fact))
            flawed = [restate, _step(f"{premise}, so it follows that {claim}", FALLACIOUS, false_fact), wrong]
        else:  # every step is true, but the conclusion ignores them
            flawed = [restate, *support, *eliminations[:1], wrong]
        chains_made.append((f"flawed{number + 1}", flawed, shape))

    prompt = format_mcq_prompt(row["question"], row["options"])
    chains = []
    for name, steps, flaw in chains_made:
        chains.append({
            "id": f"{row['id']}-{name}",
            "question_id": row["id"],
            "split": row["split"],
            "use": row.get("use"),
            "kind": row["kind"],
            "chain": "sound" if flaw is None else "flawed",
            "flaw": flaw,
            "question": prompt,
            "options": row["options"],
            "answer": row["answer"],
            "steps": steps,
        })
    return chains


def build_step_rows(kg: KnowledgeGraph, questions: list[dict], seed: int, flawed_per_question: int = 2) -> list[dict]:
    rng = random.Random(f"{seed}:steps")
    return [chain for row in questions for chain in build_chains(kg, row, rng, flawed_per_question)]


def sft_conversation(chain: dict) -> dict:
    """A chat conversation from a sound chain: the question, valid reasoning, the answer line."""
    if chain["chain"] != "sound":
        raise ValueError(f"{chain['id']}: only sound chains make SFT targets")
    steps = [s["text"] for s in chain["steps"] if s["label"] == VALID and s["fact"]["relation"] != "conclusion"]
    return {
        "id": f"sft-{chain['question_id']}",
        "question_id": chain["question_id"],
        "use": chain.get("use"),
        "source": "kg_mcq",
        "capability": "medical",
        "messages": [
            {"role": "user", "content": chain["question"]},
            {"role": "assistant", "content": format_reasoning(steps, chain["answer"])},
        ],
    }


def label_counts(step_rows: list[dict]) -> dict[str, int]:
    counts = {label: 0 for label in LABELS}
    for chain in step_rows:
        for step in chain["steps"]:
            counts[step["label"]] += 1
    return counts

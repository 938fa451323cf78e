"""Verifiable instruction-following prompts (IFEval schema) and compliant SFT conversations.

Prompts are a task about a topic (general or medical) plus 1-3 constraints from lm-eval's
IFEval instruction registry, worded by the registry itself (``build_description``) and
stored as ``instruction_id_list`` + ``kwargs``: the verifier that scores IFEval scores them.
Conflicting constraints are never combined (the registry's conflict table).

For SFT, responses are composed from knowledge-graph facts about a disease and shaped to
the constraints (bullets, sections, JSON, case, ...); each one is verified by the official
checker and kept only if it satisfies every constraint.
"""

from __future__ import annotations

import json
import random
import re
import string

from balancedbio.data.kg import INHERITANCE_MODES, KnowledgeGraph
from balancedbio.data.mcq import MIN_TERM_DEPTH, lower_first
from balancedbio.ifeval import describe, follows, instruction_conflicts

GENERAL_TOPICS = (
    "planning a weekend hiking trip", "learning a second language as an adult", "keeping houseplants alive",
    "the history of the bicycle", "starting a vegetable garden", "saving money on groceries",
    "preparing for a job interview", "the water cycle", "how volcanoes form", "writing a good cover letter",
    "organising a small home office", "the basics of composting", "choosing a first programming language",
    "how bees make honey", "reducing screen time for teenagers", "the rules of chess",
    "training a puppy", "making fresh pasta at home", "the invention of the printing press",
    "how solar panels work", "running a successful team meeting", "caring for a cast iron pan",
    "planning a birthday party for a child", "the life cycle of a butterfly", "how to read a nutrition label",
    "the benefits of public libraries", "packing for a long flight", "the basics of personal budgeting",
    "how tides work", "volunteering in your community", "building a simple bookshelf",
    "the migration of birds", "photographing the night sky", "how recycling is sorted",
    "the origins of the Olympic Games", "learning to play the ukulele", "keeping a reading journal",
    "how a bill becomes a law", "setting up a neighbourhood book swap", "the science of bread baking",
)
MEDICAL_TASKS = (
    "Write a short explainer about {topic} for a patient's family.",
    "Explain {topic} to a medical student.",
    "Write a brief note for colleagues that summarises {topic}.",
    "Describe {topic} for a general audience.",
    "Write a patient information leaflet about {topic}.",
    "Summarise the key clinical points of {topic}.",
)
GENERAL_TASKS = (
    "Write a short essay about {topic}.",
    "Give practical advice on {topic}.",
    "Write a blog post about {topic}.",
    "Explain {topic} to a curious twelve-year-old.",
    "Write a short guide to {topic}.",
    "Describe {topic} in an engaging way.",
)
ENDINGS = ("Any other questions?", "Is there anything else I can help with?", "Stay well.",
           "Let me know if you need more details.")
TOPIC_WORDS = ("diagnosis", "symptoms", "treatment", "family", "genetic", "clinic", "support", "care",
               "history", "practice", "summary", "daily", "simple", "example", "future", "plan")
FORBIDDEN_POOL = ("cure", "miracle", "guarantee", "always", "never", "obviously", "basically", "literally",
                  "awesome", "cheap", "easy", "perfect", "secret", "trick")
FIRST_WORDS = ("today", "first", "overall", "importantly", "finally", "however", "remember", "generally")
LANGUAGES = ("en", "fr", "es", "de", "it", "pt")

# Constraints the SFT composer can satisfy by construction (each result is still verified).
COMPOSABLE = (
    "change_case:english_lowercase", "change_case:english_capital", "punctuation:no_comma",
    "detectable_format:title", "detectable_format:number_bullet_lists", "detectable_format:json_format",
    "detectable_format:multiple_sections", "detectable_format:number_highlighted_sections",
    "length_constraints:number_paragraphs", "length_constraints:number_words",
    "length_constraints:number_sentences", "length_constraints:nth_paragraph_first_word",
    "detectable_content:postscript", "detectable_content:number_placeholders", "startend:end_checker",
    "startend:quotation", "keywords:existence", "keywords:forbidden_words", "keywords:letter_frequency",
    "combination:repeat_prompt",
)
# Combinations whose formats collide on the page although IFEval does not list them as conflicts.
_COMPOSER_CONFLICTS = {
    frozenset({"detectable_format:number_bullet_lists", "detectable_format:number_highlighted_sections"}),
    frozenset({"detectable_format:number_bullet_lists", "length_constraints:number_paragraphs"}),
    frozenset({"detectable_format:number_bullet_lists", "detectable_format:multiple_sections"}),
    frozenset({"detectable_format:multiple_sections", "length_constraints:number_paragraphs"}),
    frozenset({"detectable_format:multiple_sections", "length_constraints:nth_paragraph_first_word"}),
    frozenset({"detectable_format:number_bullet_lists", "length_constraints:nth_paragraph_first_word"}),
}


def sample_kwargs(instruction_id: str, rng: random.Random, task: str) -> dict:
    """Arguments for one instruction, in the IFEval kwargs format (only the keys it takes)."""
    relation = rng.choice(("less than", "at least"))
    samplers = {
        "keywords:existence": lambda: {"keywords": rng.sample(TOPIC_WORDS, 2)},
        "keywords:frequency": lambda: {"keyword": rng.choice(TOPIC_WORDS), "frequency": rng.randint(1, 3),
                                       "relation": relation},
        "keywords:forbidden_words": lambda: {"forbidden_words": rng.sample(FORBIDDEN_POOL, rng.randint(2, 3))},
        "keywords:letter_frequency": lambda: {"letter": rng.choice(string.ascii_lowercase),
                                              "let_frequency": rng.randint(1, 10), "let_relation": relation},
        "language:response_language": lambda: {"language": rng.choice(LANGUAGES)},
        "length_constraints:number_sentences": lambda: {"num_sentences": rng.randint(2, 12), "relation": relation},
        "length_constraints:number_paragraphs": lambda: {"num_paragraphs": rng.randint(2, 5)},
        "length_constraints:number_words": lambda: {"num_words": rng.choice((50, 80, 100, 150, 200, 300)),
                                                    "relation": relation},
        "length_constraints:nth_paragraph_first_word": lambda: _nth_paragraph_kwargs(rng),
        "detectable_content:number_placeholders": lambda: {"num_placeholders": rng.randint(1, 4)},
        "detectable_content:postscript": lambda: {"postscript_marker": rng.choice(("P.S.", "P.P.S"))},
        "detectable_format:number_bullet_lists": lambda: {"num_bullets": rng.randint(2, 5)},
        "detectable_format:number_highlighted_sections": lambda: {"num_highlights": rng.randint(1, 4)},
        "detectable_format:multiple_sections": lambda: {"section_spliter": rng.choice(("Section", "SECTION")),
                                                        "num_sections": rng.randint(2, 5)},
        "combination:repeat_prompt": lambda: {"prompt_to_repeat": task},
        "startend:end_checker": lambda: {"end_phrase": rng.choice(ENDINGS)},
        "change_case:capital_word_frequency": lambda: {"capital_frequency": rng.randint(2, 20),
                                                       "capital_relation": relation},
    }
    return samplers[instruction_id]() if instruction_id in samplers else {}


def _nth_paragraph_kwargs(rng: random.Random) -> dict:
    num = rng.randint(2, 4)
    return {"num_paragraphs": num, "nth_paragraph": rng.randint(1, num), "first_word": rng.choice(FIRST_WORDS)}


def choose_instructions(allowed: list[str], rng: random.Random, min_n: int, max_n: int) -> list[str]:
    """1..k mutually compatible instruction ids (IFEval's conflict table plus layout clashes)."""
    conflicts = instruction_conflicts()
    want = rng.randint(min_n, max_n)
    pool = list(allowed)
    rng.shuffle(pool)
    chosen: list[str] = []
    for candidate in pool:
        if len(chosen) == want:
            break
        if any(candidate in conflicts.get(c, set()) or c in conflicts.get(candidate, set())
               or frozenset({c, candidate}) in _COMPOSER_CONFLICTS for c in chosen):
            continue
        chosen.append(candidate)
    return chosen


def build_prompt(task: str, instruction_ids: list[str], kwargs: list[dict]) -> str:
    descriptions = [describe(i, k, prompt=task) for i, k in zip(instruction_ids, kwargs)]
    return " ".join([task, *descriptions])


def medical_topics(kg: KnowledgeGraph, disease_ids: list[str]) -> list[str]:
    topics = [kg.diseases[d].name for d in disease_ids]
    topics += sorted({e.description for e in kg.icd.values() if len(e.description) < 60})
    return topics


def generate_prompts(kg: KnowledgeGraph, disease_ids: list[str], *, num_prompts: int, medical_fraction: float,
                     instruction_ids: list[str], min_instructions: int, max_instructions: int,
                     seed: int, forbidden_prompts: set[str] = frozenset()) -> list[dict]:
    """IFEval-schema prompts; ``forbidden_prompts`` (e.g. IFEval's test prompts) are never emitted."""
    rng = random.Random(f"{seed}:instruct")
    med_topics = medical_topics(kg, disease_ids)
    forbidden = {normalise_prompt(p) for p in forbidden_prompts}
    rows, seen = [], set()
    attempts = 0
    while len(rows) < num_prompts and attempts < num_prompts * 20:
        attempts += 1
        medical = rng.random() < medical_fraction
        topic = rng.choice(med_topics if medical else GENERAL_TOPICS)
        task = rng.choice(MEDICAL_TASKS if medical else GENERAL_TASKS).format(topic=topic)
        ids = choose_instructions(instruction_ids, rng, min_instructions, max_instructions)
        kwargs = [sample_kwargs(i, rng, task) for i in ids]
        prompt = build_prompt(task, ids, kwargs)
        key = normalise_prompt(prompt)
        if not ids or key in seen or key in forbidden:
            continue
        seen.add(key)
        rows.append({"key": len(rows), "prompt": prompt, "instruction_id_list": ids, "kwargs": kwargs,
                     "capability": "instruction", "topic_kind": "medical" if medical else "general",
                     "topic": topic, "task": task})
    return rows


def normalise_prompt(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt.strip().lower())


# ----- SFT: compliant responses composed from graph facts --------------------------------------
def disease_sentences(kg: KnowledgeGraph, disease_id: str, rng: random.Random) -> list[str]:
    disease = kg.diseases[disease_id]
    sentences = [f"{disease.name} is a rare {'genetic ' if disease.genes else ''}condition."]
    for mode in disease.inheritance:
        if mode in INHERITANCE_MODES:
            sentences.append(f"It shows {lower_first(kg.name(mode))}.")
    for gene in disease.genes[:2]:
        sentences.append(f"It is caused by pathogenic variants in the {gene} gene.")
    features = [t for t in disease.phenotypes if kg.is_phenotype(t) and len(kg.ancestors(t)) >= MIN_TERM_DEPTH]
    rng.shuffle(features)
    for term in features[:6]:
        sentences.append(f"{kg.name(term)} is a recognised feature.")
    sentences += [
        "A clinical geneticist can confirm the diagnosis and discuss testing.",
        "Care is usually coordinated by a team of specialists.",
        "Families may be offered genetic counselling.",
    ]
    return sentences


def _groups(items: list[str], n: int) -> list[list[str]]:
    size = max(1, -(-len(items) // n))
    groups = [items[i:i + size] for i in range(0, len(items), size)]
    while len(groups) < n:  # not enough sentences: split the largest group
        largest = max(range(len(groups)), key=lambda i: len(groups[i]))
        group = groups.pop(largest)
        groups[largest:largest] = [group[: len(group) // 2] or group, group[len(group) // 2:] or group]
    return groups[:n]


def compose_response(topic: str, sentences: list[str], ids: list[str], kwargs: list[dict], task: str,
                     rng: random.Random) -> tuple[str, list[dict]]:
    """Shape ``sentences`` to satisfy the constraints; returns the response and the final kwargs.

    Arguments that depend on the text (word/sentence counts, letters, keywords present,
    forbidden words absent) are set from the composed text, so they are true of it.
    """
    args = {i: dict(k) for i, k in zip(ids, kwargs)}
    sentences = list(sentences)
    if "detectable_format:json_format" in args:
        body = json.dumps({"topic": topic, "summary": sentences}, indent=2)
    elif "detectable_format:number_bullet_lists" in args:
        n = args["detectable_format:number_bullet_lists"]["num_bullets"]
        body = "\n".join(f"* {s}" for s in (sentences * n)[:n])
    elif "detectable_format:multiple_sections" in args:
        a = args["detectable_format:multiple_sections"]
        body = "\n\n".join(f"{a['section_spliter']} {i}\n{' '.join(g)}"
                           for i, g in enumerate(_groups(sentences, a["num_sections"]), start=1))
    elif "length_constraints:number_paragraphs" in args or "length_constraints:nth_paragraph_first_word" in args:
        a = args.get("length_constraints:nth_paragraph_first_word") or args["length_constraints:number_paragraphs"]
        groups = _groups(sentences, a["num_paragraphs"])
        if "length_constraints:nth_paragraph_first_word" in args:
            n, word = a["nth_paragraph"], a["first_word"]
            groups[n - 1] = [f"{word.capitalize()}, {lower_first(groups[n - 1][0])}", *groups[n - 1][1:]]
        separator = "\n\n***\n\n" if "length_constraints:number_paragraphs" in args else "\n\n"
        body = separator.join(" ".join(g) for g in groups)
    else:
        body = " ".join(sentences)
    if "detectable_format:number_highlighted_sections" in args:
        n = args["detectable_format:number_highlighted_sections"]["num_highlights"]
        extra = " ".join(f"*Key point {i}: see your care team.*" for i in range(1, n + 1))
        body = f"{body}\n\n{extra}"
    if "detectable_content:number_placeholders" in args:
        n = args["detectable_content:number_placeholders"]["num_placeholders"]
        slots = ["[clinic name]", "[phone number]", "[doctor's name]", "[appointment date]"][:n]
        body = f"{body}\n\nFor follow-up contact: " + " / ".join(slots)
    text = body
    if "detectable_format:title" in args:
        text = f"<<{topic}: an overview>>\n\n{text}"
    if "combination:repeat_prompt" in args:
        text = f"{args['combination:repeat_prompt']['prompt_to_repeat']}\n\n{text}"
    if "detectable_content:postscript" in args:
        text = f"{text}\n\n{args['detectable_content:postscript']['postscript_marker']} Ask your care team any questions."
    if "startend:end_checker" in args:
        text = f"{text}\n\n{args['startend:end_checker']['end_phrase']}"
    if "punctuation:no_comma" in args:
        text = text.replace(",", "")
    if "change_case:english_lowercase" in args:
        text = text.lower()
    if "change_case:english_capital" in args:
        text = text.upper()
    if "startend:quotation" in args:
        text = f'"{text}"'
    _fit_text_dependent_args(text, args, rng)
    return text, [args[i] for i in ids]


def _fit_text_dependent_args(text: str, args: dict, rng: random.Random) -> None:
    from lm_eval.tasks.ifeval import instructions_util

    words = re.findall(r"\w+", text.lower())
    if "length_constraints:number_words" in args:
        count = instructions_util.count_words(text)
        a = args["length_constraints:number_words"]
        a["num_words"] = count + rng.randint(1, 20) if a["relation"] == "less than" else max(1, count - rng.randint(0, 15))
    if "length_constraints:number_sentences" in args:
        count = instructions_util.count_sentences(text)
        a = args["length_constraints:number_sentences"]
        a["num_sentences"] = count + rng.randint(1, 3) if a["relation"] == "less than" else max(1, count - rng.randint(0, 2))
    if "keywords:existence" in args:
        vocabulary = sorted({w for w in words if len(w) > 4 and w.isalpha()})
        args["keywords:existence"]["keywords"] = rng.sample(vocabulary, min(2, len(vocabulary)))
    if "keywords:forbidden_words" in args:
        absent = [w for w in FORBIDDEN_POOL if w not in words]
        args["keywords:forbidden_words"]["forbidden_words"] = rng.sample(absent, min(2, len(absent)))
    if "keywords:letter_frequency" in args:
        letters = [c for c in text.lower() if c in string.ascii_lowercase]
        letter = rng.choice(letters)
        a = args["keywords:letter_frequency"]
        a.update(letter=letter, let_relation="at least", let_frequency=max(1, min(letters.count(letter), 10)))


def generate_sft_instruct(kg: KnowledgeGraph, disease_ids: list[str], *, num_conversations: int, seed: int,
                          min_instructions: int, max_instructions: int) -> tuple[list[dict], dict]:
    """Verified instruction-following conversations about train-split diseases."""
    rng = random.Random(f"{seed}:sft-instruct")
    rows, failures, attempts = [], 0, 0
    ids_pool = list(COMPOSABLE)
    while len(rows) < num_conversations and attempts < num_conversations * 10 and disease_ids:
        attempts += 1
        disease_id = rng.choice(disease_ids)
        topic = kg.diseases[disease_id].name
        task = rng.choice(MEDICAL_TASKS).format(topic=topic)
        ids = choose_instructions(ids_pool, rng, min_instructions, max_instructions)
        kwargs = [sample_kwargs(i, rng, task) for i in ids]
        response, kwargs = compose_response(topic, disease_sentences(kg, disease_id, rng), ids, kwargs, task, rng)
        prompt = build_prompt(task, ids, kwargs)
        if not all(follows(prompt, ids, kwargs, response)):
            failures += 1
            continue
        rows.append({
            "id": f"sft-instruct-{len(rows):06d}",
            "source": "kg_instruct",
            "capability": "instruction",
            "instruction_id_list": ids,
            "kwargs": kwargs,
            "task": task,
            "messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
        })
    return rows, {"made": len(rows), "failed_verification": failures, "attempts": attempts}

"""MKGSG: knowledge-grounded multiple-choice questions with ontology validation.

Every question comes from graph facts. A ``QuestionKind`` proposes a candidate (subject,
key, distractors) and knows the predicate ``holds(option)`` that makes an option correct;
``validate`` then proves, against the graph, that exactly the key satisfies it, that every
distractor is of the key's type, and that no two options are ancestor/descendant/synonym
(or numbered subtypes of one disease family). Candidates that fail are dropped and counted
by reason. Entities (diseases, genes, ICD-10-CM categories) are assigned to train/val/test
by a seeded hash, and a question only uses entities of its own split. The train split is
partitioned once more, the same way, into three *uses* (``USES``): questions whose labelled
chains train the PRM, questions that become SFT targets, and the GRPO prompts. A disease
*family* (a disease's ``series_name``: numbered subtypes such as "Noonan syndrome 1" and
"Noonan syndrome 3" are one family) is the unit of the split, and so are genes and ICD-10-CM
categories, so no question and no disease family is shared by two uses.
"""

from __future__ import annotations

import random

from balancedbio.data.formatting import LETTERS
from balancedbio.data.kg import KnowledgeGraph, normalise_name
from balancedbio.data.question_kinds import (QUESTION_KINDS, Candidate, Pools, Splitter, disease_family, option_type,
                                             options_related, split_entities)
from balancedbio.data.question_kinds import fact, lower_first  # noqa: F401 (re-exported)
from balancedbio.data.splits import SPLITS, USES, parse_partition
from balancedbio.data.splits import MIN_TERM_DEPTH, entity_split, entity_use, partition_label  # noqa: F401 (re-exported)



def validate(kg: KnowledgeGraph, cand: Candidate, splitter: Splitter | None = None) -> str | None:
    """Why the candidate is not a sound single-answer question, or None when it is."""
    kind = QUESTION_KINDS[cand.kind]
    options = [cand.key, *cand.distractors]
    if len(cand.distractors) != 3 or len(set(options)) != 4:
        return "not_four_distinct_options"
    if any(option_type(kg, o) != kind.option_type for o in options):
        return "distractor_type_mismatch"
    if not kind.holds(kg, cand, cand.key):
        return "key_not_supported"
    if any(kind.holds(kg, cand, d) for d in cand.distractors):
        return "ambiguous_more_than_one_answer"
    if any(options_related(kg, a, b) for i, a in enumerate(options) for b in options[i + 1:]):
        return "options_related_in_ontology"
    if len({normalise_name(kg.name(o)) for o in options}) != 4:
        return "duplicate_option_text"
    if splitter is not None and len({splitter(e) for e in split_entities(kg, cand)}) > 1:
        return "entities_cross_splits"
    return None


def render_question(kg: KnowledgeGraph, cand: Candidate, rng: random.Random, split: str, index: int,
                    use: str | None = None) -> dict:
    kind = QUESTION_KINDS[cand.kind]
    template = rng.randrange(len(kind.stems))
    question = kind.stems[template].format(**kind.stem_fields(kg, cand))
    question = question[0].upper() + question[1:]
    ordered = [cand.key, *cand.distractors]
    rng.shuffle(ordered)
    options = {LETTERS[i]: kg.name(node) for i, node in enumerate(ordered)}
    answer = LETTERS[ordered.index(cand.key)]
    provenance = kind.support(kg, cand) + [kind.eliminate(kg, cand, d) for d in cand.distractors]
    diseases = sorted({n for n in split_entities(kg, cand) if n in kg.diseases})
    row = {
        "id": f"kg-{split}-{index:06d}",
        "split": split,
        "kind": cand.kind,
        "template": template,
        "question": question,
        "options": options,
        "answer": answer,
        "answer_text": options[answer],
        "option_ids": {LETTERS[i]: node for i, node in enumerate(ordered)},
        "subject": cand.subject,
        "presented": cand.presented,
        "entities": {
            "diseases": diseases,
            "genes": sorted({n for n in split_entities(kg, cand) if n in kg.genes}),
            "icd10cm": sorted({n for n in split_entities(kg, cand) if n in kg.icd}),
        },
        "families": sorted({disease_family(kg, d) for d in diseases}),
        "provenance": provenance,
    }
    if use is not None:
        row["use"] = use
    return row


def candidate_from_row(row: dict) -> Candidate:
    """Rebuild the candidate behind a question row (to re-validate or to build its reasoning)."""
    key = row["option_ids"][row["answer"]]
    distractors = [node for letter, node in row["option_ids"].items() if letter != row["answer"]]
    return Candidate(row["kind"], row["subject"], key, distractors, presented=list(row.get("presented", [])))


def generate_questions(kg: KnowledgeGraph, *, num_questions: int, kinds: dict[str, float], seed: int,
                       val_fraction: float, test_fraction: float, use_fractions: dict[str, float] | None = None,
                       progress: bool = True) -> tuple[list[dict], dict]:
    """Generate validated questions; return (rows in split order, statistics incl. drop reasons).

    With ``use_fractions`` every train question also carries its ``use`` (see ``USES``)."""
    from tqdm.auto import tqdm

    unknown = sorted(set(kinds) - set(QUESTION_KINDS))
    if unknown:
        raise ValueError(f"unknown question kinds {unknown}; known: {sorted(QUESTION_KINDS)}")
    splitter = Splitter(seed, val_fraction, test_fraction, kg, use_fractions)
    pools = Pools(kg, splitter)
    total_weight = sum(kinds.values())
    rows: dict[str, list[dict]] = {s: [] for s in SPLITS}
    stats: dict = {"requested": num_questions, "per_kind": {}, "dropped": {}}
    bar = tqdm(total=num_questions, desc="questions", disable=not progress)
    for kind_name, weight in kinds.items():
        kind = QUESTION_KINDS[kind_name]
        quota = round(num_questions * weight / total_weight)
        rng = random.Random(f"{seed}:{kind_name}")
        subjects = kind.subjects(kg)
        rng.shuffle(subjects)
        made, dropped = 0, {}
        for subject in subjects:
            if made >= quota:
                break
            cand = kind.propose(kg, subject, rng, pools)
            if cand is None:
                dropped["no_valid_distractors"] = dropped.get("no_valid_distractors", 0) + 1
                continue
            reason = validate(kg, cand, splitter)
            if reason:
                dropped[reason] = dropped.get(reason, 0) + 1
                continue
            split, use = parse_partition(splitter(split_entities(kg, cand)[0]))
            rows[split].append(render_question(kg, cand, rng, split, 0, use))
            made += 1
            bar.update()
        stats["per_kind"][kind_name] = {"requested": quota, "made": made, "subjects_available": len(subjects)}
        stats["dropped"][kind_name] = dropped
    bar.close()
    out: list[dict] = []
    for split in SPLITS:
        for index, row in enumerate(rows[split]):
            row["id"] = f"kg-{split}-{index:06d}"
            out.append(row)
        stats[f"n_{split}"] = len(rows[split])
    if use_fractions is not None:
        stats["train_uses"] = {use: sum(r.get("use") == use for r in rows["train"]) for use in USES}
    return out, stats

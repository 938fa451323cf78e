"""Document processing and scoring for BalancedBio's lm-eval tasks (the YAMLs beside this file).

Every multiple-choice benchmark is normalised to one schema, whatever its source (the local
JSONL layout of ``benchmarks_dir`` or the public hub dataset): ``question``, ``options``
(letter -> text, A-D or A-E), ``answer`` (letter), ``subject``.
"""

from __future__ import annotations

import re

LETTERS = "ABCDE"
MMLU_SUBJECTS = ("anatomy", "clinical_knowledge", "professional_medicine", "medical_genetics",
                 "college_medicine", "college_biology")


def _letter(answer, options: dict) -> str:
    """The answer key as a letter; given as a letter, a 0-based index or the exact option text.

    Anything else raises (taking, say, the first character of an option text would silently
    score against a wrong key).
    """
    letters = list(options)
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is neither a letter, an index nor an option text")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(letters):
            raise ValueError(f"answer index {index} is out of range for {len(letters)} options "
                             f"(0-{len(letters) - 1})")
        return letters[index]
    if isinstance(answer, str):
        if answer.strip().upper() in letters:
            return answer.strip().upper()
        by_text = [k for k, v in options.items() if v.strip() == answer.strip()]
        if len(by_text) == 1 and answer.strip():
            return by_text[0]
    raise ValueError(f"answer {answer!r} is neither one of the letters {', '.join(letters)}, an index below "
                     f"{len(letters)} nor the exact text of one option")


def _options(doc: dict) -> dict:
    options = doc.get("options") or doc.get("Options")
    if isinstance(options, dict):
        return {k: str(v) for k, v in sorted(options.items()) if v not in (None, "")}
    if isinstance(options, str):  # "A text\nB text ..." (CMExam hub layout)
        parsed = {}
        for line in options.splitlines():
            match = re.match(r"\s*([A-E])[\s.、:：)]+(.*)", line)
            if match:
                parsed[match.group(1)] = match.group(2).strip()
        return parsed
    choices = doc.get("choices")
    if isinstance(choices, list):
        return {LETTERS[i]: str(c) for i, c in enumerate(choices)}
    raise ValueError(f"no options in document with keys {sorted(doc)}")


def normalize(doc: dict) -> dict:
    options = _options(doc)
    answer = doc.get("answer_idx", doc.get("answer", doc.get("Answer")))
    return {"question": str(doc.get("question", doc.get("Question", ""))).strip(), "options": options,
            "answer": _letter(answer, options), "subject": doc.get("subject", ""),
            "id": str(doc.get("id", doc.get("key", "")))}


def _source_name(dataset) -> str:
    files = [f["filename"] for f in (getattr(dataset, "cache_files", None) or []) if "filename" in f]
    return (dataset.info.dataset_name if getattr(dataset, "info", None) and dataset.info.dataset_name else None) \
        or (files[0] if files else "the dataset")


def process_mcq(dataset):
    def checked(doc: dict, index: int) -> dict:
        try:
            return normalize(doc)
        except ValueError as err:  # name the row: the message reaches the user through lm-eval
            raise ValueError(f"{_source_name(dataset)} row {index + 1}: {err}") from None

    return dataset.map(checked, with_indices=True, remove_columns=[c for c in dataset.column_names if c != "id"])


def _mmlu_subject(subject: str):
    def process(dataset):
        if "subject" in dataset.column_names:  # the local file holds all six subjects
            dataset = dataset.filter(lambda doc: doc["subject"] == subject)
        return process_mcq(dataset)

    return process


process_mmlu_anatomy = _mmlu_subject("anatomy")
process_mmlu_clinical_knowledge = _mmlu_subject("clinical_knowledge")
process_mmlu_professional_medicine = _mmlu_subject("professional_medicine")
process_mmlu_medical_genetics = _mmlu_subject("medical_genetics")
process_mmlu_college_medicine = _mmlu_subject("college_medicine")
process_mmlu_college_biology = _mmlu_subject("college_biology")


def doc_to_text(doc: dict) -> str:
    lines = [doc["question"]] + [f"{k}. {v}" for k, v in doc["options"].items()]
    return "\n".join(lines) + "\nAnswer:"


def doc_to_choice(doc: dict) -> list[str]:
    return list(doc["options"])


def doc_to_target(doc: dict) -> int:
    return list(doc["options"]).index(doc["answer"])


def doc_to_text_cot(doc: dict) -> str:
    """Generative chain-of-thought: the same instruction the GRPO prompts carry."""
    from balancedbio.data.formatting import format_mcq_prompt

    return format_mcq_prompt(doc["question"], doc["options"])


def process_results_cot(doc: dict, results: list[str]) -> dict:
    """Parse the answer letter with the extractor the accuracy reward uses."""
    from balancedbio.answers import extract_choice

    extraction = extract_choice(results[0], doc["options"])
    return {"acc": float(extraction.letter == doc["answer"])}


# IFEval: lm-eval's own scoring (strict and loose, prompt and instruction level).
def ifeval_process_results(doc, results):
    from balancedbio.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()
    from lm_eval.tasks.ifeval.utils import process_results

    return process_results(doc, results)


def agg_inst_level_acc(items):
    from lm_eval.tasks.ifeval.utils import agg_inst_level_acc as aggregate

    return aggregate(items)


# IFBench: the same four metrics, scored by IFBench's own checkers (the if-verifiable package).
def ifbench_process_results(doc, results):
    """Per-prompt IFBench verdicts in lm-eval's IFEval metric layout.

    ``if_verifiable.common.evaluate_instructions`` is IFBench's scoring (strict = the response
    as it is; loose = any of its eight relaxed variants). Two of its checkers read nltk data
    that nltk downloads at import and that cannot be fetched offline (stopwords for
    ``ratio:stop_words``, the POS tagger for ``words:start_verb``); those instructions count as
    not followed and are listed under ``checker_errors`` instead of failing the evaluation.
    """
    from balancedbio.nltk_data import ensure_punkt_tab

    ensure_punkt_tab()
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifbench.instructions_registry import INSTRUCTION_DICT

    ids = list(doc["instruction_id_list"])
    unknown = [i for i in ids if i not in INSTRUCTION_DICT]
    if unknown:
        raise ValueError(f"IFBench prompt {doc.get('key')!r}: instruction ids {unknown} are not in "
                         "if_verifiable.ifbench's registry")
    response = results[0]
    strict, loose, errors = [], [], []
    for index, instruction_id in enumerate(ids):
        kwargs = [doc["kwargs"][index] if doc.get("kwargs") else {}]
        try:
            verdicts, _ = evaluate_instructions(response, [instruction_id], kwargs, doc["prompt"], INSTRUCTION_DICT)
        except LookupError as err:  # nltk data missing (offline); see the docstring
            errors.append(f"{instruction_id}: {str(err).strip().splitlines()[0][:120]}")
            verdicts = []
        # An empty response (or one that is only a <think> block) has no verdicts: not followed.
        strict.append(bool(verdicts and verdicts[0].strict_pass))
        loose.append(bool(verdicts and verdicts[0].loose_pass))
    return {"prompt_level_strict_acc": all(strict), "inst_level_strict_acc": strict,
            "prompt_level_loose_acc": all(loose), "inst_level_loose_acc": loose,
            "checker_errors": errors}


def count_checker_errors(items):
    return sum(len(errors) for errors in items)

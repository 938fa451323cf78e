"""Reward functions on hostile completions: each must stay linear in the completion's length.

A policy can emit anything up to max_completion_length tokens, and a token of SmolLM2 can hold
64 spaces; the rewards must neither hang nor pay for junk. This script times every reward
component (and the two parsers under them) on 1 MB completions built to hit quadratic paths:
spaces, newlines, one giant token, deeply nested JSON, lorem ipsum, and 'A' * 100000 + '!'.
The target is < 0.1 s per call.

    .venv/bin/python bench/reward_hostile.py                      # PRM from results/models/prm
    .venv/bin/python bench/reward_hostile.py --prm /path/to/prm --repeats 5

Each (input, function) pair runs ``--repeats`` times; the median and the max are reported. The
instruction reward is timed twice: on a typical three-instruction prompt, and as the slowest
single IFEval checker (lm-eval's own code) on that input after balancedbio's length cap. Every
checker runs once on a short text before timing, so one-off start-up (langdetect loading its
language profiles) is not counted as a per-call cost.
Writes bench/results/reward_hostile.json and bench/results/reward_hostile.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from balancedbio.answers import extract_choice  # noqa: E402
from balancedbio.ifeval import follows, instruction_registry  # noqa: E402
from balancedbio.prm import PRMScorer, split_steps  # noqa: E402
from balancedbio.rewards import AccuracyReward, InstructionReward, ReasoningReward  # noqa: E402

MB = 1 << 20
TARGET_S = 0.1
LOREM = ("Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut "
         "labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco. ")
INPUTS = {
    "spaces": " " * MB,
    "newlines": "\n" * MB,
    "one giant token": "x" * MB,
    "deep JSON": "[" * (MB // 2) + "]" * (MB // 2),
    "lorem ipsum": (LOREM * (MB // len(LOREM) + 1))[:MB],
    "'A'*100000+'!'": "A" * 100_000 + "!",
}
QUESTION = "Pathogenic variants in which gene cause Noonan syndrome?"
OPTIONS = {"A": "PTPN11", "B": "CFTR", "C": "FBN1", "D": "HBB"}
TYPICAL_INSTRUCTIONS = (["length_constraints:number_sentences", "detectable_format:json_format",
                         "length_constraints:number_words"],
                        [{"num_sentences": 3, "relation": "at least"}, {}, {"num_words": 100, "relation": "less than"}])
# Arguments for the checkers that need them (any valid value: the cost is in reading the text).
CHECKER_KWARGS = {
    "change_case:capital_word_frequency": {"capital_frequency": 3, "capital_relation": "less than"},
    "combination:repeat_prompt": {"prompt_to_repeat": "Write about insulin."},
    "detectable_content:number_placeholders": {"num_placeholders": 2},
    "detectable_content:postscript": {"postscript_marker": "P.S."},
    "detectable_format:multiple_sections": {"section_spliter": "Section", "num_sections": 2},
    "detectable_format:number_bullet_lists": {"num_bullets": 3},
    "detectable_format:number_highlighted_sections": {"num_highlights": 2},
    "keywords:existence": {"keywords": ["insulin"]},
    "keywords:forbidden_words": {"forbidden_words": ["cure"]},
    "keywords:frequency": {"keyword": "insulin", "frequency": 2, "relation": "at least"},
    "keywords:letter_frequency": {"letter": "a", "let_frequency": 3, "let_relation": "at least"},
    "language:response_language": {"language": "en"},
    "length_constraints:nth_paragraph_first_word": {"num_paragraphs": 2, "nth_paragraph": 1, "first_word": "insulin"},
    "length_constraints:number_paragraphs": {"num_paragraphs": 2},
    "length_constraints:number_sentences": {"num_sentences": 3, "relation": "at least"},
    "length_constraints:number_words": {"num_words": 100, "relation": "less than"},
    "startend:end_checker": {"end_phrase": "Any other questions?"},
}


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), max(times)


def _check(checker: str, text: str) -> None:
    try:  # a checker may raise on junk (deep JSON: RecursionError); the reward counts it as failed
        follows("Write about insulin.", [checker], [CHECKER_KWARGS.get(checker, {})], text)
    except Exception:  # noqa: BLE001 - timing only
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prm", default=str(REPO / "results" / "models" / "prm"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = parser.parse_args()
    logging.disable(logging.ERROR)  # lm-eval logs each undetectable language (an ERROR), text and all
    # One-off start-up costs are not per-call costs: langdetect loads its 55 language profiles
    # (~0.5 s here, seconds under load) on its first call, which the first timed checker paid
    # when the checkers were timed once each (2.68 s for english_lowercase on 2026-12-01).
    for checker in sorted(instruction_registry()):
        _check(checker, "Warm-up text in plain English, checked once before timing.")

    accuracy = AccuracyReward()
    instruction = InstructionReward()
    reasoning = ReasoningReward(PRMScorer(args.prm))
    ids, kwargs = TYPICAL_INSTRUCTIONS
    functions = {
        "accuracy": lambda t: accuracy(prompts=["q"], completions=[t], answer=["A"], options=[OPTIONS]),
        "reasoning (PRM)": lambda t: reasoning(prompts=["q"], completions=[t], question=[QUESTION],
                                               options=[OPTIONS], capability=["medical"]),
        "instruction (3 checkers)": lambda t: instruction(prompts=["q"], completions=[t],
                                                          instruction_id_list=[ids], kwargs=[kwargs]),
        "split_steps": lambda t: split_steps(t),
        "extract_choice": lambda t: extract_choice(t, OPTIONS),
    }
    rows = []
    for name, text in INPUTS.items():
        for function, call in functions.items():
            median, worst = timed(lambda: call(text), args.repeats)
            value = call(text)
            rows.append({"input": name, "function": function, "median_s": median, "max_s": worst,
                         "value": value[0] if isinstance(value, list) and value and not isinstance(value[0], str)
                         else str(value)[:40]})
        slowest = (0.0, "")
        for checker in sorted(instruction_registry()):
            median, _ = timed(lambda: _check(checker, text), args.repeats)
            slowest = max(slowest, (median, checker))
        rows.append({"input": name, "function": "slowest IFEval checker", "median_s": slowest[0], "max_s": slowest[0],
                     "value": slowest[1]})
        print(f"{name}: " + ", ".join(f"{r['function']} {r['median_s']:.4f}s" for r in rows if r["input"] == name),
              flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reward_hostile.json").write_text(json.dumps({"target_s": TARGET_S, "repeats": args.repeats,
                                                         "prm": args.prm, "rows": rows}, indent=2, default=str))
    names = list(functions) + ["slowest IFEval checker"]
    lines = ["| input (1 MB unless named) | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name in INPUTS:
        cells = []
        for function in names:
            row = next(r for r in rows if r["input"] == name and r["function"] == function)
            mark = "" if row["median_s"] < TARGET_S else " **over**"
            extra = f" ({row['value']})" if function == "slowest IFEval checker" else ""
            cells.append(f"{row['median_s']:.4f}{mark}{extra}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    (out / "reward_hostile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

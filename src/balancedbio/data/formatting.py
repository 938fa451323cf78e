"""How multiple-choice questions are shown to a model and how its final answer is written.

One place for both, so the SFT targets, the GRPO prompts, the accuracy reward and the
evaluation all agree on the format.
"""

from __future__ import annotations

LETTERS = "ABCDE"
ANSWER_PREFIX = "Answer:"
MCQ_INSTRUCTION = (
    "Think step by step, then give the final answer on the last line as "
    f"'{ANSWER_PREFIX} <letter>'."
)


def format_options(options: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in options.items())


def format_mcq_prompt(question: str, options: dict[str, str], *, instruction: str = MCQ_INSTRUCTION) -> str:
    """The user turn for a multiple-choice question."""
    return f"{question}\n\n{format_options(options)}\n\n{instruction}".strip()


def answer_line(letter: str) -> str:
    return f"{ANSWER_PREFIX} {letter}"


def format_reasoning(steps: list[str], letter: str) -> str:
    """The assistant turn: numbered steps, then the answer line the rewards parse."""
    lines = [f"Step {i}: {step}" for i, step in enumerate(steps, start=1)]
    lines.append(answer_line(letter))
    return "\n".join(lines)

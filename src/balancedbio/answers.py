"""Robust extraction of a multiple-choice answer letter from free text.

Used by the accuracy reward and by generative evaluation, so both read answers the same
way. Recognised: "Answer: C", "the correct answer is (C).", "Final answer - C", a final line
holding only "C" or "(C)", ``{"answer": "C"}``, and the option's text instead of its letter.
The last declared answer wins (a model may correct itself); a declaration naming two
letters ("A or C", "B/D") is a hedge and counts as no answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

HEDGE = "hedge"
_LETTER = r"[A-E]"
_DECLARATION = re.compile(
    r"(?:final\s+answer|correct\s+(?:answer|option|choice)|answer|the\s+best\s+option|best\s+answer)"
    r"\s*(?:is|would\s+be|will\s+be|should\s+be|:|=|-|–)?\s*(?:option|choice|letter)?\s*:?\s*",
    re.IGNORECASE,
)
_JSON_ANSWER = re.compile(r'"(?:answer|final_answer|choice)"\s*:\s*"\s*\(?(' + _LETTER + r')\)?\s*"', re.IGNORECASE)
# [ \t]*, not \s*: a blank run must not span lines, or each of n blank lines rescans the rest.
_BARE_LINE = re.compile(r"^[ \t]*[\(\[]?(" + _LETTER + r")[\)\]]?[ \t]*[.:]?[ \t]*$", re.MULTILINE)
_TAIL_LETTER = re.compile(r"(?<![A-Za-z0-9'])[\(\[]?(" + _LETTER + r")[\)\]]?(?![A-Za-z0-9'])")
_CLAUSE_CHARS = 120  # what a declaration names is read from this many characters after it
_TAIL_CHARS = 20_000  # only the end of a completion is read: the answer is there
_MAX_DECLARATIONS = 64
_HEDGE_JOIN = re.compile(r"^\s*(?:or|and|/|,|&)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Extraction:
    letter: str | None  # None when no usable answer
    status: str  # "ok" | "hedge" | "no_answer"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _option_in(text: str, options: dict[str, str]) -> str | None:
    """The single option whose text appears in ``text`` (None if none or several)."""
    haystack = f" {_norm(text)} "
    found = {letter for letter, option in options.items() if _norm(option) and f" {_norm(option)} " in haystack}
    # An option that is a substring of another found option ("Seizure" in "Focal seizure") is not separate.
    found = {a for a in found if not any(a != b and _norm(options[a]) in _norm(options[b]) for b in found)}
    return found.pop() if len(found) == 1 else None


def _declared(tail: str, options: dict[str, str] | None) -> str | None:
    """What a declaration such as 'Answer: ...' names: a letter, HEDGE, or None."""
    clause = re.split(r"(?<=[.!?])\s|\n", tail[:_CLAUSE_CHARS], maxsplit=1)[0]
    letters = [m for m in _TAIL_LETTER.finditer(clause)]
    if letters:
        first = letters[0]
        if first.start() > 12:  # "Answer: the pancreas, which is A" -- too far to be the declared letter
            letters = []
        else:
            distinct = {m.group(1) for m in letters[:3]}
            joined = any(_HEDGE_JOIN.match(clause[a.end():b.start()]) for a, b in zip(letters, letters[1:]))
            if len(distinct) > 1 and joined:
                return HEDGE
            return first.group(1)
    lone = re.fullmatch(r"\s*[\(\[]?([a-eA-E])[\)\]]?\s*[.!]?\s*", clause)
    if lone:  # "the answer is c." -- a lone lower-case letter is a letter, "a pancreas" is not
        return lone.group(1).upper()
    if options:
        return _option_in(clause, options)
    return None


def extract_choice(text: object, options: dict[str, str] | None = None) -> Extraction:
    """The answer letter a completion commits to (see the module docstring); never raises."""
    if not isinstance(text, str):
        return Extraction(None, "no_answer")
    text = text[-_TAIL_CHARS:].replace("\x00", " ")  # the answer is at the end; bound the work on huge outputs
    found: list[tuple[int, str]] = []
    # The last declaration that names something is the only one that can win: read them from
    # the end, and at most _MAX_DECLARATIONS of them (a completion is not a list of thousands).
    for match in list(_DECLARATION.finditer(text))[::-1][:_MAX_DECLARATIONS]:
        declared = _declared(text[match.end():match.end() + _CLAUSE_CHARS], options)
        if declared:
            found.append((match.start(), declared))
            break
    for match in _JSON_ANSWER.finditer(text):
        found.append((match.start(), match.group(1).upper()))
    for match in _BARE_LINE.finditer(text):
        found.append((match.start(), match.group(1)))
    if not found:  # weaker evidence, only from the last line: "I think it is (B)." or the option text
        lines = [line for line in text.strip().splitlines() if line.strip()]
        last_line = lines[-1] if lines else ""
        bracketed = set(re.findall(r"\((" + _LETTER + r")\)", last_line))
        if len(bracketed) == 1:
            found.append((len(text), bracketed.pop()))
        elif options and (letter := _option_in(last_line, options)):
            found.append((len(text), letter))
    if not found:
        return Extraction(None, "no_answer")
    _, last = max(found, key=lambda item: item[0])
    if last == HEDGE:
        return Extraction(None, "hedge")
    return Extraction(last, "ok")

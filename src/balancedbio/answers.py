"""Robust extraction of a multiple-choice answer letter from free text.

Used by the accuracy reward and by generative evaluation, so both read answers the same
way. Recognised: "Answer: C", "the correct answer is (C).", "Final answer - C", a final line
holding only "C" or "(C)", ``{"answer": "C"}``, and the option's text instead of its letter,
in any case and through markdown emphasis ("**Answer: B**", "__Answer__: (b)", "### Answer: C").
The last declared answer wins (a model may correct itself). A declaration is read to the end
of its clause (sentence or line) before it is judged: one naming two options ("A or C",
"B/D", "<option text> or <other option text>") is a hedge and counts as no answer.
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
# (?!\.\w): the 'E' of "E.g." is not a letter.
_TAIL_LETTER = re.compile(r"(?<![A-Za-z0-9'])[\(\[]?(" + _LETTER + r")[\)\]]?(?![A-Za-z0-9'])(?!\.\w)")
# A lower-case letter is a letter only where an article cannot be: bracketed, or followed by
# punctuation, 'or', 'and' or the end of the clause ("answer: b.", "(c)", "a or b"; not "a pancreas").
_LOWER_LETTER = re.compile(r"(?<![A-Za-z0-9'])(?:[\(\[]([a-e])[\)\]]|([a-e])(?=[.,;:!?/)\]]|\s+(?:or|and)\b|\s*$))(?!\.\w)")
# Markdown emphasis and code marks around or inside an answer line ("**Answer:** __b__").
_EMPHASIS = re.compile(r"\*+|(?<!\w)_+|_+(?!\w)|`+")
_CLAUSE_CHARS = 1_000  # a declared clause is read to its end, but no further than this
_LETTER_LEAD_CHARS = 12  # "Answer: the pancreas, which is A": a letter this far in is not the declared one
_TAIL_CHARS = 20_000  # only the end of a completion is read: the answer is there
_MAX_DECLARATIONS = 64
# What may stand between two options for them to be offered together: "A or C", "A/C", "A, C",
# "Liver, or else pancreas", "(A) and/or (C)".
_JOIN_WORDS = frozenset({"or", "and", "either", "else", "/", "&"})
_JOIN_TOKEN = re.compile(r"[a-z]+|[/&]")
# A break followed by one of these continues the clause ("...anemia. or The tricuspid...").
_CONTINUES = re.compile(r"[\W_]*(?:(?:or|and|either)\b|[/&])", re.IGNORECASE)
_CLAUSE_BREAK = re.compile(r"(?<=[.!?])\s|\n")


@dataclass(frozen=True)
class Extraction:
    letter: str | None  # None when no usable answer
    status: str  # "ok" | "hedge" | "no_answer"


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"[^\w\s]", " ", text.lower())).strip()


def _option_pattern(option: str) -> re.Pattern | None:
    words = _norm(option).split()
    if not words:
        return None
    return re.compile(r"(?<!\w)" + r"[\W_]+".join(map(re.escape, words)) + r"(?!\w)", re.IGNORECASE)


def _option_mentions(text: str, options: dict[str, str]) -> list[tuple[int, int, str]]:
    """(start, end, letter) of each place ``text`` names an option by its text, in order. A
    mention inside a longer option's mention ("Seizure" in "Focal seizure") is not separate."""
    spans = []
    for letter, option in options.items():
        pattern = _option_pattern(str(option))
        if pattern is not None:
            spans += [(m.start(), m.end(), letter) for m in pattern.finditer(text)]
    kept, reach = [], (-1, -1)  # (end, start) of the furthest-reaching span so far: one sweep, not n^2
    for start, end, letter in sorted(spans, key=lambda s: (s[0], -s[1])):
        if not (reach[0] > end or (reach[0] == end and reach[1] < start)):
            kept.append((start, end, letter))
        if end > reach[0]:
            reach = (end, start)
    return kept


def _option_in(text: str, options: dict[str, str]) -> str | None:
    """The single option whose text appears in ``text`` (None if none or several)."""
    found = {letter for _, _, letter in _option_mentions(text, options)}
    return found.pop() if len(found) == 1 else None


def _letter_mentions(clause: str) -> list[tuple[int, int, str]]:
    upper = [(m.start(), m.end(), m.group(1)) for m in _TAIL_LETTER.finditer(clause)]
    lower = [(m.start(), m.end(), (m.group(1) or m.group(2)).upper()) for m in _LOWER_LETTER.finditer(clause)]
    return sorted(upper + lower)


def _is_hedge(clause: str, mentions: list[tuple[int, int, str]]) -> bool:
    """Two different options named next to each other, joined only by 'or', 'and', '/', ','."""
    for (_, end, a), (start, _, b) in zip(mentions, mentions[1:]):
        if a != b and set(_JOIN_TOKEN.findall(clause[end:start].lower())) <= _JOIN_WORDS:
            return True
    return False


def _clause(tail: str, options: dict[str, str] | None) -> str:
    """The declared clause: up to the end of its sentence or line, read whole before it is
    judged. A break inside an option's text ('...of Fallot. ...') does not end it, nor does
    one followed by 'or' / 'and' ('<option text>.\nor <other option text>')."""
    tail = tail[:_CLAUSE_CHARS]
    spans = [(start, end) for start, end, _ in _option_mentions(tail, options)] if options else []
    for match in _CLAUSE_BREAK.finditer(tail):
        if any(start < match.start() < end for start, end in spans) or _CONTINUES.match(tail, match.end()):
            continue
        return tail[:match.start()]
    return tail


def _declared(tail: str, options: dict[str, str] | None) -> str | None:
    """What a declaration such as 'Answer: ...' names: a letter, HEDGE, or None."""
    clause = _clause(tail, options)
    letters = _letter_mentions(clause)
    texts = _option_mentions(clause, options) if options else []
    if letters and letters[0][0] <= _LETTER_LEAD_CHARS:
        if _is_hedge(clause, sorted(letters + texts)):
            return HEDGE
        return letters[0][2]
    if texts:
        if _is_hedge(clause, texts):
            return HEDGE
        return _option_in(clause, options)
    return None


def extract_choice(text: object, options: dict[str, str] | None = None) -> Extraction:
    """The answer letter a completion commits to (see the module docstring); never raises."""
    if not isinstance(text, str):
        return Extraction(None, "no_answer")
    # The answer is at the end: bound the work on huge outputs. Emphasis marks say nothing.
    text = _EMPHASIS.sub("", text[-_TAIL_CHARS:].replace("\x00", " "))
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

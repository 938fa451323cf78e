"""IFEval verification through lm-eval's own instruction registry (the official scorer's code).

Both the instruction-following reward and the IFEval benchmark go through here, so a
training prompt is checked exactly like a test prompt. Punkt data is made available offline
before lm-eval's IFEval module is imported (it tries to download it at import).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

from balancedbio.nltk_data import ensure_punkt_tab


@functools.lru_cache(maxsize=1)
def _ifeval():
    ensure_punkt_tab()
    from lm_eval.tasks.ifeval import instructions, instructions_registry, utils

    class LinearPlaceholderChecker(instructions.PlaceholderChecker):
        """IFEval's placeholder count (``len(re.findall(r"\\[.*?\\]", value))``) in linear time:
        that regex retries every unclosed "[" to the end of its line, quadratic on hostile text."""

        def check_following(self, value):
            count = 0
            for line in value.split("\n"):  # "." in the regex does not cross a line break
                start = line.find("[")
                while start >= 0:
                    end = line.find("]", start + 1)
                    if end < 0:  # no later "[" on this line can close either
                        break
                    count += 1
                    start = line.find("[", end + 1)
            return count >= self._num_placeholders

    # Registered in lm-eval's own table, so the IFEval benchmark and the reward both use it.
    instructions_registry.INSTRUCTION_DICT["detectable_content:number_placeholders"] = LinearPlaceholderChecker
    return instructions_registry, utils


def instruction_registry() -> dict[str, type]:
    return _ifeval()[0].INSTRUCTION_DICT


def instruction_conflicts() -> dict[str, set[str]]:
    return _ifeval()[0].INSTRUCTION_CONFLICTS


def clean_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """What lm-eval passes to ``build_description``: falsy values dropped."""
    return {k: v for k, v in kwargs.items() if v}


def describe(instruction_id: str, kwargs: dict[str, Any], prompt: str | None = None) -> str:
    """The instruction's sentence as IFEval words it, for the given arguments."""
    cls = instruction_registry()[instruction_id]
    instruction = cls(instruction_id)
    text = instruction.build_description(**clean_kwargs(kwargs))
    if prompt is not None and "prompt" in (instruction.get_instruction_args() or {}):
        text = instruction.build_description(prompt=prompt)
    return text


# The checkers (sentence tokenising, language detection) cost more than linear time on some
# inputs; a response is checked on its first this many characters: four times a 1,024-token
# completion (paper.yaml's max_completion_length) at ~4 characters a token, and twice IFEval's
# longest ask (~1,000 words), so only junk is cut. Some lm-eval checkers stay superlinear
# below it (see bench/README.md, reward_hostile).
MAX_CHECKED_CHARS = 16_384


def follows(prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[dict], response: str,
            *, loose: bool = False) -> list[bool]:
    """Per-instruction compliance of ``response``, strict or loose, exactly as IFEval scores it
    (on its first MAX_CHECKED_CHARS characters)."""
    _, utils = _ifeval()
    response = response[:MAX_CHECKED_CHARS]
    example = utils.InputExample(key=0, instruction_id_list=list(instruction_ids), prompt=prompt,
                                 kwargs=[dict(k) for k in kwargs])
    scorer = utils.test_instruction_following_loose if loose else utils.test_instruction_following_strict
    return list(scorer(example, response).follow_instruction_list)

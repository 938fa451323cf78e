"""The composite reward of section 4.3, as TRL reward functions.

Each component is a callable with TRL's signature ``(prompts, completions, **columns) ->
list[float | None]``: completions may be plain strings or chat messages, dataset columns
arrive as keyword lists, and ``None`` marks a component that does not apply to a sample
(TRL turns it into NaN and sums the weighted components with ``nansum``):

- ``AccuracyReward`` (eq. 7): 1 when the extracted answer letter equals the ``answer``
  column, else 0; not applicable to prompts without an ``answer``.
- ``InstructionReward`` (eq. 9): the fraction of the prompt's IFEval constraints
  (``instruction_id_list`` + ``kwargs`` columns) the completion satisfies, scored by IFEval's
  own checker, strict or loose; not applicable to prompts without constraints.
- ``ReasoningReward`` (eq. 8): sigmoid(PRM score) + gamma * min(len(o), L_target), the PRM
  score being the mean (or min) margin over the completion's reasoning steps and its
  conclusion (``balancedbio.prm.reasoning_steps``); 0 for a completion with no reasoning
  step; applies to medical prompts.

After each call a component holds ``last_success`` (per sample: True / False / None), which
the PID weight controller reads, and running counters in ``stats`` (parse failures etc.).
No component raises on any completion: junk scores 0 and is counted.
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any, Sequence

from balancedbio.answers import extract_choice

log = logging.getLogger(__name__)


def completion_text(completion: Any) -> str:
    """Text of a completion given as a string or as a list of chat messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        return "\n".join(str(m.get("content", "")) for m in completion if isinstance(m, dict)
                         and m.get("role", "assistant") == "assistant")
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    return ""


def prompt_text(prompt: Any) -> str:
    """The last user turn of a chat prompt, or the prompt string itself."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [str(m.get("content", "")) for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return users[-1] if users else ""
    return ""


def _column(columns: dict, name: str, n: int) -> list:
    values = columns.get(name)
    return list(values) if values is not None else [None] * n


class RewardComponent:
    """Base class: TRL calls it; it remembers per-sample success and counts failures."""

    name = "reward"

    def __init__(self):
        self.__name__ = self.name  # TRL names reward functions by __name__ in its logs
        self.last_success: list[bool | None] = []
        self.stats: dict[str, int] = {"calls": 0, "samples": 0, "not_applicable": 0}

    def _count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> list[float | None]:
        self._count("calls")
        self._count("samples", len(completions))
        rewards, success = self.score(list(prompts), [completion_text(c) for c in completions], columns)
        self.last_success = success
        self._count("not_applicable", sum(r is None for r in rewards))
        return rewards

    def score(self, prompts: list, texts: list[str], columns: dict) -> tuple[list[float | None], list[bool | None]]:
        raise TypeError(f"{type(self).__name__} must define score()")


class AccuracyReward(RewardComponent):
    """R_acc: exact answer-letter match (optional NLI entailment for open answers)."""

    name = "accuracy"

    def __init__(self, nli_model: str | None = None, nli_threshold: float = 0.5, nli_revision: str | None = None):
        super().__init__()
        self.nli = NLIJudge(nli_model, revision=nli_revision) if nli_model else None
        self.nli_threshold = nli_threshold

    def score(self, prompts, texts, columns):
        answers = _column(columns, "answer", len(texts))
        options = _column(columns, "options", len(texts))
        references = _column(columns, "reference_answer", len(texts))
        rewards: list[float | None] = []
        success: list[bool | None] = []
        open_items = []
        for i, (text, answer, opts) in enumerate(zip(texts, answers, options)):
            if not answer:
                if self.nli is not None and references[i]:
                    open_items.append(i)
                    rewards.append(0.0)
                    success.append(False)
                else:
                    rewards.append(None)
                    success.append(None)
                continue
            extraction = extract_choice(text, opts if isinstance(opts, dict) else None)
            if extraction.letter is None:
                self._count(f"parse_{extraction.status}")
            correct = extraction.letter == str(answer).strip().upper()
            rewards.append(1.0 if correct else 0.0)
            success.append(correct)
        if open_items:
            probs = self.nli.entailment([references[i] for i in open_items], [texts[i] for i in open_items])
            for i, p in zip(open_items, probs):
                rewards[i] = float(p)
                success[i] = p >= self.nli_threshold
        return rewards, success


class NLIJudge:
    """Entailment probability of a reference answer given the completion (a hub NLI model)."""

    def __init__(self, model_id: str, revision: str | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from balancedbio.models import ModelResolutionError, _explain_load_failure, resolve_model

        resolved = resolve_model(model_id)
        # Pinned (rewards.nli_revision) and safetensors only: a hub repo cannot swap in pickled code.
        pin = {"revision": revision} if revision and resolved.kind == "hub" else {}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved.location, **pin)
            self.model = AutoModelForSequenceClassification.from_pretrained(
                resolved.location, use_safetensors=True, **pin).eval()
        except (OSError, ValueError) as err:
            raise _explain_load_failure(resolved, err) from err
        labels = {v.lower(): int(k) for k, v in self.model.config.id2label.items()}
        if "entailment" not in labels:
            raise ModelResolutionError(f"NLI model '{model_id}' has no 'entailment' label ({labels}).")
        self.entailment_id = labels["entailment"]
        self._torch = torch

    def entailment(self, references: list[str], texts: list[str]) -> list[float]:
        with self._torch.inference_mode():
            enc = self.tokenizer(texts, references, truncation=True, max_length=512, padding=True, return_tensors="pt")
            probs = self._torch.softmax(self.model(**enc).logits.float(), dim=-1)
        return probs[:, self.entailment_id].tolist()


class InstructionReward(RewardComponent):
    """R_inst: fraction of the prompt's IFEval constraints met (IFEval's own checker)."""

    name = "instruction"

    def __init__(self, loose: bool = False):
        super().__init__()
        self.loose = loose

    def score(self, prompts, texts, columns):
        from balancedbio.ifeval import follows

        ids_column = _column(columns, "instruction_id_list", len(texts))
        kwargs_column = _column(columns, "kwargs", len(texts))
        raw_prompts = _column(columns, "prompt_text", len(texts))
        rewards: list[float | None] = []
        success: list[bool | None] = []
        for prompt, text, ids, kwargs, raw in zip(prompts, texts, ids_column, kwargs_column, raw_prompts):
            if not ids:
                rewards.append(None)
                success.append(None)
                continue
            try:
                verdicts = follows(raw or prompt_text(prompt), ids, kwargs or [{} for _ in ids], text, loose=self.loose)
            except Exception as err:  # a checker choking on odd input must not stop training
                self._count("checker_errors")
                log.debug("IFEval checker failed on a completion: %s", err)
                verdicts = [False] * len(ids)
            rewards.append(sum(verdicts) / len(verdicts))
            success.append(all(verdicts))
        return rewards, success


class ReasoningReward(RewardComponent):
    """R_reas = sigmoid(PRM score) + gamma * min(len(o), L_target), len in words; 0 when the
    completion has no reasoning step (the length term rewards reasoning, not filler)."""

    name = "reasoning"

    def __init__(self, scorer, *, gamma: float = 0.001, length_target: int = 200, aggregate: str = "mean"):
        super().__init__()
        if aggregate not in {"mean", "min"}:
            raise ValueError(f"reasoning aggregate must be 'mean' or 'min', not {aggregate!r}")
        self.scorer, self.gamma, self.length_target, self.aggregate = scorer, gamma, length_target, aggregate

    def score(self, prompts, texts, columns):
        capability = _column(columns, "capability", len(texts))
        questions = _column(columns, "question", len(texts))
        options = _column(columns, "options", len(texts))
        todo = [i for i, c in enumerate(capability) if c in (None, "medical")]
        rewards: list[float | None] = [None] * len(texts)
        success: list[bool | None] = [None] * len(texts)
        if not todo:
            return rewards, success
        margins = self.scorer.score_completions([questions[i] or prompt_text(prompts[i]) for i in todo],
                                                [texts[i] for i in todo], aggregate=self.aggregate,
                                                options=[options[i] for i in todo])
        for i, margin in zip(todo, margins):
            if margin is None:  # no reasoning step at all
                self._count("no_steps")
                rewards[i], success[i] = 0.0, False
            else:
                length_term = self.gamma * min(_word_count(texts[i], self.length_target), self.length_target)
                rewards[i] = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, margin)))) + length_term
                success[i] = margin > 0
        return rewards, success


def _word_count(text: str, limit: int) -> int:
    """Whitespace-separated words, counted up to ``limit`` (the length term's cap), so a huge
    completion costs no more than a long one."""
    count = 0
    for _ in re.finditer(r"\S+", text):
        count += 1
        if count >= limit:
            break
    return count


def build_reward_functions(reward_config: dict, prm_dir: str | None) -> list[RewardComponent]:
    """The three components in the order accuracy, reasoning, instruction (config-driven)."""
    components: list[RewardComponent] = [AccuracyReward(reward_config.get("nli_model"),
                                                                  nli_revision=reward_config.get("nli_revision"))]
    if prm_dir:
        from balancedbio.prm import PRMScorer

        components.append(ReasoningReward(PRMScorer(prm_dir), gamma=reward_config["gamma"],
                                          length_target=reward_config["length_target"],
                                          aggregate=reward_config["prm_aggregate"]))
    components.append(InstructionReward(loose=reward_config["instruction_mode"] == "loose"))
    return components

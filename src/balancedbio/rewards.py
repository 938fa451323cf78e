"""The composite reward of section 4.3, as TRL reward functions.

Each component is a callable with TRL's signature ``(prompts, completions, **columns) ->
list[float | None]``: completions may be plain strings or chat messages, dataset columns
arrive as keyword lists, and ``None`` marks a component that does not apply to a sample
(TRL turns it into NaN and sums the weighted components with ``nansum``, so a non-finite
score is raised as an error, never returned):

- ``AccuracyReward`` (eq. 7): 1 when the extracted answer letter equals the ``answer``
  column, else 0; not applicable to prompts without an ``answer``.
- ``InstructionReward`` (eq. 9): the fraction of the prompt's IFEval constraints
  (``instruction_id_list`` + ``kwargs`` columns) the completion satisfies, scored by IFEval's
  own checker, strict or loose; not applicable to prompts without constraints.
- ``ReasoningReward`` (eq. 8): sigmoid(PRM score) + gamma * min(len(o), L_target), the PRM
  score being the mean (or min) margin over the completion's distinct reasoning steps
  (``balancedbio.prm.reasoning_steps``, near duplicates once, at most MAX_SCORED_STEPS) with
  the conclusion weighted apart, len(o) its distinct words; 0 for a completion with no
  reasoning step, or with the answer key known and no answer line; applies to medical prompts.
  See the class for why each piece is there.

A component keeps no state between calls. ``evaluate`` returns a ``RewardResult``: the scores,
each sample's success (True / False / None), which the PID weight controller reads, and counters
(parse failures etc.). Called as TRL calls it, it returns the scores and hands the rest to TRL's
hooks: the success flags to ``log_extra`` as the column ``success/<name>`` (``BalancedGRPOTrainer``
reads them there, the completions table shows them), each counter to ``log_metric`` as
``rewards/<name>/<counter>`` (the fraction of the call's samples). No component raises on any
completion: junk scores 0 and is counted.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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


# The log_extra column in which a reward function reports its per-sample success flags.
SUCCESS_COLUMN = "success/{name}"


def success_name(column: str) -> str | None:
    """The reward function a ``log_extra`` column reports success for (None for any other column)."""
    prefix = SUCCESS_COLUMN.format(name="")
    return column[len(prefix):] if column.startswith(prefix) else None


@dataclass(frozen=True)
class RewardResult:
    """One component's verdict on a batch (as open-instruct's ``VerificationResult``, per batch): a score
    per sample (None: the component does not apply), its success for the weight controller (None: does
    not apply) and counters of what went wrong (``parse_hedge``, ``no_steps`` ...)."""

    scores: list[float | None]
    success: list[bool | None]
    counts: dict[str, int] = field(default_factory=dict)


class RewardComponent:
    """Base class: TRL calls it; ``evaluate`` gives the scores, the success flags and the counters."""

    name = "reward"

    def __init__(self):
        self.__name__ = self.name  # TRL names reward functions by __name__ in its logs

    def evaluate(self, prompts: Sequence[Any], completions: Sequence[Any], **columns: Any) -> RewardResult:
        counts: Counter = Counter()
        rewards, success = self.score(list(prompts), [completion_text(c) for c in completions], columns, counts)
        for index, value in enumerate(rewards):
            # TRL reads NaN as "does not apply" (None): a NaN here would silently drop the
            # component, so it is an error, not a score.
            if value is not None and not math.isfinite(value):
                raise FloatingPointError(f"{self.name} reward is {value} for sample {index} of {len(rewards)}; "
                                         f"a reward must be finite (check the rewards.* settings)")
        counts["not_applicable"] += sum(r is None for r in rewards)
        return RewardResult(rewards, success, dict(counts))

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], *,
                 log_extra: Callable[[str, list], None] | None = None,
                 log_metric: Callable[[str, float], None] | None = None, **columns: Any) -> list[float | None]:
        """TRL's reward-function call: the scores; the success flags and counters go to TRL's hooks."""
        result = self.evaluate(prompts, completions, **columns)
        if log_extra is not None:
            log_extra(SUCCESS_COLUMN.format(name=self.name), result.success)
        if log_metric is not None and result.scores:
            for key, count in sorted(result.counts.items()):
                log_metric(f"rewards/{self.name}/{key}", count / len(result.scores))
        return result.scores

    def score(self, prompts: list, texts: list[str], columns: dict, counts: Counter
              ) -> tuple[list[float | None], list[bool | None]]:
        raise TypeError(f"{type(self).__name__} must define score()")


class AccuracyReward(RewardComponent):
    """R_acc: exact answer-letter match (optional NLI entailment for open answers)."""

    name = "accuracy"

    def __init__(self, nli_model: str | None = None, nli_threshold: float = 0.5, nli_revision: str | None = None):
        super().__init__()
        self.nli = NLIJudge(nli_model, revision=nli_revision) if nli_model else None
        self.nli_threshold = nli_threshold

    def score(self, prompts, texts, columns, counts):
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
                counts[f"parse_{extraction.status}"] += 1
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
        from balancedbio.devices import job_device

        # The job's device (under accelerate, "cuda" is this rank's own GPU), not the CPU of a GPU job.
        self.device = job_device()
        self.model.to(self.device)

    def entailment(self, references: list[str], texts: list[str]) -> list[float]:
        with self._torch.inference_mode():
            enc = self.tokenizer(texts, references, truncation=True, max_length=512, padding=True,
                                 return_tensors="pt").to(self.device)
            probs = self._torch.softmax(self.model(**enc).logits.float(), dim=-1)
        return probs[:, self.entailment_id].tolist()


class InstructionReward(RewardComponent):
    """R_inst: fraction of the prompt's IFEval constraints met (IFEval's own checker)."""

    name = "instruction"

    def __init__(self, loose: bool = False):
        super().__init__()
        self.loose = loose

    def score(self, prompts, texts, columns, counts):
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
                counts["checker_errors"] += 1
                log.debug("IFEval checker failed on a completion: %s", err)
                verdicts = [False] * len(ids)
            rewards.append(sum(verdicts) / len(verdicts))
            success.append(all(verdicts))
        return rewards, success


class ReasoningReward(RewardComponent):
    """R_reas = sigmoid(PRM score) + gamma * min(len(o), L_target), made hard to farm:

    - the PRM scores the distinct reasoning steps only: a step whose content words nearly
      repeat an earlier step's (``near_duplicate``) is scored once, and at most
      ``MAX_SCORED_STEPS`` of them (the training chains have 1-6 steps before the conclusion);
      fewer than ``MIN_SCORED_STEPS`` are completed with neutral (0) margins;
    - the PRM score is ``(1 - CONCLUSION_WEIGHT) * aggregate(step margins) + CONCLUSION_WEIGHT *
      conclusion margin``: the conclusion's weight does not shrink as steps are added. Where the
      answer key is known (an ``answer`` column), the conclusion's margin takes the key's sign,
      as the PRM was trained to give it (right letter valid, any other fallacious): at least 0
      for the right letter, at most -1 for a wrong one, a hedge or no answer line, so a wrong
      final letter always lowers R_reas;
    - len(o) counts the distinct words of the scored reasoning steps (not the conclusion, whose
      option text varies by letter), so repeating or padding adds nothing;
    - 0 when the completion has no reasoning step (the length term rewards reasoning, not filler);
    - 0 when the answer key is known and the completion never reaches an answer line (counted as
      ``no_answer_line``): a chain that does not conclude answers nothing. Scored as a wrong letter
      (the margin's -1), its steps and length term still paid, so under a completion budget the
      policy learnt to write steps instead of answers (the 2026-12-05 evidence run: held-out answer
      lines within 64 tokens fell from 95 to 20 of 225 while R_reas rose and R_acc halved).
    """

    name = "reasoning"

    def __init__(self, scorer, *, gamma: float = 0.001, length_target: int = 200, aggregate: str = "mean"):
        super().__init__()
        if aggregate not in {"mean", "min"}:
            raise ValueError(f"rewards.prm_aggregate must be 'mean' or 'min', not {aggregate!r}")
        if not (isinstance(gamma, (int, float)) and math.isfinite(gamma)):
            raise ValueError(f"rewards.gamma must be a finite number, not {gamma!r}")
        self.scorer, self.gamma, self.length_target, self.aggregate = scorer, gamma, length_target, aggregate

    def score(self, prompts, texts, columns, counts):
        from balancedbio.prm import build_input, margins

        capability = _column(columns, "capability", len(texts))
        questions = _column(columns, "question", len(texts))
        options = _column(columns, "options", len(texts))
        keys = _column(columns, "answer", len(texts))
        todo = [i for i, c in enumerate(capability) if c in (None, "medical")]
        rewards: list[float | None] = [None] * len(texts)
        success: list[bool | None] = [None] * len(texts)
        plans = {i: scored_steps(questions[i] or prompt_text(prompts[i]), texts[i], options[i]) for i in todo}
        pairs, owners = [], []
        for i, (steps, conclusion, _) in plans.items():
            question = questions[i] or prompt_text(prompts[i])
            for k, step in enumerate(steps + ([conclusion] if conclusion else [])):
                pairs.append(build_input(question, steps[:k], step))
                owners.append(i)
        per_step = margins(self.scorer.predict_proba(pairs)) if pairs else []
        by_owner: dict[int, list[float]] = {}
        for owner, value in zip(owners, per_step):
            by_owner.setdefault(owner, []).append(float(value))
        for i, (steps, conclusion, letter) in plans.items():
            if not steps:
                counts["no_steps"] += 1
                rewards[i], success[i] = 0.0, False
                continue
            key = keys[i].strip().upper() if isinstance(keys[i], str) and keys[i].strip() else None
            if key is not None and conclusion is None:
                counts["no_answer_line"] += 1
                rewards[i], success[i] = 0.0, False
                continue
            values = by_owner[i]
            if not all(math.isfinite(v) for v in values):
                raise FloatingPointError(f"reasoning reward: the PRM gave a non-finite step margin ({values}) for "
                                         f"sample {i}; its weights are probably NaN (retrain the PRM)")
            body = values[:len(steps)]
            concluded = values[len(steps)] if conclusion else 0.0
            if key is not None:
                concluded = max(concluded, 0.0) if letter == key else min(concluded, 0.0) - 1.0
            # Missing steps below MIN_SCORED_STEPS count as neutral (0): one good fact alone is no chain.
            body = body + [0.0] * (MIN_SCORED_STEPS - len(body))
            aggregated = min(body) if self.aggregate == "min" else sum(body) / len(body)
            margin = (1.0 - CONCLUSION_WEIGHT) * aggregated + CONCLUSION_WEIGHT * concluded
            # Over the reasoning steps, not the conclusion: its option text's length is no reasoning.
            length_term = self.gamma * min(distinct_word_count(steps, self.length_target), self.length_target)
            rewards[i] = 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, margin)))) + length_term
            success[i] = margin > 0
        return rewards, success


CONCLUSION_WEIGHT = 0.5  # of the PRM score, however many steps precede the conclusion
# The PRM's training chains (data/reasoning.py build_chains) have 1 to 6 steps before their
# conclusion; more distinct steps than this are not scored (the PRM has not seen such chains).
MAX_SCORED_STEPS = 8
# The SFT targets write at least two facts before the answer; a completion with fewer distinct
# steps has the missing ones scored neutral (margin 0), so the best single fact, written once
# or thirty times, does not outscore a sound chain (measured on the default PRM: it did on 35 of 40).
MIN_SCORED_STEPS = 2
NEAR_DUPLICATE = 0.75  # Jaccard similarity of two steps' content words at or above which they are one step
_NEGATION = re.compile(r"\b(?:not|no|never|cannot|without)\b|n't\b", re.IGNORECASE)


def _step_signature(step: str) -> frozenset[str]:
    from balancedbio.prm import content_words

    # Numbers say nothing a step needs to differ by ("fact 1", "fact 2"); a negation does.
    words = {w for w in content_words(step) if not w.isdigit()}
    return frozenset(words | ({"<not>"} if _NEGATION.search(step) else set()))


def near_duplicate(a: frozenset[str], b: frozenset[str]) -> bool:
    union = a | b
    return bool(union) and len(a & b) / len(union) >= NEAR_DUPLICATE


def scored_steps(question: str, text: str, options: object) -> tuple[list[str], str | None, str | None]:
    """(distinct reasoning steps, conclusion step or None, the letter it names or None): what
    the PRM scores for a completion. The steps are ``prm.reasoning_steps`` without near
    duplicates, at most MAX_SCORED_STEPS; the conclusion is the last of them when the
    completion ends in an answer line."""
    from balancedbio.prm import completion_parts, parse_options, reasoning_steps

    options = options if isinstance(options, dict) and options else parse_options(question or "")
    steps = reasoning_steps(question, text, options)
    answer_line = completion_parts(text)[1] if steps else None
    conclusion = steps.pop() if answer_line is not None else None
    kept: list[str] = []
    signatures: list[frozenset[str]] = []
    for step in steps:
        signature = _step_signature(step)
        if any(near_duplicate(signature, seen) for seen in signatures):
            continue
        kept.append(step)
        signatures.append(signature)
        if len(kept) == MAX_SCORED_STEPS:
            break
    letter = extract_choice(answer_line, options or None).letter if answer_line else None
    return kept, conclusion, letter


def distinct_word_count(steps: Sequence[str], limit: int) -> int:
    """Distinct words (lower-cased) of the scored steps, counted up to ``limit`` (the length
    term's cap): what a completion says, not how often it says it."""
    seen: set[str] = set()
    for step in steps:
        for match in re.finditer(r"\w+", step.lower()):
            seen.add(match.group())
            if len(seen) >= limit:
                return limit
    return len(seen)


def build_reward_functions(reward_config: dict, prm_dir: str | None) -> list[RewardComponent]:
    """The three components in the order accuracy, reasoning, instruction (config-driven)."""
    components: list[RewardComponent] = [AccuracyReward(reward_config.get("nli_model"),
                                                                  nli_revision=reward_config.get("nli_revision"))]
    if prm_dir:
        components.append(reasoning_reward(reward_config, prm_dir))
    components.append(InstructionReward(loose=reward_config["instruction_mode"] == "loose"))
    return components


def reasoning_reward(reward_config: dict, prm_dir: str) -> ReasoningReward:
    """R_reas with the trained PRM at ``prm_dir`` and the config's rewards.gamma / length_target / prm_aggregate."""
    from balancedbio.prm import PRMScorer

    return ReasoningReward(PRMScorer(prm_dir), gamma=reward_config["gamma"],
                           length_target=reward_config["length_target"], aggregate=reward_config["prm_aggregate"])

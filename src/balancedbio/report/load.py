"""Reading the run's declared result files into ``RunData`` and tidy DataFrames, and the
compared capabilities (``COMPARED_CAPABILITIES``: what the report compares between models, item
by item). Not to be confused with ``balancedbio.grpo.sampler.CAPABILITIES``, the two prompt
kinds GRPO trains on."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from balancedbio.io import read_jsonl

log = logging.getLogger(__name__)

MEDICAL = ("mmlu_med", "medqa", "cmexam")  # "BIOMED overall": the public medical benchmarks, pooled
IF_BENCHMARKS = ("ifeval", "ifbench")  # scored alike: prompt/instruction x strict/loose
IF_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
GENERAL_METRIC = "prompt_level_strict_acc"  # IFEval strict, the paper's P(gen)
TIDY_COLUMNS = ["model", "benchmark", "metric", "value", "n", "ci_low", "ci_high"]


def _read_json(path: str | Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None


def _items_path(path: str | Path) -> Path:
    """results/eval/m/ifeval.json -> results/eval/m/ifeval.items.jsonl (the evaluate rule's naming)."""
    path = Path(path)
    return path.with_name(path.stem + ".items.jsonl")


def _declared_items(json_files: Iterable[str], item_files: Iterable[str]) -> dict[str, Path | None]:
    declared = {Path(p).resolve(): Path(p) for p in item_files}
    return {str(p): declared.get(_items_path(p).resolve()) for p in json_files}


# -- loading the declared inputs -------------------------------------------------------------

def load_results(result_files: Iterable[str], item_files: Iterable[str]) -> dict[str, dict[str, dict]]:
    """{model: {benchmark: result json (+ "_items")}} for exactly the given result files.

    An evaluated result must come with its ``.items.jsonl`` among ``item_files``: the paired
    differences need the items, and a result read without them would silently drop out."""
    result_files = [str(p) for p in result_files]
    items_of = _declared_items(result_files, item_files)
    results: dict[str, dict[str, dict]] = {}
    for path in result_files:
        result = _read_json(path)
        for key in ("model", "benchmark", "status"):
            if key not in result:
                raise ValueError(f"{path}: evaluation result without {key!r}")
        items_file = items_of[path]
        if result["status"] == "ok" and items_file is None:
            raise ValueError(f"{path}: its items file {_items_path(path)} is not among the report's inputs")
        result["_items"] = list(read_jsonl(items_file)) if items_file is not None else []
        results.setdefault(result["model"], {})[result["benchmark"]] = result
    return results


def load_heldout(summary_files: Iterable[str], item_files: Iterable[str]) -> dict[str, dict]:
    """{model: {"summary": heldout_rewards.json, "items": {"component:id": reward}, "answers": [(answered,
    reward, chance)] of its R_acc rows (empty for items written before rows said whether they answered)}}."""
    summary_files = [str(p) for p in summary_files]
    items_of = _declared_items(summary_files, item_files)
    heldout = {}
    for path in summary_files:
        summary = _read_json(path)
        if "model" not in summary or "status" not in summary:
            raise ValueError(f"{path}: held-out reward summary without 'model' or 'status'")
        items: dict[str, float] = {}
        answers: list[tuple[bool, float, float]] = []
        items_file = items_of[path]
        if summary["status"] == "ok" and items_file is None:
            raise ValueError(f"{path}: its items file {_items_path(path)} is not among the report's inputs")
        for line, row in enumerate(read_jsonl(items_file) if items_file is not None else (), start=1):
            try:
                key = f"{row['component']}:{row['id']}"
                reward = float(row["reward"])
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{items_file}: row {line} needs id, component and a numeric reward ({err})") from None
            if key in items:
                raise ValueError(f"{items_file}: row {line} repeats {key}")
            items[key] = reward
            if row["component"] == "accuracy" and "answered" in row:
                try:
                    answers.append((bool(row["answered"]), reward, float(row["chance"])))
                except (KeyError, TypeError, ValueError) as err:
                    raise ValueError(f"{items_file}: row {line} says whether it answered but needs a numeric "
                                     f"chance too ({err})") from None
        heldout[summary["model"]] = {"summary": summary, "items": items, "answers": answers}
    return heldout


def load_dynamics(dynamics_files: Iterable[str]) -> dict[str, list[dict]]:
    """{variant: rows} from results/grpo_{variant}/dynamics.jsonl files (the folder names the variant)."""
    dynamics = {}
    for path in map(Path, dynamics_files):
        if not path.parent.name.startswith("grpo_"):
            raise ValueError(f"{path}: a dynamics file must lie in a grpo_<variant> folder")
        dynamics[path.parent.name[len("grpo_"):]] = list(read_jsonl(path))
    return dynamics


def model_order(models) -> list[str]:
    def key(name: str):
        rank = {"base": 0, "sft": 1, "grpo_full": 2}.get(name, 3)
        return rank, name

    return sorted(models, key=key)


@dataclass
class RunData:
    results: dict[str, dict[str, dict]]
    heldout: dict[str, dict] = field(default_factory=dict)
    dynamics: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return model_order(set(self.results) | set(self.heldout))

    def result(self, model: str, benchmark: str) -> dict | None:
        result = self.results.get(model, {}).get(benchmark)
        return result if result and result.get("status") == "ok" else None


# -- tidy frames: one row per (model, benchmark, metric) ----------------------------------------

def results_frame(data: RunData):
    """Every metric of every evaluated result as one tidy DataFrame (``TIDY_COLUMNS``); the
    instruction-level metrics count instructions, the others items."""
    import pandas as pd

    rows = []
    for model in data.models:
        for benchmark, result in sorted(data.results.get(model, {}).items()):
            if result.get("status") != "ok":
                continue
            for metric, value in result["metrics"].items():
                if not isinstance(value, dict):
                    continue
                n = result["metrics"].get("n_instructions") if metric.startswith("inst_") else result["n"]
                rows.append({"model": model, "benchmark": benchmark, "metric": metric, "value": value["value"],
                             "n": n, "ci_low": value["ci95"][0], "ci_high": value["ci95"][1]})
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


def subjects_frame(data: RunData):
    """MMLU-med accuracy per subject (benchmark ``mmlu_med/<subject>``), tidy like ``results_frame``."""
    import pandas as pd

    rows = []
    for model in data.models:
        mmlu = data.result(model, "mmlu_med")
        for subject, v in (mmlu.get("per_subject") or {}).items() if mmlu else ():
            rows.append({"model": model, "benchmark": f"mmlu_med/{subject}", "metric": "acc", "value": v["acc"],
                         "n": v["n"], "ci_low": v["ci95"][0], "ci_high": v["ci95"][1]})
    return pd.DataFrame(rows, columns=TIDY_COLUMNS)


# -- item-level scores per capability ----------------------------------------------------------

def _medical_items(data: RunData, model: str) -> dict[str, float]:
    scores = {}
    for benchmark in MEDICAL:
        result = data.result(model, benchmark)
        for item in result["_items"] if result else ():
            scores[f"{benchmark}:{item['task']}:{item['doc_id']}"] = float(item["correct"])
    return scores


def _mcq_items(benchmark: str) -> Callable[[RunData, str], dict[str, float]]:
    def scores(data: RunData, model: str) -> dict[str, float]:
        result = data.result(model, benchmark)
        return {f"{benchmark}:{i['doc_id']}": float(i["correct"]) for i in result["_items"]} if result else {}
    return scores


def _instruction_items(benchmark: str) -> Callable[[RunData, str], dict[str, float]]:
    def scores(data: RunData, model: str) -> dict[str, float]:
        result = data.result(model, benchmark)
        return ({f"{benchmark}:{i['doc_id']}": float(bool(i[GENERAL_METRIC])) for i in result["_items"]}
                if result else {})
    return scores


def _heldout_items(component: str) -> Callable[[RunData, str], dict[str, float]]:
    def scores(data: RunData, model: str) -> dict[str, float]:
        entry = data.heldout.get(model)
        if not entry or entry["summary"].get("status") != "ok":
            return {}
        return {k: v for k, v in entry["items"].items() if k.split(":", 1)[0] == component}
    return scores


@dataclass(frozen=True)
class ComparedCapability:
    key: str
    label: str
    scores: Callable[[RunData, str], dict[str, float]]
    accuracy: bool = True  # shown in points (x100); rewards stay on their own scale


COMPARED_CAPABILITIES = (
    ComparedCapability("biomed", "BIOMED accuracy (MMLU-med+MedQA+CMExam)", _medical_items),
    ComparedCapability("kg_mcq", "kg_mcq accuracy", _mcq_items("kg_mcq")),
    ComparedCapability("ifeval", "IFEval prompt strict", _instruction_items("ifeval")),
    ComparedCapability("ifbench", "IFBench prompt strict", _instruction_items("ifbench")),
    ComparedCapability("heldout_accuracy", "held-out accuracy reward", _heldout_items("accuracy"), accuracy=False),
    ComparedCapability("heldout_reasoning", "held-out reasoning reward", _heldout_items("reasoning"), accuracy=False),
    ComparedCapability("heldout_instruction", "held-out instruction reward", _heldout_items("instruction"), accuracy=False),
)
COMPARED_CAPABILITY = {c.key: c for c in COMPARED_CAPABILITIES}



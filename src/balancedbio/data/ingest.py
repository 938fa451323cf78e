"""Optional external datasets (hub id or local file) mapped into the project's row schemas.

Each dataset is declared in the config with a small field mapping, e.g.::

    - name: medqa_train
      source: GBaker/MedQA-USMLE-4-options     # hub id, or a local .jsonl/.json/.parquet/.csv
      split: train
      schema: mcq                              # mcq | instruct | steps | sft
      fields: {question: question, options: options, answer: answer_idx}

Malformed rows are skipped and counted, the first few logged with their file and line. A
dataset that cannot be reached (offline, missing file) is recorded as unavailable with the
reason, so the rest of the workflow goes on, unless it is marked ``required``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Iterator

from balancedbio.data.formatting import LETTERS
from balancedbio.data.reasoning import LABELS

log = logging.getLogger(__name__)
SCHEMAS = ("mcq", "instruct", "steps", "sft")
MAX_LOGGED_BAD_ROWS = 5


class IngestError(RuntimeError):
    """An external dataset cannot be used; the message names it."""


class DatasetUnavailable(IngestError):
    """The dataset cannot be reached (offline hub, missing file): skippable unless required."""


class RowError(ValueError):
    pass


def _get(row: dict, fields: dict, name: str, default: Any = ...) -> Any:
    column = fields.get(name, name)
    if column in row and row[column] is not None:
        return row[column]
    if default is not ...:
        return default
    raise RowError(f"missing field '{column}'")


def map_mcq(row: dict, fields: dict, **_: Any) -> dict:
    question = _get(row, fields, "question")
    options = _get(row, fields, "options")
    if isinstance(options, list):
        options = {LETTERS[i]: str(o) for i, o in enumerate(options)}
    if not isinstance(options, dict) or not 2 <= len(options) <= len(LETTERS):
        raise RowError("options must be a list or a letter->text mapping of 2-5 items")
    options = {str(k).strip().upper(): str(v) for k, v in options.items()}
    answer = _get(row, fields, "answer")
    if isinstance(answer, int) or (isinstance(answer, str) and answer.strip().isdigit()):
        index = int(answer)
        if not 0 <= index < len(options):
            raise RowError(f"answer index {index} out of range")
        answer = list(options)[index]
    elif isinstance(answer, str) and answer.strip().upper() in options:
        answer = answer.strip().upper()
    elif isinstance(answer, str) and answer in options.values():
        answer = next(k for k, v in options.items() if v == answer)
    else:
        raise RowError(f"answer {answer!r} is neither a letter, an index nor an option text")
    if not isinstance(question, str) or not question.strip():
        raise RowError("empty question")
    return {"question": question.strip(), "options": options, "answer": answer, "answer_text": options[answer],
            "kind": "external", "split": "train"}


def map_instruct(row: dict, fields: dict, **_: Any) -> dict:
    from balancedbio.ifeval import instruction_registry

    prompt = _get(row, fields, "prompt")
    ids = _get(row, fields, "instruction_id_list", [])
    kwargs = _get(row, fields, "kwargs", [{} for _ in ids])
    if not isinstance(prompt, str) or not prompt.strip():
        raise RowError("empty prompt")
    unknown = [i for i in ids if i not in instruction_registry()]
    if unknown or len(kwargs) != len(ids):
        raise RowError(f"unknown instruction ids {unknown}" if unknown else "kwargs and instruction_id_list differ in length")
    return {"prompt": prompt.strip(), "instruction_id_list": list(ids), "kwargs": [dict(k or {}) for k in kwargs],
            "capability": "instruction" if ids else "general"}


def map_steps(row: dict, fields: dict, label_map: dict | None = None, **_: Any) -> dict:
    question = _get(row, fields, "question")
    steps = _get(row, fields, "steps")
    labels = _get(row, fields, "labels")
    if not isinstance(steps, list) or not isinstance(labels, list) or len(steps) != len(labels) or not steps:
        raise RowError("steps and labels must be non-empty lists of equal length")
    label_map = {str(k): v for k, v in (label_map or {}).items()}
    mapped = [label_map.get(str(label), label) for label in labels]
    bad = [m for m in mapped if m not in LABELS]
    if bad:
        raise RowError(f"labels {bad[:3]} are not in {LABELS} (declare a label_map)")
    return {"question": str(question), "steps": [{"text": str(t), "label": m, "fact": None}
                                                 for t, m in zip(steps, mapped)], "split": "train"}


def map_sft(row: dict, fields: dict, **_: Any) -> dict:
    if "messages" in fields or "messages" in row:
        messages = _get(row, fields, "messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= m.keys()
                                                     for m in messages):
            raise RowError("messages must be a list of {role, content}")
    else:
        messages = [{"role": "user", "content": str(_get(row, fields, "prompt"))},
                    {"role": "assistant", "content": str(_get(row, fields, "response"))}]
    if not any(m["role"] == "assistant" and str(m["content"]).strip() for m in messages):
        raise RowError("no non-empty assistant turn")
    return {"messages": [{"role": m["role"], "content": str(m["content"])} for m in messages]}


MAPPERS = {"mcq": map_mcq, "instruct": map_instruct, "steps": map_steps, "sft": map_sft}


def _iter_local(path: Path, split: str) -> Iterator[tuple[str, Any]]:
    """(location, row) pairs; for JSON Lines the location is file:line and bad JSON is a bad row."""
    if path.suffix == ".jsonl":
        # Decoded line by line: a bad byte costs its line, not the whole file.
        with path.open("rb") as handle:
            for number, raw in enumerate(handle, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    yield f"{path}:{number}", RowError(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column "
                                                       f"{err.start + 1})")
                    continue
                if line.strip():
                    try:
                        yield f"{path}:{number}", json.loads(line)
                    except json.JSONDecodeError as err:
                        yield f"{path}:{number}", RowError(f"not valid JSON ({err.msg} at column {err.colno})")
                    except RecursionError:
                        yield f"{path}:{number}", RowError("JSON nested too deeply")
        return
    import datasets

    builder = {".json": "json", ".parquet": "parquet", ".csv": "csv"}.get(path.suffix)
    if builder is None:
        raise IngestError(f"dataset file '{path}' has an unsupported extension (use .jsonl, .json, .parquet, .csv)")
    for index, row in enumerate(datasets.load_dataset(builder, data_files=str(path), split="train")):
        yield f"{path} row {index + 1}", row


def _iter_hub(source: str, subset: str | None, split: str) -> Iterator[tuple[str, Any]]:
    import datasets

    dataset = datasets.load_dataset(source, subset, split=split)
    for index, row in enumerate(dataset):
        yield f"{source}[{split}] row {index}", row


def ingest(spec: dict) -> tuple[list[dict], dict]:
    """Load and map one declared dataset; returns (rows, status). Raises IngestError when unusable."""
    name, source, schema = spec["name"], spec["source"], spec["schema"]
    if schema not in MAPPERS:
        raise IngestError(f"dataset '{name}': schema '{schema}' is not one of {SCHEMAS}")
    mapper = MAPPERS[schema]
    local = Path(source).expanduser()
    looks_local = local.exists() or source.startswith(("/", "./", "../", "~")) or local.suffix in {".jsonl", ".json", ".parquet", ".csv"}
    if looks_local and not local.exists():
        raise DatasetUnavailable(f"dataset '{name}': local file '{source}' does not exist")
    try:
        rows_in = _iter_local(local, spec.get("split", "train")) if looks_local else \
            _iter_hub(source, spec.get("subset"), spec.get("split", "train"))
        rows: list[dict] = []
        bad, examples, seen = 0, [], 0
        limit = spec.get("limit")
        for location, raw in rows_in:
            if limit and len(rows) >= limit:
                break
            seen += 1
            try:
                if isinstance(raw, Exception):
                    raise raw
                if not isinstance(raw, dict):
                    raise RowError(f"expected an object, got {type(raw).__name__}")
                row = mapper(raw, spec.get("fields") or {}, label_map=spec.get("label_map"))
            except RowError as err:
                bad += 1
                if len(examples) < MAX_LOGGED_BAD_ROWS:
                    examples.append(f"{location}: {err}")
                    log.warning("dataset '%s': skipping %s: %s", name, location, err)
                continue
            row["id"] = f"{name}-{len(rows):07d}"
            row["source"] = name
            rows.append(row)
    except IngestError:
        raise
    except Exception as err:  # offline hub, bad parquet, ...: name the dataset and the cause
        raise DatasetUnavailable(f"dataset '{name}' ({source}) could not be loaded: {type(err).__name__}: {err}") from err
    if seen and not rows:
        raise IngestError(f"dataset '{name}': all {seen} rows are malformed; first: {examples[0] if examples else '?'}")
    status = {"name": name, "source": source, "schema": schema, "status": "ok", "rows": len(rows),
              "malformed_rows": bad, "malformed_examples": examples}
    return rows, status

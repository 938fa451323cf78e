"""Decontamination: drop training rows that share n-grams with evaluation benchmark test sets.

Text is lower-cased and tokenised into words (and single CJK characters, so CMExam's Chinese
is covered). A row's overlap is the fraction of its n-grams that occur in any benchmark's
test questions; rows whose overlap exceeds the threshold are dropped (threshold 0: any
shared n-gram, the GPT-3 rule). Benchmark texts shorter than n tokens are matched whole.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from balancedbio.io import read_jsonl

_TOKEN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]|[^\W_]+", re.UNICODE)
# Which fields hold the test question of each benchmark (SOURCES.md).
BENCHMARK_TEXT_FIELDS = {"mmlu_med": ("question",), "medqa": ("question",), "cmexam": ("question",),
                         "ifeval": ("prompt",), "ifbench": ("prompt",), "kg_mcq": ("question",)}


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def _hash(gram: tuple[str, ...]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(gram).encode("utf-8"), digest_size=8).digest(), "big")


def ngram_hashes(text: str, n: int) -> set[int]:
    toks = tokens(text)
    if len(toks) < n:
        return {_hash(tuple(toks))} if toks else set()
    return {_hash(tuple(toks[i:i + n])) for i in range(len(toks) - n + 1)}


@dataclass
class BenchmarkIndex:
    n: int
    grams: dict[int, set[str]] = field(default_factory=dict)  # n-gram hash -> benchmark names
    short: dict[str, str] = field(default_factory=dict)  # whole short text -> benchmark name
    sizes: dict[str, int] = field(default_factory=dict)

    def add(self, benchmark: str, texts: Iterable[str]) -> None:
        count = 0
        for text in texts:
            count += 1
            toks = tokens(text)
            if len(toks) < self.n:
                if toks:
                    self.short[" ".join(toks)] = benchmark
                continue
            for gram in ngram_hashes(text, self.n):
                self.grams.setdefault(gram, set()).add(benchmark)
        self.sizes[benchmark] = self.sizes.get(benchmark, 0) + count

    def overlap(self, text: str) -> dict[str, float]:
        """Per benchmark, the fraction of the text's n-grams found in its test questions (> 0 only)."""
        grams = ngram_hashes(text, self.n)
        matched: dict[str, int] = {}
        for gram in grams:
            for benchmark in self.grams.get(gram, ()):
                matched[benchmark] = matched.get(benchmark, 0) + 1
        fractions = {b: c / len(grams) for b, c in matched.items()}
        joined = " ".join(tokens(text))
        for short_text, benchmark in self.short.items():
            if len(short_text) > 20 and short_text in joined:  # a whole short question inside the row
                fractions[benchmark] = max(fractions.get(benchmark, 0.0), 1.0 / max(len(grams), 1))
        return fractions


def load_benchmark_texts(benchmarks_dir: str | Path | None, names: Iterable[str]) -> dict[str, list[str]]:
    """Test-set question texts of each benchmark found under ``benchmarks_dir`` (missing ones are skipped)."""
    found: dict[str, list[str]] = {}
    if not benchmarks_dir:
        return found
    for name in names:
        path = Path(benchmarks_dir) / name / "test.jsonl"
        if not path.is_file():
            continue
        fields = BENCHMARK_TEXT_FIELDS.get(name, ("question", "prompt"))
        found[name] = [next((row[f] for f in fields if row.get(f)), "") for row in read_jsonl(path)]
    return found


def row_text(row: dict) -> str:
    """All the text a training row would show a model.

    Generated instruction prompts are checked on their task (``task``), not on the constraint
    sentences: those are IFEval's own instruction wording, shared with its test prompts by
    design (the same verifier scores both) and no leak of test content.
    """
    parts: list[str] = []
    if isinstance(row.get("task"), str):
        parts.append(row["task"])
    for key in ("question", "prompt"):
        if isinstance(row.get(key), str) and "task" not in row:
            parts.append(row[key])
    if isinstance(row.get("options"), dict):
        parts.extend(str(v) for v in row["options"].values())
    for step in row.get("steps") or []:
        parts.append(step["text"] if isinstance(step, dict) else str(step))
    for message in row.get("messages") or []:
        if "task" in row and message.get("role") == "user":
            continue
        parts.append(str(message.get("content", "")))
    return "\n".join(parts)


def decontaminate(rows: list[dict], index: BenchmarkIndex, threshold: float,
                  exempt: set[str] = frozenset()) -> tuple[list[dict], dict]:
    """Rows kept, and counts: total, dropped, dropped per benchmark, examples of dropped ids.

    ``exempt`` names benchmarks a row may overlap (the kg_mcq test split's own reasoning chains).
    """
    kept: list[dict] = []
    dropped_by: dict[str, int] = {}
    examples: list[str] = []
    for row in rows:
        hits = {b for b, fraction in index.overlap(row_text(row)).items() if fraction > threshold and b not in exempt}
        if hits:
            for benchmark in hits:
                dropped_by[benchmark] = dropped_by.get(benchmark, 0) + 1
            if len(examples) < 10:
                examples.append(str(row.get("id", row.get("key"))))
            continue
        kept.append(row)
    return kept, {"total": len(rows), "kept": len(kept), "dropped": len(rows) - len(kept),
                  "dropped_by_benchmark": dropped_by, "dropped_examples": examples}

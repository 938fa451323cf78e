"""Per-rule wall time and peak memory of a finished run, from Snakemake's ``benchmark:`` files.

    .venv/bin/python bench/rule_times.py            # reads benchmarks/**/*.tsv of the last run

Prints a markdown table (rule, jobs, total seconds, max peak RSS) and writes it to
bench/results/rule_times.md. Jobs of one rule (e.g. 20 evaluations) are summed.
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "benchmarks"
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
    for path in sorted(root.rglob("*.tsv")):
        if path.parent != root:  # benchmarks/evaluate/{model}_{benchmark}.tsv
            rule = path.parent.name
        elif path.stem.startswith("grpo_"):
            rule = f"grpo ({path.stem[len('grpo_'):]})"
        else:
            rule = path.stem
        with path.open() as handle:
            row = next(csv.DictReader(handle, delimiter="\t"))
        entry = totals[rule]
        entry[0] += 1
        entry[1] += float(row["s"])
        entry[2] = max(entry[2], float(row["max_rss"]) if row["max_rss"] not in ("", "NA", "-") else 0.0)
    lines = ["| rule | jobs | seconds (sum) | peak RSS (MB) |", "|---|---:|---:|---:|"]
    for rule, (jobs, seconds, rss) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"| {rule} | {jobs} | {seconds:.1f} | {rss:.0f} |")
    total = sum(v[1] for v in totals.values())
    lines.append(f"| **sum of all jobs** | {sum(v[0] for v in totals.values())} | **{total:.0f}** | |")
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "rule_times.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The run's report: the paper's tables and figures from this run's results (Table 1-3, Figures
2-4, eq. 2), as CSV, Markdown and one self-contained HTML page.

Every number comes from a result file; intervals are 95%: Wilson intervals for single
accuracies (from the evaluation files) and paired bootstrap intervals over the shared items for
differences between two models (the alignment tax and the domain gain), so the wording can say
"not significant" whenever an interval contains 0.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import random
from pathlib import Path
from typing import Any

from balancedbio.evaluation import wilson_interval
from balancedbio.io import read_jsonl

log = logging.getLogger(__name__)

MEDICAL = ("mmlu_med", "medqa", "cmexam")  # "BIOMED overall": the public medical benchmarks, pooled
GENERAL_METRIC = "prompt_level_strict_acc"  # IFEval strict, the paper's P(gen)
TIDY_COLUMNS = ["model", "benchmark", "metric", "value", "n", "ci_low", "ci_high"]
BOOTSTRAP = 2000


def _read_jsonl(path: Path) -> list[dict]:
    return list(read_jsonl(path)) if path.exists() else []


def load_results(eval_dir: Path) -> dict[str, dict[str, dict]]:
    """{model: {benchmark: result json (+ "_items")}} for every result file under eval_dir."""
    results: dict[str, dict[str, dict]] = {}
    for path in sorted(eval_dir.glob("*/*.json")):
        result = json.loads(path.read_text(encoding="utf-8"))
        result["_items"] = _read_jsonl(path.with_name(path.stem + ".items.jsonl"))
        results.setdefault(result["model"], {})[result["benchmark"]] = result
    return results


def model_order(models) -> list[str]:
    def key(name: str):
        rank = {"base": 0, "sft": 1, "grpo_full": 2}.get(name, 3)
        return rank, name

    return sorted(models, key=key)


def tidy_rows(results: dict) -> list[dict]:
    rows = []
    for model in model_order(results):
        for benchmark, result in sorted(results[model].items()):
            if result.get("status") != "ok":
                continue
            for metric, value in result["metrics"].items():
                if not isinstance(value, dict):
                    continue
                n = result["metrics"].get("n_instructions") if metric.startswith("inst_") else result["n"]
                rows.append({"model": model, "benchmark": benchmark, "metric": metric, "value": value["value"],
                             "n": n, "ci_low": value["ci95"][0], "ci_high": value["ci95"][1]})
    return rows


def subject_rows(results: dict) -> list[dict]:
    rows = []
    for model in model_order(results):
        mmlu = results[model].get("mmlu_med")
        if mmlu and mmlu.get("status") == "ok":
            for subject, v in mmlu["per_subject"].items():
                rows.append({"model": model, "benchmark": f"mmlu_med/{subject}", "metric": "acc", "value": v["acc"],
                             "n": v["n"], "ci_low": v["ci95"][0], "ci_high": v["ci95"][1]})
    return rows


# -- item-level scores and paired differences ----------------------------------------------

def _medical_items(results: dict, model: str) -> dict[str, float]:
    scores = {}
    for benchmark in MEDICAL:
        result = results.get(model, {}).get(benchmark)
        if result and result.get("status") == "ok":
            for item in result["_items"]:
                scores[f"{benchmark}:{item['task']}:{item['doc_id']}"] = float(item["correct"])
    return scores


def _general_items(results: dict, model: str) -> dict[str, float]:
    result = results.get(model, {}).get("ifeval")
    if not result or result.get("status") != "ok":
        return {}
    return {f"ifeval:{item['doc_id']}": float(bool(item[GENERAL_METRIC])) for item in result["_items"]}


def paired_difference(a: dict[str, float], b: dict[str, float], seed: int = 0) -> dict | None:
    """mean(a) - mean(b) over the items both have, with a paired bootstrap 95% interval."""
    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diffs = [a[k] - b[k] for k in keys]
    rng = random.Random(seed)
    boots = sorted(sum(rng.choice(diffs) for _ in diffs) / len(diffs) for _ in range(BOOTSTRAP))
    low, high = boots[int(0.025 * BOOTSTRAP)], boots[int(0.975 * BOOTSTRAP) - 1]
    return {"value": sum(diffs) / len(diffs), "ci_low": low, "ci_high": high, "n": len(keys),
            "significant": not (low <= 0.0 <= high)}


def pooled(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


def alignment_tax(results: dict, baseline: str = "base") -> list[dict]:
    """Eq. 2: Delta = P(gen | base) - P(gen | model), next to the domain gain P(med | model) - P(med | base)."""
    rows = []
    base_gen, base_med = _general_items(results, baseline), _medical_items(results, baseline)
    for model in model_order(results):
        if model == baseline:
            continue
        tax = paired_difference(base_gen, _general_items(results, model))
        gain = paired_difference(_medical_items(results, model), base_med)
        rows.append({"model": model, "alignment_tax": tax, "domain_gain": gain})
    return rows


def describe_difference(name: str, diff: dict | None, unit: str = "points") -> str:
    if diff is None:
        return f"{name}: not computable (a benchmark was not evaluated for both models)."
    value = 100 * diff["value"]
    interval = f"95% CI [{100 * diff['ci_low']:+.1f}, {100 * diff['ci_high']:+.1f}]"
    verdict = "significant" if diff["significant"] else "not significant (the interval contains 0)"
    return f"{name}: {value:+.1f} {unit} ({interval}, n={diff['n']} paired items), {verdict}."


# -- training dynamics -----------------------------------------------------------------------

def load_dynamics(results_dir: Path) -> dict[str, list[dict]]:
    return {path.parent.name[len("grpo_"):]: _read_jsonl(path)
            for path in sorted(results_dir.glob("grpo_*/dynamics.jsonl"))}


def ablation_rows(results: dict, dynamics: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for variant, steps in dynamics.items():
        model = f"grpo_{variant}"
        med, gen = pooled(_medical_items(results, model)), pooled(_general_items(results, model))
        last = steps[-1] if steps else {}
        s_cos = [r["s_cos"] for r in steps if r.get("s_cos") is not None]
        rows.append({"variant": variant, "biomed_acc": med, "ifeval_strict": gen, "steps": len(steps),
                     **{k: last.get(k) for k in last if k.startswith("weight_")},
                     "mean_abs_s_cos": sum(abs(s) for s in s_cos) / len(s_cos) if s_cos else None,
                     "final_reward": last.get("reward")})
    return rows


def _plot(path: Path, draw) -> None:
    from balancedbio.io import pyplot, save_figure

    save_figure(draw(pyplot()), path, dpi=110)


def _series(rows, key):
    return [r["step"] for r in rows], [math.nan if r.get(key) is None else r[key] for r in rows]


def make_figures(dynamics: dict[str, list[dict]], results: dict, fig_dir: Path) -> dict[str, str]:
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    names = sorted({k[len("weight_"):] for rows in dynamics.values() for r in rows for k in r
                    if k.startswith("weight_")})

    def per_component(prefix, ylabel, title):
        def draw(plt):
            fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4 * max(1, len(names)), 3.4), squeeze=False)
            for ax, name in zip(axes[0], names):
                for variant, rows in dynamics.items():
                    ax.plot(*_series(rows, prefix + name), marker="o", markersize=2, label=variant)
                ax.set_title(name)
                ax.set_xlabel("optimizer step")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize=8)
            fig.suptitle(title)
            return fig
        return draw

    _plot(fig_dir / "weights.png", per_component("weight_", "weight w_k", "Reward weights over training (Fig. 3)"))
    figures["weights"] = "Reward weights w_k per variant: the PID controller raises a lagging component's weight."
    _plot(fig_dir / "rewards.png", per_component("reward_", "mean reward", "Reward components over training (Fig. 4)"))
    figures["rewards"] = "Mean of each reward component per step (over the prompts it applies to)."

    def draw_aoc(plt):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for variant, rows in dynamics.items():
            ax1.plot(*_series(rows, "s_cos"), marker="o", markersize=2, label=variant)
            ax2.plot(*_series(rows, "l_orth"), marker="o", markersize=2, label=variant)
        ax1.axhline(0, color="grey", linewidth=0.8)
        ax1.set_ylim(-1.05, 1.05)
        ax1.set_ylabel("S_cos (medical vs instruction gradient)")
        ax2.set_ylabel("L_orth (eq. 6)")
        for ax in (ax1, ax2):
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        return fig

    _plot(fig_dir / "aoc.png", draw_aoc)
    figures["aoc"] = "Gradient cosine S_cos and the orthogonality penalty; gaps are steps where S_cos was undefined."

    def draw_kl(plt):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.4))
        for variant, rows in dynamics.items():
            ax1.plot(*_series(rows, "kl"), marker="o", markersize=2, label=variant)
            ax2.plot(*_series(rows, "completion_length"), marker="o", markersize=2, label=variant)
        ax1.set_ylabel("KL to the reference policy (nats/token)")
        ax2.set_ylabel("completion length (tokens)")
        for ax in (ax1, ax2):
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        ax1.legend(fontsize=8)
        return fig

    _plot(fig_dir / "kl_length.png", draw_kl)
    figures["kl_length"] = "KL divergence from the reference policy and mean completion length per step."

    def draw_pareto(plt):
        fig, ax = plt.subplots(figsize=(5.5, 4.2))
        for model in model_order(results):
            med, gen = _medical_items(results, model), _general_items(results, model)
            if not med or not gen:
                continue
            x, y = pooled(med), pooled(gen)
            (x_low, x_high), (y_low, y_high) = wilson_interval(x, len(med)), wilson_interval(y, len(gen))
            ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]], fmt="o", capsize=3)
            ax.annotate(model, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
        ax.set_xlabel("BIOMED accuracy (MMLU-med + MedQA + CMExam, pooled)")
        ax.set_ylabel("IFEval prompt-level strict accuracy")
        ax.set_title("Domain vs general capability (95% CIs)")
        ax.grid(alpha=0.3)
        return fig

    _plot(fig_dir / "pareto.png", draw_pareto)
    figures["pareto"] = "Each model's medical accuracy against its instruction following: up and right is better."

    sweep = {int(m[len("grpo_g"):]): m for m in results if m.startswith("grpo_g") and m[len("grpo_g"):].isdigit()}
    if sweep:
        def draw_sweep(plt):
            fig, ax = plt.subplots(figsize=(5, 3.6))
            sizes = sorted(sweep)
            for label, getter in (("BIOMED", _medical_items), ("IFEval strict", _general_items)):
                values = [pooled(getter(results, sweep[g])) for g in sizes]
                ax.plot(sizes, [math.nan if v is None else v for v in values], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(g) for g in sizes])
            ax.set_xlabel("group size G")
            ax.set_ylabel("accuracy")
            ax.set_title("Group-size sensitivity (Fig. 2)")
            ax.legend()
            ax.grid(alpha=0.3)
            return fig

        _plot(fig_dir / "group_size.png", draw_sweep)
        figures["group_size"] = "Accuracy against the GRPO group size G."
    return figures


# -- the report ------------------------------------------------------------------------------

def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{100 * value:.1f}" if pct else f"{value:.3g}"
    return str(value)


def main_table(results: dict) -> list[dict]:
    rows = []
    for model in model_order(results):
        row = {"model": model}
        for benchmark in ("mmlu_med", "medqa", "cmexam", "kg_mcq"):
            r = results[model].get(benchmark)
            row[benchmark] = (f"{_fmt(r['metrics']['acc']['value'], True)} "
                              f"[{_fmt(r['metrics']['acc']['ci95'][0], True)}, {_fmt(r['metrics']['acc']['ci95'][1], True)}]"
                              f" (n={r['n']})") if r and r.get("status") == "ok" else "not evaluated"
        r = results[model].get("ifeval")
        for metric in ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc",
                       "inst_level_loose_acc"):
            row[f"ifeval {metric}"] = (_fmt(r["metrics"][metric]["value"], True)
                                       if r and r.get("status") == "ok" else "not evaluated")
        rows.append(row)
    return rows


def _md_table(rows: list[dict]) -> str:
    if not rows:
        return "_(nothing to show)_\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c)) if not isinstance(row.get(c), str) else row[c]
                                       for c in columns) + " |")
    return "\n".join(lines) + "\n"


def conclusions(results: dict, taxes: list[dict], ablations: list[dict]) -> list[str]:
    """Plain sentences that say only what the intervals support."""
    lines = []
    by_model = {row["model"]: row for row in taxes}
    full = by_model.get("grpo_full")
    if full:
        lines.append(describe_difference("Medical accuracy gain of grpo_full over base", full["domain_gain"]))
        lines.append(describe_difference("Alignment tax of grpo_full (IFEval strict, base minus grpo_full)",
                                         full["alignment_tax"]))
    else:
        lines.append("grpo_full was not evaluated, so its gain and tax are not reported.")
    full_items = (_medical_items(results, "grpo_full"), _general_items(results, "grpo_full"))
    static_items = (_medical_items(results, "grpo_static_weights"), _general_items(results, "grpo_static_weights"))
    if all(full_items) and all(static_items):
        lines.append(describe_difference("Dynamic vs static weights, medical accuracy (full minus static)",
                                          paired_difference(full_items[0], static_items[0])))
        lines.append(describe_difference("Dynamic vs static weights, IFEval strict (full minus static)",
                                         paired_difference(full_items[1], static_items[1])))
    else:
        lines.append("The static-weights ablation was not evaluated, so dynamic and static weights are not compared.")
    return lines


def build_report(*, eval_dir: str, results_dir: str, out_dir: str, prm_metrics: str | None = None,
                 decontamination: str | None = None, sft_metrics: str | None = None, config: dict | None = None,
                 versions: dict | None = None) -> dict:
    import pandas as pd

    from balancedbio.io import atomic_file

    out = Path(out_dir)
    tables, fig_dir = out / "tables", out / "figures"
    tables.mkdir(parents=True, exist_ok=True)
    results = load_results(Path(eval_dir))
    dynamics = load_dynamics(Path(results_dir))
    tidy, subjects = tidy_rows(results), subject_rows(results)
    taxes = alignment_tax(results)
    ablations = ablation_rows(results, dynamics)
    skipped = [{"model": m, "benchmark": b, "reason": r["reason"]} for m in model_order(results)
               for b, r in sorted(results[m].items()) if r.get("status") == "skipped"]
    tax_rows = []
    for row in taxes:
        for name in ("alignment_tax", "domain_gain"):
            d = row[name]
            tax_rows.append({"model": row["model"], "benchmark": "ifeval" if name == "alignment_tax" else "biomed",
                             "metric": name, "value": d["value"] if d else None, "n": d["n"] if d else None,
                             "ci_low": d["ci_low"] if d else None, "ci_high": d["ci_high"] if d else None})
    table3 = [r for r in tidy + subjects if r["model"] in ("base", "grpo_full") and
              (r["metric"] == GENERAL_METRIC or r["benchmark"] == "mmlu_med/anatomy")]
    for model in ("base", "grpo_full"):
        med = _medical_items(results, model)
        if med:
            p = pooled(med)
            low, high = wilson_interval(p, len(med))
            table3.append({"model": model, "benchmark": "biomed_overall", "metric": "acc", "value": p, "n": len(med),
                           "ci_low": low, "ci_high": high})
    prm = json.loads(Path(prm_metrics).read_text()) if prm_metrics and Path(prm_metrics).exists() else None
    prm_rows = ([{"model": "prm", "benchmark": "kg_steps_test", "metric": m, "value": v, "n": prm["test"]["n"],
                  "ci_low": None, "ci_high": None}
                 for m, v in [("macro_f1", prm["test"]["macro_f1"]), ("accuracy", prm["test"]["accuracy"]),
                              *[(f"f1_{k}", v) for k, v in prm["test"]["per_class_f1"].items()]]] if prm else [])
    decon = json.loads(Path(decontamination).read_text()) if decontamination and Path(decontamination).exists() \
        else None
    decon_rows = ([{"output": name, "total": o["total"], "kept": o["kept"], "dropped": o["dropped"],
                    "dropped_by_benchmark": json.dumps(o.get("dropped_by_benchmark", {}))}
                   for name, o in decon["outputs"].items()] if decon else [])
    frames = {"table1_main": pd.DataFrame(tidy, columns=TIDY_COLUMNS),
              "mmlu_subjects": pd.DataFrame(subjects, columns=TIDY_COLUMNS),
              "alignment_tax": pd.DataFrame(tax_rows, columns=TIDY_COLUMNS),
              "table2_ablations": pd.DataFrame(ablations),
              "table3_small_model": pd.DataFrame(table3, columns=TIDY_COLUMNS),
              "prm": pd.DataFrame(prm_rows, columns=TIDY_COLUMNS),
              "decontamination": pd.DataFrame(decon_rows),
              "skipped": pd.DataFrame(skipped, columns=["model", "benchmark", "reason"])}
    for name, frame in frames.items():
        with atomic_file(tables / f"{name}.csv") as handle:
            frame.to_csv(handle, index=False)
    figures = make_figures(dynamics, results, fig_dir)
    findings = conclusions(results, taxes, ablations)

    sections = [("Findings", "\n".join(f"- {line}" for line in findings) + "\n"),
                ("Table 1: models x benchmarks (accuracy %, 95% Wilson CI)", _md_table(main_table(results))),
                ("Alignment tax (eq. 2) and domain gain (paired bootstrap 95% CI)", _md_table([
                    {"model": r["model"],
                     "alignment tax (IFEval strict, pts)": _diff_cell(r["alignment_tax"]),
                     "domain gain (BIOMED, pts)": _diff_cell(r["domain_gain"])} for r in taxes])),
                ("Table 2: GRPO variants (ablations)", _md_table([
                    {k: (_fmt(v, True) if k in ("biomed_acc", "ifeval_strict") and isinstance(v, float) else v)
                     for k, v in r.items()} for r in ablations])),
                ("Table 3: base vs BalancedBio", _md_table([
                    {"model": r["model"], "benchmark": r["benchmark"], "metric": r["metric"],
                     "value %": _fmt(r["value"], True), "n": r["n"]} for r in table3])),
                ("MMLU-med per subject", _md_table([
                    {"model": r["model"], "subject": r["benchmark"].split("/")[1], "acc %": _fmt(r["value"], True),
                     "n": r["n"]} for r in subjects])),
                ("Process reward model (held-out steps)", _md_table(
                    [{"metric": r["metric"], "value": _fmt(r["value"])} for r in prm_rows])
                    + (f"\nSound chain ranked above its flawed chains: "
                       f"{_fmt(prm['test_chain_ranking']['sound_above_flawed'], True)}% of "
                       f"{prm['test_chain_ranking']['pairs']} questions.\n" if prm else "")),
                ("Decontamination", _md_table(decon_rows)),
                ("Not evaluated", _md_table(skipped) if skipped else "Every benchmark was evaluated.\n")]
    md = ["# BalancedBio run report\n"]
    if config:
        md.append(f"Run `{config.get('run_name')}`, model `{config['model']['source']}`, seed {config.get('seed')}.\n")
    for title, body in sections:
        md += [f"## {title}\n", body]
    md.append("## Figures\n")
    for name, caption in figures.items():
        md.append(f"![{name}](figures/{name}.png)\n\n{caption}\n")
    md.append("## Configuration and versions\n")
    md.append("```json\n" + json.dumps({"config": config, "versions": versions}, indent=1, default=str)[:20000]
              + "\n```\n")
    with atomic_file(out / "report.md") as handle:
        handle.write("\n".join(md))
    with atomic_file(out / "report.html") as handle:
        handle.write(_html(sections, figures, fig_dir, config, versions))
    summary = {"models": model_order(results), "findings": findings, "figures": sorted(figures),
               "tables": sorted(frames), "skipped": skipped}
    log.info("report: %d models, %d figures, %d skipped evaluations", len(results), len(figures), len(skipped))
    return summary


def _diff_cell(diff: dict | None) -> str:
    if diff is None:
        return "–"
    mark = "" if diff["significant"] else " (n.s.)"
    return f"{100 * diff['value']:+.1f} [{100 * diff['ci_low']:+.1f}, {100 * diff['ci_high']:+.1f}]{mark}"


def _md_to_html_table(markdown: str) -> str:
    lines = [line for line in markdown.strip().splitlines() if line.startswith("|")]
    if len(lines) < 2:
        return f"<p>{html.escape(markdown.strip()).replace(chr(10), '<br>')}</p>"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in cells[2:])
    rest = "\n".join(line for line in markdown.strip().splitlines() if not line.startswith("|"))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>" + (
        f"<p>{html.escape(rest)}</p>" if rest.strip() else "")


def _html(sections, figures, fig_dir: Path, config, versions) -> str:
    parts = []
    for title, body in sections:
        if body.lstrip().startswith("- "):
            items = "".join(f"<li>{html.escape(line[2:])}</li>" for line in body.strip().splitlines())
            content = f"<ul>{items}</ul>"
        else:
            content = _md_to_html_table(body)
        parts.append(f"<h2>{html.escape(title)}</h2>{content}")
    for name, caption in figures.items():
        data = base64.b64encode((fig_dir / f"{name}.png").read_bytes()).decode()
        parts.append(f'<figure><img class="figure" alt="{name}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("<h2>Configuration and versions</h2><pre>"
                 + html.escape(json.dumps({"config": config, "versions": versions}, indent=1, default=str)) + "</pre>")
    # The body records how many figures decoded, so a headless browser check can read it back.
    script = ("<script>window.addEventListener('load',()=>{const imgs=[...document.images];"
              "document.body.dataset.figures=imgs.length;"
              "document.body.dataset.figuresLoaded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;});</script>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:4px 8px}"
             "th{background:#f2f2f2}img.figure{max-width:100%}figcaption{font-size:13px;color:#555}"
             "pre{font-size:11px;background:#f7f7f7;padding:1em;overflow:auto;max-height:30em}")
    title = f"BalancedBio report: {html.escape(str((config or {}).get('run_name', 'run')))}"
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style>"
            f"</head><body><h1>{title}</h1>{''.join(parts)}{script}</body></html>")

"""The report's files: CSV tables, figures, Markdown and one self-contained HTML page (Jinja2)."""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path
from typing import Iterable

from balancedbio.report.curves import make_curve_figures
from balancedbio.report.figures import make_figures
from balancedbio.report.findings import (HELDOUT_CAPABILITIES, conclusions, heldout_answer_findings,
                                        shown_capabilities, steering_findings, verdict)
from balancedbio.report.load import (COMPARED_CAPABILITIES, GENERAL_METRIC, IF_BENCHMARKS, TIDY_COLUMNS, RunData,
                                     _medical_items, _read_json, load_dynamics, load_heldout, load_results,
                                     results_frame, subjects_frame)
from balancedbio.report.stats import POWER, pooled, wilson_interval
from balancedbio.report.tables import (Table, _diff_cell, _diff_columns, _fmt, _frame, _mde_cell, _with_ci,
                                       ablation_rows, alignment_tax, aoc_rows, comparison_rows, heldout_answer_rows,
                                       heldout_rows, main_table, significance_class, steering_rows)

log = logging.getLogger(__name__)
LEAD_FIGURE = "differences"  # the page opens with the verdict and this figure


def _templates():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    # Escape by the template's full suffix: select_autoescape(["html"]) does not match
    # "report.html.j2", which left config and result text unescaped in the page. Markdown stays raw.
    return Environment(loader=PackageLoader("balancedbio", "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(enabled_extensions=("html.j2",), disabled_extensions=("md.j2",),
                                                    default_for_string=False, default=False),
                       keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)


def build_report(*, out_dir: str, evaluations: Iterable[str], eval_items: Iterable[str] = (),
                 heldout: Iterable[str] = (), heldout_items: Iterable[str] = (), dynamics: Iterable[str] = (),
                 prm_metrics: str | None = None, decontamination: str | None = None, sft_metrics: str | None = None,
                 skipped: str | None = None, config: dict | None = None, versions: dict | None = None,
                 seed: int = 0) -> dict:
    """Tables, figures, report.md and report.html from exactly the files named here."""
    from balancedbio.io import atomic_file

    out = Path(out_dir)
    tables_dir, fig_dir = out / "tables", out / "figures"
    tables_dir.mkdir(parents=True, exist_ok=True)
    data = RunData(load_results(evaluations, eval_items), load_heldout(heldout, heldout_items),
                   load_dynamics(dynamics))
    tidy, subjects = results_frame(data), subjects_frame(data)  # tidy DataFrames, TIDY_COLUMNS
    comparisons = comparison_rows(data, seed=seed)
    taxes = alignment_tax(data, seed=seed)
    ablations, aoc = ablation_rows(data), aoc_rows(data.dynamics)
    weights_config = (config or {}).get("weights") or {}
    bounds = ((weights_config["min_weight"], weights_config["max_weight"])
              if {"min_weight", "max_weight"} <= set(weights_config) else None)
    steering = steering_rows(data.dynamics, bounds)
    held, answers = heldout_rows(data), heldout_answer_rows(data)
    skipped_rows = _read_json(skipped) if skipped else [
        {"model": m, "benchmark": b, "reason": r["reason"]} for m in data.models
        for b, r in sorted(data.results.get(m, {}).items()) if r.get("status") == "skipped"]
    prm = _read_json(prm_metrics) if prm_metrics else None
    decon = _read_json(decontamination) if decontamination else None
    sft = _read_json(sft_metrics) if sft_metrics else None

    tax_rows = []
    for row in taxes:
        for name, benchmark in (("domain_gain", "biomed"), *[(f"tax_{b}", b) for b in IF_BENCHMARKS]):
            tax_rows.append({"model": row["model"], "benchmark": benchmark,
                             "metric": "domain_gain" if name == "domain_gain" else "alignment_tax",
                             **_diff_columns(row[name])})
    table3 = [row for frame in (tidy, subjects) for row in frame[
        frame["model"].isin(("base", "grpo_full"))
        & ((frame["metric"] == GENERAL_METRIC) | (frame["benchmark"] == "mmlu_med/anatomy"))].to_dict("records")]
    for model in ("base", "grpo_full"):
        med = _medical_items(data, model)
        if med:
            p = pooled(med)
            low, high = wilson_interval(p, len(med))
            table3.append({"model": model, "benchmark": "biomed_overall", "metric": "acc", "value": p, "n": len(med),
                           "ci_low": low, "ci_high": high})
    prm_rows = ([{"model": "prm", "benchmark": "kg_steps_test", "metric": m, "value": v, "n": prm["test"]["n"],
                  "ci_low": None, "ci_high": None}
                 for m, v in [("macro_f1", prm["test"]["macro_f1"]), ("accuracy", prm["test"]["accuracy"]),
                              *[(f"f1_{k}", v) for k, v in prm["test"]["per_class_f1"].items()]]] if prm else [])
    decon_rows = ([{"output": name, "total": o["total"], "kept": o["kept"], "dropped": o["dropped"],
                    "dropped_by_benchmark": json.dumps(o.get("dropped_by_benchmark", {}))}
                   for name, o in decon["outputs"].items()] if decon else [])
    sft_rows = [{"metric": k, "value": v} for k, v in (sft or {}).items()
                if isinstance(v, (int, float, str, bool)) or v is None]
    frames = {"table1_main": tidy,
              "paired_differences": _frame([{"comparison": r["comparison"], "capability": r["capability"],
                                             **_diff_columns(r["diff"]), "target_mde": r["target_mde"]}
                                            for r in comparisons],
                                           ["comparison", "capability", "value", "n", "ci_low", "ci_high",
                                            "significant", "mde", "target_mde"]),
              "mmlu_subjects": subjects,
              "alignment_tax": _frame(tax_rows, TIDY_COLUMNS + ["significant", "mde"]),
              "heldout_rewards": _frame(held, ["model", "component", "mean", "n", "ci_low", "ci_high", "status"]),
              "heldout_answers": _frame(answers, ["model", "questions", "answered", "answered_fraction", "right",
                                                  "right_of_answered", "ci_low", "ci_high", "chance", "above_chance"]),
              "table2_ablations": _frame(ablations),
              "aoc": _frame(aoc, ["variant", "steps", "s_cos_defined", "fired", "defined_fraction",
                                  "fired_fraction_of_defined", "mean_abs_s_cos", "max_abs_s_cos",
                                  "constant_groups_sampled", "groups_resampled", "constant_groups_kept"]),
              "steering": _frame(steering, ["variant", "steps", "min_weight", "max_weight", "strictly_inside_bounds",
                                            "mean_weight_share_instruction", "mean_update_share_instruction",
                                            "share_correlation", "share_steps",
                                            "mean_update_share_instruction_equal_weights",
                                            "share_moved_as_predicted", "counterfactual_steps"]),
              "table3_small_model": _frame(table3, TIDY_COLUMNS),
              "prm": _frame(prm_rows, TIDY_COLUMNS),
              "sft": _frame(sft_rows, ["metric", "value"]),
              "decontamination": _frame(decon_rows),
              "skipped": _frame(skipped_rows, ["model", "benchmark", "reason"])}
    for name, frame in frames.items():
        with atomic_file(tables_dir / f"{name}.csv") as handle:
            frame.to_csv(handle, index=False)
    tau = ((config or {}).get("aoc") or {}).get("tau")
    figures = make_figures(data, comparisons, fig_dir, tau=tau)
    figures.update(make_curve_figures(data, fig_dir))  # held-out learning curves, when logged
    findings = conclusions(comparisons, aoc) + heldout_answer_findings(answers) + steering_findings(steering, bounds)

    accuracy = {c.key: c.accuracy for c in COMPARED_CAPABILITIES}
    pct_columns = {"biomed", "kg_mcq", "ifeval", "ifbench"}
    ablation_names = {"biomed": "BIOMED", "ifeval": "IFEval strict", "ifbench": "IFBench strict",
                      "heldout_accuracy": "held-out R_acc", "heldout_reasoning": "held-out R_reas",
                      "heldout_instruction": "held-out R_inst"}
    # A held-out-only run (no benchmark evaluated) shows no benchmark rows: each would say "not evaluated".
    shown = shown_capabilities(comparisons)
    shown_comparisons = [r for r in comparisons if r["capability"] in shown]
    difference_rows = [{"comparison": r["comparison"], "capability": r["label"],
                        "difference [95% CI]": _diff_cell(r["diff"], accuracy[r["capability"]]),
                        "n": r["diff"]["n"] if r["diff"] else "–",
                        "significant": _fmt(r["diff"]["significant"]) if r["diff"] else "–",
                        "min. detectable effect": _mde_cell(r["diff"], r["target_mde"], accuracy[r["capability"]])}
                       for r in shown_comparisons]
    # Higher is better on every compared capability; a positive alignment tax is a loss.
    difference_classes = [{**{k: "" for k in row}, "difference [95% CI]": significance_class(r["diff"])}
                          for row, r in zip(difference_rows, shown_comparisons)]
    tax_rows_shown = [{"model": r["model"], "alignment tax IFEval strict": _diff_cell(r["tax_ifeval"]),
                       "alignment tax IFBench strict": _diff_cell(r["tax_ifbench"]),
                       "domain gain BIOMED": _diff_cell(r["domain_gain"]),
                       "MDE (IFEval / IFBench / BIOMED)": " / ".join(
                           _mde_cell(r[k], None) for k in ("tax_ifeval", "tax_ifbench", "domain_gain"))}
                      for r in taxes]
    tax_classes = [{"model": "", "alignment tax IFEval strict": significance_class(r["tax_ifeval"], better_sign=-1),
                    "alignment tax IFBench strict": significance_class(r["tax_ifbench"], better_sign=-1),
                    "domain gain BIOMED": significance_class(r["domain_gain"]), "MDE (IFEval / IFBench / BIOMED)": ""}
                   for r in taxes]
    benchmarks_shown = bool(shown - set(HELDOUT_CAPABILITIES))
    display = [
        Table("Paired differences per capability (first minus second; paired bootstrap 95% CI)",
              _frame(difference_rows), classes=_frame(difference_classes, list(_frame(difference_rows).columns)),
              note=f"Accuracies in points, rewards on their own scale. The minimum detectable effect is "
                   f"(z_0.975 + z_{POWER:g}) x SE of the paired differences: the smallest true difference "
                   f"detected with {100 * POWER:.0f}% power at the 5% level."),
        *([] if not benchmarks_shown else [
            Table("Table 1: models x benchmarks (accuracy %, 95% Wilson CI)", _frame(main_table(data))),
            Table("Alignment tax (eq. 2) and domain gain (paired bootstrap 95% CI, points)",
                  _frame(tax_rows_shown), classes=_frame(tax_classes, list(_frame(tax_rows_shown).columns)),
                  note="Tax = base minus model (positive: the model lost instruction following); "
                       "gain = model minus base.")]),
        Table("Held-out rewards (prompts no model trained on; mean, 95% CI)",
              _frame([{"model": r["model"], "component": r["component"] or "–",
                       "mean [95% CI]": _with_ci(r["mean"], r["ci_low"], r["ci_high"], pct=False)
                       if r["status"] == "ok" else "not evaluated",
                       "n": r["n"] if r["n"] is not None else "–",
                       "status": r["status"]} for r in held])),
        *([] if not answers else [Table(
            "Held-out questions: how often each model answered, and how often its answers were right",
            _frame([{"model": r["model"], "answered": f"{r['answered']} of {r['questions']}",
                     "right among answered, % [95% CI]": _with_ci(r["right_of_answered"], r["ci_low"], r["ci_high"])
                     if r["answered"] else "–",
                     "a guess": f"{_fmt(r['chance'], True)}%", "R_acc": f"{r['right'] / r['questions']:.3f}"}
                    for r in answers]),
            note="R_acc = answer rate x right among answered. Answered: R_acc's parser found a letter. An "
                 "interval that holds a guess's rate means the answers know nothing of these questions: R_acc "
                 "then grows only by answering more often.")]),
        Table("Table 2: GRPO variants (ablations)",
              _frame([{ablation_names.get(k, k): (_fmt(v, k in pct_columns) if not isinstance(v, str) else v)
                       for k, v in r.items()} for r in ablations]),
              note="Accuracies in %, held-out rewards as means; weights, KL and reward at the last step."),
        Table("Active Orthogonality Control per variant",
              _frame([{"variant": r["variant"], "S_cos defined / steps": f"{r['s_cos_defined']} / {r['steps']}",
                       "penalty fired / defined": f"{r['fired']} / {r['s_cos_defined']}",
                       "mean |S_cos|": _fmt(r["mean_abs_s_cos"]), "max |S_cos|": _fmt(r["max_abs_s_cos"]),
                       "constant groups sampled / resampled / kept":
                           "off" if r["groups_resampled"] is None else
                           f"{r['constant_groups_sampled']} / {r['groups_resampled']} / {r['constant_groups_kept']}"}
                      for r in aoc]),
              note="Fired: the step's aoc_fired flag (L_orth > 0 in dynamics files without it). Constant "
                   "groups: prompt groups whose G rewards were all equal (no gradient; S_cos undefined when "
                   "every group of a capability is), how many fresh groups dynamic sampling drew "
                   "(grpo.resample_constant_groups), and how many constant ones were left in the batch."
                   + (f" Threshold tau = {tau:g}." if tau is not None else "")),
        Table("Dynamic weights: bounds and the instruction share of the update",
              _frame([{"variant": r["variant"], "weights min / max": f"{_fmt(r['min_weight'])} / {_fmt(r['max_weight'])}",
                       "strictly inside bounds": _fmt(r["strictly_inside_bounds"]),
                       "mean w_inst / sum w": _fmt(r["mean_weight_share_instruction"]),
                       "mean instruction share of sum |A|": _fmt(r["mean_update_share_instruction"]),
                       "r (share vs w_inst / sum w)": _fmt(r["share_correlation"]),
                       "steps": r["share_steps"],
                       "mean share at equal weights": _fmt(r["mean_update_share_instruction_equal_weights"]),
                       "moved as eq. 11 predicts": (f"{r['share_moved_as_predicted']} / {r['counterfactual_steps']}"
                                                    if r["counterfactual_steps"] else "–")} for r in steering]),
              note=(f"Bounds [{bounds[0]:g}, {bounds[1]:g}] (weights.min_weight, max_weight). " if bounds else "")
                   + "r: Pearson correlation of the instruction rows' share of sum |A| with w_inst / sum_k "
                     "w_k over the steps on which both capabilities had a policy gradient (a step whose "
                     "instruction groups all had constant rewards has a share of 0 whatever the weights); "
                     "under eq. 11 the first follows the second. Equal weights: the same batches' share "
                     "had every weight been 1; eq. 11 predicts the applied share above it when "
                     "w_inst / sum w > 1/K and below it when < 1/K. Undefined (–) for constant weights or "
                     "fewer than 3 such steps."),
        Table("Table 3: base vs BalancedBio",
              _frame([{"model": r["model"], "benchmark": r["benchmark"], "metric": r["metric"],
                       "value %": _fmt(r["value"], True), "n": r["n"]} for r in table3])),
        Table("MMLU-med per subject",
              _frame([{"model": r["model"], "subject": r["benchmark"].split("/")[1], "acc %": _fmt(r["value"], True),
                       "n": r["n"]} for r in subjects.to_dict("records")])),
        Table("Supervised fine-tuning", _frame([{"metric": r["metric"], "value": _fmt(r["value"])} for r in sft_rows])),
        Table("Process reward model (held-out steps)",
              _frame([{"metric": r["metric"], "value": _fmt(r["value"])} for r in prm_rows]),
              note=(f"Sound chain ranked above its flawed chains: "
                    f"{_fmt(prm['test_chain_ranking']['sound_above_flawed'], True)}% of "
                    f"{prm['test_chain_ranking']['pairs']} questions." if prm else "")),
        Table("Decontamination", _frame(decon_rows)),
        Table("Not evaluated", _frame(skipped_rows, ["model", "benchmark", "reason"]),
              note="" if skipped_rows else "Every benchmark was evaluated."),
    ]
    settings_json = json.dumps({"config": config, "versions": versions}, indent=1, default=str)
    context = {"title": f"BalancedBio report: {(config or {}).get('run_name', 'run')}", "config": config or {},
               "verdict": verdict(comparisons), "findings": findings, "tables": display,
               "settings_json": settings_json, "lead_figure": LEAD_FIGURE if LEAD_FIGURE in figures else None}
    env = _templates()
    with atomic_file(out / "report.md") as handle:
        handle.write(env.get_template("report.md.j2").render(
            **context, figures=[{"name": n, "caption": c, "src": f"figures/{n}.png"} for n, c in figures.items()]))
    with atomic_file(out / "report.html") as handle:  # figures inlined: the page is one self-contained file
        handle.write(env.get_template("report.html.j2").render(
            **context, figures=[{"name": n, "caption": c, "src": "data:image/png;base64,"
                                 + base64.b64encode((fig_dir / f"{n}.png").read_bytes()).decode()}
                                for n, c in figures.items()]))
    summary = {"models": data.models, "findings": findings, "figures": sorted(figures), "tables": sorted(frames),
               "skipped": skipped_rows}
    log.info("report: %d models, %d figures, %d skipped evaluations", len(data.models), len(figures),
             len(skipped_rows))
    return summary

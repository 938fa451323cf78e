"""The run's report: the paper's tables and figures from this run's results (Table 1-3, Figures
2-4, eq. 2), as CSV, Markdown and one self-contained HTML page (Jinja2 templates in
``balancedbio/templates``).

It reads only the files it is given (the report rule passes its declared inputs), never a
folder. Every number comes from a result file; intervals are 95%: Wilson intervals for single
accuracies (from the evaluation files) and paired percentile-bootstrap intervals
(``scipy.stats.bootstrap`` over the paired differences) over the shared items for differences between two
models, so the wording says "not significant" whenever an interval contains 0. Each difference
carries its minimum detectable effect: the smallest true paired difference that a two-sided
test at the same level detects with 80% power, given the observed spread of the paired
differences.
"""

from __future__ import annotations

import base64
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

from balancedbio.evaluation import wilson_interval
from balancedbio.io import read_jsonl

log = logging.getLogger(__name__)

MEDICAL = ("mmlu_med", "medqa", "cmexam")  # "BIOMED overall": the public medical benchmarks, pooled
IF_BENCHMARKS = ("ifeval", "ifbench")  # scored alike: prompt/instruction x strict/loose
IF_METRICS = ("prompt_level_strict_acc", "inst_level_strict_acc", "prompt_level_loose_acc", "inst_level_loose_acc")
GENERAL_METRIC = "prompt_level_strict_acc"  # IFEval strict, the paper's P(gen)
HELDOUT_COMPONENTS = ("accuracy", "instruction")
TIDY_COLUMNS = ["model", "benchmark", "metric", "value", "n", "ci_low", "ci_high"]
CONFIDENCE = 0.95
POWER = 0.80
BOOTSTRAP_RESAMPLES = 2000
# The comparisons every capability is tested on (first minus second); absent models are skipped.
COMPARISONS = (("sft", "base"), ("grpo_full", "sft"), ("grpo_full", "base"), ("grpo_full", "grpo_static_weights"),
               ("grpo_full", "grpo_gdpo"))
# Issue 15's powered-evaluation targets: a 5-point medical and a 10-point instruction difference.
TARGET_MDE = {"biomed": 0.05, "ifeval": 0.10, "ifbench": 0.10}
# Below this many items that differ, the spread of the paired differences (and so the MDE) is
# estimated from too few values to say that a sample size meets its target: at n = 32 one
# differing item gives an MDE of 8.8 points, four give 17.5.
MIN_DISCORDANT_FOR_TARGET = 5


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
    """{model: {"summary": heldout_rewards.json, "items": {"component:id": reward}}}."""
    summary_files = [str(p) for p in summary_files]
    items_of = _declared_items(summary_files, item_files)
    heldout = {}
    for path in summary_files:
        summary = _read_json(path)
        if "model" not in summary or "status" not in summary:
            raise ValueError(f"{path}: held-out reward summary without 'model' or 'status'")
        items: dict[str, float] = {}
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
        heldout[summary["model"]] = {"summary": summary, "items": items}
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
class Capability:
    key: str
    label: str
    scores: Callable[[RunData, str], dict[str, float]]
    accuracy: bool = True  # shown in points (x100); rewards stay on their own scale


CAPABILITIES = (
    Capability("biomed", "BIOMED accuracy (MMLU-med+MedQA+CMExam)", _medical_items),
    Capability("kg_mcq", "kg_mcq accuracy", _mcq_items("kg_mcq")),
    Capability("ifeval", "IFEval prompt strict", _instruction_items("ifeval")),
    Capability("ifbench", "IFBench prompt strict", _instruction_items("ifbench")),
    Capability("heldout_accuracy", "held-out accuracy reward", _heldout_items("accuracy"), accuracy=False),
    Capability("heldout_instruction", "held-out instruction reward", _heldout_items("instruction"), accuracy=False),
)
CAPABILITY = {c.key: c for c in CAPABILITIES}


def pooled(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


# -- paired differences ----------------------------------------------------------------------

def minimum_detectable_effect(standard_error: float, confidence: float = CONFIDENCE, power: float = POWER) -> float:
    """(z_{1-alpha/2} + z_power) * SE: the smallest true difference a two-sided test at level
    1 - confidence detects with the given power, for an estimate with this standard error."""
    from balancedbio.heldout import detection_factor

    return detection_factor(1 - confidence, power) * standard_error


def paired_difference(a: dict[str, float], b: dict[str, float], *, confidence: float = CONFIDENCE,
                      power: float = POWER, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict | None:
    """mean(a) - mean(b) over the items both have: a paired percentile-bootstrap interval, whether
    it excludes 0, and the minimum detectable effect from the standard error of the paired
    differences (for 0/1 scores that spread comes only from the discordant items)."""
    from scipy.stats import bootstrap

    keys = sorted(set(a) & set(b))
    if not keys:
        return None
    diffs = np.array([a[k] - b[k] for k in keys], dtype=float)
    row = {"value": float(diffs.mean()), "n": len(keys), "discordant": int(np.count_nonzero(diffs)),
           "ci_low": None, "ci_high": None, "significant": False, "se": None, "mde": None}
    if len(keys) < 2:  # neither an interval nor a spread from one item
        return row
    constant = bool(np.ptp(diffs) <= 1e-12)  # rounding aside, every item differs by the same amount
    if constant:  # every resample gives the same mean; scipy would warn about degeneracy
        low = high = float(diffs.mean())
    else:
        # Resampling items and differencing is the paired bootstrap; on the differences directly it
        # draws the same indices as bootstrap((x, y), paired=True) at a fraction of its cost.
        ci = bootstrap((diffs,), np.mean, vectorized=True, n_resamples=n_resamples, confidence_level=confidence,
                       method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    se = 0.0 if constant else float(diffs.std(ddof=1) / math.sqrt(len(keys)))
    row.update(ci_low=low, ci_high=high, significant=not (low <= 0.0 <= high), se=se,
               # Constant differences (e.g. no discordant item) say nothing about the spread: no MDE.
               mde=minimum_detectable_effect(se, confidence, power) if se > 0 else None)
    return row


def comparison_rows(data: RunData, seed: int = 0) -> list[dict]:
    """One row per (comparison, capability): the paired difference first minus second."""
    rows = []
    for first, second in COMPARISONS:
        if first not in data.models or second not in data.models:
            continue
        for cap in CAPABILITIES:
            diff = paired_difference(cap.scores(data, first), cap.scores(data, second), seed=seed)
            rows.append({"comparison": f"{first} - {second}", "first": first, "second": second,
                         "capability": cap.key, "label": cap.label, "diff": diff,
                         "target_mde": TARGET_MDE.get(cap.key)})
    return rows


def alignment_tax(data: RunData, baseline: str = "base", seed: int = 0) -> list[dict]:
    """Eq. 2: Delta = P(gen | base) - P(gen | model) on IFEval and IFBench strict, next to the
    domain gain P(med | model) - P(med | base)."""
    rows = []
    base_med = _medical_items(data, baseline)
    for model in data.models:
        if model == baseline:
            continue
        row = {"model": model, "domain_gain": paired_difference(_medical_items(data, model), base_med, seed=seed)}
        for benchmark in IF_BENCHMARKS:
            scores = _instruction_items(benchmark)
            row[f"tax_{benchmark}"] = paired_difference(scores(data, baseline), scores(data, model), seed=seed)
        rows.append(row)
    return rows


def _scaled(value: float | None, accuracy: bool) -> str:
    return "–" if value is None else (f"{100 * value:+.1f}" if accuracy else f"{value:+.3f}")


def describe_difference(name: str, diff: dict | None, accuracy: bool = True) -> str:
    if diff is None:
        return f"{name}: not computable (not evaluated for both models)."
    unit = " points" if accuracy else ""
    if diff["ci_low"] is None:
        return f"{name}: {_scaled(diff['value'], accuracy)}{unit} on {diff['n']} paired item, too few for an interval."
    interval = f"95% CI [{_scaled(diff['ci_low'], accuracy)}, {_scaled(diff['ci_high'], accuracy)}]"
    verdict = "significant" if diff["significant"] else "not significant (the interval contains 0)"
    mde = (f"minimum detectable effect {_scaled(diff['mde'], accuracy).lstrip('+')}{unit}" if diff["mde"] is not None
           else "minimum detectable effect undefined (the paired differences do not vary)")
    value = _scaled(diff["value"], accuracy)
    return f"{name}: {value}{unit} ({interval}, n={diff['n']} paired items; {mde}), {verdict}."


# -- training dynamics -----------------------------------------------------------------------

def _fired(row: dict) -> bool:
    """Whether AOC's penalty acted on this step: the trainer's flag, else a positive L_orth."""
    if "aoc_fired" in row and row["aoc_fired"] is not None:
        return bool(row["aoc_fired"])
    return (row.get("l_orth") or 0.0) > 0.0


def aoc_rows(dynamics: dict[str, list[dict]]) -> list[dict]:
    """Per variant: steps, steps with S_cos defined, steps the penalty fired on, mean/max |S_cos|."""
    rows = []
    for variant, steps in dynamics.items():
        defined = [r for r in steps if r.get("s_cos") is not None]
        magnitudes = [abs(r["s_cos"]) for r in defined]
        fired = sum(_fired(r) for r in defined)
        rows.append({"variant": variant, "steps": len(steps), "s_cos_defined": len(defined), "fired": fired,
                     "defined_fraction": len(defined) / len(steps) if steps else None,
                     "fired_fraction_of_defined": fired / len(defined) if defined else None,
                     "mean_abs_s_cos": float(np.mean(magnitudes)) if magnitudes else None,
                     "max_abs_s_cos": max(magnitudes) if magnitudes else None,
                     # Dynamic sampling (grpo.resample_constant_groups): None where it was off.
                     **{key: (sum(r.get(key) or 0 for r in steps) if any(key in r for r in steps) else None)
                        for key in ("constant_groups_sampled", "groups_resampled", "constant_groups_kept")}})
    return rows


def steering_rows(dynamics: dict[str, list[dict]], bounds: tuple[float, float] | None = None) -> list[dict]:
    """Per variant: whether the weights stayed inside their bounds and the update followed w_inst.

    ``weight_share_instruction`` is w_inst / sum_k w_k at a step; ``update_share_instruction`` the
    trainer's share of sum |A| on the instruction rows. Under eq. 11 the second follows the first
    (each A_k has a batch scale that does not depend on w_k), but only on steps where both
    capabilities carry a policy gradient: a step whose instruction (or medical) groups all had
    constant rewards has a share of 0 (or 1) whatever the weights. ``share_correlation`` is the
    Pearson r over the steps with a share strictly between 0 and 1 (None with fewer than 3 such
    steps, or where either series is constant, e.g. static weights).

    ``update_share_instruction_equal_weights`` (eq. 11 runs) is the same batch's share had every
    weight been 1: the weights' own effect on that update, free of the batch-to-batch variation
    of the rewards. Eq. 11 predicts the share to rise above it when w_inst / sum w > 1/K (K
    components) and to fall below it when < 1/K; ``share_moved_as_predicted`` counts the steps
    where it did, of ``counterfactual_steps`` (steps with both shares strictly inside (0, 1) and
    w_inst / sum w not exactly 1/K).
    """
    rows = []
    for variant, steps in dynamics.items():
        names = sorted({k[len("weight_"):] for r in steps for k in r if k.startswith("weight_")})
        weights = [[r.get(f"weight_{n}") for n in names] for r in steps]
        complete = [w for w in weights if w and all(v is not None for v in w)]
        lowest = min((min(w) for w in complete), default=None)
        highest = max((max(w) for w in complete), default=None)
        pairs, moves, equal_shares = [], [], []
        for r, w in zip(steps, weights):
            share = r.get("update_share_instruction")
            if share is None or "instruction" not in names or not w or any(v is None for v in w):
                continue
            if not 0.0 < share < 1.0:  # one capability had no policy gradient on this step
                continue
            pairs.append((w[names.index("instruction")] / sum(w), share))
            equal = r.get("update_share_instruction_equal_weights")
            if equal is not None and 0.0 < equal < 1.0:
                excess = w[names.index("instruction")] / sum(w) - 1.0 / len(w)
                if abs(excess) > 1e-9:
                    moves.append((excess > 0) == (share > equal))
                    equal_shares.append(equal)
        correlation = None
        if len(pairs) >= 3 and np.std([a for a, _ in pairs]) > 1e-9 and np.std([b for _, b in pairs]) > 1e-9:
            correlation = float(np.corrcoef(np.array(pairs).T)[0, 1])
        inside = None
        if bounds is not None and lowest is not None:
            inside = bool(bounds[0] < lowest and highest < bounds[1])
        rows.append({"variant": variant, "steps": len(steps), "min_weight": lowest, "max_weight": highest,
                     "strictly_inside_bounds": inside,
                     "mean_weight_share_instruction": float(np.mean([a for a, _ in pairs])) if pairs else None,
                     "mean_update_share_instruction": float(np.mean([b for _, b in pairs])) if pairs else None,
                     "share_correlation": correlation, "share_steps": len(pairs),
                     "mean_update_share_instruction_equal_weights":
                         float(np.mean(equal_shares)) if equal_shares else None,
                     "share_moved_as_predicted": sum(moves), "counterfactual_steps": len(moves)})
    return rows


def steering_findings(rows: list[dict], bounds: tuple[float, float] | None) -> list[str]:
    lines = []
    for row in rows:
        if row["variant"] != "full" or row["min_weight"] is None:
            continue
        where = ("strictly inside" if row["strictly_inside_bounds"] else "not strictly inside") \
            + f" [{bounds[0]:g}, {bounds[1]:g}]" if bounds else "in"
        text = (f"Dynamic weights in grpo_full: {where} on all {row['steps']} steps "
                f"(lowest {_fmt(row['min_weight'])}, highest {_fmt(row['max_weight'])})")
        if row["share_correlation"] is not None:
            text += (f"; the instruction rows' share of sum |A| followed w_inst / sum w with r = "
                     f"{row['share_correlation']:.2f} over {row['share_steps']} steps")
        if row["counterfactual_steps"]:
            text += (f"; against the same batches at equal weights, the weights moved the instruction share "
                     f"the way eq. 11 predicts (up when w_inst / sum w > 1/K, down when below) on "
                     f"{row['share_moved_as_predicted']} of {row['counterfactual_steps']} steps (mean share "
                     f"{_fmt(row['mean_update_share_instruction'])} at the applied weights, "
                     f"{_fmt(row['mean_update_share_instruction_equal_weights'])} at equal weights)")
        lines.append(text + ".")
    return lines


def ablation_rows(data: RunData) -> list[dict]:
    rows = []
    for variant, steps in data.dynamics.items():
        model = f"grpo_{variant}"
        last = steps[-1] if steps else {}
        row = {"variant": variant, **{c.key: pooled(c.scores(data, model)) for c in CAPABILITIES},
               "steps": len(steps), **{k: last.get(k) for k in last if k.startswith("weight_")},
               "final_kl": last.get("kl"), "final_reward": last.get("reward")}
        rows.append(row)
    return rows


def heldout_rows(data: RunData) -> list[dict]:
    rows = []
    for model in data.models:
        entry = data.heldout.get(model)
        if entry is None:
            continue
        summary = entry["summary"]
        if summary["status"] != "ok":
            rows.append({"model": model, "component": None, "mean": None, "n": None, "ci_low": None,
                         "ci_high": None, "status": summary.get("reason", summary["status"])})
            continue
        for component, stats in summary["components"].items():
            rows.append({"model": model, "component": component, "mean": stats["mean"], "n": stats["n"],
                         "ci_low": stats.get("ci_low"), "ci_high": stats.get("ci_high"), "status": "ok"})
    return rows


# -- figures ---------------------------------------------------------------------------------

def _save(path: Path, fig) -> None:
    from balancedbio.io import save_figure

    save_figure(fig, path, dpi=110)


def _figure(plt, nrows: int = 1, ncols: int = 1, width: float = 5.0, height: float = 3.6):
    return plt.subplots(nrows, ncols, figsize=(width, height), squeeze=False, layout="constrained")


def _series(rows, key, transform=lambda v: v):
    return [r["step"] for r in rows], [math.nan if r.get(key) is None else transform(r[key]) for r in rows]


def _legend_outside(fig, axes) -> None:
    """One legend for the figure, right of the plots (constrained layout makes room for it)."""
    handles, labels = {}, {}
    for ax in np.ravel(axes):
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    labels = list(handles)
    if labels:
        fig.legend([handles[label] for label in labels], labels, loc="outside right upper", fontsize=8)


def _short(model: str) -> str:
    return model[len("grpo_"):] if model.startswith("grpo_") else model


def make_figures(data: RunData, comparisons: list[dict], fig_dir: Path, tau: float | None = None) -> dict[str, str]:
    from balancedbio.io import pyplot

    plt = pyplot()
    fig_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    dynamics = data.dynamics
    names = sorted({k[len("weight_"):] for rows in dynamics.values() for r in rows for k in r
                    if k.startswith("weight_")})

    def per_component(prefix, ylabel, title):
        fig, axes = _figure(plt, 1, max(1, len(names)), width=3.3 * max(1, len(names)) + 1.3, height=3.2)
        for ax, name in zip(axes[0], names):
            for variant, rows in dynamics.items():
                ax.plot(*_series(rows, prefix + name), marker="o", markersize=2, label=variant)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("optimizer step")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        _legend_outside(fig, axes)
        fig.suptitle(title, fontsize=11)
        return fig

    _save(fig_dir / "weights.png", per_component("weight_", "weight w_k", "Reward weights over training (Fig. 3)"))
    figures["weights"] = "Reward weights w_k per variant: the controller raises a lagging component's weight."
    _save(fig_dir / "rewards.png", per_component("reward_", "mean reward", "Reward components over training (Fig. 4)"))
    figures["rewards"] = "Mean of each reward component per step (over the prompts it applies to)."

    # AOC: |S_cos| for full vs no_aoc (every variant when neither was trained), fired steps filled.
    shown = [v for v in ("full", "no_aoc") if v in dynamics] or list(dynamics)
    fig, axes = _figure(plt, 1, 2, width=9.5, height=3.4)
    ax1, ax2 = axes[0]
    for variant in shown:
        rows = dynamics[variant]
        (line,) = ax1.plot(*_series(rows, "s_cos", abs), marker="o", markersize=3, markerfacecolor="white",
                           label=variant)
        fired = [r for r in rows if r.get("s_cos") is not None and _fired(r)]
        if fired:
            ax1.plot([r["step"] for r in fired], [abs(r["s_cos"]) for r in fired], "o", markersize=5,
                     color=line.get_color(), label=f"{variant}: penalty fired")
        steps = [r["step"] for r in rows]
        ax2.plot(steps, np.cumsum([r.get("s_cos") is not None and _fired(r) for r in rows]), color=line.get_color(),
                 label=f"{variant}: fired (cumulative)")
        ax2.plot(steps, np.cumsum([r.get("s_cos") is not None for r in rows]), linestyle="--",
                 color=line.get_color(), label=f"{variant}: S_cos defined (cumulative)")
    if tau is not None:
        ax1.axhline(tau, color="grey", linestyle=":", linewidth=1, label=f"tau = {tau:g}")
    ax1.set_ylim(0, 1.02)
    ax1.set_ylabel("|S_cos| (medical vs instruction)")
    ax2.set_ylabel("steps (cumulative)")
    ax2.yaxis.get_major_locator().set_params(integer=True)
    ax1.set_title("gradient conflict per step", fontsize=10)
    ax2.set_title("penalty fired / S_cos defined", fontsize=10)
    for ax in (ax1, ax2):
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes)
    _save(fig_dir / "aoc.png", fig)
    figures["aoc"] = ("|S_cos| between the medical and the instruction gradients per step (filled: AOC's penalty "
                      "fired; gaps: S_cos undefined) and the cumulative counts, for full vs no_aoc.")

    fig, axes = _figure(plt, 1, 2, width=9.5, height=3.2)
    for variant, rows in dynamics.items():
        axes[0][0].plot(*_series(rows, "kl"), marker="o", markersize=2, label=variant)
        axes[0][1].plot(*_series(rows, "completion_length"), marker="o", markersize=2, label=variant)
    axes[0][0].set_ylabel("KL to the reference (nats/token)")
    axes[0][1].set_ylabel("completion length (tokens)")
    for ax in axes[0]:
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    _legend_outside(fig, axes)
    _save(fig_dir / "kl_length.png", fig)
    figures["kl_length"] = "KL divergence from the reference policy and mean completion length per step."

    # Pareto: medical accuracy against IFEval and IFBench strict; a legend, not point labels,
    # because models with equal scores would print their names on top of each other.
    evaluated = [b for b in IF_BENCHMARKS if any(_instruction_items(b)(data, m) for m in data.models)] or ["ifeval"]
    fig, axes = _figure(plt, 1, len(evaluated), width=1.5 + 4.3 * len(evaluated), height=4.0)
    markers = "osD^vP*Xhp<>"
    for ax, benchmark in zip(axes[0], evaluated):
        general = _instruction_items(benchmark)
        for index, model in enumerate(data.models):
            med, gen = _medical_items(data, model), general(data, model)
            if not med or not gen:
                continue
            x, y = pooled(med), pooled(gen)
            (x_low, x_high), (y_low, y_high) = wilson_interval(x, len(med)), wilson_interval(y, len(gen))
            ax.errorbar(x, y, xerr=[[x - x_low], [x_high - x]], yerr=[[y - y_low], [y_high - y]],
                        fmt=markers[index % len(markers)], capsize=3, label=model, color=f"C{index % 10}")
        ax.set_xlabel("BIOMED accuracy (pooled)")
        ax.set_ylabel(f"{'IFEval' if benchmark == 'ifeval' else 'IFBench'} prompt-level strict")
        ax.grid(alpha=0.3)
    fig.suptitle("Domain vs general capability (95% CIs)", fontsize=11)
    _legend_outside(fig, axes)
    _save(fig_dir / "pareto.png", fig)
    figures["pareto"] = ("Each model's pooled medical accuracy against its IFEval (left) and IFBench (right) strict "
                         "accuracy: up and right is better.")

    if comparisons:
        caps = [c for c in CAPABILITIES if any(r["capability"] == c.key and r["diff"] for r in comparisons)]
        labels = list(dict.fromkeys(f"{_short(r['first'])} - {_short(r['second'])}" for r in comparisons))
        if caps:
            ncols = min(3, len(caps))
            nrows = math.ceil(len(caps) / ncols)
            fig, axes = _figure(plt, nrows, ncols, width=3.6 * ncols,
                                  height=nrows * (1.8 + 0.35 * len(labels)))
            for ax, cap in zip(np.ravel(axes), caps):
                scale = 100 if cap.accuracy else 1
                for position, label in enumerate(labels):
                    row = next((r for r in comparisons if r["capability"] == cap.key and
                                f"{_short(r['first'])} - {_short(r['second'])}" == label), None)
                    diff = row and row["diff"]
                    if not diff or diff["ci_low"] is None:
                        continue
                    color = "tab:red" if diff["significant"] else "tab:blue"
                    ax.errorbar(scale * diff["value"], position, xerr=[[scale * (diff["value"] - diff["ci_low"])],
                                                                       [scale * (diff["ci_high"] - diff["value"])]],
                                fmt="o", color=color, capsize=3)
                ax.axvline(0, color="grey", linewidth=0.8)
                ax.set_yticks(range(len(labels)), labels, fontsize=8)
                ax.set_ylim(-0.5, len(labels) - 0.5)
                ax.invert_yaxis()
                ax.set_title(cap.label, fontsize=9)
                ax.set_xlabel("difference (points)" if cap.accuracy else "difference (reward)", fontsize=8)
                ax.grid(alpha=0.3, axis="x")
            for ax in np.ravel(axes)[len(caps):]:
                ax.set_visible(False)
            fig.suptitle("Paired differences with 95% CIs (red: the interval excludes 0)", fontsize=11)
            _save(fig_dir / "differences.png", fig)
            figures["differences"] = "Paired difference per capability and comparison (first minus second)."

    sweep = {int(m[len("grpo_g"):]): m for m in data.models if m.startswith("grpo_g") and m[len("grpo_g"):].isdigit()}
    if sweep:
        fig, axes = _figure(plt, width=6, height=3.6)
        ax = axes[0][0]
        sizes = sorted(sweep)
        for cap in (CAPABILITY["biomed"], CAPABILITY["ifeval"], CAPABILITY["ifbench"]):
            values = [pooled(cap.scores(data, sweep[g])) for g in sizes]
            if any(v is not None for v in values):
                ax.plot(sizes, [math.nan if v is None else v for v in values], marker="o", label=cap.label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(g) for g in sizes])
        ax.set_xlabel("group size G")
        ax.set_ylabel("accuracy")
        ax.set_title("Group-size sensitivity (Fig. 2)", fontsize=10)
        ax.grid(alpha=0.3)
        _legend_outside(fig, axes)
        _save(fig_dir / "group_size.png", fig)
        figures["group_size"] = "Accuracy against the GRPO group size G."
    return figures


# -- tables for the page ---------------------------------------------------------------------

@dataclass
class Table:
    """One table of the page: the CSV frame's display form for Markdown and for HTML."""
    title: str
    frame: Any  # pandas.DataFrame of display strings
    note: str = ""

    @property
    def markdown(self) -> str:
        if self.frame.empty:
            return "_(nothing to show)_"
        cell = lambda v: str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines = ["| " + " | ".join(map(cell, self.frame.columns)) + " |", "|" + "---|" * len(self.frame.columns)]
        lines += ["| " + " | ".join(map(cell, row)) + " |" for row in self.frame.itertuples(index=False)]
        return "\n".join(lines)

    @property
    def html(self) -> str:
        if self.frame.empty:
            return "<p><em>(nothing to show)</em></p>"
        return self.frame.to_html(index=False, border=0, classes="data", na_rep="–", escape=True)


def _fmt(value: Any, pct: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)) and (pct or isinstance(value, float)):  # JSON may hold 0 and 1 as ints
        return f"{100 * value:.1f}" if pct else f"{value:.3g}"
    return str(value)


def _with_ci(value, low, high, n=None, pct=True) -> str:
    text = f"{_fmt(value, pct)} [{_fmt(low, pct)}, {_fmt(high, pct)}]"
    return text + (f" (n={n})" if n is not None else "")


def _frame(rows: list[dict], columns: list[str] | None = None):
    import pandas as pd

    return pd.DataFrame(rows, columns=columns) if columns else pd.DataFrame(rows)


def main_table(data: RunData) -> list[dict]:
    rows = []
    short = {"prompt_level_strict_acc": "P-strict", "inst_level_strict_acc": "I-strict",
             "prompt_level_loose_acc": "P-loose", "inst_level_loose_acc": "I-loose"}
    for model in data.models:
        row = {"model": model}
        for benchmark in (*MEDICAL, "kg_mcq"):
            r = data.result(model, benchmark)
            row[benchmark] = (_with_ci(r["metrics"]["acc"]["value"], *r["metrics"]["acc"]["ci95"], n=r["n"])
                              if r else "not evaluated")
        med = _medical_items(data, model)
        row["BIOMED pooled"] = _with_ci(pooled(med), *wilson_interval(pooled(med), len(med)), n=len(med)) \
            if med else "–"
        for benchmark in IF_BENCHMARKS:
            r = data.result(model, benchmark)
            name = "IFEval" if benchmark == "ifeval" else "IFBench"
            for metric in IF_METRICS:
                value = r["metrics"][metric] if r else None
                row[f"{name} {short[metric]}"] = ((_with_ci(value["value"], *value["ci95"], n=r["n"])
                                                   if metric == GENERAL_METRIC else _fmt(value["value"], True))
                                                  if r else "not evaluated")
        rows.append(row)
    return rows


def tidy_rows(data: RunData) -> list[dict]:
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
    return rows


def subject_rows(data: RunData) -> list[dict]:
    rows = []
    for model in data.models:
        mmlu = data.result(model, "mmlu_med")
        for subject, v in (mmlu.get("per_subject") or {}).items() if mmlu else ():
            rows.append({"model": model, "benchmark": f"mmlu_med/{subject}", "metric": "acc", "value": v["acc"],
                         "n": v["n"], "ci_low": v["ci95"][0], "ci_high": v["ci95"][1]})
    return rows


def _diff_columns(diff: dict | None) -> dict:
    return {"value": None if diff is None else diff["value"], "n": None if diff is None else diff["n"],
            "ci_low": None if diff is None else diff["ci_low"], "ci_high": None if diff is None else diff["ci_high"],
            "significant": None if diff is None else diff["significant"],
            "mde": None if diff is None else diff["mde"]}


def _diff_cell(diff: dict | None, accuracy: bool = True) -> str:
    if diff is None:
        return "not evaluated"
    if diff["ci_low"] is None:
        return f"{_scaled(diff['value'], accuracy)} (n={diff['n']}, no interval)"
    mark = "" if diff["significant"] else " n.s."
    return f"{_scaled(diff['value'], accuracy)} [{_scaled(diff['ci_low'], accuracy)}, " \
           f"{_scaled(diff['ci_high'], accuracy)}]{mark}"


def _mde_cell(diff: dict | None, target: float | None, accuracy: bool = True) -> str:
    if diff is None:
        return "–"
    if diff["mde"] is None:
        return "undefined (constant differences)" if diff["ci_low"] is not None else "–"
    text = _scaled(diff["mde"], accuracy).lstrip("+")
    if target is None:
        return text
    goal = f"the {100 * target:.0f}-pt target"
    if diff["mde"] > target:  # few differing items understate the spread, so a miss stays a miss
        return f"{text} (misses {goal})"
    if diff["discordant"] < MIN_DISCORDANT_FOR_TARGET:
        items = "item" if diff["discordant"] == 1 else "items"
        return f"{text} (from {diff['discordant']} differing {items}: too few to judge {goal})"
    return f"{text} (meets {goal})"


def _significant(by_pair: dict, capability: str, sign: int) -> bool:
    diff = by_pair[("grpo_full", "base", capability)]["diff"]
    return bool(diff and diff["significant"] and sign * diff["value"] > 0)


def conclusions(data: RunData, comparisons: list[dict], aoc: list[dict]) -> list[str]:
    """Plain sentences that say only what the intervals support."""
    lines = []
    by_pair = {(r["first"], r["second"], r["capability"]): r for r in comparisons}
    if ("grpo_full", "base", "biomed") in by_pair:
        for cap in CAPABILITIES:
            row = by_pair[("grpo_full", "base", cap.key)]
            lines.append(describe_difference(f"grpo_full minus base, {cap.label}", row["diff"], cap.accuracy))
        gains = [c for c in ("biomed", "kg_mcq", "heldout_accuracy") if _significant(by_pair, c, +1)]
        losses = [c for c in ("ifeval", "ifbench") if _significant(by_pair, c, -1)]
        unjudged = [CAPABILITY[c].label for c in ("ifeval", "ifbench")
                    if (by_pair[("grpo_full", "base", c)]["diff"] or {}).get("ci_low") is None]
        verdict = (f"cannot be judged ({', '.join(unjudged)} not evaluated for both)" if unjudged
                   else "met" if gains and not losses else "not met")
        lines.append(f"Target (a significant medical gain of grpo_full over base, no significant loss on IFEval or "
                     f"IFBench strict): {verdict}; significant gains: "
                     f"{', '.join(CAPABILITY[c].label for c in gains) or 'none'}; significant losses: "
                     f"{', '.join(CAPABILITY[c].label for c in losses) or 'none'}.")
    else:
        lines.append("grpo_full or base was not evaluated, so the method's gain is not reported.")
    for first, second in COMPARISONS:
        if (first, second) == ("grpo_full", "base") or (first, second, "biomed") not in by_pair:
            continue
        rows = [by_pair[(first, second, c.key)] for c in CAPABILITIES]
        sig = [f"{r['label']} {_scaled(r['diff']['value'], CAPABILITY[r['capability']].accuracy)}"
               for r in rows if r["diff"] and r["diff"]["significant"]]
        tested = [r["label"] for r in rows if r["diff"] and r["diff"]["ci_low"] is not None]
        name = "Dynamic vs static weights" if second == "grpo_static_weights" else f"{first} vs {second}"
        if sig:
            lines.append(f"{name} ({first} minus {second}): significant on {'; '.join(sig)}; "
                         f"not significant on the other {len(tested) - len(sig)} of {len(tested)} capabilities tested.")
        else:
            lines.append(f"{name} ({first} minus {second}): no significant difference on any of the "
                         f"{len(tested)} capabilities tested ({', '.join(tested) or 'none'}).")
    if ("grpo_full", "grpo_static_weights", "biomed") not in by_pair:
        lines.append("The static-weights ablation was not evaluated, so dynamic and static weights are not compared.")
    for row in aoc:
        if row["variant"] in ("full", "no_aoc"):
            lines.append(f"AOC in grpo_{row['variant']}: S_cos defined on {row['s_cos_defined']} of {row['steps']} "
                         f"steps, penalty fired on {row['fired']} of them, mean |S_cos| "
                         f"{_fmt(row['mean_abs_s_cos'])}.")
    return lines


def _templates():
    from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape

    return Environment(loader=PackageLoader("balancedbio", "templates"), undefined=StrictUndefined,
                       autoescape=select_autoescape(["html"]), keep_trailing_newline=True, trim_blocks=True,
                       lstrip_blocks=True)


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
    tidy, subjects = tidy_rows(data), subject_rows(data)
    comparisons = comparison_rows(data, seed=seed)
    taxes = alignment_tax(data, seed=seed)
    ablations, aoc = ablation_rows(data), aoc_rows(data.dynamics)
    weights_config = (config or {}).get("weights") or {}
    bounds = ((weights_config["min_weight"], weights_config["max_weight"])
              if {"min_weight", "max_weight"} <= set(weights_config) else None)
    steering = steering_rows(data.dynamics, bounds)
    held = heldout_rows(data)
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
    table3 = [r for r in tidy + subjects if r["model"] in ("base", "grpo_full") and
              (r["metric"] == GENERAL_METRIC or r["benchmark"] == "mmlu_med/anatomy")]
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
    frames = {"table1_main": _frame(tidy, TIDY_COLUMNS),
              "paired_differences": _frame([{"comparison": r["comparison"], "capability": r["capability"],
                                             **_diff_columns(r["diff"]), "target_mde": r["target_mde"]}
                                            for r in comparisons],
                                           ["comparison", "capability", "value", "n", "ci_low", "ci_high",
                                            "significant", "mde", "target_mde"]),
              "mmlu_subjects": _frame(subjects, TIDY_COLUMNS),
              "alignment_tax": _frame(tax_rows, TIDY_COLUMNS + ["significant", "mde"]),
              "heldout_rewards": _frame(held, ["model", "component", "mean", "n", "ci_low", "ci_high", "status"]),
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
    findings = conclusions(data, comparisons, aoc) + steering_findings(steering, bounds)

    accuracy = {c.key: c.accuracy for c in CAPABILITIES}
    pct_columns = {"biomed", "kg_mcq", "ifeval", "ifbench"}
    ablation_names = {"biomed": "BIOMED", "ifeval": "IFEval strict", "ifbench": "IFBench strict",
                      "heldout_accuracy": "held-out R_acc", "heldout_instruction": "held-out R_inst"}
    display = [
        Table("Table 1: models x benchmarks (accuracy %, 95% Wilson CI)", _frame(main_table(data))),
        Table("Paired differences per capability (first minus second; paired bootstrap 95% CI)",
              _frame([{"comparison": r["comparison"], "capability": r["label"],
                       "difference [95% CI]": _diff_cell(r["diff"], accuracy[r["capability"]]),
                       "n": r["diff"]["n"] if r["diff"] else "–",
                       "significant": _fmt(r["diff"]["significant"]) if r["diff"] else "–",
                       "min. detectable effect": _mde_cell(r["diff"], r["target_mde"], accuracy[r["capability"]])}
                      for r in comparisons]),
              note=f"Accuracies in points, rewards on their own scale. The minimum detectable effect is "
                   f"(z_0.975 + z_{POWER:g}) x SE of the paired differences: the smallest true difference "
                   f"detected with {100 * POWER:.0f}% power at the 5% level."),
        Table("Alignment tax (eq. 2) and domain gain (paired bootstrap 95% CI, points)",
              _frame([{"model": r["model"], "alignment tax IFEval strict": _diff_cell(r["tax_ifeval"]),
                       "alignment tax IFBench strict": _diff_cell(r["tax_ifbench"]),
                       "domain gain BIOMED": _diff_cell(r["domain_gain"]),
                       "MDE (IFEval / IFBench / BIOMED)": " / ".join(
                           _mde_cell(r[k], None) for k in ("tax_ifeval", "tax_ifbench", "domain_gain"))}
                      for r in taxes]),
              note="Tax = base minus model (positive: the model lost instruction following); gain = model minus base."),
        Table("Held-out rewards (prompts no model trained on; mean, 95% CI)",
              _frame([{"model": r["model"], "component": r["component"] or "–",
                       "mean [95% CI]": _with_ci(r["mean"], r["ci_low"], r["ci_high"], pct=False)
                       if r["status"] == "ok" else "not evaluated",
                       "n": r["n"] if r["n"] is not None else "–",
                       "status": r["status"]} for r in held])),
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
                       "n": r["n"]} for r in subjects])),
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
               "findings": findings, "tables": display, "settings_json": settings_json}
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

"""The learning curves figure: each variant's held-out rewards against the GRPO step, with 95% intervals.

The points are the ``heldout_<component>`` columns of each variant's ``dynamics.jsonl`` (logged every
``grpo.heldout_eval_steps`` steps before the last by ``balancedbio.grpo.curves``). Step 0 is the SFT model
every variant starts from and the last step the trained variant, from their end-point held-out tables
(``results/eval/<model>/heldout_rewards.json``: the same items and generation settings) when the report
has them. Intervals: Wilson (``report.stats.wilson_interval``) for
the 0/1 accuracy reward; the logged Student t interval for the instruction reward (a fraction per prompt).
"""

from __future__ import annotations

import math
from pathlib import Path

from balancedbio.report.stats import wilson_interval

CURVES_FIGURE = "heldout_curves"


def curve_points(rows: list[dict], component: str) -> list[dict]:
    """{step, mean, n, low, high} of the steps where the held-out ``component`` was evaluated."""
    points = []
    for row in rows:
        mean, n = row.get(f"heldout_{component}"), row.get(f"heldout_{component}_n")
        if mean is None or not n:
            continue
        n = int(round(n))
        if component == "accuracy":
            low, high = wilson_interval(mean, n)
        else:
            low, high = row.get(f"heldout_{component}_low"), row.get(f"heldout_{component}_high")
        points.append({"step": row["step"], "mean": mean, "n": n,
                       "low": math.nan if low is None else low, "high": math.nan if high is None else high})
    return points


def table_point(heldout: dict, model: str, component: str, step: int) -> dict | None:
    """A model's end-point held-out reward (rule heldout_rewards) as the curve's point at ``step``."""
    summary = ((heldout.get(model) or {}).get("summary") or {})
    stats = (summary.get("components") or {}).get(component) if summary.get("status") == "ok" else None
    if not stats or not stats.get("n"):
        return None
    low, high = (wilson_interval(stats["mean"], stats["n"]) if component == "accuracy"
                 else (stats.get("ci_low"), stats.get("ci_high")))
    return {"step": step, "mean": stats["mean"], "n": stats["n"], "low": low, "high": high}


def make_curve_figures(data, fig_dir: Path) -> dict[str, str]:
    """The figure (``heldout_curves.png``) and its caption, or nothing when no variant logged curves."""
    from balancedbio.heldout import COMPONENTS  # here: heldout imports report.stats, so report imports it late

    curves = {variant: {c: curve_points(rows, c) for c in COMPONENTS} for variant, rows in data.dynamics.items()}
    curves = {v: points for v, points in curves.items() if any(points.values())}
    if not curves:
        return {}
    from balancedbio.io import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(1, len(COMPONENTS), figsize=(5.0 * len(COMPONENTS) + 1.5, 3.6), squeeze=False,
                             layout="constrained")
    counts = set()
    for ax, component in zip(axes[0], COMPONENTS):
        top = 1.0  # R_reas may exceed 1 (its length term): the axis grows to fit it
        # Step 0 is the SFT model every variant starts from; the last step the trained variant's own table.
        start = table_point(data.heldout, "sft", component, 0)
        for variant, points in sorted(curves.items()):
            last_step = max(row["step"] for row in data.dynamics[variant])
            end = table_point(data.heldout, f"grpo_{variant}", component, last_step)
            points = [p for p in (start, *points[component], end) if p is not None]
            if not points:
                continue
            steps = [p["step"] for p in points]
            line, = ax.plot(steps, [p["mean"] for p in points], marker="o", markersize=3, label=f"grpo_{variant}")
            ax.fill_between(steps, [p["low"] for p in points], [p["high"] for p in points], alpha=0.15,
                            color=line.get_color(), linewidth=0)
            counts.update(p["n"] for p in points)
            top = max([top, *(p[key] for p in points for key in ("mean", "high")
                               if isinstance(p[key], (int, float)) and math.isfinite(p[key]))])
        ax.set_title(f"held-out {component} reward", fontsize=10)
        ax.set_xlabel("GRPO step (0 = the SFT model)")
        ax.set_ylim(0, top if top == 1.0 else top * 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean reward (95% interval)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    fig.suptitle("Learning curves on a fixed held-out set", fontsize=11)
    save_figure(fig, fig_dir / f"{CURVES_FIGURE}.png", dpi=110)
    n_text = ", ".join(str(n) for n in sorted(counts))
    return {CURVES_FIGURE: ("Held-out rewards of each variant every few GRPO steps, on items no variant trained on "
                            f"(n = {n_text} per point), with 95% intervals (Wilson for accuracy, t for reasoning and instruction); "
                            "step 0 is the SFT model all variants start from, the last step each trained model's end-point table. Curves that rise above step 0's "
                            "interval show the loop learning what its rewards reward.")}

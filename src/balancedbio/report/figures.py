"""The report's figures (matplotlib, PNG)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from balancedbio.report.load import COMPARED_CAPABILITIES, COMPARED_CAPABILITY, IF_BENCHMARKS, RunData, _instruction_items, _medical_items
from balancedbio.report.stats import pooled, wilson_interval
from balancedbio.report.tables import _fired


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
        caps = [c for c in COMPARED_CAPABILITIES if any(r["capability"] == c.key and r["diff"] for r in comparisons)]
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
                    # The tables' colours: green / red where the interval excludes 0, grey where not.
                    color = ("tab:gray" if not diff["significant"] else "tab:green" if diff["value"] > 0
                             else "tab:red")
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
            fig.suptitle("Paired differences with 95% CIs (green: first significantly higher, red: lower, "
                         "grey: the interval contains 0)", fontsize=11)
            _save(fig_dir / "differences.png", fig)
            figures["differences"] = "Paired difference per capability and comparison (first minus second)."

    sweep = {int(m[len("grpo_g"):]): m for m in data.models if m.startswith("grpo_g") and m[len("grpo_g"):].isdigit()}
    if sweep:
        fig, axes = _figure(plt, width=6, height=3.6)
        ax = axes[0][0]
        sizes = sorted(sweep)
        for cap in (COMPARED_CAPABILITY["biomed"], COMPARED_CAPABILITY["ifeval"], COMPARED_CAPABILITY["ifbench"]):
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


"""The project's one home for the statistics of accuracies and paired comparisons.

- ``wilson_interval``: the Wilson score interval of a proportion (scipy's ``binomtest``);
- ``paired_difference``: mean(a) - mean(b) over shared items with a paired percentile-bootstrap
  interval (``scipy.stats.bootstrap``) and its minimum detectable effect;
- ``detection_factor`` / ``minimum_detectable_effect``: the normal-approximation power
  calculation used both to size evaluations (``balancedbio.heldout``) and to judge a measured
  difference (the report).

This module imports nothing from the rest of ``balancedbio``, so ``evaluation`` and ``heldout``
can import it without a cycle.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

ALPHA = 0.05  # two-sided test level; the intervals are 1 - ALPHA = 95%
CONFIDENCE = 0.95
POWER = 0.80
BOOTSTRAP_RESAMPLES = 2000
# The comparisons every capability is tested on (first minus second); absent models are skipped.
COMPARISONS = (("sft", "base"), ("grpo_full", "sft"), ("grpo_full", "base"), ("grpo_full", "grpo_static_weights"),
               ("grpo_full", "grpo_gdpo"))
# Issue 15's powered-evaluation targets: a 5-point medical and a 10-point instruction difference;
# issue 23's for the held-out rewards the evidence run is judged on (0.05 on their own scale).
TARGET_MDE = {"biomed": 0.05, "ifeval": 0.10, "ifbench": 0.10, "heldout_accuracy": 0.05, "heldout_instruction": 0.05}
# Below this many items that differ, the spread of the paired differences (and so the MDE) is
# estimated from too few values to say that a sample size meets its target: at n = 32 one
# differing item gives an MDE of 8.8 points, four give 17.5.
MIN_DISCORDANT_FOR_TARGET = 5


def pooled(scores: dict[str, float]) -> float | None:
    return sum(scores.values()) / len(scores) if scores else None


# -- single proportions ----------------------------------------------------------------------

def wilson_interval(p: float, n: int, confidence: float = CONFIDENCE) -> list[float]:
    """Wilson score interval of a proportion ``p`` of ``n`` (well-behaved at 0 and 1, unlike
    p +- 1.96 se); [nan, nan] for n = 0. ``p * n`` must be a count: every caller passes the
    share of items (or instructions) that passed."""
    if n == 0:
        return [math.nan, math.nan]
    successes = round(p * n)
    if abs(p * n - successes) > 1e-6 * max(1, n):
        raise ValueError(f"wilson_interval: p * n = {p * n:g} is not a count of successes (p={p!r}, n={n})")
    ci = stats.binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return [float(ci.low), float(ci.high)]


# -- power -----------------------------------------------------------------------------------

def detection_factor(alpha: float = ALPHA, power: float = POWER) -> float:
    """z_{1-alpha/2} + z_{power}: the minimum detectable effect of an estimate in units of its
    standard error (two-sided test at level ``alpha``, detection probability ``power``)."""
    return float(stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power))


def minimum_detectable_effect(n: int, p_discordant: float, alpha: float = ALPHA,
                              power: float = POWER) -> float:
    """Smallest paired difference in accuracy that ``n`` items detect (two-sided McNemar, normal approx.).

    Two models scored on the same ``n`` items differ on a fraction ``p_discordant`` of them
    (one right, the other wrong). Under the normal approximation the difference of their
    accuracies has standard error ``sqrt(p_discordant / n)`` near the null, so the difference a
    two-sided test at level ``alpha`` detects with probability ``power`` is
    ``detection_factor(alpha, power) * sqrt(p_discordant / n)``. ``paired_difference`` applies
    the same factor to the observed standard error of the differences.
    """
    if n <= 0:
        raise ValueError(f"minimum_detectable_effect: n must be positive, got {n}")
    if not 0 <= p_discordant <= 1:
        raise ValueError(f"minimum_detectable_effect: p_discordant must be in [0, 1], got {p_discordant}")
    return detection_factor(alpha, power) * math.sqrt(p_discordant / n)


# -- paired differences ----------------------------------------------------------------------

def paired_difference(a: dict[str, float], b: dict[str, float], *, confidence: float = CONFIDENCE,
                      power: float = POWER, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict | None:
    """mean(a) - mean(b) over the items both have: a paired percentile-bootstrap interval, whether
    it excludes 0, and the minimum detectable effect ``detection_factor * SE`` from the standard
    error of the paired differences (for 0/1 scores that spread comes only from the discordant
    items, which makes it ``minimum_detectable_effect`` at the observed discordance)."""
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
        ci = stats.bootstrap((diffs,), np.mean, vectorized=True, n_resamples=n_resamples,
                             confidence_level=confidence, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    se = 0.0 if constant else float(diffs.std(ddof=1) / math.sqrt(len(keys)))
    row.update(ci_low=low, ci_high=high, significant=not (low <= 0.0 <= high), se=se,
               # Constant differences (e.g. no discordant item) say nothing about the spread: no MDE.
               mde=detection_factor(1 - confidence, power) * se if se > 0 else None)
    return row

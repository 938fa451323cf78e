"""Statistics of the report: pooled accuracy, paired bootstrap differences, minimum detectable effects."""

from __future__ import annotations

import math

import numpy as np

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



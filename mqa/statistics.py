"""Seed statistics for sweeps: means with Student-t 95% intervals, and seed-paired differences.

A configuration trained with seeds 0..n-1 gives n held-out losses x_1..x_n. Its summary is
the mean, the sample standard deviation s (n - 1 in the denominator) and the half-width
t_{0.975, n-1} * s / sqrt(n) of the 95% interval of the mean. Two configurations trained
with the same seeds see the same batches in the same order (batches depend only on
(seed, step)), so their losses are compared seed by seed: the differences d_i = x_i - b_i
against the baseline b, summarised the same way (a paired t interval). A difference is
*resolved* when its interval excludes zero.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def interval_half_width(values: Sequence[float], confidence: float = CONFIDENCE) -> float | None:
    """Half-width of the Student-t interval of the mean of `values`; None for fewer than 2."""
    n = len(values)
    if n < 2:
        return None
    sd = float(np.std(values, ddof=1))
    return float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def summarize(values: Sequence[float]) -> dict:
    """{"n", "mean", "sd" (sample, ddof 1), "ci95" (half-width)}; sd and ci95 are None
    for a single value."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    return {"n": n, "mean": float(np.mean(values)),
            "sd": float(np.std(values, ddof=1)) if n > 1 else None,
            "ci95": interval_half_width(values)}


def paired_difference(by_seed: Mapping[int, float], baseline_by_seed: Mapping[int, float]) -> dict:
    """Seed-paired difference `by_seed - baseline_by_seed` over the seeds both have:
    {"n", "mean", "sd", "ci95", "resolved"}; resolved: the interval excludes zero (None
    when there is no interval)."""
    seeds = sorted(set(by_seed) & set(baseline_by_seed))
    result = summarize([by_seed[s] - baseline_by_seed[s] for s in seeds])
    ci = result["ci95"]
    result["resolved"] = None if ci is None else bool(abs(result["mean"]) > ci)
    return result


def seeds_for_half_width(sd: float, half_width: float, confidence: float = CONFIDENCE) -> int:
    """The fewest seeds n >= 2 whose t interval of a mean with standard deviation `sd`
    has at most `half_width`: how many seeds a target precision needs."""
    n = 2
    while n < 100_000 and float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) > half_width:
        n += 1
    return n

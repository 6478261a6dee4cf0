"""Seed statistics for sweeps: means with Student-t 95% intervals, seed-paired differences
with their t-test p-values, and Holm's correction of a family of p-values.

A configuration trained with seeds 0..n-1 gives n held-out losses x_1..x_n. Its summary is
the mean, the sample standard deviation s (n - 1 in the denominator) and the half-width
t_{0.975, n-1} * s / sqrt(n) of the 95% interval of the mean. Two configurations trained
with the same seeds see the same batches in the same order (batches depend only on
(seed, step)), so their losses are compared seed by seed: the differences d_i = x_i - b_i
against the baseline b, summarised the same way (a paired t interval), with the two-sided
p-value of the paired t-test, t = mean(d) / (s_d / sqrt(n)) on n - 1 degrees of freedom.
The interval excludes zero exactly when p < 0.05.

A sweep makes many such comparisons; `holm` adjusts their p-values together (Holm 1979):
sorted as p_(1) <= ... <= p_(m), the i-th becomes max over j <= i of min(1, (m - j + 1)
p_(j)). Calling a comparison *resolved* when its adjusted p is below ALPHA keeps the
chance of calling any of the m resolved, when none of the differences is real, at most
ALPHA, whatever the dependence between them.

For planning the next experiment rather than reading this one: `seeds_for_half_width`
(seeds for an interval this narrow) and `seeds_for_power` (seeds at which a paired t-test
resolves a given true difference with a given probability, exact from the noncentral t).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import scipy.stats

CONFIDENCE = 0.95
ALPHA = 0.05  # a comparison is resolved when its Holm-adjusted p-value is below this


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


def t_test_p(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of the one-sample t-test that `differences` have mean zero (for
    seed-paired differences: the paired t-test); None for fewer than 2 values. When all
    differences are equal (sd 0) t is 0/0 or infinite: p is 1.0 if they are all zero, else 0.0."""
    n = len(differences)
    if n < 2:
        return None
    mean, sd = float(np.mean(differences)), float(np.std(differences, ddof=1))
    if sd == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2.0 * scipy.stats.t.sf(abs(t), n - 1))


def paired_difference(by_seed: Mapping[int, float], baseline_by_seed: Mapping[int, float]) -> dict:
    """Seed-paired difference `by_seed - baseline_by_seed` over the seeds both have:
    {"n", "mean", "sd", "ci95", "p", "resolved"}; p: the two-sided paired t-test's
    (`t_test_p`); resolved: the 95% interval excludes zero (p < 0.05), uncorrected for
    other comparisons (a sweep's tables resolve with `holm` instead). p and resolved are
    None with fewer than 2 seeds."""
    seeds = sorted(set(by_seed) & set(baseline_by_seed))
    differences = [by_seed[s] - baseline_by_seed[s] for s in seeds]
    result = summarize(differences)
    ci = result["ci95"]
    result["p"] = t_test_p(differences)
    result["resolved"] = None if ci is None else bool(abs(result["mean"]) > ci)
    return result


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm's step-down adjustment of a family of p-values, in their order: the i-th
    smallest of the m becomes max over j <= i of min(1, (m - j + 1) p_(j)). None entries
    (comparisons without a p-value) are not in the family and stay None."""
    ranked = sorted((p, index) for index, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, index) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        adjusted[index] = running
    return adjusted


def seeds_for_half_width(sd: float, half_width: float, confidence: float = CONFIDENCE) -> int:
    """The fewest seeds n >= 2 whose t interval of a mean with standard deviation `sd`
    has at most `half_width`: how many seeds a target precision needs."""
    n = 2
    while n < 100_000 and float(scipy.stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n) > half_width:
        n += 1
    return n


def paired_t_power(difference: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """The chance that a two-sided paired t-test at level alpha over n seeds resolves a true
    mean difference `difference` when the seed-paired differences have standard deviation
    `sd`: exact, from the noncentral t distribution (noncentrality difference / (sd /
    sqrt(n)) on n - 1 degrees of freedom)."""
    df, noncentrality = n - 1, abs(difference) * math.sqrt(n) / sd
    critical = float(scipy.stats.t.ppf(1 - alpha / 2, df))
    return float(scipy.stats.nct.sf(critical, df, noncentrality)
                 + scipy.stats.nct.cdf(-critical, df, noncentrality))


def seeds_for_power(difference: float, sd: float, alpha: float = ALPHA, power: float = 0.8,
                    most: int = 100_000) -> int | None:
    """The fewest seeds n >= 2 at which a paired t-test at level alpha resolves a true
    difference `difference` (seed-paired sd `sd`) with at least `power`; None when not even
    `most` do (a zero difference). For a family of m tests, alpha / m bounds what Holm's
    correction asks of the first one. A zero sd resolves any nonzero difference: 2."""
    if difference == 0:
        return None
    if sd == 0:
        return 2
    low, high = 2, 2
    while paired_t_power(difference, sd, high, alpha) < power:
        if high >= most:
            return None
        low, high = high, min(most, high * 2)
    while low < high:  # power grows with n: the first n that reaches it
        middle = (low + high) // 2
        low, high = (middle + 1, high) if paired_t_power(difference, sd, middle, alpha) < power else (low, middle)
    return low

"""The comparisons a sweep tests, as one family whose p-values are Holm-adjusted together.

The family (`comparison_family`) is every configuration against the baseline, then the
contrasts the config declares (`sweep.contrasts`), then those --compare adds: a pair
counts once, whichever way round and however often it is named (A - B and B - A are one
test with one p-value). Each comparison is the seed-paired difference of a held-out metric
with its two-sided paired t-test (`mqa.statistics.paired_difference`); the family's
p-values are adjusted with `mqa.statistics.holm`, separately for each metric (the loss and
bits per byte measure the same thing, per token and per byte, so they are not further
questions), and a comparison is *resolved* when its adjusted p is below
`mqa.statistics.ALPHA` (0.05). A comparison with fewer than 2 seeds has no p-value and is
left out of the family (resolved None).
"""

from __future__ import annotations

from typing import Iterable

from mqa import statistics as stats


def comparison_family(configurations: Iterable[str], baseline: str,
                      contrasts: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Every configuration but the baseline against it, then `contrasts` (declared first,
    then --compare's), each unordered pair once, in that order."""
    pairs = [(name, baseline) for name in configurations if name != baseline]
    family, seen = [], set()
    for pair in [*pairs, *contrasts]:
        if frozenset(pair) not in seen:
            seen.add(frozenset(pair))
            family.append(pair)
    return family


def by_seed(seed_rows: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """{configuration: {seed: the metric}} from results_by_seed rows."""
    values: dict[str, dict[int, float]] = {}
    for row in seed_rows:
        values.setdefault(row["configuration"], {})[row["seed"]] = row[metric]
    return values


def tested_differences(seed_rows: list[dict], family: list[tuple[str, str]],
                       metric: str) -> dict[frozenset, dict]:
    """{frozenset((A, B)): {"p", "p_holm", "resolved"}} for every pair of the family: the
    paired t-test's p of `metric` between A and B (the same either way round), its Holm
    adjustment over the family, and whether that is below ALPHA (None without a p)."""
    values = by_seed(seed_rows, metric)
    p_values = [stats.paired_difference(values[a], values[b])["p"] for a, b in family]
    adjusted = stats.holm(p_values)
    return {frozenset((a, b)): {"p": p, "p_holm": p_holm,
                                "resolved": None if p_holm is None else bool(p_holm < stats.ALPHA)}
            for (a, b), p, p_holm in zip(family, p_values, adjusted)}


def compared(seed_rows: list[dict], family: list[tuple[str, str]], metric: str,
             pairs: Iterable[tuple[str, str]]) -> list[dict]:
    """For each (A, B) of `pairs` (each in the family, either way round): the seed-paired
    difference A - B of `metric` ({"n", "mean", "sd", "ci95"}) with the family's "p",
    "p_holm" and "resolved"."""
    values = by_seed(seed_rows, metric)
    tests = tested_differences(seed_rows, family, metric)
    rows = []
    for a, b in pairs:
        difference = stats.paired_difference(values[a], values[b])
        rows.append({key: difference[key] for key in ("n", "mean", "sd", "ci95")}
                    | tests[frozenset((a, b))])
    return rows

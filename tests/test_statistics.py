"""Seed statistics against independent references: a hand-worked t-table example,
scipy's paired t-test (its interval and p-value, computed its own way), and Holm's
adjustment worked by hand on fixed vectors."""

import math

import numpy as np
import pytest
import scipy.stats

from mqa import statistics as stats


def test_interval_matches_a_hand_worked_t_table_example():
    # Four values: mean 2.0, deviations -1.5, -0.5, 0.5, 1.5, sum of squares 5, s^2 = 5/3.
    # t_{0.975, 3} = 3.182 (printed t tables); half-width = 3.182 * sqrt(5/3) / 2 = 2.054.
    summary = stats.summarize([0.5, 1.5, 2.5, 3.5])
    assert summary["n"] == 4 and summary["mean"] == pytest.approx(2.0)
    assert summary["sd"] == pytest.approx(math.sqrt(5 / 3))
    assert summary["ci95"] == pytest.approx(3.182 * math.sqrt(5 / 3) / 2, abs=1e-3)


def test_single_value_has_no_interval():
    assert stats.summarize([1.25]) == {"n": 1, "mean": 1.25, "sd": None, "ci95": None}
    assert stats.paired_difference({0: 2.0}, {0: 1.0})["resolved"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_difference_is_scipys_paired_t_interval(seed):
    rng = np.random.default_rng(seed)
    baseline = rng.normal(2.0, 0.05, size=6)
    other = baseline + rng.normal(0.02, 0.01, size=6) + rng.normal(0, 0.03)  # correlated
    diff = stats.paired_difference(dict(enumerate(other)), dict(enumerate(baseline)))
    low, high = scipy.stats.ttest_rel(other, baseline).confidence_interval(0.95)
    assert diff["n"] == 6
    assert diff["mean"] - diff["ci95"] == pytest.approx(low, rel=1e-9)
    assert diff["mean"] + diff["ci95"] == pytest.approx(high, rel=1e-9)
    assert diff["resolved"] == (low > 0 or high < 0)
    # Pairing matters: the unpaired interval of the two means is wider here.
    unpaired = scipy.stats.ttest_ind(other, baseline).confidence_interval(0.95)
    assert unpaired.high - unpaired.low > high - low


def test_pairs_only_the_seeds_both_have():
    diff = stats.paired_difference({0: 1.0, 1: 2.0, 2: 3.5, 5: 9.0}, {0: 0.5, 1: 1.0, 2: 2.0})
    assert diff["n"] == 3
    assert diff["mean"] == pytest.approx(np.mean([0.5, 1.0, 1.5]))
    low, high = scipy.stats.ttest_1samp([0.5, 1.0, 1.5], 0.0).confidence_interval(0.95)
    assert diff["ci95"] == pytest.approx((high - low) / 2)
    assert diff["resolved"] is bool(low > 0)


def test_baseline_against_itself_is_zero_and_unresolved():
    values = {0: 1.9, 1: 2.0, 2: 2.1}
    diff = stats.paired_difference(values, values)
    assert diff["mean"] == 0.0 and diff["ci95"] == 0.0 and diff["resolved"] is False


def test_seeds_needed_for_a_target_interval():
    # The measurement: paired sd 0.036 needs ~25 seeds for +-0.015.
    n = stats.seeds_for_half_width(0.036, 0.015)
    assert scipy.stats.t.ppf(0.975, n - 1) * 0.036 / math.sqrt(n) <= 0.015
    assert scipy.stats.t.ppf(0.975, n - 2) * 0.036 / math.sqrt(n - 1) > 0.015
    assert 20 <= n <= 30


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_p_value_is_scipys_two_sided_paired_t_test(seed):
    rng = np.random.default_rng(seed)
    n = 3 + seed
    baseline = rng.normal(2.0, 0.05, size=n)
    other = baseline + rng.normal(0.01 * seed, 0.02, size=n)
    diff = stats.paired_difference(dict(enumerate(other)), dict(enumerate(baseline)))
    expected = scipy.stats.ttest_rel(other, baseline, alternative="two-sided").pvalue
    assert diff["p"] == pytest.approx(expected, rel=1e-9)
    assert diff["resolved"] == bool(expected < 0.05)  # the interval excludes zero exactly then
    # The same test either way round.
    reverse = stats.paired_difference(dict(enumerate(baseline)), dict(enumerate(other)))
    assert reverse["p"] == pytest.approx(diff["p"], rel=1e-12)


def test_p_value_edge_cases():
    assert stats.t_test_p([0.3]) is None and stats.t_test_p([]) is None
    assert stats.paired_difference({0: 2.0}, {0: 1.0})["p"] is None
    assert stats.t_test_p([0.0, 0.0, 0.0]) == 1.0      # identical runs: no evidence
    assert stats.t_test_p([0.25, 0.25, 0.25]) == 0.0   # a constant non-zero difference
    # Two values: t = mean / (sd / sqrt 2) on 1 degree of freedom, by hand.
    d = [0.1, 0.3]
    t = 0.2 / (math.sqrt(0.02) / math.sqrt(2))
    assert stats.t_test_p(d) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-12)


def test_holm_step_down_on_fixed_vectors():
    # m = 5. Sorted: 0.001, 0.01, 0.02, 0.04, 0.3 -> times 5, 4, 3, 2, 1:
    # 0.005, 0.04, 0.06, 0.08, 0.3, each then raised to the largest before it (monotone).
    p = [0.02, 0.3, 0.001, 0.04, 0.01]
    assert stats.holm(p) == pytest.approx([0.06, 0.3, 0.005, 0.08, 0.04], rel=1e-12)
    # The step-down's running maximum. Sorted 0.012, 0.013, 0.05 -> times 3, 2, 1: 0.036,
    # 0.026 -> 0.036 (never below the one before), 0.05.
    assert stats.holm([0.05, 0.012, 0.013]) == pytest.approx([0.05, 0.036, 0.036], rel=1e-12)
    # Capped at 1; None is not in the family (m = 2 here); a family of one is left alone.
    assert stats.holm([0.7, None, 0.6]) == pytest.approx([1.0, None, 1.0]) and \
        stats.holm([0.7, None, 0.6])[1] is None
    assert stats.holm([0.03]) == [0.03]
    assert stats.holm([]) == []
    # Ties: 0.01 * 3 = 0.03 for the first, 0.01 * 2 raised to 0.03 for the second.
    assert stats.holm([0.01, 0.01, 0.5]) == pytest.approx([0.03, 0.03, 0.5], rel=1e-12)


def test_holm_never_lowers_a_p_and_is_below_bonferroni():
    rng = np.random.default_rng(7)
    p = list(rng.uniform(0, 0.2, size=12))
    adjusted = stats.holm(p)
    for raw, adj in zip(p, adjusted):
        assert raw <= adj <= min(1.0, 12 * raw) + 1e-15
    order = np.argsort(p)
    assert all(np.diff(np.array(adjusted)[order]) >= 0)  # monotone in the raw p


@pytest.mark.parametrize("difference, sd, n, alpha", [(0.01, 0.02, 11, 0.05), (0.015, 0.02, 6, 0.05),
                                                      (-0.012, 0.011, 16, 0.05 / 18)])
def test_paired_t_power_is_the_rate_at_which_simulated_paired_tests_resolve(difference, sd, n, alpha):
    # Independent reference: many simulated experiments of n seed-paired differences drawn
    # around the true difference, each tested with scipy's paired t-test.
    rng = np.random.default_rng(7)
    trials = 20_000
    baseline = rng.normal(1.6, 0.05, size=(trials, n))
    other = baseline + rng.normal(difference, sd, size=(trials, n))
    resolved = scipy.stats.ttest_rel(other, baseline, axis=1).pvalue < alpha
    simulated = resolved.mean()
    assert abs(stats.paired_t_power(difference, sd, n, alpha) - simulated) < 4 * math.sqrt(
        simulated * (1 - simulated) / trials) + 1e-3


def test_seeds_for_power_is_the_first_seed_count_that_reaches_the_power():
    n = stats.seeds_for_power(0.0124, 0.0109, alpha=0.05 / 18)
    assert stats.paired_t_power(0.0124, 0.0109, n, 0.05 / 18) >= 0.8
    assert stats.paired_t_power(0.0124, 0.0109, n - 1, 0.05 / 18) < 0.8
    # The normal approximation ((z_{1-alpha/2} + z_power) sd / difference)^2 knows the sd
    # exactly, so it needs no more seeds than the t-test, and a few fewer at small n.
    for difference in (0.0124, 0.0062, 0.002):
        z = scipy.stats.norm.ppf(1 - 0.05 / 36) + scipy.stats.norm.ppf(0.8)
        normal = math.ceil((z * 0.0109 / difference) ** 2)
        assert normal <= stats.seeds_for_power(difference, 0.0109, alpha=0.05 / 18) <= normal + 6
    assert stats.seeds_for_power(0.0, 0.01) is None
    assert stats.seeds_for_power(0.01, 0.0) == 2  # identical runs but for a constant shift
    assert stats.seeds_for_power(0.0001, 0.05, most=1000) is None

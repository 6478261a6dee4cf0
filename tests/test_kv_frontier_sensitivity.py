"""benchmarks/kv_frontier_sensitivity.py on a toy sweep's records: the rates two tuning seeds
choose (the first seed's where the second has not finished), the declared tests at those
rates against scipy's paired t-test and a Holm adjustment written out here, pending tests
kept in the family at p = 1, and its one-line refusal."""

import csv
import json

import numpy as np
import pytest
import scipy.stats

from benchmarks import kv_frontier_sensitivity
from commands import usage_error

CONFIG = '''
import ml_collections
from configs import default

def get_config():
    config = default.get_config()
    config.sweep = ml_collections.ConfigDict({{
        "points": [{{"name": "A", "model.num_kv_heads": 4}}, {{"name": "B", "model.num_kv_heads": 1}},
                   {{"name": "C", "model.num_kv_heads": 2}}],
        "train.seed": [0, 1, 2, 3],
        "tune": {{"train.learning_rate": [0.001, 0.002]}},
        "contrasts": ["B:C", "A:B"],
        "record": {record!r},
    }}, allow_dotted_keys=True)
    return config
'''

# tuning-half losses {arm: {rate: {tuning seed: loss}}}: A's first seed takes 0.001, the
# two seeds' mean 0.002; B has only its first seed (pending: 0.001); C takes 0.002 on both.
TUNING = {"A": {0.001: {1000: 1.50, 1001: 1.60}, 0.002: {1000: 1.51, 1001: 1.52}},
          "B": {0.001: {1000: 1.40}, 0.002: {1000: 1.45}},
          "C": {0.001: {1000: 1.70, 1001: 1.71}, 0.002: {1000: 1.65, 1001: 1.66}}}


def write(path, halves):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"result": {"halves": halves}}))


def test_two_seed_rates_and_the_declared_family(tmp_path, capsys):
    record = tmp_path / "records"
    for arm, rates in TUNING.items():
        for rate, seeds in rates.items():
            for seed, loss in seeds.items():
                write(record / "tuning" / f"{arm}__learning_rate={rate}__seed={seed}.json",
                      {"tuning": {"eval_loss": loss}})
    rng = np.random.default_rng(0)
    test = {(arm, rate): 1.6 + 0.01 * rng.normal(size=4) for arm in "ABC" for rate in (0.001, 0.002)}
    for (arm, rate), losses in test.items():
        if (arm, rate) == ("C", 0.001):
            continue  # never chosen: its reporting runs need not exist
        for seed, loss in enumerate(losses):
            write(record / f"{arm}__learning_rate={rate}__seed={seed}.json", {"test": {"eval_loss": float(loss)}})
    config = tmp_path / "sweep_toy.py"
    config.write_text(CONFIG.format(record=str(record)))
    rows = kv_frontier_sensitivity.main([f"--config={config}", f"--out={tmp_path / 'out'}"])
    capsys.readouterr()

    # the family: B - A, C - A, then the contrasts B - C (A - B is B - A again)
    assert [(r["configuration"], r["against"]) for r in rows] == [("B", "A"), ("C", "A"), ("B", "C")]
    rates = {r["configuration"]: r["rate"] for r in rows} | {"A": rows[0]["against_rate"]}
    assert rates == {"A": 0.002, "B": 0.001, "C": 0.002}
    assert [r["pending"] for r in rows] == [True, False, True]  # B's second seed is missing
    p_values = []
    for row in rows:
        mine, theirs = test[(row["configuration"], row["rate"])], test[(row["against"], row["against_rate"])]
        expected = scipy.stats.ttest_rel(mine, theirs)
        low, high = expected.confidence_interval(0.95)
        assert row["diff"] == pytest.approx(np.mean(mine - theirs)) and row["n"] == 4
        assert row["ci95"] == pytest.approx((high - low) / 2) and row["p"] == pytest.approx(expected.pvalue)
        p_values.append(expected.pvalue)
        # seeds for 80% power against a true 0.01 nats at level 0.05 / 3, from the noncentral t
        sd, n = np.std(mine - theirs, ddof=1), row["seeds_for_0.01"]
        power = [scipy.stats.nct.sf(scipy.stats.t.ppf(1 - 0.05 / 6, k - 1), k - 1, 0.01 * np.sqrt(k) / sd)
                 + scipy.stats.nct.cdf(-scipy.stats.t.ppf(1 - 0.05 / 6, k - 1), k - 1, 0.01 * np.sqrt(k) / sd)
                 for k in (n - 1, n)]
        assert power[0] < 0.8 <= power[1]
    order = np.argsort(p_values)  # Holm, written out: the k-th smallest times (m - k), running max
    adjusted, running = [0.0] * 3, 0.0
    for k, index in enumerate(order):
        running = max(running, min(1.0, (3 - k) * p_values[index]))
        adjusted[index] = running
    assert [r["p_holm"] for r in rows] == pytest.approx(adjusted)
    # the primary analysis: A at its first seed's 0.001
    primary = scipy.stats.ttest_rel(test[("B", 0.001)], test[("A", 0.001)])
    assert rows[0]["primary_diff"] == pytest.approx(np.mean(test[("B", 0.001)] - test[("A", 0.001)]))
    assert primary.pvalue <= rows[0]["primary_p_holm"] <= 1
    written = list(csv.DictReader((tmp_path / "out" / "comparisons.csv").open()))
    assert [w["configuration"] for w in written] == ["B", "C", "B"]
    assert (tmp_path / "out" / "comparisons.md").read_text().count("\n") == 5
    # the rates: only A moved, and its move is scored on its reporting seeds at both rates
    rates = {r["configuration"]: r for r in csv.DictReader((tmp_path / "out" / "rates.csv").open())}
    assert [(r["first_seed_rate"], r["two_seed_rate"], r["pending"]) for r in rates.values()] == [
        ("0.001", "0.002", "False"), ("0.001", "0.001", "True"), ("0.002", "0.002", "False")]
    moved = scipy.stats.ttest_rel(test[("A", 0.002)], test[("A", 0.001)])
    assert float(rates["A"]["change"]) == pytest.approx(np.mean(test[("A", 0.002)] - test[("A", 0.001)]))
    assert float(rates["A"]["change_p"]) == pytest.approx(moved.pvalue)
    assert rates["B"]["change"] == rates["C"]["change"] == ""

    # C's reporting runs at 0.002 gone: C - A and B - C are pending, kept in the family at p = 1
    for seed in range(4):
        (record / f"C__learning_rate=0.002__seed={seed}.json").unlink()
    rows = kv_frontier_sensitivity.main([f"--config={config}", f"--out={tmp_path / 'out'}"])
    assert [r["diff"] is None for r in rows] == [False, True, True] and rows[1]["p"] == 1.0
    assert rows[0]["p_holm"] == pytest.approx(min(1.0, 3 * rows[0]["p"]))


def test_a_config_that_tunes_nothing_is_a_one_line_error(capsys):
    assert "needs a field to tune" in usage_error(kv_frontier_sensitivity.main, ["--config=configs/tiny.py"], capsys)

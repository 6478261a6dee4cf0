"""The sweep: point expansion and naming, its options' errors, and tiny sweeps end to end
(in this process, through `run_sweep`; sweep.py itself for its flags and one-line errors)."""

import csv
import json
import os
import re
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import scipy.stats

from mqa import accounting
from mqa.config import build_model_config, ConfigError, ModelConfig, get_dotted, load_config_file, set_dotted
from mqa.sweep import results as sweep_results
from mqa.sweep.points import (compared_pairs, configurations, parse_sweep_flags, point_name,
                              points, sweep_fields, training_config, with_seeds)
from mqa.sweep.run import run_sweep
from tests.test_train_cli import REPO, assert_one_line_error

# configs/tiny.py with 4 query heads of 12 dimensions: removing K/V heads frees a multiple
# of 3 * d_model parameters per layer, so match_mha_params gives exactly equal counts.
# Four steps, one periodic and one final evaluation of 1,024 tokens.
TINY = ["model.d_model=48", "model.head_dim=12", "model.mlp_dim=144",
        "model.match_mha_params=true", "train.steps=4", "train.log_every=2",
        "train.eval_every=4", "train.eval_batches=1", "train.final_eval_tokens=1024",
        "checkpoint.every=4"]
DECODE = dict(decode_batch=2, decode_context=64)
TINY_FLAGS = ["--config=configs/tiny.py", *(f"--config.{item}" for item in TINY),
              "--decode_batch=2", "--decode_context=64"]
SUMMARY = [f"{metric}_{part}" for metric in ("eval_loss", "eval_bits_per_byte")
           for part in ("mean", "sd", "ci95", "diff", "diff_ci95", "diff_resolved")]
EXPECTED_COLUMNS = ["configuration", "attention", "num_kv_heads", "mlp_dim", "params",
                    "kv_cache_bytes_per_token", "n", *SUMMARY, "train_tokens_per_sec",
                    "decode_context", "decode_tokens_per_sec"]
EXPECTED_SEED_COLUMNS = ["point", "configuration", "seed", "attention", "num_kv_heads", "mlp_dim",
                         "params",
                         "kv_cache_bytes_per_token", "eval_loss", "eval_perplexity",
                         "eval_bits_per_byte", "eval_tokens", "train_tokens_per_sec",
                         "decode_context", "decode_tokens_per_sec"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sweep_py(workdir, *args, timeout=300):
    """sweep.py in a subprocess: for what the command line itself does."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "sweep.py", f"--workdir={workdir}", *args], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def tiny_config(*overrides, **sweep):
    config = load_config_file(REPO / "configs" / "tiny.py", overrides)
    if sweep:
        config.sweep = ml_collections.ConfigDict(sweep, allow_dotted_keys=True)
    return config


def test_points_are_the_cartesian_product_in_a_stable_order():
    config = tiny_config(**{"train.seed": [0, 1], "model.num_kv_heads": [4, 2, 1]})
    fields = sweep_fields(config)
    assert fields == {"model.num_kv_heads": [4, 2, 1], "train.seed": [0, 1]}  # sorted by name
    plan = points(config, fields)
    assert [p.name for p in plan] == [
        "num_kv_heads=4__seed=0", "num_kv_heads=4__seed=1", "num_kv_heads=2__seed=0",
        "num_kv_heads=2__seed=1", "num_kv_heads=1__seed=0", "num_kv_heads=1__seed=1"]
    assert [(p.config.model.num_kv_heads, p.config.train.seed) for p in plan] == [
        (4, 0), (4, 1), (2, 0), (2, 1), (1, 0), (1, 1)]
    assert all("sweep" not in p.config for p in plan)
    assert "sweep" in config and config.model.num_kv_heads == 2  # the base is left alone


def test_nested_sweep_sections_equal_dotted_names():
    config = tiny_config()
    config.sweep = {"model": {"num_kv_heads": (2, 1)}}
    assert sweep_fields(config) == {"model.num_kv_heads": [2, 1]}
    assert "sweep" not in training_config(config)


def test_point_names():
    assert point_name({"model.num_kv_heads": 8}) == "num_kv_heads=8"
    assert point_name({"model.match_mha_params": True, "data.path": "a/b c.txt"}) \
        == "match_mha_params=true__path=a_b_c.txt"
    assert point_name({"model.dtype": "float32", "train.dtype": "x"}) \
        == "model.dtype=float32__train.dtype=x"  # the same last part: full names


def test_sweep_flags_read_values_like_config_overrides():
    config = tiny_config()
    assert parse_sweep_flags(["model.num_kv_heads=4,2, 1", "model.match_mha_params=true,false",
                              "train.learning_rate=1e-3"], config) == {
        "model.num_kv_heads": [4, 2, 1], "model.match_mha_params": [True, False],
        "train.learning_rate": [1e-3]}


@pytest.mark.parametrize("fields,fragments", [
    ({"model.num_kv_heads": [2, 3]}, ["num_kv_heads=3", "must divide model.num_heads=4"]),
    ({"model.num_kv_head": [1]}, ["model.num_kv_head", "did you mean 'num_kv_heads'"]),
    ({"modle.num_kv_heads": [1]}, ["'modle'", "did you mean 'model'"]),
    ({"model.num_kv_heads": ["two"]}, ["model.num_kv_heads='two'", "expected int"]),
    ({"model": [1]}, ["'model' is a section"]),
    ({"model.num_kv_heads": []}, ["has no values"]),
    ({}, ["no sweep"]),
])
def test_bad_sweeps_name_the_field(fields, fragments):
    with pytest.raises(ConfigError) as error:
        points(tiny_config(), fields)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_sweep_py_reports_a_bad_sweep_flag_in_one_line_before_creating_anything(tmp_path):
    result = sweep_py(tmp_path / "a", "--config=configs/tiny.py", "--sweep=model.num_kv_heds=2,1")
    assert_one_line_error(result, "model.num_kv_heds", "did you mean 'num_kv_heads'")
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("options,fragments", [
    (dict(sweep=["model.num_kv_heds=2,1"]), ["model.num_kv_heds", "did you mean 'num_kv_heads'"]),
    (dict(sweep=["model.num_kv_heads=2,3"]), ["sweep point num_kv_heads=3", "must divide"]),
    (dict(), ["no sweep"]),
    (dict(sweep=["model.num_kv_heads=2,1"], seeds=0), ["--seeds=0 must be >= 1"]),
    (dict(sweep=["model.num_kv_heads=2,1"], seeds=-2), ["--seeds=-2 must be >= 1"]),
    (dict(sweep=["model.num_kv_heads=2,1"], baseline=["model.num_kv_heads=4"]),
     ["--baseline model.num_kv_heads=4 matches no configuration",
      "num_kv_heads=2, num_kv_heads=1"]),
    (dict(sweep=["model.num_kv_heads=2,1"], baseline=["model.num_kv_head=2"]),
     ["model.num_kv_head", "did you mean 'num_kv_heads'"]),
    (dict(sweep=["model.num_kv_heads=2,1"], compare=["num_kv_heads=2"]),
     ["--compare", "CONFIGURATION:AGAINST", "num_kv_heads=1"]),
    (dict(sweep=["model.num_kv_heads=2,1"], compare=["num_kv_heads=2:num_kv_heads=8"]),
     ["--compare", "CONFIGURATION:AGAINST", "num_kv_heads=1"]),
])
def test_bad_options_are_one_line_errors_before_anything_is_created(tmp_path, options, fragments):
    with pytest.raises(ConfigError) as error:
        run_sweep(tiny_config(*TINY), tmp_path / "sweep", **DECODE, **options)
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "sweep").exists()  # nothing trained or created


def test_named_points_combine_with_seeds():
    config = tiny_config()
    config.sweep = ml_collections.ConfigDict({"points": [
        {"name": "MHA", "model.num_kv_heads": 4},
        {"name": "MQA+CLA2", "model.num_kv_heads": 1, "model.kv_share_every": 2}]})
    fields = with_seeds(sweep_fields(config), 2)
    plan = points(config, fields)
    assert [p.name for p in plan] == ["MHA__seed=0", "MHA__seed=1", "MQA+CLA2__seed=0",
                                      "MQA+CLA2__seed=1"]
    assert [p.configuration for p in plan] == ["MHA", "MHA", "MQA+CLA2", "MQA+CLA2"]
    assert [(p.config.model.num_kv_heads, p.config.model.kv_share_every, p.seed) for p in plan] \
        == [(4, 1, 0), (4, 1, 1), (1, 2, 0), (1, 2, 1)]


@pytest.mark.parametrize("sweep,fragment", [
    ({"points": []}, "non-empty list"),
    ({"points": [{"model.num_kv_heads": 1}]}, "needs a non-empty 'name'"),
    ({"points": [{"name": "a", "model.num_kv_heads": 1}, {"name": "a", "model.num_kv_heads": 2}]},
     "unique"),
    ({"points": [{"name": "a", "model.num_kv_heads": 3}]}, "sweep point a: model.num_kv_heads=3"),
])
def test_bad_named_points_are_one_line_errors(sweep, fragment):
    config = tiny_config()
    config.sweep = ml_collections.ConfigDict(sweep)
    with pytest.raises(ConfigError) as error:
        points(config, sweep_fields(config))
    assert fragment in str(error.value)


def test_seeds_replace_a_seed_field_and_must_be_positive():
    assert with_seeds({"train.seed": [5, 6], "model.num_kv_heads": [2]}, 3) == {
        "model.num_kv_heads": [2], "train.seed": [0, 1, 2]}
    for bad in (0, -2):
        with pytest.raises(ConfigError, match=f"--seeds={bad} must be >= 1"):
            with_seeds({"model.num_kv_heads": [2]}, bad)


def test_sweep_config_reads_the_shipped_corpus(shakespeare_path):
    config = load_config_file(REPO / "configs" / "sweep_kv_heads.py", validate_config=False)
    assert config.data.path == str(shakespeare_path.resolve())
    plan = points(config, sweep_fields(config))
    assert configurations(plan) == ["MHA", "GQA-4", "GQA-2", "MQA", "MQA+CLA2"]
    models = {p.configuration: build_model_config(p.config.model) for p in plan}
    assert [(m.num_kv_heads, m.kv_share_every) for m in models.values()] == [
        (8, 1), (4, 1), (2, 1), (1, 1), (1, 2)]
    assert len({accounting.param_count(m) for m in models.values()}) == 1  # match_mha_params
    assert len(plan) == 5 * len({p.seed for p in plan}) and len({p.seed for p in plan}) >= 2


def read_csv(path):
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_seeded_sweep_end_to_end_and_rerun_skips(tmp_path, capsys):
    """Two configurations x two seeds: each table row summarises its per-seed rows
    (checked with scipy), a re-run (sweep.py: its flags and printed table) trains and
    times nothing, and another baseline or other decode settings only recompute what they
    change."""
    options = dict(sweep=["model.num_kv_heads=2,1"], seeds=2)
    start = time.time()
    table = run_sweep(tiny_config(*TINY), tmp_path, **options, **DECODE)
    first_run = time.time() - start
    printed = capsys.readouterr()
    names = [f"num_kv_heads={kv}__seed={seed}" for kv in (2, 1) for seed in range(2)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(names)
    trained = re.findall(r"\] (\S+): training in", printed.out)  # seed-major order
    assert trained == [f"num_kv_heads={kv}__seed={seed}" for seed in range(2) for kv in (2, 1)]
    assert printed.out.count("decoding") == 2  # each configuration timed once
    # The timing phase's bar: 2 compilations and 5 timed rounds of 2 loops, per configuration.
    assert "timing: 100%" in printed.err and "24/24" in printed.err

    by_seed = read_csv(tmp_path / "results_by_seed.csv")
    assert list(by_seed[0]) == EXPECTED_SEED_COLUMNS
    assert [row["point"] for row in by_seed] == names
    for row in by_seed:
        saved = json.loads((tmp_path / row["point"] / "result.json").read_text())
        assert saved["step"] == 4 and float(row["eval_loss"]) == pytest.approx(saved["eval_loss"])
        assert int(row["eval_tokens"]) == 1024 // 64 * 64  # final_eval_tokens, whole windows
    rows = read_csv(tmp_path / "results.csv")
    assert list(rows[0]) == EXPECTED_COLUMNS
    assert [row["configuration"] for row in rows] == ["num_kv_heads=2", "num_kv_heads=1"]
    losses = {kv: np.array([float(r["eval_loss"]) for r in by_seed if r["num_kv_heads"] == kv])
              for kv in ("2", "1")}
    for row in rows:
        kv = row["num_kv_heads"]
        values = losses[kv]
        assert int(row["n"]) == 2
        assert float(row["eval_loss_mean"]) == pytest.approx(values.mean(), rel=1e-9)
        assert float(row["eval_loss_sd"]) == pytest.approx(values.std(ddof=1), rel=1e-9)
        low, high = scipy.stats.t.interval(0.95, 1, loc=values.mean(),
                                           scale=scipy.stats.sem(values))
        assert float(row["eval_loss_ci95"]) == pytest.approx((high - low) / 2, rel=1e-9)
        for column in ("train_tokens_per_sec", "decode_tokens_per_sec"):
            assert float(row[column]) > 0
            assert {r[column] for r in by_seed if r["num_kv_heads"] == kv} == {row[column]}
    difference = scipy.stats.ttest_rel(losses["1"], losses["2"]).confidence_interval(0.95)
    mqa_row = rows[1]
    assert float(mqa_row["eval_loss_diff"]) == pytest.approx((losses["1"] - losses["2"]).mean())
    assert float(mqa_row["eval_loss_diff_ci95"]) == pytest.approx(
        (difference.high - difference.low) / 2, rel=1e-9)
    assert mqa_row["eval_loss_diff_resolved"] == str(difference.low > 0 or difference.high < 0)
    assert float(rows[0]["eval_loss_diff"]) == 0.0  # the baseline: the first configuration
    assert rows[0]["params"] == rows[1]["params"]   # match_mha_params holds them equal
    assert int(rows[0]["kv_cache_bytes_per_token"]) == 2 * int(rows[1]["kv_cache_bytes_per_token"])
    markdown = (tmp_path / "results.md").read_text()
    assert "| " + " | ".join(EXPECTED_COLUMNS) + " |" in markdown
    assert markdown.endswith("\n\n" + table)
    for png in ("eval_loss.png", "eval_loss_diff.png", "decode_tokens_per_sec.png",
                "loss_curves.png", "frontier.png", "frontier_decode.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE

    # The command line, with another baseline: nothing trained or timed again.
    start = time.time()
    again = sweep_py(tmp_path, *TINY_FLAGS, "--sweep=model.num_kv_heads=2,1", "--seeds=2",
                     "--baseline=model.num_kv_heads=1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped") == 4 and "training in" not in again.stdout
    assert "decoding" not in again.stdout  # speeds were measured together already
    assert time.time() - start < first_run / 2
    flipped = read_csv(tmp_path / "results.csv")
    assert float(flipped[1]["eval_loss_diff"]) == 0.0
    assert float(flipped[0]["eval_loss_diff"]) == pytest.approx(-float(mqa_row["eval_loss_diff"]))
    assert [r["eval_loss_mean"] for r in flipped] == [r["eval_loss_mean"] for r in rows]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.splitlines()[-1] in again.stdout  # the table is printed
    assert again.stdout.strip().splitlines()[-1].startswith(f"wrote {tmp_path}/results.csv")

    # Other decode settings: both configurations are timed again, side by side.
    run_sweep(tiny_config(*TINY), tmp_path, **options, decode_batch=2, decode_context=32)
    third = capsys.readouterr().out
    assert third.count("skipped") == 4 and third.count("decoding") == 2
    assert [int(row["decode_context"]) for row in read_csv(tmp_path / "results.csv")] == [32, 32]


def test_pareto_front_keeps_the_configurations_nothing_beats():
    from mqa.sweep.plots import pareto_front
    rows = [dict(configuration=name, bytes=b, loss=l) for name, b, l in [
        ("MHA", 3072, 1.90), ("GQA", 1536, 1.92), ("MQA", 384, 1.89), ("CLA", 192, 1.95),
        ("worse", 768, 1.96), ("tie", 384, 1.89)]]
    front = pareto_front(rows, "bytes", "loss")
    assert [r["configuration"] for r in front] == ["CLA", "MQA"]
    # Higher is better (decoding speed): the fastest at each budget and below.
    speeds = [dict(configuration=n, bytes=b, speed=v) for n, b, v in
              [("a", 10, 5.0), ("b", 20, 4.0), ("c", 30, 9.0)]]
    assert [r["configuration"] for r in pareto_front(speeds, "bytes", "speed",
                                                     lower_is_better=False)] == ["a", "c"]


def kv_budget_config(*overrides, names=None):
    """configs/sweep_kv_budget.py (its points, or those named), with overrides."""
    config = load_config_file(REPO / "configs" / "sweep_kv_budget.py", overrides,
                              validate_config=False)
    if names is not None:
        config.sweep.points = [p for p in config.sweep.points if p["name"] in names]
    return config


def test_the_kv_budget_sweep_accounts_every_method_at_the_timed_context():
    """configs/sweep_kv_budget.py, one seed: a row per method with its KV bytes at the
    timed context (the sweep's rows, from each point's model), equal parameter counts
    within the MLP's rounding, and the compared pairs' KV-cache ratios."""
    config = kv_budget_config()
    plan = points(config, with_seeds(sweep_fields(config), 1))
    speeds = {"decode": {"context": 256, "tokens_per_sec": 1.0}}
    result = {"eval_loss": 1.0, "eval_perplexity": 2.7, "eval_bits_per_byte": 1.4,
              "eval_tokens": 1}
    seed_rows = [sweep_results.seed_row(point, result, build_model_config(point.config.model),
                                        speeds) for point in plan]
    rows = {r["configuration"]: r for r in sweep_results.configuration_rows(seed_rows, "MHA")}
    assert list(rows) == ["MHA", "GQA-4", "GQA-2", "MQA", "MQA+CLA2", "GTA-2", "GTA-1", "MLA-24",
                          "MLA-12", "local32+global", "MHA-int8", "MQA-int8"]
    per_layer = {"MHA": 192, "GQA-4": 96, "GQA-2": 48, "MQA": 24, "MQA+CLA2": 12, "GTA-2": 30,
                 "GTA-1": 18, "MLA-24": 30, "MLA-12": 18}
    for name, numbers in per_layer.items():
        assert rows[name]["kv_cache_bytes_per_token"] == 4 * 4 * numbers, name
    # 3 layers keep 32 of the 256 positions, 1 layer all of them: per token at context 256.
    assert rows["local32+global"]["kv_cache_bytes_per_token"] == \
        pytest.approx(4 * 192 * (1 + 3 * 32 / 256))
    assert rows["MQA-int8"]["kv_cache_bytes_per_token"] == 4 * 2 * (12 + 4)
    params = [r["params"] for r in rows.values()]
    assert max(params) - min(params) <= 1.5 * 96 * 4
    pairs = compared_pairs(plan, ["GTA-2:GQA-2", "MQA+CLA2:MQA"])
    compared = sweep_results.comparison_rows(seed_rows, pairs)
    assert [r["kv_cache_ratio"] for r in compared] == [30 / 48, 0.5]


@pytest.mark.slow
def test_the_kv_budget_sweep_runs_end_to_end_at_toy_size(tmp_path, capsys):
    """configs/sweep_kv_budget.py for a few steps and one seed, two of its methods: MQA,
    and MQA with an int8 cache, which trains exactly as its float twin: the sweep copies
    the twin's finished run and only evaluates it (through the int8 cache). Rows with KV
    bytes at the timed context, the comparison and the frontier plots. (Every method's
    row: test_the_kv_budget_sweep_accounts_every_method_at_the_timed_context; every
    family trained: tests/test_families.py.)"""
    config = kv_budget_config("train.steps=3", "train.log_every=3", "train.eval_every=3",
                              "train.eval_batches=1", "train.batch_size=4",
                              "train.final_eval_tokens=2048", "checkpoint.every=3",
                              names=("MQA", "MQA-int8"))
    run_sweep(config, tmp_path, seeds=1, decode_batch=2, decode_context=256,
              compare=["MQA-int8:MQA"])
    printed = capsys.readouterr().out
    rows = {r["configuration"]: r for r in read_csv(tmp_path / "results.csv")}
    assert list(rows) == ["MQA", "MQA-int8"]
    assert float(rows["MQA"]["kv_cache_bytes_per_token"]) == 4 * 4 * 24
    assert float(rows["MQA-int8"]["kv_cache_bytes_per_token"]) == 4 * 2 * (12 + 4)
    for png in ("frontier.png", "frontier_decode.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE
    [compared] = read_csv(tmp_path / "comparisons.csv")
    assert (compared["configuration"], compared["against"]) == ("MQA-int8", "MQA")
    assert float(compared["kv_cache_ratio"]) == 128 / 384
    assert "| MQA-int8 | MQA |" in (tmp_path / "results.md").read_text()

    assert printed.count("training in") == 1
    assert ("MQA-int8__seed=0: trains exactly as MQA__seed=0 (they differ only in "
            "model.kv_cache_dtype)") in printed
    float_run, int8_run = (json.loads((tmp_path / name / "result.json").read_text())
                           for name in ("MQA__seed=0", "MQA-int8__seed=0"))
    assert float_run["step"] == int8_run["step"] == 3
    assert 0 < abs(int8_run["eval_loss"] - float_run["eval_loss"]) < 0.01 * float_run["eval_loss"]
    saved = json.loads((tmp_path / "MQA-int8__seed=0" / "config.json").read_text())
    assert saved["model"]["kv_cache_dtype"] == "int8"


def test_comparisons_are_seed_paired_differences_as_scipy_computes_them():
    from mqa.sweep import results as sweep_results
    rng = np.random.default_rng(0)
    losses = {"A": rng.normal(2.0, 0.05, 5), "B": rng.normal(2.1, 0.05, 5)}
    seed_rows = [{"configuration": name, "seed": seed, "eval_loss": float(loss),
                  "kv_cache_bytes_per_token": {"A": 96, "B": 384}[name],
                  "decode_tokens_per_sec": {"A": 300.0, "B": 100.0}[name]}
                 for name in ("B", "A") for seed, loss in enumerate(losses[name])]
    [row] = sweep_results.comparison_rows(seed_rows, [("A", "B")])
    interval = scipy.stats.ttest_rel(losses["A"], losses["B"]).confidence_interval(0.95)
    assert row["n"] == 5
    assert row["eval_loss_diff"] == pytest.approx((losses["A"] - losses["B"]).mean())
    assert row["eval_loss_diff_ci95"] == pytest.approx((interval.high - interval.low) / 2)
    assert row["eval_loss_diff_resolved"] == bool(interval.low > 0 or interval.high < 0)
    assert row["kv_cache_ratio"] == 0.25 and row["decode_speed_ratio"] == 3.0


def test_a_point_finished_before_new_config_fields_is_still_finished(tmp_path):
    """A result.json written before a field joined the schema counts as finished when the
    field is at its default (as a run resumes), and not when the point sets it otherwise."""
    from mqa.sweep import results as sweep_results
    config = tiny_config(**{"model.num_kv_heads": [2]})
    [point] = points(config, sweep_fields(config))
    (tmp_path / "checkpoints" / str(point.config.train.steps)).mkdir(parents=True)
    old = sweep_results.config_snapshot(point)
    del old["model"]["kv_cache_dtype"], old["train"]["trainable"]  # fields added later
    sweep_results.write_result(tmp_path, {"name": point.name, "config": old,
                                          "step": point.config.train.steps, "eval_loss": 1.5})
    assert sweep_results.finished_result(tmp_path, point)["eval_loss"] == 1.5
    config.model.kv_cache_dtype = "int8"
    [int8_point] = points(config, sweep_fields(config))
    assert sweep_results.finished_result(tmp_path, int8_point) is None


def test_dotted_fields_read_and_set_any_depth_with_one_line_errors():
    config = tiny_config()
    assert get_dotted(config, "model.num_kv_heads") == 2
    set_dotted(config, "model.num_kv_heads", 1)
    assert config.model.num_kv_heads == 1
    set_dotted(config, "extra.section.field", 3)  # created, for validate to name
    assert get_dotted(config, "extra.section.field") == 3
    for call, fragment in [
            (lambda: get_dotted(config, "model.num_kv_head"), "did you mean 'num_kv_heads'"),
            (lambda: get_dotted(config, "model.num_kv_heads.x"), "'num_kv_heads' is a value"),
            (lambda: set_dotted(config, "model.num_kv_heads.x", 1), "'num_kv_heads' is a value"),
            (lambda: set_dotted(config, "model", 1), "'model' is a section"),
            (lambda: set_dotted(config, "model.num_kv_heads", "two"), "expected int like 1")]:
        with pytest.raises(ConfigError, match=re.escape(fragment)):
            call()

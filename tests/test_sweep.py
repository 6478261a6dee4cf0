"""The sweep: point expansion and naming, its options' errors, and tiny sweeps end to end
(in this process, through `run_sweep`; sweep.py itself for its flags and one-line errors)."""

import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
import scipy.stats

from mqa import accounting, trainer
from mqa.attention import cpu_decode
from mqa.config import build_model_config, ConfigError, ModelConfig, get_dotted, load_config_file, set_dotted
from mqa.sweep import results as sweep_results
from mqa.sweep.points import (compared_pairs, configurations, declared_contrasts,
                              parse_sweep_flags, point_name, points, sweep_fields,
                              training_config, with_seeds)
from mqa.sweep.record import portable
from mqa.sweep.run import run_sweep
from commands import REPO, assert_one_line_error

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
           for part in ("mean", "sd", "ci95", "diff", "diff_ci95", "diff_p", "diff_p_holm",
                        "diff_resolved")]
EXPECTED_COLUMNS = ["configuration", "attention", "num_kv_heads", "mlp_dim", "params",
                    "kv_cache_bytes_per_token", "n", *SUMMARY, "train_tokens_per_sec",
                    "decode_context", "decode_tokens_per_sec"]
EXPECTED_SEED_COLUMNS = ["point", "configuration", "seed", "attention", "num_kv_heads", "mlp_dim",
                         "params",
                         "kv_cache_bytes_per_token", "eval_loss", "eval_perplexity",
                         "eval_bits_per_byte", "eval_tokens", "train_tokens_per_sec",
                         "decode_context", "decode_tokens_per_sec"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def sweep_py(workdir, *args, timeout=300, env=None):
    """sweep.py in a subprocess: for what the command line itself does."""
    environment = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
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
    (dict(sweep=["model.num_kv_heads=2,1"], compare=["num_kv_heads=2:num_kv_heads=2"]),
     ["--compare='num_kv_heads=2:num_kv_heads=2'", "two different configurations"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="train.learning_rat=1e-3,2e-3"),
     ["train.learning_rat", "did you mean 'learning_rate'"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="train.learning_rate=1e-3"),
     ["--tune=train.learning_rate=1e-3", "at least two different values"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="train.learning_rate"),
     ["--tune='train.learning_rate' must look like 'section.field=value,value,...'"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="model.num_kv_heads=2,1"),
     ["--tune field model.num_kv_heads is also swept"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="train.seed=1,2"),
     ["train.seed cannot be tuned"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="model.num_heads=4,3"),
     ["tuning num_kv_heads=2 at model.num_heads=3", "num_heads"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune="train.learning_rate=1e-3,2e-3", tune_seeds=0),
     ["--tune_seeds=0 must be an integer >= 1"]),
    (dict(sweep=["model.num_kv_heads=2,1"], tune_seeds=2), ["--tune_seeds=2 needs a field to tune"]),
    (dict(sweep=["model.num_kv_heads=2,1"], only=["num_kv_heads=1", "num_kv_heads=4"]),
     ["--only='num_kv_heads=4' is not a configuration", "num_kv_heads=2, num_kv_heads=1"]),
    (dict(sweep=["model.num_kv_heads=2", "train.seed=0,1000"], tune="train.learning_rate=1e-3,2e-3"),
     ["reporting seeds [1000] are in the tuning seeds' range", "below 1000"]),
])
def test_bad_options_are_one_line_errors_before_anything_is_created(tmp_path, options, fragments):
    with pytest.raises(ConfigError) as error:
        run_sweep(tiny_config(*TINY), tmp_path / "sweep", **DECODE, **options)
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "sweep").exists()  # nothing trained or created


@pytest.mark.parametrize("sweep,fragments", [
    ({"contrasts": ["num_kv_heads=2:MHA"]},
     ["sweep.contrasts='num_kv_heads=2:MHA'", "num_kv_heads=2, num_kv_heads=1"]),
    ({"contrasts": "num_kv_heads=2:num_kv_heads=1"}, ["must be a list of 'CONFIGURATION:AGAINST'"]),
    ({"tune": {"train.learning_rate": [1e-3, 2e-3], "train.warmup_steps": [1, 2]}},
     ["must name one field to tune", "got 2"]),
    ({"tune": {"train.learning_rate": 1e-3}}, ["sweep.tune field 'train.learning_rate' must be a list"]),
    ({"tune": {"train.learning_rate": [1e-3, "fast"]}},
     ["tuning num_kv_heads=2 at train.learning_rate='fast'"]),
    ({"tune": {"train.learning_rate": [1e-3, 2e-3]}, "tune_seeds": "two"},
     ["sweep.tune_seeds='two' must be an integer >= 1"]),
])
def test_bad_sweep_options_in_the_config_are_one_line_errors(tmp_path, sweep, fragments):
    config = tiny_config(*TINY, **{"model.num_kv_heads": [2, 1], **sweep})
    with pytest.raises(ConfigError) as error:
        run_sweep(config, tmp_path / "sweep", **DECODE)
    assert "\n" not in str(error.value)
    for fragment in fragments:
        assert fragment in str(error.value)
    assert not (tmp_path / "sweep").exists()


def test_sweep_py_reports_a_bad_tune_flag_in_one_line(tmp_path):
    result = sweep_py(tmp_path / "a", *TINY_FLAGS, "--sweep=model.num_kv_heads=2,1",
                      "--tune=train.learning_rate=1e-3,fast")
    assert_one_line_error(result, "train.learning_rate='fast'")
    assert not (tmp_path / "a").exists()


def test_sweep_py_reports_a_bad_only_flag_in_one_line(tmp_path):
    result = sweep_py(tmp_path / "a", *TINY_FLAGS, "--sweep=model.num_kv_heads=2,1",
                      "--only=num_kv_heads=1,MQA")
    assert_one_line_error(result, "--only='MQA' is not a configuration", "num_kv_heads=2, num_kv_heads=1")
    assert not (tmp_path / "a").exists()


def test_sweep_py_without_a_compiler_refuses_decode_kernel_before_training(tmp_path):
    result = sweep_py(tmp_path / "a", *TINY_FLAGS, "--sweep=model.num_kv_heads=2,1",
                      "--decode_kernel", env={"CXX": "no-such-compiler"})
    assert_one_line_error(result, "--decode_kernel builds the C++ decoding kernel")
    assert not (tmp_path / "a").exists()


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
@pytest.mark.usefixtures("fast_compile")  # values, not what XLA makes of them
def test_seeded_sweep_end_to_end_and_rerun_skips(tmp_path, tmp_path_factory, capsys, monkeypatch):
    """Two configurations x two seeds, with a contrast declared in the config: each table
    row summarises its per-seed rows (checked with scipy: intervals, paired t-test p, and
    Holm over a family of one, since the contrast is the baseline comparison the other way
    round), a re-run (sweep.py: its flags, --compare and printed table) trains and times
    nothing, and another baseline or other decode settings only recompute what they
    change. The finished runs are recorded (`sweep.record`), and the same sweep in a fresh
    workdir (as in a fresh clone) takes them from the record without training."""
    options = dict(sweep=["model.num_kv_heads=2,1"], seeds=2)
    record = tmp_path_factory.mktemp("record")
    declared = tiny_config(*TINY, **{"model.num_kv_heads": [2, 1], "record": str(record),
                                     "contrasts": ["num_kv_heads=2:num_kv_heads=1"]})
    start = time.time()
    table = run_sweep(declared, tmp_path, seeds=2, **DECODE)
    first_run = time.time() - start
    printed = capsys.readouterr()
    names = [f"num_kv_heads={kv}__seed={seed}" for kv in (2, 1) for seed in range(2)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(names)
    trained = re.findall(r"\] (\S+): training in", printed.out)  # seed-major order
    assert trained == [f"num_kv_heads={kv}__seed={seed}" for seed in range(2) for kv in (2, 1)]
    assert printed.out.count("tokens/s, decoding") == 2  # each configuration timed once
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
    test = scipy.stats.ttest_rel(losses["1"], losses["2"])
    difference = test.confidence_interval(0.95)
    mqa_row = rows[1]
    assert float(mqa_row["eval_loss_diff"]) == pytest.approx((losses["1"] - losses["2"]).mean())
    assert float(mqa_row["eval_loss_diff_ci95"]) == pytest.approx(
        (difference.high - difference.low) / 2, rel=1e-9)
    # A family of one comparison: the declared contrast is the same pair.
    assert float(mqa_row["eval_loss_diff_p"]) == pytest.approx(test.pvalue, rel=1e-9)
    assert float(mqa_row["eval_loss_diff_p_holm"]) == pytest.approx(test.pvalue, rel=1e-9)
    assert mqa_row["eval_loss_diff_resolved"] == str(test.pvalue < 0.05)
    bits = {kv: [float(r["eval_bits_per_byte"]) for r in by_seed if r["num_kv_heads"] == kv]
            for kv in ("2", "1")}
    assert float(mqa_row["eval_bits_per_byte_diff_p"]) == pytest.approx(
        scipy.stats.ttest_rel(bits["1"], bits["2"]).pvalue, rel=1e-9)
    assert float(rows[0]["eval_loss_diff"]) == 0.0  # the baseline: the first configuration
    assert (rows[0]["eval_loss_diff_p"], rows[0]["eval_loss_diff_resolved"]) == ("", "False")
    [contrast] = read_csv(tmp_path / "comparisons.csv")
    assert (contrast["configuration"], contrast["against"], contrast["declared"]) == (
        "num_kv_heads=2", "num_kv_heads=1", "True")
    assert float(contrast["eval_loss_diff"]) == pytest.approx(-float(mqa_row["eval_loss_diff"]))
    assert float(contrast["eval_loss_diff_p_holm"]) == pytest.approx(test.pvalue, rel=1e-9)
    assert rows[0]["params"] == rows[1]["params"]   # match_mha_params holds them equal
    assert int(rows[0]["kv_cache_bytes_per_token"]) == 2 * int(rows[1]["kv_cache_bytes_per_token"])
    markdown = (tmp_path / "results.md").read_text()
    assert "| " + " | ".join(EXPECTED_COLUMNS) + " |" in markdown
    assert ("family of 1 comparisons (1 against the baseline, 0 declared contrasts, 0 from "
            "--compare") in markdown
    assert markdown.endswith("\n\n" + table)
    for png in ("eval_loss.png", "eval_loss_diff.png", "decode_tokens_per_sec.png",
                "loss_curves.png", "frontier.png", "frontier_decode.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE

    # The command line, with another baseline: nothing trained or timed again.
    start = time.time()
    again = sweep_py(tmp_path, *TINY_FLAGS, "--sweep=model.num_kv_heads=2,1", "--seeds=2",
                     "--baseline=model.num_kv_heads=1", "--compare=num_kv_heads=2:num_kv_heads=1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped") == 4 and "training in" not in again.stdout
    assert "tokens/s, decoding" not in again.stdout  # speeds were measured together already
    assert time.time() - start < first_run / 2
    flipped = read_csv(tmp_path / "results.csv")
    assert float(flipped[1]["eval_loss_diff"]) == 0.0
    assert float(flipped[0]["eval_loss_diff"]) == pytest.approx(-float(mqa_row["eval_loss_diff"]))
    assert [r["eval_loss_mean"] for r in flipped] == [r["eval_loss_mean"] for r in rows]
    markdown = (tmp_path / "results.md").read_text()
    assert markdown.splitlines()[-1] in again.stdout  # the table is printed
    assert again.stdout.strip().splitlines()[-1].startswith(f"wrote {tmp_path}/results.csv")
    [contrast] = read_csv(tmp_path / "comparisons.csv")  # --compare's, not declared
    assert contrast["declared"] == "False"
    assert float(contrast["eval_loss_diff_p_holm"]) == pytest.approx(test.pvalue, rel=1e-9)

    # Other decode settings: both configurations are timed again, side by side.
    run_sweep(tiny_config(*TINY), tmp_path, **options, decode_batch=2, decode_context=32)
    third = capsys.readouterr().out
    assert third.count("skipped") == 4 and third.count("tokens/s, decoding") == 2
    assert [int(row["decode_context"]) for row in read_csv(tmp_path / "results.csv")] == [32, 32]
    assert not (tmp_path / "comparisons.csv").exists()  # no contrasts this time

    # Decoding through the C++ kernel too: both configurations timed again, side by side,
    # the kernel's tokens/s in a column of its own and its speed ratio in the contrasts.
    if cpu_decode.compiler_found():
        run_sweep(tiny_config(*TINY), tmp_path, **options, decode_batch=2, decode_context=32,
                  compare=["num_kv_heads=1:num_kv_heads=2"], decode_kernel=True)
        fourth = capsys.readouterr().out
        assert fourth.count("skipped") == 4 and fourth.count("through the kernel") == 2
        kernel_rows = read_csv(tmp_path / "results.csv")
        assert list(kernel_rows[0]) == [*EXPECTED_COLUMNS, "decode_kernel_tokens_per_sec"]
        assert all(float(row["decode_kernel_tokens_per_sec"]) > 0 for row in kernel_rows)
        assert list(read_csv(tmp_path / "results_by_seed.csv")[0])[-1] == "decode_kernel_tokens_per_sec"
        [contrast] = read_csv(tmp_path / "comparisons.csv")
        assert float(contrast["decode_kernel_speed_ratio"]) == pytest.approx(
            float(kernel_rows[1]["decode_kernel_tokens_per_sec"])
            / float(kernel_rows[0]["decode_kernel_tokens_per_sec"]))
        saved = json.loads((tmp_path / "speeds.json").read_text())
        assert all(entry["decode_kernel"]["tokens_per_sec"] > 0 for entry in saved.values())
        assert (tmp_path / "frontier_decode_kernel.png").read_bytes()[:8] == PNG_SIGNATURE

    # The record: a fresh workdir continues from it and trains nothing (speeds.json copied,
    # so nothing is timed either); a point whose config differs from its record's trains.
    assert sorted(path.stem for path in record.glob("*.json")) == sorted(names)
    fresh = tmp_path_factory.mktemp("fresh")
    shutil.copy(tmp_path / "speeds.json", fresh / "speeds.json")

    def train(*args, **kwargs):
        raise AssertionError("trained")
    monkeypatch.setattr(trainer, "train", train)
    run_sweep(declared, fresh, seeds=2, **DECODE)
    assert capsys.readouterr().out.count(f"recorded in {record}, skipped") == 4
    held_out = lambda rows: [(r["point"], r["eval_loss"], r["eval_bits_per_byte"]) for r in rows]  # noqa: E731
    assert held_out(read_csv(fresh / "results_by_seed.csv")) == held_out(by_seed)

    # --only: one configuration of the declared sweep, from the same records; the declared
    # contrast, which needs the other, is left out.
    run_sweep(declared, fresh, seeds=2, only=["num_kv_heads=1"], **DECODE)
    only_out = capsys.readouterr().out
    assert only_out.count("skipped") == 2 and "sweep: 2 points" in only_out
    assert [r["configuration"] for r in read_csv(fresh / "results.csv")] == ["num_kv_heads=1"]
    assert held_out(read_csv(fresh / "results_by_seed.csv")) == held_out(by_seed[2:])
    assert not (fresh / "comparisons.csv").exists()
    assert not (fresh / names[0] / "checkpoints").exists()
    declared.train.learning_rate = 0.01
    with pytest.raises(AssertionError, match="trained"):
        run_sweep(declared, tmp_path_factory.mktemp("changed"), seeds=2, **DECODE)


def test_a_record_lacking_what_the_sweep_needs_is_not_restored(tmp_path):
    """A tuning sweep needs each run's held-out halves, which a folder without checkpoints
    cannot compute: a record without them is left alone (the point trains), one with them
    is laid out."""
    from mqa.sweep.record import restore
    from mqa.sweep.results import RESTORED, config_snapshot
    [point] = points(tiny_config(), {"model.num_kv_heads": [1]})
    record = tmp_path / "record"
    record.mkdir()
    entry = {"result": {"name": point.name, "step": 4, "config": config_snapshot(point)},
             "config": json.loads(point.config.to_json()), "metrics": [{"step": 4, "loss": 2.0}]}
    (record / f"{point.name}.json").write_text(json.dumps(entry))
    assert restore(record, tmp_path / "a", point, needs=("halves",)) is None
    assert not (tmp_path / "a").exists()
    entry["result"]["halves"] = {"tuning": {}, "test": {}}
    (record / f"{point.name}.json").write_text(json.dumps(entry))
    restored = restore(record, tmp_path / "b", point, needs=("halves",))
    assert restored[RESTORED] and (tmp_path / "b" / "metrics.jsonl").read_text().strip() == \
        json.dumps({"step": 4, "loss": 2.0})


def test_records_and_speeds_outlive_fields_added_at_their_defaults(tmp_path):
    """A record written before a field existed (here model.attention_sinks and
    train.distill_from, dropped from it) still restores; the speeds' digest ignores fields
    at their defaults, and changes with a field that is not."""
    from mqa.sweep.record import restore
    from mqa.sweep.results import RESTORED, config_snapshot
    from mqa.sweep.speeds import config_digest
    [point] = points(tiny_config(), {"model.num_kv_heads": [1]})
    older = config_snapshot(point)
    del older["model"]["attention_sinks"], older["train"]["distill_from"]
    record = tmp_path / "record"
    record.mkdir()
    entry = {"result": {"name": point.name, "step": 4, "config": older}, "config": older,
             "metrics": [{"step": 4, "loss": 2.0}]}
    (record / f"{point.name}.json").write_text(json.dumps(entry))
    assert restore(record, tmp_path / "a", point)[RESTORED]
    [changed] = points(tiny_config("model.sliding_window=8", "model.attention_sinks=2"),
                       {"model.num_kv_heads": [1]})
    [windowed] = points(tiny_config("model.sliding_window=8"), {"model.num_kv_heads": [1]})
    assert config_digest(changed) != config_digest(windowed) != config_digest(point)
    assert restore(record, tmp_path / "b", changed) is None


def test_recorded_paths_are_relative_to_the_record(tmp_path):
    for root in (tmp_path / "a", tmp_path / "deeper" / "b"):
        record = root / "benchmarks" / "results" / "x"
        config = {"data": {"path": str(root / "data" / "corpus.txt"), "tokenizer": "byte"}}
        assert portable(config, record) == {
            "data": {"path": "@record/../../../data/corpus.txt", "tokenizer": "byte"}}


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
    """configs/sweep_kv_budget.py (its points, or those named, and the declared contrasts
    among them), with overrides."""
    config = load_config_file(REPO / "configs" / "sweep_kv_budget.py", overrides,
                              validate_config=False)
    if names is not None:
        config.sweep.points = [p for p in config.sweep.points if p["name"] in names]
        config.sweep.contrasts = [c for c in config.sweep.contrasts
                                  if set(c.split(":")) <= set(names)]
    return config


def test_the_kv_budget_sweep_accounts_every_method_at_the_timed_context():
    """configs/sweep_kv_budget.py, one seed: a row per method with its KV bytes at the
    timed context (the sweep's rows, from each point's model), equal parameter counts
    within the MLP's rounding, the declared contrasts (the papers' comparisons) in one
    family with the comparisons against MHA, and their KV-cache ratios."""
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
    declared = compared_pairs(plan, declared_contrasts(config), "sweep.contrasts")
    assert declared == [("GTA-2", "GQA-2"), ("GTA-1", "MQA"), ("MQA+CLA2", "MQA"),
                        ("MLA-24", "MHA"), ("MLA-12", "MHA"), ("MLA-12", "MQA"),
                        ("MHA-int8", "MHA"), ("MQA-int8", "MQA")]
    # 11 against MHA; MLA-24, MLA-12 and MHA-int8 against MHA are among them: 5 more.
    assert sweep_results.family_sizes(list(rows), "MHA", declared, []) == (11, 5, 0)
    compared = sweep_results.comparison_rows(seed_rows, "MHA", declared)
    assert [r["kv_cache_ratio"] for r in compared[:3]] == [30 / 48, 18 / 24, 0.5]
    assert all(r["declared"] and r["eval_loss_diff_p"] is None for r in compared)  # one seed


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")  # values, not what XLA makes of them
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

    # --only the int8 arm: its twin is outside the selection and still copied, not retrained.
    shutil.rmtree(tmp_path / "MQA-int8__seed=0")
    run_sweep(config, tmp_path, seeds=1, decode_batch=2, decode_context=256, only=["MQA-int8"])
    printed = capsys.readouterr().out
    assert "training in" not in printed and "trains exactly as MQA__seed=0" in printed
    assert [r["configuration"] for r in read_csv(tmp_path / "results.csv")] == ["MQA-int8"]


def test_a_training_twin_runs_right_after_the_point_it_copies():
    """Seed-major, and MHA-int8 (which trains exactly as MHA) right after MHA, so MHA's run is
    still on the machine to copy (a sweep continued from its record has no checkpoint)."""
    from mqa.sweep.run import training_order
    config = kv_budget_config(names=("MHA", "MQA", "MHA-int8"))
    plan = points(config, with_seeds(sweep_fields(config), 2))
    assert [p.name for p in training_order(plan)] == [
        "MHA__seed=0", "MHA-int8__seed=0", "MQA__seed=0",
        "MHA__seed=1", "MHA-int8__seed=1", "MQA__seed=1"]


def holm_reference(p):
    """Holm's adjusted p-values written out plainly: the k-th smallest (from 0) of m is
    the largest of (m - j) p_(j) for j <= k, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    return {i: min(1.0, max((m - j) * p[order[j]] for j in range(k + 1)))
            for k, i in enumerate(order)}


def test_comparisons_are_one_holm_family_with_the_baseline_comparisons():
    """Four configurations (B the baseline), a contrast declared and two asked for, one of
    them the declared one the other way round: every p is scipy's paired t-test's, and the
    family (A-B, C-B, D-B, A-C, D-A: each pair once) is Holm-adjusted together, the same in
    comparisons.csv's rows and results.csv's."""
    rng = np.random.default_rng(0)
    shared = rng.normal(0, 0.05, 6)  # seed effects every configuration shares
    losses = {name: 2.0 + shift + shared + rng.normal(0, 0.01, 6)
              for name, shift in (("B", 0.0), ("A", -0.02), ("C", 0.004), ("D", 0.03))}
    seed_rows = [{"configuration": name, "seed": seed, "eval_loss": float(loss),
                  "eval_bits_per_byte": float(loss) / math.log(2) / 1.3,
                  "kv_cache_bytes_per_token": {"A": 96, "B": 384, "C": 192, "D": 48}[name],
                  "decode_tokens_per_sec": {"A": 300.0, "B": 100.0, "C": 200.0, "D": 400.0}[name]}
                 for name in ("B", "A", "C", "D") for seed, loss in enumerate(losses[name])]
    family = [("A", "B"), ("C", "B"), ("D", "B"), ("A", "C"), ("D", "A")]
    p = [scipy.stats.ttest_rel(losses[a], losses[b]).pvalue for a, b in family]
    expected = {frozenset(pair): holm_reference(p)[i] for i, pair in enumerate(family)}
    assert sorted(expected.values()) != sorted(p)  # the correction changes something here

    compared = sweep_results.comparison_rows(seed_rows, "B", [("A", "C")], [("D", "A"), ("C", "A")])
    assert [(r["configuration"], r["against"], r["declared"]) for r in compared] == [
        ("A", "C", True), ("D", "A", False), ("C", "A", False)]
    for row in compared:
        a, b = row["configuration"], row["against"]
        test = scipy.stats.ttest_rel(losses[a], losses[b])
        interval = test.confidence_interval(0.95)
        assert row["n"] == 6
        assert row["eval_loss_diff"] == pytest.approx((losses[a] - losses[b]).mean())
        assert row["eval_loss_diff_ci95"] == pytest.approx((interval.high - interval.low) / 2)
        assert row["eval_loss_diff_p"] == pytest.approx(test.pvalue, rel=1e-9)
        assert row["eval_loss_diff_p_holm"] == pytest.approx(expected[frozenset((a, b))], rel=1e-9)
        assert row["eval_loss_diff_resolved"] == (expected[frozenset((a, b))] < 0.05)
    assert compared[0]["kv_cache_ratio"] == 0.5 and compared[0]["decode_speed_ratio"] == 1.5

    rows = {r["configuration"]: r for r in sweep_results.configuration_rows(
        seed_rows, "B", [("A", "C"), ("D", "A"), ("C", "A")])}
    assert rows["B"]["eval_loss_diff_p_holm"] is None and rows["B"]["eval_loss_diff_resolved"] is False
    for name in "ACD":
        assert rows[name]["eval_loss_diff_p"] == pytest.approx(
            scipy.stats.ttest_rel(losses[name], losses["B"]).pvalue, rel=1e-9)
        assert rows[name]["eval_loss_diff_p_holm"] == pytest.approx(
            expected[frozenset((name, "B"))], rel=1e-9)
        # bits per byte: its own family, here the loss rescaled, so the same p-values
        assert rows[name]["eval_bits_per_byte_diff_p_holm"] == pytest.approx(
            rows[name]["eval_loss_diff_p_holm"], rel=1e-6)
    # Without the contrasts the family is the three against the baseline alone.
    alone = {r["configuration"]: r for r in sweep_results.configuration_rows(seed_rows, "B")}
    reference = holm_reference(p[:3])
    for index, name in enumerate("ACD"):
        assert alone[name]["eval_loss_diff_p_holm"] == pytest.approx(reference[index], rel=1e-9)


def test_markdown_bolds_only_differences_resolved_after_holm():
    rows = [{"configuration": "A", "eval_loss_diff": -0.02, "eval_loss_diff_p": 0.01,
             "eval_loss_diff_p_holm": 0.03, "eval_loss_diff_resolved": True},
            {"configuration": "B", "eval_loss_diff": 0.01, "eval_loss_diff_p": 0.04,
             "eval_loss_diff_p_holm": 0.08, "eval_loss_diff_resolved": False}]
    table = sweep_results.markdown_table(rows, list(rows[0]))
    assert "| A | **-0.0200** | 0.01 | 0.03 | yes |" in table
    assert "| B | +0.0100 | 0.04 | 0.08 | no |" in table


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


@pytest.mark.parametrize("seq_len,stride,max_windows,batch_size", [
    (8, None, None, 3), (8, 3, None, 4), (8, None, 7, 2), (8, 5, 9, 8)])
def test_held_out_halves_are_disjoint_and_cover_the_split(seq_len, stride, max_windows, batch_size):
    """The tuning and test halves score disjoint targets that together are exactly the
    whole split's (tokens 0..n-1 are their own positions, so the targets scored can be
    read off), the tuning half the earlier ones; and the losses add up as token sums."""
    from mqa.evaluation import held_out_loss, part_windows
    tokens = np.arange(203)
    scored = {}

    def recorder(part):
        def batch_nll(windows, weights):
            targets = windows[:, 1:]
            scored.setdefault(part, []).extend(targets[weights > 0].tolist())
            return float((targets * weights).sum()), float(weights.sum())
        return batch_nll

    results = {part: held_out_loss(recorder(part), tokens, seq_len=seq_len, batch_size=batch_size,
                                   stride=stride, max_windows=max_windows, part=part)
               for part in (None, "tuning", "test")}
    whole, tuning, test = (scored[part] for part in (None, "tuning", "test"))
    assert len(set(whole)) == len(whole)  # each target once
    assert not set(tuning) & set(test)
    assert sorted(tuning + test) == sorted(whole)
    assert max(tuning) < min(test)  # contiguous: the first half of the windows, then the rest
    assert results["tuning"]["tokens"] + results["test"]["tokens"] == results[None]["tokens"]
    total = sum(results[part]["loss"] * results[part]["tokens"] for part in ("tuning", "test"))
    assert total == pytest.approx(results[None]["loss"] * results[None]["tokens"])
    windows = len(range(0, 203 - seq_len, stride or seq_len)) if max_windows is None else max_windows
    assert part_windows(windows, "tuning") == range(windows // 2)
    assert part_windows(windows, "test") == range(windows // 2, windows)


def test_held_out_parts_name_bad_values():
    from mqa.data import DataError
    from mqa.evaluation import part_windows
    with pytest.raises(ConfigError, match="held-out part 'tune' must be one of tuning, test"):
        part_windows(10, "tune")
    with pytest.raises(DataError, match="has 1 evaluation window"):
        part_windows(1, "test")
    assert part_windows(5, None) == range(5)


def test_tuning_runs_every_value_on_tuning_seeds_and_names_the_reporting_points():
    from mqa.sweep import tuning as tuning_lib
    config = tiny_config(**{"model.num_kv_heads": [2, 1], "train.seed": [0, 1],
                            "tune": {"train": {"learning_rate": [1e-3, 4e-3]}}, "tune_seeds": 2})
    fields = sweep_fields(config)
    assert fields == {"model.num_kv_heads": [2, 1], "train.seed": [0, 1]}  # options are not swept
    tuning = tuning_lib.tuning_options(config)
    assert tuning == tuning_lib.Tuning("train.learning_rate", (1e-3, 4e-3), (1000, 1001))
    # --tune and --tune_seeds replace the config's; with --sweep the config's are not read.
    assert tuning_lib.tuning_options(config, "train.learning_rate=1e-2,2e-2", 1) == \
        tuning_lib.Tuning("train.learning_rate", (1e-2, 2e-2), (1000,))
    assert tuning_lib.tuning_options(config, declared=False) is None
    plan = points(config, fields)
    runs = tuning_lib.tuning_runs(plan, tuning)
    assert [(r.configuration, r.point.name) for r in runs[:4]] == [
        ("num_kv_heads=2", "num_kv_heads=2__learning_rate=0.001__seed=1000"),
        ("num_kv_heads=2", "num_kv_heads=2__learning_rate=0.004__seed=1000"),
        ("num_kv_heads=2", "num_kv_heads=2__learning_rate=0.001__seed=1001"),
        ("num_kv_heads=2", "num_kv_heads=2__learning_rate=0.004__seed=1001")]
    assert len(runs) == 2 * 2 * 2
    assert {(r.point.config.model.num_kv_heads, r.point.config.train.learning_rate,
             r.point.seed) for r in runs} == {(kv, lr, seed) for kv in (2, 1)
                                              for lr in (1e-3, 4e-3) for seed in (1000, 1001)}
    reporting = tuning_lib.reporting_point(plan[1], tuning, 4e-3)
    assert reporting.name == "num_kv_heads=2__learning_rate=0.004__seed=1"
    assert reporting.configuration == plan[1].configuration == "num_kv_heads=2"
    assert (reporting.seed, reporting.config.train.learning_rate) == (1, 4e-3)
    assert plan[1].config.train.learning_rate == 3e-3  # the plan's point is left alone
    # The chosen value's column: the field's last part, unless the tables have one so named.
    assert tuning.column == "learning_rate"
    assert tuning_lib.Tuning("model.mlp_dim", (96, 128), (1000,)).column == "model.mlp_dim"


def test_the_chosen_value_has_the_lowest_mean_tuning_loss():
    from mqa.sweep import tuning as tuning_lib
    tuning = tuning_lib.Tuning("train.learning_rate", (1e-3, 2e-3, 4e-3), (1000, 1001))

    def row(configuration, value, seed, loss, diverged=None):
        return {"configuration": configuration, "learning_rate": value, "seed": seed,
                "eval_loss": loss, "diverged": diverged}

    rows = [
        # A: 2e-3 has the lowest mean (1.5) though 4e-3 has the lowest single run (1.2).
        row("A", 1e-3, 1000, 2.0), row("A", 1e-3, 1001, 2.0),
        row("A", 2e-3, 1000, 1.5), row("A", 2e-3, 1001, 1.5),
        row("A", 4e-3, 1000, 1.2), row("A", 4e-3, 1001, 1.9),
        # B: 4e-3 diverged on one seed: never chosen; 1e-3 and 2e-3 tie: the first listed.
        row("B", 1e-3, 1000, 1.7), row("B", 1e-3, 1001, 1.9),
        row("B", 2e-3, 1000, 1.8), row("B", 2e-3, 1001, 1.8),
        row("B", 4e-3, 1000, 0.5), row("B", 4e-3, 1001, None, "not finite"),
        # C: a non-finite loss counts as diverged too.
        row("C", 1e-3, 1000, 3.0), row("C", 2e-3, 1000, 2.5), row("C", 4e-3, 1000, math.nan)]
    assert tuning_lib.chosen_values(rows, tuning) == {"A": 2e-3, "B": 1e-3, "C": 2e-3}
    means = tuning_lib.mean_losses(rows, tuning)
    assert means["A"] == pytest.approx([2.0, 1.5, 1.55]) and means["B"][2] == math.inf
    everything_diverged = [row("D", v, 1000, None, "not finite") for v in tuning.values]
    with pytest.raises(ConfigError, match="every --tune value of train.learning_rate diverged for D"):
        tuning_lib.chosen_values(everything_diverged, tuning)

    # How firmly each was chosen: the runner-up by mean, the seed-paired margin (scipy's
    # paired t-test and interval), and each tuning seed's own best.
    choices = {r["configuration"]: r for r in tuning_lib.choice_rows(rows, tuning, tuning_lib.chosen_values(rows, tuning))}
    a = choices["A"]
    paired = scipy.stats.ttest_rel([1.2, 1.9], [1.5, 1.5])  # 4e-3 against 2e-3, seed by seed
    low, high = paired.confidence_interval(0.95)
    assert (a["runner_up"], a["margin"]) == (4e-3, pytest.approx(0.05))
    assert a["margin_ci95"] == pytest.approx((high - low) / 2) and a["margin_p"] == pytest.approx(paired.pvalue)
    assert a["seed_choices"] == "1000:0.004 1001:0.002" and a["seeds_agree"] is False
    b = choices["B"]  # the tie: the runner-up is 2e-3 at margin 0; 4e-3 diverged, so it is no runner-up
    assert (b["runner_up"], b["margin"], b["margin_p"]) == (2e-3, pytest.approx(0.0, abs=1e-12), pytest.approx(1.0))
    assert b["seed_choices"] == "1000:0.004 1001:0.002"  # seed 1000 alone would take 4e-3
    c = choices["C"]  # one seed: no interval
    assert (c["runner_up"], c["margin"], c["margin_ci95"], c["margin_p"]) == (1e-3, 0.5, None, None)
    assert (c["seed_choices"], c["seeds_agree"]) == ("1000:0.002", True)
    assert tuning_lib.describe_choice(a, tuning.field) == (
        f"tuning: A takes train.learning_rate=0.002 (runner-up 0.004 by 0.0500 nats +- "
        f"{(high - low) / 2:.4f}, seeds 1000:0.004 1001:0.002)")
    assert tuning_lib.describe_choice(c, tuning.field) == \
        "tuning: C takes train.learning_rate=0.002 (runner-up 0.001 by 0.5000 nats)"


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")  # values, not what XLA makes of them
def test_a_tuning_sweep_chooses_on_the_tuning_half_and_reports_the_test_half(tmp_path, capsys,
                                                                            monkeypatch):
    """Two configurations (a float and an int8 KV cache: training twins, so the int8 runs
    copy the float runs and are only evaluated, which keeps this to three trainings), the
    learning rate tuned over two values on tuning seed 1000, one reporting seed: the choice
    is the lowest tuning-half loss, the reporting runs train at it and report their test
    half, the halves cover the run's final evaluation, and a re-run skips every run even
    when the tuning runs' checkpoints are gone (their result files suffice). The speeds are
    test_seeded_sweep_end_to_end_and_rerun_skips's subject: here they are stubbed, which
    saves compiling the timing loops."""
    from mqa.sweep import run as sweep_run
    speeds = {"train_tokens_per_sec": 1.0, "decode": {"context": 64, "tokens_per_sec": 1.0}}
    monkeypatch.setattr(sweep_run, "measured_speeds",
                        lambda plan, *_: {p.configuration: speeds for p in plan})
    config = tiny_config(*TINY, **{"points": [{"name": "float"},
                                              {"name": "int8", "model.kv_cache_dtype": "int8"}],
                                   "tune": {"train.learning_rate": [3e-3, 3e-2]}})
    run_sweep(config, tmp_path, seeds=1, **DECODE)
    printed = capsys.readouterr().out
    assert printed.count("training in") == 3  # two tuning runs and one reporting run
    tuning_dir = tmp_path / "tuning"
    names = {f"{name}__learning_rate={lr}__seed=1000" for name in ("float", "int8")
             for lr in ("0.003", "0.03")}
    assert {p.name for p in tuning_dir.iterdir()} == names

    tuning_rows = read_csv(tmp_path / "tuning.csv")
    assert list(tuning_rows[0]) == ["configuration", "learning_rate", "seed", "point", "eval_loss",
                                    "eval_bits_per_byte", "eval_tokens", "diverged", "chosen"]
    assert len(tuning_rows) == 4 and {r["seed"] for r in tuning_rows} == {"1000"}
    chosen = {}
    for name in ("float", "int8"):
        mine = [r for r in tuning_rows if r["configuration"] == name]
        for row in mine:
            saved = json.loads((tuning_dir / row["point"] / "result.json").read_text())
            assert float(row["eval_loss"]) == saved["halves"]["tuning"]["eval_loss"]
            assert int(row["eval_tokens"]) == 512  # the first 8 of the 16 final windows
        best = min(mine, key=lambda r: float(r["eval_loss"]))
        assert [r["chosen"] for r in mine] == [str(r is best) for r in mine]
        chosen[name] = float(best["learning_rate"])
        other = max(mine, key=lambda r: float(r["eval_loss"]))
        margin = float(other["eval_loss"]) - float(best["eval_loss"])
        assert (f"tuning: {name} takes train.learning_rate={chosen[name]} (runner-up "
                f"{float(other['learning_rate'])} by {margin:.4f} nats)") in printed
    choices = {r["configuration"]: r for r in read_csv(tmp_path / "tuning_choices.csv")}
    assert {name: float(r["chosen"]) for name, r in choices.items()} == chosen
    assert all(r["seeds_agree"] == "True" and r["margin_ci95"] == "" for r in choices.values())
    assert (tmp_path / "tuning.png").read_bytes()[:8] == PNG_SIGNATURE

    rows = read_csv(tmp_path / "results.csv")
    assert list(rows[0])[:3] == ["configuration", "learning_rate", "attention"]
    assert {r["configuration"]: float(r["learning_rate"]) for r in rows} == chosen
    for row in read_csv(tmp_path / "results_by_seed.csv"):
        point_dir = tmp_path / row["point"]
        assert row["point"] == f"{row['configuration']}__learning_rate={chosen[row['configuration']]}__seed=0"
        saved = json.loads((point_dir / "config.json").read_text())
        assert (saved["train"]["learning_rate"], saved["train"]["seed"]) == (
            chosen[row["configuration"]], 0)
        result = json.loads((point_dir / "result.json").read_text())
        halves = result["halves"]
        assert float(row["eval_loss"]) == halves["test"]["eval_loss"] != halves["tuning"]["eval_loss"]
        assert int(row["eval_tokens"]) == halves["test"]["eval_tokens"] == 512
        # The halves are the final evaluation's windows: its loss is their token-weighted mean.
        assert result["eval_tokens"] == 1024
        assert (halves["tuning"]["eval_loss"] + halves["test"]["eval_loss"]) / 2 == \
            pytest.approx(result["eval_loss"], rel=1e-5)
    assert "every held-out metric here is the test half's" in (tmp_path / "results.md").read_text()

    for path in tuning_dir.glob("*/checkpoints"):
        shutil.rmtree(path)
    run_sweep(config, tmp_path, seeds=1, **DECODE)
    again = capsys.readouterr().out
    assert "training in" not in again and "trains exactly as" not in again
    assert again.count("finished, skipped") == 4 and again.count("finished (step 4), skipped") == 2
    assert read_csv(tmp_path / "results.csv") == rows

    # --only one configuration: its own tuning runs and point, the same row.
    run_sweep(config, tmp_path, seeds=1, only=["int8"], **DECODE)
    only = capsys.readouterr().out
    assert only.count("finished, skipped") == 2 and only.count("finished (step 4), skipped") == 1
    assert "tuning: int8 takes" in only and "tuning: float" not in only
    [alone] = read_csv(tmp_path / "results.csv")  # int8 now its own baseline
    [before] = [r for r in rows if r["configuration"] == "int8"]
    assert [alone[k] for k in ("configuration", "learning_rate", "eval_loss_mean")] == [
        before[k] for k in ("configuration", "learning_rate", "eval_loss_mean")]

"""sweep.py: point expansion and naming, one-line errors, and a tiny sweep end to end."""

import csv
import json
import os
import subprocess
import sys
import time

import ml_collections
import pytest

from mqa import accounting
from mqa.config import ConfigError, ModelConfig, load_config_file
from mqa.sweep import parse_sweep_flags, point_name, points, sweep_fields, training_config
from tests.test_train_cli import REPO, assert_one_line_error

# configs/tiny.py with 4 query heads of 12 dimensions: removing K/V heads frees a multiple
# of 3 * d_model parameters per layer, so match_mha_params gives exactly equal counts.
TINY = ["--config=configs/tiny.py", "--config.model.d_model=48", "--config.model.head_dim=12",
        "--config.model.mlp_dim=144", "--config.model.match_mha_params=true",
        "--config.train.steps=20", "--config.train.log_every=5", "--config.train.eval_every=10",
        "--config.train.eval_batches=2", "--config.checkpoint.every=10",
        "--decode_batch=2", "--decode_context=64"]
EXPECTED_COLUMNS = ["point", "num_kv_heads", "mlp_dim", "params", "kv_cache_bytes_per_token",
                    "train_tokens_per_sec", "eval_loss", "eval_perplexity",
                    "eval_bits_per_byte", "decode_context", "decode_tokens_per_sec"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_sweep(workdir, *args, timeout=300):
    environment = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "sweep.py", f"--workdir={workdir}", *args], cwd=REPO,
                          env=environment, capture_output=True, text=True, timeout=timeout)


def tiny_config(**sweep):
    config = load_config_file(REPO / "configs" / "tiny.py")
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


def test_bad_sweep_flag_and_field_are_one_line_errors(tmp_path):
    result = run_sweep(tmp_path / "a", "--config=configs/tiny.py", "--sweep=model.num_kv_heds=2,1")
    assert_one_line_error(result, "model.num_kv_heds", "did you mean 'num_kv_heads'")
    result = run_sweep(tmp_path / "b", "--config=configs/tiny.py", "--sweep=model.num_kv_heads=2,3")
    assert_one_line_error(result, "sweep point num_kv_heads=3", "must divide")
    result = run_sweep(tmp_path / "c", "--config=configs/tiny.py")
    assert_one_line_error(result, "no sweep")
    assert not (tmp_path / "b").exists()  # nothing trained or created


def test_sweep_config_finds_tinyshakespeare_from_anywhere(shakespeare_path):
    config = load_config_file(REPO / "configs" / "sweep_kv_heads.py", validate_config=False)
    assert config.data.path == str(shakespeare_path.resolve())
    plan = points(config, sweep_fields(config))
    assert [p.config.model.num_kv_heads for p in plan] == [8, 4, 2, 1]
    counts = {accounting.param_count(ModelConfig.from_config(p.config.model)) for p in plan}
    assert len(counts) == 1  # match_mha_params: equal parameter counts


@pytest.mark.slow
def test_tiny_sweep_end_to_end_and_rerun_skips(tmp_path):
    start = time.time()
    result = run_sweep(tmp_path, *TINY, "--sweep=model.num_kv_heads=2,1")
    assert result.returncode == 0, result.stdout + result.stderr
    first_run = time.time() - start
    names = ["num_kv_heads=2", "num_kv_heads=1"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == sorted(names)
    for name in names:
        saved = json.loads((tmp_path / name / "result.json").read_text())
        assert saved["step"] == 20 and (tmp_path / name / "checkpoints" / "20").is_dir()

    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == EXPECTED_COLUMNS
    assert [row["point"] for row in rows] == names
    for row in rows:
        model = ModelConfig.from_config(dict(
            vocab_size=256, d_model=48, num_layers=2, num_heads=4, head_dim=12, mlp_dim=144,
            num_kv_heads=int(row["num_kv_heads"]), match_mha_params=True))
        assert int(row["params"]) == accounting.param_count(model)
        assert int(row["kv_cache_bytes_per_token"]) == accounting.kv_cache_bytes_per_token(model)
        assert int(row["decode_context"]) == 64
        for column in ("train_tokens_per_sec", "eval_loss", "decode_tokens_per_sec"):
            assert float(row[column]) > 0
    assert [int(row["num_kv_heads"]) for row in rows] == [2, 1]
    assert rows[0]["params"] == rows[1]["params"]  # match_mha_params holds them equal
    assert int(rows[0]["kv_cache_bytes_per_token"]) == 2 * int(rows[1]["kv_cache_bytes_per_token"])
    markdown = (tmp_path / "results.md").read_text().splitlines()
    assert markdown[0] == "| " + " | ".join(EXPECTED_COLUMNS) + " |" and len(markdown) == 4
    assert markdown[0] in result.stdout
    for png in ("eval_loss.png", "decode_tokens_per_sec.png", "loss_curves.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_SIGNATURE

    start = time.time()
    again = run_sweep(tmp_path, *TINY, "--sweep=model.num_kv_heads=2,1")
    assert again.returncode == 0, again.stdout + again.stderr
    assert again.stdout.count("skipped") == 2 and "training" not in again.stdout
    assert time.time() - start < first_run / 2
    with (tmp_path / "results.csv").open() as f:
        assert list(csv.DictReader(f)) == rows

    # Other decode settings: both points are timed again, side by side; nothing retrains.
    third = run_sweep(tmp_path, *TINY, "--sweep=model.num_kv_heads=2,1", "--decode_context=32")
    assert third.returncode == 0, third.stdout + third.stderr
    assert third.stdout.count("skipped") == 2 and third.stdout.count("decoding") == 2
    with (tmp_path / "results.csv").open() as f:
        assert [int(row["decode_context"]) for row in csv.DictReader(f)] == [32, 32]

"""benchmarks/retrofit.py: its KL and loss against float64 NumPy, and its zero-shot stage end
to end at toy size (a random configs/tiny.py model standing in for SmolLM2)."""

import csv
import json
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from commands import REPO
from model_files import tiny_workdir
from mqa.attention import cpu_decode

sys.path.insert(0, str(REPO))
from benchmarks import retrofit  # noqa: E402

pytestmark = pytest.mark.usefixtures("fast_compile")


def test_kl_and_loss_match_float64():
    rng = np.random.default_rng(0)
    reference, converted = (rng.normal(size=(6, 11)) * 3 for _ in range(2))
    targets = rng.integers(0, 11, size=5)
    log = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))  # noqa: E731
    p, q = log(reference), log(converted)
    kl, nll = retrofit.per_position(jnp.asarray(p, jnp.float32), jnp.asarray(q, jnp.float32),
                                    jnp.asarray(targets))
    np.testing.assert_allclose(kl, (np.exp(p) * (p - q)).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(nll, -q[np.arange(5), targets], rtol=1e-5)


@pytest.mark.slow
def test_zero_shot_stage_at_toy_size(tmp_path):
    source = tiny_workdir(tmp_path / "source", "model.num_kv_heads=4", "model.kv_quant_group=8",
                          tokenizer="byte")
    out = tmp_path / "out"
    retrofit.main(["--workdir", str(tmp_path / "work"), "--source", str(source), "--windows", "3",
                   "--seq_len", "64", "--out", str(out),
                   "--only", "GQA-1 aligned,GQA-1 mean,int4 cache,window 152 + 4 sinks + 1 in 10 global"])
    rows = {r["conversion"]: r for r in csv.DictReader((out / "zero_shot.csv").open())}
    assert float(rows["original"]["kl"]) == 0.0
    assert float(rows["GQA-1 aligned"]["cache_fraction"]) == 0.25  # 4 K/V heads to 1
    assert float(rows["window 152 + 4 sinks + 1 in 10 global"]["kl"]) == 0.0  # 64 < the window
    assert all(float(r["kl"]) >= 0 for r in rows.values()) and float(rows["GQA-1 mean"]["kl"]) > 0
    assert json.loads((out / "zero_shot.json").read_text())["windows"] == 3
    [pair] = list(csv.DictReader((out / "zero_shot_comparisons.csv").open()))  # of those declared
    assert (pair["a"], pair["b"]) == ("GQA-1 aligned", "GQA-1 mean") and pair["p_holm"] == pair["p"]
    assert float(pair["mean"]) == pytest.approx(float(rows["GQA-1 aligned"]["kl"]) - float(rows["GQA-1 mean"]["kl"]))
    assert (out / "zero_shot.png").is_file() and (out / "zero_shot.md").is_file()
    lines = (out / "zero_shot_windows.jsonl").read_text().splitlines()
    retrofit.main(["--workdir", str(tmp_path / "work"), "--source", str(source), "--windows", "3",
                   "--seq_len", "64", "--out", str(out), "--only", "GQA-1 aligned"])
    assert (out / "zero_shot_windows.jsonl").read_text().splitlines() == lines  # resumed
    # a run with --only adds to the table: every model scored so far is still there
    assert {r["conversion"] for r in csv.DictReader((out / "zero_shot.csv").open())} == set(rows)

    # Decoding, each model through XLA and through the C++ kernel, at a toy context.
    decode = ["--workdir", str(tmp_path / "work"), "--source", str(source), "--out", str(out), "--decode",
              "--only", "GQA-1 aligned,int4 cache", "--repeats", "1", "--decode_batch", "2"]
    if cpu_decode.compiler_found():
        retrofit.main([*decode, "--kernel", "--decode_contexts", "32", "--table", "decode_toy"])
        timed = {r["model"]: r for r in csv.DictReader((out / "decode_toy.csv").open())}
        assert sorted(timed) == sorted(f"{name}{kernel}" for name in ("original", "GQA-1 aligned", "int4 cache")
                                       for kernel in ("", ", kernel"))
        assert float(timed["GQA-1 aligned, kernel"]["cache_fraction"]) == 0.25
        assert all(int(r["decode_context"]) == 32 and float(r["decode_tokens_per_sec"]) > 0
                   for r in timed.values())
    with pytest.raises(SystemExit) as refused:
        retrofit.main([*decode, "--decode_contexts", "2K"])
    assert "--decode_contexts='2K': comma-separated numbers of tokens from 1 to" in str(refused.value)

    # Distillation: the aligned conversion trained towards the original, then scored, also
    # through int8 and int4 caches; its KL to the original falls.
    retrofit.main(["--workdir", str(tmp_path / "work"), "--source", str(source), "--windows", "3",
                   "--seq_len", "64", "--out", str(out), "--distill", "GQA-1 aligned", "--steps", "8", "--remat",
                   "--batch_size", "4", "--train_seq_len", "32", "--learning_rate", "1e-3"])
    distilled = {r["conversion"]: r for r in csv.DictReader((out / "distilled.csv").open())}
    # a run of other than 50 steps (the first runs' length) carries its length in its name
    saved = json.loads((tmp_path / "work" / "distilled" / "GQA-1_aligned_8steps" / "config.json").read_text())
    assert saved["model"]["remat"] is True  # --remat: recomputed activations
    assert sorted(distilled) == ["GQA-1 aligned, distilled, 8 steps", "GQA-1 aligned, distilled, 8 steps, int4 cache",
                                 "GQA-1 aligned, distilled, 8 steps, int8 cache"]
    row = distilled["GQA-1 aligned, distilled, 8 steps"]
    assert float(row["kl_zero_shot"]) == pytest.approx(float(rows["GQA-1 aligned"]["kl"]))
    assert float(row["kl_distilled"]) < float(row["kl_zero_shot"]) and 0 < float(row["recovered"]) <= 1
    assert int(row["tokens"]) == 8 * 4 * 32

    # A rerun on another order of the training windows (--seed 1): its own run and rows, and
    # the two runs' window-paired difference, which equals the difference of their means.
    retrofit.main(["--workdir", str(tmp_path / "work"), "--source", str(source), "--windows", "3",
                   "--seq_len", "64", "--out", str(out), "--distill", "GQA-1 aligned", "--steps", "8",
                   "--batch_size", "4", "--train_seq_len", "32", "--learning_rate", "1e-3", "--seed", "1"])
    rerun = json.loads((tmp_path / "work" / "distilled" / "GQA-1_aligned_8steps_seed1" / "config.json").read_text())
    assert rerun["train"]["seed"] == 1 and saved["train"]["seed"] == 0
    distilled = {r["conversion"]: r for r in csv.DictReader((out / "distilled.csv").open())}
    assert "GQA-1 aligned, distilled, 8 steps, seed 1, int8 cache" in distilled and len(distilled) == 6
    second = distilled["GQA-1 aligned, distilled, 8 steps, seed 1"]
    assert float(second["kl_distilled"]) != float(row["kl_distilled"])  # other batches, another model
    [between] = list(csv.DictReader((out / "distilled_runs.csv").open()))
    assert (between["run"], between["baseline"]) == ("GQA-1 aligned, distilled, 8 steps, seed 1",
                                                     "GQA-1 aligned, distilled, 8 steps")
    assert float(between["kl_mean"]) == pytest.approx(
        float(second["kl_distilled"]) - float(row["kl_distilled"]), rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_gemma3_frontier_at_toy_size(tmp_path):
    """--frontier gemma3 on a Gemma-like toy (local layers on their own RoPE base, QK-norm):
    fewer global layers keep each layer's base, and the declared comparison is tested."""
    source = tiny_workdir(tmp_path / "source", "model.num_kv_heads=1", "model.sliding_window=16",
                          "model.global_every=2", "model.rope_local_theta=100", "model.qk_norm=true",
                          tokenizer="byte")
    out = tmp_path / "out"
    retrofit.main(["--workdir", str(tmp_path / "work"), "--frontier", "gemma3", "--source", str(source),
                   "--windows", "3", "--seq_len", "64", "--out", str(out),
                   "--only", "no global layer,no global layer + 4 sinks"])
    rows = {r["conversion"]: r for r in csv.DictReader((out / "zero_shot.csv").open())}
    assert float(rows["no global layer"]["cache_fraction"]) == pytest.approx(32 / 80)  # 2x16 of 16+64
    assert rows["no global layer"]["family"] == "fewer global layers"
    converted = json.loads((tmp_path / "work" / "no_global_layer" / "config.json").read_text())["model"]
    assert (converted["global_every"], converted["rope_global_every"]) == (0, 2)
    [pair] = list(csv.DictReader((out / "zero_shot_comparisons.csv").open()))
    assert (pair["a"], pair["b"]) == ("no global layer + 4 sinks", "no global layer")


def test_a_table_whose_windows_are_not_kept_is_not_republished_without_them(tmp_path, capsys):
    """Tables published before the per-window scores were committed cannot be extended
    with --only: that would drop their other rows, so the run stops in one line."""
    (tmp_path / "zero_shot.json").write_text(json.dumps({"rows": [
        {"conversion": "original"}, {"conversion": "GQA-1 mean"}, {"conversion": "int8 cache"}]}))
    with pytest.raises(SystemExit) as exit_info:
        retrofit.check_published(tmp_path, ["int8 cache"], 2048)
    assert "holds 1 models whose per-window scores are not in" in str(exit_info.value)
    assert "'GQA-1 mean'" in str(exit_info.value)
    retrofit.check_published(tmp_path, ["int8 cache", "GQA-1 mean"], 2048)  # all rescored: fine


@pytest.mark.parametrize("stage", [[], ["--decode"]])
def test_a_source_that_is_not_a_workdir_is_a_one_line_error(tmp_path, stage):
    with pytest.raises(SystemExit) as refused:
        retrofit.main([*stage, "--workdir", str(tmp_path / "work"), "--source", str(tmp_path)])
    assert str(refused.value) == (f"error: --source: {str(tmp_path.resolve())!r} is not a workdir "
                                  "(no config.json) or a checkpoint in one")


@pytest.mark.slow
def test_kl_by_position_is_zero_where_the_window_sees_everything(tmp_path):
    """benchmarks/retrofit_positions.py: a window of 148 + 4 sinks sees all the original sees
    at positions below 152, so its KL there is zero, and beyond it is not; the buckets
    average to the zero-shot table's KL; the second model's column is its paired difference
    from the first; and a bucket that does not divide the windows is refused in one line."""
    from benchmarks import retrofit_positions
    source = tiny_workdir(tmp_path / "source", "model.max_seq_len=256", tokenizer="byte")
    work, out = tmp_path / "work", tmp_path / "out"
    window, merged = "window 152 + 4 sinks + 1 in 10 global", "GQA-1 aligned"
    common = ["--workdir", str(work), "--source", str(source), "--windows", "3", "--seq_len", "256",
              "--out", str(out)]
    retrofit.main([*common, "--only", f"{window},{merged}"])
    retrofit_positions.main([*common, "--models", window, merged, "--bucket", "32"])
    table = list(csv.DictReader((out / "positions.csv").open()))
    overall = {r["model"]: r for r in table if r["span"] == "all"}
    table = [r for r in table if r["span"] == "bucket"]
    kl = {(r["model"], int(r["first_position"])): float(r["kl"]) for r in table}
    assert sorted(p for m, p in kl if m == window) == list(range(0, 256, 32))
    assert all(kl[(window, p)] < 1e-6 for p in range(0, 128, 32))  # positions 0-127 < 152
    assert all(kl[(window, p)] > 1e-4 for p in (160, 192, 224))    # every position past the window
    zero_shot = {r["conversion"]: float(r["kl"]) for r in csv.DictReader((out / "zero_shot.csv").open())}
    for model in (window, merged):
        assert np.mean([kl[(model, p)] for p in range(0, 256, 32)]) == pytest.approx(zero_shot[model], rel=1e-5)
        assert float(overall[model]["kl"]) == pytest.approx(zero_shot[model], rel=1e-5)
    assert float(overall[merged]["kl_diff"]) == pytest.approx(zero_shot[merged] - zero_shot[window], rel=1e-5)
    windows = [json.loads(line) for line in (out / "positions_windows.jsonl").read_text().splitlines()]
    for row in (r for r in table if r["model"] == merged):
        b = int(row["first_position"]) // 32
        by_window = {w["window"]: w["kl_by_bucket"][b] for w in windows if w["name"] == merged}
        first = {w["window"]: w["kl_by_bucket"][b] for w in windows if w["name"] == window}
        assert float(row["kl_diff"]) == pytest.approx(np.mean([by_window[w] - first[w] for w in range(3)]))
        loss = {w["window"]: w["nll_by_bucket"][b] - o["nll_by_bucket"][b] for w in windows for o in windows
                if w["name"] == merged and o["name"] == window and o["window"] == w["window"]}
        assert float(row["loss_diff"]) == pytest.approx(np.mean(list(loss.values())))
    assert (out / "positions.png").is_file()
    # the original by name: KL zero, its loss the window's where the window sees everything
    retrofit_positions.main([*common, "--models", "original", window, "--bucket", "32", "--table", "by_original"])
    table = list(csv.DictReader((out / "by_original.csv").open()))
    assert (out / "by_original.png").is_file() and (out / "positions.csv").is_file()
    assert all(float(r["kl"]) == 0 for r in table if r["model"] == "original")
    assert all(abs(float(r["loss_diff"])) < 1e-5 for r in table
               if r["model"] == window and int(r["last_position"]) < 152)
    with pytest.raises(SystemExit) as refused:
        retrofit_positions.main([*common, "--models", window, "--bucket", "48"])
    assert str(refused.value) == "error: --bucket=48: a positive divisor of --seq_len=256"
    with pytest.raises(SystemExit) as refused:  # the scores file holds buckets of 32
        retrofit_positions.main([*common, "--models", window, "--bucket", "64"])
    assert str(refused.value).startswith("error: --bucket=64: ") and "buckets of 32 positions" in str(refused.value)
    with pytest.raises(SystemExit) as refused:
        retrofit_positions.main([*common, "--models", "window 341 + 4 sinks", "--bucket", "32"])
    assert "no such model in" in str(refused.value)

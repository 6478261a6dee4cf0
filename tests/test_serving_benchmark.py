"""benchmarks/serving.py at toy size: the budget's batches from the cache's bytes, every
row measured and written, and one-line errors for bad arguments."""

import csv
import json

import pytest

from benchmarks import serving
from benchmarks.decode import variant_config
from mqa import accounting
from model_files import tiny_workdir
from mqa.attention import cpu_decode
from commands import usage_error


@pytest.mark.slow
def test_serving_runs_and_the_budget_admits_sequences_by_cache_size(tmp_path):
    rows = serving.main(["--budget_gb=0.002", "--context=32", "--variants=MHA,MQA",
                         "--fractions=1,0.5", "--steps=2", "--repeats=1", "--bandwidth_mb=16",
                         "--ragged", "--out", str(tmp_path)])
    by = {(r["configuration"], r["batch"]): r for r in rows}
    most = {r["configuration"]: r["max_batch"] for r in rows}
    # 8 K/V heads against 1: eight times the sequences in the same memory.
    assert most["MHA"] == 2_000_000 // (2 * 8 * 32 * 4 * 32 * 4)
    assert most["MQA"] == 2_000_000 // (2 * 1 * 32 * 4 * 32 * 4)
    assert {(name, batch) for name, batch in by} == {
        (name, b) for name in most for b in {most[name], max(1, round(most[name] / 2))}}
    assert all(r["tokens_per_sec"] > 0 and r["memory_floor_fraction"] > 0 for r in rows)
    assert all(r["prefill_s"] > 0 for r in rows if r["is_max_batch"])
    # ragged rows: lengths 4..32 tokens; a paged cache would admit by their mean length
    for r in rows:
        lengths = serving.ragged_lengths(r["batch"], 32)
        assert r["ragged"] and r["mean_length"] == sum(lengths) / r["batch"]
        assert r["max_batch_paged"] == int(2_000_000 // (r["kv_bytes_per_token"] * r["mean_length"]))

    # the compute floor: each row's own length's matmul FLOPs at the run's matmul rate
    rate = json.loads((tmp_path / "serving.json").read_text())["matmul_flops_per_sec"]
    for r in rows:
        config = variant_config(r["configuration"])
        flops = sum(accounting.decode_step_flops(config, 1, n) for n in serving.ragged_lengths(r["batch"], 32))
        assert r["compute_floor_fraction"] == pytest.approx(flops / rate / (r["ms_per_step"] / 1e3))
        assert r["roofline_fraction"] == max(r["compute_floor_fraction"], r["memory_floor_fraction"])
    with (tmp_path / "serving.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "serving.png").stat().st_size > 0


@pytest.mark.parametrize("argv,fragment", [
    (["--variants=MHA,XYZ"], "--variants: 'XYZ' is not one of MHA"),
    (["--budget_gb=0"], "--budget_gb=0.0 must be > 0"),
    (["--fractions=1,2"], "must be in (0, 1]"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, tmp_path, capsys):
    assert fragment in usage_error(serving.main, [*argv, "--out", str(tmp_path)], capsys)
    assert not list(tmp_path.iterdir())


def test_ragged_lengths_spread_from_an_eighth_of_the_context_to_all_of_it():
    assert serving.ragged_lengths(5, 2048) == [256, 704, 1152, 1600, 2048]
    assert serving.ragged_lengths(1, 2048) == [2048]


@pytest.mark.skipif(not cpu_decode.compiler_found(), reason="no C++ compiler to build the kernel")
def test_a_workdir_named_kernel_decodes_through_the_kernel(tmp_path, monkeypatch):
    """--workdir=NAME-kernel=PATH loads the model with decode_impl=cpu_kernel: its rows are
    timed beside the same model through XLA, and the kernel is what its layers call."""
    workdir = tiny_workdir(tmp_path / "tiny", tokenizer="byte")
    calls = []
    attend = cpu_decode.attend
    monkeypatch.setattr(cpu_decode, "attend", lambda *a, **k: calls.append(1) or attend(*a, **k))
    rows = serving.main(["--budget_gb=0.001", "--context=32", "--variants=MQA", "--fractions=1",
                         "--steps=2", "--repeats=1", "--bandwidth_mb=16",
                         f"--workdir=tiny={workdir}", f"--workdir=tiny-kernel={workdir}",
                         "--out", str(tmp_path / "out")])
    by = {r["configuration"]: r for r in rows}
    assert set(by) == {"MQA", "tiny", "tiny-kernel"}
    assert by["tiny"]["max_batch"] == by["tiny-kernel"]["max_batch"] > 0
    assert by["tiny-kernel"]["tokens_per_sec"] > 0 and calls  # traced through the kernel


def test_a_kernel_workdir_the_kernel_cannot_take_is_one_line(tmp_path, capsys):
    """A bfloat16 model named NAME-kernel: the kernel computes in float32, said in one line
    naming the workdir, before anything is timed."""
    workdir = tiny_workdir(tmp_path / "tiny", "model.dtype=bfloat16", tokenizer="byte")
    with pytest.raises(SystemExit) as exit_info:
        serving.main(["--variants=MQA", f"--workdir=tiny-kernel={workdir}", "--out", str(tmp_path / "out")])
    message = str(exit_info.value)
    assert message.startswith(f"error: --workdir=tiny-kernel={workdir}: ") and "\n" not in message
    assert "float32" in message and not (tmp_path / "out").exists()

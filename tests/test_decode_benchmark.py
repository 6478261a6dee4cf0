"""benchmarks/decode.py end to end, and its one-line errors for bad arguments."""

import dataclasses
import json

import pytest

from benchmarks import decode
from mqa import accounting


@pytest.mark.parametrize("argv,fragment", [
    (["--kv_heads=8,3"], "--kv_heads: 3 must divide the model's 8 query heads"),
    (["--kv_heads=0"], "--kv_heads: 0 must divide"),
    (["--contexts=65530"], "--contexts: 65530 plus --steps=32 exceeds the model's max_seq_len=65536"),
    (["--batches=0"], "--batches: 0 must be at least 1"),
    (["--steps=0"], "--steps=0 must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        decode.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert fragment in stderr.strip().splitlines()[-1] and "Traceback" not in stderr
    assert not list(tmp_path.iterdir())  # nothing measured or written


@pytest.mark.slow
def test_the_decode_benchmark_runs_and_reports_every_loop(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    decode.main(["--contexts=32", "--batches=2", "--kv_heads=8,1", "--steps=2", "--repeats=1",
                 "--hf_context=32", "--hf_batch=2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode.json").read_text())
    mha, mqa_row = result["rows"]
    assert (mha["num_kv_heads"], mqa_row["num_kv_heads"]) == (8, 1)
    # The cache shrinks by the number of heads; the bytes each step reads add the weights.
    assert mha["kv_cache_bytes"] == 8 * mqa_row["kv_cache_bytes"]
    weights = accounting.param_count(dataclasses.replace(decode.MODEL, num_kv_heads=1)) * 4
    assert mqa_row["bytes_read_per_step"] > weights + mqa_row["kv_cache_bytes"]
    assert mha["speedup_vs_mha"] == 1.0
    assert mqa_row["speedup_vs_mha"] == pytest.approx(mha["step_ms"] / mqa_row["step_ms"])
    assert all(r["step_ms"] > 0 and r["torch_step_ms"] > 0 and r["hf_step_ms"] > 0
               for r in result["rows"])
    assert (tmp_path / "decode.csv").exists() and (tmp_path / "decode.png").exists()
    printed = capsys.readouterr().out
    assert "PT tok/s" in printed and "HF tok/s" in printed

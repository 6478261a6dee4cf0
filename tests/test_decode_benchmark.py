"""benchmarks/decode.py end to end, and its one-line errors for bad arguments."""

import json

import pytest

from benchmarks import decode
from mqa import accounting
from commands import usage_error


@pytest.mark.parametrize("argv,fragment", [
    (["--variants=MHA,MLA"], "--variants: 'MLA' is not one of MHA, GQA-4, GQA-2, MQA, GTA-2"),
    (["--contexts=65530"], "--contexts: 65530 plus --steps=32 exceeds the model's max_seq_len=65536"),
    (["--batches=0"], "--batches: 0 must be at least 1"),
    (["--steps=0"], "--steps=0 must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, tmp_path, capsys):
    assert fragment in usage_error(decode.main, [*argv, "--out", str(tmp_path)], capsys)
    assert not list(tmp_path.iterdir())  # nothing measured or written


@pytest.mark.slow
def test_the_decode_benchmark_runs_and_reports_every_loop(tmp_path, capsys, fast_compile,
                                                          one_torch_thread):
    """Every loop runs and is reported (compiled without XLA's slow passes: the timings
    are not what is tested)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    decode.main(["--contexts=32", "--batches=2", "--variants=MHA,MQA,GTA-1,MLA-48,MHA-local,MQA-int8",
                 "--steps=2", "--repeats=1", "--hf_context=32", "--hf_batch=2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "decode.json").read_text())
    rows = {r["variant"]: r for r in result["rows"]}
    mha, mqa_row = rows["MHA"], rows["MQA"]
    # The cache shrinks by the number of heads; the bytes each step reads add the weights.
    assert mha["kv_cache_bytes"] == 8 * mqa_row["kv_cache_bytes"]
    weights = accounting.param_count(decode.variant_config("MQA")) * 4
    assert mqa_row["bytes_read_per_step"] > weights + mqa_row["kv_cache_bytes"]
    assert mha["speedup_vs_mha"] == 1.0
    assert mqa_row["speedup_vs_mha"] == pytest.approx(mha["step_ms"] / mqa_row["step_ms"])
    # MLA-48 caches as many numbers as MQA (48 + 16 = 2 x 32); tied with one K/V head 48;
    # int8 a byte a number plus a 4-byte scale per token and head.
    assert rows["MLA-48"]["kv_cache_bytes"] == mqa_row["kv_cache_bytes"]
    assert rows["GTA-1"]["kv_cache_bytes"] * 4 == mqa_row["kv_cache_bytes"] * 3
    assert rows["MQA-int8"]["kv_cache_bytes"] * 4 * 32 == mqa_row["kv_cache_bytes"] * (32 + 4)
    assert rows["MHA-local"]["kv_cache_bytes"] == mha["kv_cache_bytes"]  # 32 < the window
    for r in result["rows"]:
        assert r["step_ms"] > 0 and r["bytes_read_per_step"] > r["kv_cache_bytes"]
        llama = r["variant"] in ("MHA", "MQA")
        assert ("torch_step_ms" in r) == llama and ("hf_step_ms" in r) == llama
    assert (tmp_path / "decode.csv").exists() and (tmp_path / "decode.png").exists()
    printed = capsys.readouterr().out
    assert "PT tok/s" in printed and "HF tok/s" in printed

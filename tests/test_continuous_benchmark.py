"""benchmarks/continuous.py at toy size, and its one-line errors."""

import json

import pytest

from benchmarks import continuous
from commands import usage_error


@pytest.mark.parametrize("argv,fragment", [
    (["--variants=MHA,MLA"], "--variants: 'MLA' is not one of MHA, GQA-4"),
    (["--requests=0"], "--requests=0, --max_rows=128 and --steps_per_call=8 must be at least 1"),
    (["--budget_gb=0"], "--budget_gb=0.0 above 0"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, tmp_path, capsys):
    assert fragment in usage_error(continuous.main, [*argv, "--out", str(tmp_path)], capsys)
    assert not list(tmp_path.iterdir())


def test_both_policies_serve_the_same_stream(tmp_path, fast_compile):
    continuous.main(["--variants=MQA", "--requests=6", "--context=32", "--budget_gb=0.0002",
                     "--max_rows=3", "--steps_per_call=2", "--out", str(tmp_path)])
    rows = {r["policy"]: r for r in json.loads((tmp_path / "continuous.json").read_text())["rows"]}
    static, refilled = rows["static"], rows["continuous"]
    assert static["rows"] == refilled["rows"] == 3  # 0.0002 GB holds 6 rows of 32 positions: capped
    assert static["new_tokens"] == refilled["new_tokens"]
    assert refilled["steps"] <= static["steps"] and refilled["utilization"] >= static["utilization"]
    assert static["speedup_vs_static"] == 1.0

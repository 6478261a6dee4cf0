"""benchmarks/kernel_one_pass.py at toy size: both paths timed for each model, the chunked
one taken, its files written; and its one-line errors."""

import json

import pytest

from benchmarks import kernel_one_pass
from mqa.attention import cpu_decode
from commands import usage_error


@pytest.mark.skipif(not cpu_decode.compiler_found(), reason="no C++ compiler to build the kernel")
def test_both_paths_are_timed_and_written(tmp_path):
    previous = cpu_decode.set_chunk_bytes(4096)  # chunks of 16 positions in a 48-token cache
    try:
        kernel_one_pass.main(["--variants=MLA-48-kernel,GTA-1-kernel", "--batch=2", "--context=48",
                              "--repeats=1", f"--out={tmp_path}"])
        assert cpu_decode.set_chunk_bytes(4096) == 4096  # left as it was found
    finally:
        cpu_decode.set_chunk_bytes(previous)
    rows = json.loads((tmp_path / "one_pass.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["MLA-48-kernel", "GTA-1-kernel"]
    assert all(r["chunked"] and r["one_pass_tokens_per_sec"] > 0 and r["two_passes_tokens_per_sec"] > 0
               for r in rows)
    assert (tmp_path / "one_pass.md").read_text().count("| MLA-48-kernel | 2 | 48 |") == 1


@pytest.mark.parametrize("argv, fragment", [
    (["--variants=MLA-48"], "--variants: 'MLA-48' is not one of"),
    ([], "nothing to time: give --variants and/or --workdir"),
    (["--workdir=runs/nowhere"], "--workdir 'runs/nowhere': expected NAME=PATH"),
    (["--workdir=x=configs"], "--workdir 'x=configs': "),  # a folder, not a workdir
    (["--variants=GTA-1-kernel", "--batch=0"], "--batch=0, --context=2048 and --repeats=7 must be at least 1"),
])
def test_bad_arguments_are_one_line_errors(argv, fragment, capsys):
    assert fragment in usage_error(kernel_one_pass.main, argv, capsys)

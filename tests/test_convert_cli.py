"""`python -m mqa.convert` as a user runs it: every refusal is one line on stderr, exit
status 2, no traceback (run as `-m`, the converters' errors are still the class the command
line catches). Each test is one subprocess, with its input in a tmp dir and cwd the repo."""

import os
import subprocess
import sys

import pytest

from model_files import tiny_workdir
from commands import REPO

pytest.importorskip("gguf")
from model_files import tiny_gguf  # noqa: E402


def run_convert(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "mqa.convert", *map(str, args)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def assert_refused(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit status 2 and exactly one line on stderr, "error: ...", naming each fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_gguf_of_a_file_that_is_not_gguf(tmp_path):
    src = tmp_path / "model.gguf"
    src.write_text("not a gguf file")
    assert_refused(run_convert("gguf", "--src", src, "--workdir", tmp_path / "out"),
                   repr(str(src)), "cannot be read as a GGUF file", "magic")
    assert not (tmp_path / "out").exists()


def test_gguf_of_a_truncated_or_missing_file(tmp_path):
    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    src = tmp_path / "model.gguf"
    src.write_bytes(whole[:len(whole) // 2])
    assert_refused(run_convert("gguf", "--src", src, "--workdir", tmp_path / "out"),
                   "is a GGUF file that cannot be read, truncated or damaged",
                   f"({len(whole) // 2:,} bytes)")
    assert_refused(run_convert("gguf", "--src", tmp_path / "gone.gguf", "--workdir", tmp_path / "out"),
                   "gone.gguf", "does not exist")
    assert not (tmp_path / "out").exists()


def test_to_hf_of_a_converted_latent_workdir(tmp_path):
    """Latent attention exports as DeepSeek-V2 (tests/test_export_hf.py), but not a grouped
    model's conversion with a rotary key per K/V head, which DeepSeek-V2 cannot express."""
    workdir = tiny_workdir(tmp_path / "mla", "model.attention=latent", "model.kv_latent_dim=32",
                           "model.rope_head_dim=8", "model.rope_key_heads=2")
    assert_refused(run_convert("to-hf", "--src", workdir, "--workdir", tmp_path / "hf"),
                   "model.rope_key_heads=2", "cannot be expressed as a Hugging Face DeepSeek-V2",
                   "valid: 1")
    assert_refused(run_convert("to-hf", "--src", workdir, "--out", tmp_path / "hf"),  # the alias
                   "model.rope_key_heads=2")
    assert not (tmp_path / "hf").exists()


def test_usage_error_is_one_line_too(tmp_path):
    assert_refused(run_convert("to-hf", "--src", tmp_path), "the following arguments are required",
                   "--workdir")

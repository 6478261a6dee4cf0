"""Running the tools as a user does, and checking how they refuse (test modules import
this, never each other).

- `REPO`, `tiny` (configs/tiny.py with overrides), `SHORT` (a 12-step run's overrides).
- `run_train`, `start_train`: `python train.py` in a child (`cli_env`: its devices and the
  matmul precision this process has); `losses`, `wait_for_rows`, `final_params`: what a
  run left in its workdir; `free_port` for a multi-process run.
- `assert_one_line_error`: a command's refusal (status, one "error: ..." line, no
  traceback); `assert_one_line`: a library error's one-line message; `refusal`: the line
  `python -m mqa.convert` refuses with, run in this process; `usage_error`: the line a
  benchmark's `main` refuses its arguments with.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import orbax.checkpoint as ocp
import pytest

from mqa.config import load_config_file
from mqa.convert.__main__ import main as convert_cli

REPO = pathlib.Path(__file__).resolve().parents[1]


# A short run of the tiny config, logging every step (overrides, as after --config.).
SHORT = ["train.steps=12", "train.log_every=1", "train.eval_every=12", "train.eval_batches=2",
         "train.final_eval_tokens=4096"]


def tiny(*overrides: str):
    """configs/tiny.py with "section.field=value" overrides."""
    return load_config_file(REPO / "configs" / "tiny.py", overrides)


def cli_env(devices: int = 1, *, optimize: bool = True) -> dict:
    """A subprocess's environment: `devices` CPU devices, and the matmul precision conftest gives
    this process, so that its runs and in-process ones compute the same bits. optimize=False
    compiles 2-3x faster (LLVM -O0) and moves losses in their 7th digit: for runs that are
    compared with each other within a tolerance, not bit for bit."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    if not optimize:
        flags += " --xla_backend_optimization_level=0"
    return {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu", "JAX_DEFAULT_MATMUL_PRECISION": "highest"}


def run_train(workdir, *args, devices=1, check=True, timeout=300, optimize=True):
    """`python train.py --workdir=WORKDIR ARGS...`, finished (see cli_env for `optimize`)."""
    command = [sys.executable, "train.py", f"--workdir={workdir}", *args]
    result = subprocess.run(command, cwd=REPO, env=cli_env(devices, optimize=optimize),
                            capture_output=True, text=True, timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def start_train(workdir, *args, optimize: bool = True) -> subprocess.Popen:
    """`python train.py --workdir=WORKDIR ARGS...`, started (see cli_env for `optimize`)."""
    return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *args], cwd=REPO,
                            env=cli_env(optimize=optimize), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def wait_for_rows(workdir, proc, rows, timeout=240):
    """Until the run `proc` has logged `rows` losses in WORKDIR/metrics.jsonl."""
    deadline = time.time() + timeout
    while not ((pathlib.Path(workdir) / "metrics.jsonl").exists() and len(losses(workdir)) >= rows):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def final_params(workdir, step):
    return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                              / "params")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_one_line_error(result, *fragments, status=2):
    """A CLI that failed with `status` and one "error: ..." line last on stderr, no traceback."""
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def assert_one_line(error: pytest.ExceptionInfo, *fragments):
    """A library error whose message is one line holding every fragment."""
    message = str(error.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def refusal(capfd, *argv) -> str:
    """The one line `python -m mqa.convert ARGV` refuses with, run in this process: exit
    status 2, nothing else on stderr, no traceback."""
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        convert_cli([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err.strip()


def usage_error(main, argv, capsys) -> str:
    """The last line of what `main(argv)` (an argparse command run in this process) printed
    refusing its arguments: exit status 2, no traceback."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]

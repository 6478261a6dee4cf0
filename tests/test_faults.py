"""Faults lose nothing and explain themselves: kills, NaNs, a second run, damaged checkpoints."""

import os
import pathlib
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.test_train_cli import REPO, assert_one_line_error, final_params, losses, run_train


def start_train(workdir, *args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    return subprocess.Popen([sys.executable, "train.py", f"--workdir={workdir}", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(workdir, proc, rows, timeout=240):
    deadline = time.time() + timeout
    while not ((pathlib.Path(workdir) / "metrics.jsonl").exists() and len(losses(workdir)) >= rows):
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.02)


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_run(tmp_path):
    """Checkpoints every step, so kills land during saves too. The first kill comes once
    step N has been saved, two more at random moments of the resumed runs; the same
    command then finishes 2N steps exactly as a run that was never interrupted."""
    args = ["--config=configs/tiny.py", "--config.train.steps=40", "--config.train.log_every=1",
            "--config.train.eval_every=1000", "--config.checkpoint.every=1",
            "--config.checkpoint.keep=2"]
    run_train(tmp_path / "straight", *args)
    workdir = tmp_path / "killed"
    proc = start_train(workdir, *args)
    deadline = time.time() + 240
    while not (workdir / "checkpoints" / "20").exists():
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rng = random.Random(0)
    for _ in range(2):
        proc = start_train(workdir, *args)
        wait_for_rows(workdir, proc, rows=len(losses(workdir)) + 1)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(losses(workdir)) < 40, "the run finished before the last kill"
    result = run_train(workdir, *args)
    assert "resumed from step" in result.stdout
    assert losses(workdir) == losses(tmp_path / "straight")  # every step logged once, same values
    assert_same_params(final_params(workdir, 40), final_params(tmp_path / "straight", 40))


@pytest.mark.slow
def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(tmp_path):
    result = run_train(tmp_path, "--config=configs/tiny.py", "--config.train.learning_rate=1e30",
                       "--config.train.steps=100", "--config.checkpoint.every=2",
                       "--config.train.max_nonfinite_steps=4", check=False)
    assert_one_line_error(result, "not finite at steps", "4 in a row",
                          "train.max_nonfinite_steps=4", "is intact")
    stopped = int(result.stderr.split("stopped at step ")[1].split(";")[0])
    assert stopped < 20
    step = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    params = final_params(tmp_path, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
    first = start_train(tmp_path, "--config=configs/tiny.py", "--config.train.steps=100000",
                        "--config.train.log_every=1")
    try:
        wait_for_rows(tmp_path, first, rows=1)
        second = run_train(tmp_path, "--config=configs/tiny.py", check=False)
        assert_one_line_error(second, "is in use by process", "another --workdir")
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.wait()
    assert run_train(tmp_path, "--config=configs/tiny.py", "--config.train.steps=3",
                     check=False).returncode == 0  # the lock died with the process


def damage(step_dir: pathlib.Path, how: str) -> None:
    params = step_dir / "params"
    if how == "truncated":
        biggest = max((p for p in params.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
        with biggest.open("r+b") as f:
            f.truncate(biggest.stat().st_size // 3)
    else:
        (params / "manifest.ocdbt").unlink()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with checkpoints at steps 20 and 40, and its command-line arguments."""
    args = ["--config=configs/tiny.py", "--config.train.steps=40", "--config.checkpoint.every=20",
            "--config.train.eval_every=40"]
    workdir = tmp_path_factory.mktemp("trained")
    run_train(workdir, *args)
    return workdir, args


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_damaged_checkpoint_is_named_and_the_previous_one_used(trained, tmp_path, how):
    intact, args = trained
    run = tmp_path / "run"
    shutil.copytree(intact, run)
    damage(run / "checkpoints" / "40", how)

    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    evaluate = lambda *a: subprocess.run([sys.executable, "eval.py", *a], cwd=REPO, env=env,  # noqa: E731
                                         capture_output=True, text=True, timeout=300)
    explicit = evaluate(f"--workdir={run}", "--step=40")
    assert_one_line_error(explicit, "checkpoint step 40", "is damaged")
    fallback = evaluate(f"--workdir={run}")
    assert fallback.returncode == 0, fallback.stderr
    assert "checkpoint step 40" in fallback.stderr and "damaged" in fallback.stderr
    assert "evaluating step 20" in fallback.stderr
    assert (run / "checkpoints" / "40").is_dir()  # evaluating only reads the workdir
    assert not (run / "damaged_checkpoints").exists()

    resumed = run_train(run, *args)
    assert "resumed from step 20" in resumed.stdout
    for result in (explicit, fallback, resumed):  # named with what reading it gave
        line = next(line for line in result.stderr.splitlines() if "checkpoint step 40" in line)
        assert ("OUT_OF_RANGE" if how == "truncated" else "NOT_FOUND") in line, line
        assert "bound method" not in line and "tensorstore_spec" not in line, line
    assert list((run / "damaged_checkpoints").iterdir())  # kept, not deleted
    assert_same_params(final_params(run, 40), final_params(intact, 40))


@pytest.mark.slow
def test_mesh_that_does_not_match_the_devices(tmp_path):
    result = run_train(tmp_path, "--config=configs/tiny.py", "--config.mesh.data=3", devices=4,
                       check=False)
    assert_one_line_error(result, "mesh data=3 x fsdp=1 x tensor=1 = 3 devices", "4 are available")

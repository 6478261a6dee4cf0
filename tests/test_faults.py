"""Faults lose nothing and explain themselves: kills, NaNs, a second run, damaged checkpoints."""

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from commands import (REPO, assert_one_line, assert_one_line_error, final_params, losses,
                      start_train, tiny, wait_for_rows)
from model_files import damage
from mqa import trainer
from mqa.config import ConfigError
from mqa.workdir import WorkdirLock


def assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_to_the_same_run(tmp_path, capsys):
    """Checkpoints every step, so kills land during saves too. The first kill comes once
    step N has been saved, two more at random moments of the resumed runs; the same
    run then finishes 2N steps exactly as a run that was never interrupted."""
    overrides = ["train.steps=40", "train.log_every=1", "train.eval_every=1000", "checkpoint.every=1",
                 "checkpoint.keep=2"]
    args = ["--config=configs/tiny.py", *(f"--config.{o}" for o in overrides)]
    trainer.train(tiny(*overrides), tmp_path / "straight")
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
    capsys.readouterr()
    trainer.train(tiny(*overrides), workdir)
    assert "resumed from step" in capsys.readouterr().out
    assert losses(workdir) == losses(tmp_path / "straight")  # every step logged once, same values
    assert_same_params(final_params(workdir, 40), final_params(tmp_path / "straight", 40))


def test_non_finite_losses_stop_the_run_and_keep_the_checkpoint(tmp_path):
    config = tiny("train.learning_rate=1e30", "train.steps=100", "checkpoint.every=2",
                  "train.max_nonfinite_steps=4")
    with pytest.raises(trainer.NonFiniteLoss) as error:
        trainer.train(config, tmp_path)
    assert_one_line(error, "not finite at steps", "4 in a row", "train.max_nonfinite_steps=4", "is intact")
    stopped = int(str(error.value).split("stopped at step ")[1].split(";")[0])
    assert stopped < 20
    step = max(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    params = final_params(tmp_path, step)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_a_second_run_in_the_same_workdir_is_refused(tmp_path):
    first = start_train(tmp_path, "--config=configs/tiny.py", "--config.train.steps=100000",
                        "--config.train.log_every=1", optimize=False)
    try:
        wait_for_rows(tmp_path, first, rows=1)
        with pytest.raises(ConfigError) as second:
            trainer.train(tiny(), tmp_path)
        assert_one_line(second, "is in use by process", "another --workdir")
        assert first.poll() is None  # the first run goes on undisturbed
    finally:
        first.kill()
        first.wait()
    WorkdirLock(tmp_path).release()  # the lock died with the process


TRAINED = ["train.steps=40", "checkpoint.every=20", "train.eval_every=40", "train.final_eval_tokens=4096"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run (TRAINED) with checkpoints at steps 20 and 40."""
    workdir = tmp_path_factory.mktemp("trained")
    trainer.train(tiny(*TRAINED), workdir)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_damaged_checkpoint_is_named_and_the_previous_one_used(trained, tmp_path, how, capfd):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
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

    capfd.readouterr()
    trainer.train(tiny(*TRAINED), run)
    out, err = capfd.readouterr()
    assert "checkpoint step 40" in err and "resumed from step 20" in out
    for stderr in (explicit.stderr, fallback.stderr, err):  # named with what reading it gave
        line = next(line for line in stderr.splitlines() if "checkpoint step 40" in line)
        assert ("OUT_OF_RANGE" if how == "truncated" else "NOT_FOUND") in line, line
        assert "bound method" not in line and "tensorstore_spec" not in line, line
    assert list((run / "damaged_checkpoints").iterdir())  # kept, not deleted
    assert_same_params(final_params(run, 40), final_params(trained, 40))

"""Evaluation and sampling on a freshly trained tiny run: `mqa.evaluation.evaluate` and
`mqa.sampling.sample` in this process, and eval.py itself for its flags, its last JSON
line, its progress bar and its one-line errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import mqa
from mqa import trainer
from mqa.config import load_config_file
from mqa.evaluation import evaluate
from mqa.sampling import sample

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    config = load_config_file(REPO / "configs" / "tiny.py",
                              ["train.steps=40", "train.eval_every=40", "checkpoint.every=20"])
    run_result.update(trainer.train(config, workdir))
    return workdir


run_result = {}  # what trainer.train returned for the module's run


@pytest.fixture(scope="module")
def held_out(run):
    """evaluate() of the run's newest checkpoint on its whole held-out split."""
    return evaluate(run, progress=False)


def eval_py(*args):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "eval.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_evaluate_gives_loss_perplexity_bits_per_byte_and_tokens(held_out):
    assert set(held_out) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert held_out["perplexity"] == pytest.approx(np.exp(held_out["loss"]), rel=1e-6)
    assert held_out["loss"] < np.log(256)  # better than uniform over bytes


@pytest.mark.slow
def test_eval_py_prints_json_last_and_a_progress_bar(run, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("It is a truth universally acknowledged, that a single man\n" * 20)
    result = eval_py(f"--workdir={run}", f"--text={text}", "--stride=16")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(metrics) == {"loss", "perplexity", "bits_per_byte", "tokens"}
    assert metrics["tokens"] > 0.8 * len(text.read_bytes())
    # The share of the tokens scored, tokens/s and the time left, on stderr.
    bar = result.stderr.strip().splitlines()[-1]
    assert bar.startswith("eval: 100%") and "token/s" in bar and "<00:00" in bar


@pytest.mark.slow
def test_final_evaluation_is_evaluate_on_the_whole_held_out_split(run, held_out):
    """The trainer's final numbers and eval.py's come from the same windowing: every
    held-out window, each target scored once. Periodic evaluations score the first
    train.eval_batches batches only."""
    corpus_tokens = sum(len(np.load(shard)) for shard in (run / "data").rglob("heldout-*.npy"))  # token files
    seq_len = 64  # configs/tiny.py
    assert held_out["tokens"] == (corpus_tokens - 1) // seq_len * seq_len
    assert run_result["eval_tokens"] == held_out["tokens"]
    assert run_result["eval_loss"] == pytest.approx(held_out["loss"], rel=1e-5)
    assert run_result["eval_bits_per_byte"] == pytest.approx(held_out["bits_per_byte"], rel=1e-5)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [row for row in rows if "eval_loss" in row][-1]
    assert last["eval_tokens"] == 8 * 16 * seq_len                      # eval_batches x batch
    assert last["final_eval_loss"] == pytest.approx(run_result["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_earlier_step_and_python_api_agree(run):
    model = mqa.load_model(run, step=20)
    assert model.step == 20 and model.model_config.num_kv_heads == 2
    assert mqa.load_model(run / "checkpoints" / "20").step == 20
    assert mqa.load_model(run).step == 40


@pytest.mark.slow
def test_sample_continues_the_prompt(run):
    text = sample(run, "The ", max_new_tokens=30, temperature=0)
    assert text.startswith("The ") and len(text) >= 30


@pytest.mark.slow
def test_kv_heads_override_that_does_not_fit_is_one_line(run):
    result = eval_py(f"--workdir={run}", "--config.model.num_kv_heads=1")
    assert result.returncode != 0 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "blocks.attention.k" in line and "(2, 64, 1, 16)" in line


def test_workdir_without_checkpoint_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(load_config_file(REPO / "configs" / "tiny.py").to_json())
    with pytest.raises(mqa.CheckpointError, match="has no checkpoint") as error:
        evaluate(tmp_path)
    assert "\n" not in str(error.value)
    with pytest.raises(mqa.CheckpointError, match="does not exist"):
        mqa.load_model(tmp_path / "nowhere")

"""train.py end to end: learning, devices, hosts, kill-and-resume, and bad input."""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from mqa import data, trainer
from mqa.config import load_config_file

REPO = pathlib.Path(__file__).resolve().parents[1]
# A short run of the tiny config, logging every step.
SHORT = ["--config.train.steps=12", "--config.train.log_every=1", "--config.train.eval_every=12",
         "--config.train.eval_batches=2"]


def run_train(workdir, *args, devices=1, env=None, check=True, timeout=300):
    environment = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
                   "JAX_PLATFORMS": "cpu", **(env or {})}
    command = [sys.executable, "train.py", f"--workdir={workdir}", *args]
    result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                            timeout=timeout)
    if check and result.returncode:
        raise AssertionError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def losses(workdir):
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").open()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def final_params(workdir, step):
    return ocp.StandardCheckpointer().restore(pathlib.Path(workdir) / "checkpoints" / str(step)
                                              / "params")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_tiny_config_learns_below_unigram_entropy(tmp_path):
    """configs/tiny.py on the embedded CPython docs, in well under a minute."""
    config = load_config_file(REPO / "configs" / "tiny.py")
    start = time.time()
    result = trainer.train(config, tmp_path)
    assert time.time() - start < 60
    corpus = data.load_corpus(config.data, tmp_path / "data", min_tokens=1)
    freq = np.bincount(corpus.heldout, minlength=256) / len(corpus.heldout)
    unigram_entropy = -np.sum(freq[freq > 0] * np.log(freq[freq > 0]))  # nats/token, ~3.1
    assert result["eval_loss"] < 0.85 * unigram_entropy
    assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_loss"]), rel=1e-6)
    assert result["eval_bits_per_byte"] == pytest.approx(result["eval_loss"] / np.log(2), rel=1e-6)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(25, 301, 25))
    assert {"step", "loss", "learning_rate", "tokens_per_sec", "mfu"} <= set(train_rows[1])
    assert {"eval_loss", "eval_perplexity", "eval_bits_per_byte"} <= set(rows[-1])
    assert 0 < train_rows[-1]["mfu"] < 1
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"]["num_kv_heads"] == 2 and saved["train"]["steps"] == 300
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) \
        == [100, 200, 300]


@pytest.mark.slow
@pytest.mark.parametrize("kv_heads,kv_share_every,family,meshes", [
    (4, 1, [], [("data", "tensor")]),                       # MHA
    # MQA, its one K/V head replicated, with cross-layer K/V sharing (shared_blocks)
    (1, 2, [], [("data", "tensor"), ("fsdp", "tensor")]),
    (2, 2, ["--config.model.attention=tied"], [("fsdp", "tensor")]),
    (4, 1, ["--config.model.attention=latent", "--config.model.kv_latent_dim=24",
            "--config.model.rope_head_dim=8", "--config.model.q_latent_dim=32",
            "--config.model.sliding_window=16", "--config.model.global_every=2"],
     [("fsdp", "tensor")]),
])
def test_four_devices_match_one(tmp_path, kv_heads, kv_share_every, family, meshes):
    """2 x 2 meshes over 4 simulated devices train like one device, for MHA, for MQA
    with cross-layer K/V sharing, for tied attention with sharing and for latent attention
    with low-rank queries and sliding windows."""
    args = ["--config=configs/tiny.py", f"--config.model.num_kv_heads={kv_heads}",
            f"--config.model.kv_share_every={kv_share_every}", *family, *SHORT]
    run_train(tmp_path / "one", *args, devices=1)
    one = losses(tmp_path / "one")
    assert sorted(one) == list(range(1, 13))
    for a, b in meshes:
        workdir = tmp_path / f"{a}-{b}"
        run_train(workdir, *args, "--config.mesh.data=1", f"--config.mesh.{a}=2",
                  f"--config.mesh.{b}=2", devices=4)
        four = losses(workdir)
        for step in one:
            assert abs(one[step] - four[step]) / one[step] < 1e-4, (a, b, step, one[step], four[step])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """Two jax.distributed processes on 127.0.0.1 (gloo collectives), one CPU device each."""
    args = ["--config=configs/tiny.py", *SHORT]
    run_train(tmp_path / "single", *args, devices=2)
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "train.py", f"--workdir={tmp_path / 'multi'}", *args,
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    single, multi = losses(tmp_path / "single"), losses(tmp_path / "multi")
    assert sorted(multi) == list(range(1, 13))
    for step in single:
        assert abs(single[step] - multi[step]) / single[step] < 1e-4


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path):
    args = ["--config=configs/tiny.py", "--config.train.steps=2000", "--config.checkpoint.every=1000",
            "--config.train.log_every=1", "--config.train.eval_every=5000"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.Popen([sys.executable, "train.py", f"--workdir={tmp_path}", *args], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((tmp_path / "metrics.jsonl").exists() and len(losses(tmp_path)) >= 3):
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert "SIGTERM: saved a checkpoint at step" in stderr
    step = int(stderr.split("checkpoint at step ")[1].split()[0])
    assert (tmp_path / "checkpoints" / str(step)).exists() and step < 1000
    resumed = run_train(tmp_path, *args[:1], "--config.train.steps=" + str(step + 2),
                        *args[2:])
    assert f"resumed from step {step}" in resumed.stdout


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


@pytest.mark.slow
def test_missing_data_file(tmp_path):
    result = run_train(tmp_path / "run", "--config=configs/tiny.py",
                       f"--config.data.path={tmp_path / 'nope.txt'}", check=False)
    assert_one_line_error(result, "nope.txt")


@pytest.mark.slow
def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    result = run_train(tmp_path / "run", "--config=configs/tiny.py",
                       f"--config.data.path={tmp_path / 'empty.txt'}", check=False)
    assert_one_line_error(result, "empty.txt", "empty")


@pytest.mark.slow
def test_data_shorter_than_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 4)
    result = run_train(tmp_path / "run", "--config=configs/tiny.py",
                       f"--config.data.path={tmp_path / 'short.txt'}", check=False)
    assert_one_line_error(result, "short.txt", "65")  # seq_len 64 + 1


@pytest.mark.slow
def test_unknown_config_key(tmp_path):
    result = run_train(tmp_path / "run", "--config=configs/tiny.py",
                       "--config.model.num_kv_head=2", check=False)
    assert result.returncode != 0
    assert "num_kv_head" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_invalid_value_on_command_line(tmp_path):
    result = run_train(tmp_path / "run", "--config=configs/tiny.py",
                       "--config.model.num_kv_heads=3", check=False)
    assert_one_line_error(result, "model.num_kv_heads=3 must divide model.num_heads=4",
                          "valid: 1, 2, 4")


@pytest.mark.slow
def test_batch_not_divisible_by_data_parallel_size(tmp_path):
    result = run_train(tmp_path / "run", "--config=configs/tiny.py", "--config.train.batch_size=6",
                       "--config.mesh.data=4", devices=4, check=False)
    assert_one_line_error(result, "train.batch_size=6", "4")


@pytest.mark.slow
def test_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("")
    result = run_train(tmp_path / "file" / "run", "--config=configs/tiny.py", check=False)
    assert_one_line_error(result, "workdir", "not writable")


@pytest.mark.slow
def test_rerun_reads_config_json_and_refuses_a_changed_model(tmp_path):
    run_train(tmp_path, "--config=configs/tiny.py", *SHORT)
    result = run_train(tmp_path)  # no --config: config.json, and nothing left to do
    assert "resumed from step 12" in result.stdout and "held-out perplexity" in result.stdout
    result = run_train(tmp_path, "--config=configs/tiny.py", *SHORT,
                       "--config.model.num_kv_heads=1", check=False)
    assert_one_line_error(result, "model.num_kv_heads=2", "not 1", "new --workdir")

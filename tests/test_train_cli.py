"""Training end to end: learning, devices, hosts, stop signals, what a run prints, and bad input.

Most runs call the library (`trainer.train`) in this process; subprocesses are left where the
command line is the subject (one-line errors, exit statuses, signals) or where a run needs
another device count or several processes.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from mqa import data, metrics, trainer, train_report
from commands import (REPO, SHORT, assert_one_line, assert_one_line_error, cli_env, free_port,
                      losses, run_train, start_train, tiny, wait_for_rows)
from mqa.config import ConfigError, build_model_config


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """configs/tiny.py for SHORT's 12 steps on one device, in this process: (workdir, {step: loss})."""
    workdir = tmp_path_factory.mktemp("short")
    trainer.train(tiny(*SHORT), workdir)
    return workdir, losses(workdir)


# ----------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_tiny_config_learns_below_unigram_entropy(tmp_path, capsys):
    """configs/tiny.py on the embedded CPython docs, in well under a minute."""
    config = tiny()
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

    # What it prints: the model, a line before compiling, the sampled evaluations labelled as
    # such, and one held-out figure at the end: the final evaluation's.
    out = capsys.readouterr().out.splitlines()
    assert "4 query heads, 2 KV heads" in next(line for line in out if line.startswith("model: "))
    assert out.index("compiling the train step...") < next(i for i, l in enumerate(out) if l.startswith("step "))
    windows = config.train.eval_batches * config.train.batch_size
    sampled = [line for line in out if "eval_loss" in line]
    assert sampled and all(f"eval_loss (sampled, {windows} windows)=" in line for line in sampled)
    final = [line for line in out if "held-out" in line and not line.startswith("data: ")]
    assert final == [out[-1]] and out[-1].startswith(f"held-out perplexity {result['eval_perplexity']:.4f} ")
    assert f"over {result['eval_tokens']:,} held-out tokens" in out[-1]


def test_the_model_line_describes_each_attention_family_and_its_cache():
    def summary(**fields):
        base = dict(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=1, head_dim=16,
                    mlp_dim=128)
        return train_report.attention_summary(build_model_config(**{**base, **fields}))

    assert summary() == "4 query heads, 1 KV head"
    assert summary(num_kv_heads=2, kv_share_every=2) == "4 query heads, 2 KV heads, K/V shared by every 2 layers"
    assert summary(attention="tied", num_kv_heads=2) == "4 query heads, 2 tied KV heads + a shared rope key of 8"
    assert summary(attention="latent", num_kv_heads=4, kv_latent_dim=24, rope_head_dim=6) \
        == "4 query heads, KV cache latent 24 + rope 6 per token"
    assert train_report.plural(1, "row") == "1 row" and train_report.plural(1200, "row") == "1,200 rows"


def test_progress_labels_the_sampled_evaluation(capsys, monkeypatch):
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    progress = metrics.Progress(0, 10, sampled_windows=32)
    progress.update(5, {"loss": 2.0, "eval_loss": 1.5, "tokens_per_sec": 1234.0})
    assert "loss=2.0000  eval_loss (sampled, 32 windows)=1.5000  tokens_per_sec=1234" in capsys.readouterr().out


# ----------------------------------------------------------------------------- devices and hosts


TRAIN_CHILD = textwrap.dedent("""
    import json, sys
    from mqa import trainer
    from mqa.config import load_config_file
    for workdir, overrides in json.loads(sys.argv[1]):
        trainer.train(load_config_file("configs/tiny.py", overrides), workdir)
""")


def start_child(runs: list[tuple[pathlib.Path, list[str]]], devices: int) -> subprocess.Popen:
    """trainer.train for each (workdir, overrides) in one child process with `devices` CPU
    devices, compiled unoptimized (cli_env), started."""
    arg = json.dumps([(str(workdir), overrides) for workdir, overrides in runs])
    return subprocess.Popen([sys.executable, "-c", TRAIN_CHILD, arg], cwd=REPO,
                            env=cli_env(devices, optimize=False), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen) -> None:
    _, stderr = child.communicate(timeout=900)
    assert child.returncode == 0, stderr[-3000:]


# (name, overrides, the 2 x 2 meshes to try)
FAMILIES = [
    ("MHA", ["model.num_kv_heads=4"], [("data", "tensor")]),
    # MQA, its one K/V head replicated, with cross-layer K/V sharing (shared_blocks)
    ("MQA shared", ["model.num_kv_heads=1", "model.kv_share_every=2"], [("fsdp", "tensor")]),
    ("GTA shared", ["model.num_kv_heads=2", "model.kv_share_every=2", "model.attention=tied"], [("fsdp", "tensor")]),
    ("MLA windows", ["model.num_kv_heads=4", "model.attention=latent", "model.kv_latent_dim=24",
                     "model.rope_head_dim=8", "model.q_latent_dim=32", "model.sliding_window=16",
                     "model.global_every=2"], [("fsdp", "tensor")]),
]


@pytest.mark.slow
def test_four_devices_match_one(tmp_path):
    """2 x 2 meshes over 4 simulated devices train like one device, for MHA, for MQA
    with cross-layer K/V sharing, for tied attention with sharing and for latent attention
    with low-rank queries and sliding windows. The runs of each device count share a child;
    the two children run at once (each compiles mostly on one thread)."""
    meshes = [(i, a, b) for i, (_, _, family_meshes) in enumerate(FAMILIES) for a, b in family_meshes]
    short = [*SHORT, "train.steps=6", "train.eval_every=6"]
    children = [
        start_child([(tmp_path / f"{i}-one", [*overrides, *short])
                     for i, (_, overrides, _) in enumerate(FAMILIES)], devices=1),
        start_child([(tmp_path / f"{i}-{a}-{b}", [*FAMILIES[i][1], *short, "mesh.data=1",
                                                   f"mesh.{a}=2", f"mesh.{b}=2"])
                     for i, a, b in meshes], devices=4)]
    for child in children:
        finish(child)
    for i, a, b in meshes:
        one, four = losses(tmp_path / f"{i}-one"), losses(tmp_path / f"{i}-{a}-{b}")
        assert sorted(one) == sorted(four) == list(range(1, 7))
        for step in one:
            assert abs(one[step] - four[step]) / one[step] < 1e-4, (FAMILIES[i][0], a, b, step, one[step], four[step])


@pytest.mark.slow
def test_two_processes_match_one(tmp_path, short_run):
    """Two jax.distributed processes on 127.0.0.1 (gloo collectives), one CPU device each,
    train like one process on one device (within 1e-4: they sum in another order, and compile
    unoptimized, see cli_env)."""
    _, single = short_run
    address = f"127.0.0.1:{free_port()}"
    args = ["--config=configs/tiny.py", *(f"--config.{o}" for o in SHORT)]
    procs = [subprocess.Popen(
        [sys.executable, "train.py", f"--workdir={tmp_path / 'multi'}", *args,
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}"],
        cwd=REPO, env=cli_env(optimize=False), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    multi = losses(tmp_path / "multi")
    assert sorted(multi) == list(range(1, 13))
    for step in single:
        assert abs(single[step] - multi[step]) / single[step] < 1e-4


# ----------------------------------------------------------------------------- stop signals


def test_sigterm_saves_a_checkpoint_and_resumes(tmp_path, capsys, monkeypatch):
    """SIGTERM at step 3 (sent from the metrics writer, so it lands in the loop): the step is
    checkpointed, Preempted says so, and the same run resumes from it."""
    write = metrics.MetricsWriter.write

    def write_then_signal(self, step, row):
        write(self, step, row)
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(metrics.MetricsWriter, "write", write_then_signal)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(trainer.Preempted) as stop:
        trainer.train(tiny(*SHORT), tmp_path)
    assert stop.value.exit_status == 143 and signal.getsignal(signal.SIGTERM) is before
    assert_one_line(stop, f"SIGTERM: saved a checkpoint at step 3 in {tmp_path / 'checkpoints'}",
                    "run the same command to resume")
    assert (tmp_path / "checkpoints" / "3").exists()
    monkeypatch.undo()
    capsys.readouterr()
    trainer.train(tiny(*SHORT), tmp_path)
    assert "resumed from step 3" in capsys.readouterr().out
    assert sorted(losses(tmp_path)) == list(range(1, 13))


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_130_in_one_line(tmp_path):
    """SIGINT to a real train.py: the step under way is checkpointed and the command exits
    like SIGTERM does, with 130 and one line instead of a KeyboardInterrupt traceback."""
    proc = start_train(tmp_path, "--config=configs/tiny.py", "--config.train.steps=2000",
                       "--config.checkpoint.every=1000", "--config.train.log_every=1",
                       "--config.train.eval_every=5000", optimize=False)
    wait_for_rows(tmp_path, proc, rows=3)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "compiling the train step..." in stdout
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and lines[-1].startswith("SIGINT: saved a checkpoint at step "), stderr
    assert lines[-1].endswith("; run the same command to resume")
    step = int(lines[-1].split("checkpoint at step ")[1].split()[0])
    assert (tmp_path / "checkpoints" / str(step)).exists() and 3 <= step < 1000


# ----------------------------------------------------------------------------- bad input


@pytest.mark.slow
def test_bad_input_on_the_command_line_exits_2_in_one_line(tmp_path):
    """train.py's usage errors: a config field that does not exist (absl's parser), and a bad
    value found once the run starts, here a missing data file."""
    unknown = run_train(tmp_path / "a", "--config=configs/tiny.py", "--config.model.num_kv_head=2", check=False)
    assert_one_line_error(unknown, "num_kv_head")
    missing = run_train(tmp_path / "b", "--config=configs/tiny.py",
                        f"--config.data.path={tmp_path / 'nope.txt'}", check=False)
    assert_one_line_error(missing, "nope.txt", "does not exist")


def test_missing_data_file(tmp_path):
    with pytest.raises(data.DataError) as error:
        trainer.train(tiny(f"data.path={tmp_path / 'nope.txt'}"), tmp_path / "run")
    assert_one_line(error, "nope.txt")


def test_empty_data_file(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(data.DataError) as error:
        trainer.train(tiny(f"data.path={tmp_path / 'empty.txt'}"), tmp_path / "run")
    assert_one_line(error, "empty.txt", "empty")


def test_data_shorter_than_one_sequence(tmp_path):
    (tmp_path / "short.txt").write_text("To be, or not to be.\n" * 4)
    with pytest.raises(data.DataError) as error:
        trainer.train(tiny(f"data.path={tmp_path / 'short.txt'}"), tmp_path / "run")
    assert_one_line(error, "short.txt", "65")  # seq_len 64 + 1


def test_invalid_value(tmp_path):
    with pytest.raises(ConfigError) as error:
        trainer.train(tiny("model.num_kv_heads=3"), tmp_path / "run")
    assert_one_line(error, "model.num_kv_heads=3 must divide model.num_heads=4", "valid: 1, 2, 4")


def test_batch_not_divisible_by_data_parallel_size_and_microbatches(tmp_path):
    with pytest.raises(ConfigError) as error:
        trainer.train(tiny("train.batch_size=6", "train.grad_accum=4"), tmp_path / "run")
    assert_one_line(error, "train.batch_size=6", "(mesh.data x mesh.fsdp = 1) x train.grad_accum=4 = 4")


def test_mesh_that_does_not_match_the_devices(tmp_path):
    with pytest.raises(ConfigError) as error:
        trainer.train(tiny("mesh.data=3"), tmp_path / "run")
    assert_one_line(error, "mesh data=3 x fsdp=1 x tensor=1 = 3 devices", f"{jax.device_count()} are available")


def test_unwritable_workdir(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as error:
        trainer.train(tiny(), tmp_path / "file" / "run")
    assert_one_line(error, "workdir", "not writable")


def test_no_config_and_no_saved_one(tmp_path):
    with pytest.raises(ConfigError) as error:
        trainer.config_or_saved(None, tmp_path / "new")
    assert_one_line(error, "no --config given", "config.json", "does not exist")


@pytest.mark.slow
def test_rerun_reads_config_json_and_refuses_a_changed_model(tmp_path, short_run, capsys):
    import shutil

    shutil.copytree(short_run[0], tmp_path / "run")
    workdir = tmp_path / "run"
    trainer.train(trainer.config_or_saved(None, workdir), workdir)  # nothing left to do
    out = capsys.readouterr().out
    assert "resumed from step 12" in out and "held-out perplexity" in out
    assert "compiling the train step..." not in out
    with pytest.raises(ConfigError) as error:
        trainer.train(tiny(*SHORT, "model.num_kv_heads=1"), workdir)
    assert_one_line(error, "model.num_kv_heads=2", "not 1", "new --workdir")

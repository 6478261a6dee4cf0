"""The training loop: data, mesh, state, checkpoints, evaluation and logging for one run.

`train(config, workdir)` is what `train.py` calls. Everything a run keeps is in the workdir:

  config.json      the resolved config (read back by re-runs and eval.py)
  tokenizer.json   the tokenizer (byte or BPE)
  data/            cached token ids
  checkpoints/     orbax checkpoints of the train state
  metrics.jsonl    one JSON object per logged step; TensorBoard events in tensorboard/
"""

from __future__ import annotations

import os
import pathlib
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from mqa import accounting, data, evaluation, hardware, sharding
from mqa.checkpoint import Checkpointer, abstract_like
from mqa.config import build_model_config, ConfigError, ModelConfig, validate
from mqa.metrics import MetricsWriter, Progress
from mqa.model import Transformer
from mqa.training import TrainState, learning_rate_schedule, make_eval_step, make_optimizer, make_train_step
from mqa.workdir import (WorkdirLock, check_resumable, data_config, init_params_from,
                         prepare_workdir, restore_newest_intact)


# Held-out tokens the final evaluation scores when a saved config predates the field.
DEFAULT_FINAL_EVAL_TOKENS = 1_000_000


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint of the step named in the message was written."""


class NonFiniteLoss(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient; one line."""


def _resolve_vocab(config, tokenizer) -> None:
    if tokenizer.name == "bpe" and config.model.vocab_size != tokenizer.vocab_size:
        print(f"model.vocab_size set to {tokenizer.vocab_size}, the BPE tokenizer's size")
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"{tokenizer.name} tokenizer's {tokenizer.vocab_size} tokens")


def _check_batch(config, mesh) -> None:
    dp = sharding.data_parallel_size(mesh)
    batch, accum = config.train.batch_size, config.train.grad_accum
    if batch % (dp * accum):
        raise ConfigError(
            f"train.batch_size={batch} must be divisible by the data-parallel size "
            f"(mesh.data x mesh.fsdp = {dp}) x train.grad_accum={accum} = {dp * accum}")


def _local_rows(batch_sharding, global_shape) -> slice:
    """The rows of a global batch that this process's devices hold."""
    index_map = batch_sharding.addressable_devices_indices_map(global_shape)
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))


def _global_batch(local: np.ndarray, batch_sharding, global_shape) -> jax.Array:
    return jax.make_array_from_process_local_data(batch_sharding, local, global_shape)


def evaluate(params, eval_step, corpus: data.Corpus, config, batch_sharding, *,
             max_windows: int | None) -> dict:
    """Held-out loss (nats/token), perplexity and bits per byte over the first
    `max_windows` non-overlapping held-out windows (None: all), windowed and scored by
    `evaluation.held_out_loss` as eval.py does; each host feeds only its rows."""
    batch_size, seq_len = config.train.batch_size, config.train.seq_len
    shape = (batch_size, seq_len + 1)
    rows = _local_rows(batch_sharding, shape)

    def batch_nll(windows: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
        out = eval_step(params, _global_batch(windows[rows], batch_sharding, shape),
                        _global_batch(weights[rows], batch_sharding, (batch_size, seq_len)))
        return float(out["loss_sum"]), float(out["tokens"])

    result = evaluation.held_out_loss(
        batch_nll, corpus.heldout, seq_len=seq_len, batch_size=batch_size,
        max_windows=max_windows, bytes_per_token=corpus.heldout_bytes / len(corpus.heldout))
    return {f"eval_{key}": value for key, value in result.items()}


def final_eval_windows(config) -> int:
    """How many held-out windows the final evaluation scores: `train.final_eval_tokens`
    worth (at least one)."""
    tokens = config.train.get("final_eval_tokens", DEFAULT_FINAL_EVAL_TOKENS)
    return max(1, tokens // config.train.seq_len)


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict:
    """Trains (or resumes) the run in `workdir`; returns the final held-out metrics."""
    validate(config)
    workdir = prepare_workdir(workdir)
    is_main = jax.process_index() == 0
    lock = WorkdirLock(workdir) if is_main else None  # the other hosts share process 0's run
    try:
        return _train(config, workdir, is_main)
    finally:
        if lock is not None:
            lock.release()


def _train(config: ml_collections.ConfigDict, workdir: pathlib.Path, is_main: bool) -> dict:
    mesh = sharding.make_mesh(config.mesh)
    _check_batch(config, mesh)
    train_cfg = config.train
    corpus = data.load_corpus(data_config(config), workdir / "data", min_tokens=train_cfg.seq_len + 1)
    _resolve_vocab(config, corpus.tokenizer)
    check_resumable(config, workdir)
    if is_main:
        (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
        corpus.tokenizer.save(workdir)  # load_model and eval.py read WORKDIR/tokenizer.json
    model_config = build_model_config(config.model)
    if is_main:
        print(f"data: {corpus.source}; {len(corpus.train):,} train / {len(corpus.heldout):,} "
              f"held-out tokens")
        print(f"model: {accounting.param_count(model_config):,} parameters, "
              f"{model_config.num_heads} query heads, {model_config.num_kv_heads} KV heads; "
              f"mesh {dict(mesh.shape)}")

    # Parameters and optimizer state, created directly in their shardings.
    optimizer = make_optimizer(train_cfg)

    def init_state() -> TrainState:
        params = nnx.split(Transformer(model_config, rngs=nnx.Rngs(train_cfg.seed)))[1]
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    abstract_state = jax.eval_shape(init_state)
    state_shardings = sharding.tree_shardings(abstract_state, mesh)
    state = jax.jit(init_state, out_shardings=state_shardings)()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))

    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    writer = MetricsWriter(workdir, enabled=is_main)
    if checkpointer.all_steps():
        restored = restore_newest_intact(checkpointer, abstract_like(state), move_damaged=is_main,
                                         warn=is_main)
        if restored is None:
            raise ConfigError(f"no checkpoint in {checkpointer.directory} can be read "
                              f"(steps {checkpointer.all_steps()}); move them away to start over")
        state, _ = restored
        if is_main:
            print(f"resumed from step {int(state.step)} in {checkpointer.directory}")
    elif train_cfg.init_from:  # uptraining; AdamW's fresh state (zeros) fits any values
        state = state._replace(params=init_params_from(train_cfg.init_from,
                                                       abstract_like(state.params), is_main))
    start_step = int(state.step)
    writer.drop_after(start_step)

    schedule = learning_rate_schedule(train_cfg)
    batch_sharding = sharding.batch_sharding(mesh)
    train_step = jax.jit(make_train_step(graphdef, optimizer, schedule, train_cfg.grad_accum),
                         in_shardings=(state_shardings, batch_sharding),
                         out_shardings=(state_shardings, sharding.replicated(mesh)),
                         donate_argnums=0, compiler_options=hardware.train_compiler_options())
    eval_step = jax.jit(make_eval_step(graphdef))
    periodic_windows = train_cfg.eval_batches * train_cfg.batch_size
    final_windows = final_eval_windows(config)
    batch_shape = (train_cfg.batch_size, train_cfg.seq_len + 1)
    rows = _local_rows(batch_sharding, batch_shape)
    flops_per_token = accounting.flops_per_token(model_config, train_cfg.seq_len)
    peak = hardware.peak_flops(model_config.dtype)

    def batch_at(step: int) -> jax.Array:
        local = data.train_batch(corpus.train, step, seed=train_cfg.seed,
                                 batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len,
                                 rows=rows)
        return _global_batch(local, batch_sharding, batch_shape)

    if start_step == 0 and train_cfg.init_from:  # where uptraining starts: the converted model
        initial = evaluate(state.params, eval_step, corpus, config, batch_sharding,
                           max_windows=final_windows)
        writer.drop_after(-1)  # a run restarted before its first checkpoint logs step 0 anew
        writer.write(0, {**evaluate(state.params, eval_step, corpus, config, batch_sharding,
                                    max_windows=periodic_windows),
                         **{f"initial_{key}": value for key, value in initial.items()}})
        if is_main:
            print(f"before training: held-out loss {initial['eval_loss']:.4f} nats/token over "
                  f"{initial['eval_tokens']:,} tokens")

    preempted = []
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
    progress = Progress(start_step, train_cfg.steps, enabled=is_main)
    last_eval = None
    skipped_in_a_row, previous = 0, None
    try:
        timer_step, timer = start_step, time.perf_counter()
        for step in range(start_step, train_cfg.steps):
            state, metrics = train_step(state, batch_at(step))
            done = step + 1
            for flag_step, flag in ([previous] if previous else []):  # one step behind
                skipped_in_a_row = skipped_in_a_row + 1 if int(flag) else 0
                if skipped_in_a_row >= train_cfg.max_nonfinite_steps:
                    raise NonFiniteLoss(
                        f"the loss or gradient was not finite at steps {flag_step - skipped_in_a_row + 1}"
                        f"-{flag_step} ({skipped_in_a_row} in a row, train.max_nonfinite_steps="
                        f"{train_cfg.max_nonfinite_steps}); stopped at step {flag_step}; the last "
                        f"checkpoint (step {checkpointer.latest_step()}) is intact; lower "
                        "train.learning_rate or check the data")
            previous = (done, metrics["skipped"])
            if step == start_step:  # leave compilation out of the throughput
                jax.block_until_ready(state)
                timer_step, timer = done, time.perf_counter()
            row = {}
            if done % train_cfg.log_every == 0 or done == train_cfg.steps:
                row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - timer
                if done > timer_step:
                    tokens_per_sec = (done - timer_step) * train_cfg.batch_size * train_cfg.seq_len / elapsed
                    row.update(tokens_per_sec=tokens_per_sec,
                               mfu=tokens_per_sec * flops_per_token / peak)
                timer_step, timer = done, time.perf_counter()
            if done % train_cfg.eval_every == 0 or done == train_cfg.steps:
                # The same held-out windows at every evaluation, so the curve compares like
                # with like; the final one also scores the whole split (final_eval_tokens).
                row.update(evaluate(state.params, eval_step, corpus, config, batch_sharding,
                                    max_windows=periodic_windows))
                if done == train_cfg.steps:
                    last_eval = evaluate(state.params, eval_step, corpus, config,
                                         batch_sharding, max_windows=final_windows)
                    row.update({f"final_{key}": value for key, value in last_eval.items()})
                timer_step, timer = done, time.perf_counter()  # evaluation is not training
            if row:
                writer.write(done, row)
                progress.update(done, row)
            if done % config.checkpoint.every == 0 or done == train_cfg.steps or preempted:
                checkpointer.save(state)
            if preempted:
                checkpointer.wait()
                raise Preempted(f"SIGTERM: saved a checkpoint at step {done} in "
                                f"{checkpointer.directory}; run the same command to resume")
        checkpointer.wait()
        if last_eval is None:  # nothing left to train: report the restored model
            last_eval = evaluate(state.params, eval_step, corpus, config, batch_sharding,
                                 max_windows=final_windows)
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
        checkpointer.close()
        writer.close()
    if is_main:
        print(f"held-out perplexity {last_eval['eval_perplexity']:.4f} "
              f"(loss {last_eval['eval_loss']:.4f} nats/token, "
              f"{last_eval['eval_bits_per_byte']:.4f} bits/byte) at step {int(state.step)}, "
              f"over {last_eval['eval_tokens']:,} held-out tokens")
    return {"step": int(state.step), **last_eval}

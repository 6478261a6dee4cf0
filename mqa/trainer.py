"""The training loop: data, mesh, state, checkpoints, evaluation and logging for one run.

`train(config, workdir)` is what `train.py` calls. Everything a run keeps is in the workdir:

  config.json      the resolved config (read back by re-runs and eval.py)
  tokenizer.json   the tokenizer (byte or BPE)
  data/            cached token ids
  checkpoints/     orbax checkpoints of the train state
  metrics.jsonl    one JSON object per logged step; TensorBoard events in tensorboard/

The pieces the loop is made of: the mesh and state layout (train_state.py), the data and
held-out evaluation on the mesh (train_data.py), which steps log, evaluate and checkpoint
(train_schedule.py), the non-finite guard and throughput (train_monitors.py), stop signals
(preemption.py) and what the run prints (train_report.py).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Callable

import jax
import ml_collections
from flax import nnx

from mqa import accounting, data, hardware
from mqa.checkpoint import Checkpointer, abstract_like
from mqa.config import ConfigError, ModelConfig, build_model_config, validate
from mqa.loading import load_model
from mqa.metrics import MetricsWriter, Progress
from mqa.preemption import Preempted, StopSignals
from mqa.train_data import BatchFeeder, held_out_metrics, load_run_corpus, resolve_vocab
from mqa.train_monitors import NonFiniteGuard, NonFiniteLoss, Throughput  # noqa: F401 (NonFiniteLoss: for train.py)
from mqa.train_report import data_line, final_line, initial_line, model_line
from mqa.train_schedule import Schedule
from mqa.train_state import compiled_eval_step, compiled_train_step, fresh_state, make_mesh
from mqa.token_files import write_atomically
from mqa.training import TrainState, make_optimizer
from mqa.workdir import (WorkdirLock, check_resumable, init_params_from, prepare_workdir,
                         restore_newest_intact, saved_config)


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
    """The run: set up, resume or start, train to train.steps; returns the final held-out metrics."""
    run, state = _set_up(config, workdir, is_main)
    try:
        if int(state.step) == 0 and config.train.init_from:  # where uptraining starts
            _log_initial_eval(run, state.params)
        state, final = _loop(run, state)
        if final is None:  # nothing left to train: report the restored model
            final = run.evaluate(state.params, run.schedule.final_windows)
    finally:
        run.checkpointer.close()
        run.writer.close()
    if is_main:
        print(final_line(final, int(state.step)))
    return {"step": int(state.step), **final}


@dataclasses.dataclass(frozen=True)
class _Run:
    """What the loop works with, set up by `_set_up`."""

    config: ml_collections.ConfigDict
    model_config: ModelConfig
    corpus: data.Corpus
    train_step: Callable[[TrainState, jax.Array], tuple[TrainState, dict]]  # jitted, donates the state
    eval_step: Callable  # jitted: (params, windows, weights) -> {"loss_sum", "tokens"}
    feeder: BatchFeeder
    schedule: Schedule
    checkpointer: Checkpointer
    writer: MetricsWriter
    is_main: bool  # process 0, which writes and prints

    def evaluate(self, params, windows: int) -> dict:
        """Held-out metrics over the first `windows` windows (`held_out_metrics`)."""
        return held_out_metrics(params, self.eval_step, self.corpus, self.feeder, max_windows=windows)


def _set_up(config: ml_collections.ConfigDict, workdir: pathlib.Path, is_main: bool) -> tuple[_Run, TrainState]:
    """The mesh, the data (the vocabulary resolved, config.json and tokenizer.json written), the
    compiled steps and the state to start from: resumed, initialised from train.init_from, or fresh."""
    mesh = make_mesh(config)
    corpus = load_run_corpus(config, workdir)
    resolve_vocab(config, corpus.tokenizer)
    check_resumable(config, workdir)
    if is_main:  # atomically: the other hosts may be reading it (check_resumable)
        write_atomically(workdir / "config.json", (config.to_json(indent=2) + "\n").encode())
        corpus.tokenizer.save(workdir)  # load_model and eval.py read WORKDIR/tokenizer.json
    model_config = build_model_config(config.model)
    if is_main:
        print(data_line(corpus))
        print(model_line(model_config, mesh))
    optimizer = make_optimizer(config.train)
    state, layout = fresh_state(model_config, optimizer, config.train.seed, mesh)
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.checkpoint.keep)
    writer = MetricsWriter(workdir, enabled=is_main)
    state = _resumed_or_initial(state, checkpointer, config.train.init_from, is_main)
    writer.drop_after(int(state.step))
    teacher = distillation_teacher(config, model_config)
    run = _Run(config, model_config, corpus, compiled_train_step(layout, optimizer, config.train, mesh,
                                                                 teacher),
               compiled_eval_step(layout), BatchFeeder(layout.batch_sharding, config.train.batch_size,
                                                       config.train.seq_len,
                                                       getattr(corpus.tokenizer, "bos_id", None)),
               Schedule.from_config(config), checkpointer, writer, is_main)
    return run, state


def _loop(run: _Run, state: TrainState) -> tuple[TrainState, dict | None]:
    """Updates from state.step to train.steps, logging, evaluating and checkpointing on schedule;
    (the last state, the final evaluation or None if no step was left). Raises Preempted once a
    stop signal's step is checkpointed, NonFiniteLoss after too many skipped updates in a row."""
    train, schedule, start = run.config.train, run.schedule, int(state.step)
    progress = Progress(start, train.steps, enabled=run.is_main, sampled_windows=schedule.sampled_windows)
    guard = NonFiniteGuard(train.max_nonfinite_steps, run.checkpointer.latest_step)
    throughput = Throughput(train.batch_size * train.seq_len,
                            accounting.flops_per_token(run.model_config, train.seq_len),
                            hardware.peak_flops(run.model_config.dtype), start)
    final = None
    try:
        with StopSignals() as stop:
            if run.is_main and start < train.steps:
                print("compiling the train step...", flush=True)
            for step in range(start, train.steps):
                batch = run.feeder.train_batch(run.corpus.train, step, train.seed, train.sampling)
                state, metrics = run.train_step(state, batch)
                done = step + 1
                guard.observe(done, metrics["skipped"])
                if step == start:  # leave compilation out of the throughput
                    jax.block_until_ready(state)
                    throughput.restart(done)
                row = {}
                if schedule.logs(done):
                    row = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    row.update(throughput.measure(done))
                if schedule.evaluates(done):  # the same sampled windows each time
                    row.update(run.evaluate(state.params, schedule.sampled_windows))
                    if schedule.is_last(done):
                        final = run.evaluate(state.params, schedule.final_windows)
                        row.update({f"final_{key}": value for key, value in final.items()})
                    throughput.restart(done)  # evaluation is not training
                if row:
                    run.writer.write(done, row)
                    progress.update(done, row)
                if schedule.checkpoints(done) or stop.received:
                    run.checkpointer.save(state)
                if stop.received:
                    run.checkpointer.wait()
                    raise Preempted(stop.received, stop.message(done, run.checkpointer.directory))
            run.checkpointer.wait()
    finally:
        progress.close()
    return state, final


def distillation_teacher(config: ml_collections.ConfigDict,
                         model_config: ModelConfig) -> tuple[nnx.GraphDef, nnx.State] | None:
    """train.distill_from's model (structure, parameters), or None; a one-line ConfigError
    when its vocabulary is not the trained model's (their distributions must be over the
    same tokens)."""
    if not config.train.distill_from:
        return None
    teacher = load_model(config.train.distill_from)
    if teacher.model_config.vocab_size != model_config.vocab_size:
        raise ConfigError(f"train.distill_from={config.train.distill_from!r} has a vocabulary of "
                          f"{teacher.model_config.vocab_size:,} tokens, this model "
                          f"{model_config.vocab_size:,}; distil from a model with the same tokenizer")
    return teacher.graphdef, teacher.params


def _resumed_or_initial(state: TrainState, checkpointer: Checkpointer, init_from: str,
                        is_main: bool) -> TrainState:
    """The newest intact checkpoint in the workdir; else, with train.init_from, `state` with the
    parameters it names (AdamW's fresh state, zeros, fits any values); else `state` itself."""
    if checkpointer.all_steps():
        restored = restore_newest_intact(checkpointer, abstract_like(state), move_damaged=is_main,
                                         warn=is_main)
        if restored is None:
            raise ConfigError(f"no checkpoint in {checkpointer.directory} can be read (each was "
                              "moved to damaged_checkpoints/); run again to start over")
        state, step = restored
        if is_main:
            print(f"resumed from step {step} in {checkpointer.directory}")
        return state
    if init_from:  # uptraining
        return state._replace(params=init_params_from(init_from, abstract_like(state.params), is_main))
    return state


def _log_initial_eval(run: _Run, params) -> None:
    """Step 0 of an uptraining run: the converted model's sampled and full held-out metrics."""
    initial = run.evaluate(params, run.schedule.final_windows)
    run.writer.drop_after(-1)  # a run restarted before its first checkpoint logs step 0 anew
    run.writer.write(0, {**run.evaluate(params, run.schedule.sampled_windows),
                         **{f"initial_{key}": value for key, value in initial.items()}})
    if run.is_main:
        print(initial_line(initial))


def config_or_saved(config: ml_collections.ConfigDict | None,
                    workdir: str | os.PathLike) -> ml_collections.ConfigDict:
    """`config`, or with None the config the run in `workdir` saved (its config.json)."""
    if config is not None:
        return config
    path = prepare_workdir(workdir)
    saved = saved_config(path)
    if saved is None:
        raise ConfigError(f"no --config given and {str(path / 'config.json')!r} does not exist; "
                          "pass --config=configs/NAME.py")
    return saved

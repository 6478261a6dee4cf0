"""What a workdir holds, and the one place that reads and writes it.

  WORKDIR/config.json            the run's full experiment config (`read_config`); a converter
                                 writes it last, so its presence marks a complete workdir
  WORKDIR/tokenizer.json         the tokenizer (`load_tokenizer`); absent for a converted model
                                 that came without one
  WORKDIR/checkpoints/<step>/    orbax checkpoints (`mqa.checkpoint.Checkpointer`): `params`,
                                 plus `optimizer` for a training checkpoint
  WORKDIR/damaged_checkpoints/   checkpoints training found unreadable, moved aside (kept)
  WORKDIR/data/                  cached token ids (`mqa.data`)
  WORKDIR/metrics.jsonl          one JSON object per logged step; TensorBoard events in tensorboard/
  WORKDIR/.lock                  held by the process training in it (`WorkdirLock`)

Parameters travel between formats by dotted name ({"blocks.attention.k": array [layers, m,
kv_heads, d], "embed": [vocab, m], ...}): `params_by_name` and `params_from_names`.
Training, `mqa.load_model` and every converter (`mqa.convert`) go through this module; it
imports none of them.
"""

from __future__ import annotations

import fcntl
import json
import os
import pathlib
import re
import shutil
import socket
import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tokenizers
from flax import nnx

from mqa import data
from mqa.checkpoint import Checkpointer
from mqa.config import ConfigError, ModelConfig, get_dotted, with_defaults
from mqa.model import Transformer
from mqa.training import TrainState

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
DAMAGED_CHECKPOINTS = "damaged_checkpoints"

# Fields a run may change when it resumes: they do not change what is trained (how decoding
# stores the cache; where the same token files lie). sweep.py reuses a finished run for a
# point that differs from it only in these.
RESUMABLE_CHANGES = ("model.kv_cache_dtype", "model.decode_impl", "data.token_dir", "data.strict")
# train fields a resumed run may not change, besides every model and data field: they choose the
# windows each step reads (`data.train_batch` of step, seed, batch size, length and sampling;
# train.sampling's value for a workdir saved without it: config.FORMER_BEHAVIOUR).
FIXED_TRAIN_FIELDS = ("train.sampling", "train.seed", "train.batch_size", "train.seq_len")


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the config; one line."""


# ----------------------------------------------------------------------------- the directory


class WorkdirLock:
    """An exclusive lock on WORKDIR/.lock, released when the process ends however it ends."""

    def __init__(self, workdir: pathlib.Path):
        self.path = workdir / ".lock"
        self._file = self.path.open("a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.seek(0)
            owner = self._file.read().strip() or "another process"
            self._file.close()
            raise ConfigError(f"workdir {str(workdir)!r} is in use by {owner}; wait for it to "
                              "finish or use another --workdir") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"process {os.getpid()} on {socket.gethostname()}")
        self._file.flush()

    def release(self) -> None:
        self._file.close()  # closing drops the lock


def prepare_workdir(workdir: str | os.PathLike) -> pathlib.Path:
    """Creates the workdir (for training), or says in one line why it cannot be used."""
    path = pathlib.Path(workdir).expanduser().resolve()
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except OSError as error:
        raise ConfigError(f"workdir {str(workdir)!r} is not writable: {error.strerror}") from None
    return path


def check_new_workdir(workdir: pathlib.Path, flag: str = "--workdir") -> None:
    """A ConfigError unless `workdir` (given as `flag`) is new or an empty directory: a
    converter never writes over a workdir or other files."""
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ConfigError(f"{flag} {str(workdir)!r} is not empty: it already holds a workdir "
                          "or other files; give a new or empty directory")


def find_workdir(path: str | os.PathLike) -> tuple[pathlib.Path, int | None]:
    """A workdir, its checkpoints/ folder, or one step folder -> (the workdir, the step the
    path names or None); a CheckpointError if it is none of these."""
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    if (path / CONFIG_FILE).is_file():
        return path, None
    if path.name == CHECKPOINTS and (path.parent / CONFIG_FILE).is_file():
        return path.parent, None
    if path.name.isdigit() and (path.parent.parent / CONFIG_FILE).is_file():
        return path.parent.parent, int(path.name)
    raise CheckpointError(f"{str(path)!r} is not a workdir (no config.json) or a checkpoint in one")


# ----------------------------------------------------------------------------- config and tokenizer


def read_config(workdir: pathlib.Path) -> ml_collections.ConfigDict:
    """WORKDIR/config.json, with any field added to the schema since at its default (so
    workdirs written by earlier versions still load and resume); not validated."""
    return with_defaults(json.loads((workdir / CONFIG_FILE).read_text()))


def saved_config(workdir: pathlib.Path) -> ml_collections.ConfigDict | None:
    """`read_config`, or None when the workdir has no config.json yet."""
    return read_config(workdir) if (workdir / CONFIG_FILE).exists() else None


def check_resumable(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> None:
    """A workdir with checkpoints only continues with the model and data it was trained on,
    its windows in the same order (`FIXED_TRAIN_FIELDS`); one whose run failed before its
    first checkpoint (e.g. on a bad init_from) may change. A ConfigError names the first
    field that differs."""
    old = saved_config(workdir)
    if old is None or not any((workdir / CHECKPOINTS).glob("[0-9]*")):
        return
    fixed = [f"{section}.{key}" for section in ("model", "data") for key in config[section]]
    for name in fixed + list(FIXED_TRAIN_FIELDS):
        if name in RESUMABLE_CHANGES:
            continue
        before, value = get_dotted(old, name), get_dotted(config, name)
        if _comparable(before) != _comparable(value):
            raise ConfigError(f"workdir {str(workdir)!r} was trained with {name}={before!r}, "
                              f"not {value!r}; use a new --workdir to change it")


def _comparable(value):
    """A config value as JSON reads it back: tuples as lists."""
    return list(value) if isinstance(value, tuple) else value


def data_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """config.data, with data.tokenizer='init_from' replaced by train.init_from's workdir
    (whose tokenizer.json a run uptraining a converted model tokenizes with)."""
    if config.data.tokenizer != "init_from":
        return config.data
    try:
        workdir = find_workdir(config.train.init_from)[0]
    except CheckpointError as error:
        raise ConfigError(f"train.init_from: {error}") from None
    if not (workdir / data.TOKENIZER_FILE).is_file():
        raise ConfigError(f"data.tokenizer='init_from': train.init_from's workdir {str(workdir)!r} has no "
                          f"{data.TOKENIZER_FILE}; use 'byte', 'bpe' or a tokenizer.json path")
    return ml_collections.ConfigDict({**config.data.to_dict(), "tokenizer": str(workdir)})


def load_tokenizer(workdir: pathlib.Path) -> data.ByteTokenizer | data.BpeTokenizer | None:
    """The workdir's tokenizer, or None when it has no tokenizer.json."""
    return data.load_tokenizer(workdir) if (workdir / data.TOKENIZER_FILE).is_file() else None


# ----------------------------------------------------------------------------- parameters by name


def params_by_name(params: nnx.State) -> dict[str, np.ndarray]:
    """{"blocks.attention.k": array, ...}: the leaves of a parameter State by dotted name,
    as numpy arrays (block parameters keep their leading [num_layers] axis)."""
    return {jax.tree_util.keystr(path, simple=True, separator="."): np.asarray(leaf)
            for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(params))}


def params_from_names(config: ModelConfig, arrays: dict[str, np.ndarray]) -> nnx.State:
    """The parameter State of `Transformer(config)` with each leaf taken from
    arrays[dotted name] and cast to the leaf's dtype; the inverse of `params_by_name`. A
    name missing or of the wrong shape is a ValueError (the caller's bug: converters check
    their input's shapes first)."""
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    _, state = nnx.split(abstract)

    def leaf(path, expected):
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        if name not in arrays:
            raise ValueError(f"no array for parameter {name}; the model needs {expected.shape}")
        if arrays[name].shape != expected.shape:
            raise ValueError(f"parameter {name} has shape {arrays[name].shape}; the model "
                             f"expects {expected.shape}")
        return jnp.asarray(arrays[name], expected.dtype)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(leaf, nnx.to_pure_dict(state)))
    return state


def write_workdir(workdir: pathlib.Path, config: ml_collections.ConfigDict, params: nnx.State,
                  tokenizer: pathlib.Path | tokenizers.Tokenizer | None) -> None:
    """A new workdir for a model made elsewhere (converted, uptrained): its parameters as
    checkpoints/0/params, the tokenizer if any (a tokenizer.json to copy, or a `tokenizers`
    Tokenizer to save), then config.json (last: it marks a complete workdir)."""
    workdir.mkdir(parents=True, exist_ok=True)
    checkpoints = Checkpointer(workdir / CHECKPOINTS)
    checkpoints.save_params(0, params)
    checkpoints.close()
    if isinstance(tokenizer, tokenizers.Tokenizer):
        data.BpeTokenizer(tokenizer).save(workdir)
    elif tokenizer is not None:
        shutil.copyfile(tokenizer, workdir / data.TOKENIZER_FILE)
    (workdir / CONFIG_FILE).write_text(config.to_json(indent=2))


# ----------------------------------------------------------------------------- checkpoints


def restore_newest_intact(checkpointer: Checkpointer, abstract, *, move_damaged: bool,
                          warn: bool = True) -> tuple[Any, int] | None:
    """(the newest checkpoint that restores, its step), or None if none does.

    abstract: a `TrainState` of `jax.ShapeDtypeStruct`s restores a training checkpoint
    (params and optimizer state); anything else, an `nnx.State` of them, the `params` item
    alone. Each damaged checkpoint on the way is named in a one-line warning on stderr
    (when `warn`) with the error that reading it gave, and then:

      move_damaged=True   moved to WORKDIR/damaged_checkpoints/<step>-<ns> (kept, not
                          deleted), so that a resumed run can save that step again. Training
                          does this (its main process).
      move_damaged=False  left where it is and skipped. Loading for inference does this: it
                          only reads a workdir, which may belong to a run in progress or to
                          someone else, so it never changes one.
    """
    restore = checkpointer.restore if isinstance(abstract, TrainState) else checkpointer.restore_params
    for step in reversed(checkpointer.all_steps()):
        try:
            return restore(abstract, step), step
        except Exception as error:  # missing or truncated files surface in many forms
            if move_damaged:
                aside = checkpointer.directory.parent / DAMAGED_CHECKPOINTS / f"{step}-{time.time_ns()}"
                aside.parent.mkdir(exist_ok=True)
                (checkpointer.directory / str(step)).rename(aside)
                done = f"moved it to {aside}"
            else:
                done = "skipped it (left in place)"
            if warn:
                print(f"warning: checkpoint step {step} in {str(checkpointer.directory)!r} is "
                      f"damaged ({damage_reason(error)}); {done} and fell back to the previous "
                      "one", file=sys.__stderr__, flush=True)
            checkpointer.reload()
    return None


def damage_reason(error: BaseException) -> str:
    """What went wrong reading a checkpoint, in one line of at most 300 characters.

    Orbax wraps the storage layer's error (which names the file and what is wrong with it)
    in an exception whose own message may be only the repr of a bound method; the innermost
    cause is the informative one, and TensorStore's spec dump after it is left out."""
    for _ in range(10):  # the chain of causes; bounded in case of a loop
        cause = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
        if cause is None:
            break
        error = cause
    message = " ".join(str(error).split()) or type(error).__name__
    message = re.split(r" ?\[tensorstore_spec| ?See full TensorStore details", message)[0]
    return message[:300]


def restore_params(workdir: pathlib.Path, abstract_params, step: int | None = None
                   ) -> tuple[Any, int]:
    """The parameters of checkpoint `step` of `workdir` (None: the newest that restores,
    damaged ones skipped, see `restore_newest_intact`), restored into the shapes and
    shardings of `abstract_params` (an `nnx.State` of `jax.ShapeDtypeStruct`s, compared
    with the stored shapes first). Returns (params, the step restored); a CheckpointError
    names what is missing, damaged or does not fit. Never changes the workdir."""
    folder = workdir / CHECKPOINTS
    checkpoints = Checkpointer(folder, read_only=True)
    try:
        steps = checkpoints.all_steps()
        if not steps:
            raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint in "
                                  f"{str(folder)!r}; train it first")
        if step is not None and step not in steps:
            raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint at step {step}; "
                                  f"it has steps {steps}")
        _check_shapes(checkpoints, steps[-1] if step is None else step, abstract_params, workdir)
        if step is None:
            restored = restore_newest_intact(checkpoints, abstract_params, move_damaged=False)
            if restored is None:
                raise CheckpointError(f"no checkpoint in {str(folder)!r} can be read (steps {steps})")
            return restored
        try:
            return checkpoints.restore_params(abstract_params, step), step
        except Exception as error:  # orbax reports damage in many ways; name the step
            raise CheckpointError(f"checkpoint step {step} in {str(folder)!r} is damaged: "
                                  f"{damage_reason(error)}") from None
    finally:
        checkpoints.close()


def init_params_from(path: str, abstract_params, is_main: bool) -> nnx.State:
    """`train.init_from`'s parameters (a workdir's newest checkpoint, or the checkpoint
    directory named) in the shapes and shardings of `abstract_params`. The step counter and
    optimizer state still start fresh; any problem is a ConfigError."""
    try:
        source, step = find_workdir(path)
        params, step = restore_params(source, abstract_params, step)
    except CheckpointError as error:
        raise ConfigError(f"train.init_from: {error}") from None
    if is_main:
        print(f"initialised the parameters from step {step} of {source} (train.init_from); "
              "step counter and optimizer state start fresh")
    return params


def _check_shapes(checkpoints: Checkpointer, step: int, abstract_params, workdir) -> None:
    """Compares the checkpoint's stored parameters and shapes with the config's, naming the
    first mismatch (a parameter only one side has, e.g. `unembed`, or a shape)."""
    try:
        metadata = checkpoints.item_metadata(step, "params")
    except Exception:
        return  # unreadable metadata is reported by the restore itself
    if metadata is None:
        return
    stored = {_names(p): tuple(m.shape) for p, m in
              jax.tree_util.tree_leaves_with_path(metadata) if hasattr(m, "shape")}
    expected = {_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract_params)}
    if expected != stored.keys():
        key = min(expected ^ stored.keys())
        needed = key in expected
        raise CheckpointError(
            f"checkpoint step {step} in {str(workdir)!r} {'has no' if needed else 'has'} "
            f"{'.'.join(key[:-1])}, which the config {'needs' if needed else 'does not have'}: the "
            "config (e.g. model.tie_embeddings) does not match what was trained")
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params):
        key = _names(path)
        if key in stored and stored[key] != tuple(leaf.shape):
            name = ".".join(key[:-1])
            raise CheckpointError(
                f"checkpoint step {step} in {str(workdir)!r} has {name} of shape {stored[key]}, "
                f"but the config gives {tuple(leaf.shape)}: the config (e.g. model.num_kv_heads) "
                "does not match what was trained")


def _names(path) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in path)

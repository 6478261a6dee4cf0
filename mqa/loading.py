"""Loading a trained (or converted) model from a workdir or a checkpoint directory."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import pathlib
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mqa import data
from mqa.checkpoint import Checkpointer
from mqa.config import ConfigError, ModelConfig, build_model_config, validate, with_defaults
from mqa.model import Transformer


class CheckpointError(ValueError):
    """A checkpoint is missing, damaged, or does not fit the config; one line."""


@dataclasses.dataclass
class LoadedModel:
    """Parameters, structure and tokenizer of a model, ready for evaluation and decoding.

    `model(tokens)` maps int32 [batch, seq] to float32 logits [batch, seq, vocab] with a
    jitted pure function of (params, tokens). `tokenizer` is None for a workdir without
    tokenizer.json (a converted checkpoint that came without one).
    """

    config: ml_collections.ConfigDict       # the run's full experiment config
    model_config: ModelConfig
    graphdef: nnx.GraphDef
    params: nnx.State
    tokenizer: Any
    step: int
    path: pathlib.Path

    def __post_init__(self):
        graphdef = self.graphdef
        self._logits = jax.jit(lambda params, tokens: nnx.merge(graphdef, params)(tokens))

    def __call__(self, tokens) -> jax.Array:
        return self._logits(self.params, jnp.asarray(tokens, jnp.int32))

    def module(self) -> Transformer:
        """The parameters merged back into an NNX module (for interactive use)."""
        return nnx.merge(self.graphdef, self.params)


def find_workdir(path: pathlib.Path) -> tuple[pathlib.Path, int | None]:
    """A workdir, its checkpoints/ folder, or one step folder -> (workdir, step or None)."""
    if (path / "config.json").is_file():
        return path, None
    if path.name == "checkpoints" and (path.parent / "config.json").is_file():
        return path.parent, None
    if path.name.isdigit() and (path.parent.parent / "config.json").is_file():
        return path.parent.parent, int(path.name)
    raise CheckpointError(f"{str(path)!r} is not a workdir (no config.json) or a checkpoint in one")


def load_model(path: str | pathlib.Path, *, step: int | None = None,
               overrides: dict | None = None) -> LoadedModel:
    """Loads a workdir's newest checkpoint (or `step`), or the checkpoint directory given.

    overrides: config changes, e.g. {"model.attention_impl": "xla"}; a change that alters
    the parameters' shapes is reported as a mismatch with the checkpoint.
    """
    with _open_checkpoints(path) as (workdir, path_step, checkpoints):
        config = with_defaults(json.loads((workdir / "config.json").read_text()))
        for name, value in (overrides or {}).items():
            section, _, field = name.partition(".")
            if section not in config or field not in config[section]:
                raise ConfigError(f"unknown config key {name!r}")
            config[section][field] = value
        validate(config)
        model_config = build_model_config(config.model)
        abstract_model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
        graphdef, abstract_params = nnx.split(abstract_model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                              abstract_params)
        params, step = _restore(workdir, checkpoints, path_step, step, target)
    has_tokenizer = (workdir / data.TOKENIZER_FILE).is_file()
    tokenizer = data.load_tokenizer(workdir) if has_tokenizer else None
    return LoadedModel(config, model_config, graphdef, params, tokenizer, step, workdir)


def restore_params(path: str | pathlib.Path, abstract_params) -> tuple[Any, pathlib.Path, int]:
    """The parameters of a workdir's newest checkpoint, or of the checkpoint directory given,
    restored into the shapes and shardings of `abstract_params` (an `nnx.State` of
    `jax.ShapeDtypeStruct`s, checked against the stored shapes first).

    Returns (params, the workdir, the step restored). For `train.init_from` (uptraining).
    """
    with _open_checkpoints(path) as (workdir, path_step, checkpoints):
        params, step = _restore(workdir, checkpoints, path_step, None, abstract_params)
    return params, workdir, step


@contextlib.contextmanager
def _open_checkpoints(path: str | pathlib.Path):
    """Yields (workdir, the step the path names or None, its read-only Checkpointer)."""
    path = pathlib.Path(path).expanduser().resolve()
    if not path.exists():
        raise CheckpointError(f"{str(path)!r} does not exist")
    workdir, path_step = find_workdir(path)
    checkpoints = Checkpointer(workdir / "checkpoints", read_only=True)
    try:
        yield workdir, path_step, checkpoints
    finally:
        checkpoints.close()


def _restore(workdir, checkpoints: Checkpointer, path_step, step, target) -> tuple[Any, int]:
    """Restores `step`, the path's step, or else the newest intact one into `target`
    (shapes checked first); returns (params, the step restored)."""
    steps = checkpoints.all_steps()
    chosen = step is not None or path_step is not None  # else the newest intact one
    step = step if step is not None else path_step if path_step is not None else (
        steps[-1] if steps else None)
    if step is None:
        raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint in "
                              f"{str(workdir / 'checkpoints')!r}; train it first")
    if step not in steps:
        raise CheckpointError(f"workdir {str(workdir)!r} has no checkpoint at step {step}; "
                              f"it has steps {steps}")

    _check_shapes(checkpoints, step, target, workdir)
    # The step asked for, or else the newest checkpoint that reads, naming damaged ones.
    candidates = [step] if chosen else [s for s in reversed(steps) if s <= step]
    for candidate in candidates:
        try:
            params = checkpoints.restore_params(target, candidate)
            step = candidate
            break
        except Exception as error:  # orbax reports damage in many ways; name the step
            reason = " ".join(str(error).split())[:200]
            if chosen:
                raise CheckpointError(f"checkpoint step {candidate} in "
                                      f"{str(workdir / 'checkpoints')!r} is damaged: {reason}") from None
            print(f"warning: checkpoint step {candidate} in {str(workdir / 'checkpoints')!r} is "
                  f"damaged ({reason}); falling back to the previous one", file=sys.__stderr__)
    else:
        raise CheckpointError(f"no checkpoint in {str(workdir / 'checkpoints')!r} can be read "
                              f"(steps {steps})")
    return params, step


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

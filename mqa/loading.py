"""Loading a trained (or converted) model from a workdir or a checkpoint directory."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from mqa.config import ModelConfig, build_model_config, get_dotted, set_dotted, validate
from mqa.model import Transformer
from mqa.workdir import CheckpointError  # noqa: F401  re-exported: load_model raises it
from mqa.workdir import find_workdir, load_tokenizer, read_config, restore_params


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


def load_model(path: str | pathlib.Path, *, step: int | None = None,
               overrides: dict | None = None) -> LoadedModel:
    """Loads a workdir's newest intact checkpoint (or `step`), or the checkpoint directory
    given. Only reads: a damaged checkpoint is skipped with a warning, never moved
    (`mqa.workdir.restore_newest_intact`); one asked for by step is a CheckpointError.

    overrides: config changes, e.g. {"model.attention_impl": "xla"}; a change that alters
    the parameters' shapes is reported as a mismatch with the checkpoint.
    """
    workdir, path_step = find_workdir(path)
    config = read_config(workdir)
    for name, value in (overrides or {}).items():
        get_dotted(config, name)  # a ConfigError naming an unknown key
        set_dotted(config, name, value)
    validate(config)
    model_config = build_model_config(config.model)
    abstract_model = nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0)))
    graphdef, abstract_params = nnx.split(abstract_model)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                          abstract_params)
    params, step = restore_params(workdir, target, step if step is not None else path_step)
    return LoadedModel(config, model_config, graphdef, params, load_tokenizer(workdir), step, workdir)

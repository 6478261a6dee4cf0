"""The gated feed-forward layer: down(act(gate(x)) * up(x)).

`model.mlp_activation` picks act: "silu" is SwiGLU (Shazeer 2020; Llama), "gelu_tanh" is
GeGLU with GELU's tanh approximation (Gemma; `gelu_pytorch_tanh` in transformers).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention import dense
from mqa.model_config import ModelConfig

ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),
}


class GatedMLP(nnx.Module):
    """down(act(x @ gate) * (x @ up)). Weights: gate, up [m, f], down [f, m].
    x: [batch, seq, m] -> [batch, seq, m]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        m, f = config.d_model, config.mlp_dim
        init = nnx.initializers.normal(stddev=m ** -0.5)
        down_init = nnx.initializers.normal(stddev=f ** -0.5 / (2 * config.num_layers) ** 0.5)
        self.gate = nnx.Param(init(rngs.params(), (m, f)))
        self.up = nnx.Param(init(rngs.params(), (m, f)))
        self.down = nnx.Param(down_init(rngs.params(), (f, m)))
        self.dtype = jnp.dtype(config.dtype)
        self.activation = config.mlp_activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = dense(x, self.gate[...].astype(self.dtype))
        up = dense(x, self.up[...].astype(self.dtype))
        return dense(ACTIVATIONS[self.activation](gate) * up, self.down[...].astype(self.dtype))

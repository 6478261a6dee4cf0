"""A decoder-only Transformer language model in Flax NNX.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual),
rotary position embeddings, tied or untied embeddings. The blocks' parameters are stacked
along a leading layer axis. `__call__` (training, evaluation) runs them with `jax.lax.scan`,
so compile time does not grow with depth; `step` (prefill and one-token decoding with a KV
cache) runs the same blocks with the same weights layer by layer, each layer writing its
own cache buffer, so a compiled decoding loop never copies one stacked cache array.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention import Attention
from mqa.config import ModelConfig
from mqa.kv_cache import KVCache


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32 (Zhang & Sennrich 2019). x: [..., m]."""

    def __init__(self, dim: int, eps: float):
        self.scale = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...]).astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020). x: [batch, seq, m] -> [batch, seq, m]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        m, f = config.d_model, config.mlp_dim
        init = nnx.initializers.normal(stddev=m ** -0.5)
        down_init = nnx.initializers.normal(stddev=f ** -0.5 / (2 * config.num_layers) ** 0.5)
        self.gate = nnx.Param(init(rngs.params(), (m, f)))
        self.up = nnx.Param(init(rngs.params(), (m, f)))
        self.down = nnx.Param(down_init(rngs.params(), (f, m)))
        self.dtype = jnp.dtype(config.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        gate = jnp.einsum("btm,mf->btf", x, self.gate[...].astype(self.dtype))
        up = jnp.einsum("btm,mf->btf", x, self.up[...].astype(self.dtype))
        return jnp.einsum("btf,fm->btm", jax.nn.silu(gate) * up, self.down[...].astype(self.dtype))


class Block(nnx.Module):
    """One pre-norm Transformer layer."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = Attention(config, rngs=rngs)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None
                 ) -> tuple[jax.Array, KVCache | None]:
        """x: [batch, seq, m] -> ([batch, seq, m], this layer's updated cache or None)."""
        h, cache = self.attention(self.attention_norm(x), positions, cache)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache


class Transformer(nnx.Module):
    """The language model. tokens: int32 [batch, seq] -> logits float32 [batch, seq, vocab]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(nnx.initializers.normal(stddev=0.02)(
            rngs.params(), (config.vocab_size, config.d_model)))

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def stacked_blocks(rngs: nnx.Rngs) -> Block:
            return Block(config, rngs=rngs)

        self.blocks = stacked_blocks(rngs)  # every parameter has a leading [num_layers] axis
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            self.unembed = nnx.Param(nnx.initializers.normal(stddev=config.d_model ** -0.5)(
                rngs.params(), (config.d_model, config.vocab_size)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Full-sequence logits. tokens: int32 [batch, seq] -> float32 [batch, seq, vocab]."""
        logits, _ = self._forward(tokens, jnp.arange(tokens.shape[1]), None)
        return logits

    def step(self, tokens: jax.Array, cache: KVCache,
             layers: tuple[nnx.State, ...] | None = None) -> tuple[jax.Array, KVCache]:
        """Extends a cached sequence: the prompt at prefill, one token per decode step.

        tokens: int32 [batch, new]; cache: `KVCache` with `cache.index + new <= max_len`.
        layers: `self.layer_params()`, computed once outside a decoding loop so that the
          loop does not slice every layer's weights out of the stack at every token.
        Returns (float32 logits [batch, new, vocab], the cache with `new` more positions).
        """
        positions = cache.index + jnp.arange(tokens.shape[1])
        return self._forward(tokens, positions, cache, layers)

    def layer_params(self) -> tuple[nnx.State, ...]:
        """Each layer's parameters, sliced out of the stacked blocks."""
        _, stacked = nnx.split(self.blocks)
        return tuple(jax.tree.map(lambda a, i=i: a[i], stacked)
                     for i in range(self.config.num_layers))

    def _forward(self, tokens, positions, cache, layers=None):
        dtype = jnp.dtype(self.config.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        graphdef, stacked = nnx.split(self.blocks)
        if cache is None:  # training and evaluation: scan the stacked layers
            def layer(x, params):
                return nnx.merge(graphdef, params)(x, positions)[0], None

            if self.config.remat:
                layer = jax.checkpoint(layer)
            x, _ = jax.lax.scan(layer, x, stacked)
        else:  # prefill and decoding: each layer updates its own cache buffer
            new_k, new_v = [], []
            for i, params in enumerate(layers or self.layer_params()):
                block = nnx.merge(graphdef, params)
                x, layer_cache = block(x, positions, KVCache(cache.k[i], cache.v[i], cache.index))
                new_k.append(layer_cache.k)
                new_v.append(layer_cache.v)
        x = self.final_norm(x)
        unembed = self.embed[...].T if self.config.tie_embeddings else self.unembed[...]
        logits = jnp.einsum("btm,mv->btv", x, unembed.astype(dtype),
                            preferred_element_type=jnp.float32)
        if cache is None:
            return logits, None
        return logits, KVCache(tuple(new_k), tuple(new_v), cache.index + tokens.shape[1])

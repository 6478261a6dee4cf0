"""A decoder-only Transformer language model in Flax NNX.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> SwiGLU MLP -> residual),
rotary position embeddings, tied or untied embeddings. The blocks' parameters are stacked
along a leading layer axis. `__call__` (training, evaluation) runs them with `jax.lax.scan`,
so compile time does not grow with depth; `step` (prefill and one-token decoding with a KV
cache) runs the same blocks with the same weights layer by layer, each layer writing its
own cache buffer, so a compiled decoding loop never copies one stacked cache array.
With cross-layer KV sharing (`kv_share_every` > 1) the scan steps over groups of layers
whose first layer computes, and caches, the keys and values the others reuse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention import dense, family
from mqa.config import ModelConfig
from mqa.kv_cache import KVCache
from mqa.norm import RMSNorm


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
        gate = dense(x, self.gate[...].astype(self.dtype))
        up = dense(x, self.up[...].astype(self.dtype))
        return dense(jax.nn.silu(gate) * up, self.down[...].astype(self.dtype))


class Block(nnx.Module):
    """One pre-norm Transformer layer with `model.attention`'s family; `owns_kv=False` for
    a layer that reuses the K/V of its group's first layer (cross-layer KV sharing)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        self.attention_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attention = family(config)(config, rngs=rngs, owns_kv=owns_kv)
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps)
        self.mlp = SwiGLU(config, rngs=rngs)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 shared=None, *, index=None, window=None):
        """x: [batch, seq, m] -> ([batch, seq, m], the updated cache buffers or None, what
        the attention attended to); see `mqa.attention`."""
        h, cache, shared = self.attention(self.attention_norm(x), positions, cache, shared,
                                          index=index, window=window)
        x = x + h
        return x + self.mlp(self.mlp_norm(x)), cache, shared


def _stacked_blocks(config: ModelConfig, count: int, rngs: nnx.Rngs, owns_kv: bool) -> Block:
    """`count` Blocks whose parameters are stacked along a leading axis."""
    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs: nnx.Rngs) -> Block:
        return Block(config, rngs=rngs, owns_kv=owns_kv)

    return make(rngs)


class Transformer(nnx.Module):
    """The language model. tokens: int32 [batch, seq] -> logits float32 [batch, seq, vocab].

    The layers form `num_kv_layers` groups of `kv_share_every` consecutive layers: group g
    is `blocks[g]`, which computes keys and values, then `shared_blocks[g * (s - 1) + j]`
    for j < s - 1, which attend to them. Without sharing (s = 1) every layer is in `blocks`.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Param(nnx.initializers.normal(stddev=0.02)(
            rngs.params(), (config.vocab_size, config.d_model)))
        # Every parameter of these has a leading layer axis.
        self.blocks = _stacked_blocks(config, config.num_kv_layers, rngs, owns_kv=True)
        if config.kv_share_every > 1:
            self.shared_blocks = _stacked_blocks(
                config, config.num_layers - config.num_kv_layers, rngs, owns_kv=False)
        self.final_norm = RMSNorm(config.d_model, config.norm_eps)
        if not config.tie_embeddings:
            self.unembed = nnx.Param(nnx.initializers.normal(stddev=config.d_model ** -0.5)(
                rngs.params(), (config.d_model, config.vocab_size)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Full-sequence logits. tokens: int32 [batch, seq] -> float32 [batch, seq, vocab]."""
        logits, _ = self._forward(tokens, jnp.arange(tokens.shape[1]), None)
        return logits

    def step(self, tokens: jax.Array, cache: KVCache,
             layers: tuple | None = None) -> tuple[jax.Array, KVCache]:
        """Extends a cached sequence: the prompt at prefill, one token per decode step.

        tokens: int32 [batch, new]; cache: `KVCache` with `cache.index + new <= max_len`.
        layers: `self.layer_params()`, computed once outside a decoding loop so that the
          loop does not slice every layer's weights out of the stack at every token.
        Returns (float32 logits [batch, new, vocab], the cache with `new` more positions).
        """
        positions = cache.index + jnp.arange(tokens.shape[1])
        return self._forward(tokens, positions, cache, layers)

    def layer_params(self) -> tuple[tuple[nnx.State, tuple[nnx.State, ...]], ...]:
        """Per KV group: (its first layer's parameters, the other layers' parameters),
        sliced out of the stacked blocks."""
        groups, per_group = self.config.num_kv_layers, self.config.kv_share_every - 1
        first = nnx.state(self.blocks)
        shared = nnx.state(self.shared_blocks) if per_group else None
        take = lambda tree, i: jax.tree.map(lambda a: a[i], tree)  # noqa: E731
        return tuple((take(first, g), tuple(take(shared, g * per_group + j)
                                            for j in range(per_group)))
                     for g in range(groups))

    def _forward(self, tokens, positions, cache, layers=None):
        config = self.config
        dtype = jnp.dtype(config.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        per_group = config.kv_share_every - 1
        graphdef = nnx.graphdef(self.blocks)
        shared_graphdef = nnx.graphdef(self.shared_blocks) if per_group else None
        if cache is None:  # training and evaluation: scan the stacked layers, a group a step
            def group(x, params):
                first, shared, window = params
                x, _, kv = nnx.merge(graphdef, first)(x, positions, window=window)
                for j in range(per_group):
                    layer = nnx.merge(shared_graphdef, jax.tree.map(lambda a: a[j], shared))
                    x, _, _ = layer(x, positions, shared=kv)
                return x, None

            if config.remat:
                group = jax.checkpoint(group)
            shared = None
            if per_group:  # [groups * per_group, ...] -> [groups, per_group, ...]
                shared = jax.tree.map(lambda a: a.reshape(-1, per_group, *a.shape[1:]),
                                      nnx.state(self.shared_blocks))
            # Each layer's window (sliding windows exclude kv_share_every > 1).
            windows = (jnp.array([config.window(i) for i in range(config.num_layers)], jnp.int32)
                       if config.sliding_window else None)
            x, _ = jax.lax.scan(group, x, (nnx.state(self.blocks), shared, windows),
                                unroll=config.scan_unroll)
        else:  # prefill and decoding: each group updates its own cache buffers
            updated = []
            for g, (first, shared) in enumerate(layers or self.layer_params()):
                layer = g * config.kv_share_every
                window = config.sliding_window if config.is_local(layer) else None
                x, buffers, kv = nnx.merge(graphdef, first)(x, positions, cache.layers[g],
                                                            index=cache.index, window=window)
                for params in shared:
                    x, _, _ = nnx.merge(shared_graphdef, params)(x, positions, cache.layers[g], kv,
                                                                 index=cache.index, window=window)
                updated.append(buffers)
        x = self.final_norm(x)
        unembed = self.embed[...].T if config.tie_embeddings else self.unembed[...]
        logits = jnp.einsum("btm,mv->btv", x, unembed.astype(dtype),
                            preferred_element_type=jnp.float32)
        if cache is None:
            return logits, None
        return logits, KVCache(tuple(updated), cache.index + tokens.shape[1])

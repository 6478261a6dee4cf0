"""Grouped attention, `model.attention="grouped"`: MHA, GQA and MQA by `num_kv_heads`.

Each of `num_kv_heads` K/V heads has its own key and value projection; query head h reads
K/V head h // group (`core.attend`). The cache holds both, `2 * num_kv_heads * head_dim`
numbers per token and K/V layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention.core import attention_fn, dense, init_output, init_params
from mqa.config import ModelConfig
from mqa.kv_cache import CacheEntry, update
from mqa.rope import apply_rope


class GroupedAttention(nnx.Module):
    """Query/key/value/output projections, rotary embeddings, and an optional KV cache.

    Weights: q [m, num_heads, d], k and v [m, num_kv_heads, d], out [num_heads, d, m].
    With cross-layer KV sharing (Brandon et al. 2024) only the first layer of each group
    has k and v (`owns_kv`); the others attend to the keys and values it computed.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = nnx.Param(init_params(rngs, (m, h, d), m))
        if owns_kv:
            self.k = nnx.Param(init_params(rngs, (m, kv, d), m))
            self.v = nnx.Param(init_params(rngs, (m, kv, d), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        self.config = config

    @staticmethod
    def cache_entries(config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("k", config.num_kv_heads, config.head_dim),
                CacheEntry("v", config.num_kv_heads, config.head_dim))

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 shared: tuple | None = None, *, index: jax.Array | None = None,
                 window: jax.Array | int | None = None) -> tuple[jax.Array, dict | None, tuple]:
        """x: [batch, seq, m]; positions: int [seq]. See `mqa.attention` for the contract.

        Returns ([batch, seq, m], the updated cache buffers or None, the keys and values
        attended to as (dict k, v; their layout; key positions or None)): [batch, seq,
        kv_heads, d] ("bskd") without a cache, the whole cache buffers with one.
        """
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        q = apply_rope(dense(x, self.q[...].astype(dtype)), positions, config.rope_theta)
        if shared is None:
            k = apply_rope(dense(x, self.k[...].astype(dtype)), positions, config.rope_theta)
            v = dense(x, self.v[...].astype(dtype))  # [batch, seq, kv_heads, d]
            if cache is None:
                shared = ({"k": k, "v": v}, "bskd", None)
            else:
                axes = {e.name: e.axes(x.shape[0]) for e in self.cache_entries(config)}
                cache, kv, k_positions = update(cache, {"k": k, "v": v}, axes, index,
                                                ring=window is not None, dtype=dtype)
                shared = (kv, axes["k"], k_positions)
        kv, layout, k_positions = shared
        core = attention_fn(config.attention_impl, config.attention_block)
        out = core(q, kv["k"], kv["v"], causal=True, q_offset=0 if index is None else index,
                   kv_layout=layout, window=window, k_positions=k_positions)
        return dense(out, self.out[...].astype(dtype), contract=2), cache, shared

"""Grouped attention, `model.attention="grouped"`: MHA, GQA and MQA by `num_kv_heads`.

Each of `num_kv_heads` K/V heads has its own key and value projection; query head h reads
K/V head h // group (`core.attend`). The cache holds both, `2 * num_kv_heads * head_dim`
numbers per token and K/V layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention.core import attend as grouped_core
from mqa.attention.core import dense, init_output, init_params
from mqa.attention.protocol import AttentionFamily, CacheEntry, Keys, Mode, SelfAttention
from mqa.model_config import ModelConfig
from mqa.rope import apply_rope


class GroupedAttention(AttentionFamily):
    """Weights: q [m, num_heads, d], k and v [m, num_kv_heads, d], out [num_heads, d, m].
    With cross-layer KV sharing (Brandon et al. 2024) only the first layer of each group
    has k and v (`owns_kv`)."""

    name = "grouped"

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = nnx.Param(init_params(rngs, (m, h, d), m))
        if owns_kv:
            self.k = nnx.Param(init_params(rngs, (m, kv, d), m))
            self.v = nnx.Param(init_params(rngs, (m, kv, d), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        self.config = config

    @classmethod
    def cache_entries(cls, config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("k", config.num_kv_heads, config.head_dim),
                CacheEntry("v", config.num_kv_heads, config.head_dim))

    @classmethod
    def param_count(cls, config: ModelConfig, owns_kv: bool) -> int:
        """q and out: m*h*d each; k and v: m*kv*d each where the layer owns them."""
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        return 2 * m * h * d + (2 * m * kv * d if owns_kv else 0)

    def project_kv(self, x: jax.Array, positions: jax.Array) -> dict[str, jax.Array]:
        """x: [b, s, m] -> rotated keys "k" and values "v", each [b, s, kv_heads, d]."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        k = apply_rope(dense(x, self.k[...].astype(dtype)), positions, config.rope_theta)
        return {"k": k, "v": dense(x, self.v[...].astype(dtype))}

    def queries(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, ...]:
        """x: [b, t, m] -> (rotated queries [b, t, h, d],)."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        q = dense(x.astype(dtype), self.q[...].astype(dtype))
        return (apply_rope(q, positions, config.rope_theta),)

    def attend(self, queries: tuple[jax.Array, ...], keys: Keys, *, mode: Mode,
               window: jax.Array | int | None, backend: SelfAttention) -> jax.Array:
        """The queries against `keys` ("k", "v"), through the output projection: [b, t, m]."""
        (q,), dtype = queries, jnp.dtype(self.config.dtype)
        k, v = keys.arrays["k"], keys.arrays["v"]
        if mode is Mode.SELF:
            out = backend(grouped_core, (q,), (k, v), window=window)
        else:
            out = grouped_core(q, k, v, q_offset=keys.q_offset, kv_layout=keys.axes["k"],
                               window=window, k_positions=keys.positions)
        return dense(out, self.out[...].astype(dtype), contract=2)

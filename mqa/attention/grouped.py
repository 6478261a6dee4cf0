"""Grouped attention, `model.attention="grouped"`: MHA, GQA and MQA by `num_kv_heads`.

Each of `num_kv_heads` K/V heads has its own key and value projection; query head h reads
K/V head h // group (`core.attend`). The cache holds both, `2 * num_kv_heads * head_dim`
numbers per token and K/V layer. Two Gemma 3 options: `model.qk_norm` normalises each query
and key head (an RMSNorm over head_dim, before RoPE), and `model.attention_score_dim` sets
the scores' scale (q.k / sqrt(score_dim), Gemma's query_pre_attn_scalar). Partial RoPE:
`model.rope_head_dim` r > 0 rotates only the last r dimensions of each query and key head
(frequencies over r, as GTA's and MLA's rotary parts), the rest carrying no position
("MHA-halfrope" at r = head_dim / 2); 0 rotates them all.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention import cpu_decode
from mqa.attention.core import attend as grouped_core
from mqa.attention.core import dense, init_output, init_params
from mqa.attention.protocol import AttentionFamily, CacheEntry, Keys, Mode, SelfAttention, sink_options
from mqa.errors import ConfigError
from mqa.model_config import ModelConfig
from mqa.norm import model_norm
from mqa.rope import LayerRope, apply_partial_rope


class GroupedAttention(AttentionFamily):
    """Weights: q [m, num_heads, d], k and v [m, num_kv_heads, d], out [num_heads, d, m], and
    with `qk_norm` the norms q_norm and k_norm [d]. With cross-layer KV sharing (Brandon et
    al. 2024) only the first layer of each group has k and v (`owns_kv`)."""

    name = "grouped"

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = nnx.Param(init_params(rngs, (m, h, d), m))
        if owns_kv:
            self.k = nnx.Param(init_params(rngs, (m, kv, d), m))
            self.v = nnx.Param(init_params(rngs, (m, kv, d), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        if config.qk_norm:
            self.q_norm = model_norm(d, config)
            self.k_norm = model_norm(d, config)
        self.config = config

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        r, d = config.rope_head_dim, config.head_dim
        if r and (r < 0 or r % 2 or r >= d):
            raise ConfigError(f"model.rope_head_dim={r} is invalid for model.attention='grouped'; "
                              f"valid: 0 (rotate every dimension) or an even number below "
                              f"model.head_dim={d} (rotate the last that many of each head)")
        if config.qk_norm and config.kv_share_every != 1:
            raise ConfigError(f"model.qk_norm does not combine with model.kv_share_every="
                              f"{config.kv_share_every}; use 1, or qk_norm=false")

    @classmethod
    def cache_entries(cls, config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("k", config.num_kv_heads, config.head_dim),
                CacheEntry("v", config.num_kv_heads, config.head_dim))

    @classmethod
    def param_count(cls, config: ModelConfig, owns_kv: bool) -> int:
        """q and out: m*h*d each; k and v: m*kv*d each where the layer owns them."""
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        return 2 * m * h * d + (2 * m * kv * d if owns_kv else 0)

    @classmethod
    def norm_count(cls, config: ModelConfig) -> int:
        """`qk_norm`'s two scales of head_dim."""
        return 2 * config.head_dim if config.qk_norm else 0

    def project_kv(self, x: jax.Array, positions: jax.Array,
                   rope: LayerRope) -> dict[str, jax.Array]:
        """x: [b, s, m] -> rotated keys "k" (normalised first with `qk_norm`; the last
        `rope_head_dim` dimensions only when it is set) and values "v", each [b, s, kv_heads, d]."""
        dtype = jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        k = dense(x, self.k[...].astype(dtype))
        if self.config.qk_norm:
            k = self.k_norm(k)
        return {"k": apply_partial_rope(k, positions, rope.theta, self.config.rope_head_dim),
                "v": dense(x, self.v[...].astype(dtype))}

    def queries(self, x: jax.Array, positions: jax.Array,
                rope: LayerRope) -> tuple[jax.Array, ...]:
        """x: [b, t, m] -> (rotated queries [b, t, h, d] (normalised first with `qk_norm`),)."""
        dtype = jnp.dtype(self.config.dtype)
        q = dense(x.astype(dtype), self.q[...].astype(dtype))
        if self.config.qk_norm:
            q = self.q_norm(q)
        return (apply_partial_rope(q, positions, rope.theta, self.config.rope_head_dim),)

    def attend(self, queries: tuple[jax.Array, ...], keys: Keys, *, mode: Mode,
               window: jax.Array | int | None, backend: SelfAttention) -> jax.Array:
        """The queries against `keys` ("k", "v"), through the output projection: [b, t, m]."""
        (q,), dtype = queries, jnp.dtype(self.config.dtype)
        k, v = keys.arrays["k"], keys.arrays["v"]
        # Gemma's attention scale, passed only when it is not the cores' own 1 / sqrt(head_dim)
        options = {"score_dim": self.config.score_dim} if self.config.attention_score_dim else {}
        options.update(sink_options(self.config))
        if mode is Mode.SELF:
            out = backend(grouped_core, (q,), (k, v), window=window, **options)
        else:
            if self.config.decode_impl == "cpu_kernel":  # an int8 or int4 cache read as stored
                options["int8"] = (keys.int8["k"], keys.int8["v"]) if keys.int8 else None
                if keys.int4 and cpu_decode.reads_int4(keys.int4):
                    options["int4"] = keys.int4
            core = cpu_decode.attend if self.config.decode_impl == "cpu_kernel" else grouped_core
            out = core(q, k, v, q_offset=keys.q_offset, kv_layout=keys.axes["k"],
                       window=window, k_positions=keys.positions, **options)
        return dense(out, self.out[...].astype(dtype), contract=2)

"""Grouped-tied attention (GTA; Zadouri, Strauss and Dao 2025), `model.attention="tied"`.

One projection per K/V head gives a single tied state T [d] that is the value, and whose
first half is the key's non-rotary half; the key's rotary half R [d/2] comes from one more
projection shared by all heads. Queries split the same way: their first half meets T's,
their second half is rotated and meets R. So the cache holds T per K/V head and R once:
`(num_kv_heads + 1/2) * head_dim` numbers per token and layer, about half of grouped
attention's `2 * num_kv_heads * head_dim` at the same `num_kv_heads`.

Letters as in `core`, and n = d - r the non-rotary half, r = d / 2 the rotary half.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention import cpu_decode
from mqa.attention.core import (causal_mask, dense, init_output, init_params, masked_softmax,
                               ordered_einsum)
from mqa.attention.protocol import AttentionFamily, CacheEntry, Keys, Mode, SelfAttention, sink_options
from mqa.errors import ConfigError
from mqa.model_config import ModelConfig
from mqa.rope import LayerRope, apply_partial_rope, apply_rope


def attend_tied(q: jax.Array, tied: jax.Array, k_rope: jax.Array, *, tied_layout: str = "bskd",
                q_offset: jax.Array | int = 0, window: jax.Array | int | None = None,
                k_positions: jax.Array | None = None, sinks: int = 0) -> jax.Array:
    """Causal attention with tied keys and values and a shared rotary key.

    q: [b, t, h, d], its last d/2 dimensions already rotated; tied: [b, s, k, d] ("bskd")
      or as the cache lays it out ("bksd", without "b" or "k" where they have size 1);
      k_rope: [b, s, d/2], rotated, without "b" where the tied state has none.
    Key of head k at s: concat(tied[s, k, :n], k_rope[s]); value: tied[s, k] (all of it).
    Returns [b, t, h, d] in q's dtype; logits and softmax in float32.

    Over a cache, the tied keys are read whole, as they lie, against queries whose rotary
    half is zeroed: slicing off the cache's rotary half copied half the cache every step.
    """
    b, t, h, d = q.shape
    size = dict(zip(tied_layout, tied.shape))
    kv, kv_len = size.get("k", 1), size["s"]
    n = d - k_rope.shape[-1]
    q_axes = "".join(c for c in "btkgd" if c in tied_layout or c in "tgd")  # as `core.attend`
    q = q.reshape([dict(b=b, t=t, k=kv, g=h // kv, d=d)[c] for c in q_axes])
    score_axes = q_axes.replace("t", "").replace("gd", "gts")  # [b][k]gts
    f32 = dict(preferred_element_type=jnp.float32)
    if tied_layout == "bskd":  # activations (training): contract the non-rotary half only
        keys, q_keys, key_axes = tied[..., :n], q[..., :n], "bskd"
    else:                      # a cache: read it whole; the zeroed half adds nothing
        keys, q_keys, key_axes = tied, q.at[..., n:].set(0), tied_layout
    rope_axes = "bsd" if "b" in q_axes else "sd"  # batch 1: the cache has no batch axis
    logits = (ordered_einsum(f"{key_axes},{q_axes}->{score_axes}", keys, q_keys, **f32)
              + ordered_einsum(f"{rope_axes},{q_axes}->{score_axes}", k_rope, q[..., n:], **f32))
    probs = masked_softmax(logits / jnp.sqrt(jnp.float32(d)),
                           causal_mask(t, kv_len, q_offset, window, k_positions, sinks))
    out = ordered_einsum(f"{score_axes},{tied_layout}->{q_axes}", probs.astype(tied.dtype), tied,
                         **f32)
    return out.reshape(b, t, h, d).astype(q.dtype)


class TiedAttention(AttentionFamily):
    """Weights: q [m, num_heads, d], kv [m, num_kv_heads, d], k_rope [m, d/2],
    out [num_heads, d, m]. With cross-layer sharing only a group's first layer has kv and
    k_rope (`owns_kv`)."""

    name = "tied"

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = nnx.Param(init_params(rngs, (m, h, d), m))
        if owns_kv:
            self.kv = nnx.Param(init_params(rngs, (m, kv, d), m))
            self.k_rope = nnx.Param(init_params(rngs, (m, d // 2), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        self.config = config

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        if config.head_dim % 4:
            raise ConfigError(f"model.head_dim={config.head_dim} must be a multiple of 4 for "
                              "model.attention='tied' (a rotary half of head_dim / 2)")
        if config.rope_head_dim:
            raise ConfigError(f"model.rope_head_dim={config.rope_head_dim} is for model.attention="
                              "'grouped' or 'latent'; 'tied' rotates head_dim / 2 of each head: set it to 0")

    @classmethod
    def cache_entries(cls, config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("kv", config.num_kv_heads, config.head_dim),
                CacheEntry("k_rope", 0, config.head_dim // 2))

    @classmethod
    def param_count(cls, config: ModelConfig, owns_kv: bool) -> int:
        """q and out: m*h*d each; kv: m*kv*d and k_rope: m*d/2 where the layer owns them."""
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        return 2 * m * h * d + (m * kv * d + m * (d // 2) if owns_kv else 0)

    @classmethod
    def cached_dims(cls, config: ModelConfig) -> tuple[int, int]:
        """Over a cache the tied state is read whole (d numbers, against queries whose rotary
        half is zeroed) and the shared rotary key (d/2) beside it: 3d/2 per key; d per value."""
        return config.head_dim + config.head_dim // 2, config.head_dim

    def project_kv(self, x: jax.Array, positions: jax.Array,
                   rope: LayerRope) -> dict[str, jax.Array]:
        """x: [b, s, m] -> the tied state "kv" [b, s, kv_heads, d] and the rotated shared
        key half "k_rope" [b, s, 1, d/2]."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        tied = dense(x, self.kv[...].astype(dtype))
        k_rope = apply_rope(dense(x, self.k_rope[...].astype(dtype))[:, :, None], positions, rope.theta)
        return {"kv": tied, "k_rope": k_rope}

    def queries(self, x: jax.Array, positions: jax.Array,
                rope: LayerRope) -> tuple[jax.Array, ...]:
        """x: [b, t, m] -> (queries [b, t, h, d], their second half rotated,)."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        q = dense(x.astype(dtype), self.q[...].astype(dtype))
        return (apply_partial_rope(q, positions, rope.theta, config.head_dim // 2),)

    def attend(self, queries: tuple[jax.Array, ...], keys: Keys, *, mode: Mode,
               window: jax.Array | int | None, backend: SelfAttention) -> jax.Array:
        """The queries against `keys` ("kv", "k_rope"), through the output projection: [b, t, m]."""
        (q,), dtype = queries, jnp.dtype(self.config.dtype)
        tied, k_rope = keys.arrays["kv"], keys.arrays["k_rope"]
        sinks = sink_options(self.config)
        if mode is Mode.SELF:
            out = backend(attend_tied, (q,), (tied, k_rope), window=window, **sinks)
        else:
            core = attend_tied
            if self.config.decode_impl == "cpu_kernel":  # an int8 cache read as stored
                core = functools.partial(cpu_decode.attend_tied, int8=keys.int8 and (
                    keys.int8["kv"], keys.int8["k_rope"]))
            out = core(q, tied, k_rope, tied_layout=keys.axes["kv"], q_offset=keys.q_offset,
                       window=window, k_positions=keys.positions, **sinks)
        return dense(out, self.out[...].astype(dtype), contract=2)

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

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention.core import (causal_mask, dense, init_output, init_params, masked_softmax,
                               ordered_einsum)
from mqa.attention.tiled import self_attention
from mqa.config import ModelConfig
from mqa.kv_cache import CacheEntry, update
from mqa.rope import apply_rope


def attend_tied(q: jax.Array, tied: jax.Array, k_rope: jax.Array, *, tied_layout: str = "bskd",
                q_offset: jax.Array | int = 0, window: jax.Array | int | None = None,
                k_positions: jax.Array | None = None) -> jax.Array:
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
                           causal_mask(t, kv_len, q_offset, window, k_positions))
    out = ordered_einsum(f"{score_axes},{tied_layout}->{q_axes}", probs.astype(tied.dtype), tied,
                         **f32)
    return out.reshape(b, t, h, d).astype(q.dtype)


class TiedAttention(nnx.Module):
    """Weights: q [m, num_heads, d], kv [m, num_kv_heads, d], k_rope [m, d/2],
    out [num_heads, d, m]. With cross-layer sharing only a group's first layer has kv and
    k_rope (`owns_kv`)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        self.q = nnx.Param(init_params(rngs, (m, h, d), m))
        if owns_kv:
            self.kv = nnx.Param(init_params(rngs, (m, kv, d), m))
            self.k_rope = nnx.Param(init_params(rngs, (m, d // 2), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        self.config = config

    @staticmethod
    def cache_entries(config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("kv", config.num_kv_heads, config.head_dim),
                CacheEntry("k_rope", 0, config.head_dim // 2))

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 shared: tuple | None = None, *, index: jax.Array | None = None,
                 window: jax.Array | int | None = None) -> tuple[jax.Array, dict | None, tuple]:
        """As `GroupedAttention.__call__`; what is attended to is (dict kv, k_rope; the tied
        state's layout; key positions or None)."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        theta, n = config.rope_theta, config.head_dim - config.head_dim // 2
        x = x.astype(dtype)
        q = dense(x, self.q[...].astype(dtype))
        q = jnp.concatenate([q[..., :n], apply_rope(q[..., n:], positions, theta)], axis=-1)
        if shared is None:
            tied = dense(x, self.kv[...].astype(dtype))  # [batch, seq, kv_heads, d]
            k_rope = apply_rope(dense(x, self.k_rope[...].astype(dtype))[:, :, None], positions, theta)
            if cache is None:
                shared = ({"kv": tied, "k_rope": k_rope[:, :, 0]}, "bskd", None)
            else:
                axes = {e.name: e.axes(x.shape[0]) for e in self.cache_entries(config)}
                cache, state, k_positions = update(cache, {"kv": tied, "k_rope": k_rope}, axes,
                                                   index, ring=window is not None, dtype=dtype)
                shared = (state, axes["kv"], k_positions)
        state, layout, k_positions = shared
        if index is None:  # training, evaluation: causal self-attention over activations
            out = self_attention(attend_tied, (q,), (state["kv"], state["k_rope"]), config, window)
        else:
            out = attend_tied(q, state["kv"], state["k_rope"], tied_layout=layout, q_offset=index,
                              window=window, k_positions=k_positions)
        return dense(out, self.out[...].astype(dtype), contract=2), cache, shared

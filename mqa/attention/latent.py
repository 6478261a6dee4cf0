"""Multi-head latent attention (MLA; DeepSeek-AI 2024, DeepSeek-V2), `model.attention="latent"`.

Each token's keys and values for all heads come from one RMS-normalised latent L of
`kv_latent_dim` (c) numbers: head h's key is L @ k_up[:, h], its value L @ v_up[:, h].
Rotary positions are decoupled: a rotary key R of `rope_head_dim` (r) numbers shared by
all heads, met by a rotary part of each query. The cache holds exactly L and R, side by
side in one buffer (as DeepSeek's FlashMLA caches them): `c + r` numbers per token and
layer, whatever the number of heads.

Training and evaluation expand L into per-head keys and values (`expand_latent`,
`attend_latent_expanded`).
Cached decoding never does: it maps each query into the latent space (q @ k_up^T), scores
it against L itself, and maps the attention-weighted latent out through v_up and the output
projection (`attend_latent_absorbed`). Both compute the same function.

Letters as in `core`, and c latent, r rotary, e query latent.
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
from mqa.norm import RMSNorm
from mqa.rope import apply_rope

F32 = dict(preferred_element_type=jnp.float32)


def expand_latent(latent: jax.Array, k_up: jax.Array, v_up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """latent: [b, s, c]; k_up, v_up: [c, h, d] -> per-head keys and values [b, s, h, d]."""
    return (jnp.einsum("bsc,chd->bshd", latent, k_up), jnp.einsum("bsc,chd->bshd", latent, v_up))


def attend_latent_expanded(q: jax.Array, q_rope: jax.Array, k: jax.Array, v: jax.Array,
                           k_rope: jax.Array, **mask) -> jax.Array:
    """q: [b, t, h, d]; q_rope: [b, t, h, r] rotated; k, v: [b, s, h, d], the latent
    expanded (`expand_latent`); k_rope: [b, s, r] rotated. mask: `causal_mask`'s q_offset,
    window, k_positions. Returns [b, t, h, d]: softmax((q.k + q_rope.k_rope) / sqrt(d + r)) v."""
    b, t, h, d = q.shape
    logits = (jnp.einsum("bthd,bshd->bhts", q, k, **F32)
              + jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, **F32))
    probs = _softmax(logits, d + q_rope.shape[-1], t, k.shape[1], **mask)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, **F32).astype(q.dtype)


def attend_latent_absorbed(q: jax.Array, q_rope: jax.Array, cached: jax.Array, k_up: jax.Array,
                           v_up: jax.Array, *, cached_layout: str = "bsd", **mask) -> jax.Array:
    """`attend_latent_expanded`'s result computed in the latent space, from the cache:
    cached [b, s, c + r] ("bsd"; "sd" without the batch axis at batch 1) holds each token's
    latent and then its rotary key.

    q.(latent @ k_up) = (q @ k_up^T).latent, and sum_s p (latent @ v_up) = (sum_s p latent) @ v_up.
    The queries' latent and rotary parts meet the cache in one product, and the values are
    the same rows (their rotary part dropped from the small result): each product reads the
    cache once, as it lies, like MQA's keys and values (`core.ordered_einsum`).
    """
    b, t, h, d = q.shape
    c = k_up.shape[0]
    q_latent = jnp.einsum("bthd,chd->bthc", q, k_up, **F32).astype(q.dtype)
    queries = jnp.concatenate([q_latent, q_rope], axis=-1)                 # [b, t, h, c + r]
    rows, q_axes, score_axes = "bsc", "bthc", "bhts"
    if "b" not in cached_layout:
        rows, q_axes, score_axes, queries = "sc", "thc", "hts", queries[0]
    logits = ordered_einsum(f"{rows},{q_axes}->{score_axes}", cached, queries, **F32)
    probs = _softmax(logits, d + q_rope.shape[-1], t, cached.shape[-2], **mask)
    out = ordered_einsum(f"{score_axes},{rows}->{q_axes}", probs.astype(cached.dtype), cached,
                         **F32).reshape(b, t, h, -1)
    return jnp.einsum("bthc,chd->bthd", out[..., :c].astype(q.dtype), v_up, **F32).astype(q.dtype)


def _softmax(logits, key_dim, t, s, *, q_offset=0, window=None, k_positions=None):
    return masked_softmax(logits / jnp.sqrt(jnp.float32(key_dim)),
                          causal_mask(t, s, q_offset, window, k_positions))


class LatentAttention(nnx.Module):
    """Weights: kv_down [m, c] and kv_norm (the latent), k_up and v_up [c, num_heads, d],
    k_rope [m, r], out [num_heads, d, m]; queries q [m, num_heads, d] and q_rope
    [m, num_heads, r], or with `q_latent_dim` = e > 0 q_down [m, e], q_norm, q [e, num_heads,
    d] and q_rope [e, num_heads, r]."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        del owns_kv  # latent attention does not combine with cross-layer sharing (config)
        m, h, d = config.d_model, config.num_heads, config.head_dim
        c, e, r = config.kv_latent_dim, config.q_latent_dim, config.rope_head_dim
        q_in = e or m
        if e:
            self.q_down = nnx.Param(init_params(rngs, (m, e), m))
            self.q_norm = RMSNorm(e, config.norm_eps)
        self.q = nnx.Param(init_params(rngs, (q_in, h, d), q_in))
        self.q_rope = nnx.Param(init_params(rngs, (q_in, h, r), q_in))
        self.kv_down = nnx.Param(init_params(rngs, (m, c), m))
        self.kv_norm = RMSNorm(c, config.norm_eps)
        self.k_up = nnx.Param(init_params(rngs, (c, h, d), c))
        self.v_up = nnx.Param(init_params(rngs, (c, h, d), c))
        self.k_rope = nnx.Param(init_params(rngs, (m, r), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        self.config = config

    @staticmethod
    def cache_entries(config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("latent", 0, config.kv_latent_dim + config.rope_head_dim),)

    def __call__(self, x: jax.Array, positions: jax.Array, cache: dict | None = None,
                 shared: tuple | None = None, *, index: jax.Array | None = None,
                 window: jax.Array | int | None = None) -> tuple[jax.Array, dict | None, None]:
        """As `GroupedAttention.__call__` (nothing is shared across layers)."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        theta = config.rope_theta
        weight = lambda p: p[...].astype(dtype)  # noqa: E731
        x = x.astype(dtype)
        q_in = self.q_norm(dense(x, weight(self.q_down))) if config.q_latent_dim else x
        q = dense(q_in, weight(self.q))                                        # [b, t, h, d]
        q_rope = apply_rope(dense(q_in, weight(self.q_rope)), positions, theta)  # [b, t, h, r]
        latent = self.kv_norm(dense(x, weight(self.kv_down)))                   # [b, t, c]
        k_rope = apply_rope(dense(x, weight(self.k_rope))[:, :, None], positions, theta)
        k_up, v_up = weight(self.k_up), weight(self.v_up)
        if cache is None:
            keys = (*expand_latent(latent, k_up, v_up), k_rope[:, :, 0])
            out = self_attention(attend_latent_expanded, (q, q_rope), keys, config, window)
        else:
            axes = {e.name: e.axes(x.shape[0]) for e in self.cache_entries(config)}
            new = jnp.concatenate([latent[:, :, None], k_rope], axis=-1)    # [b, t, 1, c + r]
            cache, state, k_positions = update(cache, {"latent": new}, axes, index,
                                               ring=window is not None, dtype=dtype)
            out = attend_latent_absorbed(q, q_rope, state["latent"], k_up, v_up,
                                         cached_layout=axes["latent"], q_offset=index,
                                         window=window, k_positions=k_positions)
        return dense(out, weight(self.out), contract=2), cache, None

"""Multi-head latent attention (MLA; DeepSeek-AI 2024, DeepSeek-V2), `model.attention="latent"`.

Each token's keys and values for all heads come from one RMS-normalised latent L of
`kv_latent_dim` (c) numbers: head h's key is L @ k_up[:, h], its value L @ v_up[:, h].
Rotary positions are decoupled: a rotary key R of `rope_head_dim` (r) numbers shared by
all heads, met by a rotary part of each query. The cache holds exactly L and R, side by
side in one buffer (as DeepSeek's FlashMLA caches them): `c + r` numbers per token and
layer, whatever the number of heads.

Three options exist for models converted from grouped attention (`mqa.convert.latent`,
MHA2MLA's and TransMLA's route), each off by default: `rope_key_heads` R > 1 rotary keys
per token, query head h reading key h // (num_heads / R) as grouped attention does (the
cache holds c + R * r numbers); `rope_frequency_dim` D, the rotary part turning at the r/2
highest frequencies of a D-dimensional head (those the source's kept dimensions turned
at); and `kv_latent_norm=False`, a linear latent, without the RMSNorm.

`qk_nope_dim` n (DeepSeek's qk_nope_head_dim; 0: head_dim d) is the width of each query's
and expanded key's non-rotary part, so scores have n + r numbers while values keep d (a
per-head rotary conversion uses n = d - r: the source's d numbers per score, split).

Training and evaluation expand L into per-head keys and values (`expand_latent`,
`attend_latent_expanded`).
Cached decoding never does: it maps each query into the latent space (q @ k_up^T), scores
it against L itself, and maps the attention-weighted latent out through v_up and the output
projection (`attend_latent_absorbed`). Both compute the same function.

Letters as in `core`, and c latent, r rotary, e query latent, n non-rotary query/key part.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.attention import cpu_decode
from mqa.attention.core import (causal_mask, dense, init_output, init_params, masked_softmax,
                               ordered_einsum)
from mqa.attention.protocol import AttentionFamily, CacheEntry, Keys, Mode, SelfAttention, sink_options
from mqa.errors import ConfigError
from mqa.model_config import ModelConfig
from mqa.norm import RMSNorm
from mqa.rope import LayerRope, apply_rope

F32 = dict(preferred_element_type=jnp.float32)


def expand_latent(latent: jax.Array, k_up: jax.Array, v_up: jax.Array) -> tuple[jax.Array, jax.Array]:
    """latent: [b, s, c]; k_up [c, h, n], v_up [c, h, d] -> per-head keys [b, s, h, n] and
    values [b, s, h, d]."""
    return (jnp.einsum("bsc,chd->bshd", latent, k_up), jnp.einsum("bsc,chd->bshd", latent, v_up))


def rope_scores(q_rope: jax.Array, k_rope: jax.Array) -> jax.Array:
    """The rotary part of the scores, float32 [b, h, t, s]: q_rope [b, t, h, r] against
    k_rope [b, s, R * r], R rotary keys per token (`rope_key_heads`), query head h reading
    key h // (h / R)."""
    b, t, h, r = q_rope.shape
    heads = k_rope.shape[-1] // r
    if heads == 1:
        return jnp.einsum("bthr,bsr->bhts", q_rope, k_rope, **F32)
    q = q_rope.reshape(b, t, heads, h // heads, r)
    k = k_rope.reshape(*k_rope.shape[:-1], heads, r)
    return jnp.einsum("btkgr,bskr->bkgts", q, k, **F32).reshape(b, h, t, -1)


def rope_query_blocks(q_rope: jax.Array, heads: int) -> jax.Array:
    """q_rope [b, t, h, r] -> [b, t, h, heads * r]: each query head's rotary part in the
    block of the rotary key it reads, zeros in the others, so that the queries meet the
    cached [latent, key 1, ..., key R] rows in one product."""
    if heads == 1:
        return q_rope
    b, t, h, r = q_rope.shape
    grouped = q_rope.reshape(b, t, heads, h // heads, r)
    blocks = jnp.einsum("btkgr,kl->btkglr", grouped, jnp.eye(heads, dtype=q_rope.dtype))
    return blocks.reshape(b, t, h, heads * r)


def attend_latent_expanded(q: jax.Array, q_rope: jax.Array, k: jax.Array, v: jax.Array,
                           k_rope: jax.Array, **mask) -> jax.Array:
    """q: [b, t, h, n]; q_rope: [b, t, h, r] rotated; k [b, s, h, n], v [b, s, h, d], the
    latent expanded (`expand_latent`); k_rope: [b, s, R * r] rotated (`rope_scores`). mask:
    `causal_mask`'s q_offset, window, k_positions, sinks. Returns [b, t, h, d]:
    softmax((q.k + q_rope.k_rope) / sqrt(n + r)) v."""
    b, t, h, n = q.shape
    logits = jnp.einsum("bthn,bshn->bhts", q, k, **F32) + rope_scores(q_rope, k_rope)
    probs = _softmax(logits, n + q_rope.shape[-1], t, k.shape[1], **mask)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v, **F32).astype(q.dtype)


def attend_latent_absorbed(q: jax.Array, q_rope: jax.Array, cached: jax.Array, k_up: jax.Array,
                           v_up: jax.Array, *, cached_layout: str = "bsd", kernel: bool = False,
                           int8: tuple[jax.Array, jax.Array] | None = None, **mask) -> jax.Array:
    """`attend_latent_expanded`'s result computed in the latent space, from the cache:
    cached [b, s, c + R * r] ("bsd"; "sd" without the batch axis at batch 1) holds each
    token's latent and then its R rotary keys.

    q.(latent @ k_up) = (q @ k_up^T).latent, and sum_s p (latent @ v_up) = (sum_s p latent) @ v_up.
    The queries' latent and rotary parts meet the cache in one product, and the values are
    the same rows (their rotary part dropped from the small result): each product reads the
    cache once, as it lies, like MQA's keys and values (`core.ordered_einsum`).
    """
    b, t, h, n = q.shape                                                    # k_up [c, h, n]
    c = k_up.shape[0]
    q_latent = jnp.einsum("bthn,chn->bthc", q, k_up, **F32).astype(q.dtype)
    rope_heads = (cached.shape[-1] - c) // q_rope.shape[-1]
    queries = jnp.concatenate([q_latent, rope_query_blocks(q_rope, rope_heads)],
                              axis=-1)                                      # [b, t, h, c + R r]
    if kernel:  # the cached rows are the keys and the values (their latent part) of one K/V head
        out = cpu_decode.attend(queries, cached, cached, kv_layout=cached_layout, value_dim=c,
                                score_dim=n + q_rope.shape[-1], int8=int8 and (int8, int8), **mask)
        return jnp.einsum("bthc,chd->bthd", out.astype(q.dtype), v_up, **F32).astype(q.dtype)
    rows, q_axes, score_axes = "bsc", "bthc", "bhts"
    if "b" not in cached_layout:
        rows, q_axes, score_axes, queries = "sc", "thc", "hts", queries[0]
    logits = ordered_einsum(f"{rows},{q_axes}->{score_axes}", cached, queries, **F32)
    probs = _softmax(logits, n + q_rope.shape[-1], t, cached.shape[-2], **mask)
    out = ordered_einsum(f"{score_axes},{rows}->{q_axes}", probs.astype(cached.dtype), cached,
                         **F32).reshape(b, t, h, -1)
    return jnp.einsum("bthc,chd->bthd", out[..., :c].astype(q.dtype), v_up, **F32).astype(q.dtype)


def _softmax(logits, key_dim, t, s, *, q_offset=0, window=None, k_positions=None, sinks=0):
    return masked_softmax(logits / jnp.sqrt(jnp.float32(key_dim)),
                          causal_mask(t, s, q_offset, window, k_positions, sinks))


class LatentAttention(AttentionFamily):
    """Weights: kv_down [m, c] and kv_norm (the latent; none with kv_latent_norm=False),
    k_up [c, num_heads, n] (n = `nope_dim`), v_up [c, num_heads, d], k_rope [m, R * r]
    (R = rope_key_heads), out [num_heads, d, m]; queries q [m, num_heads, n] and q_rope
    [m, num_heads, r], or with `q_latent_dim` = e > 0 q_down [m, e], q_norm, q [e, num_heads,
    n] and q_rope [e, num_heads, r]."""

    name = "latent"

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        del owns_kv  # latent attention does not combine with cross-layer sharing (`validate`)
        m, h, d, n = config.d_model, config.num_heads, config.head_dim, self.nope_dim(config)
        c, e, r = config.kv_latent_dim, config.q_latent_dim, config.rope_head_dim
        q_in = e or m
        if e:
            self.q_down = nnx.Param(init_params(rngs, (m, e), m))
            self.q_norm = RMSNorm(e, config.norm_eps)
        self.q = nnx.Param(init_params(rngs, (q_in, h, n), q_in))
        self.q_rope = nnx.Param(init_params(rngs, (q_in, h, r), q_in))
        self.kv_down = nnx.Param(init_params(rngs, (m, c), m))
        if config.kv_latent_norm:
            self.kv_norm = RMSNorm(c, config.norm_eps)
        self.k_up = nnx.Param(init_params(rngs, (c, h, n), c))
        self.v_up = nnx.Param(init_params(rngs, (c, h, d), c))
        self.k_rope = nnx.Param(init_params(rngs, (m, config.rope_key_heads * r), m))
        self.out = nnx.Param(init_output(rngs, h, d, m, config.num_layers))
        self.config = config

    @staticmethod
    def nope_dim(config: ModelConfig) -> int:
        """n: the non-rotary numbers of each query and expanded key (`qk_nope_dim`, or d)."""
        return config.qk_nope_dim or config.head_dim

    @classmethod
    def validate(cls, config: ModelConfig) -> None:
        if config.kv_latent_dim < 1:
            raise ConfigError("model.attention='latent' needs model.kv_latent_dim >= 1 (numbers "
                              f"cached per token), got {config.kv_latent_dim}")
        if config.rope_head_dim < 2 or config.rope_head_dim % 2:
            raise ConfigError("model.attention='latent' needs an even model.rope_head_dim >= 2 "
                              f"(the shared rotary key), got {config.rope_head_dim}")
        if config.kv_share_every != 1:
            raise ConfigError(f"model.kv_share_every={config.kv_share_every} does not combine with "
                              "model.attention='latent'; use 1, or attention 'grouped' or 'tied'")
        heads = config.rope_key_heads
        if heads < 1 or config.num_heads % heads:
            valid = [k for k in range(1, config.num_heads + 1) if config.num_heads % k == 0]
            raise ConfigError(f"model.rope_key_heads={heads} must divide model.num_heads="
                              f"{config.num_heads}; valid: {', '.join(map(str, valid))}")
        f = config.rope_frequency_dim
        if f and (f % 2 or f < config.rope_head_dim):
            raise ConfigError(f"model.rope_frequency_dim={f} must be 0 or an even number >= "
                              f"model.rope_head_dim={config.rope_head_dim}")
        if config.rope_pairs:
            half, frequencies = config.rope_head_dim // 2, (f or config.rope_head_dim) // 2
            size = config.num_layers * heads * half
            if len(config.rope_pairs) != size:
                raise ConfigError(f"model.rope_pairs has {len(config.rope_pairs)} entries; it needs "
                                  f"num_layers x rope_key_heads x rope_head_dim/2 = {config.num_layers} "
                                  f"x {heads} x {half} = {size}, or none")
            wrong = [i for i in config.rope_pairs if not 0 <= i < frequencies]
            if wrong:
                raise ConfigError(f"model.rope_pairs holds {wrong[0]}; each must be a frequency "
                                  f"index in 0..{frequencies - 1}")

    @classmethod
    def cache_entries(cls, config: ModelConfig) -> tuple[CacheEntry, ...]:
        return (CacheEntry("latent", 0, config.kv_latent_dim + config.rope_key_heads * config.rope_head_dim),)

    @classmethod
    def param_count(cls, config: ModelConfig, owns_kv: bool) -> int:
        """out h*d*m; kv_down m*c, k_up c*h*n, v_up c*h*d, k_rope m*R*r; queries q m*h*n and
        q_rope m*h*r from x, or with e = q_latent_dim > 0 q_down m*e, q e*h*n, q_rope e*h*r."""
        m, h, d, n = config.d_model, config.num_heads, config.head_dim, cls.nope_dim(config)
        c, e, r = config.kv_latent_dim, config.q_latent_dim, config.rope_head_dim
        queries = (m * e + e * h * (n + r)) if e else m * h * (n + r)
        return queries + m * c + c * h * (n + d) + m * config.rope_key_heads * r + h * d * m

    @classmethod
    def norm_count(cls, config: ModelConfig) -> int:
        """kv_norm over the latent (unless kv_latent_norm=False), and q_norm over the query
        latent if there is one."""
        return config.kv_latent_dim * config.kv_latent_norm + config.q_latent_dim

    @classmethod
    def key_dim(cls, config: ModelConfig) -> int:
        """The expanded key's n and the rotary part's r (as training computes it)."""
        return cls.nope_dim(config) + config.rope_head_dim

    @classmethod
    def cached_dims(cls, config: ModelConfig) -> tuple[int, int]:
        """Absorbed decoding multiplies whole cached rows, c + R * r numbers, for the keys
        and again for the values (`attend_latent_absorbed`); q @ k_up and out @ v_up are
        weight products, once per token."""
        row = config.kv_latent_dim + config.rope_key_heads * config.rope_head_dim
        return row, row

    @classmethod
    def mha_equivalent(cls, config: ModelConfig) -> ModelConfig:
        return dataclasses.replace(super().mha_equivalent(config), kv_latent_dim=0, q_latent_dim=0,
                                   rope_head_dim=0, rope_key_heads=1, rope_frequency_dim=0,
                                   rope_pairs=(), kv_latent_norm=True, qk_nope_dim=0)

    def project_kv(self, x: jax.Array, positions: jax.Array,
                   rope: LayerRope) -> dict[str, jax.Array]:
        """x: [b, s, m] -> "latent" [b, s, 1, c + R * r]: the (normalised) latent and the R
        rotated keys side by side, as the cache holds them."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        b, s, _ = x.shape
        latent = dense(x, self.kv_down[...].astype(dtype))                           # [b, s, c]
        if config.kv_latent_norm:
            latent = self.kv_norm(latent)
        heads, r = config.rope_key_heads, config.rope_head_dim
        k_rope = apply_rope(dense(x, self.k_rope[...].astype(dtype)).reshape(b, s, heads, r),
                            positions, rope.theta, config.rope_frequency_dim,
                            rope.pairs)                                        # [b, s, R, r]
        return {"latent": jnp.concatenate([latent[:, :, None], k_rope.reshape(b, s, 1, heads * r)],
                                          axis=-1)}

    def queries(self, x: jax.Array, positions: jax.Array,
                rope: LayerRope) -> tuple[jax.Array, ...]:
        """x: [b, t, m] -> (q [b, t, h, n], q_rope [b, t, h, r] rotated, each head's at the
        frequencies of the rotary key it reads)."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        q_in = self.q_norm(dense(x, self.q_down[...].astype(dtype))) if config.q_latent_dim else x
        q = dense(q_in, self.q[...].astype(dtype))
        pairs = rope.pairs
        if pairs is not None:  # [R, r/2] -> [h, r/2]
            pairs = jnp.repeat(jnp.asarray(pairs), config.num_heads // config.rope_key_heads, axis=0)
        return q, apply_rope(dense(q_in, self.q_rope[...].astype(dtype)), positions, rope.theta,
                             config.rope_frequency_dim, pairs)

    def attend(self, queries: tuple[jax.Array, ...], keys: Keys, *, mode: Mode,
               window: jax.Array | int | None, backend: SelfAttention) -> jax.Array:
        """The queries against `keys` ("latent"), through the output projection: [b, t, m].
        SELF: the latent expanded into per-head keys and values; CACHED: the queries
        absorbed into the latent space (the same function)."""
        config, dtype = self.config, jnp.dtype(self.config.dtype)
        (q, q_rope), cached = queries, keys.arrays["latent"]
        k_up, v_up = self.k_up[...].astype(dtype), self.v_up[...].astype(dtype)
        if mode is Mode.SELF:
            c = config.kv_latent_dim
            latent, k_rope = cached[..., :c], cached[..., c:]
            out = backend(attend_latent_expanded, (q, q_rope),
                          (*expand_latent(latent, k_up, v_up), k_rope), window=window,
                          **sink_options(config))
        else:
            kernel = config.decode_impl == "cpu_kernel"
            out = attend_latent_absorbed(q, q_rope, cached, k_up, v_up, kernel=kernel,
                                         int8=keys.int8["latent"] if kernel and keys.int8 else None,
                                         cached_layout=keys.axes["latent"], q_offset=keys.q_offset,
                                         window=window, k_positions=keys.positions,
                                         **sink_options(config))
        return dense(out, self.out[...].astype(dtype), contract=2)

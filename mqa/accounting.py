"""What a configuration costs: parameters, FLOPs per token, and KV-cache bytes.

All counts are analytic, from `ModelConfig` alone, so configs can be compared without
building them; tests check them against the parameters a built model really has.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from mqa.config import ModelConfig


def attention_params(config: ModelConfig) -> int:
    """All layers' attention parameters (projections and latent attention's norms; no
    biases). With cross-layer sharing only `num_kv_layers` layers have K/V projections.

      grouped  q, out: m*h*d each; k, v: m*kv*d each (K/V layers)
      tied     q, out: m*h*d each; kv: m*kv*d, k_rope: m*d/2 (K/V layers)
      latent   out: h*d*m; kv_down m*c, kv_norm c, k_up and v_up c*h*d each, k_rope m*r;
               queries q m*h*d and q_rope m*h*r from x, or with e = q_latent_dim > 0
               q_down m*e, q_norm e, q e*h*d, q_rope e*h*r
    """
    c = config
    m, h, d, kv = c.d_model, c.num_heads, c.head_dim, c.num_kv_heads
    if c.attention == "latent":
        e, r, lat = c.q_latent_dim, c.rope_head_dim, c.kv_latent_dim
        queries = (m * e + e + e * h * (d + r)) if e else m * h * (d + r)
        keys_values = m * lat + lat + 2 * lat * h * d + m * r
        return c.num_layers * (queries + keys_values + h * d * m)
    per_kv_layer = 2 * m * kv * d if c.attention == "grouped" else m * kv * d + m * (d // 2)
    return c.num_layers * 2 * m * h * d + c.num_kv_layers * per_kv_layer


def norm_params(config: ModelConfig) -> int:
    """The RMSNorm scales: two per layer and the final one, and latent attention's."""
    latent = config.kv_latent_dim + config.q_latent_dim if config.attention == "latent" else 0
    return config.d_model * (2 * config.num_layers + 1) + config.num_layers * latent


def mlp_params(config: ModelConfig) -> int:
    """One layer's SwiGLU gate, up and down projections."""
    return 3 * config.d_model * config.mlp_dim


def param_count(config: ModelConfig, *, embeddings: bool = True) -> int:
    """Total parameters; `embeddings=False` leaves out the (un)embedding matrices."""
    per_layer = mlp_params(config) + 2 * config.d_model  # + 2 norms
    total = attention_params(config) + config.num_layers * per_layer + config.d_model  # + final norm
    if embeddings:
        total += config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return total


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True) -> int:
    """Matmul FLOPs per token: 2 per weight used (forward), plus attention's QK^T and AV.

    Attention counts the full seq_len x seq_len score matrix, as the einsum backend computes
    it (not halved for the causal mask nor narrowed to a sliding window, which the blockwise
    backend skips): 2 * h * (key dim + value dim) per
    key, the key dim being d (grouped, tied) or d + rope_head_dim (latent, expanded as in
    training). Training (forward + backward) is 3x the forward pass.
    """
    c = config
    weights = param_count(c, embeddings=False) - norm_params(c)
    weights += c.vocab_size * c.d_model  # the output projection; lookups are free
    key_dim = c.head_dim + (c.rope_head_dim if c.attention == "latent" else 0)
    attention = 2 * c.num_layers * c.num_heads * (key_dim + c.head_dim) * seq_len
    forward = 2 * weights + attention
    return 3 * forward if training else forward


def kv_cache_bytes(config: ModelConfig, batch_size: int, context: int, dtype=None) -> int:
    """Bytes of the KV cache `kv_cache.init_cache(config, batch_size, context)` allocates:
    per K/V layer, `context` positions (or a local layer's window, if smaller) of what the
    family caches per token; with `kv_cache_dtype="int8"` one byte a number plus a float32
    scale per cached vector (per token and head), else `dtype` (default the compute dtype)."""
    from mqa.kv_cache import SCALE_DTYPE, buffer_length, cache_entries  # kv_cache imports the families
    entries = cache_entries(config)
    numbers = sum(max(e.heads, 1) * e.dim for e in entries)
    vectors = sum(max(e.heads, 1) for e in entries)
    if config.kv_cache_dtype == "int8":
        per_position = numbers + vectors * jnp.dtype(SCALE_DTYPE).itemsize
    else:
        per_position = numbers * jnp.dtype(dtype or config.dtype).itemsize
    positions = sum(buffer_length(config, g, context) for g in range(config.num_kv_layers))
    return batch_size * positions * per_position


def kv_cache_bytes_per_token(config: ModelConfig, dtype=None, *, context: int | None = None) -> float:
    """KV-cache bytes per token of context, over all layers: `kv_cache_bytes` for one
    sequence of `context` tokens (default `max_seq_len`) divided by `context`. Without a
    sliding window it does not depend on the context (and is an int)."""
    context = context or config.max_seq_len
    total = kv_cache_bytes(config, 1, context, dtype)
    return total // context if total % context == 0 else total / context


def mlp_dim_matching_mha(config: ModelConfig) -> int:
    """The SwiGLU width that gives this model as many parameters as its MHA version
    (grouped attention with `num_kv_heads == num_heads`, no cross-layer sharing).

    Whatever attention saves against MHA (fewer K/V heads, fewer layers with K/V, a
    tied state, a latent) Shazeer (2019) spends on a wider feed-forward layer (and a family
    with more attention parameters than MHA gets a narrower one). Rounded to the nearest
    width, so the counts agree within `1.5 * d_model` per layer.
    """
    c = config
    mha = dataclasses.replace(c, attention="grouped", num_kv_heads=c.num_heads, kv_share_every=1,
                              kv_latent_dim=0, q_latent_dim=0, rope_head_dim=0)
    saved = attention_params(mha) - attention_params(c)
    return c.mlp_dim + round(saved / (3 * c.d_model * c.num_layers))

"""What a configuration costs: parameters, FLOPs per token, and KV-cache bytes.

All counts are analytic, from `ModelConfig` alone, so configs can be compared without
building them; tests check them against the parameters a built model really has.
"""

from __future__ import annotations

import jax.numpy as jnp

from mqa.config import ModelConfig


def attention_params(config: ModelConfig) -> int:
    """All layers' q, k, v and output projections (no biases); with cross-layer sharing
    only `num_kv_layers` layers have k and v."""
    m, d = config.d_model, config.head_dim
    return m * d * (2 * config.num_heads * config.num_layers
                    + 2 * config.num_kv_heads * config.num_kv_layers)


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

    Attention counts the full seq_len x seq_len score matrix, as computed (not halved for
    the causal mask). Training (forward + backward) is 3x the forward pass.
    """
    weights = param_count(config, embeddings=False) - config.d_model * (2 * config.num_layers + 1)
    weights += config.vocab_size * config.d_model  # the output projection; lookups are free
    attention = 2 * 2 * config.num_layers * config.num_heads * config.head_dim * seq_len
    forward = 2 * weights + attention
    return 3 * forward if training else forward


def kv_cache_bytes_per_token(config: ModelConfig, dtype=None) -> int:
    """Bytes of keys and values cached per token, over all layers."""
    itemsize = jnp.dtype(dtype or config.dtype).itemsize
    return 2 * config.num_kv_layers * config.num_kv_heads * config.head_dim * itemsize


def kv_cache_bytes(config: ModelConfig, batch_size: int, context: int, dtype=None) -> int:
    """Bytes of a KV cache holding `context` tokens for each of `batch_size` sequences."""
    return batch_size * context * kv_cache_bytes_per_token(config, dtype)


def mlp_dim_matching_mha(config: ModelConfig) -> int:
    """The SwiGLU width that gives this model as many parameters as its MHA version
    (`num_kv_heads == num_heads`, no cross-layer sharing).

    Fewer K/V heads, and fewer layers with K/V, save `2 * d_model * head_dim *
    (num_layers * num_heads - num_kv_layers * num_kv_heads)` parameters; Shazeer (2019)
    spends them on a wider feed-forward layer. Rounded to the nearest width, so the counts
    agree within `1.5 * d_model` per layer.
    """
    c = config
    saved = 2 * c.d_model * c.head_dim * (c.num_layers * c.num_heads
                                          - c.num_kv_layers * c.num_kv_heads)
    return c.mlp_dim + round(saved / (3 * c.d_model * c.num_layers))


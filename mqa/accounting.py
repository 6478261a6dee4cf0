"""What a configuration costs: parameters, FLOPs per token, and KV-cache bytes.

All counts are analytic, from `ModelConfig` alone, so configs can be compared without
building them; tests check them against the parameters a built model really has.
"""

from __future__ import annotations

import jax.numpy as jnp

from mqa.attention import family
from mqa.kv_cache import SCALE_DTYPE, buffer_length, cache_entries
from mqa.model_config import ModelConfig


def attention_params(config: ModelConfig) -> int:
    """All layers' attention parameters: each family's weights (`param_count`; no biases)
    and norm scales (`norm_count`). With cross-layer sharing only `num_kv_layers` layers
    have K/V projections."""
    fam = family(config)
    shared_layers = config.num_layers - config.num_kv_layers
    return (config.num_kv_layers * fam.param_count(config, owns_kv=True)
            + shared_layers * fam.param_count(config, owns_kv=False)
            + config.num_layers * fam.norm_count(config))


def block_norms(config: ModelConfig) -> int:
    """RMSNorms of d_model per layer: before attention and the MLP, and with `post_norms`
    after them too (Gemma's sandwich)."""
    return 4 if config.post_norms else 2


def norm_params(config: ModelConfig) -> int:
    """The RMSNorm scales: `block_norms` per layer, the final one, and the attention family's."""
    return (config.d_model * (block_norms(config) * config.num_layers + 1)
            + config.num_layers * family(config).norm_count(config))


def mlp_params(config: ModelConfig) -> int:
    """One layer's gated MLP: gate, up and down projections."""
    return 3 * config.d_model * config.mlp_dim


def param_count(config: ModelConfig, *, embeddings: bool = True) -> int:
    """Total parameters; `embeddings=False` leaves out the (un)embedding matrices."""
    per_layer = mlp_params(config) + block_norms(config) * config.d_model
    total = attention_params(config) + config.num_layers * per_layer + config.d_model  # + final norm
    if embeddings:
        total += config.vocab_size * config.d_model * (1 if config.tie_embeddings else 2)
    return total


def matmul_weights(config: ModelConfig) -> int:
    """Weights a token is multiplied by: all but the norms and the input embedding (a lookup),
    the output projection included (the tied embedding, where it is tied)."""
    return param_count(config, embeddings=False) - norm_params(config) + config.vocab_size * config.d_model


def flops_per_token(config: ModelConfig, seq_len: int, *, training: bool = True) -> int:
    """Matmul FLOPs per token: 2 per weight used (forward), plus attention's QK^T and AV.

    Attention counts the full seq_len x seq_len score matrix, as the einsum backend computes
    it (not halved for the causal mask nor narrowed to a sliding window, which the blockwise
    backend skips): 2 * h * (key dim + value dim) per
    key, the key dim being d (grouped, tied) or d + rope_head_dim (latent, expanded as in
    training). Training (forward + backward) is 3x the forward pass.
    """
    c = config
    weights = matmul_weights(c)
    key_dim = family(c).key_dim(c)
    attention = 2 * c.num_layers * c.num_heads * (key_dim + c.head_dim) * seq_len
    forward = 2 * weights + attention
    return 3 * forward if training else forward


def decode_step_flops(config: ModelConfig, batch_size: int, context: int) -> int:
    """Matmul FLOPs of one decoding step: `batch_size` sequences each add one token to a
    cache holding `context` (the compute floor's numerator, beside the memory floor's bytes).

    2 per weight used per sequence (the output projection included), plus each layer's
    products with the positions it attends: every cached position on a global layer, at
    most the window (and sinks) on a local one, `cached_dims` numbers per key and per value
    and query head (a latent layer's absorbed rows). Softmax, norms and RoPE are left out
    (elementwise, a few percent at these shapes).
    """
    c = config
    weights = matmul_weights(c)
    key_numbers, value_numbers = family(c).cached_dims(c)
    positions = sum(min(context, c.sliding_window + c.attention_sinks) if c.is_local(layer) else context
                    for layer in range(c.num_layers))
    return batch_size * (2 * weights + 2 * c.num_heads * (key_numbers + value_numbers) * positions)


def decode_step_bytes(config: ModelConfig, cache_bytes: int) -> int:
    """Bytes one decoding step reads (the memory floor's numerator): every parameter once,
    in float32, and the KV cache of `cache_bytes` (as allocated: `kv_cache_bytes`) once per
    layer that attends to it. With cross-layer sharing (`kv_share_every` S) each buffer is
    read by S layers, one after another: sharing divides what a server holds per sequence
    by S, not what a step reads (XLA's own count of a compiled step agrees:
    tests/test_accounting.py)."""
    return param_count(config) * 4 + config.kv_share_every * cache_bytes


def kv_cache_bytes(config: ModelConfig, batch_size: int, context: int, dtype=None) -> int:
    """Bytes of the KV cache `kv_cache.init_cache(config, batch_size, context)` allocates:
    per K/V layer, `context` positions (or a local layer's window, if smaller) of what the
    family caches per token; with `kv_cache_dtype="int8"` one byte a number plus a float32
    scale per cached vector (per token and head), else `dtype` (default the compute dtype)."""
    entries = cache_entries(config)
    numbers = sum(max(e.heads, 1) * e.dim for e in entries)
    vectors = sum(max(e.heads, 1) for e in entries)
    if config.kv_cache_dtype == "int4":
        return batch_size * sum(int4_layer_bytes(config, buffer_length(config, g, context), dtype)
                                for g in range(config.num_kv_layers))
    if config.kv_cache_dtype == "int8":
        per_position = numbers + vectors * jnp.dtype(SCALE_DTYPE).itemsize
    else:
        per_position = numbers * jnp.dtype(dtype or config.dtype).itemsize
    positions = sum(buffer_length(config, g, context) for g in range(config.num_kv_layers))
    return batch_size * positions * per_position


def int4_layer_bytes(config: ModelConfig, length: int, dtype=None) -> int:
    """One sequence's bytes of one K/V layer's int4 cache (`mqa.kv_int4`) of `length`
    positions: per entry, half a byte a number over the padded positions, a float16 scale
    and minimum per group (keys: per channel and group of tokens; values: per token and
    group of channels), and for keys the exact residual of one group."""
    group = config.kv_quant_group
    padded = -(-length // group) * group
    total = 0
    for e in cache_entries(config):
        numbers = max(e.heads, 1) * e.dim
        total += padded * numbers // 2 + 2 * 2 * padded * numbers // group
        if e.name == "k":
            total += group * numbers * jnp.dtype(dtype or config.dtype).itemsize
    return total


def kv_cache_bytes_per_token(config: ModelConfig, dtype=None, *, context: int | None = None) -> float:
    """KV-cache bytes per token of context, over all layers: `kv_cache_bytes` for one
    sequence of `context` tokens (default `max_seq_len`) divided by `context`. Without a
    sliding window it does not depend on the context (and is an int)."""
    context = context or config.max_seq_len
    total = kv_cache_bytes(config, 1, context, dtype)
    return total // context if total % context == 0 else total / context


def mlp_dim_matching_mha(config: ModelConfig) -> int:
    """The gated MLP's width that gives this model as many parameters as its MHA version
    (grouped attention with `num_kv_heads == num_heads`, no cross-layer sharing).

    Whatever attention saves against MHA (fewer K/V heads, fewer layers with K/V, a
    tied state, a latent) Shazeer (2019) spends on a wider feed-forward layer (and a family
    with more attention parameters than MHA gets a narrower one). Rounded to the nearest
    width, so the counts agree within `1.5 * d_model` per layer.
    """
    c = config
    mha = family(c).mha_equivalent(c)
    saved = attention_params(mha) - attention_params(c)
    return c.mlp_dim + round(saved / (3 * c.d_model * c.num_layers))

"""The key/value cache for incremental decoding: an explicit pytree, passed in and out.

With `num_kv_heads` K/V heads the cache holds `2 * num_kv_layers * num_kv_heads * head_dim`
numbers per token, so MQA's cache is exactly `1 / num_heads` of MHA's; cross-layer sharing
(`kv_share_every` layers per K/V, `num_kv_layers = num_layers / kv_share_every`) divides it
again.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mqa.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every position decoded so far.

    k, v: for the whole model, a tuple of num_kv_layers arrays [batch, num_kv_heads, max_len,
      head_dim]; inside one layer, that layer's array. Separate buffers per layer let each
      decoding step write its new keys and values into its own buffer and read each layer's cache
      without first copying it out of a stacked array, and with each head's positions
      contiguous, the attention products read the cache as it lies (with the head axis
      after the position axis, XLA on CPU transposed the whole cache every step: 2.3x
      slower MHA decoding, measured).
    index: int32 scalar, the number of positions written; the next token goes there.
    """

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens."""
    if max_len > config.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={config.max_seq_len}")
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    layers = range(config.num_kv_layers)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tuple(jnp.zeros(shape, dtype) for _ in layers), jnp.zeros((), jnp.int32))


def cache_nbytes(cache: KVCache) -> int:
    """Bytes the cache's keys and values occupy."""
    return sum(a.nbytes for a in jax.tree.leaves((cache.k, cache.v)))

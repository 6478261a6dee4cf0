"""The key/value cache for incremental decoding: an explicit pytree, passed in and out.

With `num_kv_heads` K/V heads the cache holds `2 * num_layers * num_kv_heads * head_dim`
numbers per token, so MQA's cache is exactly `1 / num_heads` of MHA's.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from mqa.config import ModelConfig


class KVCache(NamedTuple):
    """Keys and values of every position decoded so far.

    k, v: [num_layers, batch, max_len, num_kv_heads, head_dim] for the whole model
      (one layer's slice, [batch, max_len, num_kv_heads, head_dim], inside a layer).
    index: int32 scalar, the number of positions written; the next token goes there.
    """

    k: jax.Array
    v: jax.Array
    index: jax.Array


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens."""
    if max_len > config.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={config.max_seq_len}")
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((), jnp.int32))


def cache_nbytes(cache: KVCache) -> int:
    """Bytes the cache's keys and values occupy."""
    return cache.k.nbytes + cache.v.nbytes

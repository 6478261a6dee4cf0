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

    k, v: for the whole model, a tuple of num_kv_layers arrays; inside one layer, that
      layer's array. Each is [batch, num_kv_heads, max_len, head_dim] with the batch and
      head axes left out where they have size 1 (`cache_axes`): [batch, max_len, head_dim]
      for MQA. Why this shape (each measured on XLA's CPU backend):
      - one buffer per layer: a decoding step writes its new keys and values into its own
        buffer, never copying a layer out of a stacked array;
      - each head's positions contiguous: the attention products read the cache as it lies
        (with the head axis after the position axis XLA transposed the whole cache every
        step: 2.3x slower MHA decoding);
      - no size-1 axes: the products drop them with a reshape, and XLA then fused a second
        copy of the cache update into that reshape and copied the cache three times per
        layer and step (MQA decoding 1.7x slower).
    index: int32 scalar, the number of positions written; the next token goes there.
    """

    k: tuple[jax.Array, ...] | jax.Array
    v: tuple[jax.Array, ...] | jax.Array
    index: jax.Array


def cache_axes(batch_size: int, num_kv_heads: int) -> str:
    """The axes of a cache buffer as `attend`'s letters: "bksd" (batch, K/V head, position,
    head dimension) without "b" or "k" where that axis would have size 1."""
    return ("b" if batch_size > 1 else "") + ("k" if num_kv_heads > 1 else "") + "sd"


def to_cache_axes(x: jax.Array, axes: str) -> jax.Array:
    """Keys or values [batch, seq, kv_heads, head_dim] -> laid out as `axes`."""
    b, t, kv, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape([dict(b=b, k=kv, s=t, d=d)[c] for c in axes])


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_len` tokens."""
    if max_len > config.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={config.max_seq_len}")
    dtype = jnp.dtype(dtype or config.dtype)
    size = dict(b=batch_size, k=config.num_kv_heads, s=max_len, d=config.head_dim)
    shape = [size[c] for c in cache_axes(batch_size, config.num_kv_heads)]
    layers = range(config.num_kv_layers)
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tuple(jnp.zeros(shape, dtype) for _ in layers), jnp.zeros((), jnp.int32))


def cache_nbytes(cache: KVCache) -> int:
    """Bytes the cache's keys and values occupy."""
    return sum(a.nbytes for a in jax.tree.leaves((cache.k, cache.v)))

"""The key/value cache for incremental decoding: an explicit pytree, passed in and out.

Each attention family says what it caches per token (`CacheEntry`s: grouped attention
its keys and values, tied attention one tied state per K/V head and a rotary key shared by
all heads, latent attention one latent and the shared rotary key), and two policies apply
to any family:
  - a sliding window (`model.sliding_window`): a local layer's buffers are a ring of
    `min(sliding_window, max_len)` positions (position p in slot p % length), so their size
    stays flat however long the context grows; with `model.attention_sinks` S the first S
    slots keep positions 0..S-1 for good and the ring is the rest (`slot`);
  - `model.kv_cache_dtype="int8"`: every cached vector is stored as int8 with one float32
    absmax scale per token and head, quantized when written and dequantized when read;
    "int4": KIVI's 4-bit cache, keys per channel and values per token (`mqa.kv_int4`).
`mqa.accounting.kv_cache_bytes` counts exactly the bytes `init_cache` allocates.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mqa import kv_int4
from mqa.attention import CacheEntry, Keys, family
from mqa.model_config import ModelConfig

SCALE_DTYPE = jnp.float32  # int8 caches: one absmax scale per token and head
CACHE_DTYPES = ("", "int8", "int4")  # model.kv_cache_dtype: '' stores the compute dtype


class KVCache(NamedTuple):
    """What every layer that computes keys and values has cached so far.

    layers: one dict per K/V layer (`num_kv_layers`), mapping each of its family's
      `CacheEntry` names (and "<name>_scale" for an int8 cache) to one buffer. A buffer is
      laid out as `CacheEntry.axes`: [batch, heads, length, dim] or [batch, length, dim]
      for an entry shared by all heads, where length is max_len, or for a local layer
      min(window, max_len), and size-1 batch and head axes left out. Why separate buffers,
      heads outside positions, and no size-1 axes (each measured on XLA's CPU backend):
      - one buffer per layer: a decoding step writes its new keys and values into its own
        buffer, never copying a layer out of a stacked array;
      - each head's positions contiguous: the attention products read the cache as it lies
        (with the head axis after the position axis XLA transposed the whole cache every
        step: 2.3x slower MHA decoding);
      - no size-1 axes: the products drop them with a reshape, and XLA then fused a second
        copy of the cache update into that reshape and copied the cache three times per
        layer and step (MQA decoding 1.7x slower).
    index: int32 scalar, the number of positions written; the next token goes there.
    starts: None, or for a ragged batch int32 [batch]: row b's sequence starts at slot
      starts[b] (its prompt left-padded by that many slots), so its token in slot s sits at
      position s - starts[b], and slots before starts[b] are never attended to (`for_rows`).
      All rows write at `index` together; only positions and masks differ.
    """

    layers: tuple[dict[str, jax.Array], ...]
    index: jax.Array
    starts: jax.Array | None = None


def cache_entries(config: ModelConfig) -> tuple[CacheEntry, ...]:
    """What `config`'s attention family caches per token and K/V layer."""
    return family(config).cache_entries(config)


def entry_axes(config: ModelConfig, batch_size: int) -> dict[str, str]:
    """Entry name -> its buffers' axes for `batch_size` sequences (`CacheEntry.axes`)."""
    return {entry.name: entry.axes(batch_size) for entry in cache_entries(config)}


def to_cache_axes(x: jax.Array, axes: str) -> jax.Array:
    """New vectors [batch, seq, heads, dim] (heads 1 for a shared entry) -> laid out as `axes`."""
    b, t, kv, d = x.shape
    return jnp.swapaxes(x, 1, 2).reshape([dict(b=b, k=kv, s=t, d=d)[c] for c in axes])


def buffer_length(config: ModelConfig, kv_layer: int, max_len: int) -> int:
    """Positions a K/V layer's buffers hold: max_len, or a local layer's window and sinks."""
    local = config.is_local(kv_layer * config.kv_share_every)
    return min(config.sliding_window + config.attention_sinks, max_len) if local else max_len


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype=None,
               starts: jax.Array | None = None) -> KVCache:
    """An empty cache for `batch_size` sequences of up to `max_len` slots; `starts` int
    [batch_size] for a ragged batch (`KVCache.starts`: row b's prompt left-padded by
    starts[b] slots)."""
    if max_len > config.max_seq_len:
        raise ValueError(f"cache max_len={max_len} exceeds model.max_seq_len={config.max_seq_len}")
    if starts is not None and (config.attention_sinks or config.kv_cache_dtype == "int4"):
        raise ValueError("a ragged batch (starts) does not combine with model.attention_sinks "
                         "(the sink slots hold the batch's first slots, not each row's first "
                         "tokens) or an int4 cache (its key groups span slots, padding included)")
    dtype = jnp.dtype(dtype or config.dtype)
    int8 = config.kv_cache_dtype == "int8"
    int4 = config.kv_cache_dtype == "int4"
    layers = []
    for g in range(config.num_kv_layers):
        length = buffer_length(config, g, max_len)
        buffers = {}
        for entry in cache_entries(config):
            size = dict(b=batch_size, k=entry.heads, s=length, d=entry.dim)
            shape = [size[c] for c in entry.axes(batch_size)]
            if int4:
                shape[entry.axes(batch_size).index("s")] = kv_int4.padded_length(length, config.kv_quant_group)
                for name, (buffer_shape, buffer_dtype) in kv_int4.buffer_shapes(
                        entry.name, shape, entry.axes(batch_size).index("s"), config.kv_quant_group).items():
                    buffers[name] = jnp.zeros(buffer_shape, buffer_dtype or dtype)
                continue
            buffers[entry.name] = jnp.zeros(shape, jnp.int8 if int8 else dtype)
            if int8:
                buffers[f"{entry.name}_scale"] = jnp.zeros(shape[:-1], SCALE_DTYPE)
        layers.append(buffers)
    return KVCache(tuple(layers), jnp.zeros((), jnp.int32),
                   None if starts is None else jnp.asarray(starts, jnp.int32))


def cache_nbytes(cache: KVCache) -> int:
    """Bytes the cache's buffers occupy (int8 scales included)."""
    return sum(a.nbytes for a in jax.tree.leaves(cache.layers))


# ----------------------------------------------------------------------------- int8


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Absmax int8 over the last axis: x [..., d] -> (int8 [..., d], float32 scale [...]),
    scale = max|x| / 127 and x ~ q * scale; an all-zero vector gets scale 0."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    q = jnp.clip(jnp.round(x32 / safe[..., None]), -127, 127).astype(jnp.int8)
    return q, scale.astype(SCALE_DTYPE)


def dequantize(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return (q.astype(jnp.float32) * scale[..., None]).astype(dtype)


# ----------------------------------------------------------------------------- writing


def slot(position: jax.Array, length: int, sinks: int = 0) -> jax.Array:
    """The slot of a ring buffer of `length` slots that holds `position`: p % length, or
    with `sinks` S the first S positions in slots 0..S-1 and the others in a ring of the
    remaining length - S slots."""
    if not sinks:
        return position % length
    return jnp.where(position < sinks, position, sinks + jnp.mod(position - sinks, length - sinks))


def slot_positions(last: jax.Array, length: int, sinks: int = 0) -> jax.Array:
    """int32 [length]: the position each slot of a ring buffer holds once positions up to
    `last` are written (`slot`); a negative number (-1 with sinks) where none has been."""
    slots = jnp.arange(length)
    if not sinks:
        return last - jnp.mod(last - slots, length)
    after = last - sinks  # the newest position, counted from the first the ring holds
    ring = sinks + after - jnp.mod(after - (slots - sinks), length - sinks)
    return jnp.where(slots < sinks, jnp.where(slots <= last, slots, -1),
                     jnp.where(ring >= sinks, ring, -1))


def update(buffers: dict[str, jax.Array], new: dict[str, jax.Array], axes: dict[str, str],
           index: jax.Array, *, ring: bool, dtype, sinks: int = 0
           ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array | None]:
    """Writes a layer's new vectors into its buffers and returns what attention reads.

    buffers: the layer's cache dict. new: entry name -> [batch, seq, heads, dim] (heads 1
      for a shared entry) at positions index .. index + seq - 1; axes: entry name -> its
      buffer's axes (`CacheEntry.axes`). ring: the buffers are a sliding window's ring
      (with `sinks` of its first slots kept for the first positions, `slot`).
    Returns (the updated buffers, entry name -> every cached vector laid out as its buffer
    (dequantized, in `dtype`), the key positions int32 [keys], or None when slot s holds
    position s).

    A ring takes one token by writing it over the oldest slot and reading the ring; a longer
    chunk (a prompt) attends to the ring as it was followed by the chunk itself, and then
    leaves the chunk's last `length` positions in the ring.
    """
    return _update(buffers, new, axes, index, ring=ring, dtype=dtype, sinks=sinks)[:3]


def _update(buffers: dict[str, jax.Array], new: dict[str, jax.Array], axes: dict[str, str],
            index: jax.Array, *, ring: bool, dtype, sinks: int = 0):
    """`update`, and for an int8 cache what it attends to as stored: entry name -> (int8
    values, float32 scales) laid out as the attended arrays (None otherwise), for a reader
    that dequantizes as it reads (`attention.cpu_decode`)."""
    t = next(iter(new.values())).shape[1]
    if kv_int4.holds_int4(buffers):  # never a ring
        group = next(b.shape[axes[n[:-len("_residual")]].index("s")]
                     for n, b in buffers.items() if n.endswith("_residual"))
        new = {name: to_cache_axes(x, axes[name]) for name, x in new.items()}
        updated, attended = kv_int4.update(buffers, new, axes, index, dtype=dtype, group=group)
        return updated, attended, None, None
    int8 = any(name.endswith("_scale") for name in buffers)
    s_axis = {name: axes[name].index("s") for name in new}
    length = {name: buffers[name].shape[s_axis[name]] for name in new}
    stored = {}  # the new vectors as the buffers hold them (quantized for int8)
    for name, x in new.items():
        x = to_cache_axes(x, axes[name])
        stored[name] = quantize(x) if int8 else (x.astype(buffers[name].dtype), None)

    def read(values, scales):
        return dequantize(values, scales, dtype) if int8 else values.astype(dtype)

    updated = dict(buffers)
    if not ring or t == 1:
        for name, (values, scales) in stored.items():
            start = slot(index, length[name], sinks) if ring else index
            at = tuple(start if c == "s" else 0 for c in axes[name])
            updated[name] = jax.lax.dynamic_update_slice(buffers[name], values, at)
            if int8:
                updated[f"{name}_scale"] = jax.lax.dynamic_update_slice(
                    buffers[f"{name}_scale"], scales, at[:-1])
        attended = {name: read(updated[name], updated.get(f"{name}_scale")) for name in new}
        raw = {name: (updated[name], updated[f"{name}_scale"]) for name in new} if int8 else None
        positions = slot_positions(index, length[next(iter(new))], sinks) if ring else None
        return updated, attended, positions, raw

    # A chunk into a ring: attend to [the ring as it was, the chunk], then keep the chunk's tail.
    attended, raw = {}, {} if int8 else None
    for name, (values, scales) in stored.items():
        axis, keep = s_axis[name], min(t, length[name])
        old = read(buffers[name], buffers.get(f"{name}_scale"))
        attended[name] = jnp.concatenate([old, read(values, scales)], axis=axis)
        if int8:
            raw[name] = (jnp.concatenate([buffers[name], values], axis=axis),
                         jnp.concatenate([buffers[f"{name}_scale"], scales], axis=axis))
        if sinks:  # each slot takes the chunk's vector of the position it holds afterwards
            after = slot_positions(index + t - 1, length[name], sinks)
            updated[name] = _gather_write(buffers[name], values, after - index, axis)
            if int8:
                updated[f"{name}_scale"] = _gather_write(buffers[f"{name}_scale"], scales, after - index, axis)
            continue
        slots = jnp.mod(index + t - keep + jnp.arange(keep), length[name])
        updated[name] = _scatter(buffers[name], slots, jax.lax.slice_in_dim(values, t - keep, t, axis=axis), axis)
        if int8:
            updated[f"{name}_scale"] = _scatter(buffers[f"{name}_scale"], slots,
                                                jax.lax.slice_in_dim(scales, t - keep, t, axis=axis), axis)
    first = next(iter(new))
    positions = jnp.concatenate([slot_positions(index - 1, length[first], sinks), index + jnp.arange(t)])
    return updated, attended, positions, raw


def write(buffers: dict[str, jax.Array], new: dict[str, jax.Array], axes: dict[str, str],
          index: jax.Array, *, ring: bool, dtype, sinks: int = 0) -> tuple[dict[str, jax.Array], Keys]:
    """`update`, returning what a layer attends to as `Keys` (CACHED mode): the updated
    buffers and every cached vector with its positions, the queries starting at `index`."""
    buffers, attended, positions, raw = _update(buffers, new, axes, index, ring=ring, dtype=dtype,
                                                sinks=sinks)
    int4 = buffers if kv_int4.holds_int4(buffers) else None
    return buffers, Keys(attended, {name: axes[name] for name in attended}, positions, index, raw, int4)


def for_rows(keys: Keys, starts: jax.Array | None) -> Keys:
    """`keys` as the rows of a ragged batch see them (`KVCache.starts`): each key's position
    per row, int32 [batch, keys], its slot's position less the row's start (-1 for a slot
    before the row's start or never written), and each row's first query position [batch].
    Unchanged where starts is None."""
    if starts is None:
        return keys
    name = next(iter(keys.arrays))
    slots = keys.positions
    if slots is None:
        slots = jnp.arange(keys.arrays[name].shape[keys.axes[name].index("s")])
    rows = slots[None, :] - starts[:, None]
    positions = jnp.where((slots[None, :] >= starts[:, None]) & (slots[None, :] >= 0), rows, -1)
    return dataclasses.replace(keys, positions=positions, q_offset=keys.q_offset - starts)


def _scatter(buffer: jax.Array, slots: jax.Array, values: jax.Array, axis: int) -> jax.Array:
    """buffer with `values` written at indices `slots` along `axis`."""
    return buffer.at[(slice(None),) * axis + (slots,)].set(values)


def _gather_write(buffer: jax.Array, values: jax.Array, offsets: jax.Array, axis: int) -> jax.Array:
    """buffer with slot s along `axis` replaced by values[offsets[s]] where 0 <= offsets[s]
    (the slot now holds one of the chunk's positions) and kept elsewhere."""
    taken = jnp.take(values, jnp.clip(offsets, 0, values.shape[axis] - 1), axis=axis)
    chosen = (offsets >= 0).reshape([-1 if a == axis else 1 for a in range(buffer.ndim)])
    return jnp.where(chosen, taken, buffer)

"""A 4-bit KV cache in the manner of KIVI (Liu et al. 2024), `model.kv_cache_dtype="int4"`.

Keys and values are quantized differently, because their outliers lie differently: keys
have a few channels of large magnitude, values do not. So (asymmetric, min/max, 16 levels):
  - keys per channel, over groups of G consecutive tokens (G = `model.kv_quant_group`):
    each channel of each group gets its own scale and minimum. A group is quantized once
    all its G tokens are written; until then its tokens wait, exact, in a residual buffer
    of G positions, which attention reads in their place;
  - values per token, over groups of G channels.
Two 4-bit numbers are packed into each byte, so a buffer of d numbers per position is
d / 2 bytes; float16 scales and minima come on top, one pair per G numbers
(`accounting.kv_cache_bytes` counts all of it: 0.625 bytes a number at G = 32, against
int8's 1.06 and bfloat16's 2). Grouped attention, without sliding windows (`config.validate`).

Buffers of an entry "k" (keys) and "v" (values), laid out as the entry (`CacheEntry.axes`,
s the position axis, d the last):
  k: uint8 [.., S, d/2], k_scale, k_min: float16 [.., S/G, d], k_residual: [.., G, d]
  v: uint8 [.., S, d/2], v_scale, v_min: float16 [.., S, d/G]
where S is the cache length rounded up to a multiple of G (`padded_length`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LEVELS = 15  # 4 bits: 0..15
STATS_DTYPE = jnp.float16  # scales and minima, as KIVI keeps them
KEY_ENTRIES = ("k",)  # quantized per channel; every other entry per token


def holds_int4(buffers: dict) -> bool:
    """Whether a K/V layer's buffers are an int4 cache's (they have minima)."""
    return any(name.endswith("_min") for name in buffers)


def padded_length(length: int, group: int) -> int:
    """Positions an int4 buffer holds: `length` rounded up to whole key groups."""
    return -(-length // group) * group


def buffer_shapes(name: str, shape: list[int], s_axis: int, group: int) -> dict[str, tuple[list[int], object]]:
    """The buffers (name -> (shape, dtype)) of one entry whose full-precision buffer would
    have `shape` (positions already padded, on axis `s_axis`)."""
    packed = [*shape[:-1], shape[-1] // 2]
    if name in KEY_ENTRIES:
        stats = list(shape)
        stats[s_axis] //= group
        residual = list(shape)
        residual[s_axis] = group
        return {name: (packed, jnp.uint8), f"{name}_scale": (stats, STATS_DTYPE),
                f"{name}_min": (stats, STATS_DTYPE), f"{name}_residual": (residual, None)}
    stats = [*shape[:-1], shape[-1] // group]
    return {name: (packed, jnp.uint8), f"{name}_scale": (stats, STATS_DTYPE),
            f"{name}_min": (stats, STATS_DTYPE)}


def quantize(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Min/max 4-bit quantization of float32 x over `axis` (reduced): (levels 0..15 as
    uint8, scale, minimum), x ~ levels * scale + minimum with scale and minimum rounded to
    float16 first (what is stored is what the levels are computed against); a constant
    slice gets scale 0."""
    low = jnp.min(x, axis=axis, keepdims=True).astype(STATS_DTYPE).astype(jnp.float32)
    high = jnp.max(x, axis=axis, keepdims=True)
    scale = ((high - low) / LEVELS).astype(STATS_DTYPE).astype(jnp.float32)
    safe = jnp.where(scale > 0, scale, 1.0)
    levels = jnp.clip(jnp.round((x - low) / safe), 0, LEVELS).astype(jnp.uint8)
    return levels, jnp.squeeze(scale, axis).astype(STATS_DTYPE), jnp.squeeze(low, axis).astype(STATS_DTYPE)


def pack(levels: jax.Array) -> jax.Array:
    """uint8 levels [..., d] (0..15) -> [..., d/2], two to a byte (even index low)."""
    pairs = levels.reshape(*levels.shape[:-1], -1, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack(packed: jax.Array) -> jax.Array:
    """`pack`'s inverse: [..., d/2] -> levels [..., d] as float32."""
    both = jnp.stack([packed & 15, packed >> 4], axis=-1)
    return both.reshape(*packed.shape[:-1], -1).astype(jnp.float32)


def _grouped(x: jax.Array, axis: int, group: int) -> jax.Array:
    """x with `axis` split into (n, group)."""
    return x.reshape(*x.shape[:axis], x.shape[axis] // group, group, *x.shape[axis + 1:])


def quantize_values(x: jax.Array, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Values [..., d] per token in groups of `group` channels -> (packed, scale, min) with
    scale and min [..., d / group]."""
    levels, scale, low = quantize(_grouped(x.astype(jnp.float32), x.ndim - 1, group), -1)
    return pack(levels.reshape(x.shape)), scale, low


def dequantize_values(packed: jax.Array, scale: jax.Array, low: jax.Array, group: int) -> jax.Array:
    levels = _grouped(unpack(packed), packed.ndim - 1, group)
    scale, low = scale.astype(jnp.float32), low.astype(jnp.float32)
    return (levels * scale[..., None] + low[..., None]).reshape(*packed.shape[:-1], -1)


def quantize_keys(x: jax.Array, s_axis: int, group: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keys [.., n * group (axis s_axis), .., d] per channel over groups of `group` tokens ->
    (packed [.., n * group, .., d/2], scale and min [.., n, .., d])."""
    levels, scale, low = quantize(_grouped(x.astype(jnp.float32), s_axis, group), s_axis + 1)
    return pack(levels.reshape(x.shape)), scale, low


def dequantize_keys(packed: jax.Array, scale: jax.Array, low: jax.Array, s_axis: int,
                    group: int) -> jax.Array:
    levels = _grouped(unpack(packed), s_axis, group)
    scale, low = scale.astype(jnp.float32), low.astype(jnp.float32)
    out = levels * jnp.expand_dims(scale, s_axis + 1) + jnp.expand_dims(low, s_axis + 1)
    return out.reshape(*packed.shape[:-1], -1)


def _set_rows(buffer: jax.Array, start: jax.Array, values: jax.Array, axis: int) -> jax.Array:
    """buffer with values written at rows start.. along `axis`, rows past its end dropped."""
    rows = start + jnp.arange(values.shape[axis])
    return buffer.at[(slice(None),) * axis + (rows,)].set(values, mode="drop")


def write_values(buffers: dict, name: str, x: jax.Array, s_axis: int, index: jax.Array,
                 group: int) -> dict:
    """New values x (laid out as the buffer, t positions on s_axis) quantized at index.."""
    packed, scale, low = quantize_values(x, group)
    at = tuple(index if a == s_axis else 0 for a in range(x.ndim))
    return {name: jax.lax.dynamic_update_slice(buffers[name], packed, at),
            f"{name}_scale": jax.lax.dynamic_update_slice(buffers[f"{name}_scale"], scale, at),
            f"{name}_min": jax.lax.dynamic_update_slice(buffers[f"{name}_min"], low, at)}


def write_keys(buffers: dict, name: str, x: jax.Array, s_axis: int, index: jax.Array,
               group: int) -> dict:
    """New keys x (t positions on s_axis) at index..: the groups they touch (with the
    residual's earlier positions) are quantized and written whole; the group holding the
    next position, incomplete, becomes the residual, exact."""
    t = x.shape[s_axis]
    residual = buffers[f"{name}_residual"]
    first, offset = index // group, index % group
    touched = (t + group - 1) // group + 1  # groups a chunk of t can reach (static)
    staging = jnp.zeros([touched * group if a == s_axis else n for a, n in enumerate(x.shape)],
                        residual.dtype)
    zero = tuple(0 for _ in x.shape)
    staging = jax.lax.dynamic_update_slice(staging, residual, zero)
    staging = jax.lax.dynamic_update_slice(
        staging, x.astype(residual.dtype), tuple(offset if a == s_axis else 0 for a in range(x.ndim)))
    packed, scale, low = quantize_keys(staging, s_axis, group)
    following = (offset + t) // group  # the staging group that holds position index + t
    return {name: _set_rows(buffers[name], first * group, packed, s_axis),
            f"{name}_scale": _set_rows(buffers[f"{name}_scale"], first, scale, s_axis),
            f"{name}_min": _set_rows(buffers[f"{name}_min"], first, low, s_axis),
            f"{name}_residual": jax.lax.dynamic_slice_in_dim(staging, following * group, group, s_axis)}


def read_keys(buffers: dict, name: str, s_axis: int, end: jax.Array, group: int, dtype) -> jax.Array:
    """Every cached key as attention reads it once positions ..end-1 are written: the
    quantized groups dequantized, and the residual's group (the one holding `end`) exact."""
    keys = dequantize_keys(buffers[name], buffers[f"{name}_scale"], buffers[f"{name}_min"], s_axis, group)
    rows = jnp.arange(keys.shape[s_axis])
    start = (end // group) * group
    exact = jnp.take(buffers[f"{name}_residual"].astype(jnp.float32),
                     jnp.clip(rows - start, 0, group - 1), axis=s_axis)
    inside = ((rows >= start) & (rows < start + group)).reshape(
        [-1 if a == s_axis else 1 for a in range(keys.ndim)])
    return jnp.where(inside, exact, keys).astype(dtype)


def update(buffers: dict, new: dict, axes: dict[str, str], index: jax.Array, *, dtype,
           group: int) -> tuple[dict, dict]:
    """`kv_cache.update` for an int4 cache (no ring): (the updated buffers, entry name ->
    every cached vector as attention reads it, in `dtype`)."""
    updated, attended = dict(buffers), {}
    for name, x in new.items():
        s_axis = axes[name].index("s")
        t = x.shape[s_axis]
        if name in KEY_ENTRIES:
            updated.update(write_keys(buffers, name, x, s_axis, index, group))
            attended[name] = read_keys(updated, name, s_axis, index + t, group, dtype)
        else:
            updated.update(write_values(buffers, name, x, s_axis, index, group))
            attended[name] = dequantize_values(updated[name], updated[f"{name}_scale"],
                                               updated[f"{name}_min"], group).astype(dtype)
    return updated, attended

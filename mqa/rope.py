"""Rotary position embeddings (Su et al. 2021), in the "rotate half" layout.

Dimension i of the first half of each head is paired with dimension i of the second half,
the layout of Hugging Face's Llama, so its checkpoints load without permuting weights.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LayerRope(NamedTuple):
    """What one layer's rotary embeddings need, as the layer loop hands it to the attention
    families: the RoPE base (`ModelConfig.layer_rope_theta`; traced in the layer scan) and,
    for latent attention with per-head frequencies, each rotary key's pairs, int
    [rope_key_heads, rope_head_dim / 2] (`ModelConfig.layer_rope_pairs`; None: the highest
    frequencies)."""

    theta: jax.Array | float
    pairs: jax.Array | None = None


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
               frequency_dim: int = 0, pairs: jax.Array | None = None) -> jax.Array:
    """Rotates each (x[i], x[i + d/2]) pair by `position * theta**(-2i/d)`, or with
    `frequency_dim` D > 0 by `position * theta**(-2i/D)`: the d/2 highest frequencies of a
    D-dimensional head (a converted model's kept rotary pairs, `mqa.convert.latent`). With
    `pairs`, pair i of head j turns at the frequency of pair pairs[j, i] of a D-dimensional
    head instead (D = frequency_dim or d): each head its own frequencies, as a conversion
    that keeps each head's most contributing pairs leaves them.

    Args:
      x: [batch, seq, heads, head_dim], head_dim even.
      positions: int [seq] or [batch, seq], the absolute position of each token.
      pairs: int [heads, head_dim / 2], each in 0..D/2 - 1; None: 0..d/2 - 1 for every head.
    Returns:
      [batch, seq, heads, head_dim] in x's dtype (the rotation is computed in float32).
    """
    half = x.shape[-1] // 2
    index = (jnp.arange(half) if pairs is None else jnp.asarray(pairs)).astype(jnp.float32)
    inv_freq = theta ** (-index / (frequency_dim // 2 or half))         # [(heads,) half]
    positions = positions.astype(jnp.float32)
    if pairs is None:  # one set of frequencies for every head
        angles = positions[..., None] * inv_freq                        # [(batch,) seq, half]
        angles = (angles[None] if angles.ndim == 2 else angles)[:, :, None, :]
    else:
        angles = positions[..., None, None] * inv_freq                  # [(batch,) seq, heads, half]
        angles = angles[None] if angles.ndim == 3 else angles
    cos, sin = jnp.cos(angles), jnp.sin(angles)                         # [batch, seq, 1 or heads, half]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def apply_partial_rope(x: jax.Array, positions: jax.Array, theta: float, rope_dim: int) -> jax.Array:
    """`apply_rope` on the last `rope_dim` dimensions of each head only, its frequencies over
    rope_dim (theta**(-2i/rope_dim)); the first head_dim - rope_dim pass unchanged. rope_dim 0
    (or head_dim): every dimension, `apply_rope` itself. x: [batch, seq, heads, head_dim]."""
    if rope_dim in (0, x.shape[-1]):
        return apply_rope(x, positions, theta)
    n = x.shape[-1] - rope_dim
    return jnp.concatenate([x[..., :n], apply_rope(x[..., n:], positions, theta)], axis=-1)

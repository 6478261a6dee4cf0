"""Rotary position embeddings (Su et al. 2021), in the "rotate half" layout.

Dimension i of the first half of each head is paired with dimension i of the second half,
the layout of Hugging Face's Llama, so its checkpoints load without permuting weights.
"""

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0,
               frequency_dim: int = 0) -> jax.Array:
    """Rotates each (x[i], x[i + d/2]) pair by `position * theta**(-2i/d)`, or with
    `frequency_dim` D > 0 by `position * theta**(-2i/D)`: the d/2 highest frequencies of a
    D-dimensional head (a converted model's kept rotary pairs, `mqa.convert.latent`).

    Args:
      x: [batch, seq, heads, head_dim], head_dim even.
      positions: int [seq] or [batch, seq], the absolute position of each token.
    Returns:
      [batch, seq, heads, head_dim] in x's dtype (the rotation is computed in float32).
    """
    half = x.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / (frequency_dim // 2 or half))  # [half]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq        # [(batch,) seq, half]
    if angles.ndim == 2:
        angles = angles[None]
    cos = jnp.cos(angles)[:, :, None, :]                                # [batch, seq, 1, half]
    sin = jnp.sin(angles)[:, :, None, :]
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

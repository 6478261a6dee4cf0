"""RMSNorm (Zhang & Sennrich 2019): the model's block, final and query/key norms, and latent
attention's latent norms.

Two ways to scale (`model.norm_scale`): "weight" multiplies by the stored weight, which
starts at ones (Llama); "one_plus_weight" multiplies by 1 + the stored weight, which starts
at zeros (Gemma, whose checkpoints store w and compute x * (1 + w) in float32).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.model_config import ModelConfig

NORM_SCALES = ("weight", "one_plus_weight")


class RMSNorm(nnx.Module):
    """x / rms(x) * scale (or * (1 + scale), `one_plus_weight`), computed in float32.
    x: [..., dim] -> [..., dim] in x's dtype."""

    def __init__(self, dim: int, eps: float, *, one_plus_weight: bool = False):
        init = jnp.zeros if one_plus_weight else jnp.ones
        self.scale = nnx.Param(init((dim,), jnp.float32))
        self.eps = eps
        self.one_plus_weight = one_plus_weight

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.one_plus_weight:
            return (x32 * (1.0 + self.scale[...])).astype(x.dtype)
        return (x32 * self.scale[...]).astype(x.dtype)


def model_norm(dim: int, config: ModelConfig) -> RMSNorm:
    """An RMSNorm over `dim` numbers scaled as `config.norm_scale` says."""
    return RMSNorm(dim, config.norm_eps, one_plus_weight=config.norm_scale == "one_plus_weight")

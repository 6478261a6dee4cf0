"""Attention families: each one file, each core one function with named einsum dimensions.

  grouped  MHA / GQA / MQA by num_kv_heads (`grouped.py`; its core `core.attend`, and a
           blockwise backend in `blockwise.py`)
  tied     grouped-tied attention, GTA (`tied.py`, core `attend_tied`)
  latent   multi-head latent attention, MLA (`latent.py`, cores `attend_latent_expanded`
           and `attend_latent_absorbed`)
and, for any family, `tiled.py`: causal self-attention over query tiles
(`model.attention_impl="tiled"`).

`family(config)` is the one place that picks a family from `model.attention`. Every
family is an `nnx.Module` built as `Family(config, rngs=..., owns_kv=...)` with
  - `cache_entries(config)`: what it caches per token (`mqa.kv_cache.CacheEntry`s);
  - `__call__(x, positions, cache=None, shared=None, *, index=None, window=None)`:
      x [batch, seq, d_model], positions int [seq];
      cache: the layer's cache buffers (a dict), with `index` the positions already
        written; None in training and evaluation;
      shared: what the group's first layer returned, for a layer that reuses its K/V
        (cross-layer sharing);
      window: a sliding window (None: all earlier positions); with a cache it makes the
        buffers a ring;
    returning ([batch, seq, d_model], the updated buffers or None, what was attended to).
Cache policies (sliding windows, int8) live in `mqa.kv_cache` and apply to every family.
"""

from mqa.attention.core import (attend, attend_jax, attention_fn, causal_mask, dense,
                                masked_softmax, ordered_einsum)
from mqa.attention.grouped import GroupedAttention
from mqa.attention.latent import (LatentAttention, attend_latent_absorbed, attend_latent_expanded,
                                 expand_latent)
from mqa.attention.tied import TiedAttention, attend_tied
from mqa.config import ModelConfig

FAMILIES = {"grouped": GroupedAttention, "tied": TiedAttention, "latent": LatentAttention}


def family(config: ModelConfig) -> type:
    """The attention module class `model.attention` names."""
    if config.attention not in FAMILIES:
        raise ValueError(f"model.attention={config.attention!r} is not one of: {', '.join(FAMILIES)}")
    return FAMILIES[config.attention]


__all__ = [
    "FAMILIES", "GroupedAttention", "LatentAttention", "TiedAttention", "attend", "attend_jax",
    "attend_latent_absorbed", "attend_latent_expanded", "attend_tied", "attention_fn",
    "causal_mask", "dense", "expand_latent", "family", "masked_softmax", "ordered_einsum",
]

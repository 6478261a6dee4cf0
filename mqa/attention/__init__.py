"""Attention families: each one file, each core one function with named einsum dimensions.

  grouped  MHA / GQA / MQA by num_kv_heads (`grouped.py`; its core `core.attend`)
  tied     grouped-tied attention, GTA (`tied.py`, core `attend_tied`)
  latent   multi-head latent attention, MLA (`latent.py`, cores `attend_latent_expanded`
           and `attend_latent_absorbed`)

Every family implements the protocol in `protocol.py`. `FAMILIES` is the one registry of
them and `family(config)` the one place that picks one from `model.attention`; the
backends that run causal self-attention for any family (`model.attention_impl`) are the
registry in `backends.py`. Adding a family is one file implementing `AttentionFamily` plus
its entry here (docs/architecture.md).
"""

from mqa.attention.backends import BACKENDS, self_attention
from mqa.attention.core import attend, attend_jax, causal_mask, dense, masked_softmax, ordered_einsum
from mqa.attention.grouped import GroupedAttention
from mqa.attention.latent import (LatentAttention, attend_latent_absorbed, attend_latent_expanded,
                                 expand_latent)
from mqa.attention.protocol import AttentionFamily, CacheEntry, Keys, Mode
from mqa.attention.tied import TiedAttention, attend_tied
from mqa.model_config import ModelConfig

FAMILIES: dict[str, type[AttentionFamily]] = {
    family.name: family for family in (GroupedAttention, TiedAttention, LatentAttention)}


def family(config: ModelConfig) -> type[AttentionFamily]:
    """The attention family class `model.attention` names."""
    if config.attention not in FAMILIES:
        raise ValueError(f"model.attention={config.attention!r} is not one of: {', '.join(FAMILIES)}")
    return FAMILIES[config.attention]


__all__ = [
    "BACKENDS", "FAMILIES", "AttentionFamily", "CacheEntry", "GroupedAttention", "Keys",
    "LatentAttention", "Mode", "TiedAttention", "attend", "attend_jax", "attend_latent_absorbed",
    "attend_latent_expanded", "attend_tied", "causal_mask", "dense", "expand_latent", "family",
    "masked_softmax", "ordered_einsum", "self_attention",
]

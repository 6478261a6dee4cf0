"""The attention-family protocol: what every family (`grouped.py`, `tied.py`, `latent.py`)
provides, and the values that cross between a family and the model.

A family is an `nnx.Module` subclass of `AttentionFamily`, built as
`Family(config, rngs=..., owns_kv=...)`. It knows its own facts (class methods, from the
config alone) and computes two things (methods):

  validate(config)            raise `ConfigError` for fields the family cannot take
  cache_entries(config)       what it caches per token and K/V layer (`CacheEntry`s)
  param_count(config, owns_kv) one layer's attention weights; norm_count(config) its norms
  key_dim(config)             numbers per query-key dot product (FLOP accounting)
  cached_dims(config)         numbers per key and per value the cached core multiplies
                              (decoding's FLOP accounting)
  mha_equivalent(config)      the same model with MHA, for `match_mha_params`

  queries(x, positions, rope)     the queries, a tuple of arrays [batch, seq, heads, ...]
  project_kv(x, positions, rope)  the vectors to cache: entry name -> [batch, seq, heads, dim]
                              (heads 1 for an entry shared by all heads); rope: the layer's
                              `mqa.rope.LayerRope` (its RoPE base, traced in the layer scan,
                              and a latent layer's per-head rotary pairs)
  attend(queries, keys, *, mode, window, backend) -> [batch, seq, d_model]
                              the family's core over `keys`, then the output projection

The model calls them in this order (queries first: the order autodiff sums the input's
gradient contributions in, which the published runs were trained with).

The model, not the family, writes `project_kv`'s vectors into the cache (`kv_cache.update`)
and hands the same `Keys` to every layer of a cross-layer group, so a family never sees a
cache buffer or another layer. Modes are explicit (`Mode`), never inferred from `None`s.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Callable, ClassVar

import jax
from flax import nnx

if TYPE_CHECKING:  # annotations only: the families import this module, not the model's
    from mqa.model_config import ModelConfig
    from mqa.rope import LayerRope


class Mode(enum.Enum):
    """How a layer attends.

    SELF: training and evaluation: causal self-attention over the sequence's own keys,
      computed from activations (`Keys.layout` "bskd"), queries from position 0, through
      `model.attention_impl`'s backend.
    CACHED: prefill and decoding: the keys are the cache's buffers (laid out as
      `CacheEntry.axes`) and the queries start at `Keys.q_offset`; always the family's own
      einsum core, which reads the buffers as they lie.
    """

    SELF = "self"
    CACHED = "cached"


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One vector a family caches per token: `heads` of them (0: one shared by all heads,
    no head axis) of `dim` numbers."""

    name: str
    heads: int
    dim: int

    def axes(self, batch_size: int) -> str:
        """The buffer's axes in the cores' letters (b batch, k head, s position, d dim):
        "bksd" without "b" or "k" where that axis has size 1 (see `kv_cache.KVCache` for why)."""
        return ("b" if batch_size > 1 else "") + ("k" if self.heads > 1 else "") + "sd"


@dataclasses.dataclass(frozen=True)
class Keys:
    """What a layer attends to: the vectors of its K/V layer (`project_kv`'s entries).

    arrays: entry name -> in SELF mode `project_kv`'s arrays (`of_activations`); in CACHED
      mode the whole buffers, dequantized, laid out as `axes`.
    axes: entry name -> layout letters ("bskd" or "bsd" in SELF mode).
    positions: CACHED mode only: int32 [keys], each key's position where the buffers are a
      ring (-1: a slot not yet written), None where slot s holds position s.
    q_offset: CACHED mode only: the first query's position (the cache index).
    int8: CACHED mode with an int8 cache only: entry name -> (int8 values, float32 scale per
      vector), the same vectors as `arrays` before dequantization, for a core that reads the
      cache as stored (`cpu_decode`); XLA drops whichever of the two a layer does not read.
    int4: CACHED mode with an int4 cache only: the layer's buffers as stored (`mqa.kv_int4`:
      packed levels, float16 scales and minima, the keys' exact residual), likewise.
    """

    arrays: dict[str, jax.Array]
    axes: dict[str, str]
    positions: jax.Array | None = None
    q_offset: jax.Array | int = 0
    int8: dict[str, tuple[jax.Array, jax.Array]] | None = None
    int4: dict[str, jax.Array] | None = None

    @classmethod
    def of_activations(cls, arrays: dict[str, jax.Array], entries: tuple[CacheEntry, ...]) -> "Keys":
        """SELF mode: the keys are this sequence's own projections, `project_kv`'s arrays
        [batch, seq, heads, dim], with an entry shared by all heads (`heads == 0`) as
        [batch, seq, dim] ("bsd")."""
        shared = {entry.name for entry in entries if entry.heads == 0}
        return cls({name: a[:, :, 0] if name in shared else a for name, a in arrays.items()},
                   {name: "bsd" if name in shared else "bskd" for name in arrays})


class AttentionFamily(nnx.Module):
    """The base class of every family; see the module docstring for the protocol."""

    name: ClassVar[str]

    @classmethod
    def validate(cls, config: "ModelConfig") -> None:
        """Raises `ConfigError` naming a field this family cannot take. Default: all fine."""

    @classmethod
    def cache_entries(cls, config: "ModelConfig") -> tuple[CacheEntry, ...]:
        raise NotImplementedError

    @classmethod
    def param_count(cls, config: "ModelConfig", owns_kv: bool) -> int:
        """One layer's attention weights (no norms); `owns_kv=False` for a layer that
        reuses its group's keys and values."""
        raise NotImplementedError

    @classmethod
    def norm_count(cls, config: "ModelConfig") -> int:
        """One layer's attention norm scales (latent attention's). Default: none."""
        return 0

    @classmethod
    def key_dim(cls, config: "ModelConfig") -> int:
        """Numbers in one query-key dot product."""
        return config.head_dim

    @classmethod
    def cached_dims(cls, config: "ModelConfig") -> tuple[int, int]:
        """(numbers per key, numbers per value) each query head multiplies per cached
        position in CACHED mode. Default: `key_dim` and `head_dim`."""
        return cls.key_dim(config), config.head_dim

    @classmethod
    def mha_equivalent(cls, config: "ModelConfig") -> "ModelConfig":
        """The same model with grouped attention and one K/V head per query head, no
        cross-layer sharing (what `match_mha_params` matches)."""
        return dataclasses.replace(config, attention="grouped", num_kv_heads=config.num_heads,
                                   kv_share_every=1)

    def queries(self, x: jax.Array, positions: jax.Array,
                rope: "LayerRope") -> tuple[jax.Array, ...]:
        raise NotImplementedError

    def project_kv(self, x: jax.Array, positions: jax.Array,
                   rope: "LayerRope") -> dict[str, jax.Array]:
        raise NotImplementedError

    def attend(self, queries: tuple[jax.Array, ...], keys: Keys, *, mode: Mode,
               window: jax.Array | int | None, backend: "SelfAttention") -> jax.Array:
        raise NotImplementedError


def sink_options(config: "ModelConfig") -> dict[str, int]:
    """The cores' keyword for `model.attention_sinks` (`core.causal_mask`'s `sinks`), passed
    only when set: without sinks every backend's call stays as it was."""
    return {"sinks": config.attention_sinks} if config.attention_sinks else {}


# A backend's way of running causal self-attention (Mode.SELF) through a family's einsum
# core: backend(core, queries, keys, window=..., **options) -> [batch, seq, ...] (`backends.py`).
SelfAttention = Callable[..., jax.Array]

"""The backend registry: how causal self-attention (`Mode.SELF`: training, evaluation) runs.

`model.attention_impl` names a backend; every family calls it the same way,
`backend(core, queries, keys, window=..., **options)`, with its own einsum core (`core.attend`,
`tied.attend_tied`, `latent.attend_latent_expanded`) and the arrays that core takes per
query and per key; `options` (grouped attention's `score_dim`) go to the core or kernel as
they are. Cached decoding (`Mode.CACHED`) does not go through a backend: each
family's core reads the cache buffers as they lie.

  einsum     the core over the whole [seq, seq] score matrix (any family)
  tiled      the core over query tiles, skipping work above the diagonal (any family; `tiled.py`)
  blockwise  a flash-style online softmax in linear memory (grouped attention; `blockwise.py`)
  xla, cudnn `jax.nn.dot_product_attention` (grouped attention; cuDNN's fused kernel on GPUs)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax

from mqa.attention.blockwise import attend_blockwise
from mqa.attention.core import attend_jax
from mqa.attention.protocol import SelfAttention
from mqa.attention.tiled import over_query_tiles


@dataclasses.dataclass(frozen=True)
class Backend:
    """families: the `model.attention` values it serves (None: every family, through
    the family's core). make(block) -> the `SelfAttention` function, with `block`
    (`model.attention_block`) its tile or block length."""

    make: Callable[[int], SelfAttention]
    families: tuple[str, ...] | None = None


def _whole(core, queries, keys, *, window=None, **options):
    return core(*queries, *keys, q_offset=0, window=window, **options)


def _tiled(block: int) -> SelfAttention:
    def run(core, queries, keys, *, window=None, **options):
        tiled_core = functools.partial(core, **options) if options else core
        return over_query_tiles(tiled_core, queries, keys, block=block, window=window,
                                sinks=options.get("sinks", 0))
    return run


def _grouped_kernel(kernel: Callable[..., jax.Array]) -> SelfAttention:
    """A kernel for grouped attention alone: it replaces the grouped core, which it
    computes, and reads (q,) and (k, v) as that core would."""
    def run(core, queries, keys, *, window=None, **options):
        del core
        return kernel(*queries, *keys, causal=True, q_offset=0, window=window, **options)
    return run


BACKENDS: dict[str, Backend] = {
    "einsum": Backend(lambda block: _whole),
    "tiled": Backend(_tiled),
    "blockwise": Backend(lambda block: _grouped_kernel(functools.partial(attend_blockwise, block=block)),
                         families=("grouped",)),
    "xla": Backend(lambda block: _grouped_kernel(functools.partial(attend_jax, implementation="xla")),
                   families=("grouped",)),
    "cudnn": Backend(lambda block: _grouped_kernel(functools.partial(attend_jax, implementation="cudnn")),
                     families=("grouped",)),
}


def self_attention(impl: str, block: int) -> SelfAttention:
    """The backend `model.attention_impl` names, with its tile or block length."""
    if impl not in BACKENDS:
        raise ValueError(f"model.attention_impl={impl!r} is not one of: {', '.join(BACKENDS)}")
    return BACKENDS[impl].make(block)

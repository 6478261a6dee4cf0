"""Tiled causal attention, `model.attention_impl="tiled"`: any family's core over query tiles.

Full causal self-attention scores a [t, t] matrix whose upper half the mask throws away.
Here the queries go in tiles of `block` positions and tile i attends only to the keys up
to its last position, so n tiles compute (n + 1) / 2n of the score and value products and
of the softmax's elementwise passes (9/16 for 8 tiles), and autodiff keeps only those
probabilities for the backward pass. Each tile is the family's own einsum core
(`core.attend` for grouped attention, `attend_tied`, `attend_latent_expanded`).
With a sliding window whose width is a Python int, key tiles wholly before the band are
skipped too; a traced window (per-layer windows in the layer scan) only masks.

The tiles are a Python loop, unrolled into the program, so their number is capped
(`MAX_TILES`; longer sequences get longer tiles). Memory stays quadratic in the length
(about half of `attend`'s); `blockwise` is the linear-memory core for long sequences.
On 2 CPU cores this is the fastest core for the default config (docs/training-performance.md).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


MAX_TILES = 16


def over_query_tiles(core: Callable[..., jax.Array], queries: tuple[jax.Array, ...],
                     keys: tuple[jax.Array, ...], *, block: int,
                     window: jax.Array | int | None = None, sinks: int = 0) -> jax.Array:
    """Causal self-attention `core(*queries, *keys, q_offset=..., window=window)`
    evaluated one query tile at a time against the keys up to the tile's end.

    queries, keys: arrays [b, t, ...] over the same t positions (q and its rotary part;
    keys, values and whatever else the core reads per key). Tiles are max(block,
    ceil(t / MAX_TILES)) long; the core must take the queries' first position among the
    keys as `q_offset`. Returns the tiles' results [b, t, ...] concatenated.
    """
    t = queries[0].shape[1]
    block = max(block, -(-t // MAX_TILES))
    tiles = []
    for start in range(0, t, block):
        end = min(start + block, t)
        first = max(0, start - window + 1) if isinstance(window, int) and not sinks else 0
        # Queries start..end-1 against keys first..end-1, positions counted from `first`.
        tiles.append(core(*(x[:, start:end] for x in queries), *(x[:, first:end] for x in keys),
                          q_offset=start - first, window=window))
    return jnp.concatenate(tiles, axis=1)

"""Aligned head merging (`mqa.convert uptrain --init aligned`): K/V heads rotated onto each
other on calibration activations before they are mean-pooled.

Mean-pooling averages heads whose coordinates need not correspond: two heads can compute
the same scores in rotated bases, and their mean is then worse than either. Following Jin
et al. (2025, "Align attention heads before merging them"), each head of a merge group is
first rotated onto the others with transforms that leave the model's function unchanged,
and only then averaged:
  - keys: an orthogonal R per K/V head, applied to its key projection and folded into the
    projections of the query heads that read it: q.k = (qR).(kR). For this to survive
    RoPE, R must commute with every rotary rotation: on the rotary dimensions, a 2-D
    rotation inside each frequency's (i, i + r/2) plane (a reflection would reverse the
    plane's rotation); on the dimensions without position (`rope_head_dim`), any
    orthogonal matrix;
  - values: any orthogonal U per K/V head, applied to its value projection with U^T folded
    into the output projection's rows of its query heads.
R and U are generalised Procrustes solutions on calibration keys (before RoPE) and values
(`mqa.convert.calibration`): each head is rotated onto the group's running mean, a few
rounds. We built this rather than an activation least-squares fit of the merged head
because heads of one layer read the same input, so the least-squares fit of their shared
projection is exactly the mean of theirs: the gain can only come from the alignment.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from mqa.config import ModelConfig
from mqa.convert.calibration import check_plain_keys

ALIGN_ROUNDS = 3  # rounds of generalised Procrustes (rotate onto the mean, re-average)


def rope_commuting_rotation(source: np.ndarray, target: np.ndarray, rope_dim: int) -> np.ndarray:
    """float64 [d, d]: the orthogonal R minimising |source @ R - target|_F among those that
    commute with RoPE on the last `rope_dim` dimensions (0: all of them) in the rotate-half
    layout. source, target: [n, d].

    The first d - rope_dim dimensions get the unrestricted Procrustes solution; each rotary
    plane (a, a + rope_dim/2) its best 2-D rotation: with M = source_plane^T target_plane,
    x R(t) for R(t) = [[cos t, -sin t], [sin t, cos t]] matches best at
    t = atan2(M10 - M01, M00 + M11)."""
    d = source.shape[1]
    rope_dim = rope_dim or d
    free = d - rope_dim
    rotation = np.zeros((d, d))
    if free:
        rotation[:free, :free] = scipy.linalg.orthogonal_procrustes(source[:, :free], target[:, :free])[0]
    half = rope_dim // 2
    for i in range(half):
        a, b = free + i, free + half + i
        m = source[:, [a, b]].T @ target[:, [a, b]]
        angle = math.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])
        c, s = math.cos(angle), math.sin(angle)
        rotation[np.ix_([a, b], [a, b])] = [[c, -s], [s, c]]
    return rotation


def generalised_procrustes(heads: list[np.ndarray], solve) -> list[np.ndarray]:
    """Orthogonal transforms [d, d] that bring activations heads[j] [n, d] together: each
    head is rotated (`solve(source, target)`) onto the mean of the rotated heads, starting
    from the first head, for ALIGN_ROUNDS rounds."""
    transforms = [np.eye(heads[0].shape[1]) for _ in heads]
    reference = heads[0]
    for _ in range(ALIGN_ROUNDS):
        transforms = [solve(head, reference) for head in heads]
        reference = np.mean([head @ t for head, t in zip(heads, transforms)], axis=0)
    return transforms


def check_source(config: ModelConfig) -> None:
    """One-line ConvertErrors for a source whose heads cannot be aligned."""
    check_plain_keys(config, "--init aligned", "which rotations do not commute with", "use --init mean")


def align_kv_heads(arrays: dict[str, np.ndarray], config: ModelConfig, inputs: np.ndarray,
                   num_kv_heads: int) -> dict[str, np.ndarray]:
    """The model's parameters (`workdir.params_by_name`) with every K/V head rotated onto the
    others of its merge group (heads g*r .. g*r+r-1, r = num_kv_heads_src / num_kv_heads),
    and the rotations folded into the queries and output rows that read them: the same
    function, ready for mean-pooling (`uptrain.pool_kv_heads`). inputs: the attention
    inputs [num_layers, n, d_model] (`calibration_inputs`)."""
    check_source(config)
    arrays = {name: np.array(a, copy=True) for name, a in arrays.items()}
    q, k, v, out = (arrays[f"blocks.attention.{n}"] for n in ("q", "k", "v", "out"))
    src_kv, group = config.num_kv_heads, config.num_heads // config.num_kv_heads
    size = src_kv // num_kv_heads
    rope_dim = config.rope_head_dim

    def key_rotation(source, target):
        return rope_commuting_rotation(source, target, rope_dim)

    def value_rotation(source, target):
        return scipy.linalg.orthogonal_procrustes(source, target)[0]

    for layer in range(config.num_layers):
        x = inputs[layer].astype(np.float64)
        for merged in range(num_kv_heads):
            members = range(merged * size, (merged + 1) * size)
            keys = [x @ k[layer, :, j].astype(np.float64) for j in members]
            values = [x @ v[layer, :, j].astype(np.float64) for j in members]
            for j, r, u in zip(members, generalised_procrustes(keys, key_rotation),
                               generalised_procrustes(values, value_rotation)):
                heads = slice(j * group, (j + 1) * group)
                k[layer, :, j] = k[layer, :, j] @ r
                q[layer, :, heads] = np.einsum("mhd,de->mhe", q[layer, :, heads], r)
                v[layer, :, j] = v[layer, :, j] @ u
                out[layer, heads] = np.einsum("de,hdm->hem", u, out[layer, heads])  # U^T out
    return arrays


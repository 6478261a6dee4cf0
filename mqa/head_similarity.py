"""Which heads attend alike, and grouping K/V heads by it for uptraining.

Sharing K/V heads costs little because many heads of a layer attend alike. This module
measures it per layer, on a text, two ways:
  - attention patterns: for query heads i and j, the Jensen-Shannon divergence (bits, in
    [0, 1]) between their attention distributions over the keys, averaged over the query
    positions and sequences. A K/V head's pattern is its query heads' (in GQA, the mean
    divergence over all pairs of their query heads);
  - projections: the cosine similarity of two K/V heads' key (and value) weight matrices
    [d_model, head_dim], flattened.

`similarity_groups` then partitions each layer's K/V heads into groups of equal size with
the least divergence inside the groups, and `permute_heads` reorders the heads so those
groups become adjacent, the layout that `mqa.convert.uptrain.pool_kv_heads` pools. Reordering heads
(K/V heads together with their query heads and the output rows that read them) leaves the
model's function unchanged.
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator

import jax.numpy as jnp
import numpy as np
import scipy.special
from flax import nnx

from mqa.attention import causal_mask
from mqa.model_config import ModelConfig
from mqa.model import Transformer
from mqa.rope import apply_partial_rope


# ----------------------------------------------------------------------------- measuring


def layer_attention_probs(model: Transformer, tokens: np.ndarray) -> Iterator[np.ndarray]:
    """Each layer's causal attention probabilities, float64 [batch, num_heads, t, t], in
    the order the layers run (with cross-layer sharing, a group's first layer and then the
    layers that reuse its keys). tokens: int [batch, t]. Grouped attention only.

    The model's own layer loop gives each layer's attention input (`attention_inputs`);
    the queries and keys are projected from it here and scored in float64."""
    config = model.config
    tokens = jnp.asarray(tokens, jnp.int32)
    t = tokens.shape[1]
    positions = jnp.arange(t)
    _, inputs = model(tokens, attention_inputs=True)  # [num_layers, batch, t, m]
    group, s = config.num_heads // config.num_kv_heads, config.kv_share_every
    blocks = nnx.state(model.blocks)["attention"]
    shared = nnx.state(model.shared_blocks)["attention"] if s > 1 else None
    mask = np.asarray(causal_mask(t, t))
    for layer in range(config.num_layers):
        g, j = divmod(layer, s)
        h = inputs[layer]
        if j == 0:
            keys = apply_partial_rope(jnp.einsum("btm,mkd->btkd", h, blocks["k"][...][g]), positions,
                                      config.rope_theta, config.rope_head_dim)
        q_weight = blocks["q"][...][g] if j == 0 else shared["q"][...][g * (s - 1) + j - 1]
        q = apply_partial_rope(jnp.einsum("btm,mhd->bthd", h, q_weight), positions, config.rope_theta,
                               config.rope_head_dim)
        q = q.reshape(*q.shape[:2], config.num_kv_heads, group, config.head_dim)
        logits = np.einsum("btkgd,bskd->bkgts", np.asarray(q, np.float64),
                           np.asarray(keys, np.float64)) / math.sqrt(config.head_dim)
        logits = np.where(mask, logits, -np.inf)
        yield scipy.special.softmax(logits, axis=-1).reshape(tokens.shape[0], config.num_heads, t, t)


def js_divergence_matrix(probs: np.ndarray) -> np.ndarray:
    """float64 [heads, heads]: mean Jensen-Shannon divergence (base 2) between the heads'
    attention rows. probs: [batch, heads, t, s], each row a distribution over s."""
    heads = probs.shape[1]
    logs = np.log2(np.where(probs > 0, probs, 1.0))
    matrix = np.zeros((heads, heads))
    for i, j in itertools.combinations(range(heads), 2):
        p, q = probs[:, i], probs[:, j]
        m = 0.5 * (p + q)
        log_m = np.log2(np.where(m > 0, m, 1.0))
        js = 0.5 * np.sum(p * (logs[:, i] - log_m) + q * (logs[:, j] - log_m), axis=-1)
        matrix[i, j] = matrix[j, i] = float(np.mean(js))
    return matrix


def kv_head_divergence(query_divergence: np.ndarray, num_kv_heads: int) -> np.ndarray:
    """[query heads, query heads] -> [K/V heads, K/V heads]: the mean divergence between the
    query heads of two K/V heads (0 on the diagonal). For MHA it is the input."""
    heads = query_divergence.shape[0]
    group = heads // num_kv_heads
    blocks = query_divergence.reshape(num_kv_heads, group, num_kv_heads, group).mean(axis=(1, 3))
    np.fill_diagonal(blocks, 0.0)
    return blocks


def projection_similarity(kernel: np.ndarray) -> np.ndarray:
    """Cosine similarity [kv, kv] of K/V heads' weights. kernel: [d_model, kv, head_dim]."""
    flat = np.moveaxis(np.asarray(kernel, np.float64), 1, 0).reshape(kernel.shape[1], -1)
    flat /= np.linalg.norm(flat, axis=1, keepdims=True)
    return flat @ flat.T


def analyse(model: Transformer, tokens: np.ndarray) -> list[dict]:
    """Per layer: {"layer", "kv_group", "query_js" [h, h], "kv_js" [kv, kv],
    "key_cosine" and "value_cosine" [kv, kv] (of the K/V group's first layer)}."""
    config = model.config
    per_group = config.kv_share_every
    weights = nnx.state(model.blocks)
    layers = []
    for index, probs in enumerate(layer_attention_probs(model, tokens)):
        g = index // per_group
        query_js = js_divergence_matrix(probs)
        layers.append({
            "layer": index, "kv_group": g, "query_js": query_js,
            "kv_js": kv_head_divergence(query_js, config.num_kv_heads),
            "key_cosine": projection_similarity(np.asarray(weights["attention"]["k"][...][g])),
            "value_cosine": projection_similarity(np.asarray(weights["attention"]["v"][...][g])),
        })
    return layers


# ----------------------------------------------------------------------------- grouping


def _partitions(items: tuple[int, ...], size: int) -> Iterator[list[tuple[int, ...]]]:
    """Every partition of `items` into groups of `size` (groups in order of their smallest
    item, so each partition comes once)."""
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for others in itertools.combinations(rest, size - 1):
        group = (first, *others)
        remaining = tuple(i for i in rest if i not in others)
        for tail in _partitions(remaining, size):
            yield [group, *tail]


def _count_partitions(n: int, size: int) -> int:
    return math.factorial(n) // (math.factorial(size) ** (n // size) * math.factorial(n // size))


def within_group_cost(divergence: np.ndarray, groups: list[tuple[int, ...]]) -> float:
    """The sum of the divergences of all pairs of heads that share a group."""
    return float(sum(divergence[i, j] for g in groups for i, j in itertools.combinations(g, 2)))


def similarity_groups(divergence: np.ndarray, num_groups: int,
                      exhaustive_limit: int = 200_000) -> list[tuple[int, ...]]:
    """Heads 0..n-1 in `num_groups` groups of n / num_groups with the least summed
    divergence inside the groups: the exact optimum when there are at most
    `exhaustive_limit` partitions (8 heads in pairs: 105), else greedily, each group
    seeded with the closest remaining pair. Groups sorted by their smallest head."""
    n = divergence.shape[0]
    if num_groups < 1 or n % num_groups:
        raise ValueError(f"{n} heads cannot form {num_groups} groups of equal size")
    size = n // num_groups
    if size == 1:
        return [(i,) for i in range(n)]
    if _count_partitions(n, size) <= exhaustive_limit:
        return min(_partitions(tuple(range(n)), size),
                   key=lambda groups: within_group_cost(divergence, groups))
    left, groups = set(range(n)), []
    while left:
        i, j = min(itertools.combinations(sorted(left), 2), key=lambda p: divergence[p])
        group = [i, j]
        while len(group) < size:
            group.append(min(left - set(group), key=lambda h: sum(divergence[h, g] for g in group)))
        groups.append(tuple(sorted(group)))
        left -= set(group)
    return sorted(groups)


def permute_heads(arrays: dict[str, np.ndarray], config: ModelConfig,
                  orders: list[list[int]]) -> dict[str, np.ndarray]:
    """Parameters (dotted names, as `mqa.workdir.params_by_name`) with each K/V group's heads
    reordered: K/V head `orders[g][i]` of K/V layer g becomes head i, and with it its query
    heads and their output rows, in every layer that reads that K/V. The model computes the
    same function.

    orders: per K/V layer (`config.num_kv_layers`), a permutation of range(num_kv_heads).
    """
    group = config.num_heads // config.num_kv_heads
    per_group = config.kv_share_every - 1
    out = dict(arrays)

    def query_order(order):  # query head k * group + j follows its K/V head k
        return [k * group + j for k in order for j in range(group)]

    for name in ("blocks.attention.k", "blocks.attention.v"):
        out[name] = np.stack([a[:, order] for a, order in zip(arrays[name], orders)])
    for prefix, layer_group in (("blocks", lambda l: l),
                                ("shared_blocks", lambda l: l // max(per_group, 1))):
        if f"{prefix}.attention.q" not in arrays:
            continue
        q, o = arrays[f"{prefix}.attention.q"], arrays[f"{prefix}.attention.out"]
        heads = [query_order(orders[layer_group(l)]) for l in range(q.shape[0])]
        out[f"{prefix}.attention.q"] = np.stack([q[l][:, h] for l, h in enumerate(heads)])
        out[f"{prefix}.attention.out"] = np.stack([o[l][h] for l, h in enumerate(heads)])
    return out


def kv_group_orders(layers: list[dict], config: ModelConfig, num_kv_heads: int) -> list[list[int]]:
    """Per K/V layer, the order of its K/V heads that puts each `similarity_groups` group
    (by the mean attention divergence over the layers that read that K/V) side by side."""
    orders = []
    for g in range(config.num_kv_layers):
        divergence = np.mean([layer["kv_js"] for layer in layers if layer["kv_group"] == g], axis=0)
        orders.append([h for group in similarity_groups(divergence, num_kv_heads) for h in group])
    return orders

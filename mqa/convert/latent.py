"""Grouped attention rewritten as latent attention (`mqa.convert uptrain --attention latent
--kv_latent_dim C --rope_head_dim P [--rope_keys per_head|mixed] [--rope_pairs
high|contribution] --text FILE`): MHA2MLA's and TransMLA's route.

A grouped layer caches, per token and K/V head, a key of d numbers that RoPE rotates and a
value of d. The conversion splits each key head's rotary pairs in two:
  - kept: P/2 pairs stay rotary, turning at the frequencies they turned at in the source
    (`model.rope_frequency_dim`; `model.rope_pairs` where they are not the highest).
    Which pairs (`choose_pairs`): with rope_pairs "high" the highest frequencies
    (MHA2MLA's S_high), with "contribution" per key the pairs with the largest 2-norm
    contribution to the calibration scores (`pair_contributions`, MHA2MLA's S_2-norm,
    its best strategy), each K/V head its own. With rope_keys "per_head" (MHA2MLA's
    partial RoPE) each K/V head keeps its pairs as its own rotary key
    (`model.rope_key_heads` = K; exact), the query heads' same dimensions becoming their
    rotary queries; with "mixed" (TransMLA's RoRoPE, `mixed_rotary`) the K/V heads are
    mixed per frequency into one rotary key for all heads (the pairs chosen by their
    contribution summed over heads), and what that key does not hold joins the dropped
    dimensions.
  - dropped: the other key dimensions turn no more and join the values. They and the
    values (d per K/V head) are all linear in the layer's input x, so together they are
    x @ W for one matrix W [m, n]. Their principal subspace on calibration text (the top C
    eigenvectors U of W^T X^T X W, the best rank-C approximation of the calibration rows
    x @ W) becomes the latent: kv_down = W U [m, C], and U^T splits into each query head's
    k_up and v_up.
The cache holds C + K P numbers per token and layer (C + P with one mixed key), against
the source's 2 K d. What is approximate: the dropped dimensions' rotation (small for a
pair that turns little over the context or contributes little to the scores), and the
latent when C < n. Keeping every rotary pair per head with C >= n (for a source that
rotates whole heads, a cache as large as the source's) computes the source's function
(`tests/test_convert_latent.py`).

Per-head rotary keys leave each query and key n = d - P non-rotary numbers
(`model.qk_nope_dim`: the source's d per score, split); a mixed key leaves them all d, the
kept dimensions' remainder among them. The latent family's scores divide by sqrt(n + P)
where the source's divide by sqrt(score_dim); the difference is folded into the query
weights. The latent has no norm (`model.kv_latent_norm=False`: it must stay linear in x).
"""

from __future__ import annotations

import numpy as np

from mqa.config import ModelConfig
from mqa.convert.calibration import check_plain_keys
from mqa.convert.errors import ConvertError

PREFIX = "blocks.attention."


def check(source: ModelConfig, kv_latent_dim: int | None, rope_head_dim: int | None,
          rope_keys: str = "per_head", rope_pairs: str = "high") -> tuple[int, int]:
    """(C, P) after one-line ConvertErrors for what the conversion cannot take; P defaults
    to the source's rotary width (every pair kept)."""
    if rope_keys not in ROPE_KEYS:
        raise ConvertError(f"--rope_keys {rope_keys!r} is not one of: {', '.join(ROPE_KEYS)}")
    if rope_pairs not in ROPE_PAIRS:
        raise ConvertError(f"--rope_pairs {rope_pairs!r} is not one of: {', '.join(ROPE_PAIRS)}")
    check_plain_keys(source, "--attention latent", "which a linear latent cannot hold",
                     "convert a source without them")
    rotary = source.rope_head_dim or source.head_dim
    p = rotary if rope_head_dim is None else rope_head_dim
    if p < 2 or p % 2 or p > rotary:
        raise ConvertError(f"--rope_head_dim {p} must be even and in 2..{rotary} (the source's "
                           "rotary dimensions per head; the rest of each key joins the latent)")
    if kv_latent_dim is None or kv_latent_dim < 1:
        raise ConvertError(f"--attention latent needs --kv_latent_dim >= 1 (numbers cached per token "
                           f"besides the rotary keys), got {kv_latent_dim}")
    return kv_latent_dim, p


def nope_dim(source: ModelConfig, rope_head_dim: int, rope_keys: str) -> int:
    """n, the converted queries' and keys' non-rotary numbers per head: d - P with per-head
    rotary keys, d with a mixed key, and d (zeros) where per-head keys keep every dimension."""
    d = source.head_dim
    return d - rope_head_dim if rope_keys == "per_head" and rope_head_dim < d else d


def target_fields(source: ModelConfig, kv_latent_dim: int, rope_head_dim: int,
                  rope_keys: str = "per_head") -> dict:
    """The model fields of the converted config."""
    rotary = source.rope_head_dim or source.head_dim
    n = nope_dim(source, rope_head_dim, rope_keys)
    return dict(attention="latent", kv_latent_dim=kv_latent_dim, rope_head_dim=rope_head_dim,
                rope_key_heads=1 if rope_keys == "mixed" else source.num_kv_heads,
                kv_latent_norm=False, q_latent_dim=0, attention_score_dim=0,
                qk_nope_dim=0 if n == source.head_dim else n,
                rope_frequency_dim=rotary if rope_head_dim < rotary else 0)


def pair_contributions(q: np.ndarray, k: np.ndarray, x: np.ndarray, config: ModelConfig) -> np.ndarray:
    """MHA2MLA's 2-norm measure of what each rotary pair contributes to the scores: for pair
    i of K/V head j, the sum over the query heads h that read it of |q_h,i| |k_j,i|, each
    the norm of the pair's calibration rows (both dimensions, all tokens). q [m, h, d],
    k [m, kv, d], x [n, m] -> [kv, rotary / 2]."""
    d, kv = config.head_dim, k.shape[1]
    rotary = config.rope_head_dim or d
    first, half = d - rotary, rotary // 2
    qn = np.sqrt(np.sum(np.einsum("nm,mhd->nhd", x, q) ** 2, axis=0))   # [h, d]: per-dim norms
    kn = np.sqrt(np.sum(np.einsum("nm,mkd->nkd", x, k) ** 2, axis=0))   # [kv, d]

    def pairs(norms):  # [heads, d] -> [heads, half]: each pair's two dimensions together
        return np.hypot(norms[:, first:first + half], norms[:, first + half:])

    per_query = pairs(qn) * np.repeat(pairs(kn), q.shape[1] // kv, axis=0)  # [h, half]
    return per_query.reshape(kv, -1, half).sum(axis=1)


def choose_pairs(scores: np.ndarray, keep: int, strategy: str, keys: int) -> np.ndarray:
    """Which rotary pairs stay rotary, int [keys, keep] in ascending order: "high" the
    `keep` highest frequencies (pairs 0..keep-1) for every key; "contribution" (MHA2MLA's
    2-norm strategy) the `keep` pairs with the largest `pair_contributions` `scores` [kv,
    half], per K/V head (keys = kv) or summed over heads for one mixed key (keys = 1)."""
    if strategy == "high":
        return np.tile(np.arange(keep), (keys, 1))
    scores = scores if keys == len(scores) else scores.sum(axis=0, keepdims=True)
    return np.sort(np.argsort(-scores, axis=1, kind="stable")[:, :keep], axis=1)


def split_dims(config: ModelConfig, pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, dropped): for each key in `pairs` [keys, P/2] (`choose_pairs`), indices into a
    source head's d dimensions. kept [keys, P]: its pairs in the rotate-half layout (first
    halves, then second halves), so that they rotate as a P-dim head at the frequencies
    they turned at in the source; dropped [keys, d - P]: the rest, in order."""
    d = config.head_dim
    first, half = d - (config.rope_head_dim or d), (config.rope_head_dim or d) // 2
    kept = np.concatenate([first + pairs, first + half + pairs], axis=1)
    dropped = np.stack([np.setdiff1d(np.arange(d), row) for row in kept])
    return kept, dropped


def per_head_rotary(q: np.ndarray, k: np.ndarray, x: np.ndarray, kept: np.ndarray,
                    dropped: np.ndarray) -> tuple[np.ndarray, ...]:
    """MHA2MLA's split of one layer: each K/V head keeps its own kept pairs as a rotary key,
    its query heads their same dimensions as their rotary queries. q [m, h, d], k [m, kv,
    d], kept [kv, P], dropped [kv, n] (`split_dims`; n = d - P) -> (query nope [m, h, n],
    query rotary [m, h, P], rotary keys [m, kv * P], key nope [m, kv, n], the share of the
    kept pairs' calibration energy the rotary keys hold: 1)."""
    del x
    key_head = np.arange(q.shape[1]) // (q.shape[1] // k.shape[1])  # the K/V head each query head reads
    take = lambda a, index: np.take_along_axis(a, index[None], axis=2)  # noqa: E731
    return (take(q, dropped[key_head]), take(q, kept[key_head]), take(k, kept).reshape(k.shape[0], -1),
            take(k, dropped), 1.0)


def mixed_rotary(q: np.ndarray, k: np.ndarray, x: np.ndarray, kept: np.ndarray,
                 dropped: np.ndarray) -> tuple[np.ndarray, ...]:
    """TransMLA's split (RoRoPE) of one layer: one rotary key for all heads. For each kept
    pair, the K/V heads' 2-vectors are mixed by the top eigenvector u of their calibration
    covariance across heads (summed over the pair's two components, so that the mixing
    acts alike on both and commutes with the rotation): the rotary key is sum_j u_j k_j,
    query head h of K/V head j meets it with u_j q_h, and what the key head keeps besides,
    k_j - u_j sum_i u_i k_i, joins the latent without rotation. Exact when the heads' kept
    pairs are proportional to each other (an MQA source among them). kept [1, P], dropped
    unused; the shapes of `per_head_rotary` with kv * P -> P and n = d, and the share of the
    kept pairs' calibration energy the mixed key holds (the top eigenvalues' share)."""
    del dropped
    m, h, d = q.shape
    kept = kept[0]
    kv, half = k.shape[1], len(kept) // 2
    group = h // kv
    mixing, held, total = np.zeros((half, kv)), 0.0, 0.0
    for i in range(half):
        pair = [kept[i], kept[half + i]]
        heads = np.einsum("nm,mkc->nkc", x, k[:, :, pair])            # [tokens, kv, 2]
        eigenvalues, vectors = np.linalg.eigh(np.einsum("nkc,njc->kj", heads, heads))
        mixing[i], held, total = vectors[:, -1], held + eigenvalues[-1], total + eigenvalues.sum()
    u = np.concatenate([mixing, mixing])                              # [P, kv]: per kept dim
    rotary_key = np.einsum("mkp,pk->mp", k[:, :, kept], u)            # [m, P]
    key_nope = k.copy()
    key_nope[:, :, kept] -= np.einsum("pk,mp->mkp", u, rotary_key)
    query_rotary = q[:, :, kept] * np.repeat(u.T, group, axis=0)[None]  # [m, h, P]
    return q, query_rotary, rotary_key, key_nope, float(held / total)


# --rope_keys: MHA2MLA's rotary key per K/V head, or TransMLA's one key mixed from all heads
ROTARY_SPLITS = {"per_head": per_head_rotary, "mixed": mixed_rotary}
ROPE_KEYS = tuple(ROTARY_SPLITS)
# --rope_pairs: which rotary pairs stay rotary (`choose_pairs`)
ROPE_PAIRS = ("high", "contribution")


def to_latent(arrays: dict[str, np.ndarray], config: ModelConfig, inputs: np.ndarray,
              kv_latent_dim: int, rope_head_dim: int, rope_keys: str = "per_head",
              rope_pairs: str = "high") -> tuple[dict[str, np.ndarray], dict]:
    """The source's parameters (`workdir.params_by_name`) with each layer's grouped
    attention rewritten as latent attention (the module docstring; rope_keys "mixed":
    `mixed_rotary`; rope_pairs: `choose_pairs`), every other parameter unchanged; and what
    the conversion kept: the latent's share of the calibration rows' energy, the kept
    rotary pairs' share of the 2-norm contribution, (mixed) the mixed key's share of the
    kept pairs' energy, each averaged over layers, and "pairs": the kept pairs, int
    [layers, keys, P/2] (the converted config's `model.rope_pairs`), or None where they are
    the highest frequencies of every key. inputs: the attention inputs
    [num_layers, n, d_model] (`calibration`)."""
    q, k, v = (np.asarray(arrays[PREFIX + name], np.float64) for name in ("q", "k", "v"))
    arrays = {name: a for name, a in arrays.items() if name not in (PREFIX + "k", PREFIX + "v")}
    layers, m, h, d = q.shape
    kv, group, c, p = config.num_kv_heads, config.group_size, kv_latent_dim, rope_head_dim
    keys = 1 if rope_keys == "mixed" else kv
    split = ROTARY_SPLITS[rope_keys]
    nope = nope_dim(config, p, rope_keys)
    scale = np.sqrt((nope + p) / config.score_dim)  # the latent core divides by sqrt(n + P)
    out = {name: np.zeros(shape) for name, shape in dict(
        q=(layers, m, h, nope), q_rope=(layers, m, h, p), k_rope=(layers, m, keys * p),
        kv_down=(layers, m, c), k_up=(layers, c, h, nope), v_up=(layers, c, h, d)).items()}
    energy, contribution, mixed, chosen = [], [], [], []
    for layer in range(layers):
        x = inputs[layer].astype(np.float64)
        scores = pair_contributions(q[layer], k[layer], x, config)     # [kv, half]
        pairs = choose_pairs(scores, p // 2, rope_pairs, keys)           # [keys, P/2]
        chosen.append(pairs)
        kept_score = np.take_along_axis(scores, pairs, axis=1) if keys == kv else scores[:, pairs[0]]
        contribution.append(float(kept_score.sum() / scores.sum()))
        kept, dropped = split_dims(config, pairs)
        q_nope, q_rotary, out["k_rope"][layer], key_nope, share = split(q[layer], k[layer], x, kept, dropped)
        mixed.append(share)
        n = key_nope.shape[-1]  # d - P (0 when per-head keys keep all d), or d for a mixed key
        out["q"][layer, :, :, :n] = q_nope * scale
        out["q_rope"][layer] = q_rotary * scale
        joint = np.concatenate([key_nope.reshape(m, -1), v[layer].reshape(m, -1)], axis=1)
        rows = x @ joint                                             # [tokens, kv * (n + d)]
        eigenvalues, vectors = np.linalg.eigh(rows.T @ rows)         # ascending
        basis = np.zeros((joint.shape[1], c))
        width = min(c, joint.shape[1])
        basis[:, :width] = vectors[:, ::-1][:, :width]               # the top C directions
        energy.append(float(eigenvalues[::-1][:width].sum() / eigenvalues.sum()))
        out["kv_down"][layer] = joint @ basis
        up = basis.T                                                 # [C, n]: key nope, then values
        key_up = up[:, :kv * n].reshape(c, kv, n)
        values = up[:, kv * n:].reshape(c, kv, d)
        out["k_up"][layer, :, :, :n] = np.repeat(key_up, group, axis=1)
        out["v_up"][layer] = np.repeat(values, group, axis=1)
    arrays.update({PREFIX + name: a.astype(np.float32) for name, a in out.items()})
    table = np.stack(chosen)
    highest = np.array_equal(table, np.broadcast_to(np.arange(p // 2), table.shape))
    return arrays, dict(latent_energy=float(np.mean(energy)), rotary_kept=float(np.mean(contribution)),
                        rotary_mixed=float(np.mean(mixed)), pairs=None if highest else table)

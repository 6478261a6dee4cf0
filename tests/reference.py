"""Independent float64 NumPy references the tests compare against."""

import numpy as np


def attention_loops(q, k, v, *, causal=True, q_offset=None):
    """Attention written head by head: query head h reads K/V head h // group.

    q: [batch, q_len, heads, dim]; k, v: [batch, kv_len, kv_heads, dim] -> [batch, q_len, heads, dim].
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, q_len, heads, dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    offset = kv_len - q_len if q_offset is None else q_offset
    out = np.zeros_like(q)
    for h in range(heads):
        kh = h // group
        logits = np.einsum("btd,bsd->bts", q[:, :, h], k[:, :, kh]) / np.sqrt(dim)
        if causal:
            allowed = np.arange(kv_len)[None, :] <= (offset + np.arange(q_len))[:, None]
            logits = np.where(allowed[None], logits, -np.inf)
        logits -= logits.max(axis=-1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=-1, keepdims=True)
        out[:, :, h] = np.einsum("bts,bsd->btd", probs, v[:, :, kh])
    return out


def rope(x, positions, theta):
    """Rotary embeddings, pairing dimension i with i + d/2. x: [batch, seq, heads, dim]."""
    half = x.shape[-1] // 2
    angles = np.asarray(positions, np.float64)[:, None] * theta ** (-np.arange(half) / half)
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def transformer_loops(layers, embed, final_scale, tokens, *, kv_share_every=1, theta=10000.0,
                      eps=1e-5):
    """The language model's logits (tied embeddings), one layer after another.

    layers: a list, in order, of dicts with `attention_norm`, `q`, `out`, `mlp_norm`,
      `gate`, `up`, `down`, and `k`, `v` for each layer whose index is a multiple of
      `kv_share_every`; the layers between reuse the keys and values that layer computed.
    tokens: int [batch, seq] -> float64 logits [batch, seq, vocab].
    """
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    norm = lambda x, scale: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * f64(scale)  # noqa: E731
    x = f64(embed)[np.asarray(tokens)]
    positions = np.arange(x.shape[1])
    for i, layer in enumerate(layers):
        h = norm(x, layer["attention_norm"])
        q = rope(np.einsum("btm,mhd->bthd", h, f64(layer["q"])), positions, theta)
        if i % kv_share_every == 0:
            k = rope(np.einsum("btm,mkd->btkd", h, f64(layer["k"])), positions, theta)
            v = np.einsum("btm,mkd->btkd", h, f64(layer["v"]))
        x = x + np.einsum("bthd,hdm->btm", attention_loops(q, k, v), f64(layer["out"]))
        h = norm(x, layer["mlp_norm"])
        gate, up = h @ f64(layer["gate"]), h @ f64(layer["up"])
        x = x + (gate / (1 + np.exp(-gate)) * up) @ f64(layer["down"])
    return norm(x, final_scale) @ f64(embed).T

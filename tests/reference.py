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

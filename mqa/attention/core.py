"""The grouped attention core: multi-head, grouped-query and multi-query attention.

`num_kv_heads` key/value heads serve `num_heads` query heads in groups of
`group = num_heads // num_kv_heads`: query head `h` reads K/V head `h // group`.
`num_kv_heads == num_heads` is MHA, `1` is MQA (Shazeer 2019), anything between is GQA
(Ainslie et al. 2023). Also the pieces every family shares: which keys a query sees
(`causal_mask`, with a sliding window), a masked softmax, and `dense`. Dimension letters:

  b batch, t query position, s key position, k K/V head, g query head within its group,
  d head dimension, h query head (= k * group + g), m model dimension.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
           q_offset: jax.Array | int | None = None, kv_layout: str = "bskd",
           window: jax.Array | int | None = None, k_positions: jax.Array | None = None,
           score_dim: int | None = None, sinks: int = 0) -> jax.Array:
    """Softmax attention with K/V heads shared by groups of query heads.

    Args:
      q: [batch, q_len, num_heads, head_dim].
      k, v: [batch, kv_len, num_kv_heads, head_dim] ("bskd"), or laid out as the KV cache
        (`kv_cache.cache_axes`): "bksd", [batch, num_kv_heads, kv_len, head_dim], with
        the batch and head axes left out where they have size 1 ("bsd" for MQA).
        num_kv_heads divides num_heads.
      causal: query i attends to keys at positions <= its own.
      q_offset: position of the first query among the keys (may be traced). Defaults to
        kv_len - q_len: the queries are the last q_len positions (the decoding convention).
      window, k_positions, sinks: see `causal_mask` (a sliding window; keys in a ring
        buffer; attention sinks).
      score_dim: the scores are q.k / sqrt(score_dim); default head_dim (Gemma's
        query_pre_attn_scalar may differ, `ModelConfig.score_dim`).
    Returns:
      [batch, q_len, num_heads, head_dim] in q's dtype. Logits and softmax are float32.

    The two products, for keys as in training ("bskd") and an MQA cache ("bsd"):
      scores  "bskd,btkgd->bkgts"   "bsd,btgd->bgts"    (keys on the left)
      output  "bkgts,bskd->btkgd"   "bgts,bsd->btgd"    (values on the right)
    """
    b, t, h, d = q.shape
    size = dict(zip(kv_layout, k.shape))
    kv_heads, kv_len = size.get("k", 1), size["s"]
    size.update(b=b, t=t, k=kv_heads, g=h // kv_heads, d=d)
    q_axes = "".join(c for c in "btkgd" if c in kv_layout or c in "tgd")  # as the keys
    q = q.reshape([size[c] for c in q_axes])                   # split heads into (k, g)
    score_axes = q_axes.replace("t", "").replace("gd", "gts")  # [b][k]gts
    f32 = dict(preferred_element_type=jnp.float32)
    logits = ordered_einsum(f"{kv_layout},{q_axes}->{score_axes}", k, q, **f32)
    logits = logits / jnp.sqrt(jnp.float32(score_dim or d))
    probs = masked_softmax(logits, causal_mask(t, kv_len, q_offset, window, k_positions, sinks)
                           if causal else None).astype(v.dtype)
    out = ordered_einsum(f"{score_axes},{kv_layout}->{q_axes}", probs, v, **f32)
    return out.reshape(b, t, h, d).astype(q.dtype)


def ordered_einsum(spec: str, x: jax.Array, y: jax.Array, **kwargs) -> jax.Array:
    """The two-operand einsum `spec` as one dot_general with `x` as its left operand.

    `jnp.einsum` may swap the operands, and on CPU the order decides what XLA copies: it
    reads keys [positions, head_dim] as they lie only as the left operand of the scores
    (keys @ queries^T), and values only as the right operand of the output (probs @ values);
    otherwise it transposes the whole KV cache at every decoding step.
    """
    inputs, out = spec.split("->")
    xs, ys = inputs.split(",")
    batch = [c for c in xs if c in ys and c in out]
    summed = [c for c in xs if c in ys and c not in out]
    dims = (([xs.index(c) for c in summed], [ys.index(c) for c in summed]),
            ([xs.index(c) for c in batch], [ys.index(c) for c in batch]))
    result = jax.lax.dot_general(x, y, dims, **kwargs)
    axes = batch + [c for c in xs if c not in ys] + [c for c in ys if c not in xs]
    return jnp.transpose(result, [axes.index(c) for c in out])


def causal_mask(q_len: int, kv_len: int, q_offset: jax.Array | int | None = None,
                window: jax.Array | int | None = None, k_positions: jax.Array | None = None,
                sinks: int = 0) -> jax.Array:
    """bool [q_len, kv_len]: True where query t (at position q_offset + t) may see key s.

    A key is visible when its position p satisfies q - window < p <= q (window None: no
    lower bound) and p >= 0; with `sinks` S > 0 also when p < S (attention sinks,
    StreamingLLM: the first S positions stay visible through any window). k_positions: int
    [kv_len], each key's position (a ring buffer's slots hold positions out of order, -1
    for a slot not yet written); default 0..kv_len-1. A ragged batch (`kv_cache.for_rows`)
    gives per-row positions, q_offset [batch] and k_positions [batch, kv_len], and gets
    a mask [batch, q_len, kv_len].
    """
    if q_offset is None:
        q_offset = kv_len - q_len
    q_pos = (jnp.asarray(q_offset)[..., None] + jnp.arange(q_len))[..., :, None]
    k_pos = (jnp.arange(kv_len) if k_positions is None else k_positions)[..., None, :]
    visible = k_pos <= q_pos
    if k_positions is not None:
        visible &= k_pos >= 0
    if window is not None:
        visible &= (k_pos > q_pos - window) | (k_pos < sinks)
    return visible


def masked_softmax(logits: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Softmax over the last axis (keys) of float32 logits [..., q_len, kv_len], where
    `mask` (bool [q_len, kv_len], or [batch, q_len, kv_len] for logits [batch, ..., q_len,
    kv_len]; None: all) is False a key gets no weight."""
    if mask is not None:
        if mask.ndim == 3:  # per row: the batch axis leads, the heads' axes between
            mask = mask.reshape(mask.shape[0], *[1] * (logits.ndim - 3), *mask.shape[1:])
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(logits, axis=-1)


def attend_jax(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
               q_offset: jax.Array | int | None = None, kv_layout: str = "bskd",
               window: jax.Array | int | None = None, k_positions: jax.Array | None = None,
               score_dim: int | None = None, implementation: str | None = None) -> jax.Array:
    """`attend` through `jax.nn.dot_product_attention` (XLA, or cuDNN's fused kernel on GPU).

    Same arguments and result as `attend`; GQA is handled natively by JAX.
    """
    options = dict(implementation=implementation)
    if score_dim is not None:
        options["scale"] = score_dim ** -0.5
    if kv_layout != "bskd":  # a cache layout; JAX takes [batch, kv_len, heads, head_dim]
        b, d = q.shape[0], q.shape[-1]
        k, v = (jnp.swapaxes(a.reshape(b, -1, a.shape[-2], d), 1, 2) for a in (k, v))
    t, s = q.shape[1], k.shape[1]
    if not causal:
        return jax.nn.dot_product_attention(q, k, v, **options)
    top_aligned = t == s and (q_offset is None or isinstance(q_offset, int) and q_offset == 0)
    if top_aligned and window is None and k_positions is None:  # JAX aligns query 0 with key 0
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, **options)
    mask = causal_mask(t, s, q_offset, window, k_positions)[None, None]  # [1, 1, q_len, kv_len]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, **options)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """Contracts x's last `contract` axes with w's first ones, as one 2-D matmul.

    x: [..., *w.shape[:contract]]; w: [*in, *out] -> [..., *out]. Written as
    [tokens, in] @ [in, out]: XLA on CPU ran the weight gradient of the 3-D einsum
    through a slow transposing copy.
    """
    lead, w_in, w_out = x.shape[:-contract], w.shape[:contract], w.shape[contract:]
    y = x.reshape(-1, math.prod(w_in)) @ w.reshape(math.prod(w_in), math.prod(w_out))
    return y.reshape(*lead, *w_out)


def init_params(rngs, shape: tuple[int, ...], fan_in: int) -> jax.Array:
    """A projection's initial weights: normal with standard deviation fan_in ** -0.5."""
    return jax.random.normal(rngs.params(), shape) * fan_in ** -0.5


def init_output(rngs, num_heads: int, head_dim: int, d_model: int, num_layers: int) -> jax.Array:
    """The output projection [num_heads, head_dim, d_model], scaled down by
    sqrt(2 * num_layers) like every residual branch's last layer (GPT-2)."""
    fan_in = num_heads * head_dim
    return init_params(rngs, (num_heads, head_dim, d_model), fan_in) / (2 * num_layers) ** 0.5

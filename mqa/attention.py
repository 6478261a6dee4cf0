"""Multi-head, grouped-query and multi-query attention: one code path, one knob.

`num_kv_heads` key/value heads serve `num_heads` query heads in groups of
`group = num_heads // num_kv_heads`: query head `h` reads K/V head `h // group`.
`num_kv_heads == num_heads` is MHA, `1` is MQA (Shazeer 2019), anything between is GQA
(Ainslie et al. 2023). Dimension letters used below:

  b batch, t query position, s key position, k K/V head, g query head within its group,
  d head dimension, h query head (= k * group + g), m model dimension.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mqa.config import ModelConfig
from mqa.kv_cache import KVCache, cache_axes, to_cache_axes
from mqa.rope import apply_rope


def attend(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
           q_offset: jax.Array | int | None = None, kv_layout: str = "bskd") -> jax.Array:
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
    logits = logits / jnp.sqrt(jnp.float32(d))
    if causal:
        logits = jnp.where(causal_mask(t, kv_len, q_offset), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
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


def causal_mask(q_len: int, kv_len: int, q_offset: jax.Array | int | None = None) -> jax.Array:
    """bool [q_len, kv_len]: True where query t (at position q_offset + t) may see key s."""
    if q_offset is None:
        q_offset = kv_len - q_len
    q_pos = q_offset + jnp.arange(q_len)
    return jnp.arange(kv_len)[None, :] <= q_pos[:, None]


def attend_jax(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
               q_offset: jax.Array | int | None = None, kv_layout: str = "bskd",
               implementation: str | None = None) -> jax.Array:
    """`attend` through `jax.nn.dot_product_attention` (XLA, or cuDNN's fused kernel on GPU).

    Same arguments and result as `attend`; GQA is handled natively by JAX.
    """
    if kv_layout != "bskd":  # a cache layout; JAX takes [batch, kv_len, heads, head_dim]
        b, d = q.shape[0], q.shape[-1]
        k, v = (jnp.swapaxes(a.reshape(b, -1, a.shape[-2], d), 1, 2) for a in (k, v))
    t, s = q.shape[1], k.shape[1]
    if not causal:
        return jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    top_aligned = t == s and (q_offset is None or isinstance(q_offset, int) and q_offset == 0)
    if top_aligned:  # JAX's is_causal aligns query 0 with key 0
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)
    mask = causal_mask(t, s, q_offset)[None, None]  # [1, 1, q_len, kv_len]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def dense(x: jax.Array, w: jax.Array, contract: int = 1) -> jax.Array:
    """Contracts x's last `contract` axes with w's first ones, as one 2-D matmul.

    x: [..., *w.shape[:contract]]; w: [*in, *out] -> [..., *out]. Written as
    [tokens, in] @ [in, out]: XLA on CPU ran the weight gradient of the 3-D einsum
    through a slow transposing copy.
    """
    lead, w_in, w_out = x.shape[:-contract], w.shape[:contract], w.shape[contract:]
    y = x.reshape(-1, math.prod(w_in)) @ w.reshape(math.prod(w_in), math.prod(w_out))
    return y.reshape(*lead, *w_out)


AttentionFn = Callable[..., jax.Array]


def attention_fn(impl: str, block: int = 128) -> AttentionFn:
    """The attention core named by `model.attention_impl`; `block` (`model.attention_block`)
    is the blockwise one's block length."""
    from mqa.blockwise import attend_blockwise  # it builds on `attend`
    impls = {
        "einsum": attend,
        "blockwise": functools.partial(attend_blockwise, block=block),
        "xla": functools.partial(attend_jax, implementation="xla"),
        "cudnn": functools.partial(attend_jax, implementation="cudnn"),
    }
    if impl not in impls:
        raise ValueError(f"model.attention_impl={impl!r} is not one of: {', '.join(impls)}")
    return impls[impl]


class Attention(nnx.Module):
    """Query/key/value/output projections, rotary embeddings, and an optional KV cache.

    Weights: q [m, num_heads, d], k and v [m, num_kv_heads, d], out [num_heads, d, m].
    With cross-layer KV sharing (Brandon et al. 2024) only the first layer of each group
    has k and v (`owns_kv`); the others attend to the keys and values it computed.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, owns_kv: bool = True):
        m, h, kv, d = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim
        init = nnx.initializers.normal(stddev=m ** -0.5)
        out_init = nnx.initializers.normal(stddev=(h * d) ** -0.5 / (2 * config.num_layers) ** 0.5)
        self.q = nnx.Param(init(rngs.params(), (m, h, d)))
        if owns_kv:
            self.k = nnx.Param(init(rngs.params(), (m, kv, d)))
            self.v = nnx.Param(init(rngs.params(), (m, kv, d)))
        self.out = nnx.Param(out_init(rngs.params(), (h, d, m)))
        self.config = config

    def __call__(self, x: jax.Array, positions: jax.Array, cache: KVCache | None = None,
                 shared_kv: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, KVCache | None, tuple[jax.Array, jax.Array]]:
        """x: [batch, seq, m]; positions: int [seq].

        cache: this layer's (or its KV group's) cache. A layer that owns K/V writes the new
          keys and values at `cache.index`, and the queries attend to everything written.
        shared_kv: the (keys, values) returned by the group's first layer, for a layer
          without K/V: [batch, seq, kv_heads, d] each, or with a cache the whole updated
          cache buffers [batch, kv_heads, max_len, d] (`cache.index` is then the index
          before this step).
        Returns ([batch, seq, m], the updated cache or None, the (keys, values) attended to).
        """
        dtype = jnp.dtype(self.config.dtype)
        x = x.astype(dtype)
        axes = cache_axes(x.shape[0], self.config.num_kv_heads)  # the cache buffers' layout
        q = apply_rope(dense(x, self.q[...].astype(dtype)), positions, self.config.rope_theta)
        if shared_kv is not None:
            k, v = shared_kv
        else:
            k = dense(x, self.k[...].astype(dtype))  # [batch, seq, kv_heads, d]
            v = dense(x, self.v[...].astype(dtype))
            k = apply_rope(k, positions, self.config.rope_theta)
            if cache is not None:  # write the new positions into the cache
                start = tuple(cache.index if c == "s" else 0 for c in axes)
                k = jax.lax.dynamic_update_slice(
                    cache.k, to_cache_axes(k, axes).astype(cache.k.dtype), start)
                v = jax.lax.dynamic_update_slice(
                    cache.v, to_cache_axes(v, axes).astype(cache.v.dtype), start)
        core = attention_fn(self.config.attention_impl, self.config.attention_block)
        if cache is None:
            out = core(q, k, v, causal=True, q_offset=0)
        else:
            out = core(q, k.astype(dtype), v.astype(dtype), causal=True, q_offset=cache.index,
                       kv_layout=axes)
            if shared_kv is None:
                cache = KVCache(k, v, cache.index + x.shape[1])
        return dense(out, self.out[...].astype(dtype), contract=2), cache, (k, v)

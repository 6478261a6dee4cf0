"""Blockwise (flash-style) causal attention whose memory grows linearly with length.

`attend` materialises the [heads, seq, seq] score matrix, and its gradient keeps it:
quadratic memory. Here queries and keys go in blocks of `block` positions with an online
softmax (Rabe & Staats 2021; Dao et al. 2022), blocks above the causal diagonal are never
computed, and a `custom_vjp` recomputes each block's scores in the backward pass from the
saved log-sum-exp, so what is kept is O(seq) per head: q, k, v, the output and one float
per query. Same grouped einsums as `attend`: K/V are not repeated for the query groups.
With a sliding window the key blocks wholly before the band are skipped too, so a local
layer's cost grows with seq * window rather than seq^2.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mqa.attention.core import attend


def attend_blockwise(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool = True,
                     q_offset: jax.Array | int | None = None, kv_layout: str = "bskd",
                     window: jax.Array | int | None = None, k_positions: jax.Array | None = None,
                     score_dim: int | None = None, block: int = 128) -> jax.Array:
    """`attend`'s arguments and result. Full causal self-attention (training, evaluation,
    q_len == kv_len from position 0, with or without a sliding window, which may be traced)
    runs blockwise; anything else (cached decoding, a non-causal call) is handed to
    `attend`, whose memory is then q_len x kv_len."""
    t, s = q.shape[1], k.shape[kv_layout.index("s")]
    if not (causal and kv_layout == "bskd" and t == s and isinstance(q_offset, int)
            and q_offset == 0 and k_positions is None):
        return attend(q, k, v, causal=causal, q_offset=q_offset, kv_layout=kv_layout,
                      window=window, k_positions=k_positions, score_dim=score_dim)
    b, _, h, d = q.shape
    kv = k.shape[2]
    block = min(block, t)
    pad = -t % block  # padded keys come after every query, so causality masks them
    q, k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (q, k, v))
    q = q.reshape(b, t + pad, kv, h // kv, d)
    window = jnp.asarray(t + pad if window is None else window, jnp.int32)
    out = _flash(q, k, v, window, block, score_dim or d)
    return out[:, :t].reshape(b, t, h, d)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[b, n * block, ...] -> [n, b, block, ...]."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, block, *x.shape[2:]), 1, 0)


def _unblocks(x: jax.Array) -> jax.Array:
    """[n, b, block, ...] -> [b, n * block, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])


def _scores(qi, kj, i, j, block, window, score_dim):
    """Scaled (by score_dim ** -0.5), causally masked scores of query block i against key
    block j: query p sees key s when p - window < s <= p. qi: [b, block, k, g, d], kj: [b, block, k, d] ->
    float32 [b, k, g, block, block]."""
    scores = jnp.einsum("btkgd,bskd->bkgts", qi, kj, preferred_element_type=jnp.float32)
    scores = scores * score_dim ** -0.5
    key, query = (j * block + jnp.arange(block))[None, :], (i * block + jnp.arange(block))[:, None]
    return jnp.where((key <= query) & (key > query - window), scores, -jnp.inf)


def _first_key_block(i, block, window):
    """The first key block any query of block i sees through the window."""
    return jnp.maximum(0, (i * block - window + 1) // block)


def _last_query_block(j, block, window, n):
    """The last query block that sees any key of block j through the window."""
    return jnp.minimum(n - 1, ((j + 1) * block + window - 2) // block)


def _block(x, j, block):
    """Block j of x [b, t, ...] along t: [b, block, ...] (a traced j is fine)."""
    return jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=1)


def _forward(q, k, v, window, block, score_dim):
    """q: [b, t, k, g, d]; k, v: [b, t, k, d] -> (out like q, log-sum-exp [b, k, g, t])."""
    b, _, kv, g, d = q.shape

    def query_block(args):
        i, qi = args

        def key_block(j, carry):
            running_max, total, acc = carry
            scores = _scores(qi, _block(k, j, block), i, j, block, window, score_dim)
            new_max = jnp.maximum(running_max, scores.max(-1))
            # A window may hide a whole block from a query: keep its row at zero, not NaN.
            shift = jnp.where(new_max == -jnp.inf, 0.0, new_max)
            p = jnp.exp(scores - shift[..., None])
            rescale = jnp.exp(running_max - shift)
            acc = acc * rescale[..., None] + jnp.einsum(
                "bkgts,bskd->bkgtd", p.astype(v.dtype), _block(v, j, block),
                preferred_element_type=jnp.float32)
            return new_max, total * rescale + p.sum(-1), acc

        init = (jnp.full((b, kv, g, block), -jnp.inf, jnp.float32),
                jnp.zeros((b, kv, g, block), jnp.float32),
                jnp.zeros((b, kv, g, block, d), jnp.float32))
        running_max, total, acc = jax.lax.fori_loop(_first_key_block(i, block, window), i + 1,
                                                    key_block, init)
        out = (acc / total[..., None]).transpose(0, 3, 1, 2, 4)  # [b, block, k, g, d]
        return out.astype(q.dtype), running_max + jnp.log(total)

    q_blocks = _blocks(q, block)
    out, lse = jax.lax.map(query_block, (jnp.arange(q_blocks.shape[0]), q_blocks))
    lse = jnp.moveaxis(lse, 0, 3).reshape(b, kv, g, -1)  # [n, b, k, g, blk] -> [b, k, g, t]
    return _unblocks(out), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _flash(q, k, v, window, block, score_dim):
    return _forward(q, k, v, window, block, score_dim)[0]


def _flash_fwd(q, k, v, window, block, score_dim):
    out, lse = _forward(q, k, v, window, block, score_dim)
    return out, (q, k, v, window, out, lse)


def _flash_bwd(block, score_dim, residuals, d_out):
    """Recomputes each visible block's probabilities from the saved log-sum-exp: one pass
    over query blocks for dq, one over key blocks for dk and dv."""
    q, k, v, window, out, lse = residuals
    n = q.shape[1] // block
    scale = score_dim ** -0.5
    # delta_t = sum_d dout * out: the softmax Jacobian's correction term, [b, k, g, t]
    delta = jnp.einsum("btkgd,btkgd->bkgt", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def probs_and_dscores(i, j):
        """softmax probabilities and d(loss)/d(scores) of block (i, j), float32."""
        qi, kj, vj = _block(q, i, block), _block(k, j, block), _block(v, j, block)
        lse_i = jax.lax.dynamic_slice_in_dim(lse, i * block, block, axis=3)
        delta_i = jax.lax.dynamic_slice_in_dim(delta, i * block, block, axis=3)
        p = jnp.exp(_scores(qi, kj, i, j, block, window, score_dim) - lse_i[..., None])
        dp = jnp.einsum("btkgd,bskd->bkgts", _block(d_out, i, block), vj,
                        preferred_element_type=jnp.float32)
        return p, p * (dp - delta_i[..., None])

    def dq_block(i):
        def key_block(j, dq):
            _, ds = probs_and_dscores(i, j)
            return dq + jnp.einsum("bkgts,bskd->btkgd", ds, _block(k, j, block),
                                   preferred_element_type=jnp.float32)
        zeros = jnp.zeros(q.shape[:1] + (block,) + q.shape[2:], jnp.float32)
        return jax.lax.fori_loop(_first_key_block(i, block, window), i + 1, key_block, zeros) * scale

    def dkv_block(j):
        def query_block(i, carry):
            dk, dv = carry
            p, ds = probs_and_dscores(i, j)
            d_out_i = _block(d_out, i, block)
            dv = dv + jnp.einsum("bkgts,btkgd->bskd", p, d_out_i, preferred_element_type=jnp.float32)
            dk = dk + jnp.einsum("bkgts,btkgd->bskd", ds, _block(q, i, block),
                                 preferred_element_type=jnp.float32)
            return dk, dv
        zeros = jnp.zeros(k.shape[:1] + (block,) + k.shape[2:], jnp.float32)
        dk, dv = jax.lax.fori_loop(j, _last_query_block(j, block, window, n) + 1, query_block,
                                   (zeros, zeros))
        return dk * scale, dv

    dq = _unblocks(jax.lax.map(dq_block, jnp.arange(n)))
    dk, dv = jax.lax.map(dkv_block, jnp.arange(n))
    return (dq.astype(q.dtype), _unblocks(dk).astype(k.dtype), _unblocks(dv).astype(v.dtype),
            None)


_flash.defvjp(_flash_fwd, _flash_bwd)

"""Blockwise attention: same values and gradients as `attend`, memory linear in length."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa.attention import attend
from mqa.attention.blockwise import attend_blockwise
from reference import attention_loops
from test_model import decode_incrementally, make, max_rel, tokens


def qkv(batch, length, heads, kv_heads, dim, seed=0):
    rng = np.random.default_rng(seed)
    shapes = [(batch, length, heads, dim)] + 2 * [(batch, length, kv_heads, dim)]
    return [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]


# (batch, length, heads, kv_heads, head_dim, block): blocks that divide the length and
# blocks that leave a padded tail, MHA, GQA and MQA.
SHAPES = [(2, 16, 4, 4, 8, 4), (2, 10, 4, 2, 8, 4), (1, 33, 4, 1, 16, 8), (1, 12, 2, 1, 8, 32)]


@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_reference(shape):
    *dims, block = shape
    q, k, v = qkv(*dims)
    out = attend_blockwise(q, k, v, causal=True, q_offset=0, block=block)
    np.testing.assert_allclose(out, attention_loops(q, k, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_the_materialised_softmax(shape):
    *dims, block = shape
    q, k, v = qkv(*dims)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(core):
        return lambda q, k, v: jnp.sum(core(q, k, v, causal=True, q_offset=0) * weights)

    blockwise = jax.grad(loss(lambda *a, **kw: attend_blockwise(*a, **kw, block=block)),
                         argnums=(0, 1, 2))(q, k, v)
    dense = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", blockwise, dense):
        assert max_rel(a, b) < 1e-5, name


def test_decoding_calls_fall_back_to_attend():
    q, k, v = qkv(2, 1, 4, 2, 8)
    _, cache_k, cache_v = qkv(2, 9, 4, 2, 8, seed=1)
    k_cache = jnp.swapaxes(cache_k, 1, 2)  # [batch, kv_heads, len, d]
    v_cache = jnp.swapaxes(cache_v, 1, 2)
    args = dict(causal=True, q_offset=jnp.int32(5), kv_layout="bksd")
    np.testing.assert_array_equal(attend_blockwise(q, k_cache, v_cache, **args),
                                  attend(q, k_cache, v_cache, **args))


def test_model_with_blockwise_attention_matches_einsum_and_decodes():
    model = make(attention_impl="blockwise", attention_block=8, num_kv_heads=2)  # 3 blocks
    einsum_model = make(num_kv_heads=2)  # same seed, same parameters
    toks = tokens(length=20)
    assert max_rel(model(toks), einsum_model(toks)) < 1e-5
    incremental, _ = decode_incrementally(model, toks, prefill=7)
    assert max_rel(incremental, model(toks)) < 1e-5
    # MQA at batch 1: the cache buffers have neither a batch nor a head axis ("sd").
    mqa_model = make(attention_impl="blockwise", attention_block=8, num_kv_heads=1)
    one = toks[:1]
    incremental, _ = decode_incrementally(mqa_model, one, prefill=7)
    assert max_rel(incremental, mqa_model(one)) < 1e-5


def step_temporaries(core, length):
    """Bytes of temporaries XLA assigns to value_and_grad of one attention call."""
    q, k, v = (jax.ShapeDtypeStruct(a.shape, a.dtype) for a in qkv(1, 8, 4, 1, 16))
    q, k, v = (jax.ShapeDtypeStruct((1, length, *a.shape[2:]), a.dtype) for a in (q, k, v))

    def loss(q, k, v):
        return jnp.sum(core(q, k, v, causal=True, q_offset=0))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_not_quadratically():
    blockwise = lambda *a, **kw: attend_blockwise(*a, **kw, block=128)  # noqa: E731
    short, long = step_temporaries(blockwise, 1024), step_temporaries(blockwise, 4096)
    dense_short, dense_long = step_temporaries(attend, 1024), step_temporaries(attend, 4096)
    assert long / short < 5  # 4x the length: ~4x the memory
    assert dense_long / dense_short > 12  # the [seq, seq] scores: ~16x
    assert long < dense_long / 8


@pytest.mark.parametrize("window", [1, 3, 4, 9, 40])
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_sliding_window_matches_float64_reference_and_gradients(shape, window):
    """Blocks wholly outside the band are skipped (forward and backward) and the band's
    edges masked; the window may be a traced value, as the layer scan passes it."""
    *dims, block = shape
    q, k, v = qkv(*dims)
    out = jax.jit(lambda q, k, v, w: attend_blockwise(q, k, v, window=w, q_offset=0, block=block))(
        q, k, v, jnp.int32(window))
    np.testing.assert_allclose(out, attention_loops(q, k, v, window=window), rtol=1e-5, atol=1e-5)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def loss(core):
        return lambda q, k, v: jnp.sum(core(q, k, v, causal=True, q_offset=0, window=window) * weights)

    blockwise = jax.grad(loss(lambda *a, **kw: attend_blockwise(*a, **kw, block=block)),
                         argnums=(0, 1, 2))(q, k, v)
    dense = jax.grad(loss(attend), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", blockwise, dense):  # window 1: dq is 0 (one key per query)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())),
                                   err_msg=name)


def test_windowed_model_with_blockwise_attention_matches_einsum():
    changes = dict(num_kv_heads=2, sliding_window=5, global_every=2)
    model = make(attention_impl="blockwise", attention_block=4, **changes)
    toks = tokens(length=20)
    assert max_rel(model(toks), make(**changes)(toks)) < 1e-5

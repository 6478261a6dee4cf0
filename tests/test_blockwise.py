"""Blockwise attention: the values and gradients of `attend`, memory linear in length.
(Grouped models through it, with and without windows: the table in test_families.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import jit, qkv
from mqa.attention import attend
from mqa.attention.blockwise import attend_blockwise
from reference import attention_loops

# (batch, length, heads, kv_heads, head_dim, block): blocks that divide the length and
# blocks that leave a padded tail, MHA, GQA and MQA.
SHAPES = [(2, 16, 4, 4, 8, 4), (2, 10, 4, 2, 8, 4), (1, 33, 4, 1, 16, 8), (1, 12, 2, 1, 8, 32)]
# No window; windows of one key, under a block, a block, over two blocks, over the length.
WINDOWS = [None, 1, 3, 4, 9, 40]


@pytest.mark.parametrize("shape", SHAPES)
def test_values_match_the_float64_reference_and_gradients_the_materialised_softmax(shape):
    """Blocks wholly outside the band are skipped (forward and backward) and the band's
    edges masked; the window is traced, as the layer scan passes it."""
    *dims, block = shape
    q, k, v = qkv(*dims)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape), jnp.float32)

    def value_and_grads(core, q, k, v, window):
        run = lambda q, k, v: core(q, k, v, causal=True, q_offset=0, window=window)  # noqa: E731
        return run(q, k, v), jax.grad(lambda *a: jnp.sum(run(*a) * weights), (0, 1, 2))(q, k, v)

    @jit
    def both(q, k, v, window):
        blockwise = lambda *a, **kw: attend_blockwise(*a, **kw, block=block)  # noqa: E731
        return value_and_grads(blockwise, q, k, v, window), value_and_grads(attend, q, k, v, window)

    for window in WINDOWS:
        (out, grads), (_, dense) = both(q, k, v, window and jnp.int32(window))
        np.testing.assert_allclose(out, attention_loops(q, k, v, window=window or 0),
                                   rtol=1e-5, atol=1e-5, err_msg=f"window {window}")
        for name, a, b in zip("qkv", grads, dense):  # window 1: dq is 0 (one key per query)
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * max(1.0, float(np.abs(b).max())),
                                       err_msg=f"d{name}, window {window}")


def test_decoding_calls_fall_back_to_attend():
    q, k, v = qkv(2, 1, 4, 2, 8)
    _, cache_k, cache_v = qkv(2, 9, 4, 2, 8, seed=1)
    k_cache = jnp.swapaxes(cache_k, 1, 2)  # [batch, kv_heads, len, d]
    v_cache = jnp.swapaxes(cache_v, 1, 2)
    args = dict(causal=True, q_offset=jnp.int32(5), kv_layout="bksd")
    np.testing.assert_array_equal(attend_blockwise(q, k_cache, v_cache, **args),
                                  attend(q, k_cache, v_cache, **args))


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

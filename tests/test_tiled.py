"""Tiled attention (`model.attention_impl="tiled"`): every family's core over query tiles
gives the whole-matrix core's values and gradients, in fewer operations. (Every family's
model through tiles, with and without windows, against the float64 reference: the table
in test_families.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import jit, max_rel, qkv
from mqa.attention import attend, attend_latent_expanded, attend_tied, self_attention
from mqa.attention.tiled import MAX_TILES
from reference import attention_loops


def attend_tiled(q, k, v, *, block, window=None):
    """The grouped core through the tiled backend, as the model's SELF mode runs it."""
    return self_attention("tiled", block)(attend, (q,), (k, v), window=window)


def family_inputs(name, b=2, t=16, h=4, kv=2, d=8, r=4, seed=0):
    """(core, queries, keys) as each family hands them to a backend in SELF mode."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)  # noqa: E731
    if name == "grouped":
        return attend, (normal(b, t, h, d),), (normal(b, t, kv, d), normal(b, t, kv, d))
    if name == "tied":
        return attend_tied, (normal(b, t, h, d),), (normal(b, t, kv, d), normal(b, t, d // 2))
    return (attend_latent_expanded, (normal(b, t, h, d), normal(b, t, h, r)),
            (normal(b, t, h, d), normal(b, t, h, d), normal(b, t, r)))


@pytest.mark.parametrize("window", [None, 5], ids=["global", "traced-window"])
@pytest.mark.parametrize("name", ["grouped", "tied", "latent"])
def test_every_family_core_has_the_whole_matrix_values_and_gradients(name, window):
    """16 positions in tiles of 5 (the last one short), the window traced as the layer scan
    passes it: values and the gradients of every input as the einsum backend's."""
    core, queries, keys = family_inputs(name)
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(queries[0].shape), jnp.float32)

    def loss(impl):
        def run(inputs, window):
            out = self_attention(impl, 5)(core, inputs[:len(queries)], inputs[len(queries):],
                                          window=window)
            return jnp.sum(out * weights), out
        return jax.grad(run, has_aux=True)

    @jit
    def both(inputs, window):
        return loss("tiled")(inputs, window), loss("einsum")(inputs, window)

    (tiled_grads, tiled), (whole_grads, whole) = both((*queries, *keys), window and jnp.int32(window))
    assert max_rel(tiled, whole) < 1e-6
    for a, b in zip(tiled_grads, whole_grads, strict=True):
        assert max_rel(a, b) < 1e-5


@pytest.mark.parametrize("length, kv_heads, block, window", [
    (32, 4, 8, None), (30, 1, 8, None), (33, 2, 4, 6), (40, 1, 8, 3)])
def test_tiles_and_a_static_window_match_the_float64_loops(length, kv_heads, block, window):
    """With a Python-int window the key tiles before the band are left out, not masked."""
    q, k, v = qkv(2, length, 4, kv_heads, 8)
    out = jit(lambda q, k, v: attend_tiled(q, k, v, window=window, block=block))(q, k, v)
    np.testing.assert_allclose(out, attention_loops(q, k, v, window=window or 0),
                               rtol=1e-5, atol=1e-5)


def test_the_number_of_tiles_is_capped():
    """Tiles of 1 over 40 positions would unroll 40 cores: they grow to ceil(40 / 16)."""
    q, k, v = qkv(1, 40, 2, 1, 8)
    dots = [e for e in jax.make_jaxpr(lambda *a: attend_tiled(*a, block=1))(q, k, v).eqns
            if e.primitive.name == "dot_general"]
    assert len(dots) == 2 * -(-40 // 3) <= 2 * MAX_TILES
    out = jit(lambda *a: attend_tiled(*a, block=1))(q, k, v)
    np.testing.assert_allclose(out, attention_loops(q, k, v), rtol=1e-5, atol=1e-5)


def test_tiles_skip_the_work_above_the_diagonal():
    """XLA's count of the train-step attention's FLOPs: 8 tiles do (8 + 1) / 16 of the
    score and value products of the whole matrix (the rest is the same elementwise work,
    also cut)."""
    q, k, v = (jax.ShapeDtypeStruct((2, 256, 8, 32), jnp.float32) for _ in range(3))

    def flops(core):
        step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(core(q, k, v)), argnums=(0, 1, 2)))
        return step.lower(q, k, v).compile().cost_analysis()["flops"]

    ratio = flops(lambda *a: attend_tiled(*a, block=32)) / flops(attend)
    assert 0.45 < ratio < 0.65


def test_default_config_trains_with_tiles_and_published_experiments_keep_their_core():
    """configs/default.py trains tiled; the configs whose results are published (the KV
    sweeps) keep `einsum`."""
    from configs import default, sweep_kv_budget, sweep_kv_heads
    config = default.get_config().model
    assert (config.attention_impl, config.attention_block) == ("tiled", 64)
    for published in (sweep_kv_heads, sweep_kv_budget):
        assert published.get_config().model.attention_impl == "einsum", published.__name__

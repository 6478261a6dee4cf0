"""Tiled attention (`model.attention_impl="tiled"`): every family's values and gradients as
the whole-matrix einsum core's and the float64 reference's, in fewer operations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa.attention import attend, self_attention
from mqa.attention.tiled import MAX_TILES
from reference import attention_loops
from test_blockwise import qkv
from test_families import FAMILIES, WINDOWS, make, reference_logits
from test_model import max_rel, tokens


def attend_tiled(q, k, v, *, block, window=None):
    """The grouped core through the tiled backend, as the model's SELF mode runs it."""
    return self_attention("tiled", block)(attend, (q,), (k, v), window=window)


@pytest.mark.parametrize("name, window", [(name, "") for name in FAMILIES] + [
    ("GQA", "local/global"), ("tied", "local"), ("latent", "local/global")])
def test_every_family_matches_the_float64_reference_and_the_einsum_gradients(name, window):
    """16 tokens in tiles of 5 (the last one short), against the reference's logits and
    the einsum core's parameter gradients."""
    tiled = make(**FAMILIES[name], **WINDOWS[window], attention_impl="tiled", attention_block=5)
    whole = make(**FAMILIES[name], **WINDOWS[window])  # the same parameters, einsum core
    toks = tokens(length=16)
    assert max_rel(tiled(toks), reference_logits(tiled, toks)) < 1e-5

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(nnx.merge(graphdef, p)(toks) ** 2)  # noqa: E731
        return jax.tree.leaves(jax.jit(jax.grad(loss))(params))

    for a, b in zip(grads(tiled), grads(whole), strict=True):
        assert max_rel(a, b) < 1e-5


@pytest.mark.parametrize("length, kv_heads, block, window", [
    (32, 4, 8, None), (30, 1, 8, None), (33, 2, 4, 6), (40, 1, 8, 3)])
def test_tiles_and_a_static_window_match_the_float64_loops(length, kv_heads, block, window):
    """With a Python-int window the key tiles before the band are left out, not masked."""
    q, k, v = qkv(2, length, 4, kv_heads, 8)
    out = attend_tiled(q, k, v, window=window, block=block)
    np.testing.assert_allclose(out, attention_loops(q, k, v, window=window or 0),
                               rtol=1e-5, atol=1e-5)


def test_the_number_of_tiles_is_capped():
    """Tiles of 1 over 40 positions would unroll 40 cores: they grow to ceil(40 / 16)."""
    q, k, v = qkv(1, 40, 2, 1, 8)
    dots = [e for e in jax.make_jaxpr(lambda *a: attend_tiled(*a, block=1))(q, k, v).eqns
            if e.primitive.name == "dot_general"]
    assert len(dots) == 2 * -(-40 // 3) <= 2 * MAX_TILES
    out = jax.jit(lambda *a: attend_tiled(*a, block=1))(q, k, v)
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
    sweeps, SmolLM2 uptraining) keep `einsum`."""
    from configs import default, sweep_kv_budget, sweep_kv_heads, uptrain_smollm2
    config = default.get_config().model
    assert (config.attention_impl, config.attention_block) == ("tiled", 64)
    for published in (sweep_kv_heads, sweep_kv_budget, uptrain_smollm2):
        assert published.get_config().model.attention_impl == "einsum", published.__name__

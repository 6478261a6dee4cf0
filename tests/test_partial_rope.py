"""Partial RoPE for grouped attention (`model.rope_head_dim` with attention="grouped"): only
the last rope_head_dim dimensions of each query and key head rotate, with frequencies over
rope_head_dim, as in GTA's and MLA's rotary parts ("MHA-halfrope" at head_dim / 2).

Against the float64 reference (tests/reference.py, `partial_rope` written pair by pair):
full-sequence logits and cached decoding, with windows, cross-layer sharing, an int8 cache
and Gemma 3's switches; rope_head_dim=0 stays exactly today's computation; the parameters and
the cache are the same as without it.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa import accounting, head_similarity, train_report
from mqa.config import ConfigError, build_model_config, load_config_file
from mqa.kv_cache import cache_nbytes, init_cache
from mqa.model import Transformer
from mqa.rope import apply_partial_rope, apply_rope
from helpers import (BASE, GEMMA, REPO, WINDOWED, decode, forward, make, max_rel, reference_layers,
                     reference_logits, tokens)
from reference import partial_rope, rms_norm, rope

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

HALF = dict(rope_head_dim=BASE.head_dim // 2)  # 4 of 8
MODELS = {  # name: the model's fields (BASE: 2 layers, 4 query heads of 8, 2 K/V heads)
    "MHA-halfrope": dict(num_kv_heads=4, **HALF),
    "GQA rope 2 of 8": dict(rope_head_dim=2),
    "MQA rope 6 of 8, local/global": dict(num_kv_heads=1, rope_head_dim=6, sliding_window=5, global_every=2),
    "GQA-halfrope, K/V shared by 2 layers": dict(kv_share_every=2, **HALF),
    "MQA-halfrope, Gemma 3's switches": dict(WINDOWED, **GEMMA, **HALF),
}


@pytest.mark.parametrize("name", MODELS)
def test_logits_and_cached_decoding_match_the_float64_reference(name):
    model = make(**MODELS[name])
    toks = tokens(length=24)
    full = forward(model, toks)
    want = reference_logits(model, toks)
    assert max_rel(full, want) < 1e-5
    full_rope = make(**dict(MODELS[name], rope_head_dim=0))  # the same weights, every dim rotated
    assert max_rel(forward(full_rope, toks), want) > 1e-3
    # Decoding past the window (5) wraps each local layer's ring buffer several times.
    assert max_rel(decode(model, toks, 7, 1)[0], full) < 1e-5


def test_an_int8_cache_decodes_as_the_reference_with_quantized_keys():
    model = make(kv_cache_dtype="int8", sliding_window=6, global_every=2, **HALF)
    toks = tokens(length=20)
    quantized, exact = reference_logits(model, toks, quantize_kv=True), reference_logits(model, toks)
    assert max_rel(decode(model, toks, 7, 1)[0], quantized) < 0.1 * max_rel(exact, quantized)


@pytest.mark.parametrize("impl", ["einsum", "tiled", "blockwise", "xla"])
def test_every_grouped_backend_takes_partial_rope(impl):
    model = make(attention_impl=impl, attention_block=8, **MODELS["MQA-halfrope, Gemma 3's switches"])
    toks = tokens(length=24)
    assert max_rel(forward(model, toks), reference_logits(model, toks)) < 1e-5


def test_rope_head_dim_zero_is_todays_rope_exactly():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 3, 8)), jnp.float32)
    positions = jnp.arange(7) + 5
    for rope_dim in (0, 8):
        assert np.array_equal(apply_partial_rope(x, positions, 100.0, rope_dim), apply_rope(x, positions, 100.0))
    # GTA's queries now go through the same function: its rotary half, bit for bit as before
    before = jnp.concatenate([x[..., :4], apply_rope(x[..., 4:], positions, 100.0)], axis=-1)
    assert np.array_equal(apply_partial_rope(x, positions, 100.0, 4), before)
    toks = tokens(length=12)
    assert np.array_equal(make(rope_head_dim=0)(toks), make()(toks))


def test_the_reference_partial_rope_turns_the_last_dims_by_relative_position():
    """The reference itself: the first dims do not move, at rope_dim = dim it is `rope`, and a
    query-key product of the rotated part depends on the positions' difference only."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 9, 2, 12))
    positions = np.arange(9)
    np.testing.assert_array_equal(partial_rope(x, positions, 50.0, 4)[..., :8], x[..., :8])
    np.testing.assert_allclose(partial_rope(x, positions, 50.0, 12), rope(x, positions, 50.0), atol=1e-12)
    np.testing.assert_allclose(partial_rope(x, positions, 50.0, 0), rope(x, positions, 50.0), atol=1e-12)
    q, k = rng.normal(size=12), rng.normal(size=12)

    def score(m, n):
        rotated = [partial_rope(v[None, None, None], [p], 50.0, 4)[0, 0, 0] for v, p in ((q, m), (k, n))]
        return rotated[0] @ rotated[1]

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-9)
    assert score(7, 3) != pytest.approx(score(7, 4), rel=1e-3)


@pytest.mark.parametrize("name", MODELS)
def test_parameters_and_cache_are_those_without_it(name):
    config = make(**MODELS[name]).config
    without = dataclasses.replace(config, rope_head_dim=0)
    model = Transformer(config, rngs=nnx.Rngs(0))
    assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == accounting.param_count(config)
    assert accounting.param_count(config) == accounting.param_count(without)
    assert accounting.flops_per_token(config, 64) == accounting.flops_per_token(without, 64)
    for batch, context in [(1, 40), (3, 17)]:
        assert accounting.kv_cache_bytes(config, batch, context) == accounting.kv_cache_bytes(without, batch, context)
        assert cache_nbytes(init_cache(config, batch, context)) == accounting.kv_cache_bytes(config, batch, context)


def test_the_head_analysis_rotates_as_the_model_does():
    """Layer 0's attention probabilities (head_similarity) of a partial-RoPE model, against
    float64 ones from the raw weights and the reference's `partial_rope`."""
    model = make(num_kv_heads=4, **HALF)
    toks = np.asarray(tokens(length=10))
    got = next(head_similarity.layer_attention_probs(model, toks))
    layer = reference_layers(model)[0]
    h = rms_norm(np.asarray(model.embed[...], np.float64)[toks], layer["attention_norm"], model.config.norm_eps)
    positions, theta = np.arange(toks.shape[1]), model.config.rope_theta
    q = partial_rope(np.einsum("btm,mhd->bthd", h, layer["q"]), positions, theta, 4)
    k = partial_rope(np.einsum("btm,mhd->bthd", h, layer["k"]), positions, theta, 4)
    logits = np.einsum("bthd,bshd->bhts", q, k) / np.sqrt(model.config.head_dim)
    logits = np.where(np.tril(np.ones((10, 10), bool)), logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(got, probs / probs.sum(-1, keepdims=True), atol=2e-5)


def test_the_model_line_says_how_much_rotates():
    config = build_model_config(vocab_size=256, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4,
                                head_dim=16, mlp_dim=128, rope_head_dim=8)
    assert train_report.attention_summary(config) == "4 query heads, 4 KV heads (rope on 8 of 16 dims)"


@pytest.mark.parametrize("overrides, message", [
    (["model.rope_head_dim=3"], "model.rope_head_dim=3 is invalid for model.attention='grouped'; valid: 0 "
                                "(rotate every dimension) or an even number below model.head_dim=32"),
    (["model.rope_head_dim=32"], "model.rope_head_dim=32 is invalid for model.attention='grouped'"),
    (["model.rope_head_dim=40"], "model.rope_head_dim=40 is invalid for model.attention='grouped'"),
    (["model.rope_head_dim=-2"], "model.rope_head_dim=-2 must be >= 0"),
    (["model.attention=tied", "model.num_kv_heads=2", "model.rope_head_dim=8"],
     "model.rope_head_dim=8 is for model.attention='grouped' or 'latent'; 'tied' rotates head_dim / 2"),
])
def test_rope_head_dims_that_cannot_work_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config_file(REPO / "configs" / "default.py", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_grouped_attention_takes_even_rope_head_dims_below_head_dim():
    for r in (2, 16, 30):
        config = load_config_file(REPO / "configs" / "default.py", [f"model.rope_head_dim={r}"])
        assert build_model_config(config.model).rope_head_dim == r

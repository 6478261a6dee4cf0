"""The Transformer: cached decoding, causality, GQA/MHA equivalence, remat, cache size."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa import accounting
from mqa.config import ModelConfig, build_model_config
from mqa.kv_cache import cache_nbytes, init_cache
from mqa.model import Transformer

BASE = build_model_config(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=4,
                   head_dim=8, mlp_dim=48, max_seq_len=32)
KV_HEADS = [4, 2, 1]  # MHA, GQA, MQA


def make(seed=0, **changes):
    return Transformer(dataclasses.replace(BASE, **changes), rngs=nnx.Rngs(seed))


def tokens(batch=2, length=12, seed=0, vocab=BASE.vocab_size):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, length)), jnp.int32)


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


def decode_incrementally(model, toks, prefill):
    """Prefill `prefill` tokens, then feed the rest one at a time through the jitted step."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, toks, cache):
        return nnx.merge(graphdef, state).step(toks, cache)

    cache = init_cache(model.config, toks.shape[0], model.config.max_seq_len)
    logits, cache = step(state, toks[:, :prefill], cache)
    chunks = [logits]
    for i in range(prefill, toks.shape[1]):
        logits, cache = step(state, toks[:, i:i + 1], cache)
        chunks.append(logits)
    return jnp.concatenate(chunks, axis=1), cache


@pytest.mark.parametrize("attention_impl", ["einsum", "xla"])
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_cached_decoding_matches_full_sequence(num_kv_heads, attention_impl):
    model = make(num_kv_heads=num_kv_heads, attention_impl=attention_impl, tie_embeddings=False)
    toks = tokens()
    full = model(toks)
    incremental, cache = decode_incrementally(model, toks, prefill=5)
    assert int(cache.index) == toks.shape[1]
    assert max_rel(incremental, full) < 1e-5


def test_decoding_reads_the_cache():
    """The cache carries the context: decoding a token against an emptied cache differs."""
    model = make(num_kv_heads=2)
    toks = tokens(length=6)
    _, cache = model.step(toks[:, :5], init_cache(model.config, 2, 16))
    with_context, _ = model.step(toks[:, 5:], cache)
    emptied = cache._replace(layers=jax.tree.map(jnp.zeros_like, cache.layers))
    without_context, _ = model.step(toks[:, 5:], emptied)
    np.testing.assert_allclose(with_context[:, 0], model(toks)[:, 5], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(with_context - without_context)).max() > 1e-3


@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_causality(num_kv_heads):
    """Changing token j changes no logit before j, and does change position j."""
    model = make(num_kv_heads=num_kv_heads)
    toks = tokens(length=10)
    j = 6
    changed = toks.at[:, j].set((toks[:, j] + 1) % BASE.vocab_size)
    before, after = model(toks), model(changed)
    np.testing.assert_array_equal(before[:, :j], after[:, :j])
    assert np.abs(np.asarray(before[:, j] - after[:, j])).max() > 1e-4


@pytest.mark.parametrize("num_kv_heads", [2, 1])
def test_gqa_equals_mha_with_kv_weights_repeated_within_groups(num_kv_heads):
    """A GQA/MQA model is the MHA model whose K/V heads are copies within each group."""
    gqa = make(num_kv_heads=num_kv_heads)
    mha = make(seed=1, num_kv_heads=BASE.num_heads)
    group = BASE.num_heads // num_kv_heads

    def repeat_kv(path, value):  # K/V weights: [layers, d_model, kv_heads, head_dim]
        names = [getattr(key, "key", None) for key in path]
        is_kv = names[-3:-1] in (["attention", "k"], ["attention", "v"])
        return jnp.repeat(value, group, axis=2) if is_kv else value

    nnx.update(mha, jax.tree_util.tree_map_with_path(repeat_kv, nnx.state(gqa)))
    toks = tokens(length=9)
    np.testing.assert_allclose(mha(toks), gqa(toks), rtol=1e-5, atol=1e-5)


def test_remat_changes_nothing_but_memory():
    model, remat_model = make(), make(remat=True)
    toks = tokens()

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])

    grads = nnx.grad(loss)(model)
    remat_grads = nnx.grad(loss)(remat_model)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        assert max_rel(a, b) < 1e-5


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = make(dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = model(tokens())
    assert logits.dtype == jnp.float32
    reference = make(dtype="float32")(tokens())  # same seed, same parameters
    assert max_rel(logits, reference) < 0.05


def test_mqa_cache_is_one_over_num_heads_of_mha():
    caches = {kv: init_cache(dataclasses.replace(BASE, num_kv_heads=kv), 3, 32) for kv in KV_HEADS}
    for kv, cache in caches.items():
        assert len(cache.layers) == BASE.num_layers
        shape = (3, kv, 32, BASE.head_dim) if kv > 1 else (3, 32, BASE.head_dim)  # no size-1 axis
        assert all(sorted(layer) == ["k", "v"] for layer in cache.layers)
        assert all(a.shape == shape for layer in cache.layers for a in layer.values())
        assert cache_nbytes(cache) * BASE.num_heads == cache_nbytes(caches[4]) * kv
        assert cache_nbytes(cache) == accounting.kv_cache_bytes(
            dataclasses.replace(BASE, num_kv_heads=kv), batch_size=3, context=32)
    assert cache_nbytes(caches[1]) * BASE.num_heads == cache_nbytes(caches[4])


def test_cache_longer_than_model_supports_is_an_error():
    with pytest.raises(ValueError, match="max_len=64 exceeds model.max_seq_len=32"):
        init_cache(BASE, 1, 64)


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("num_kv_heads", KV_HEADS)
def test_parameter_count_matches_model_and_hand_count(num_kv_heads, tie_embeddings):
    config = dataclasses.replace(BASE, num_kv_heads=num_kv_heads, tie_embeddings=tie_embeddings)
    model = Transformer(config, rngs=nnx.Rngs(0))
    actual = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # By hand for d_model 32, 4 heads of 8, mlp 48, 2 layers, vocab 64:
    q_and_out = 2 * 32 * 4 * 8
    k_and_v = 2 * 32 * num_kv_heads * 8
    mlp = 3 * 32 * 48
    norms = 2 * 32
    embeddings = 64 * 32 * (1 if tie_embeddings else 2)
    hand = 2 * (q_and_out + k_and_v + mlp + norms) + 32 + embeddings
    assert actual == hand == accounting.param_count(config)


def test_scan_unroll_changes_nothing_but_the_compiled_loop():
    toks = tokens()
    np.testing.assert_allclose(make(scan_unroll=2)(toks), make()(toks), rtol=1e-6, atol=1e-6)

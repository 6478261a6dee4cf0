"""The Transformer beyond the family table (test_families.py): untied embeddings, a batch
of one, the cache's layout, GQA as MHA with repeated K/V, remat, bfloat16, scan unrolling."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import BASE, decode, forward, jit, make, max_rel, reference_logits, tokens
from mqa.kv_cache import cache_nbytes, init_cache

KV_HEADS = [4, 2, 1]  # MHA, GQA, MQA


def test_untied_embeddings_match_the_reference_and_decode():
    """An output matrix of its own (`unembed`): the reference's logits, and cached decoding."""
    model = make(tie_embeddings=False)
    assert model.unembed.shape == (BASE.d_model, BASE.vocab_size)
    toks = tokens(length=16)
    full, (decoded, _) = forward(model, toks), decode(model, toks, chunk=5, chunks=1)
    assert max_rel(full, reference_logits(model, toks)) < 1e-5
    assert max_rel(decoded, full) < 1e-5


@pytest.mark.parametrize("changes", [dict(num_kv_heads=1), dict(attention="tied", num_kv_heads=1),
                                     dict(attention="latent", kv_latent_dim=12, rope_head_dim=4)],
                         ids=["MQA", "tied-1", "latent"])
def test_a_batch_of_one_decodes_through_buffers_without_batch_or_head_axes(changes):
    """One sequence, one K/V head (or a vector shared by all heads): every buffer is laid out
    [length, dim] ("sd"), and decoding through it gives the full-sequence logits."""
    model = make(**changes)
    toks = tokens(batch=1, length=16)
    full, (decoded, cache) = forward(model, toks), decode(model, toks, chunk=7, chunks=1)
    assert all(a.ndim == 2 for layer in cache.layers for name, a in layer.items())
    assert max_rel(decoded, full) < 1e-5


def test_decoding_reads_the_cache():
    """The cache carries the context: decoding a token against an emptied cache differs."""
    model = make(num_kv_heads=2)
    toks = tokens(length=6)
    graphdef, state = nnx.split(model)

    @jit
    def last_token(state, cache):
        return nnx.merge(graphdef, state).step(toks[:, 5:], cache)[0]

    _, cache = decode(model, toks[:, :5], chunk=5, chunks=1)
    emptied = cache._replace(layers=jax.tree.map(jnp.zeros_like, cache.layers))
    with_context, without_context = last_token(state, cache), last_token(state, emptied)
    np.testing.assert_allclose(with_context[:, 0], forward(model, toks)[:, 5], rtol=1e-5, atol=1e-5)
    assert np.abs(np.asarray(with_context - without_context)).max() > 1e-3


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
    np.testing.assert_allclose(forward(mha, toks), forward(gqa, toks), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_share_every", [1, 2])
def test_remat_changes_nothing_but_memory(kv_share_every):
    toks = tokens()

    def grads(model):
        graphdef, params = nnx.split(model, nnx.Param)
        loss = lambda p: jnp.mean(jax.nn.log_softmax(nnx.merge(graphdef, p)(toks))[..., 0])  # noqa: E731
        return jax.tree.leaves(jit(jax.grad(loss))(params))

    changes = dict(kv_share_every=kv_share_every)
    for a, b in zip(grads(make(**changes)), grads(make(**changes, remat=True)), strict=True):
        assert max_rel(a, b) < 1e-5


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = make(dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    logits = forward(model, tokens())
    assert logits.dtype == np.float32
    reference = forward(make(dtype="float32"), tokens())  # same seed, same parameters
    assert max_rel(logits, reference) < 0.05


def test_mqa_cache_is_one_over_num_heads_of_mha():
    caches = {kv: init_cache(dataclasses.replace(BASE, num_kv_heads=kv), 3, 32) for kv in KV_HEADS}
    for kv, cache in caches.items():
        assert len(cache.layers) == BASE.num_layers
        shape = (3, kv, 32, BASE.head_dim) if kv > 1 else (3, 32, BASE.head_dim)  # no size-1 axis
        assert all(sorted(layer) == ["k", "v"] for layer in cache.layers)
        assert all(a.shape == shape for layer in cache.layers for a in layer.values())
        assert cache_nbytes(cache) * BASE.num_heads == cache_nbytes(caches[4]) * kv


def test_cache_longer_than_model_supports_is_an_error():
    with pytest.raises(ValueError, match="max_len=64 exceeds model.max_seq_len=40"):
        init_cache(BASE, 1, 64)


def test_scan_unroll_changes_nothing_but_the_compiled_loop():
    toks = tokens()
    looped, unrolled = make(num_layers=4, scan_unroll=1), make(num_layers=4, scan_unroll=4)
    np.testing.assert_allclose(forward(looped, toks), forward(unrolled, toks), rtol=1e-6, atol=1e-6)

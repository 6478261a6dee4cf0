"""Cross-layer KV sharing (Brandon et al. 2024): each group of `kv_share_every` layers
attends to the keys and values its first layer computed."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa import accounting
from mqa.config import ConfigError, ModelConfig, load_config_file, build_model_config
from mqa.kv_cache import cache_nbytes, init_cache
from mqa.model import Transformer
from reference import transformer_loops
from test_model import decode_incrementally, max_rel, tokens

BASE = build_model_config(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2,
                   head_dim=8, mlp_dim=48, max_seq_len=32)


def make(seed=0, **changes):
    return Transformer(dataclasses.replace(BASE, **changes), rngs=nnx.Rngs(seed))


def layers_in_order(model):
    """Each layer's parameters as NumPy dicts, layer 0 first, from the stacked blocks."""
    share = model.config.kv_share_every
    first = nnx.to_pure_dict(nnx.state(model.blocks))
    shared = nnx.to_pure_dict(nnx.state(model.shared_blocks)) if share > 1 else None

    def layer(stack, index):
        flat = {}
        for part in ("attention_norm", "attention", "mlp_norm", "mlp"):
            for name, value in stack[part].items():
                flat[part if name == "scale" else name] = np.asarray(value[index])
        return flat

    return [layer(first, i // share) if i % share == 0 else
            layer(shared, (i // share) * (share - 1) + i % share - 1)
            for i in range(model.config.num_layers)]


@pytest.mark.parametrize("num_kv_heads", [4, 1])
@pytest.mark.parametrize("kv_share_every", [1, 2, 4])
def test_logits_match_float64_layer_by_layer_reference(kv_share_every, num_kv_heads):
    model = make(kv_share_every=kv_share_every, num_kv_heads=num_kv_heads)
    toks = tokens(length=10)
    expected = transformer_loops(layers_in_order(model), model.embed[...],
                                 model.final_norm.scale[...], toks, kv_share_every=kv_share_every)
    assert max_rel(model(toks), expected) < 1e-5


def test_only_the_first_layer_of_each_group_has_kv_projections():
    model = make(kv_share_every=2)
    layers = layers_in_order(model)
    assert ["k" in layer for layer in layers] == [True, False, True, False]
    assert model.blocks.attention.k.shape == (2, 32, 2, 8)  # [kv layers, m, kv heads, d]
    assert model.shared_blocks.attention.q.shape == (2, 32, 4, 8)


def test_shared_layers_really_read_the_first_layers_keys():
    """Changing group 0's K projection changes what layer 1 computes: the sharing is live."""
    model = make(kv_share_every=2)
    toks = tokens(length=8)
    before = model(toks)
    model.blocks.attention.k[...] = model.blocks.attention.k[...].at[0].multiply(2.0)
    assert max_rel(model(toks), before) > 1e-4


@pytest.mark.parametrize("attention_impl", ["einsum", "xla"])
@pytest.mark.parametrize("num_kv_heads", [4, 1])
def test_cached_decoding_matches_full_sequence(num_kv_heads, attention_impl):
    model = make(kv_share_every=2, num_kv_heads=num_kv_heads, attention_impl=attention_impl,
                 tie_embeddings=False)
    toks = tokens()
    incremental, cache = decode_incrementally(model, toks, prefill=5)
    assert int(cache.index) == toks.shape[1]
    assert max_rel(incremental, model(toks)) < 1e-5


@pytest.mark.parametrize("kv_share_every", [1, 2, 4])
def test_cache_shrinks_by_the_sharing_factor(kv_share_every):
    config = dataclasses.replace(BASE, kv_share_every=kv_share_every)
    cache = init_cache(config, 3, 32)
    assert len(cache.layers) == 4 // kv_share_every
    unshared = cache_nbytes(init_cache(BASE, 3, 32))
    assert cache_nbytes(cache) * kv_share_every == unshared
    assert cache_nbytes(cache) == accounting.kv_cache_bytes(config, batch_size=3, context=32)


@pytest.mark.parametrize("kv_share_every", [1, 2, 4])
def test_parameter_count_matches_model_and_hand_count(kv_share_every):
    config = dataclasses.replace(BASE, kv_share_every=kv_share_every)
    model = Transformer(config, rngs=nnx.Rngs(0))
    actual = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    # d_model 32, 4 query heads and 2 K/V heads of 8, mlp 48, 4 layers, vocab 64 (tied):
    per_layer = 2 * 32 * 4 * 8 + 3 * 32 * 48 + 2 * 32  # q, out, MLP, two norms
    k_and_v = 2 * 32 * 2 * 8
    hand = 4 * per_layer + (4 // kv_share_every) * k_and_v + 32 + 64 * 32
    assert actual == hand == accounting.param_count(config)


def test_widened_mlp_matches_mha_parameter_count_with_sharing():
    mha = dataclasses.replace(BASE, num_kv_heads=4)
    narrow = dataclasses.replace(BASE, num_kv_heads=1, kv_share_every=2)
    widened = dataclasses.replace(narrow, mlp_dim=accounting.mlp_dim_matching_mha(narrow))
    diff = abs(accounting.param_count(widened) - accounting.param_count(mha))
    assert widened.mlp_dim > BASE.mlp_dim and diff <= 1.5 * BASE.d_model * BASE.num_layers


def test_remat_changes_nothing_with_sharing():
    toks = tokens()

    def loss(model):
        return jnp.mean(jax.nn.log_softmax(model(toks))[..., 0])

    grads = nnx.grad(loss)(make(kv_share_every=2))
    remat_grads = nnx.grad(loss)(make(kv_share_every=2, remat=True))
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        assert max_rel(a, b) < 1e-5


@pytest.mark.parametrize("kv_share_every", [3, 5])
def test_sharing_must_divide_layers(kv_share_every):
    with pytest.raises(ConfigError, match=rf"model.kv_share_every={kv_share_every} must divide "
                                          r"model.num_layers=4; valid: 1, 2, 4$"):
        load_config_file("configs/default.py", [f"model.kv_share_every={kv_share_every}"])

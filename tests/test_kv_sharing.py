"""Cross-layer KV sharing (Brandon et al. 2024): each group of `kv_share_every` layers
attends to the keys and values its first layer computed. (Every family shares every 2
layers in the table of test_families.py; its remat in test_model.py.)"""

import dataclasses

import pytest

from helpers import BASE, REPO, forward, make, max_rel, reference_logits, tokens
from mqa import accounting
from mqa.config import ConfigError, load_config_file
from mqa.kv_cache import cache_nbytes, init_cache

FOUR = dataclasses.replace(BASE, num_layers=4)


def test_one_group_of_four_layers_matches_the_float64_reference():
    """Three layers reuse the first one's K/V (shared_blocks 0, 1, 2 in order)."""
    model = make(config=FOUR, kv_share_every=4, num_kv_heads=1)
    toks = tokens(length=10)
    assert max_rel(forward(model, toks), reference_logits(model, toks)) < 1e-5


def test_only_the_first_layer_of_each_group_has_kv_projections():
    model = make(config=FOUR, kv_share_every=2)
    assert model.blocks.attention.k.shape == (2, 32, 2, 8)  # [kv layers, m, kv heads, d]
    assert model.shared_blocks.attention.q.shape == (2, 32, 4, 8)
    assert not hasattr(model.shared_blocks.attention, "k")


def test_shared_layers_really_read_the_first_layers_keys():
    """Changing group 0's K projection changes what layer 1 computes: the sharing is live."""
    model = make(config=FOUR, kv_share_every=2)
    toks = tokens(length=8)
    before = forward(model, toks)
    model.blocks.attention.k[...] = model.blocks.attention.k[...].at[0].multiply(2.0)
    assert max_rel(forward(model, toks), before) > 1e-4


@pytest.mark.parametrize("kv_share_every", [1, 2, 4])
def test_cache_shrinks_by_the_sharing_factor(kv_share_every):
    config = dataclasses.replace(FOUR, kv_share_every=kv_share_every)
    cache = init_cache(config, 3, 32)
    assert len(cache.layers) == 4 // kv_share_every
    unshared = cache_nbytes(init_cache(FOUR, 3, 32))
    assert cache_nbytes(cache) * kv_share_every == unshared
    assert cache_nbytes(cache) == accounting.kv_cache_bytes(config, batch_size=3, context=32)


@pytest.mark.parametrize("kv_share_every", [3, 5])
def test_sharing_must_divide_layers(kv_share_every):
    with pytest.raises(ConfigError, match=rf"model.kv_share_every={kv_share_every} must divide "
                                          r"model.num_layers=4; valid: 1, 2, 4$"):
        load_config_file(REPO / "configs" / "default.py", [f"model.kv_share_every={kv_share_every}"])

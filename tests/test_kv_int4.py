"""The 4-bit KIVI cache (`model.kv_cache_dtype="int4"`, `mqa/kv_int4.py`) against a NumPy
model of what KIVI stores: after positions ..end-1 are written, the keys of every whole
group of G positions below (end // G) * G are the per-channel min/max round trip of that
group, the keys after it exact; every value is the per-token round trip of its groups of G
channels. Written here from the description, in float64."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa import accounting, kv_cache
from mqa.config import ConfigError, load_config_file
from helpers import BASE, REPO, decode, forward, make, tokens

GROUP = 4


def round_trip(x: np.ndarray, axis: int) -> np.ndarray:
    """Asymmetric 4-bit round trip of x over `axis`: 16 levels from min to max, the minimum
    and the step stored as float16."""
    low = x.min(axis=axis, keepdims=True).astype(np.float16).astype(np.float64)
    scale = ((x.max(axis=axis, keepdims=True) - low) / 15).astype(np.float16).astype(np.float64)
    levels = np.clip(np.round((x - low) / np.where(scale > 0, scale, 1)), 0, 15)
    return levels * scale + low


def kivi_keys(keys: np.ndarray, end: int) -> np.ndarray:
    """keys [t, d] (positions 0..t-1 written, t == end) as KIVI reads them."""
    out = keys.copy()
    for g in range(end // GROUP):
        rows = slice(g * GROUP, (g + 1) * GROUP)
        out[rows] = round_trip(keys[rows], axis=0)  # per channel over the group's tokens
    return out


def kivi_values(values: np.ndarray) -> np.ndarray:
    """values [t, d]: per token over groups of GROUP channels."""
    t, d = values.shape
    return round_trip(values.reshape(t, d // GROUP, GROUP), axis=-1).reshape(t, d)


@pytest.mark.parametrize("kv_heads, batch", [(2, 2), (1, 1)])  # "bksd" and "sd" layouts
def test_the_cache_reads_what_kivi_stores(kv_heads, batch):
    config = dataclasses.replace(BASE, num_kv_heads=kv_heads, kv_cache_dtype="int4",
                                 kv_quant_group=GROUP)
    cache = kv_cache.init_cache(config, batch, 23)  # padded to 24 positions
    buffers, axes = cache.layers[0], kv_cache.entry_axes(config, batch)
    rng = np.random.default_rng(0)
    k, v = (rng.normal(size=(batch, 23, kv_heads, 8)).astype(np.float32) for _ in range(2))
    k[..., 3] *= 20  # an outlier channel, as keys have
    update = jax.jit(lambda buffers, new, index: kv_cache.update(  # one compilation a chunk size
        buffers, new, axes, index, ring=False, dtype=jnp.float32))
    index = 0
    for chunk in (5, 3, 1, 1, 1, 6, 1, 4, 1):  # a prompt, chunks across groups, single tokens
        end = index + chunk
        new = {"k": jnp.asarray(k[:, index:end]), "v": jnp.asarray(v[:, index:end])}
        buffers, attended, positions = update(buffers, new, jnp.int32(index))
        assert positions is None
        for name, reference in (("k", lambda x: kivi_keys(x, end)), ("v", kivi_values)):
            read = np.asarray(attended[name]).reshape(batch, kv_heads, 24, 8)
            for b in range(batch):
                for h in range(kv_heads):
                    want = reference(np.asarray([k, v][name == "v"][b, :end, h], np.float64))
                    # float32 here and float64 there may round a float16 step one ulp apart
                    np.testing.assert_allclose(read[b, h, :end], want, atol=4e-3, rtol=2e-3)
        index = end
    assert kv_cache.cache_nbytes(kv_cache.KVCache(cache.layers, cache.index)) == \
        accounting.kv_cache_bytes(config, batch, 23)


def test_int4_decoding_is_close_to_the_full_computation_and_half_int8s_bytes():
    """A model decoding through the 4-bit cache stays near its full-sequence logits (within
    a few int8 errors), and at 2,048 tokens the cache takes 0.625 bytes a number (and a
    group of exact keys) against int8's 1.0625."""
    int4 = dataclasses.replace(BASE, kv_cache_dtype="int4", kv_quant_group=GROUP)
    toks = tokens(2, 24)
    model = make(0, int4)
    full = forward(model, toks)
    error4 = np.abs(decode(model, toks, 4, 3)[0] - full).max()
    error8 = np.abs(decode(make(0, dataclasses.replace(int4, kv_cache_dtype="int8")), toks, 4, 3)[0]
                    - full).max()
    assert error8 < error4 < 20 * error8
    big = dataclasses.replace(int4, head_dim=64, kv_quant_group=32, max_seq_len=2048)
    ratio = (accounting.kv_cache_bytes(big, 1, 2048)
             / accounting.kv_cache_bytes(dataclasses.replace(big, kv_cache_dtype="int8"), 1, 2048))
    assert 0.625 / 1.0625 < ratio < 0.625 / 1.0625 + 0.04


@pytest.mark.parametrize("overrides, message", [
    (["model.kv_cache_dtype=int4", "model.attention=tied"], "is for model.attention='grouped'"),
    (["model.kv_cache_dtype=int4", "model.sliding_window=8"], "without a sliding window"),
    (["model.kv_cache_dtype=int4", "model.kv_quant_group=5"], "model.kv_quant_group=5 must divide"),
])
def test_int4_config_errors_are_one_line(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config_file(REPO / "configs" / "tiny.py", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)

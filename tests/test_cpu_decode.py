"""The CPU decoding kernel (`model.decode_impl="cpu_kernel"`, mqa/attention/cpu_decode.cc):
masked grouped attention against a float64 NumPy computation written here, for MHA, GQA
and MQA shapes and tied attention's keys, head sizes with and without the vectorised
paths, several query positions, int8 caches read as stored, and per-row masks (as a
ragged batch gives them); and every family decoding through it as through the einsum core
or the float64 reference, with windows, sinks, int8 caches and prefill in chunks."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import BASE, FAMILIES, OPTIONS, REPO, SCHEDULES, decode, make, max_rel, reference_logits, tokens
from mqa.attention import cpu_decode
from mqa.config import ConfigError, load_config_file

pytestmark = [pytest.mark.skipif(not cpu_decode.compiler_found(), reason="no C++ compiler to build the kernel"),
              pytest.mark.usefixtures("fast_compile")]


def masked_attention(q, k, v, mask, scale):
    """float64: q [b, t, h, d], k [b, kv, s, d], v [b, kv, s, dv], mask [1 or b, t, s];
    query head j reads K/V head j // (h / kv); a query that sees nothing gets zeros."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, t, h, d = q.shape
    out = np.zeros((b, t, h, v.shape[-1]))
    for row in range(b):
        visible = np.asarray(mask)[row if len(mask) > 1 else 0]
        for head in range(h):
            kv = head // (h // k.shape[1])
            logits = np.where(visible, q[row, :, head] @ k[row, kv].T * scale, -np.inf)
            weights = np.exp(logits - logits.max(axis=1, keepdims=True, initial=-1e300))
            total = weights.sum(axis=1, keepdims=True)
            out[row, :, head] = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0) @ v[row, kv]
    return out


@pytest.mark.parametrize("b, t, h, kv, s, d, per_row, int8", [
    (3, 1, 8, 1, 150, 32, True, False),   # MQA decoding: 8 rows per K/V head, the 8-row path
    (3, 1, 8, 1, 150, 32, False, True),   # the same from an int8 cache
    (2, 3, 4, 2, 70, 24, False, False),   # GQA, 3 query positions (a prefill chunk), any head size
    (2, 3, 4, 2, 70, 24, True, True),     # the same from an int8 cache
    (1, 2, 8, 8, 33, 64, False, False),   # MHA
    (2, 1, 8, 1, 40, 64, True, True),     # 64-dim rows, 8 per K/V head (latent attention's shape), int8
    (2, 1, 16, 2, 20, 16, True, False),   # 8 query heads per K/V head, 16-dim heads
    (3, 3, 4, 1, 45, 32, True, True),     # 12 rows per K/V head: the 8-row path, then the 4-row one
    (2, 1, 9, 3, 77, 64, True, False),    # SmolLM2's 3 rows per K/V head: a 4-row block, one row padded
    (2, 1, 9, 3, 77, 64, True, True),     # the same from an int8 cache
    (2, 1, 14, 2, 50, 32, True, False),   # 7 rows: a 4-row block, then 3 padded
    (2, 2, 4, 1, 50, 256, True, False),   # Gemma 3's 256-dim heads: 64 value columns at a time
    (1, 2, 8, 1, 30, 128, False, True),   # 128-dim rows, 16 per K/V head: two 8-row blocks, int8
    (2, 1, 9, 1, 40, 128, True, False),   # 128-dim rows, 9: the plain loop (one pass over the cache)
])
def test_the_kernel_is_masked_attention_in_float64(b, t, h, kv, s, d, per_row, int8):
    """int8: the kernel reads int8 vectors and their scales; the reference attends to what
    they stand for, values x scale, in float64."""
    rng = np.random.default_rng(s)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    k, v = (rng.normal(size=(b, kv, s, d)).astype(np.float32) for _ in range(2))
    mask = rng.random((b if per_row else 1, t, s)) < 0.6
    mask[..., 0] = True
    if per_row:
        mask[0, 0] = False  # a query that sees no key at all
    stored = None
    if int8:
        stored = [(rng.integers(-127, 128, size=(b, kv, s, d)).astype(np.int8),
                   rng.uniform(0.001, 0.02, size=(b, kv, s)).astype(np.float32)) for _ in range(2)]
        k, v = (values * scales[..., None].astype(np.float64) for values, scales in stored)
        stored = tuple((jnp.asarray(values), jnp.asarray(scales)) for values, scales in stored)
    got = np.asarray(cpu_decode.attend_masked(jnp.asarray(q), jnp.asarray(k, jnp.float32),
                                              jnp.asarray(v, jnp.float32), jnp.asarray(mask), d, stored))
    np.testing.assert_allclose(got, masked_attention(q, k, v, mask, d ** -0.5), atol=2e-6, rtol=0)


@pytest.fixture
def chunk_bytes():
    """Sets the kernel's chunk size for one test (`cpu_decode.set_chunk_bytes`)."""
    previous = []
    yield lambda size: previous.append(cpu_decode.set_chunk_bytes(size))
    if previous:
        cpu_decode.set_chunk_bytes(previous[0])


@pytest.mark.parametrize("kv, h, s, d, dv, int8, window", [
    (1, 8, 700, 64, 48, False, None),   # MLA-48's shape: 8 rows on rows of 48 + 16, chunks of 64 positions
    (1, 8, 40, 64, 48, False, None),    # the same in one piece (shorter than a chunk)
    (1, 9, 600, 128, 64, False, 100),   # SmolLM2's latent rows: 9 on 64 + 64, a window (chunks a row never sees)
    (1, 9, 600, 192, 128, True, None),  # a width with no compiled size (the blocks at run-time width), int8
    (2, 6, 500, 48, 48, False, 64),     # 48 wide, 3 rows a K/V head (a 4-row block, one padded), all values
    (2, 2, 300, 80, 40, False, None),   # 80 (not a multiple of 16): the plain loop
])
def test_keys_that_are_the_values_are_read_in_chunks_once(kv, h, s, d, dv, int8, window, chunk_bytes):
    """One buffer as keys and values (latent attention's cached rows, tied attention's tied
    state): the kernel takes the positions in chunks (here of 16 KB), each chunk's two
    products while it lies in the processor's cache, and merges the chunks by their softmax
    statistics; the values are each row's first dv numbers (a latent row ends in its rotary
    key). The last 2 positions queried causally (and in a window), one row seeing nothing,
    against float64."""
    chunk_bytes(16384)
    b, t = 2, 2
    rng = np.random.default_rng(d)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    kv_rows = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    positions = np.arange(s - t, s)[:, None]
    mask = np.arange(s)[None] <= positions
    if window:
        mask &= np.arange(s)[None] > positions - window
    mask = np.broadcast_to(mask, (b, t, s)).copy()
    mask[0, 0] = False  # a query that sees no key at all
    stored, cache = None, jnp.asarray(kv_rows)
    if int8:
        values = rng.integers(-127, 128, size=kv_rows.shape).astype(np.int8)
        scales = rng.uniform(0.001, 0.02, size=kv_rows.shape[:-1]).astype(np.float32)
        kv_rows = values * scales[..., None].astype(np.float64)
        pair = (jnp.asarray(values), jnp.asarray(scales))
        stored, cache = (pair, pair), jnp.asarray(kv_rows, jnp.float32)
    before = cpu_decode.chunked_tasks()
    got = np.asarray(cpu_decode.attend_masked(jnp.asarray(q), cache, cache, jnp.asarray(mask), d, stored,
                                              value_dim=dv))
    chunk = max(16, 16384 // (d * (1 if int8 else 4)) // 16 * 16)
    assert cpu_decode.chunked_tasks() - before == (b * kv if s > chunk else 0)  # every task in chunks
    expected = masked_attention(q, kv_rows, kv_rows[..., :dv], mask, d ** -0.5)
    np.testing.assert_allclose(got, expected, atol=2e-6, rtol=0)


@pytest.mark.parametrize("kv, group, t, int8", [(1, 8, 2, False), (2, 8, 2, True), (2, 3, 1, False)])
def test_tied_keys_are_the_tied_state_and_the_shared_rotary_key(kv, group, t, int8):
    """GTA's layout (`cpu_decode.attend_tied`): head k's key at s is [tied[s, k, :16],
    k_rope[s]] and its value tied[s, k]; `group` query heads of 32 per K/V head (8: the 8-row
    path; 3 decoding: a 4-row block with its rotary queries padded too) over 60 keys, the
    last t positions queried causally, against float64."""
    b, h, s, d = 2, group * kv, 60, 32
    rng = np.random.default_rng(kv)
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    tied = rng.normal(size=(b, kv, s, d)).astype(np.float32)
    rope = rng.normal(size=(b, s, d // 2)).astype(np.float32)
    stored = None
    if int8:
        stored = [(rng.integers(-127, 128, size=x.shape).astype(np.int8),
                   rng.uniform(0.005, 0.02, size=x.shape[:-1]).astype(np.float32)) for x in (tied, rope)]
        tied, rope = (values * scales[..., None].astype(np.float64) for values, scales in stored)
        stored = tuple((jnp.asarray(values), jnp.asarray(scales)) for values, scales in stored)
    keys = np.concatenate([tied[..., :d // 2], np.broadcast_to(rope[:, None], (b, kv, s, d // 2))], -1)
    causal = (np.arange(s)[None] <= np.arange(s - t, s)[:, None])[None]
    got = cpu_decode.attend_tied(jnp.asarray(q), jnp.asarray(tied, jnp.float32), jnp.asarray(rope, jnp.float32),
                                 q_offset=s - t, int8=stored)
    np.testing.assert_allclose(np.asarray(got), masked_attention(q, keys, tied, causal, d ** -0.5),
                               atol=2e-6, rtol=0)


def kivi_buffers(rng, b, kv, s, d, key_group, value_group):
    """Random int4 buffers as `mqa.kv_int4` lays them out ([b, kv, s, ...]), and the keys and
    values they stand for in float64, unpacked here: byte i of a row holds numbers 2i (low
    nibble) and 2i + 1 (high); keys per channel and group of positions, values per
    position and group of channels, level x scale + minimum."""
    levels = [rng.integers(0, 16, size=(b, kv, s, d)) for _ in range(2)]
    packed = [(x[..., 0::2] | (x[..., 1::2] << 4)).astype(np.uint8) for x in levels]
    stats = lambda shape: [rng.uniform(0.01, 0.2, shape).astype(np.float16),  # noqa: E731
                           rng.uniform(-1.0, 0.0, shape).astype(np.float16)]
    k_scale, k_min = stats((b, kv, s // key_group, d))
    v_scale, v_min = stats((b, kv, s, d // value_group))
    per_position = lambda x: np.repeat(x.astype(np.float64), key_group, axis=2)  # noqa: E731
    per_channel = lambda x: np.repeat(x.astype(np.float64), value_group, axis=3)  # noqa: E731
    k = levels[0] * per_position(k_scale) + per_position(k_min)
    v = levels[1] * per_channel(v_scale) + per_channel(v_min)
    residual = rng.normal(size=(b, kv, key_group, d)).astype(np.float32)
    buffers = dict(k=packed[0], k_scale=k_scale, k_min=k_min, k_residual=residual,
                   v=packed[1], v_scale=v_scale, v_min=v_min)
    return {name: jnp.asarray(x) for name, x in buffers.items()}, k, v, residual


@pytest.mark.parametrize("b, t, h, kv, s, d, key_group, value_group, written", [
    (2, 1, 8, 1, 96, 32, 32, 32, 70),    # MQA: 2 groups quantized, the third the residual
    (1, 1, 9, 3, 64, 64, 32, 32, 64),    # SmolLM2's 9 on 3: every group quantized (none written past)
    (2, 3, 4, 2, 64, 64, 16, 64, 40),    # a prefill chunk of 3; groups of 16 positions, 64 channels
    (1, 1, 8, 1, 32, 128, 32, 32, 5),    # 128-dim rows, the only group the residual
    (1, 2, 4, 1, 64, 256, 32, 128, 33),  # 256-dim rows (Gemma 3's)
])
def test_an_int4_cache_is_read_as_stored(b, t, h, kv, s, d, key_group, value_group, written):
    """The kernel meets KIVI's packed levels, float16 scales and minima and the keys'
    exact residual where they lie; the reference attends in float64 to the keys and values
    they stand for, the residual's group (the one holding position `written`) exact."""
    rng = np.random.default_rng(d + s + written)
    buffers, k, v, residual = kivi_buffers(rng, b, kv, s, d, key_group, value_group)
    start = written // key_group * key_group
    if start < s:
        k[:, :, start:start + key_group] = residual
    q = rng.normal(size=(b, t, h, d)).astype(np.float32)
    mask = np.arange(s)[None, None, :] < written - t + 1 + np.arange(t)[None, :, None]  # causal
    assert cpu_decode.reads_int4(buffers)
    got = np.asarray(cpu_decode.attend_int4(jnp.asarray(q), buffers, jnp.asarray(mask), d, written=written))
    np.testing.assert_allclose(got, masked_attention(q, k, v, mask, d ** -0.5), atol=5e-5, rtol=1e-5)


CASES = {  # (family, option) of the family table
    "GQA, prefill in chunks": ("GQA", "none"),
    "MHA, local layers' rings": ("MHA", "local"),
    "MQA, local/global with sinks, int8": ("MQA", "sinks"),
    # latent attention's absorbed form: the cached rows are one K/V head's keys and values
    "latent with per-key rotary pairs, local/global": ("latent-q", "local-global"),
    "latent, int8": ("latent", "int8"),
    # tied attention: the tied state and a rotary key shared by the K/V heads
    "tied, K/V shared by 2 layers": ("tied", "sharing"),
    "GTA-1, local/global with sinks, int8": ("tied-1", "sinks"),
}


def kernel_config(family, option, **changes):
    return dataclasses.replace(BASE, **FAMILIES[family], **OPTIONS[option], decode_impl="cpu_kernel",
                               **changes)


def decode_case(case):
    """CASES[case]'s config and model through the kernel, and its 24-token decode schedule
    as a function of a model: -> logits."""
    family, option = CASES[case]
    config = kernel_config(family, option)
    toks, schedule = tokens(length=24), SCHEDULES.get(option, (4, 3))
    return config, make(config=config), lambda model: decode(model, toks, *schedule)[0]


@pytest.mark.parametrize("case", CASES)
def test_decoding_through_the_kernel_matches_the_reference(case):
    """Against the float64 reference, or with an int8 cache (which the reference does not
    quantize as the cache does) against decoding through the einsum core."""
    config, model, decoded_by = decode_case(case)
    decoded = decoded_by(model)
    if config.kv_cache_dtype:
        einsum = make(config=dataclasses.replace(config, decode_impl="einsum"))  # the same weights
        assert max_rel(decoded, decoded_by(einsum)) < 1e-5
    else:
        assert max_rel(decoded, reference_logits(model, tokens(length=24))) < 1e-5


@pytest.mark.parametrize("case", [case for case in CASES if CASES[case][0].startswith(("latent", "tied"))])
def test_keys_that_are_the_values_decode_in_chunks_as_in_one_pass(case, chunk_bytes):
    """Latent and tied attention decoding through the kernel with chunks of 16 positions
    (the 24-token schedule's caches take two): the same logits as the kernel's two whole
    passes, and the chunked path was taken."""
    _, model, decoded_by = decode_case(case)
    whole = decoded_by(model)
    chunk_bytes(16)  # 16 positions
    before = cpu_decode.chunked_tasks()
    chunked = decoded_by(model)
    assert cpu_decode.chunked_tasks() > before
    assert max_rel(chunked, whole) < 1e-5


@pytest.mark.parametrize("d, value_group, read", [(64, 32, True), (256, 128, True), (96, 32, False),
                                                  (64, 16, False), (8, 4, False)])
def test_which_int4_layers_the_kernel_reads_as_stored(d, value_group, read):
    """Heads of 32, 64, 128 or 256 numbers with value groups of a multiple of 32; others
    (96: a multiple of 32 the kernel has no path for) take the dequantized arrays."""
    buffers = {"v": jnp.zeros((5, 64, d // 2), jnp.uint8),
               "v_scale": jnp.zeros((5, 64, d // value_group), jnp.float16)}
    assert cpu_decode.reads_int4(buffers) is read

def test_an_int4_cache_decodes_through_the_kernel_as_through_the_einsum_core(monkeypatch):
    """A model with 32-dim heads and groups of 32 decodes 48 tokens (prefill chunks of 4,
    then one at a time: one key group quantized, the next the residual) through the kernel
    reading the int4 buffers as stored, and through XLA's dequantized arrays: the same
    logits. Heads of 8 (the family table's) take the dequantized arrays (`reads_int4`)."""
    config = kernel_config("GQA", "none", head_dim=32, max_seq_len=80, kv_cache_dtype="int4",
                           kv_quant_group=32)
    calls = []
    read = cpu_decode.attend_int4
    monkeypatch.setattr(cpu_decode, "attend_int4", lambda *a, **k: calls.append(1) or read(*a, **k))
    toks = tokens(length=48)
    decoded = decode(make(config=config), toks)[0]
    assert calls  # traced through the int4 path
    einsum = make(config=dataclasses.replace(config, decode_impl="einsum"))  # the same weights
    assert max_rel(decoded, decode(einsum, toks)[0]) < 1e-5
    calls.clear()
    small = kernel_config("GQA", "none", max_seq_len=40, kv_cache_dtype="int4", kv_quant_group=4)
    small_decoded = decode(make(config=small), tokens(length=24))[0]
    assert not calls and max_rel(small_decoded, decode(make(config=dataclasses.replace(
        small, decode_impl="einsum")), tokens(length=24))[0]) < 1e-5


@pytest.mark.parametrize("overrides, message", [
    (["model.decode_impl=ffi"], "model.decode_impl='ffi' is not one of: 'einsum', 'cpu_kernel'"),
    (["model.decode_impl=cpu_kernel", "model.dtype=bfloat16"],
     "model.decode_impl='cpu_kernel' computes in float32 (got model.dtype='bfloat16'); use 'einsum'"),
])
def test_what_the_kernel_cannot_take_is_a_one_line_error(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config_file(REPO / "configs" / "default.py", overrides)
    assert message in str(error.value) and "\n" not in str(error.value)

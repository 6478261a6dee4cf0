"""The attention core against a float64 loop-over-heads reference, for MHA, GQA and MQA."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mqa.attention import CacheEntry, attend, attend_jax, ordered_einsum, self_attention
from mqa.kv_cache import to_cache_axes
from helpers import jit
from helpers import max_rel as rel_error
from reference import attention_loops

# (num_heads, num_kv_heads): MHA, GQA, MQA
HEADS = [(4, 4), (4, 2), (4, 1), (6, 3)]
IMPLS = {"einsum": attend, "xla": functools.partial(attend_jax, implementation="xla")}
LENGTHS = [(7, 7), (3, 9), (1, 5)]  # (q_len, kv_len): full sequence, chunk, one decode step


def random_qkv(heads, kv_heads, q_len, kv_len, dtype=jnp.float32, seed=0, batch=2, dim=8):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, q_len, heads, dim))
    k = rng.standard_normal((batch, kv_len, kv_heads, dim))
    v = rng.standard_normal((batch, kv_len, kv_heads, dim))
    return tuple(jnp.asarray(a, dtype) for a in (q, k, v))


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("q_len,kv_len", LENGTHS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("impl", ["einsum", "xla"])
def test_matches_float64_reference(impl, causal, q_len, kv_len, heads, kv_heads):
    q, k, v = random_qkv(heads, kv_heads, q_len, kv_len)
    out = jit(IMPLS[impl], static_argnames="causal")(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert rel_error(out, attention_loops(q, k, v, causal=causal)) < 1e-5


@pytest.mark.parametrize("impl", [attend, attend_jax])
@pytest.mark.parametrize("q_offset", [0, 2, 5])
def test_explicit_query_offset(impl, q_offset):
    """Queries placed anywhere among the keys, as with a partly filled KV cache."""
    q, k, v = random_qkv(4, 2, 3, 10, seed=1)
    expected = attention_loops(q, k, v, q_offset=q_offset)
    static = jit(impl, static_argnames="q_offset")(q, k, v, q_offset=q_offset)
    assert rel_error(static, expected) < 1e-5
    traced = jit(lambda off: impl(q, k, v, q_offset=off))(jnp.int32(q_offset))
    assert rel_error(traced, expected) < 1e-5


@pytest.mark.parametrize("impl", [attend, attend_jax])
@pytest.mark.parametrize("batch,kv_heads", [(2, 2), (1, 2), (2, 1), (1, 1)])
def test_cache_layout_gives_the_same_result(impl, batch, kv_heads):
    """K/V laid out as the KV cache ([batch, kv_heads, kv_len, d] without size-1 axes: "bksd",
    "ksd", "bsd", "sd") give the same attention."""
    q, k, v = random_qkv(6, kv_heads, 3, 9, seed=8, batch=batch)
    expected = attention_loops(q, k, v, q_offset=4)
    layout = CacheEntry("k", kv_heads, 8).axes(batch)
    assert len(layout) == 2 + (batch > 1) + (kv_heads > 1)
    k, v = to_cache_axes(k, layout), to_cache_axes(v, layout)
    out = jit(impl, static_argnames=("q_offset", "kv_layout"))(q, k, v, q_offset=4, kv_layout=layout)
    assert rel_error(out, expected) < 1e-5


@pytest.mark.parametrize("spec", ["bksd,bkgd->bkgs", "bkgs,bksd->bkgd", "ij,jk->ik", "bij,bkj->bki"])
def test_ordered_einsum_is_einsum_with_the_left_operand_kept(spec):
    (xs, ys), out = spec.split("->")[0].split(","), spec.split("->")[1]
    rng = np.random.default_rng(3)
    size = dict(b=2, k=3, s=5, g=4, d=6, i=2, j=3)
    x, y = (jnp.asarray(rng.standard_normal([size[c] for c in axes]), jnp.float32)
            for axes in (xs, ys))
    np.testing.assert_allclose(ordered_einsum(spec, x, y), jnp.einsum(spec, x, y), rtol=1e-5,
                               atol=1e-5)
    jaxpr = jax.make_jaxpr(lambda x, y: ordered_einsum(spec, x, y))(x, y).jaxpr
    dot = next(e for e in jaxpr.eqns if e.primitive.name == "dot_general")
    assert dot.invars[0] is jaxpr.invars[0]  # x stays the left operand


@pytest.mark.parametrize("impl", ["einsum", "xla"])
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_bfloat16_inputs(impl, heads, kv_heads):
    q, k, v = random_qkv(heads, kv_heads, 16, 16, dtype=jnp.bfloat16, seed=2)
    out = jit(IMPLS[impl])(q, k, v)
    assert out.dtype == jnp.bfloat16
    expected = attention_loops(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    # bf16 keeps 8 significant bits: probabilities and outputs are each rounded once.
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=3e-2, rtol=2e-2)
    assert rel_error(out, expected) < 2e-2


def test_softmax_is_float32_for_bfloat16_inputs():
    """Long rows of nearly equal logits: a bf16 softmax would lose the small differences."""
    q, k, v = random_qkv(2, 1, 1, 512, dtype=jnp.bfloat16, seed=3)
    out = jit(attend)(q, k, v)
    expected = attention_loops(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert rel_error(out, expected) < 2e-2


def test_mqa_equals_mha_with_repeated_heads():
    """Sharing one K/V head is the same as MHA whose K/V heads are all that head."""
    q, k, v = random_qkv(8, 1, 6, 6, seed=4)
    repeated = jit(attend)(q, jnp.repeat(k, 8, axis=2), jnp.repeat(v, 8, axis=2))
    np.testing.assert_allclose(jit(attend)(q, k, v), repeated, rtol=1e-6, atol=1e-6)


def test_gqa_groups_are_contiguous_query_heads():
    """Query heads 0..g-1 read K/V head 0: changing K/V head 1 leaves them untouched."""
    q, k, v = random_qkv(4, 2, 5, 5, seed=5)
    out = jit(attend)(q, k, v)
    out2 = jit(attend)(q, k.at[:, :, 1].add(1.0), v.at[:, :, 1].add(1.0))
    np.testing.assert_array_equal(out[:, :, :2], out2[:, :, :2])
    assert np.abs(np.asarray(out[:, :, 2:] - out2[:, :, 2:])).max() > 1e-3


def test_does_not_materialise_repeated_kv():
    """No buffer in the compiled einsum path is as big as K broadcast to every query head."""
    batch, q_len, kv_len, heads, kv_heads, dim = 2, 3, 5, 8, 2, 4
    q, k, v = random_qkv(heads, kv_heads, q_len, kv_len, batch=batch, dim=dim, seed=6)
    hlo = jax.jit(attend).lower(q, k, v).compile().as_text()
    sizes = {int(np.prod([int(n) for n in dims.split(",") if n]))
             for dims in re.findall(r"f32\[([\d,]*)\]", hlo)}
    assert batch * kv_len * kv_heads * dim in sizes  # K itself is there
    assert batch * kv_len * heads * dim not in sizes  # K repeated per query head is not


@pytest.mark.parametrize("impl", ["einsum", "tiled", "blockwise", "xla"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1)])
def test_every_backend_runs_causal_self_attention_as_the_reference(impl, heads, kv_heads):
    """The backend registry, called as the model's SELF mode calls it (grouped core)."""
    q, k, v = random_qkv(heads, kv_heads, 12, 12, seed=4)
    out = jit(lambda q, k, v: self_attention(impl, 5)(attend, (q,), (k, v)))(q, k, v)
    assert rel_error(out, attention_loops(q, k, v)) < 1e-5


def test_unknown_impl_is_one_line_error():
    with pytest.raises(ValueError, match="model.attention_impl='flash'"):
        self_attention("flash", 64)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs an NVIDIA GPU")
@pytest.mark.parametrize("heads,kv_heads", [(8, 8), (8, 2), (8, 1)])
@pytest.mark.parametrize("q_len,kv_len", [(128, 128), (1, 128)])
def test_cudnn_matches_reference(heads, kv_heads, q_len, kv_len):
    q, k, v = random_qkv(heads, kv_heads, q_len, kv_len, dtype=jnp.bfloat16, dim=64, seed=7)
    out = jax.jit(functools.partial(attend_jax, implementation="cudnn"))(q, k, v)
    expected = attention_loops(q.astype(np.float32), k.astype(np.float32), v.astype(np.float32))
    assert rel_error(out, expected) < 2e-2

"""Parameter, FLOP and KV-cache accounting against hand counts. (Against built models, for
every family, cache policy and backend: the table in test_families.py.)"""

import dataclasses

import pytest

from helpers import param_count
from mqa import accounting
from mqa.config import build_model_config

MHA = build_model_config(vocab_size=256, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8,
                         head_dim=32, mlp_dim=1024)
SMALL = build_model_config(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=4,
                           head_dim=8, mlp_dim=48)


def test_kv_cache_bytes_by_hand():
    # 2 (K and V) x 4 layers x 8 heads x 32 dims x 4 bytes
    assert accounting.kv_cache_bytes_per_token(MHA) == 2 * 4 * 8 * 32 * 4 == 8192
    mqa = dataclasses.replace(MHA, num_kv_heads=1)
    assert accounting.kv_cache_bytes_per_token(mqa) == 1024
    assert accounting.kv_cache_bytes_per_token(mqa, "bfloat16") == 512
    assert accounting.kv_cache_bytes(mqa, batch_size=8, context=2048) == 8 * 2048 * 1024


def test_flops_per_token_by_hand():
    # Forward: 2 FLOPs per weight in q,k,v,o (4*256*256) and MLP (3*256*1024) per layer,
    # plus the output projection (256*256), plus QK^T and AV: 2*2*seq*d_model per layer.
    seq = 128
    weights = 4 * (4 * 256 * 256 + 3 * 256 * 1024) + 256 * 256
    forward = 2 * weights + 4 * (2 * 2 * seq * 256)
    assert accounting.flops_per_token(MHA, seq, training=False) == forward
    assert accounting.flops_per_token(MHA, seq) == 3 * forward


@pytest.mark.parametrize("tie_embeddings", [True, False])
@pytest.mark.parametrize("num_kv_heads, kv_share_every", [(4, 1), (2, 1), (1, 1), (2, 2), (2, 4)])
def test_parameter_count_by_hand(num_kv_heads, kv_share_every, tie_embeddings):
    """d_model 32, 4 query heads of 8, mlp 48, 4 layers, vocab 64: built and accounted."""
    config = dataclasses.replace(SMALL, num_kv_heads=num_kv_heads, kv_share_every=kv_share_every,
                                 tie_embeddings=tie_embeddings)
    per_layer = 2 * 32 * 4 * 8 + 3 * 32 * 48 + 2 * 32  # q, out, MLP, two norms
    k_and_v = 2 * 32 * num_kv_heads * 8  # in one layer of every kv_share_every
    embeddings = 64 * 32 * (1 if tie_embeddings else 2)
    hand = 4 * per_layer + (4 // kv_share_every) * k_and_v + 32 + embeddings
    assert param_count(config) == hand == accounting.param_count(config)
    mha = dataclasses.replace(config, num_kv_heads=4, kv_share_every=1)
    assert (hand < accounting.param_count(mha)) == (num_kv_heads < 4 or kv_share_every > 1)


def test_match_mha_params_through_config():
    values = dict(dataclasses.asdict(MHA), num_kv_heads=1, match_mha_params=True)
    config = build_model_config(values)
    # 8 -> 1 KV heads saves 2 * 256 * 32 * 7 weights per layer; 3 * 256 per MLP unit.
    assert config.mlp_dim == 1024 + round(2 * 256 * 32 * 7 / (3 * 256))
    built = param_count(config)
    assert built == accounting.param_count(config)
    assert abs(built - accounting.param_count(MHA)) <= 1.5 * 256 * 4


def test_decode_step_flops_by_hand():
    # Per sequence: 2 per weight (as the forward pass) + per layer QK^T and AV over the
    # cached positions: 2 * 8 heads * (32 + 32) numbers * context.
    weights = 4 * (4 * 256 * 256 + 3 * 256 * 1024) + 256 * 256
    assert accounting.decode_step_flops(MHA, 1, 100) == 2 * weights + 4 * 2 * 8 * 64 * 100
    assert accounting.decode_step_flops(MHA, 3, 100) == 3 * accounting.decode_step_flops(MHA, 1, 100)
    # A window caps what a local layer attends: layers 0-2 local (window 16), layer 3 global.
    local = dataclasses.replace(MHA, sliding_window=16, global_every=4)
    assert accounting.decode_step_flops(local, 1, 100) == 2 * weights + 2 * 8 * 64 * (3 * 16 + 100)


def xla_decode_flops(config, batch: int, context: int) -> float:
    """FLOPs XLA's cost analysis counts for one cached step (`Transformer.step`, one token
    per row) from a cache holding `context` positions, nothing allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from mqa.kv_cache import init_cache
    from mqa.model import Transformer

    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))

    def step(params, cache, token):
        return nnx.merge(graphdef, params).step(token[:, None], cache)[0]

    cache = jax.eval_shape(lambda: init_cache(config, batch, context))
    cache = cache._replace(index=jax.ShapeDtypeStruct((), jnp.int32))
    token = jax.ShapeDtypeStruct((batch,), jnp.int32)
    return jax.jit(step).lower(params, cache, token).cost_analysis()["flops"]


@pytest.mark.parametrize("overrides", [
    {}, dict(num_kv_heads=1), dict(num_kv_heads=2, kv_share_every=2),
    dict(attention="tied", num_kv_heads=2), dict(attention="latent", kv_latent_dim=48, rope_head_dim=16),
    dict(attention="latent", kv_latent_dim=48, rope_head_dim=16, rope_key_heads=2, num_kv_heads=1),
    dict(sliding_window=64, global_every=4), dict(sliding_window=64, attention_sinks=4),
], ids=["MHA", "MQA", "GQA2-CLA2", "GTA-2", "MLA", "MLA-2rope", "local-global", "window-sinks"])
def test_decode_step_flops_against_xla(overrides):
    """Every family's count against XLA's own (the compiled step's HLO): XLA counts the
    elementwise work too (softmax, norms, RoPE), which the matmul count leaves out, so it
    may exceed it by a few percent and never fall below."""
    config = build_model_config(**{**dict(vocab_size=512, d_model=128, num_layers=4, num_heads=8,
                                          num_kv_heads=8, head_dim=32, mlp_dim=256,
                                          max_seq_len=1024), **overrides})
    for batch, context in [(1, 512), (4, 900)]:
        ratio = xla_decode_flops(config, batch, context) / accounting.decode_step_flops(config, batch, context)
        assert 1.0 <= ratio < 1.06, (batch, context, ratio)

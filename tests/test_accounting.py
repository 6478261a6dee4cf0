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


def xla_decode_cost(config, batch: int, context: int, what: str = "flops") -> float:
    """What XLA's cost analysis counts (`what`: "flops" or "bytes accessed") for one cached
    step (`Transformer.step`, one token per row) from a cache holding `context` positions,
    nothing allocated."""
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
    return jax.jit(step).lower(params, cache, token).cost_analysis()[what]


@pytest.mark.parametrize("overrides", [
    {}, dict(num_kv_heads=1), dict(num_kv_heads=2, kv_share_every=2),
    dict(attention="tied", num_kv_heads=2), dict(attention="latent", kv_latent_dim=48, rope_head_dim=16),
    dict(attention="latent", kv_latent_dim=48, rope_head_dim=16, rope_key_heads=2, num_kv_heads=1,
         qk_nope_dim=16),
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
        ratio = xla_decode_cost(config, batch, context) / accounting.decode_step_flops(config, batch, context)
        assert 1.0 <= ratio < 1.06, (batch, context, ratio)


def test_decode_step_bytes_by_hand():
    # float32 weights, and the cache once per layer that reads it: 2 layers to a buffer
    # with cross-layer sharing, so half the cache is read twice.
    shared = dataclasses.replace(MHA, kv_share_every=2)
    cache = accounting.kv_cache_bytes(shared, 3, 100)
    assert cache == accounting.kv_cache_bytes(MHA, 3, 100) // 2
    assert accounting.decode_step_bytes(MHA, 1000) == accounting.param_count(MHA) * 4 + 1000
    assert accounting.decode_step_bytes(shared, cache) == accounting.param_count(shared) * 4 + 2 * cache


@pytest.mark.parametrize("kv_heads", [8, 2, 1])
def test_sharing_kv_across_layers_halves_the_cache_not_a_steps_reads(kv_heads):
    """XLA's count of the bytes a compiled step accesses grows with the context by the same
    amount with and without cross-layer sharing (each layer of a pair reads the shared
    buffer), while the cache it holds halves: what `decode_step_bytes` counts."""
    configs = [build_model_config(vocab_size=512, d_model=128, num_layers=4, num_heads=8,
                                  num_kv_heads=kv_heads, head_dim=32, mlp_dim=256, max_seq_len=2048,
                                  kv_share_every=share) for share in (1, 2)]
    slope = [xla_decode_cost(c, 4, 1536, "bytes accessed") - xla_decode_cost(c, 4, 512, "bytes accessed")
             for c in configs]
    assert slope[1] == pytest.approx(slope[0], rel=1e-3)
    held = [accounting.kv_cache_bytes(c, 4, 1536) - accounting.kv_cache_bytes(c, 4, 512) for c in configs]
    assert held[1] == held[0] // 2
    read = [accounting.decode_step_bytes(c, accounting.kv_cache_bytes(c, 4, 1536)) -
            accounting.decode_step_bytes(c, accounting.kv_cache_bytes(c, 4, 512)) for c in configs]
    assert read[1] == read[0] and slope[0] >= read[0]  # XLA's also counts the scores

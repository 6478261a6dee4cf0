"""Parameter, FLOP and KV-cache accounting against built models and hand counts."""

import dataclasses

import jax
import pytest
from flax import nnx

from mqa import accounting
from mqa.config import ModelConfig, build_model_config
from mqa.model import Transformer

MHA = build_model_config(vocab_size=256, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8,
                  head_dim=32, mlp_dim=1024)


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


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_widened_mlp_matches_mha_parameter_count(kv_heads):
    narrow = dataclasses.replace(MHA, num_kv_heads=kv_heads)
    widened = dataclasses.replace(narrow, mlp_dim=accounting.mlp_dim_matching_mha(narrow))
    assert widened.mlp_dim > MHA.mlp_dim
    diff = abs(accounting.param_count(widened) - accounting.param_count(MHA))
    assert diff <= 1.5 * MHA.d_model * MHA.num_layers
    assert accounting.param_count(narrow) < accounting.param_count(MHA)


def test_match_mha_params_through_config():
    values = dict(dataclasses.asdict(MHA), num_kv_heads=1, match_mha_params=True)
    config = build_model_config(values)
    # 8 -> 1 KV heads saves 2 * 256 * 32 * 7 weights per layer; 3 * 256 per MLP unit.
    assert config.mlp_dim == 1024 + round(2 * 256 * 32 * 7 / (3 * 256))
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    built = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert built == accounting.param_count(config)
    assert abs(built - accounting.param_count(MHA)) <= 1.5 * 256 * 4

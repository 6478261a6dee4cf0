"""Gemma 3's architecture switches (issue #26), each against the float64 reference.

QK-norm, post-norms, (1 + w) norms, GeGLU, a RoPE base of its own for local layers, the
embedding scale and the attention scale are ModelConfig fields whose defaults keep the
Llama computation; here each one alone, and all together as in Gemma 3 (with local and
global layers and num_heads * head_dim != d_model), gives the reference's logits, and
cached decoding through the ring caches gives the full-sequence logits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa import accounting
from mqa.attention import attend, attend_jax
from mqa.attention.blockwise import attend_blockwise
from mqa.config import ConfigError, build_model_config, load_config_file
from helpers import GEMMA, REPO, WINDOWED, decode, forward, make, max_rel, reference_logits, tokens
from mqa.model import Transformer

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile

SWITCHES = {name: {name: value} for name, value in GEMMA.items()}
SWITCHES["all"] = GEMMA
SWITCHES["all, d_model 48 != 4 heads x 8"] = dict(GEMMA, d_model=48)
# a retrofit to fewer global layers: layer 1 turns local but keeps the global RoPE base
SWITCHES["fewer global layers, bases kept"] = dict(GEMMA, global_every=4, rope_global_every=2)


@pytest.mark.parametrize("switch", SWITCHES)
def test_gemma_switch_matches_the_float64_reference_and_decodes_through_ring_caches(switch):
    model = make(**{**WINDOWED, **SWITCHES[switch]})
    toks = tokens(length=24)
    full = forward(model, toks)
    reference = reference_logits(model, toks)
    assert max_rel(full, reference) < 1e-5
    default = make(**WINDOWED)  # the switch changes the computation (same weights where shared)
    if switch != "all, d_model 48 != 4 heads x 8":
        assert max_rel(forward(default, toks), reference) > 1e-3
    # Decoding past the window (5) wraps each local layer's ring several times.
    assert max_rel(decode(model, toks, 7, 1)[0], full) < 1e-5


def test_parameters_of_the_gemma_switches_are_counted():
    for changes in SWITCHES.values():
        model = make(**{**WINDOWED, **changes})
        params = nnx.state(model, nnx.Param)
        assert sum(x.size for x in jax.tree.leaves(params)) == accounting.param_count(model.config)
    model = make(**WINDOWED, **GEMMA)
    names = {jax.tree_util.keystr(p, simple=True, separator=".")
             for p, _ in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model)))}
    assert {"blocks.attention.q_norm.scale", "blocks.attention.k_norm.scale",
            "blocks.attention_post_norm.scale", "blocks.mlp_post_norm.scale"} <= names


def test_one_plus_weight_norms_start_at_zero_and_at_the_identity_scale():
    model = Transformer(dataclasses.replace(make().config, norm_scale="one_plus_weight"),
                        rngs=nnx.Rngs(0))
    assert float(jnp.abs(model.final_norm.scale[...]).max()) == 0.0
    x = jnp.arange(1.0, 33.0)[None]
    np.testing.assert_allclose(model.final_norm(x), x / jnp.sqrt(jnp.mean(x * x) + 1e-5), rtol=1e-6)


@pytest.mark.parametrize("impl", ["einsum", "tiled", "blockwise", "xla"])
def test_every_grouped_backend_takes_the_attention_scale(impl):
    model = make(**WINDOWED, **GEMMA, attention_impl=impl, attention_block=8)
    toks = tokens(length=24)
    assert max_rel(forward(model, toks), reference_logits(model, toks)) < 1e-5


def test_grouped_kernels_scale_scores_by_score_dim():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 20, n, 8)), jnp.float32) for n in (4, 1, 1))
    ours = attend(q, k, v, score_dim=12, window=6)
    assert max_rel(attend_blockwise(q, k, v, score_dim=12, window=6, block=8), ours) < 1e-6
    assert max_rel(attend_jax(q, k, v, score_dim=12, window=6, implementation="xla"), ours) < 1e-6
    # the same scores as queries scaled by sqrt(8 / 12) under the default 1 / sqrt(8)
    assert max_rel(attend(q * (8 / 12) ** 0.5, k, v, window=6), ours) < 1e-6


@pytest.mark.parametrize("overrides, named", [
    (["model.attention=tied", "model.num_kv_heads=2", "model.qk_norm=true"], "model.qk_norm=True is for model.attention='grouped' only"),
    (["model.attention=tied", "model.num_kv_heads=2", "model.attention_score_dim=16"], "model.attention_score_dim=16 is for"),
    (["model.rope_local_theta=10000"], "model.rope_local_theta=10000.0 is the RoPE base of local layers and needs model.sliding_window > 0"),
    (["model.sliding_window=8", "model.rope_global_every=2"], "model.rope_global_every=2 chooses which layers"),
    (["model.attention_score_dim=-1"], "model.attention_score_dim=-1 must be >= 0"),
    (["model.mlp_activation=gelu"], "model.mlp_activation='gelu' is not one of: 'silu', 'gelu_tanh'"),
    (["model.norm_scale=plus_one"], "model.norm_scale='plus_one' is not one of: 'weight', 'one_plus_weight'"),
    (["model.qk_norm=true", "model.kv_share_every=2"], "model.qk_norm does not combine with model.kv_share_every=2"),
])
def test_gemma_fields_that_cannot_work_are_one_line_errors(overrides, named):
    with pytest.raises(ConfigError) as error:
        load_config_file(REPO / "configs" / "default.py", overrides)
    assert named in str(error.value) and "\n" not in str(error.value)


def test_heads_times_head_dim_need_not_equal_d_model():
    config = load_config_file(REPO / "configs" / "default.py",
                              ["model.d_model=640", "model.num_heads=4", "model.num_kv_heads=1",
                               "model.head_dim=256"])
    model_config = build_model_config(config.model)
    assert (model_config.d_model, model_config.num_heads * model_config.head_dim) == (640, 1024)

"""mqa.convert hf-gemma3 and gguf (gemma3): tiny random Gemma 3 models built by transformers
(no download) give transformers' logits and greedy tokens; bad input is one line.

The tiny model has local (sliding-window 4) and global layers, one K/V head, head_dim 16
with 4 heads against d_model 48, query_pre_attn_scalar 24 and random norm weights, and the
prompts are longer than the window, so every Gemma 3 switch and both layer kinds matter.
The parity tests need torch and transformers; the error tests only gguf.
"""

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import mqa
from mqa import accounting
from mqa.convert.__main__ import main as convert_cli
from mqa.kv_cache import init_cache
from tests.test_convert import refusal
from tests.transformers_utils import hf_logits, relative_error

REPO = pathlib.Path(__file__).resolve().parents[1]
# Layers 2 and 5 global (every 3rd), the others local with a window of 4 positions.
TINY = dict(vocab_size=101, hidden_size=48, intermediate_size=96, num_hidden_layers=6,
            num_attention_heads=4, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=24,
            sliding_window=4, max_position_embeddings=64, rms_norm_eps=1e-6,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2)


def tiny_gemma3(src: pathlib.Path, **changes):
    """Saves a random tiny Gemma3ForCausalLM (float32) to `src`; returns it."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **{**TINY, **changes}, initializer_range=0.2, attn_implementation="eager",
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10.0}})
    model = transformers.Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:  # they start at zeros (scale 1), which would hide a mix-up
                weight.uniform_(-0.5, 0.5)
    model.save_pretrained(src, safe_serialization=True)
    return model


def hf_greedy(model, prompt: np.ndarray, n: int) -> np.ndarray:
    import torch
    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt).long(), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out.numpy()


def test_hf_gemma3_converts_and_matches_transformers(tmp_path, capsys):
    src, out = tmp_path / "hf", tmp_path / "out"
    model = tiny_gemma3(src)
    convert_cli(["hf-gemma3", "--src", str(src), "--workdir", str(out)])
    printed = capsys.readouterr().out
    assert "6 layers (2 global, 4 local with a 4-token window)" in printed
    loaded = mqa.load_model(out)
    m = loaded.model_config
    assert (m.sliding_window, m.global_every, m.rope_theta, m.rope_local_theta) == (4, 3, 1000.0, 10.0)
    assert (m.num_heads * m.head_dim, m.d_model, m.attention_score_dim, m.qk_norm) == (64, 48, 24, True)

    tokens = np.random.default_rng(0).integers(0, 101, size=(2, 24), dtype=np.int32)
    error = relative_error(loaded(tokens), hf_logits(model, tokens))
    print(f"tiny Gemma 3: max relative logit error {error:.2e}")
    assert error < 1e-5

    prompt = tokens[:, :12]  # 12 > the window: the ring caches wrap while decoding
    ours = mqa.generate(loaded, prompt, 20)
    assert np.array_equal(ours, hf_greedy(model, prompt, 20))


def test_gemma3_cache_bytes_are_what_init_cache_allocates_and_windows_save(tmp_path):
    """Gemma 3 270M's shape at 2K, 8K and 32K: 15 local layers keep 512 positions."""
    config = mqa.config.build_model_config(
        None, vocab_size=262_144, d_model=640, num_layers=18, num_heads=4, num_kv_heads=1,
        head_dim=256, mlp_dim=2048, sliding_window=512, global_every=6, max_seq_len=32_768,
        rope_theta=1e6, rope_local_theta=1e4, attention_score_dim=256,
        **{k: v for k, v in mqa.convert.gemma_layout.GEMMA3.items()})
    import dataclasses
    import jax
    everything_global = dataclasses.replace(config, sliding_window=0, global_every=0,
                                            rope_local_theta=0.0)
    per_position = 2 * 1 * 256 * 4  # k and v, one head of 256, float32
    for context in (2048, 8192, 32_768):
        shapes = jax.eval_shape(lambda: init_cache(config, 1, context))
        allocated = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes.layers))
        assert accounting.kv_cache_bytes(config, 1, context) == allocated
        assert allocated == (3 * context + 15 * 512) * per_position
        assert accounting.kv_cache_bytes(everything_global, 1, context) == 18 * context * per_position

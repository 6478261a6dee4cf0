"""Generation with the KV cache against full-sequence recomputation; sampling; evaluation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa import data
from mqa.config import ModelConfig, default_config
from mqa.decode import generate, sample_token
from mqa.evaluation import evaluate_tokens, scored_positions
from mqa.loading import LoadedModel
from mqa.model import Transformer

CONFIG = ModelConfig(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                     head_dim=8, mlp_dim=64, max_seq_len=64)


def loaded(seed=0, **changes) -> LoadedModel:
    model_config = dataclasses.replace(CONFIG, **changes)
    graphdef, params = nnx.split(Transformer(model_config, rngs=nnx.Rngs(seed)))
    return LoadedModel(default_config(), model_config, graphdef, params, data.ByteTokenizer(),
                       0, None)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_greedy_generation_equals_argmax_of_full_recomputation(num_kv_heads):
    model = loaded(num_kv_heads=num_kv_heads)
    prompt = np.random.default_rng(0).integers(0, 256, (3, 5))
    out = generate(model, prompt, 12)
    assert out.shape == (3, 17) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :5], prompt)
    # One causal forward pass over the output recomputes every prefix from scratch: the
    # logits at t - 1 see exactly out[:, :t] (causality is tested in test_model.py).
    logits = np.asarray(model(out))
    np.testing.assert_array_equal(out[:, 5:], np.argmax(logits[:, 4:-1], axis=-1))


def test_sampling_is_seeded_and_stays_in_top_k():
    model = loaded()
    prompt = np.array([[1, 2, 3]])
    a = generate(model, prompt, 20, temperature=1.0, seed=1)
    b = generate(model, prompt, 20, temperature=1.0, seed=1)
    c = generate(model, prompt, 20, temperature=1.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(model, prompt, 20)
    np.testing.assert_array_equal(generate(model, prompt, 20, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(generate(model, prompt, 20, temperature=1.0, top_p=1e-6), greedy)


def test_sample_token_filters():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    top2 = np.asarray(jax.vmap(lambda k: sample_token(logits, k, temperature=1.0, top_k=2)[0])(keys))
    assert set(top2) == {0, 1}
    nucleus = np.asarray(jax.vmap(lambda k: sample_token(logits, k, temperature=1.0, top_p=0.7)[0])(keys))
    assert set(nucleus) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    everything = np.asarray(jax.vmap(lambda k: sample_token(logits, k, temperature=1.0)[0])(keys))
    assert set(everything) == {0, 1, 2, 3}
    assert abs(np.mean(everything == 0) - 0.5) < 0.1


def test_generation_longer_than_the_model_supports_is_an_error():
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        generate(loaded(), np.zeros((1, 60), np.int32), 10)


@pytest.mark.parametrize("stride", [None, 16, 5, 1])
def test_every_token_is_scored_exactly_once(stride):
    """Windows over 0, 1, 2, ...: the scored targets are each index once, in order."""
    seq_len, n = 16, 200
    windows = data.eval_windows(np.arange(n), seq_len, stride=stride)
    mask = scored_positions(len(windows), seq_len, stride or seq_len)
    scored = windows[:, 1:][mask]
    np.testing.assert_array_equal(np.sort(scored), np.arange(1, 1 + len(scored)))
    assert len(scored) > n - seq_len - (stride or seq_len)


def test_evaluation_matches_a_direct_computation():
    model = loaded(num_kv_heads=2)
    tokens = np.random.default_rng(3).integers(0, 256, 100)
    result = evaluate_tokens(model, tokens, seq_len=16, batch_size=4, progress=False)
    windows = data.eval_windows(tokens, 16)
    log_probs = jax.nn.log_softmax(np.asarray(model(windows[:, :-1]), np.float64), axis=-1)
    nll = -np.take_along_axis(np.asarray(log_probs), windows[:, 1:, None], -1)
    assert result["tokens"] == nll.size
    assert result["loss"] == pytest.approx(nll.mean(), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(nll.mean()), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll.mean() / np.log(2), rel=1e-5)

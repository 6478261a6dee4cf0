"""Generation with the KV cache against full-sequence recomputation; sampling; evaluation."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import loaded as as_loaded
from helpers import make
from mqa import data
from mqa.config import build_model_config
from mqa.decode import _generate, generate, sample_token
from mqa.evaluation import evaluate_tokens, scored_positions
from mqa.kv_cache import init_cache
from mqa.loading import LoadedModel

# XLA's HLO passes, where cache copies would appear, run all the same.
pytestmark = pytest.mark.usefixtures("fast_compile")

CONFIG = build_model_config(vocab_size=256, d_model=32, num_layers=2, num_heads=4, num_kv_heads=1,
                            head_dim=8, mlp_dim=64, max_seq_len=64)


def loaded(seed=0, **changes) -> LoadedModel:
    return as_loaded(make(seed, config=CONFIG, **changes))


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_greedy_generation_equals_argmax_of_full_recomputation(num_kv_heads):
    """(The shapes of test_the_decoding_loop_updates_the_cache_in_place's batch of 3: one
    compiled program for both, through the compilation cache.)"""
    model = loaded(num_kv_heads=num_kv_heads)
    prompt = np.random.default_rng(0).integers(0, 256, (3, 4))
    out = generate(model, prompt, 12)
    assert out.shape == (3, 16) and out.dtype == np.int32
    np.testing.assert_array_equal(out[:, :4], prompt)
    # One causal forward pass over the output recomputes every prefix from scratch: the
    # logits at t - 1 see exactly out[:, :t] (causality: the table in test_families.py).
    logits = np.asarray(model(out))
    np.testing.assert_array_equal(out[:, 4:], np.argmax(logits[:, 3:-1], axis=-1))


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



def cache_copies_in_loops(hlo: str, cache_dims: list[int]) -> list[str]:
    """Instructions inside compiled while-loop bodies that copy or transpose an array with
    the cache buffer's elements (its dimensions other than 1, in any order)."""
    bodies = set(re.findall(r"body=%?([\w.-]+)", hlo))
    wanted = sorted(d for d in cache_dims if d > 1)
    found = []
    for block in re.split(r"\n(?=\S)", hlo):  # computations start at column 0
        if block.split(" ")[0].lstrip("%") not in bodies:
            continue
        for line in block.splitlines()[1:]:
            match = re.match(r"\s*(?:ROOT )?%([\w.-]+) = \w+\[([\d,]*)\]\S* ([\w-]+)\(", line)
            if not match:
                continue
            name, dims, op = match.groups()
            moves = op in ("copy", "transpose") or name.startswith(("copy", "transpose"))
            if moves and sorted(int(d) for d in dims.split(",") if d and int(d) > 1) == wanted:
                found.append(line.strip()[:100])
    return found


LOOP_FAMILIES = {
    "MHA": dict(num_kv_heads=4), "GQA-2": dict(num_kv_heads=2), "MQA": dict(num_kv_heads=1),
    "GTA-2": dict(attention="tied", num_kv_heads=2), "GTA-1": dict(attention="tied", num_kv_heads=1),
    "MLA": dict(attention="latent", kv_latent_dim=12, rope_head_dim=4),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("family", LOOP_FAMILIES)
def test_the_decoding_loop_updates_the_cache_in_place(family, batch):
    """Compiled generation never copies or transposes a cache buffer inside the token loop:
    each step writes one position and reads each buffer as it lies, the memory traffic that
    bounds decoding. (XLA on CPU copied the MQA cache three times per layer and step when the
    buffer had a size-1 axis, and transposed it when the values were a matmul's left operand;
    tied and latent attention, through jnp.einsum, copied or transposed theirs.)"""
    model = loaded(**LOOP_FAMILIES[family])
    prompt = jnp.zeros((batch, 4), jnp.int32)
    hlo = _generate.lower(model.graphdef, model.params, prompt, jax.random.key(0),
                          max_new_tokens=12, temperature=0.0, top_k=None,
                          top_p=None).compile().as_text()
    assert "while(" in hlo and "dynamic-update-slice" in hlo
    buffers = init_cache(model.model_config, batch, 16).layers[0]
    copies = [line for buffer in buffers.values()
              for line in cache_copies_in_loops(hlo, list(buffer.shape))]
    assert not copies, f"cache copied in the token loop: {copies}"


def test_a_ragged_batch_decodes_with_the_cache_in_place_too():
    """Rows at their own positions (`KVCache.starts`) change the masks and the rotary
    positions, not how the cache is written or read."""
    model = loaded(num_kv_heads=1)
    hlo = _generate.lower(model.graphdef, model.params, jnp.zeros((3, 4), jnp.int32),
                          jax.random.key(0), jnp.asarray([0, 2, 3], jnp.int32), max_new_tokens=12,
                          temperature=0.0, top_k=None, top_p=None).compile().as_text()
    buffers = init_cache(model.model_config, 3, 16).layers[0]
    assert not [line for buffer in buffers.values()
                for line in cache_copies_in_loops(hlo, list(buffer.shape))]

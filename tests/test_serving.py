"""Continuous batching (`mqa.serving`): requests join and leave a running batch, each row's
ring keeping only its own sequence, and every request gets what it gets alone."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mqa
from helpers import BASE, FAMILIES, OPTIONS, loaded, make
from mqa.kv_cache import init_cache
from mqa.serving import ServeStats, bucket, init_serving_cache, prefill_into, serve

pytestmark = pytest.mark.usefixtures("fast_compile")  # tests of values: XLA's quick compile


def config_of(family, option, **changes):
    return dataclasses.replace(BASE, **FAMILIES[family], **OPTIONS[option], **changes)


def test_each_request_gets_the_tokens_it_gets_alone():
    """Six requests through two rows: rows are refilled as requests finish, the write head
    runs more than once round every ring, and each continuation equals `mqa.generate`'s.
    Latent attention with local and global layers and an int8 cache (grouped attention:
    the refilled-row test below)."""
    model = loaded(make(config=config_of("latent-q", "local-global", kv_cache_dtype="int8")))
    rng = np.random.default_rng(0)
    lengths, wanted = [3, 9, 5, 12, 4, 7], [6, 3, 10, 5, 8, 2]
    prompts = [rng.integers(0, BASE.vocab_size, n).astype(np.int32) for n in lengths]
    stats = ServeStats()
    outs = serve(model, prompts, wanted, batch_size=2, steps_per_call=3, stats=stats)
    max_len = max(n + k for n, k in zip(lengths, wanted))
    assert stats.prefills == 6 and stats.steps > max_len  # the head wrapped: slots were reused
    assert stats.tokens == sum(wanted)
    # each alone: one ragged batch, which decodes every row as alone (tests/test_ragged.py),
    # cut to each request's length (greedy: the first k tokens do not depend on the rest)
    alone_rows = mqa.generate(model, prompts, max(wanted))
    for prompt, n, out, row in zip(prompts, wanted, outs, alone_rows):
        np.testing.assert_array_equal(out, row[len(prompt):len(prompt) + n])


def test_static_batching_waits_for_the_longest_request():
    """The baseline policy gives the same tokens, but a row that finishes early idles until
    the whole batch is done: more steps for the same tokens."""
    model = loaded(make(config=config_of("GQA", "none")))
    prompts = [np.arange(1, n + 1, dtype=np.int32) for n in (3, 4, 5, 6)]
    wanted = [12, 2, 12, 2]
    runs = {}
    for policy in ("continuous", "static"):
        stats = ServeStats()
        runs[policy] = serve(model, prompts, wanted, batch_size=2, steps_per_call=2,
                             policy=policy, stats=stats), stats
    for a, b in zip(runs["continuous"][0], runs["static"][0]):
        np.testing.assert_array_equal(a, b)
    continuous, static = runs["continuous"][1], runs["static"][1]
    assert continuous.busy_row_steps == static.busy_row_steps == sum(wanted) - len(wanted)
    assert static.steps > continuous.steps


@jax.jit
def alone(model, tokens):
    """Logits [len, vocab] of one sequence, prefilled from empty."""
    logits, _ = model.step(tokens[None], init_cache(model.config, 1, tokens.shape[0]))
    return logits[0]


def test_a_refilled_row_sees_only_its_new_sequence():
    """Row 0 decodes one sequence, then takes another: the new one's logits (at prefill and
    at the next wrapped step) equal its own alone, and row 1 is untouched throughout."""
    config = config_of("MQA", "local-global", kv_cache_dtype="int8")
    model = make(config=config)
    graphdef, params = nnx.split(model)
    rng = np.random.default_rng(1)
    first, other, new = (rng.integers(0, BASE.vocab_size, n).astype(np.int32) for n in (7, 4, 5))
    following = rng.integers(0, BASE.vocab_size, (2, 6)).astype(np.int32)

    def put(cache, row, tokens):
        width = bucket(len(tokens), 16)
        padded = jnp.asarray(np.pad(tokens, (width - len(tokens), 0), constant_values=9))
        return prefill_into(graphdef, params, cache, jnp.int32(row), padded,
                            jnp.int32(width - len(tokens)))

    step = jax.jit(lambda cache, tokens: model.step(tokens[:, None], cache, wrap=True))
    cache = init_serving_cache(config, 2, 16)
    _, cache = put(cache, 0, first)
    _, cache = put(cache, 1, other)
    for i in range(5):  # both rows decode
        logits, cache = step(cache, jnp.asarray(following[:, i]))
    row1 = np.concatenate([other, following[1, :5]])
    np.testing.assert_allclose(logits[1, -1], alone(model, jnp.asarray(row1))[-1], atol=2e-5)

    prefill_logits, cache = put(cache, 0, new)  # row 0 is refilled
    np.testing.assert_allclose(prefill_logits, alone(model, jnp.asarray(new))[-1], atol=2e-5)
    logits, cache = step(cache, jnp.asarray([following[0, 5], following[1, 5]]))
    row0 = np.concatenate([new, following[:1, 5]])
    row1 = np.concatenate([other, following[1, :6]])
    np.testing.assert_allclose(logits[0, -1], alone(model, jnp.asarray(row0))[-1], atol=2e-5)
    np.testing.assert_allclose(logits[1, -1], alone(model, jnp.asarray(row1))[-1], atol=2e-5)


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(max_len=8), "request 0 (prompt of 6 tokens + 4 new) does not fit"),
    (dict(batch_size=0), "batch_size=0 and steps_per_call=8 at least 1"),
    (dict(policy="eager"), "policy='eager' is not one of: continuous, static"),
    (dict(max_len=41), "max_len=41 must be at most model.max_seq_len=40"),
])
def test_bad_requests_are_one_line_errors(kwargs, fragment):
    model = loaded(make(config=BASE))
    with pytest.raises(ValueError, match="^.*$") as error:
        serve(model, [np.arange(6)], 4, **{"batch_size": 2, **kwargs})
    assert fragment in str(error.value) and "\n" not in str(error.value)


def test_sinks_are_refused():
    model = loaded(make(config=config_of("MQA", "none", sliding_window=5, attention_sinks=2)))
    with pytest.raises(ValueError, match="attention_sinks"):
        serve(model, [np.arange(3)], 2, batch_size=2)

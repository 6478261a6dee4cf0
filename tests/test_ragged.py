"""Ragged batches (`KVCache.starts`): rows of different lengths in one batch, each
left-padded to the longest and decoded at its own positions, give every row the logits it
gets alone at batch 1, in every family and cache policy that takes them."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from helpers import BASE, FAMILIES, OPTIONS, jit, make
from mqa.kv_cache import init_cache

LENGTHS = (4, 9, 6)   # the rows' prompts; the longest sets the padded width
STEPS = 3             # then decoded together, a token at a time
CONFIGS = {  # (family, option) of the family table: plain and ring caches, int8 and int4
    "GQA": ("GQA", "none"), "MQA-local-global": ("MQA", "local-global"),
    "tied-int8": ("tied", "int8"), "latent-q-local": ("latent-q", "local"),
}


def config_of(name):
    family, option = CONFIGS[name]
    return dataclasses.replace(BASE, **FAMILIES[family], **OPTIONS[option])


@jit
def run(model, prompt, following, starts=None):
    """Logits [batch, STEPS + 1, vocab]: the prompt's last position, then each of the
    following tokens fed one at a time (one compilation per shape, shared by the calls)."""
    cache = init_cache(model.config, prompt.shape[0], prompt.shape[1] + STEPS, starts=starts)
    logits, cache = model.step(prompt, cache)
    out = [logits[:, -1]]
    for i in range(STEPS):
        logits, cache = model.step(following[:, i:i + 1], cache)
        out.append(logits[:, -1])
    return jnp.stack(out, axis=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_a_ragged_batch_gives_each_row_its_own_logits(name):
    config = config_of(name)
    model = make(config=config)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, config.vocab_size, n).astype(np.int32) for n in LENGTHS]
    following = rng.integers(0, config.vocab_size, (len(LENGTHS), STEPS)).astype(np.int32)
    width = max(LENGTHS)
    padded = np.stack([np.pad(p, (width - len(p), 0), constant_values=7) for p in prompts])
    starts = jnp.asarray([width - n for n in LENGTHS], jnp.int32)
    together = np.asarray(run(model, jnp.asarray(padded), jnp.asarray(following), starts))
    for row, prompt in enumerate(prompts):
        alone = np.asarray(run(model, jnp.asarray(prompt[None]), jnp.asarray(following[row:row + 1])))
        np.testing.assert_allclose(together[row], alone[0], atol=2e-5, rtol=0, err_msg=f"row {row}")
    # the padding is ignored, not merely unlikely: other pad tokens change nothing
    repadded = np.where(np.arange(width)[None] < np.asarray(starts)[:, None], 11, padded)
    np.testing.assert_array_equal(np.asarray(run(model, jnp.asarray(repadded), jnp.asarray(following), starts)),
                                  together)


@pytest.mark.parametrize("changes", [dict(sliding_window=5, attention_sinks=2),
                                     dict(kv_cache_dtype="int4", kv_quant_group=4)])
def test_ragged_rows_with_sinks_or_int4_are_refused(changes):
    """Sink slots hold the batch's first slots, and int4 key groups span slots: with
    padding neither would give a row what it gets alone."""
    with pytest.raises(ValueError, match="a ragged batch .* does not combine"):
        init_cache(dataclasses.replace(BASE, **changes), 2, 16, starts=jnp.asarray([0, 3]))


def test_generating_a_ragged_batch_continues_each_prompt_as_alone():
    """`mqa.generate` with prompts of different lengths: each row's greedy continuation is
    the one it gets alone (the tokens, so up to argmax ties, which random logits do not have)."""
    from helpers import loaded
    from mqa.decode import generate
    model = loaded(make(config=config_of("MQA-local-global")))
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, BASE.vocab_size, n).tolist() for n in (3, 7)]
    together = generate(model, prompts, 8)
    assert [len(row) for row in together] == [3 + 8, 7 + 8]
    for prompt, row in zip(prompts, together):
        np.testing.assert_array_equal(row, generate(model, np.asarray(prompt), 8)[0])

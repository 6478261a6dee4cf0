"""Autoregressive generation with the KV cache: one prefill, then one cached step per token.

The whole generation (prefill, the token loop, sampling) is a single jitted computation:
the loop is a `lax.scan`, so each new token costs no Python and no extra dispatch, and the
cache lives in the loop's carry, written in place with `dynamic_update_slice` and read as
it lies (tests/test_decode.py checks the compiled loop for copies of it).
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mqa.kv_cache import KVCache, init_cache
from mqa.loading import LoadedModel
from mqa.model import Transformer


def sample_token(logits: jax.Array, key: jax.Array, *, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None) -> jax.Array:
    """Picks one token per row. logits: float32 [batch, vocab] -> int32 [batch].

    temperature 0 is greedy (argmax). Otherwise logits / temperature, restricted to the
    `top_k` most likely tokens and/or the smallest set whose probability reaches `top_p`.
    """
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest logit still needed to reach top_p (the most likely token always stays).
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def decode_tokens(model: Transformer, layers: tuple, cache: KVCache, token: jax.Array,
                  keys: jax.Array, sample: Callable[[jax.Array, jax.Array], jax.Array], *,
                  wrap: bool = False) -> tuple[tuple[jax.Array, KVCache], jax.Array]:
    """The token loop: one cached step per key, each feeding back the token it samples.

    token: int32 [batch], the last token so far; keys: [steps] random keys; sample(logits
    [batch, vocab], key) -> int32 [batch]; layers: `model.layer_params()`; wrap: every
    layer's buffers are rings (`Transformer.step`; continuous batching, `mqa.serving`).
    Returns ((the last token, the cache), int32 [steps, batch] the sampled tokens).
    A `lax.scan`, so each step costs no Python; the cache is its carry, written in place.
    """
    def one(carry, step_key):
        token, cache = carry
        logits, cache = model.step(token[:, None], cache, layers, wrap=wrap)
        next_token = sample(logits[:, -1], step_key)
        return (next_token, cache), next_token

    return jax.lax.scan(one, (token, cache), keys)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature",
                                             "top_k", "top_p"))
def _generate(graphdef, params, prompt, key, starts=None, *, max_new_tokens, temperature, top_k, top_p):
    model = nnx.merge(graphdef, params)
    batch, prompt_len = prompt.shape
    cache = init_cache(model.config, batch, prompt_len + max_new_tokens, starts=starts)
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    layers = model.layer_params()  # sliced once, outside the token loop
    logits, cache = model.step(prompt, cache, layers)
    keys = jax.random.split(key, max_new_tokens)
    first = sample(logits[:, -1], keys[0])
    _, rest = decode_tokens(model, layers, cache, first, keys[1:], sample)
    return jnp.concatenate([prompt, first[:, None], rest.T], axis=1)


def generate(model: LoadedModel, prompt_tokens, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0) -> np.ndarray:
    """Continues each prompt by `max_new_tokens` tokens.

    prompt_tokens: int [batch, prompt_len] (or [prompt_len]), or a list of prompts of
      different lengths: a ragged batch, decoded together with each row left-padded to the
      longest and at its own positions (`KVCache.starts`), as each would be alone.
    Returns int32 [batch, prompt_len + max_new_tokens]: the prompts and their continuations;
    for a ragged batch a list of int32 arrays, each prompt followed by its continuation.
    """
    ragged = isinstance(prompt_tokens, (list, tuple)) and len({len(p) for p in prompt_tokens}) > 1
    starts = None
    if ragged:
        rows = [np.asarray(p, np.int32).reshape(-1) for p in prompt_tokens]
        width = max(len(r) for r in rows)
        if min(len(r) for r in rows) < 1:
            raise ValueError("every prompt of a ragged batch needs at least one token")
        prompt = jnp.asarray(np.stack([np.pad(r, (width - len(r), 0)) for r in rows]))
        starts = jnp.asarray([width - len(r) for r in rows], jnp.int32)
    else:
        prompt = jnp.asarray(prompt_tokens, jnp.int32)
    prompt = prompt[None] if prompt.ndim == 1 else prompt
    total = prompt.shape[1] + max_new_tokens
    limit = model.model_config.max_seq_len
    if prompt.shape[1] < 1 or max_new_tokens < 1:
        raise ValueError(f"need a non-empty prompt and max_new_tokens >= 1, got prompt length "
                         f"{prompt.shape[1]} and max_new_tokens={max_new_tokens}")
    if total > limit:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens={max_new_tokens} = "
                         f"{total} exceeds model.max_seq_len={limit}")
    if temperature < 0 or (top_k is not None and not 1 <= top_k <= model.model_config.vocab_size) \
            or (top_p is not None and not 0 < top_p <= 1):
        raise ValueError(f"invalid sampling settings temperature={temperature}, top_k={top_k}, "
                         f"top_p={top_p}; need temperature >= 0, 1 <= top_k <= vocab size, "
                         "0 < top_p <= 1")
    out = np.asarray(_generate(model.graphdef, model.params, prompt, jax.random.key(seed), starts,
                               max_new_tokens=max_new_tokens, temperature=float(temperature),
                               top_k=top_k, top_p=top_p))
    return [row[start:] for row, start in zip(out, np.asarray(starts))] if ragged else out

"""Continuous batching: sequences join and leave a decoding batch while it runs.

A batch of `batch_size` rows decodes together, one token per row per step. When a row's
sequence is done, the next waiting prompt takes its row at once (Orca's iteration-level
scheduling, Yu et al. 2022; what vLLM and TGI call continuous batching), instead of the
whole batch waiting for its longest sequence.

How, on the cache this codebase already has (`KVCache` with per-row `starts`):
  - every layer's buffers are rings (`Transformer.step(wrap=True)`): all rows write at one
    head, `cache.index`, which runs on forever, slot = index % max_len; a row sees only
    the positions written since its own start (`kv_cache.for_rows`), so the slots its
    previous sequence left are masked out;
  - a new prompt is prefilled alone into a cache of its own (`prefill`) and copied into
    its row so that its last position sits just before the head (`insert`): its start is
    `index - len(prompt)`, so it decodes on at its own positions, as it would alone.
The serving cache starts with its head at `max_len` (`init_serving_cache`), so any prompt
fits before it. A sequence (prompt + new tokens) must fit `max_len`: a row's ring holds its
last max_len positions. Attention sinks and int4 caches are refused (as for any ragged batch).

`serve` is the scheduler: a host loop around two compiled functions, prefill-and-insert
and `steps_per_call` decoding steps of the whole batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mqa import kv_cache
from mqa.decode import decode_tokens, sample_token
from mqa.kv_cache import KVCache, init_cache
from mqa.loading import LoadedModel
from mqa.model_config import ModelConfig


def init_serving_cache(config: ModelConfig, batch_size: int, max_len: int) -> KVCache:
    """An empty serving cache: every row empty (its start at the head), the head at
    `max_len` so that a prompt of up to max_len tokens fits before it."""
    head = jnp.int32(max_len)
    cache = init_cache(config, batch_size, max_len, starts=jnp.full((batch_size,), max_len))
    return cache._replace(index=head)


def insert(config: ModelConfig, cache: KVCache, row: jax.Array, prompt_cache: KVCache) -> KVCache:
    """`cache` with row `row` holding the one sequence of `prompt_cache` instead.

    prompt_cache: a batch-1 cache prefilled from empty with one sequence, left-padded by
      `prompt_cache.starts[0]` slots (or none), so that it holds its positions 0 ..
      length - 1, length = index - padding. They are written where the row's ring keeps
      positions start .. cache.index - 1, start = cache.index - length, and the row starts
      there; what the row held before is masked out from now on (`kv_cache.for_rows`).
    """
    padding = 0 if prompt_cache.starts is None else prompt_cache.starts[0]
    length = prompt_cache.index - padding
    start = cache.index - length
    batch = cache.starts.shape[0]
    source_axes, target_axes = (kv_cache.entry_axes(config, n) for n in (1, batch))
    layers = []
    for g, (target, source) in enumerate(zip(cache.layers, prompt_cache.layers)):
        local = config.is_local(g * config.kv_share_every)
        updated = dict(target)
        for name, values in source.items():
            entry = name.removesuffix("_scale")
            drop = 1 if name.endswith("_scale") else 0  # a scale has no "d" axis
            src_axes = source_axes[entry][:len(source_axes[entry]) - drop]
            dst_axes = target_axes[entry][:len(target_axes[entry]) - drop]
            held_len = values.shape[src_axes.index("s")]
            # the position each source slot holds (a local layer's buffers are a ring)
            held = (kv_cache.slot_positions(prompt_cache.index - 1, held_len) if local
                    else jnp.arange(held_len)) - padding
            ring_len = target[name].shape[dst_axes.index("s")]
            slots = jnp.where((held >= 0) & (held < length), jnp.mod(start + held, ring_len),
                              ring_len)  # out of range: dropped
            index = tuple(row if c == "b" else slots if c == "s" else slice(None) for c in dst_axes)
            if "b" in dst_axes:  # the row and slot indices are advanced: their axis leads
                values = jnp.moveaxis(values, src_axes.index("s"), 0)
            updated[name] = target[name].at[index].set(values.astype(target[name].dtype), mode="drop")
        layers.append(updated)
    return cache._replace(layers=tuple(layers), starts=cache.starts.at[row].set(start))


@functools.partial(jax.jit, static_argnames="graphdef", donate_argnums=2)
def prefill_into(graphdef, params, cache: KVCache, row: jax.Array, prompt: jax.Array,
                 padding: jax.Array) -> tuple[jax.Array, KVCache]:
    """Prefills `prompt` (int32 [bucket], its first `padding` tokens padding) alone and
    inserts it into row `row` of `cache` (donated). Returns (its last position's float32
    logits [vocab], the cache). One compilation per bucket length, not per prompt length."""
    model = nnx.merge(graphdef, params)
    own = init_cache(model.config, 1, prompt.shape[0], starts=padding[None])
    logits, own = model.step(prompt[None], own)
    return logits[0, -1], insert(model.config, cache, row, own)


def bucket(length: int, max_len: int, smallest: int = 16) -> int:
    """The padded length a prompt of `length` tokens is prefilled at: the next power of two
    from `smallest`, at most max_len (prompts share compilations by bucket)."""
    return min(max(smallest, 1 << (length - 1).bit_length()), max_len)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "temperature", "top_k", "top_p"),
                   donate_argnums=2)
def decode_steps(graphdef, params, cache: KVCache, token: jax.Array, key: jax.Array, *, steps: int,
                 temperature: float, top_k: int | None, top_p: float | None
                 ) -> tuple[jax.Array, KVCache]:
    """`steps` decoding steps of every row (the cache donated and wrapped, `serving`):
    token int32 [batch] the rows' last tokens -> (int32 [steps, batch] the next ones, cache)."""
    model = nnx.merge(graphdef, params)
    sample = functools.partial(sample_token, temperature=temperature, top_k=top_k, top_p=top_p)
    (_, cache), tokens = decode_tokens(model, model.layer_params(), cache, token,
                                       jax.random.split(key, steps), sample, wrap=True)
    return tokens, cache


POLICIES = ("continuous", "static")


@dataclasses.dataclass
class ServeStats:
    """What `serve` did: decoding steps of the whole batch, and prompts prefilled."""

    steps: int = 0
    prefills: int = 0
    tokens: int = 0  # tokens returned (each request's first comes from its prefill)
    busy_row_steps: int = 0  # row-steps that decoded a token some request returned
    prefill_seconds: float = 0.0  # wall time in prefill-and-insert, sampling included
    decode_seconds: float = 0.0  # wall time in the batch's decoding steps


def serve(model: LoadedModel, prompts, max_new_tokens, *, batch_size: int, max_len: int | None = None,
          steps_per_call: int = 8, temperature: float = 0.0, top_k: int | None = None,
          top_p: float | None = None, seed: int = 0, stats: ServeStats | None = None,
          policy: str = "continuous") -> list[np.ndarray]:
    """Continues every prompt by its number of new tokens, `batch_size` rows at a time with
    continuous batching (the module docstring).

    prompts: a list of int token arrays; max_new_tokens: an int, or one per prompt.
    max_len: each sequence's most tokens (prompt + new; default the longest request's),
      at most `model.max_seq_len`; every row's ring holds that many positions.
    steps_per_call: decoding steps between scheduling decisions: a row that finishes
      waits up to this many steps for its next prompt, and each call costs a dispatch.
    policy: "continuous" refills a row as soon as its request is done; "static" refills
      only once every row is done (the batch waits for its longest request: the baseline
      continuous batching is measured against, `benchmarks/continuous.py`).
    Returns each prompt's continuation (int32 [its max_new_tokens]), in order: with
    temperature 0 each equals what `mqa.generate` gives that prompt alone.
    """
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    wanted = ([int(max_new_tokens)] * len(prompts) if np.isscalar(max_new_tokens)
              else [int(n) for n in max_new_tokens])
    if len(wanted) != len(prompts):
        raise ValueError(f"{len(wanted)} max_new_tokens for {len(prompts)} prompts; give one "
                         "number, or one per prompt")
    longest = max((len(p) + n for p, n in zip(prompts, wanted)), default=1)
    max_len = max_len or longest
    limit = model.model_config.max_seq_len
    bad = [i for i, (p, n) in enumerate(zip(prompts, wanted)) if len(p) < 1 or n < 1 or len(p) + n > max_len]
    if bad or max_len > limit or batch_size < 1 or steps_per_call < 1:
        i = bad[0] if bad else None
        raise ValueError(
            (f"request {i} (prompt of {len(prompts[i])} tokens + {wanted[i]} new) does not fit: "
             f"each needs a non-empty prompt, at least 1 new token and at most max_len={max_len} "
             "in all") if bad else
            f"max_len={max_len} must be at most model.max_seq_len={limit}, batch_size={batch_size} "
            f"and steps_per_call={steps_per_call} at least 1")
    config = model.model_config
    if policy not in POLICIES:
        raise ValueError(f"policy={policy!r} is not one of: {', '.join(POLICIES)}")
    if config.attention_sinks or config.kv_cache_dtype == "int4":
        raise ValueError("continuous batching does not combine with model.attention_sinks or an "
                         "int4 cache (as a ragged batch does not)")
    stats = stats if stats is not None else ServeStats()
    sampling = dict(temperature=float(temperature), top_k=top_k, top_p=top_p)
    key = jax.random.key(seed)
    cache = init_serving_cache(config, batch_size, max_len)
    last = np.zeros(batch_size, np.int32)  # each row's last token
    rows: list[int | None] = [None] * batch_size  # the request each row serves
    out: list[list[int]] = [[] for _ in prompts]
    waiting = collections.deque(range(len(prompts)))
    while waiting or any(r is not None for r in rows):
        refill = policy == "continuous" or all(r is None for r in rows)
        for row in range(batch_size):
            if refill and rows[row] is None and waiting:
                i = waiting.popleft()
                started = time.perf_counter()
                width = bucket(len(prompts[i]), max_len)
                padded = np.pad(prompts[i], (width - len(prompts[i]), 0))
                logits, cache = prefill_into(model.graphdef, model.params, cache, jnp.int32(row),
                                             jnp.asarray(padded), jnp.int32(width - len(prompts[i])))
                key, sub = jax.random.split(key)
                first = int(sample_token(logits[None], sub, **sampling)[0])
                out[i].append(first)
                stats.prefills += 1
                stats.prefill_seconds += time.perf_counter() - started
                rows[row], last[row] = (i if wanted[i] > 1 else None), first
        if not any(r is not None for r in rows):
            continue
        started = time.perf_counter()
        key, sub = jax.random.split(key)
        tokens, cache = decode_steps(model.graphdef, model.params, cache, jnp.asarray(last), sub,
                                     steps=steps_per_call, **sampling)
        tokens = np.asarray(tokens)
        stats.decode_seconds += time.perf_counter() - started
        stats.steps += steps_per_call
        last = tokens[-1].copy()
        for row, i in enumerate(rows):
            if i is not None:
                taken = tokens[:wanted[i] - len(out[i]), row].tolist()
                out[i].extend(taken)
                stats.busy_row_steps += len(taken)
                if len(out[i]) == wanted[i]:
                    rows[row] = None
    stats.tokens += sum(len(o) for o in out)
    return [np.asarray(o, np.int32) for o in out]

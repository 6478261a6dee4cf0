"""Timing training and decoding side by side: medians over alternating rounds.

Decoding is timed with cached steps exactly as `mqa.generate` runs them, shared by
`benchmarks/decode.py` (random weights) and `sweep.py` (each point's trained weights): a
compiled `lax.scan` of `Transformer.step` with the layer weights sliced once and the cache
donated, starting from a cache that already holds `context` tokens. Training is timed with
the train step `train.py` compiles (`train_loop`), on one device. Variants
that are compared are timed in alternating rounds (`alternating_medians`): on a shared,
noisy machine a burst of load then falls on all of them, not on whichever ran at the time.
"""

from __future__ import annotations

import functools
import time
from typing import Callable, Hashable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mqa import hardware
from mqa.decode import decode_tokens
from mqa.config import ModelConfig, build_model_config
from mqa.kv_cache import cache_nbytes, init_cache
from mqa.model import Transformer
from mqa.training import TrainState, learning_rate_schedule, make_optimizer, make_train_step


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of `fn`."""
    seconds = timed(fn)
    return float(np.median([seconds() for _ in range(repeats)]))


def timed(fn: Callable[[], object]) -> Callable[[], float]:
    """`fn` as a callable that returns the wall-clock seconds it took."""
    def seconds() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    return seconds


def alternating_medians(runs: dict[Hashable, Callable[[], float]], repeats: int, *,
                        group: Callable[[Hashable], object] = lambda key: None,
                        pause: float = 0.0) -> dict[Hashable, float]:
    """The median of `repeats` results of each run (each returns the seconds it measured;
    see `timed`). Every round calls every run once, group after group in the order of
    their first key (`group(key)`), sleeping `pause` seconds after each group: runtimes
    whose worker threads spin after work (XLA's, PyTorch's) would otherwise slow the next."""
    order = list(dict.fromkeys(group(key) for key in runs))
    samples = {key: [] for key in runs}
    for _ in range(repeats):
        for name in order:
            for key, run in runs.items():
                if group(key) == name:
                    samples[key].append(run())
            time.sleep(pause)
    return {key: float(np.median(values)) for key, values in samples.items()}


def graphdef_for(config: ModelConfig) -> nnx.GraphDef:
    """The graphdef of a `Transformer` built from `config` (nothing allocated): with a loaded
    model's params, the same model attending as `config` says (its `decode_impl`, ...)."""
    return nnx.graphdef(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))))


def decode_loop(graphdef: nnx.GraphDef, params: nnx.State, config: ModelConfig, batch: int,
                context: int, steps: int, starts=None) -> tuple[Callable[[], None], Callable[[], str], int]:
    """(run, hlo, cache bytes): `run()` decodes `steps` cached steps of `batch` sequences
    from a cache holding `context` tokens, waiting for the result (the cache is donated and
    reused by the next call); `hlo()` is the compiled loop's HLO text. `context + steps`
    must fit `config.max_seq_len`. starts int [batch]: a ragged batch, row b holding
    context - starts[b] tokens (`KVCache.starts`). `config` lays out the cache; how the
    layers attend (`decode_impl`, ...) is the config inside `graphdef`, which a replaced
    `config` does not change: time another config through `graphdef_for(config)`."""

    @functools.partial(jax.jit, donate_argnums=1)
    def decode(params, cache, token):
        model = nnx.merge(graphdef, params)
        greedy = lambda logits, key: jnp.argmax(logits, axis=-1).astype(jnp.int32)  # noqa: E731
        (token, cache), _ = decode_tokens(model, model.layer_params(), cache, token,
                                          jnp.zeros((steps,)), greedy)
        return token, cache

    cache = init_cache(config, batch, context + steps, starts=starts)
    nbytes = cache_nbytes(cache)
    # committed to the device, as the loop's outputs are: else the second call compiles again
    state = jax.device_put({"cache": cache, "token": jnp.zeros((batch,), jnp.int32)},
                           jax.devices()[0])

    def run():
        state["token"], state["cache"] = decode(
            params, state["cache"]._replace(index=jnp.int32(context)), state["token"])
        jax.block_until_ready(state["token"])

    def hlo():
        return decode.lower(params, state["cache"], state["token"]).compile().as_text()

    return run, hlo, nbytes


def train_step(config, *, xla_defaults: bool = False) -> tuple[Callable, TrainState]:
    """(the jitted train step with its state donated, a fresh state) for a training config,
    on one device, as `train.py` compiles it (or with XLA's default compiler options)."""
    model = build_model_config(config.model)
    optimizer = make_optimizer(config.train)
    graphdef, params = nnx.split(Transformer(model, rngs=nnx.Rngs(0)))
    options = None if xla_defaults else hardware.train_compiler_options()
    step = jax.jit(make_train_step(graphdef, optimizer, learning_rate_schedule(config.train),
                                   config.train.grad_accum),
                   donate_argnums=0, compiler_options=options)
    return step, TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def train_loop(config, steps: int) -> tuple[Callable[[], None], int]:
    """(run, tokens): `run()` takes `steps` train steps of `config` (`train_step`) from
    freshly initialised parameters on a fixed random batch, waiting for the result;
    `tokens` is how many tokens one call trains on."""
    step, state = train_step(config)
    train = config.train
    batch = jax.random.randint(jax.random.key(0), (train.batch_size, train.seq_len + 1), 0,
                               config.model.vocab_size, jnp.int32)
    box = [state]

    def run():
        for _ in range(steps):
            box[0], _ = step(box[0], batch)
        jax.block_until_ready(box[0])

    return run, steps * train.batch_size * train.seq_len

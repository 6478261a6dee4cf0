"""mqa.timing.alternating_medians: the rounds that side-by-side comparisons are timed in."""

import itertools

from mqa.timing import alternating_medians, timed


def test_every_round_calls_each_run_once_group_after_group():
    calls, values = [], {"a": itertools.cycle([3.0, 1.0, 2.0]), "b": itertools.repeat(5.0),
                         "c": itertools.cycle([4.0, 6.0, 8.0])}

    def run(key):
        def call():
            calls.append(key)
            return next(values[key])
        return call

    groups = {"a": "x", "b": "y", "c": "x"}
    medians = alternating_medians({key: run(key) for key in "abc"}, 3, group=groups.get)
    assert calls == ["a", "c", "b"] * 3
    assert medians == {"a": 2.0, "b": 5.0, "c": 6.0}


def test_timed_returns_the_seconds_a_call_took():
    import time
    seconds = timed(lambda: time.sleep(0.02))()
    assert 0.02 <= seconds < 1.0


def test_the_decode_loop_compiles_once(caplog, fast_compile):
    """Every timed call of `decode_loop` runs the loop compiled for the first: a second
    compilation (the first call's cache uncommitted, its outputs committed) would be timed."""
    import logging

    import jax
    from flax import nnx

    from mqa.config import build_model_config
    from mqa.model import Transformer
    from mqa.timing import decode_loop
    config = build_model_config(vocab_size=32, d_model=16, num_layers=1, num_heads=2,
                                num_kv_heads=1, head_dim=8, mlp_dim=32, max_seq_len=16)
    graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
    params = jax.device_put(params, jax.devices()[0])  # committed, as `mqa.load_model` gives them
    run, _, _ = decode_loop(graphdef, params, config, batch=2, context=4, steps=2)
    with jax.log_compiles(), caplog.at_level(logging.WARNING):
        for _ in range(3):
            run()
    compiled = [r for r in caplog.records if "Finished XLA compilation of jit(decode)" in r.getMessage()]
    assert len(compiled) == 1

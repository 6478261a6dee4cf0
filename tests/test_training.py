"""The pure train/eval steps: gradient accumulation, schedule, weight decay, loss."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mqa.config import ModelConfig, load_config_file, build_model_config
from mqa.model import Transformer
from mqa.training import (TrainState, cross_entropy, decay_mask, learning_rate_schedule,
                          make_eval_step, make_optimizer, make_train_step)

MODEL = build_model_config(vocab_size=32, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=8, mlp_dim=48, max_seq_len=32)


def setup(**train_overrides):
    train = load_config_file("configs/tiny.py").train
    train.update(train_overrides)
    graphdef, params = nnx.split(Transformer(MODEL, rngs=nnx.Rngs(0)))
    optimizer = make_optimizer(train)
    state = TrainState(jnp.int32(0), params, optimizer.init(params))
    step = make_train_step(graphdef, optimizer, learning_rate_schedule(train), train.grad_accum)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 32, (8, 17)), jnp.int32)
    return graphdef, state, jax.jit(step), batch


def test_cross_entropy_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3))
    log_z = np.log(np.exp(logits.astype(np.float64)).sum(-1))
    expected = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(targets)),
                               expected, rtol=1e-6)


def test_training_reduces_loss_on_a_fixed_batch():
    _, state, step, batch = setup(warmup_steps=1, learning_rate=3e-3)
    losses = []
    for _ in range(30):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 30
    assert losses[-1] < 0.6 * losses[0]


def test_gradient_accumulation_equals_the_full_batch():
    """Two microbatches of 4 give the same update as one batch of 8."""
    _, state, full_step, batch = setup(grad_accum=1)
    _, state2, accum_step, _ = setup(grad_accum=2)
    full_state, full_metrics = full_step(state, batch)
    accum_state, accum_metrics = accum_step(state2, batch)
    np.testing.assert_allclose(full_metrics["loss"], accum_metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(full_metrics["grad_norm"], accum_metrics["grad_norm"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(full_state.params), jax.tree.leaves(accum_state.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_schedule_warms_up_then_decays_to_the_floor():
    train = load_config_file("configs/tiny.py", ["train.steps=100", "train.warmup_steps=10",
                                                 "train.learning_rate=1e-3"]).train
    schedule = learning_rate_schedule(train)
    np.testing.assert_allclose([schedule(0), schedule(5), schedule(10)], [0.0, 5e-4, 1e-3], rtol=1e-6)
    np.testing.assert_allclose(schedule(100), 1e-3 * train.min_learning_rate_ratio, rtol=1e-6)
    assert schedule(50) < schedule(20)


def test_warmup_as_long_as_training_is_allowed():
    train = load_config_file("configs/tiny.py", ["train.steps=30", "train.warmup_steps=30"]).train
    assert float(learning_rate_schedule(train)(30)) == pytest.approx(train.learning_rate)


def test_norm_scales_are_not_decayed():
    _, params = nnx.split(Transformer(MODEL, rngs=nnx.Rngs(0)))
    mask = decay_mask(params)
    flat = {"/".join(str(getattr(k, "key", "")) for k in path): decays
            for path, decays in jax.tree_util.tree_leaves_with_path(mask)}
    assert all(not v for k, v in flat.items() if "norm" in k)
    assert all(v for k, v in flat.items() if "norm" not in k)
    assert any("attention/q" in k for k in flat)


def test_eval_step_weighs_each_target():
    """Padding rows weigh nothing; a target's weight scales its loss (a sliding window's
    unscored targets have weight 0)."""
    graphdef, state, _, batch = setup()
    eval_step = jax.jit(make_eval_step(graphdef))
    seq_len = batch.shape[1] - 1
    full = eval_step(state.params, batch[:4], jnp.ones((4, seq_len)))
    padded = eval_step(state.params, jnp.concatenate([batch[:4], jnp.zeros_like(batch[:4])]),
                       jnp.repeat(jnp.array([1, 1, 1, 1, 0, 0, 0, 0], jnp.float32)[:, None],
                                  seq_len, axis=1))
    np.testing.assert_allclose(full["loss_sum"], padded["loss_sum"], rtol=1e-6)
    assert float(padded["tokens"]) == 4 * seq_len
    # The loss of one target, by hand from the logits: weight it alone.
    logits = np.asarray(nnx.merge(graphdef, state.params)(batch[:1, :-1]), np.float64)[0, 3]
    target = int(batch[0, 4])
    expected = np.log(np.sum(np.exp(logits - logits.max()))) + logits.max() - logits[target]
    one = np.zeros((4, seq_len), np.float32)
    one[0, 3] = 1.0
    only = eval_step(state.params, batch[:4], jnp.asarray(one))
    np.testing.assert_allclose(float(only["loss_sum"]), expected, rtol=1e-5)
    assert float(only["tokens"]) == 1.0


def test_non_finite_loss_skips_the_update():
    """A NaN in the loss leaves parameters and optimizer state exactly as they were."""
    graphdef, state, step, batch = setup()
    state, _ = step(state, batch)  # one normal update, so the optimizer state is non-trivial
    def poison(path, x):  # a NaN in the embedding row of the first input token
        first = getattr(path[0], "key", None) == "embed"
        return x.at[batch[0, 0], 0].set(jnp.nan) if first else x

    poisoned = jax.tree_util.tree_map_with_path(poison, state.params)
    before = TrainState(state.step, poisoned, state.opt_state)
    after, metrics = step(before, batch)
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    assert int(after.step) == int(before.step) + 1
    for a, b in zip(jax.tree.leaves((before.params, before.opt_state)),
                    jax.tree.leaves((after.params, after.opt_state))):
        np.testing.assert_array_equal(a, b)
    _, metrics = step(state, batch)
    assert int(metrics["skipped"]) == 0


def test_training_only_the_attention_leaves_the_rest_unchanged():
    """train.trainable=attention: the attention weights move, everything else (embeddings,
    norms, MLPs) stays bit for bit."""
    _, state, step, batch = setup(warmup_steps=1, learning_rate=3e-3, trainable="attention")
    before = nnx.to_pure_dict(state.params)
    for _ in range(3):
        state, metrics = step(state, batch)
    after = nnx.to_pure_dict(state.params)
    flat_before = jax.tree_util.tree_leaves_with_path(before)
    flat_after = dict(jax.tree_util.tree_leaves_with_path(after))
    moved = {jax.tree_util.keystr(path): not np.array_equal(value, flat_after[path])
             for path, value in flat_before}
    assert all(moved[name] == ("'attention'" in name) for name in moved), moved
    assert any(moved.values())
    assert np.isfinite(float(metrics["loss"]))

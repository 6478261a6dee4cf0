"""The train and eval steps: pure functions of (state, batch) pytrees, jitted once.

`TrainState` holds everything a step changes (step counter, parameters, optimizer state);
the model's structure (`nnx.GraphDef`) is static and closed over, so no Python object is
traversed per step. The loop, checkpoints and logging live in `mqa/trainer.py`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mqa.kv_cache import init_cache

Batch = jax.Array  # int32 [batch, seq_len + 1]: inputs are [:, :-1], targets [:, 1:]


class TrainState(NamedTuple):
    step: jax.Array        # int32 scalar: optimizer updates applied so far
    params: nnx.State      # float32 parameters, as `nnx.split(model, nnx.Param)` gives them
    opt_state: Any         # the optax state for `params`


def learning_rate_schedule(train_config) -> optax.Schedule:
    """Linear warmup to `learning_rate`, cosine decay to `min_learning_rate_ratio` of it."""
    peak, warmup = train_config.learning_rate, train_config.warmup_steps
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(train_config.steps, warmup + 1),  # optax counts warmup in decay_steps
        end_value=peak * train_config.min_learning_rate_ratio)


def decay_mask(params: nnx.State) -> Any:
    """True for the weights AdamW decays: everything except the RMSNorm scales."""
    def decays(path, _):
        return not any(getattr(key, "key", None) == "scale" for key in path)
    return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(train_config) -> optax.GradientTransformation:
    """AdamW (b2 = 0.95) with global-norm gradient clipping and the schedule above.

    `train.trainable="attention"` trains only the attention layers' weights (the rest stay
    as they are, e.g. while uptraining a converted model) and keeps no optimizer state for
    the others; the gradient norm is then the attention weights'.
    """
    adamw = optax.chain(
        optax.clip_by_global_norm(train_config.grad_clip),
        optax.adamw(learning_rate_schedule(train_config), b1=0.9, b2=0.95,
                    weight_decay=train_config.weight_decay, mask=decay_mask),
    )
    if train_config.get("trainable", "all") == "all":
        return adamw
    return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, trainable_labels)


def trainable_labels(params: nnx.State) -> Any:
    """"train" for the attention layers' weights, "frozen" for every other parameter."""
    def label(path, _):
        return "train" if any(getattr(key, "key", None) == "attention" for key in path) else "frozen"
    return jax.tree_util.tree_map_with_path(label, params)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-token negative log-likelihood in nats. logits [b, t, v] float32, targets [b, t]."""
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]


def distillation_kl(teacher_logits: jax.Array, logits: jax.Array) -> jax.Array:
    """Per-token KL(teacher || model) in nats: sum_v p_teacher (log p_teacher - log p_model).
    Both [b, t, v]; float32."""
    teacher = jax.nn.log_softmax(teacher_logits.astype(jnp.float32), axis=-1)
    model = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.exp(teacher) * (teacher - model), axis=-1)


def make_train_step(graphdef: nnx.GraphDef, optimizer: optax.GradientTransformation,
                    schedule: optax.Schedule, grad_accum: int = 1,
                    teacher: nnx.GraphDef | None = None, distill_weight: float = 1.0
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """Returns `train_step(state, batch) -> (state, metrics)` (not yet jitted).

    With `grad_accum > 1` the batch is split into that many microbatches whose gradients
    are averaged; row j goes to microbatch j % grad_accum, so every device keeps its rows.

    Distillation (`teacher`, the teacher's structure): `train_step(state, batch,
    teacher_params)`, and the loss is distill_weight * KL(teacher || model) + (1 -
    distill_weight) * the LM loss, per token averaged; the metrics add both parts
    ("distill_kl", "lm_loss"). The teacher's logits carry no gradient.
    """

    def loss_fn(params, batch, teacher_params):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        lm_loss = jnp.mean(cross_entropy(logits, batch[:, 1:]))
        if teacher is None:
            return lm_loss, {}
        teacher_logits = jax.lax.stop_gradient(nnx.merge(teacher, teacher_params)(batch[:, :-1]))
        kl = jnp.mean(distillation_kl(teacher_logits, logits))
        parts = {"distill_kl": kl, "lm_loss": lm_loss}
        return distill_weight * kl + (1.0 - distill_weight) * lm_loss, parts

    def train_step(state: TrainState, batch: Batch, teacher_params=None) -> tuple[TrainState, dict]:
        gradient = jax.value_and_grad(loss_fn, has_aux=True)
        if grad_accum == 1:
            (loss, parts), grads = gradient(state.params, batch, teacher_params)
        else:
            micro = batch.reshape(-1, grad_accum, batch.shape[-1]).swapaxes(0, 1)

            def accumulate(total, microbatch):
                return jax.tree.map(jnp.add, total, gradient(state.params, microbatch, teacher_params)), None

            zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(gradient, state.params, micro[0], teacher_params))
            ((loss, parts), grads), _ = jax.lax.scan(accumulate, zeros, micro)
            loss, parts, grads = jax.tree.map(lambda x: x / grad_accum, (loss, parts, grads))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # A non-finite loss or gradient skips the update: parameters and optimizer state
        # stay as they were, and the step counter (and so the data) moves on.
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
        params = jax.tree.map(keep, params, state.params)
        opt_state = jax.tree.map(keep, opt_state, state.opt_state)
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step),
                   "skipped": jnp.logical_not(finite).astype(jnp.int32), **parts}
        return TrainState(state.step + 1, params, opt_state), metrics

    return train_step


def scored_logits(model, tokens: jax.Array, *, cached: bool | None = None) -> jax.Array:
    """A Transformer's logits [b, t, v] for tokens [b, t] as evaluation scores them: through
    the KV cache (prefilled whole into an empty one) when `cached`, or with None exactly
    when the model's cache is quantized; else the full-sequence forward pass."""
    if bool(model.config.kv_cache_dtype) if cached is None else cached:
        return model.step(tokens, init_cache(model.config, *tokens.shape))[0]
    return model(tokens)


def make_eval_step(graphdef: nnx.GraphDef, *, cached: bool | None = None
                   ) -> Callable[[nnx.State, Batch, jax.Array], dict]:
    """Returns `eval_step(params, batch, weights) -> {"loss_sum", "tokens"}`.

    batch: int32 [batch, seq_len + 1]; weights: float32 [batch, seq_len], how much each
    target counts (0 for padding rows and for targets a sliding window does not score).
    cached: score through the KV cache as decoding reads it (each window prefilled into an
    empty cache, so a quantized cache's keys and values are what the queries see);
    the same logits otherwise. None: through the cache exactly when the model has a
    quantized cache, whose effect shows nowhere else (so its held-out loss is what
    decoding gets).
    """

    def eval_step(params: nnx.State, batch: Batch, weights: jax.Array) -> dict:
        logits = scored_logits(nnx.merge(graphdef, params), batch[:, :-1], cached=cached)
        nll = cross_entropy(logits, batch[:, 1:])                        # [b, t]
        return {"loss_sum": jnp.sum(nll * weights), "tokens": jnp.sum(weights)}

    return eval_step

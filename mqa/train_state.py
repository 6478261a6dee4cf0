"""A run's device mesh, its train state created in its shardings, and the compiled steps.

Parameters and optimizer state are created directly in their shardings (`fresh_state`), so a
model larger than one device's memory never exists whole; the train step donates the state
it is given and returns the next one in the same shardings.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import Mesh

from mqa import hardware, sharding
from mqa.config import ConfigError, ModelConfig
from mqa.model import Transformer
from mqa.training import Batch, TrainState, learning_rate_schedule, make_eval_step, make_train_step


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
    """The mesh `config.mesh` names over all devices, after checking that train.batch_size splits
    evenly over its data-parallel axes and the gradient-accumulation microbatches."""
    mesh = sharding.make_mesh(config.mesh)
    dp = sharding.data_parallel_size(mesh)
    batch, accum = config.train.batch_size, config.train.grad_accum
    if batch % (dp * accum):
        raise ConfigError(
            f"train.batch_size={batch} must be divisible by the data-parallel size "
            f"(mesh.data x mesh.fsdp = {dp}) x train.grad_accum={accum} = {dp * accum}")
    return mesh


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Where a run's train state lives: its shardings, and the model structure it fills."""

    shardings: TrainState  # a NamedSharding per leaf of the state
    batch_sharding: jax.sharding.NamedSharding  # batches: rows over data x fsdp
    graphdef: nnx.GraphDef  # the model without its parameters (static under jit)


def fresh_state(model_config: ModelConfig, optimizer: optax.GradientTransformation, seed: int,
                mesh: Mesh) -> tuple[TrainState, StateLayout]:
    """(step 0 with parameters initialised from `seed` and a fresh optimizer state, created in
    their shardings on `mesh`; the layout)."""

    def init_state() -> TrainState:
        params = nnx.split(Transformer(model_config, rngs=nnx.Rngs(seed)))[1]
        return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))

    shardings = sharding.tree_shardings(jax.eval_shape(init_state), mesh)
    state = jax.jit(init_state, out_shardings=shardings)()
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Transformer(model_config, rngs=nnx.Rngs(0))))
    return state, StateLayout(shardings, sharding.batch_sharding(mesh), graphdef)


def compiled_train_step(layout: StateLayout, optimizer: optax.GradientTransformation, train_config,
                        mesh: Mesh, teacher: tuple[nnx.GraphDef, nnx.State] | None = None
                        ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """`train_step(state, batch) -> (state, metrics)` jitted for the layout: the state donated,
    metrics replicated. It compiles on its first call. teacher: (structure, parameters) of
    the model to distil from (`train.distill_from`), its parameters replicated on the mesh
    and passed to every step."""
    step = make_train_step(layout.graphdef, optimizer, learning_rate_schedule(train_config),
                           train_config.grad_accum, teacher=teacher and teacher[0],
                           distill_weight=train_config.distill_weight)
    replicated = sharding.replicated(mesh)
    jitted = jax.jit(step, in_shardings=(layout.shardings, layout.batch_sharding,
                                         *((replicated,) if teacher else ())),
                     out_shardings=(layout.shardings, replicated),
                     donate_argnums=0, compiler_options=hardware.train_compiler_options())
    if teacher is None:
        return jitted
    teacher_params = jax.device_put(teacher[1], replicated)
    return lambda state, batch: jitted(state, batch, teacher_params)


def compiled_eval_step(layout: StateLayout) -> Callable[[nnx.State, Batch, jax.Array], dict]:
    """`eval_step(params, batch, weights) -> {"loss_sum", "tokens"}`, jitted."""
    return jax.jit(make_eval_step(layout.graphdef))

"""Checkpoints of the train state with orbax: async saves, keep the newest few, resume.

Orbax writes each step into a temporary directory and renames it when complete, so a
process killed mid-save leaves no checkpoint that `latest_step` would pick up.
"""

from __future__ import annotations

import pathlib

import jax
import orbax.checkpoint as ocp

from mqa.training import TrainState


class Checkpointer:
    """`WORKDIR/checkpoints/<step>/`, the newest `keep` kept. The caller decides when to save."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=True, cleanup_tmp_directories=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, state: TrainState) -> None:
        """Starts an async save of `state` under its step; `wait` blocks until written."""
        step = int(state.step)
        if step not in self._manager.all_steps():
            self._manager.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=True)

    def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
        """Restores `step` (default: the newest) into the shapes and shardings given.

        abstract_state: a `TrainState` of `jax.ShapeDtypeStruct`s with shardings.
        """
        step = self.latest_step() if step is None else step
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(_as_tree(abstract_state)))
        return TrainState(**tree)

    def wait(self) -> None:
        """Blocks until any async save has been written completely."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def _as_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def abstract_like(tree):
    """Shapes, dtypes and shardings of a pytree of arrays, for restoring into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

"""Checkpoints with orbax: async saves, keep the newest few, resume, load parameters alone.

Each step directory `checkpoints/<step>/` holds two items: `params` (the model) and, for
training checkpoints, `optimizer` (the step counter and optimizer state). Evaluation,
decoding and conversion read `params` alone. Orbax writes a step into a temporary
directory and renames it when complete, so a process killed mid-save leaves nothing that
`latest_step` would pick up.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import pathlib
import sys

import jax
import orbax.checkpoint as ocp

from mqa.training import TrainState


@contextlib.contextmanager
def _quiet_if_damaged():
    """When a read fails, orbax's background reads complain on stderr, during the read and
    long after the exception reached us: tracebacks printed by Python, and "exception was
    never retrieved" records from the `asyncio` logger. Hold both back while reading: pass
    stderr on if the read succeeds; once one has failed, send Python's stderr to nowhere
    and silence the asyncio logger. The caller reports the damage in one line on
    `sys.__stderr__`."""
    real, held = sys.stderr, io.StringIO()
    asyncio_logger = logging.getLogger("asyncio")
    was_disabled = asyncio_logger.disabled
    sys.stderr, asyncio_logger.disabled = held, True
    try:
        yield
    except Exception:
        sys.stderr = open(os.devnull, "w")
        raise
    sys.stderr, asyncio_logger.disabled = real, was_disabled
    real.write(held.getvalue())


class Checkpointer:
    """`<directory>/<step>/`, the newest `keep` kept. The caller decides when to save."""

    def __init__(self, directory: str | pathlib.Path, *, keep: int | None = None,
                 read_only: bool = False):
        self.directory = pathlib.Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=not read_only, create=not read_only,
            read_only=read_only, cleanup_tmp_directories=not read_only,
            **({"save_interval_steps": 0} if read_only else {}))
        absl_logger = logging.getLogger("absl")
        level = absl_logger.level
        if read_only:  # orbax warns that a read-only manager is read-only
            absl_logger.setLevel(logging.ERROR)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        finally:
            absl_logger.setLevel(level)

    def reload(self) -> None:
        """Re-reads which steps exist (after a step directory was moved away)."""
        self._manager.reload()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, state: TrainState) -> None:
        """Starts an async save of `state` under its step; `wait` blocks until written."""
        step = int(state.step)
        if step not in self._manager.all_steps():
            self._manager.save(step, args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                optimizer=ocp.args.StandardSave({"step": state.step,
                                                 "opt_state": state.opt_state})))

    def save_params(self, step: int, params) -> None:
        """Saves parameters alone (converted or uptrained models); blocks until written."""
        self._manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
        self.wait()

    def restore(self, abstract_state: TrainState, step: int | None = None) -> TrainState:
        """Restores a training checkpoint (default: the newest) into the shapes and
        shardings of `abstract_state`, a `TrainState` of `jax.ShapeDtypeStruct`s."""
        step = self.latest_step() if step is None else step
        with _quiet_if_damaged():
            restored = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_state.params),
                optimizer=ocp.args.StandardRestore({"step": abstract_state.step,
                                                    "opt_state": abstract_state.opt_state})))
        return TrainState(restored.optimizer["step"], restored.params,
                          restored.optimizer["opt_state"])

    def restore_params(self, abstract_params, step: int | None = None):
        """Restores the `params` item alone into the shapes and shardings given."""
        step = self.latest_step() if step is None else step
        with _quiet_if_damaged():
            restored = self._manager.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params)))
        return restored.params

    def item_metadata(self, step: int, item: str):
        """The stored tree of shapes and dtypes of one item (`params` or `optimizer`)."""
        handler = ocp.StandardCheckpointHandler()
        with _quiet_if_damaged():
            return handler.metadata(self.directory / str(step) / item)

    def wait(self) -> None:
        """Blocks until any async save has been written completely."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()


def abstract_like(tree):
    """Shapes, dtypes and shardings of a pytree of arrays, for restoring into."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

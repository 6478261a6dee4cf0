"""What the training loop watches as steps go by: runs of non-finite updates, and throughput."""

from __future__ import annotations

import time
from typing import Callable

import jax


class NonFiniteLoss(RuntimeError):
    """Too many updates in a row had a non-finite loss or gradient; one line."""


class NonFiniteGuard:
    """Stops a run after `max_in_a_row` updates in a row that the train step skipped for a
    non-finite loss or gradient.

    Each step's flag is read one step late (`observe` checks the previous step's flag, then
    keeps this one), so the host never waits for the step it has just dispatched; the last
    step's flag is not checked. `last_checkpoint()` names the intact checkpoint in the message.
    """

    def __init__(self, max_in_a_row: int, last_checkpoint: Callable[[], int | None]):
        self.max_in_a_row = max_in_a_row
        self.last_checkpoint = last_checkpoint
        self.in_a_row = 0  # consecutive skipped updates, up to the last flag read
        self._pending: tuple[int, jax.Array] | None = None  # (update, its int32 [] skipped flag)

    def observe(self, done: int, skipped: jax.Array) -> None:
        """Update `done`'s flag (1: skipped); raises NonFiniteLoss once the previous flags make
        `max_in_a_row` in a row."""
        if self._pending is not None:
            flag_step, flag = self._pending
            self.in_a_row = self.in_a_row + 1 if int(flag) else 0
            if self.in_a_row >= self.max_in_a_row:
                raise NonFiniteLoss(
                    f"the loss or gradient was not finite at steps {flag_step - self.in_a_row + 1}"
                    f"-{flag_step} ({self.in_a_row} in a row, train.max_nonfinite_steps="
                    f"{self.max_in_a_row}); stopped at step {flag_step}; the last checkpoint (step "
                    f"{self.last_checkpoint()}) is intact; lower train.learning_rate or check the data")
        self._pending = (done, skipped)


class Throughput:
    """Training tokens per second and model FLOPs utilisation since the timer last restarted.

    The loop restarts it after the first step (compilation is not training) and after each
    evaluation; `measure` restarts it too, so each log row covers the steps since the last.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, step: int):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.restart(step)

    def restart(self, step: int) -> None:
        """Times from now, `step` updates done."""
        self.step, self.start = step, time.perf_counter()

    def measure(self, step: int) -> dict[str, float]:
        """{"tokens_per_sec", "mfu"} over the updates since the restart (none if there were none),
        `step` updates done now; then restarts."""
        elapsed = time.perf_counter() - self.start
        row = {}
        if step > self.step:
            tokens_per_sec = (step - self.step) * self.tokens_per_step / elapsed
            row = {"tokens_per_sec": tokens_per_sec, "mfu": tokens_per_sec * self.flops_per_token / self.peak_flops}
        self.restart(step)
        return row

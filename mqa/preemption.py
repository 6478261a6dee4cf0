"""Stopping a run cleanly: SIGTERM (a preempted machine) or SIGINT (Ctrl-C) ends the step under
way, saves a checkpoint and raises `Preempted`; the same command then resumes from it.

A second SIGINT while the first is being handled (a save that takes too long) raises
KeyboardInterrupt at once, as Ctrl-C does without a handler.
"""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
    """A stop signal arrived; a checkpoint of the step named in the message was written.

    `exit_status` is what a shell reports for a process that signal ended: 128 + its number
    (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class StopSignals:
    """While entered, SIGTERM and SIGINT are recorded instead of ending the process: `received`
    is the first one's signal.Signals, or None. The previous handlers come back on exit. Outside
    the main thread (where Python cannot install handlers) it records nothing."""

    def __init__(self):
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        if self.received is None:
            self.received = signal.Signals(signum)

    def message(self, step: int, directory) -> str:
        """The one line a stop at `step` reports, its checkpoint in `directory`."""
        return (f"{self.received.name}: saved a checkpoint at step {step} in {directory}; "
                "run the same command to resume")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

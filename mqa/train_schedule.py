"""Which steps of a run log, evaluate and checkpoint, and how much held-out text each
evaluation scores.

Steps are counted as updates done (1 after the first update). The periodic evaluation scores
the same first `sampled_windows` held-out windows each time, so the curve compares like with
like; the final evaluation, after the last step, scores `final_windows` (all of a smaller split).
"""

from __future__ import annotations

import dataclasses

# Held-out tokens the final evaluation scores when a saved config predates the field.
DEFAULT_FINAL_EVAL_TOKENS = 1_000_000


def final_eval_windows(config) -> int:
    """How many held-out windows the final evaluation scores: `train.final_eval_tokens`
    worth (at least one)."""
    tokens = config.train.get("final_eval_tokens", DEFAULT_FINAL_EVAL_TOKENS)
    return max(1, tokens // config.train.seq_len)


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When a run of `steps` updates logs, evaluates and checkpoints; the last step does all three."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int
    sampled_windows: int  # held-out windows of each periodic evaluation
    final_windows: int  # held-out windows of the final evaluation

    @classmethod
    def from_config(cls, config) -> Schedule:
        train = config.train
        return cls(steps=train.steps, log_every=train.log_every, eval_every=train.eval_every,
                   checkpoint_every=config.checkpoint.every,
                   sampled_windows=train.eval_batches * train.batch_size,
                   final_windows=final_eval_windows(config))

    def is_last(self, done: int) -> bool:
        return done == self.steps

    def logs(self, done: int) -> bool:
        """Whether the metrics of update `done` are logged (with throughput since the last row)."""
        return done % self.log_every == 0 or self.is_last(done)

    def evaluates(self, done: int) -> bool:
        """Whether the sampled held-out evaluation runs after update `done`."""
        return done % self.eval_every == 0 or self.is_last(done)

    def checkpoints(self, done: int) -> bool:
        return done % self.checkpoint_every == 0 or self.is_last(done)

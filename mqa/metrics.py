"""What a user sees of a run: metrics.jsonl, TensorBoard events, and progress on the terminal."""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time

import tqdm


def _summary_writer():
    """tensorboardX's SummaryWriter, imported lazily and without PyTorch: tensorboardX
    imports torch whenever it is installed (2-3 s at every start here), only to accept
    torch tensors, and this writes Python floats."""
    block = "torch" not in sys.modules
    if block:
        sys.modules["torch"] = None  # `import torch` raises ImportError while this is set
    try:
        from tensorboardX import SummaryWriter
    finally:
        if block:
            del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends one JSON object per logged step to `WORKDIR/metrics.jsonl` and mirrors the
    numbers to TensorBoard (`WORKDIR/tensorboard`). Only process 0 writes."""

    def __init__(self, workdir: str | pathlib.Path, *, enabled: bool = True):
        self.path = pathlib.Path(workdir) / "metrics.jsonl"
        self.enabled = enabled
        self._tensorboard = None
        if enabled:
            self._tensorboard = _summary_writer()(str(pathlib.Path(workdir) / "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Forgets rows past `step`: a resumed run re-does those steps and logs them again."""
        if not self.enabled or not self.path.exists():
            return
        rows = self.path.read_text().splitlines(keepends=True)
        kept = [row for row in rows if row.strip() and json.loads(row).get("step", 0) <= step]
        if len(kept) != len(rows):
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(kept))
            os.replace(tmp, self.path)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}}
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        for name, value in row.items():
            if name != "step" and isinstance(value, (int, float)):  # None: not finite
                self._tensorboard.add_scalar(name, value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _plain(value):
    """Python numbers; NaN and infinities become null (strict JSON has neither)."""
    value = value.item() if hasattr(value, "item") else value
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


class Progress:
    """A tqdm bar (loss, tokens/s, ETA) on a terminal; plain log lines otherwise.

    The periodic held-out loss is shown as `eval_loss (sampled, N windows)` when
    `sampled_windows` = N is given, so that it is never taken for the final evaluation's."""

    def __init__(self, start: int, total: int, *, enabled: bool = True,
                 sampled_windows: int | None = None):
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.total = total
        self._labels = {"eval_loss": f"eval_loss (sampled, {sampled_windows:,} windows)"} if sampled_windows else {}
        self._start_time = time.time()
        self._start_step = start
        self._bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                              file=sys.stderr) if self.interactive else None

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        shown = {k: metrics[k] for k in ("loss", "eval_loss", "tokens_per_sec") if k in metrics}
        text = "  ".join(f"{self._labels.get(k, k)}={_format(v)}" for k, v in shown.items())
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix_str(text)
        else:
            done = step - self._start_step
            rate = done / max(time.time() - self._start_time, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
            print(f"step {step}/{self.total}  {text}  eta {eta:.0f}s", flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _format(value) -> str:
    value = float(value)
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4f}"

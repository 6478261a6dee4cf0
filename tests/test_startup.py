"""What a run pays before its first step: no PyTorch import, and XLA options that fall back."""

import subprocess
import sys

import jax

from mqa import hardware
from helpers import REPO


def test_metrics_writer_does_not_import_pytorch(tmp_path):
    """tensorboardX imports torch when it is installed (seconds per start); the metrics
    writer keeps it out, and torch stays importable afterwards."""
    code = ("import sys; from mqa.metrics import MetricsWriter; "
            f"w = MetricsWriter({str(tmp_path)!r}); w.write(1, {{'loss': 2.0}}); w.close(); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_train_compiler_options_fall_back_when_xla_does_not_know_them(monkeypatch):
    hardware.train_compiler_options.cache_clear()
    try:
        if jax.devices()[0].platform == "cpu":
            assert hardware.train_compiler_options() == hardware._CPU_TRAIN_OPTIONS
        monkeypatch.setattr(hardware, "_CPU_TRAIN_OPTIONS", {"xla_no_such_option_here": "1"})
        hardware.train_compiler_options.cache_clear()
        assert hardware.train_compiler_options() is None
    finally:
        hardware.train_compiler_options.cache_clear()

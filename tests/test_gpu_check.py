"""benchmarks/gpu_check.py, the one command a lent GPU runs, works end to end at toy size on
this machine: every part runs, and each writes its results where the docs say."""

import json
import sys

import pytest

from commands import REPO

sys.path.insert(0, str(REPO))
from benchmarks import gpu_check  # noqa: E402


@pytest.mark.slow
def test_every_part_runs_at_toy_size_and_writes_its_results(tmp_path):
    status = gpu_check.main(["--size=toy", f"--out={tmp_path}"])
    assert list(status) == ["tests", "train_tiled", "decode", "serving"]
    failed = {name: (tmp_path / f"{name}.log").read_text()[-2000:]
              for name, part in status.items() if part["state"] != "ok"}
    assert not failed, failed
    assert json.loads((tmp_path / "status.json").read_text()) == status
    for found in ("train_tiled/train_throughput.csv", "decode/decode.csv", "serving/serving.csv",
                  "serving/serving.png"):
        assert (tmp_path / found).is_file(), found


def test_the_gpu_plan_names_the_impls_and_sizes_the_issue_asks_for(tmp_path):
    plan = {name: (" ".join(command), limit) for name, command, limit in gpu_check.parts("gpu", tmp_path)}
    assert list(plan) == ["tests", "train_tiled", "train_cudnn", "train_xla", "decode", "serving"]
    assert sum(limit for _, limit in plan.values()) <= 8 * 60  # the device time a session gets
    assert "-n 0" in plan["tests"][0] and "model.dtype=bfloat16" in plan["train_cudnn"][0]
    assert "--batches=1,8,64" in plan["decode"][0] and "--contexts=2048,16384" in plan["decode"][0]

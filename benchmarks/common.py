"""What every benchmark shares: the machine in words, and results files with their context."""

from __future__ import annotations

import csv
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys

import jax

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def machine() -> str:
    """The processor and accelerator, in words (no host names)."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    device = jax.devices()[0]
    return (f"{cpu}, {os.cpu_count()} cores; {jax.device_count()} {device.platform} "
            f"device(s) ({device.device_kind})")


def write_results(out: pathlib.Path, name: str, rows: list[dict], **context) -> None:
    """`out/name.csv` (a row per measurement) and `out/name.json` (the rows with the date,
    machine, versions and command line, plus `context`)."""
    out.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with (out / f"{name}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                machine=machine(), jax=jax.__version__, command=" ".join(sys.argv),
                **context, rows=rows)
    (out / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def converted(gguf_path: pathlib.Path, workdir: pathlib.Path) -> pathlib.Path:
    """`workdir`, holding `gguf_path` converted by `python -m mqa.convert gguf` (run here
    unless it holds a checkpoint already)."""
    if not (workdir / "checkpoints").exists():
        subprocess.run([sys.executable, "-m", "mqa.convert", "gguf", "--src", str(gguf_path),
                        "--workdir", str(workdir)], cwd=REPO, check=True)
    return workdir

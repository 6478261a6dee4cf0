"""One command for a lent GPU: the GPU tests and every GPU benchmark, results in one folder.

  python benchmarks/gpu_check.py                      # on one H200: about 8 minutes
  python benchmarks/gpu_check.py --size=toy --out=/tmp/gpu_check   # any machine, seconds

Parts, in order, each with a time limit so that the whole fits the device time a session
is lent, and each independent (a part that fails or runs out of time is written down in
status.json and the next one runs):
  1. tests: the model-layer tests on the GPU, one process (`pytest -n 0`: two would each
     claim most of the GPU's memory), cuDNN attention's included;
  2. train: the train step of a 113M-parameter model (12 layers, d_model 768, 12 heads of
     64, SwiGLU 3072, bfloat16, 64 x 1024 tokens, the layer scan unrolled) with MHA and
     MQA for each attention implementation (tiled, cudnn, xla), tokens/s and MFU
     (benchmarks/train_throughput.py) -> train_IMPL/;
  3. decode: the decode grid (batch 1/8/64 x context 2K/16K; MHA, GQA-2, MQA, GTA-1,
     MLA-48, a local/global window) against the HBM floor (benchmarks/decode.py) -> decode/;
  4. serving: concurrent sequences under a 32 GB KV budget at 16K context
     (benchmarks/serving.py) -> serving/.
Each part's output goes to OUT/PART.log. `--size=toy` runs the same parts at toy sizes (a 2-layer model with the tiled core only,
MQA at contexts of 64, a 10 MB budget, one quick test file), so that tests/test_gpu_check.py checks on a CPU that the
command works before a GPU is lent. Writes OUT/status.json: per part, "ok", "failed" or
"timed out", its seconds and its command.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_113M = ["model.d_model=768", "model.num_layers=12", "model.num_heads=12", "model.head_dim=64",
              "model.mlp_dim=3072", "model.dtype=bfloat16", "train.seq_len=1024",
              "model.max_seq_len=1024", "model.scan_unroll=12", "train.batch_size=64"]
TRAIN_TOY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=4", "model.head_dim=8",
             "model.mlp_dim=64", "train.seq_len=32", "model.max_seq_len=64", "train.batch_size=2"]
VARIANTS = "MHA,GQA-2,MQA,GTA-1,MLA-48,MHA-local"  # decode and serving on the GPU
MODEL_TESTS = ["tests/test_attention.py", "tests/test_tiled.py", "tests/test_blockwise.py",
               "tests/test_families.py", "tests/test_model.py", "tests/test_decode.py",
               "tests/test_partial_rope.py", "tests/test_gemma_model.py"]


def parts(size: str, out: pathlib.Path) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) for each part at `size` ("gpu" or "toy")."""
    py, gpu, variants = sys.executable, size == "gpu", VARIANTS
    tests = MODEL_TESTS if gpu else ["tests/test_attention.py", "-k", "cudnn"]
    found = [("tests", [py, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", *tests], 120 if gpu else 150)]
    model, impls = (TRAIN_113M, ["tiled", "cudnn", "xla"]) if gpu else (TRAIN_TOY, ["tiled"])
    for impl in impls:
        overrides = [item for o in [*model, f"model.attention_impl={impl}"] for item in ("--override", o)]
        found.append((f"train_{impl}", [
            py, "benchmarks/train_throughput.py", "--no-torch", "--kv_heads=12,1" if gpu else "--kv_heads=1",
            "--steps=10" if gpu else "--steps=1", "--rounds=3" if gpu else "--rounds=1", *overrides,
            f"--out={out / f'train_{impl}'}"], 60 if gpu else 120))
    found.append(("decode", [
        py, "benchmarks/decode.py", "--no-torch", "--no-hf", f"--variants={variants if gpu else 'MQA'}",
        "--contexts=2048,16384" if gpu else "--contexts=64", "--batches=1,8,64" if gpu else "--batches=2",
        "--repeats=5" if gpu else "--repeats=1", "--steps=32" if gpu else "--steps=2",
        f"--out={out / 'decode'}"], 90 if gpu else 120))
    found.append(("serving", [
        py, "benchmarks/serving.py", "--budget_gb=32" if gpu else "--budget_gb=0.01",
        "--context=16384" if gpu else "--context=64", f"--variants={variants if gpu else 'MQA'}",
        "--repeats=3" if gpu else "--repeats=1", "--steps=8" if gpu else "--steps=2",
        "--fractions=1,0.25" if gpu else "--fractions=1", f"--out={out / 'serving'}"], 60 if gpu else 120))
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["gpu", "toy"], default="gpu")
    parser.add_argument("--out", type=pathlib.Path, default=REPO / "benchmarks" / "results" / "gpu_check")
    parser.add_argument("--only", default="", help="comma-separated part names (default: all)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    plan = parts(args.size, args.out.resolve())
    if args.only:
        wanted = args.only.split(",")
        unknown = [name for name in wanted if name not in {n for n, _, _ in plan}]
        if unknown:
            parser.error(f"--only: {unknown[0]!r} is not one of {', '.join(n for n, _, _ in plan)}")
        plan = [part for part in plan if part[0] in wanted]
    status = {}
    environment = dict(os.environ)
    if args.size == "toy":  # only checks that every part runs: XLA compiles unoptimized, faster
        environment["XLA_FLAGS"] = f"{environment.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    for name, command, limit in plan:
        start = time.perf_counter()
        print(f"[{name}] {' '.join(command[1:])} (at most {limit} s)", flush=True)
        try:
            result = subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True,
                                    timeout=limit)
            state = "ok" if result.returncode == 0 else "failed"
            log = result.stdout + result.stderr
        except subprocess.TimeoutExpired as expired:
            state = "timed out"
            log = "".join(part.decode() if isinstance(part, bytes) else (part or "")
                          for part in (expired.stdout, expired.stderr))
        (args.out / f"{name}.log").write_text(log)
        status[name] = {"state": state, "seconds": round(time.perf_counter() - start, 1),
                        "command": " ".join(command[1:])}
        print(f"[{name}] {state} in {status[name]['seconds']} s", flush=True)
        (args.out / "status.json").write_text(json.dumps(status, indent=2) + "\n")
    return status


if __name__ == "__main__":
    results = main()
    sys.exit(0 if all(part["state"] == "ok" for part in results.values()) else 1)

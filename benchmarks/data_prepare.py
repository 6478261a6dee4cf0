"""Preparing token files: peak memory against corpus size, tokenization speed, threads and disk.

  python benchmarks/data_prepare.py --byte_mb=100,1000 --bpe_mb=10,100
  python benchmarks/data_prepare.py --train_start_gb=0.1,1,4      # training start against corpus size

Generates plain-text corpora of the given sizes (repeated, shuffled English-like lines) in a
temporary folder and prepares each in a fresh child process, as `python -m mqa.data prepare`
does (`data.load_corpus`), measuring:

- peak resident memory of the child (ru_maxrss), and what it adds to the imports' own;
- MB/s of text through the whole preparation (reading, splitting, tokenizing, writing shards):
  byte tokens, and a byte-level BPE (1,024 ids, trained beforehand on 10 MB, passed as a
  tokenizer.json so that its training is timed apart) with the `tokenizers` library's thread
  pool at 1 and 2 threads (RAYON_NUM_THREADS): the speedup from the second core;
- each tokenizer's smallest corpus encoded the old way, all in memory: the `tokenizers` library
  encoding the whole text in one call (BPE), or the bytes read whole and widened to int32 (byte);
- disk bytes per token of the shards (.npy headers included).

Writes benchmarks/results/data_prepare/data_prepare.{csv,json} (date, machine, command; no paths).

--train_start_gb measures instead what starting to train costs as the corpus grows: for each size
it generates the corpus (byte tokens), prepares it in a child as above, then runs train.py in a
fresh child on the prepared `data.token_dir` (configs/tiny.py, a few steps, batch 8, the final
evaluation included) and records that child's peak RSS and what it adds to the RSS its imports
reach (JAX, mqa.trainer), with the compilation cache off so that every run compiles, as a first
one does. Writes benchmarks/results/data_prepare/data_train_start.{csv,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]

RSS = """
import json, resource, sys, time

def rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
"""

CHILD = RSS + """
import numpy as np
import ml_collections
from mqa import data

method, path, tokenizer, cache = sys.argv[1:5]
imports_mb = rss_mb()
start = time.perf_counter()
if method == "prepare":
    config = ml_collections.ConfigDict(dict(path=path, hf_name="", hf_config="", tokenizer=tokenizer,
                                            bpe_vocab_size=1024, heldout_fraction=0.1))
    corpus = data.load_corpus(config, cache, min_tokens=1)
    tokens = len(corpus.train) + len(corpus.heldout)
elif tokenizer == "byte":  # the previous version: the whole file, then int32 ids
    tokens = len(data.ByteTokenizer().encode(open(path, "rb").read()))
else:  # the tokenizers library, the whole text in one call
    import tokenizers
    text = open(path, encoding="utf-8").read()
    tokens = len(tokenizers.Tokenizer.from_file(tokenizer).encode(text, add_special_tokens=False).ids)
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, tokens=tokens, peak_rss_mb=rss_mb(), imports_rss_mb=imports_mb)))
"""

TRAIN_CHILD = RSS + """
import runpy
import absl.app, jax, ml_collections  # what train.py imports, before it reads any data
from mqa import cli, trainer
imports_mb = rss_mb()
sys.argv = ["train.py", *sys.argv[1:]]
start = time.perf_counter()
try:
    runpy.run_path("train.py", run_name="__main__")
except SystemExit as stop:
    if stop.code:
        raise
seconds = time.perf_counter() - start
print(json.dumps(dict(seconds=seconds, peak_rss_mb=rss_mb(), imports_rss_mb=imports_mb)))
"""


def make_corpus(path: pathlib.Path, megabytes: float) -> int:
    """Writes about `megabytes` MB of text: tinyshakespeare's lines, shuffled anew for every copy."""
    import numpy as np

    lines = (REPO / "data" / "tinyshakespeare.txt").read_text().splitlines(keepends=True)
    rng = np.random.default_rng(0)
    target, written = int(megabytes * 1e6), 0
    with open(path, "w") as f:
        while written < target:
            block = "".join(lines[i] for i in rng.permutation(len(lines)))[: target - written]
            f.write(block)
            written += len(block.encode())
    return path.stat().st_size


def run_child(method: str, corpus: pathlib.Path, tokenizer: str, cache: pathlib.Path, threads: int | None) -> dict:
    env = dict(os.environ)
    if threads:
        env["RAYON_NUM_THREADS"] = str(threads)
    return child_result([CHILD, method, str(corpus), tokenizer, str(cache)], env)


def run_train(corpus: pathlib.Path, token_dir: pathlib.Path, workdir: pathlib.Path, steps: int) -> dict:
    """train.py on configs/tiny.py for `steps` steps, batch 8, on the corpus prepared in token_dir."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}  # compiles, as a first run
    return child_result([TRAIN_CHILD, "--config=configs/tiny.py", f"--workdir={workdir}",
                         f"--config.data.path={corpus}", f"--config.data.token_dir={token_dir}",
                         f"--config.train.steps={steps}", "--config.train.batch_size=8"], env)


def child_result(args: list[str], env: dict) -> dict:
    """The JSON a child `python -c args...` prints last."""
    result = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True, cwd=REPO, env=env)
    if result.returncode:
        raise SystemExit(f"child failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def shard_bytes(cache: pathlib.Path) -> tuple[int, int]:
    shards = [f for f in cache.rglob("*.npy")]
    return sum(f.stat().st_size for f in shards), len(shards)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--byte_mb", default="100", help="comma-separated corpus sizes (MB) for byte tokens")
    parser.add_argument("--bpe_mb", default="10", help="comma-separated corpus sizes (MB) for BPE tokens")
    parser.add_argument("--train_start_gb", default="",
                        help="comma-separated corpus sizes (GB): train.py's start against corpus size, instead")
    parser.add_argument("--train_steps", type=int, default=5, help="with --train_start_gb: steps train.py runs")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "data_prepare")
    args = parser.parse_args(argv)
    if args.train_start_gb:
        rows = train_start([float(gb) for gb in args.train_start_gb.split(",") if gb], args.train_steps)
        print_table(rows)
        write_results(args.out, "data_train_start", rows, train_steps=args.train_steps,
                      note="2-core CPU shared with other work; children run at the caller's nice level; "
                           "memory, not timing")
        return
    from mqa import data

    rows = []
    with tempfile.TemporaryDirectory(prefix="data_prepare.") as tmp:
        tmp = pathlib.Path(tmp)
        make_corpus(tmp / "sample.txt", 10)
        start = time.perf_counter()
        text = (tmp / "sample.txt").read_text()
        data.BpeTokenizer.train(data.line_chunks(text), 1024).save(tmp / "bpe")
        bpe_train_seconds = time.perf_counter() - start
        print(f"BPE (1,024 ids) trained on 10 MB in {bpe_train_seconds:.1f} s", flush=True)
        cases = [("byte", float(mb), None) for mb in args.byte_mb.split(",") if mb]
        cases += [("bpe", float(mb), threads) for mb in args.bpe_mb.split(",") if mb for threads in (1, 2)]
        for name, megabytes, threads in cases:
            corpus = tmp / f"corpus-{megabytes:g}MB.txt"
            size = corpus.stat().st_size if corpus.exists() else make_corpus(corpus, megabytes)
            tokenizer = "byte" if name == "byte" else str(tmp / "bpe" / "tokenizer.json")
            cache = tmp / f"cache-{name}-{megabytes:g}-{threads}"
            measured = run_child("prepare", corpus, tokenizer, cache, threads)
            disk, shards = shard_bytes(cache)
            rows.append(row(name, "prepare: streamed into token files", size, threads, measured,
                            disk_bytes_per_token=round(disk / measured["tokens"], 4), shards=shards))
            print(rows[-1], flush=True)
        for name in dict.fromkeys(case[0] for case in cases):  # on each tokenizer's smallest corpus
            megabytes = min(case[1] for case in cases if case[0] == name)
            corpus = tmp / f"corpus-{megabytes:g}MB.txt"
            size = corpus.stat().st_size
            tokenizer = "byte" if name == "byte" else str(tmp / "bpe" / "tokenizer.json")
            reference = "bytes read whole, int32 ids" if name == "byte" else "tokenizers: one encode() call"
            rows.append(row(name, f"in memory: {reference}", size, None, run_child("one_call", corpus, tokenizer, tmp, None)))
            print(rows[-1], flush=True)
    print_table(rows)
    write_results(args.out, "data_prepare", rows, bpe_train_seconds_10mb=round(bpe_train_seconds, 2),
                  note="2-core CPU shared with a running experiment; children run at the caller's nice level")


def train_start(sizes_gb: list[float], steps: int) -> list[dict]:
    """For each size: a corpus generated and prepared (byte tokens), then train.py started on its token_dir."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="data_train_start.") as tmp:
        tmp = pathlib.Path(tmp)
        for gb in sizes_gb:
            corpus, cache, workdir = tmp / f"corpus-{gb:g}GB.txt", tmp / f"tokens-{gb:g}GB", tmp / f"run-{gb:g}GB"
            size = make_corpus(corpus, gb * 1000)
            measured = run_child("prepare", corpus, "byte", cache, None)
            disk, shards = shard_bytes(cache)
            rows.append(row("byte", "prepare: streamed into token files", size, None, measured,
                            disk_bytes_per_token=round(disk / measured["tokens"], 4), shards=shards))
            print(rows[-1], flush=True)
            trained = run_train(corpus, cache, workdir, steps)
            if len(list(cache.iterdir())) != 1:
                raise SystemExit(f"train.py did not open the prepared token files: {sorted(cache.iterdir())}")
            rows.append(dict(tokenizer="byte", method=f"train.py: {steps} steps of configs/tiny.py, batch 8",
                             corpus_mb=round(size / 1e6, 1), seconds=round(trained["seconds"], 2),
                             peak_rss_mb=round(trained["peak_rss_mb"]), imports_rss_mb=round(trained["imports_rss_mb"]),
                             tokens=measured["tokens"], shards=shards))
            print(rows[-1], flush=True)
            for folder in (cache, workdir):  # disk for the next size
                shutil.rmtree(folder)
            corpus.unlink()
    for r in rows:
        r["added_rss_mb"] = r["peak_rss_mb"] - r["imports_rss_mb"]
    return rows


def row(tokenizer: str, method: str, size: int, threads: int | None, measured: dict, **extra) -> dict:
    return dict(tokenizer=tokenizer, method=method, corpus_mb=round(size / 1e6, 1), threads=threads or "",
                seconds=round(measured["seconds"], 2), mb_per_s=round(size / 1e6 / measured["seconds"], 2),
                peak_rss_mb=round(measured["peak_rss_mb"]), imports_rss_mb=round(measured["imports_rss_mb"]),
                tokens=measured["tokens"], **extra)


def print_table(rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(fields) + " |")
    print("|" + "---|" * len(fields))
    for r in rows:
        print("| " + " | ".join(str(r.get(k, "")) for k in fields) + " |")


if __name__ == "__main__":
    main()

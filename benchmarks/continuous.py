"""Continuous batching against static batching, per attention family, under a KV budget.

  python benchmarks/continuous.py                      # budget 64 MB, context 512
  python benchmarks/continuous.py --variants=MHA,MQA --requests=240

Each family of `benchmarks/decode.py`'s model (4 layers, d_model 256, 8 query heads) gets
the rows a KV-memory budget admits at the context (`serving.max_batch`; every row's ring
holds `--context` positions, capped at `--max_rows`) and serves the same stream of
requests: `--requests` prompts of uniformly random lengths (1/16 to 1/4 of the context),
each asking for a uniformly random number of new tokens (1/16 to 1/2 of it), all waiting at
the start (an offline batch job), greedy. Two policies (`mqa.serve`):
  - static: the batch is refilled only when every row is done (it waits for its longest);
  - continuous: a row is refilled as soon as its request is done (Orca, vLLM).
Reported per family and policy: wall seconds for the whole stream (compilation excluded:
every prefill bucket and the decoding loop are compiled first), new tokens/s, the share of
row-steps that decoded a token some request kept (utilization), steps and prefills.
Writes benchmarks/results/continuous/continuous.{csv,json} and prints a table.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.decode import VARIANTS, variant_config  # noqa: E402
from benchmarks.serving import max_batch  # noqa: E402
from mqa import data  # noqa: E402
from mqa.config import default_config  # noqa: E402
from mqa.loading import LoadedModel  # noqa: E402
from mqa.model import Transformer  # noqa: E402
from mqa.serving import POLICIES, ServeStats, bucket, serve  # noqa: E402


def workload(requests: int, context: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """(prompts, new tokens each): prompt lengths uniform in [context/16, context/4], new
    tokens uniform in [context/16, context/2], byte tokens; seeded."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(1, context // 16), context // 4 + 1, requests)
    wanted = rng.integers(max(1, context // 16), context // 2 + 1, requests)
    return [rng.integers(0, 256, n).astype(np.int32) for n in lengths], wanted.tolist()


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    names = lambda text: text.split(",")  # noqa: E731
    parser.add_argument("--variants", type=names, default=["MHA", "GQA-2", "MQA", "MLA-48", "MHA-local"])
    parser.add_argument("--budget_gb", type=float, default=0.064)
    parser.add_argument("--context", type=int, default=512, help="positions each row holds")
    parser.add_argument("--requests", type=int, default=960)
    parser.add_argument("--max_rows", type=int, default=128)
    parser.add_argument("--steps_per_call", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "continuous")
    args = parser.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"--variants: {unknown[0]!r} is not one of {', '.join(VARIANTS)}")
    if min(args.requests, args.max_rows, args.steps_per_call) < 1 or args.context < 16 \
            or args.budget_gb <= 0:
        parser.error(f"--requests={args.requests}, --max_rows={args.max_rows} and "
                     f"--steps_per_call={args.steps_per_call} must be at least 1, --context="
                     f"{args.context} at least 16 and --budget_gb={args.budget_gb} above 0")
    return args


def main(argv=None) -> None:
    args = parse(argv)
    prompts, wanted = workload(args.requests, args.context, args.seed)
    rows_out = []
    for variant in args.variants:
        config = variant_config(variant)
        if config.attention_sinks or config.kv_cache_dtype == "int4":  # no ragged rows
            continue
        most, per_sequence = max_batch(config, args.context, args.budget_gb * 1e9)
        rows = min(most, args.max_rows)
        if rows < 1:
            sys.exit(f"error: one {variant} sequence of {args.context} positions "
                     f"({per_sequence:,} bytes) exceeds --budget_gb={args.budget_gb}")
        graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
        model = LoadedModel(default_config(), config, graphdef, params, data.ByteTokenizer(), 0, None)
        options = dict(batch_size=rows, max_len=args.context, steps_per_call=args.steps_per_call)
        # compile every prefill bucket the stream uses, and the decoding loop, first
        widths = sorted({bucket(len(p), args.context) for p in prompts})
        serve(model, [np.ones(w, np.int32) for w in widths], 2, **options)
        for policy in POLICIES[::-1]:  # static first: the baseline
            stats = ServeStats()
            start = time.perf_counter()
            serve(model, prompts, wanted, policy=policy, stats=stats, **options)
            seconds = time.perf_counter() - start
            new_tokens = sum(wanted)
            rows_out.append(dict(
                configuration=variant, kv_bytes_per_token=per_sequence / args.context,
                max_batch=most, rows=rows, policy=policy, requests=args.requests,
                new_tokens=new_tokens, seconds=seconds, tokens_per_sec=new_tokens / seconds,
                utilization=stats.busy_row_steps / (stats.steps * rows), steps=stats.steps,
                prefills=stats.prefills, prefill_seconds=stats.prefill_seconds,
                decode_seconds=stats.decode_seconds, context=args.context, budget_gb=args.budget_gb))
            print(f"{variant:>10} {policy:>10}: {rows} rows, {seconds:6.1f} s, "
                  f"{new_tokens / seconds:7.0f} tokens/s, utilization "
                  f"{rows_out[-1]['utilization']:.0%}, {stats.steps} steps "
                  f"({stats.decode_seconds:.1f} s), {stats.prefills} prefills "
                  f"({stats.prefill_seconds:.1f} s)", flush=True)
    by = {(r["configuration"], r["policy"]): r for r in rows_out}
    for r in rows_out:
        r["speedup_vs_static"] = by[(r["configuration"], "static")]["seconds"] / r["seconds"]
    write_results(args.out, "continuous", rows_out, seed=args.seed,
                  steps_per_call=args.steps_per_call, max_rows=args.max_rows)
    print(f"\nwrote {args.out / 'continuous'}.csv and .json")


if __name__ == "__main__":
    main()

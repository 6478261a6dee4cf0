"""What a smaller KV cache buys a server: concurrent sequences under a memory budget.

  python benchmarks/serving.py                                  # budget 1 GB, context 2048
  python benchmarks/serving.py --budget_gb=0.25 --context=1024 --variants=MHA,MQA
  python benchmarks/serving.py --variants=MQA --workdir=gemma3_270m=runs/gemma3_270m \
      --out=benchmarks/results/serving_real          # a trained or converted model too
  python benchmarks/serving.py --variants=MQA --workdir=smollm2=runs/smollm2 \
      --workdir=smollm2-kernel=runs/smollm2   # NAME-kernel: through the C++ decoding kernel

For each attention variant of `benchmarks/decode.py`'s model (4 layers, d_model 256, 8
query heads; MHA, GQA, MQA, GTA, MLA, a local/global window, int8 caches):
  - the largest batch whose KV cache fits the budget: `kv_cache_bytes` per sequence at the
    context, checked against the buffers `init_cache` allocates (`jax.eval_shape`, nothing
    allocated);
  - aggregate decode tokens/s (batch x steps / seconds) at that batch and at smaller ones
    (--fractions of it), every sequence holding `context` tokens, timed with the decoding
    loop `mqa.generate` runs (`mqa.timing.decode_loop`); the batches of all variants at one
    fraction are timed in alternating rounds;
  - the fraction of the memory floor reached: the bytes a step reads (weights + the whole
    cache, once per layer that reads it: `accounting.decode_step_bytes`) over the read bandwidth measured in the same run, against the measured step;
    of the compute floor: the step's matmul FLOPs (`accounting.decode_step_flops`, each
    row's own length when ragged) over the matmul rate measured in the same run (a 1024^2
    float32 product, as for MFU); and of the roofline, the larger of the two floors (at
    large batches compute binds as much as memory);
  - prefill: seconds to run the whole context through the model into an empty cache, one
    sequence.
Writes benchmarks/results/serving/serving.{csv,json,png}: one row per variant and timed
batch (`is_max_batch` marks the budget's), and tokens/s against concurrent sequences.

With --ragged the rows of a batch hold different lengths, evenly spread from context / 8
to context (mean 9/16 of it), each left-padded to the context and decoded at its own
positions (`KVCache.starts`), as real traffic is; the cache is still allocated at the full
context per row, so the budget admits the same batch, and the row's `max_batch_paged`
says how many such sequences a paged cache (pages allocated as a row grows, vLLM's
PagedAttention) would admit instead. docs/decoding.md says what paging would take here.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.decode import VARIANTS, read_bandwidth, variant_config  # noqa: E402
from mqa import accounting, hardware, load_model  # noqa: E402
from mqa.errors import ConfigError  # noqa: E402
from mqa.kv_cache import init_cache  # noqa: E402
from mqa.model import Transformer  # noqa: E402
from mqa.model_config import ModelConfig  # noqa: E402
from mqa.workdir import CheckpointError  # noqa: E402
from mqa.timing import alternating_medians, decode_loop, median_seconds, timed  # noqa: E402

RAGGED_SHORTEST = 1 / 8  # --ragged: row lengths evenly spread from this fraction of the context to all of it


def ragged_lengths(batch: int, context: int) -> list[int]:
    """Each row's tokens in a ragged batch: evenly spread from context / 8 to context."""
    if batch == 1:
        return [context]
    return [round(context * (RAGGED_SHORTEST + (1 - RAGGED_SHORTEST) * i / (batch - 1)))
            for i in range(batch)]

DEFAULT_VARIANTS = ("MHA", "GQA-2", "MQA", "GTA-1", "MLA-48", "MHA-local", "MQA-int8")


def max_batch(config: ModelConfig, context: int, budget_bytes: float) -> tuple[int, int]:
    """(the most sequences whose caches fit `budget_bytes` at `context`, bytes per sequence),
    the bytes checked against what `init_cache` would allocate."""
    per_sequence = accounting.kv_cache_bytes(config, 1, context)
    shapes = jax.eval_shape(lambda: init_cache(config, 1, context).layers)
    allocated = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(shapes))
    if allocated != per_sequence:
        raise AssertionError(f"kv_cache_bytes={per_sequence} but init_cache allocates {allocated}")
    return int(budget_bytes // per_sequence), per_sequence


def prefill_seconds(graphdef, params, config: ModelConfig, context: int, repeats: int) -> float:
    """Median seconds to prefill one sequence of `context` tokens into an empty cache."""
    @jax.jit
    def prefill(params, tokens):
        model = nnx.merge(graphdef, params)
        logits, cache = model.step(tokens, init_cache(config, 1, context))
        return logits[:, -1], cache.index

    tokens = jnp.zeros((1, context), jnp.int32)
    jax.block_until_ready(prefill(params, tokens))
    return median_seconds(lambda: jax.block_until_ready(prefill(params, tokens)), repeats)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_gb", type=float, default=1.0, help="KV-cache memory budget, GB (1e9 bytes)")
    parser.add_argument("--context", type=int, default=2048, help="tokens every sequence holds")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    parser.add_argument("--fractions", default="1,0.25,0.0625",
                        help="timed batches as fractions of each variant's max batch")
    parser.add_argument("--max_batch_cap", type=int, default=512,
                        help="time at most this many sequences (the max batch is still reported)")
    parser.add_argument("--steps", type=int, default=8, help="decoding steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds; the median is kept")
    parser.add_argument("--bandwidth_mb", type=int, default=256,
                        help="array size for measuring read bandwidth (larger than the caches)")
    parser.add_argument("--ragged", action="store_true",
                        help="rows of different lengths (context/8 .. context), left-padded")
    parser.add_argument("--workdir", action="append", default=[], metavar="NAME=PATH",
                        help="also a trained or converted model (mqa.load_model), named NAME; "
                        "a NAME ending in -kernel decodes through the C++ kernel")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "serving")
    args = parser.parse_args(argv)
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad or not names:
        parser.error(f"--variants: {bad[0] if bad else args.variants!r} is not one of {', '.join(VARIANTS)}")
    if args.budget_gb <= 0:
        parser.error(f"--budget_gb={args.budget_gb} must be > 0")
    limit = variant_config(names[0]).max_seq_len
    if not 1 <= args.context <= limit - args.steps:
        parser.error(f"--context={args.context} must be in 1..{limit - args.steps} (max_seq_len - steps)")
    try:
        args.fractions = sorted({float(f) for f in args.fractions.split(",")}, reverse=True)
    except ValueError:
        parser.error(f"--fractions={args.fractions!r} must be numbers in (0, 1], comma-separated")
    if not all(0 < f <= 1 for f in args.fractions):
        parser.error(f"--fractions={args.fractions} must be in (0, 1]")
    if min(args.steps, args.repeats, args.max_batch_cap) < 1:
        parser.error("--steps, --repeats and --max_batch_cap must be at least 1")
    args.variants = names
    args.workdirs = {}
    for item in args.workdir:
        name, sep, path = item.partition("=")
        if not sep or not name or not pathlib.Path(path).is_dir():
            parser.error(f"--workdir={item!r} must be NAME=PATH of an existing workdir")
        args.workdirs[name] = pathlib.Path(path)
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    budget = args.budget_gb * 1e9
    bandwidth = read_bandwidth(args.bandwidth_mb)
    matmul_rate = hardware.measured_matmul_flops("float32")  # as MFU
    models, rows = {}, []
    sources = {name: variant_config(name) for name in args.variants}
    sources.update(args.workdirs)
    for name, source in sources.items():
        if isinstance(source, pathlib.Path):  # NAME-kernel: decoding through the C++ kernel
            try:
                loaded = load_model(source, overrides={"model.decode_impl": "cpu_kernel"}
                                    if name.endswith("-kernel") else None)
            except (ConfigError, CheckpointError) as error:
                raise SystemExit(f"error: --workdir={name}={source}: {error}") from None
            config = dataclasses.replace(loaded.model_config, max_seq_len=args.context + args.steps)
            graphdef, params = loaded.graphdef, loaded.params
        else:
            config = dataclasses.replace(source, max_seq_len=args.context + args.steps)
            graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
        most, per_sequence = max_batch(config, args.context, budget)
        if most < 1:
            raise SystemExit(f"error: {name}: one sequence's cache ({per_sequence:,} bytes at "
                             f"--context={args.context}) exceeds --budget_gb={args.budget_gb}")
        models[name] = (config, graphdef, params, most, per_sequence)
        print(f"{name}: {per_sequence / args.context:,.0f} KV bytes/token, max batch {most}", flush=True)
    for fraction in args.fractions:
        runs, cache_bytes, batches = {}, {}, {}
        for name, (config, graphdef, params, most, _) in models.items():
            batch = max(1, min(args.max_batch_cap, round(most * fraction)))
            starts = ([args.context - n for n in ragged_lengths(batch, args.context)]
                      if args.ragged and batch > 1 else None)
            run, _, cache_bytes[name] = decode_loop(graphdef, params, config, batch, args.context,
                                                    args.steps, starts)
            run()  # compile and warm up
            runs[name], batches[name] = timed(run), batch
        seconds = alternating_medians(runs, args.repeats)
        for name, (config, graphdef, params, most, per_sequence) in models.items():
            batch, step = batches[name], seconds[name] / args.steps
            floor = accounting.decode_step_bytes(config, cache_bytes[name]) / bandwidth
            lengths = ragged_lengths(batch, args.context) if args.ragged else [args.context] * batch
            mean_length = sum(lengths) / batch
            compute_floor = sum(accounting.decode_step_flops(config, 1, n) for n in lengths) / matmul_rate
            rows.append(dict(
                configuration=name, kv_bytes_per_token=per_sequence / args.context,
                max_batch=most, batch=batch, is_max_batch=batch == min(most, args.max_batch_cap),
                ragged=args.ragged, mean_length=mean_length,
                max_batch_paged=int(budget // (per_sequence / args.context * mean_length)),
                tokens_per_sec=batch / step, ms_per_step=1e3 * step,
                memory_floor_fraction=floor / step, compute_floor_fraction=compute_floor / step,
                roofline_fraction=max(floor, compute_floor) / step, context=args.context,
                budget_gb=args.budget_gb))
            print(f"{name}: batch {batch}: {batch / step:,.0f} tokens/s ({100 * floor / step:.0f}% "
                  f"of the memory floor, {100 * compute_floor / step:.0f}% of the compute floor)",
                  flush=True)
    for row in rows:
        config, graphdef, params, _, _ = models[row["configuration"]]
        if row["is_max_batch"]:
            row["prefill_s"] = prefill_seconds(graphdef, params, config, args.context, args.repeats)
    write_results(args.out, "serving", rows, read_bandwidth_bytes_per_sec=bandwidth,
                  matmul_flops_per_sec=matmul_rate,
                  steps=args.steps, repeats=args.repeats)
    plot(rows, args.out / "serving.png")
    return rows


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["configuration"] for r in rows):
        points = sorted((r["batch"], r["tokens_per_sec"]) for r in rows if r["configuration"] == name)
        ax.plot(*zip(*points), marker="o", label=name)
    first = rows[0]
    ax.set(xscale="log", yscale="log", xlabel="concurrent sequences",
           ylabel="aggregate decode tokens/s",
           title=f"KV budget {first['budget_gb']:g} GB, context {first['context']:,}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

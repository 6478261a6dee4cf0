"""Keys that are also the values, read from memory once: the C++ decoding kernel's chunked
path (positions in chunks that stay in the processor's cache for both products, merged by
their softmax statistics; `cpu_decode.set_chunk_bytes`) against its two whole passes over
the cache, in one process, alternating rounds. The families whose cache is one buffer are
latent attention (the cached rows) and tied attention (the tied state); --workdir times a
trained or retrofitted model of either.

  python benchmarks/kernel_one_pass.py --variants=MLA-48-kernel,GTA-1-kernel --batch=476
  python benchmarks/kernel_one_pass.py --batch=8 --context=8176 \\
      --workdir="SmolLM2 MLA shared rope 64 + latent 64=runs/retrofit/MLA_shared_rope_64_+_latent_64"

Writes OUT/NAME.{csv,json,md}: per model its cache bytes, decode tokens/s through each
path and the speed-up.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.decode import VARIANTS, variant_config  # noqa: E402
from mqa.workdir import CheckpointError, find_workdir  # noqa: E402

TWO_PASSES = 1 << 62  # a chunk larger than any cache: each product reads the whole buffer
STEPS = 16


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default="",
                        help="comma-separated kernel variants of benchmarks/decode.py (MLA-48-kernel, GTA-1-kernel)")
    parser.add_argument("--workdir", action="append", default=[], metavar="NAME=PATH",
                        help="a workdir to time through the kernel (repeatable)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=2048, help="tokens in the cache")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(RESULTS / "kernel_one_pass"))
    parser.add_argument("--table", default="one_pass", help="the results files' name")
    args = parser.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in args.variants if v not in VARIANTS or not v.endswith("-kernel")]
    if bad:
        parser.error(f"--variants: {bad[0]!r} is not one of "
                     f"{', '.join(v for v in VARIANTS if v.endswith('-kernel'))}")
    for spec in args.workdir:
        if "=" not in spec:
            parser.error(f"--workdir {spec!r}: expected NAME=PATH, PATH a workdir")
        try:
            find_workdir(spec.split("=", 1)[1])
        except CheckpointError as error:
            parser.error(f"--workdir {spec!r}: {error}")
    if not args.variants and not args.workdir:
        parser.error("nothing to time: give --variants and/or --workdir")
    if min(args.batch, args.context, args.repeats) < 1:
        parser.error(f"--batch={args.batch}, --context={args.context} and --repeats={args.repeats} "
                     "must be at least 1")
    return args


def models(args):
    """name -> (graphdef, params, config) of each variant (fresh weights) and workdir,
    decoding through the kernel."""
    import dataclasses

    from flax import nnx

    from mqa.loading import load_model
    from mqa.model import Transformer
    for name in args.variants:
        config = dataclasses.replace(variant_config(name), max_seq_len=args.context + STEPS)
        yield name, (*nnx.split(Transformer(config, rngs=nnx.Rngs(0))), config)
    for spec in args.workdir:
        name, path = spec.split("=", 1)
        model = load_model(path, overrides={"model.decode_impl": "cpu_kernel",
                                            "model.max_seq_len": args.context + STEPS})
        yield name, (model.graphdef, model.params, model.model_config)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    from mqa.attention import cpu_decode
    from mqa.timing import alternating_medians, decode_loop, timed
    if not cpu_decode.compiler_found():
        sys.exit("error: the C++ decoding kernel needs a C++ compiler ($CXX, default g++); none was found")
    default = cpu_decode.set_chunk_bytes(TWO_PASSES)  # the size it replaces: the one in use
    cpu_decode.set_chunk_bytes(default)
    rows = []
    for name, (graphdef, params, config) in models(args):
        loop, _, cache_bytes = decode_loop(graphdef, params, config, args.batch, args.context, STEPS)
        loop()  # compile
        seconds = timed(loop)

        def arm(size, seconds=seconds):
            def run():
                cpu_decode.set_chunk_bytes(size)
                return seconds()
            return run
        before = cpu_decode.chunked_tasks()
        medians = alternating_medians({"two passes": arm(TWO_PASSES), "one pass": arm(default)},
                                      args.repeats, pause=0.5)
        cpu_decode.set_chunk_bytes(default)
        tokens = args.batch * STEPS
        rows.append(dict(model=name, batch=args.batch, context=args.context, kv_cache_bytes=cache_bytes,
                         chunked=cpu_decode.chunked_tasks() > before,
                         two_passes_tokens_per_sec=tokens / medians["two passes"],
                         one_pass_tokens_per_sec=tokens / medians["one pass"],
                         speedup=medians["two passes"] / medians["one pass"]))
        print(rows[-1], flush=True)
        del loop, seconds
    out = pathlib.Path(args.out)
    write_results(out, args.table, rows, repeats=args.repeats, steps=STEPS, chunk_bytes=default)
    lines = ["| model | batch | context | cache bytes | two passes, tokens/s | one pass, tokens/s | speed-up |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['batch']} | {r['context']:,} | {r['kv_cache_bytes']:,} | "
              f"{r['two_passes_tokens_per_sec']:,.1f} | {r['one_pass_tokens_per_sec']:,.1f} | "
              f"{r['speedup']:.2f}x |" for r in rows]
    (out / f"{args.table}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

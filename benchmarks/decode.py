"""Decoding speed and KV-cache memory by attention family and cache policy.

  python benchmarks/decode.py                      # the full grid, with transformers
  python benchmarks/decode.py --variants=MHA,MQA --contexts=2048 --batches=8 --no-hf --no-torch
  python benchmarks/decode.py --profile           # where a step's time goes, by kind of op

One model (4 layers, d_model 256, 8 query heads, SwiGLU 1024, float32) in each of the
`VARIANTS` (grouped attention with 8, 4, 2 and 1 K/V heads; tied attention with 2 and 1;
latent attention with a 64-number latent, and with a 48-number one whose cache equals
MQA's; a local/global sliding window; int8 caches), decoded at several context lengths
and batch sizes. Each
point times cached decoding steps exactly as `mqa.generate` runs them (a compiled
`lax.scan` of `Transformer.step` with the layer weights sliced once and the cache donated),
starting from a cache already holding `context` tokens; at each context and batch, all the
variants are timed in alternating rounds, so that the shared machine's load falls on all
of them alike. Next to each time: the bytes the
step must read (all weights + the whole KV-cache buffer, once per layer that reads it:
`accounting.decode_step_bytes`) and the "memory floor", those
bytes over the machine's read bandwidth measured in the same run. Beside each point, the
same model and weights decoded by the loop one would write by hand in PyTorch (eager, a
preallocated cache written in place, grouped heads without repeated K/V;
benchmarks/torch_model.py), and at one point Hugging Face transformers
(`LlamaForCausalLM.generate`, PyTorch, CPU): what a user would otherwise reach for.

Writes benchmarks/results/decode/decode.{csv,json,png} (with --name=NAME:
benchmarks/results/NAME/NAME.*) and prints a table. With --profile, instead profiles the
steps at the first context and batch asked for, by kind of XLA thunk
(benchmarks/xla_profile.py), and writes benchmarks/results/decode_profile/decode_profile.{csv,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mqa import accounting  # noqa: E402
from mqa.config import ModelConfig, build_model_config  # noqa: E402
from mqa.model import Transformer  # noqa: E402
from mqa.timing import alternating_medians, decode_loop, median_seconds, timed  # noqa: E402
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.xla_profile import CATEGORIES, profile_thunks  # noqa: E402

MODEL = build_model_config(vocab_size=256, d_model=256, num_layers=4, num_heads=8, num_kv_heads=8,
                    head_dim=32, mlp_dim=1024, max_seq_len=65536)
# name -> changes to MODEL. Cached numbers per token and layer in the comments.
VARIANTS = {
    "MHA": dict(num_kv_heads=8),                                     # 512
    "GQA-4": dict(num_kv_heads=4),                                   # 256
    "GQA-2": dict(num_kv_heads=2),                                   # 128
    "MQA": dict(num_kv_heads=1),                                     # 64
    "GTA-2": dict(attention="tied", num_kv_heads=2),                 # 80
    "GTA-1": dict(attention="tied", num_kv_heads=1),                 # 48
    "MLA-64": dict(attention="latent", kv_latent_dim=64, rope_head_dim=16),  # 80
    "MLA-48": dict(attention="latent", kv_latent_dim=48, rope_head_dim=16),  # 64, as MQA
    "MHA-local": dict(sliding_window=256, global_every=4),           # 512, 3 of 4 layers a ring
    "MHA-int8": dict(kv_cache_dtype="int8"),                         # 512 bytes + 16 scales
    "MQA-int8": dict(num_kv_heads=1, kv_cache_dtype="int8"),         # 64 bytes + 2 scales
    "MHA-int4": dict(kv_cache_dtype="int4"),                         # 256 bytes + 64 of stats (KIVI, groups of 32)
    "MQA-int4": dict(num_kv_heads=1, kv_cache_dtype="int4"),         # 32 bytes + 8 of stats
    # the same caches read by the C++ kernel (`model.decode_impl`, mqa/attention/cpu_decode.py)
    **{f"{name}-kernel": dict(num_kv_heads=kv, decode_impl="cpu_kernel")
       for name, kv in (("MHA", 8), ("GQA-2", 2), ("MQA", 1))},
    "MQA-int8-kernel": dict(num_kv_heads=1, kv_cache_dtype="int8", decode_impl="cpu_kernel"),
    **{f"{name}-int4-kernel": dict(num_kv_heads=kv, kv_cache_dtype="int4", decode_impl="cpu_kernel")
       for name, kv in (("MHA", 8), ("MQA", 1))},
    "MLA-48-kernel": dict(attention="latent", kv_latent_dim=48, rope_head_dim=16, decode_impl="cpu_kernel"),
    "MHA-local-kernel": dict(sliding_window=256, global_every=4, decode_impl="cpu_kernel"),
    "GTA-1-kernel": dict(attention="tied", num_kv_heads=1, decode_impl="cpu_kernel"),
}


def variant_config(name: str) -> ModelConfig:
    return dataclasses.replace(MODEL, **VARIANTS[name])


def llama_like(config: ModelConfig) -> bool:
    """Whether PyTorch's hand-written loop and transformers' Llama decode the same model."""
    return config.attention == "grouped" and not config.sliding_window and not config.kv_cache_dtype


def read_bandwidth(megabytes: int = 256, repeats: int = 7) -> float:
    """Bytes/s of a jitted full reduction over a float32 array larger than the caches."""
    x = jnp.ones((megabytes * 2 ** 20 // 4,), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return x.nbytes / median_seconds(lambda: total(x).block_until_ready(), repeats)


def torch_runner(config: ModelConfig, params: nnx.State, batch: int, context: int,
                 steps: int) -> Callable[[], object] | None:
    """The hand-written PyTorch decoding loop with the same weights, warmed up; None
    without PyTorch."""
    try:
        from benchmarks.torch_model import TorchTransformer, load_jax_params, make_decode_loop
    except ImportError:
        return None
    model = load_jax_params(TorchTransformer(config), params).eval()
    run, _, _ = make_decode_loop(model, batch, context, steps)
    run()  # warm up
    return run


def time_point(batch: int, context: int, args) -> dict[str, dict]:
    """Per variant: seconds per step of mqa's loop ("jax"), of the PyTorch loop ("torch")
    and, at --hf_context and --hf_batch, of transformers ("hf"), these two for grouped
    attention with a plain cache; and the cache buffers' bytes ("cache_bytes"). Every
    variant is compiled or warmed up first, then all
    are timed in alternating rounds, so that the machine's load at the time falls on all of
    them alike; PyTorch and XLA take turns with a pause between (a runtime's spinning
    worker threads otherwise slow whichever runs next)."""
    with_hf = args.hf and context == args.hf_context and batch == args.hf_batch
    runners, points = {}, {}
    for variant in args.variants:
        config = variant_config(variant)
        graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
        run, _, cache_bytes = decode_loop(graphdef, params, config, batch, context, args.steps)
        run()  # compile
        runners[("jax", variant)] = timed(run)
        points[variant] = dict(cache_bytes=cache_bytes)
        if not llama_like(config):
            continue
        if args.torch and (pytorch := torch_runner(config, params, batch, context, args.steps)):
            runners[("torch", variant)] = timed(pytorch)
        if with_hf and (hf := transformers_runner(config, batch, context, args.steps)):
            runners[("hf", variant)] = hf
    medians = alternating_medians(runners, args.repeats, group=lambda key: key[0], pause=1.0)
    for (name, variant), seconds in medians.items():
        points[variant][name] = seconds / args.steps
    return points


def transformers_runner(config: ModelConfig, batch: int, context: int,
                        steps: int) -> Callable[[], float] | None:
    """`LlamaForCausalLM.generate` on the same shapes (its own random weights), or None
    without transformers: a call returns the seconds `generate` takes for `steps` new
    tokens after a prompt of `context` tokens whose first `context - 1` are already in its
    KV cache (prefilled once; each call decodes from a fresh copy, made before timing)."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    torch.manual_seed(0)
    hf_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.d_model,
        intermediate_size=config.mlp_dim, num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads, num_key_value_heads=config.num_kv_heads,
        max_position_embeddings=config.max_seq_len, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(hf_config).eval()
    return hf_generate_runner(model, batch, context, steps)


def hf_cache(model, batch: int, length: int):
    """A transformers `DynamicCache` of `batch` sequences already holding `length` positions
    of zero keys and values, laid out as the model's own prefill would leave it (local
    layers keep their window, `get_seq_length() == length`), built without running the
    model: the step's work does not depend on what the cache holds, and prefilling tens of
    thousands of tokens takes minutes on a CPU."""
    import torch
    from transformers import DynamicCache
    text = model.config.get_text_config()
    heads = text.num_key_value_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    cache = DynamicCache(config=model.config)
    for layer in range(text.num_hidden_layers):
        zeros = torch.zeros(batch, heads, length, head_dim, dtype=model.dtype)
        cache.update(zeros, zeros, layer)
    for layer in cache.layers:  # a local layer keeps a view of its last window: own it
        layer.keys, layer.values = layer.keys.clone(), layer.values.clone()
    return cache


def hf_generate_runner(model, batch: int, context: int, steps: int) -> Callable[[], float]:
    """A call returns the seconds transformers' `model.generate` takes for `steps` greedy
    tokens after a prompt of `context` tokens whose first `context - 1` are already in its
    KV cache (`hf_cache`, made afresh before each call's clock starts). Warmed up once."""
    import torch
    prompt = torch.zeros((batch, context), dtype=torch.long)

    def run() -> float:
        cache = hf_cache(model, batch, context - 1)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(prompt, attention_mask=torch.ones_like(prompt),
                           cache=cache, max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        return time.perf_counter() - start

    run()  # warm up
    return run


def profile(args) -> list[dict]:
    """Per-step thunk time by category for each variant, at the first context and batch."""
    batch, context, rows = args.batches[0], args.contexts[0], []
    for variant in args.variants:
        config = variant_config(variant)
        graphdef, params = nnx.split(Transformer(config, rngs=nnx.Rngs(0)))
        run, hlo, _ = decode_loop(graphdef, params, config, batch, context, args.steps)
        run()
        result = profile_thunks(run, hlo(), repeats=args.repeats)
        per_step = lambda ms: ms / args.steps  # noqa: E731
        rows.append(dict(variant=variant, num_kv_heads=config.num_kv_heads, batch=batch,
                         context=context,
                         step_ms=per_step(result["wall_ms"]),
                         idle_ms=per_step(result["wall_ms"] - result["covered_ms"]),
                         thunks_at_once=result["concurrency"],
                         **{f"{c}_ms": per_step(result["by_category"][c]) for c in CATEGORIES}))
        print(f"{variant}: " + ", ".join(f"{k} {v:.2f}" for k, v in rows[-1].items()
                                      if k.endswith("_ms") or k == "thunks_at_once"), flush=True)
    return rows


def plot(rows: list[dict], path: pathlib.Path, batch: int) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    with_torch = any("torch_tokens_per_sec" in r for r in rows)
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = sorted((r["context"], r) for r in rows
                        if r["variant"] == variant and r["batch"] == batch)
        contexts = [c for c, _ in points]
        line, = speed.plot(contexts, [r["tokens_per_sec"] for _, r in points], "o-",
                           label=variant)
        if with_torch and all("torch_tokens_per_sec" in r for _, r in points):
            speed.plot(contexts, [r["torch_tokens_per_sec"] for _, r in points], "--",
                       color=line.get_color(), alpha=0.6)
        memory.plot(contexts, [r["kv_cache_bytes"] / 2 ** 20 for _, r in points], "o-",
                    label=variant)
    if with_torch:
        speed.plot([], [], "--", color="gray", label="dashed: the PyTorch loop")
    for axis, title, label in ((speed, f"decoding, batch {batch}", "tokens/s"),
                               (memory, f"KV cache, batch {batch}", "MiB")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("context (tokens)")
        axis.set_ylabel(label)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize="small")
    fig.suptitle("8 query heads, 4 layers, d_model 256, float32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def check_args(parser: argparse.ArgumentParser, args) -> None:
    """One-line errors (argparse's, exit status 2) for values the model cannot decode."""
    for variant in args.variants:
        if variant not in VARIANTS:
            parser.error(f"--variants: {variant!r} is not one of {', '.join(VARIANTS)}")
    for name in ("steps", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name}={getattr(args, name)} must be at least 1")
    for name, values in (("contexts", args.contexts), ("batches", args.batches)):
        for value in values or ():
            if value < 1:
                parser.error(f"--{name}: {value} must be at least 1")
    for context in args.contexts or ():
        if context + args.steps > MODEL.max_seq_len:
            parser.error(f"--contexts: {context} plus --steps={args.steps} exceeds the model's "
                         f"max_seq_len={MODEL.max_seq_len}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    names = lambda text: [x.strip() for x in text.split(",") if x.strip()]  # noqa: E731
    parser.add_argument("--variants", type=names, default=list(VARIANTS),
                        help=f"comma-separated, of {', '.join(VARIANTS)} (default: all)")
    parser.add_argument("--contexts", type=ints,
                        help="default 256,512,1024,2048,4096; with --profile, 2048")
    parser.add_argument("--batches", type=ints, help="default 1,8; with --profile, 8")
    parser.add_argument("--steps", type=int, default=32, help="decoding steps per timing")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the hand-written PyTorch loop at every point")
    parser.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True,
                        help="also time transformers at --hf_context and --hf_batch")
    parser.add_argument("--hf_context", type=int, default=2048)
    parser.add_argument("--hf_batch", type=int, default=8)
    parser.add_argument("--profile", action="store_true",
                        help="profile the steps by kind of XLA thunk instead of timing the grid")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results folder (default benchmarks/results/NAME, with --profile "
                        "benchmarks/results/NAME_profile)")
    parser.add_argument("--name", default="decode", help="results file stem (OUT/NAME.csv, ...)")
    args = parser.parse_args(argv)
    args.out = args.out or RESULTS / (f"{args.name}_profile" if args.profile else args.name)
    check_args(parser, args)
    # --profile looks at one point, by default the target: context 2048, batch 8
    args.contexts = args.contexts or ([2048] if args.profile else [256, 512, 1024, 2048, 4096])
    args.batches = args.batches or ([8] if args.profile else [1, 8])
    if args.profile:
        write_results(args.out, f"{args.name}_profile", profile(args),
                      model=dataclasses.asdict(MODEL))
        print(f"\nwrote {args.out / args.name}_profile.csv and .json")
        return

    bandwidth = read_bandwidth()
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (jitted sum over 256 MiB)")
    rows = []
    for batch in args.batches:
        for context in args.contexts:
            points = time_point(batch, context, args)
            for variant in args.variants:
                config, point = variant_config(variant), points[variant]
                seconds, cache_bytes = point["jax"], point["cache_bytes"]
                bytes_read = accounting.decode_step_bytes(config, cache_bytes)
                floor = bytes_read / bandwidth
                row = dict(variant=variant, attention=config.attention,
                           num_kv_heads=config.num_kv_heads, batch=batch, context=context,
                           step_ms=seconds * 1e3, steps_per_sec=1 / seconds,
                           tokens_per_sec=batch / seconds,
                           kv_cache_bytes=accounting.kv_cache_bytes(config, batch, context),
                           bytes_read_per_step=bytes_read,
                           floor_ms=floor * 1e3, fraction_of_floor=floor / seconds)
                if "torch" in point:
                    row.update(torch_step_ms=point["torch"] * 1e3,
                               torch_tokens_per_sec=batch / point["torch"])
                if "hf" in point:
                    row.update(hf_step_ms=point["hf"] * 1e3, hf_tokens_per_sec=batch / point["hf"])
                rows.append(row)
                torch_note = (f", PyTorch {row['torch_step_ms']:.2f}" if "torch_step_ms" in row
                              else "")
                print(f"{variant} batch={batch} context={context}: {row['step_ms']:.2f} ms/step, "
                      f"{row['fraction_of_floor']:.0%} of the memory floor{torch_note}",
                      flush=True)

    mha = {(r["batch"], r["context"]): r for r in rows if r["variant"] == "MHA"}
    for r in rows:
        base = mha.get((r["batch"], r["context"]))
        if base:
            r["speedup_vs_mha"] = base["step_ms"] / r["step_ms"]
            r["bytes_ratio_vs_mha"] = base["bytes_read_per_step"] / r["bytes_read_per_step"]

    header = (f"{'variant':>9} {'batch':>5} {'context':>7} {'ms/step':>8} {'tok/s':>8} "
              f"{'KV MiB':>8} {'floor':>6} {'vs MHA':>7} {'bytes':>6} {'PT tok/s':>9} "
              f"{'HF tok/s':>9}")
    print("\n" + header)
    for r in rows:
        hf = f"{r['hf_tokens_per_sec']:9.0f}" if "hf_tokens_per_sec" in r else f"{'':>9}"
        pt = f"{r['torch_tokens_per_sec']:9.0f}" if "torch_tokens_per_sec" in r else f"{'':>9}"
        print(f"{r['variant']:>9} {r['batch']:>5} {r['context']:>7} {r['step_ms']:8.2f} "
              f"{r['tokens_per_sec']:8.0f} {r['kv_cache_bytes'] / 2 ** 20:8.1f} "
              f"{r['fraction_of_floor']:6.0%} {r.get('speedup_vs_mha', float('nan')):6.2f}x "
              f"{r.get('bytes_ratio_vs_mha', float('nan')):5.2f}x {pt} {hf}")

    write_results(args.out, args.name, rows, read_bandwidth_bytes_per_sec=bandwidth,
                  model=dataclasses.asdict(MODEL), variants=VARIANTS)
    plot(rows, args.out / f"{args.name}.png", batch=max(args.batches))
    print(f"\nwrote {args.out / args.name}.csv, .json and .png")


if __name__ == "__main__":
    main()

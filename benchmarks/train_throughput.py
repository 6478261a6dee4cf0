"""Training throughput against PyTorch, compile time against depth, memory against length.

  python benchmarks/train_throughput.py                    # tokens/s: JAX vs torch eager/compile
  python benchmarks/train_throughput.py --mode=compile     # first-step compile time vs layers
  python benchmarks/train_throughput.py --mode=memory      # peak step memory vs sequence length
  python benchmarks/train_throughput.py --mode=profile     # where the JAX step's time goes
  python benchmarks/train_throughput.py --kv_heads=1 --no-torch \
      --jax_variant=GTA-1:model.attention=tied \
      --jax_variant=MLA-48:model.attention=latent,model.kv_latent_dim=48,model.rope_head_dim=16
                                                           # other families beside MQA

`throughput`: the train step `train.py` runs (the same `make_train_step`, AdamW, clipping,
float32) on configs/default.py's model (4 layers, d_model 256, 8 heads, SwiGLU 1024, batch
16 x 256) for each `num_kv_heads`, next to the same model in PyTorch (benchmarks/
torch_model.py), eager and `torch.compile`d. They are timed in alternating rounds, so
they see the same machine load, with a pause at each switch (PyTorch's and XLA's worker
threads spin for a while after their work, which slowed whichever ran next by up to
20%); medians of the per-step times. MFU is the model's
matmul FLOPs (`accounting.flops_per_token`) per second over the machine's matmul rate
in the model's dtype: measured in the same run on CPU, the data sheet's on a known GPU.

`compile`: seconds to lower and compile the train step for 1 to 12 layers (the layers are
scanned, so it should stay flat). `memory`: XLA's buffer assignment for one train step
(arguments, outputs and temporaries; exact for the compiled program) at batch 1 for
growing sequence lengths, for each `model.attention_impl` asked for. `profile`: the JAX
step under `jax.profiler`, its time added up by kind of XLA thunk (benchmarks/
xla_profile.py) for the base config and each `--jax_variant`.

Writes benchmarks/results/train_MODE/train_MODE.{csv,json} (MODE: throughput, compile,
memory, profile; --out another folder) and prints a table.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.xla_profile import CATEGORIES, profile_thunks  # noqa: E402
from mqa import accounting, hardware, timing  # noqa: E402
from mqa.config import ModelConfig, load_config_file, build_model_config  # noqa: E402

DEFAULT = pathlib.Path(__file__).resolve().parents[1] / "configs" / "default.py"


def experiment(overrides: list[str]):
    """configs/default.py with `section.field=value` overrides, and its ModelConfig."""
    config = load_config_file(DEFAULT, overrides)
    return config, build_model_config(config.model)


def random_batch(config) -> np.ndarray:
    rng = np.random.default_rng(0)
    shape = (config.train.batch_size, config.train.seq_len + 1)
    return rng.integers(0, config.model.vocab_size, shape).astype(np.int32)


def throughput(args) -> list[dict]:
    """Tokens/s of JAX, torch eager and torch.compile, timed in alternating rounds."""
    rows = []
    for kv in args.kv_heads:
        config, model_config = experiment([f"model.num_kv_heads={kv}", *args.override])
        ceiling = hardware.peak_flops(model_config.dtype)
        if not rows:
            print(f"MFU against {ceiling / 1e12:.3g} TFLOP/s {model_config.dtype} "
                  f"({'data sheet' if jax.devices()[0].platform == 'gpu' else 'measured matmul'})")
        batch = random_batch(config)
        runners, first_step = {}, {}
        tokens = config.train.batch_size * config.train.seq_len
        flops = dict.fromkeys(["jax", "torch_eager", "torch_compile"],
                              accounting.flops_per_token(model_config, config.train.seq_len) * tokens)

        runners["jax"], _ = jax_runner(config, model_config, batch)
        for variant in args.jax_variant:  # NAME:field=value,field=value (e.g. another family)
            name, _, overrides = variant.partition(":")
            v_config, v_model = experiment([f"model.num_kv_heads={kv}", *args.override,
                                            *overrides.split(",")])
            runners[f"jax_{name}"], _ = jax_runner(v_config, v_model, batch)
            flops[f"jax_{name}"] = accounting.flops_per_token(v_model, config.train.seq_len) * tokens
        if args.torch:
            runners.update(torch_runners(config, model_config, batch, args.torch_compile))
        for name, run in runners.items():  # the first step compiles
            start = time.perf_counter()
            run()
            first_step[name] = time.perf_counter() - start
        times = {name: [] for name in runners}
        for _ in range(args.rounds):
            for name, run in runners.items():
                time.sleep(1.0)  # let the previous runner's spinning worker threads go idle
                for _ in range(args.steps):
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
        for name, samples in times.items():
            seconds = float(np.median(samples))
            rows.append(dict(num_kv_heads=kv, impl=name, step_ms=seconds * 1e3,
                             tokens_per_sec=tokens / seconds, mfu=flops[name] / seconds / ceiling,
                             first_step_s=first_step[name], steps_timed=len(samples)))
        eager = next((r for r in rows if r["num_kv_heads"] == kv and r["impl"] == "torch_eager"),
                     None)
        for r in rows:
            if eager and r["num_kv_heads"] == kv:
                r["vs_torch_eager"] = r["tokens_per_sec"] / eager["tokens_per_sec"]
        print_rows([r for r in rows if r["num_kv_heads"] == kv], header=not rows[:-len(runners)])
    return rows


def jax_runner(config, model_config, batch, xla_defaults: bool = False):
    """(run, hlo): `run()` runs one train step (on its own state) and waits for it; `hlo()`
    is the compiled step's HLO text."""
    step, state = timing.train_step(config, xla_defaults=xla_defaults)
    box = [state]

    def run():
        box[0], metrics = step(box[0], batch)
        metrics["loss"].block_until_ready()

    return run, lambda: step.lower(box[0], batch).compile().as_text()


def torch_runners(config, model_config, batch, compile_too: bool) -> dict:
    import torch

    from benchmarks.torch_model import TorchTransformer, make_train_step as torch_train_step
    torch.set_num_threads(os.cpu_count())
    tokens = torch.from_numpy(batch.astype(np.int64))
    runners = {}
    variants = [("torch_eager", False)] + ([("torch_compile", True)] if compile_too else [])
    for name, compiled in variants:
        torch.manual_seed(0)
        model = TorchTransformer(model_config)
        forward = torch.compile(model) if compiled else model
        step = torch_train_step(forward if compiled else model, config.train.learning_rate,
                                config.train.weight_decay, config.train.grad_clip)
        runners[name] = lambda step=step: float(step(tokens))
    return runners


def print_rows(rows: list[dict], header: bool = True) -> None:
    if header:
        print(f"\n{'kv':>3} {'impl':<16} {'ms/step':>8} {'tokens/s':>9} {'MFU':>6} "
              f"{'vs eager':>8} {'1st step s':>10}")
    for r in rows:
        ratio = f"{r['vs_torch_eager']:7.2f}x" if "vs_torch_eager" in r else f"{'':>8}"
        print(f"{r['num_kv_heads']:>3} {r['impl']:<16} {r['step_ms']:8.0f} "
              f"{r['tokens_per_sec']:9.0f} {r['mfu']:6.1%} {ratio} {r['first_step_s']:10.1f}",
              flush=True)


def compiled_step(config, model_config):
    """The train step lowered and compiled for its shapes, and the seconds that took."""
    step, state = timing.train_step(config)
    start = time.perf_counter()
    compiled = step.lower(state, random_batch(config)).compile()
    return compiled, time.perf_counter() - start


def compile_times(args) -> list[dict]:
    rows = []
    for layers in args.layers:
        _, seconds = compiled_step(*experiment([f"model.num_layers={layers}", *args.override]))
        rows.append(dict(num_layers=layers, compile_s=seconds))
        print(f"{layers:>3} layers: compile {seconds:6.2f} s", flush=True)
    return rows


def memory(args) -> list[dict]:
    rows = []
    for impl in args.impls:
        for seq_len in args.seq_lens:
            config, model_config = experiment([
                f"model.attention_impl={impl}", f"train.seq_len={seq_len}", "train.batch_size=1",
                f"model.max_seq_len={max(seq_len, 1024)}", *args.override])
            compiled, _ = compiled_step(config, model_config)
            stats = compiled.memory_analysis()
            peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
                    + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
            rows.append(dict(attention_impl=impl, seq_len=seq_len,
                             temp_mib=stats.temp_size_in_bytes / 2 ** 20, peak_mib=peak / 2 ** 20))
            print(f"{impl:<10} seq {seq_len:>6}: temporaries {rows[-1]['temp_mib']:9.1f} MiB, "
                  f"step total {rows[-1]['peak_mib']:9.1f} MiB", flush=True)
    return rows


def profile(args) -> list[dict]:
    """Thunk time by category for the base config and each --jax_variant (first kv_heads).

    Compiled with XLA's default options (YNNPACK fusions on), not train.py's: XLA's own
    matmul thunks return before their thread-pool work ends, so the trace would count
    their time as "no thunk running"."""
    rows = []
    variants = [("jax", "")] + [tuple(v.partition(":")[::2]) for v in args.jax_variant]
    for name, overrides in variants:
        config, model_config = experiment([f"model.num_kv_heads={args.kv_heads[0]}",
                                           *args.override, *filter(None, overrides.split(","))])
        run, hlo = jax_runner(config, model_config, random_batch(config), xla_defaults=True)
        run()
        run()
        result = profile_thunks(run, hlo(), repeats=args.steps)
        rows.append(dict(variant=name, num_kv_heads=args.kv_heads[0], wall_ms=result["wall_ms"],
                         idle_ms=result["wall_ms"] - result["covered_ms"],
                         thunk_ms=result["thunk_ms"], concurrency=result["concurrency"],
                         **{f"{c}_ms": result["by_category"][c] for c in CATEGORIES}))
        print(f"\n{name}: step {result['wall_ms']:.0f} ms, no thunk running for "
              f"{rows[-1]['idle_ms']:.0f} ms, {result['concurrency']:.2f} thunks at once on average")
        for c in CATEGORIES:
            ms = result["by_category"][c]
            print(f"  {c:<16} {ms:7.0f} ms {ms / result['thunk_ms']:6.1%}")
        print("  costliest instructions:")
        for t in result["top"][:8]:
            print(f"    {t['ms']:6.1f} ms  {t['instruction']:<36} {t['shape']:<24} {t['category']}")
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ints = lambda text: [int(x) for x in text.split(",")]  # noqa: E731
    parser.add_argument("--mode", choices=["throughput", "compile", "memory", "profile"],
                        default="throughput")
    parser.add_argument("--kv_heads", type=ints, default=[8, 2, 1])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jax_variant", action="append", default=[],
                        help="an extra JAX row, NAME:field=value,...; e.g. "
                        "unroll2:model.scan_unroll=2")
    parser.add_argument("--torch", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--layers", type=ints, default=[1, 2, 4, 8, 12])
    parser.add_argument("--seq_lens", type=ints, default=[256, 512, 1024, 2048, 4096, 8192])
    parser.add_argument("--impls", type=lambda t: t.split(","), default=["einsum"])
    parser.add_argument("--override", action="append", default=[],
                        help="a config override for every point, e.g. model.dtype=bfloat16")
    parser.add_argument("--out", type=pathlib.Path, default=None,
                        help="results folder (default benchmarks/results/train_MODE)")
    args = parser.parse_args(argv)
    measure = {"throughput": throughput, "compile": compile_times, "memory": memory,
               "profile": profile}[args.mode]
    rows = measure(args)
    name = f"train_{args.mode}"
    args.out = args.out or RESULTS / name
    write_results(args.out, name, rows, overrides=args.override)
    print(f"\nwrote {args.out / name}.csv and .json")


if __name__ == "__main__":
    main()

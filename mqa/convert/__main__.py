"""python -m mqa.convert hf-llama|hf-gemma3|hf-deepseek-v2|gguf|to-hf|uptrain ...: the converters' command line.

  python -m mqa.convert hf-llama --src DIR --workdir OUT
  python -m mqa.convert hf-gemma3 --src DIR --workdir OUT
  python -m mqa.convert hf-deepseek-v2 --src DIR --workdir OUT    (every layer dense)
  python -m mqa.convert gguf --src FILE.gguf --workdir OUT
  python -m mqa.convert to-hf --src WORKDIR --workdir DIR [--step N]     (--out DIR: the same)
  python -m mqa.convert uptrain --src RUN --workdir OUT [--num_kv_heads K] [--init mean]
      [--group adjacent|similarity] [--kv_share_every S] [--sliding_window W]
      [--global_every N] [--attention_sinks S] [--kv_cache_dtype int8|int4] [--text FILE] [--step N]
      [--attention latent --kv_latent_dim C [--rope_head_dim P] [--rope_keys per_head|mixed]]

Exit status: 0 when converted (a one-line summary on stdout, after any notes); 2 when
refused (bad input or usage): one line on stderr, "error: " and what is wrong, no traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn

from mqa.cli import ArgumentParser
from mqa.config import ConfigError
from mqa.convert.errors import ConvertError
from mqa.convert.gguf import convert_gguf
from mqa.convert.hf_deepseek import convert_hf_deepseek
from mqa.convert.hf_gemma3 import convert_hf_gemma3
from mqa.convert.hf_llama import convert_hf_llama
from mqa.convert.latent import ROPE_KEYS, ROPE_PAIRS
from mqa.convert.to_hf import export_hf
from mqa.convert.uptrain import KV_GROUPINGS, KV_INITS, convert_uptrain
from mqa.data import DataError
from mqa.kv_cache import CACHE_DTYPES
from mqa.workdir import CheckpointError

REFUSED = 2  # the exit status of a refusal, as argparse's for a usage error
REFUSALS = (ConvertError, ConfigError, CheckpointError, DataError)


def refuse(message: str) -> NoReturn:
    """Exits with status 2 after one line on stderr. Written to the real stderr: after a
    failed checkpoint read, `mqa.checkpoint` has pointed sys.stderr at nowhere."""
    print(f"error: {' '.join(message.split())}", file=sys.__stderr__, flush=True)
    raise SystemExit(REFUSED)


def parser() -> argparse.ArgumentParser:
    convert = ArgumentParser(prog="python -m mqa.convert",
                      description="Converts models into mqa workdirs and back.")
    commands = convert.add_subparsers(dest="command", required=True)
    hf_llama = commands.add_parser(
        "hf-llama", help="a Hugging Face Llama checkpoint (config.json + *.safetensors)")
    hf_llama.add_argument("--src", required=True, help="the Hugging Face model directory")
    hf_llama.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    hf_gemma3 = commands.add_parser(
        "hf-gemma3", help="a Hugging Face Gemma 3 text checkpoint (Gemma3ForCausalLM)")
    hf_gemma3.add_argument("--src", required=True, help="the Hugging Face model directory")
    hf_gemma3.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    hf_deepseek = commands.add_parser(
        "hf-deepseek-v2", help="a Hugging Face DeepSeek-V2 checkpoint whose every layer is dense "
        "(latent attention; what to-hf writes for it)")
    hf_deepseek.add_argument("--src", required=True, help="the Hugging Face model directory")
    hf_deepseek.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    uptrain = commands.add_parser(
        "uptrain", help="a workdir of ours with a smaller KV cache, to uptrain or distil "
        "(fewer K/V heads, cross-layer sharing, windows, a quantized cache)")
    uptrain.add_argument("--src", required=True, help="the workdir or checkpoint directory to convert")
    uptrain.add_argument("--num_kv_heads", type=int,
                         help="K/V heads of the result; must divide the source's (default: its own)")
    uptrain.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    uptrain.add_argument("--init", choices=KV_INITS, default="mean",
                         help="merged K/V heads (and shared layers): the mean, the first, random, "
                         "or aligned on calibration --text first (a least-squares fit for layers)")
    uptrain.add_argument("--kv_share_every", type=int,
                         help="share K/V across groups of this many consecutive layers")
    uptrain.add_argument("--sliding_window", type=int,
                         help="local layers attend to (and cache) only this many positions")
    uptrain.add_argument("--global_every", type=int,
                         help="with --sliding_window: every N-th layer stays global")
    uptrain.add_argument("--attention_sinks", type=int,
                         help="with --sliding_window: the first this many positions stay visible")
    uptrain.add_argument("--kv_cache_dtype", choices=[d for d in CACHE_DTYPES if d],
                         help="store the cache quantized")
    uptrain.add_argument("--attention", choices=("grouped", "latent"),
                         help="latent: latent attention from calibration --text (MHA2MLA)")
    uptrain.add_argument("--kv_latent_dim", type=int,
                         help="with --attention latent: the latent's width (numbers per token)")
    uptrain.add_argument("--rope_head_dim", type=int,
                         help="with --attention latent: rotary dimensions kept per K/V head "
                         "(default all; which ones: --rope_pairs)")
    uptrain.add_argument("--rope_keys", choices=ROPE_KEYS, default="per_head",
                         help="with --attention latent: a rotary key per K/V head (MHA2MLA), or one "
                         "key mixed from all heads per frequency (TransMLA's RoRoPE)")
    uptrain.add_argument("--rope_pairs", choices=ROPE_PAIRS, default="high",
                         help="with --attention latent: which rotary pairs stay rotary: the highest "
                         "frequencies, or per key those with the largest 2-norm contribution on "
                         "the calibration --text (MHA2MLA's best strategy)")
    uptrain.add_argument("--step", type=int, help="the source's checkpoint step (default: newest)")
    uptrain.add_argument("--group", choices=KV_GROUPINGS, default="adjacent",
                         help="which heads share a K/V head: adjacent ones, or those whose "
                         "attention patterns are most alike (python -m mqa.analysis heads)")
    uptrain.add_argument("--text", default=None, help="calibration text: with --init aligned, "
                         "what the fit reads (its held-out tail left out); with --group "
                         "similarity, what patterns are measured on (default: the held-out split)")
    gguf = commands.add_parser(
        "gguf", help="a llama.cpp GGUF file of a Llama or a Gemma 3 (F32, F16, BF16 or quantized)")
    gguf.add_argument("--src", required=True, help="the .gguf file")
    gguf.add_argument("--workdir", required=True, help="the mqa workdir to write (new or empty)")
    to_hf = commands.add_parser(
        "to-hf", help="a workdir of ours as a Hugging Face folder: Llama, Gemma 3, or DeepSeek-V2 for latent attention")
    to_hf.add_argument("--src", required=True, help="the workdir or checkpoint directory to export")
    to_hf.add_argument("--workdir", "--out", dest="workdir", required=True,
                       help="the Hugging Face folder to write (new or empty); --out is the same")
    to_hf.add_argument("--step", type=int, help="the source's checkpoint step (default: newest)")
    return convert


def main(argv: list[str] | None = None) -> None:
    """Runs one command; prints its summary, or refuses in one line with exit status 2."""
    args = parser().parse_args(argv)
    try:
        if args.command == "hf-llama":
            summary = convert_hf_llama(args.src, args.workdir)
        elif args.command == "hf-gemma3":
            summary = convert_hf_gemma3(args.src, args.workdir)
        elif args.command == "hf-deepseek-v2":
            summary = convert_hf_deepseek(args.src, args.workdir)
        elif args.command == "gguf":
            summary = convert_gguf(args.src, args.workdir)
        elif args.command == "to-hf":
            summary = export_hf(args.src, args.workdir, args.step)
        else:
            summary = convert_uptrain(args.src, args.workdir, args.num_kv_heads, args.init,
                                      args.step, args.group, args.text,
                                      kv_share_every=args.kv_share_every,
                                      sliding_window=args.sliding_window,
                                      global_every=args.global_every,
                                      attention_sinks=args.attention_sinks,
                                      kv_cache_dtype=args.kv_cache_dtype,
                                      attention=args.attention, kv_latent_dim=args.kv_latent_dim,
                                      rope_head_dim=args.rope_head_dim, rope_keys=args.rope_keys,
                                      rope_pairs=args.rope_pairs)
    except REFUSALS as error:
        refuse(str(error))
    print(summary)


if __name__ == "__main__":
    main()

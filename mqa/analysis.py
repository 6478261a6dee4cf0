"""Analyses of trained models.

  python -m mqa.analysis heads --workdir RUN [--text FILE] [--out DIR]

How alike the attention heads of each layer are (`mqa.head_similarity`): the mean
Jensen-Shannon divergence between the heads' attention patterns on a text (the run's
held-out split by default), the closest pair of heads, and the cosine similarity of the
K/V heads' key and value projections. Prints a table with a row per layer and writes
DIR/heads.json (every matrix) and DIR/heads_layer<L>.png (heatmaps; DIR defaults to
RUN/analysis). The work is `heads`; `main` maps the command line to it and its errors
to one line.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import sys

import numpy as np

from mqa import data, head_similarity
from mqa.cli import ArgumentParser, fail
from mqa.config import ConfigError
from mqa.data import DataError
from mqa.evaluation import encode_text_file
from mqa.loading import CheckpointError, LoadedModel, load_model


def analysis_tokens(model: LoadedModel, text: str | None, windows: int, seq_len: int) -> np.ndarray:
    """int32 [windows, seq_len]: evenly spaced windows of the text file (or of the run's
    held-out split), tokenized with the model's tokenizer."""
    if text:
        tokens, _ = encode_text_file(model, text)
    else:
        corpus = data.load_corpus(model.config.data, model.path / "data", min_tokens=seq_len)
        tokens = corpus.heldout  # a token_files.TokenStream: only the windows are read
    if len(tokens) < seq_len:
        raise DataError(f"the text has {len(tokens)} tokens, fewer than one window of "
                        f"--seq_len={seq_len}")
    starts = np.linspace(0, len(tokens) - seq_len, windows).astype(int)
    return np.stack([np.asarray(tokens[s:s + seq_len]) for s in starts]).astype(np.int32)


def summary_rows(layers: list[dict]) -> list[dict]:
    """Per layer: mean and minimum divergence between its query heads (and which pair is
    closest), and the K/V heads' most similar key and value projections."""
    rows = []
    for layer in layers:
        js = layer["query_js"]
        pairs = list(itertools.combinations(range(js.shape[0]), 2))
        closest = min(pairs, key=lambda p: js[p]) if pairs else None
        kv_pairs = list(itertools.combinations(range(layer["key_cosine"].shape[0]), 2))
        rows.append({
            "layer": layer["layer"], "kv_group": layer["kv_group"],
            "mean_js": float(np.mean([js[p] for p in pairs])) if pairs else 0.0,
            "min_js": float(js[closest]) if closest else 0.0,
            "closest_heads": list(closest) if closest else [],
            "max_key_cosine": max((float(layer["key_cosine"][p]) for p in kv_pairs), default=1.0),
            "max_value_cosine": max((float(layer["value_cosine"][p]) for p in kv_pairs), default=1.0),
        })
    return rows


def plot_layer(layer: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for axis, (key, title, cmap) in zip(axes, [
            ("query_js", "attention JS divergence (bits)", "viridis"),
            ("key_cosine", "key projection cosine", "coolwarm"),
            ("value_cosine", "value projection cosine", "coolwarm")]):
        image = axis.imshow(layer[key], cmap=cmap, vmin=0 if key == "query_js" else -1, vmax=1)
        axis.set_title(title)
        axis.set_xlabel("head")
        axis.set_ylabel("head")
        fig.colorbar(image, ax=axis, fraction=0.046)
    fig.suptitle(f"layer {layer['layer']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def heads(workdir: str | os.PathLike, text: str | None = None, out: str | None = None,
          windows: int = 8, seq_len: int | None = None, step: int | None = None) -> str:
    """Runs the head analysis of a workdir's model (its checkpoint `step`, default the
    newest) on `windows` windows of `seq_len` tokens (default: train.seq_len, at most 256)
    of the text file `text` (default: the run's held-out split); writes OUT/heads.json and
    OUT/heads_layer<L>.png (OUT: default WORKDIR/analysis) and returns the table it prints.
    Errors are one line: ConfigError, DataError, CheckpointError, ValueError (a model the
    analysis does not take)."""
    if windows < 1 or (seq_len is not None and seq_len < 2):
        raise ConfigError(f"--windows={windows} must be >= 1 and --seq_len={seq_len} >= 2")
    model = load_model(workdir, step=step)
    c = model.model_config
    if c.attention != "grouped" or c.sliding_window:
        raise ValueError(f"the model has model.attention={c.attention!r}, "
                         f"model.sliding_window={c.sliding_window}; the head analysis "
                         "compares the heads of grouped attention without a window only")
    if c.qk_norm or c.attention_score_dim:  # Gemma 3's switches, which it does not model
        raise ValueError(f"the model has model.qk_norm={c.qk_norm}, model.attention_score_dim="
                         f"{c.attention_score_dim}; the head analysis takes neither (set them off)")
    seq_len = seq_len or min(model.config.train.seq_len, 256)
    tokens = analysis_tokens(model, text, windows, seq_len)
    layers = head_similarity.analyse(model.module(), tokens)
    rows = summary_rows(layers)
    out_dir = pathlib.Path(out) if out else model.path / "analysis"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "heads.json").write_text(json.dumps({
        "workdir": str(model.path), "step": model.step, "text": text or "held-out split",
        "windows": windows, "seq_len": seq_len, "summary": rows,
        "layers": [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in layer.items()}
                   for layer in layers]}, indent=1) + "\n")
    for layer in layers:
        plot_layer(layer, out_dir / f"heads_layer{layer['layer']}.png")
    lines = ["| layer | K/V group | mean JS between heads | closest heads (JS) | max key cosine | max value cosine |",
             "|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['kv_group']} | {r['mean_js']:.4f} | "
                     f"{r['closest_heads']} ({r['min_js']:.4f}) | {r['max_key_cosine']:.3f} | "
                     f"{r['max_value_cosine']:.3f} |")
    return "\n".join(lines) + f"\n\nwrote {out_dir}/heads.json and heads_layer*.png\n"


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m mqa.analysis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    cmd = commands.add_parser("heads", help="how alike each layer's attention heads are")
    cmd.add_argument("--workdir", required=True, help="a workdir or checkpoint directory")
    cmd.add_argument("--text", default=None, help="a text file (default: the run's held-out split)")
    cmd.add_argument("--out", default=None, help="output folder (default: WORKDIR/analysis)")
    cmd.add_argument("--windows", type=int, default=8, help="windows of text to average over")
    cmd.add_argument("--seq_len", type=int, default=None,
                     help="tokens per window (default: train.seq_len, at most 256)")
    cmd.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    args = parser.parse_args(argv)
    try:
        print(heads(args.workdir, text=args.text, out=args.out, windows=args.windows,
                    seq_len=args.seq_len, step=args.step))
    except (ConfigError, DataError, CheckpointError, ValueError) as error:
        fail(str(error))


if __name__ == "__main__":
    sys.exit(main())

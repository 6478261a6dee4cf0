"""Held-out loss over windows of a token stream: the one windowing that `eval.py`,
`mqa.load_model` users and the trainer's evaluations (periodic and final) all share; and
`evaluate`, a trained workdir's loss on its held-out split or on a text file (what
`eval.py` prints).

A stream of n tokens is cut into windows of `seq_len + 1` tokens (`data.eval_windows`):
non-overlapping by default, or every `stride` tokens, in which case each window scores only
the `stride` targets no earlier window scored. Windows are scored `batch_size` at a time,
the last batch padded with rows that weigh nothing, so one compiled shape serves them all.

The windows split into two halves (`part_windows`), for choosing a setting on one and
reporting on the other (the sweep's tuning, `mqa.sweep.tuning`): of W windows, the
*tuning* half is the first W // 2 and the *test* half the rest. Contiguous halves, not
interleaved blocks, because neighbouring text is alike (the same scene, the same names):
with one boundary between them the halves share the least of it, so a setting chosen for
the tuning half's peculiarities carries as little of them as possible into the test half.
With overlapping windows (`stride`) each window still scores only the targets no earlier
window of the whole split scored, so the halves' targets are disjoint and together are the
whole split's.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm

from mqa import data, token_files
from mqa.config import ConfigError
from mqa.data import DataError
from mqa.loading import LoadedModel, load_model
from mqa.training import make_eval_step

# (windows int32 [batch, seq_len + 1], weights float32 [batch, seq_len]) -> (nll sum, weight sum)
BatchNll = Callable[[np.ndarray, np.ndarray], tuple[float, float]]
HELD_OUT_PARTS = ("tuning", "test")  # the halves of the windows (`part_windows`)


def part_windows(num_windows: int, part: str | None) -> range:
    """The indices of the windows that `part` scores, of `num_windows`: None all of them,
    "tuning" the first num_windows // 2, "test" the rest. A ConfigError for another part;
    a DataError when a half would be empty (fewer than 2 windows)."""
    if part is None:
        return range(num_windows)
    if part not in HELD_OUT_PARTS:
        raise ConfigError(f"held-out part {part!r} must be one of {', '.join(HELD_OUT_PARTS)} "
                          "(or None: the whole split)")
    if num_windows < 2:
        raise DataError(f"the held-out split has {num_windows} evaluation window(s); its "
                        "tuning and test halves need at least 2")
    middle = num_windows // 2
    return range(0, middle) if part == "tuning" else range(middle, num_windows)


def scored_positions(num_windows: int, seq_len: int, stride: int, first: int = 0) -> np.ndarray:
    """bool [num_windows, seq_len]: which targets of windows first .. first + num_windows - 1
    count.

    Window i covers targets i*stride+1 .. i*stride+seq_len. The first window scores all of
    them; each later one only the `stride` targets no earlier window scored, so every
    token is scored once, with up to seq_len - stride tokens of context before it.
    """
    mask = np.zeros((num_windows, seq_len), bool)
    mask[:, seq_len - stride:] = True
    if first == 0 and num_windows:
        mask[0] = True
    return mask


def held_out_loss(batch_nll: BatchNll, tokens: np.ndarray, *, seq_len: int, batch_size: int,
                  stride: int | None = None, max_windows: int | None = None,
                  bytes_per_token: float = 1.0, progress: bool = False,
                  part: str | None = None, bos: int | None = None) -> dict:
    """{"loss" (nats/token), "perplexity", "bits_per_byte", "tokens" (targets scored)}.

    tokens: int [n] (an array or a token_files.TokenStream). max_windows: score only the
    first this many windows (None: all), reading only the tokens they cover. bos: for a
    model that expects a beginning-of-sequence token first (Gemma), each window is BOS and
    then `seq_len` tokens of the text, all of them targets (the first predicted from BOS
    alone); windows still start every `stride` tokens.
    batch_nll: scores one padded batch (see `BatchNll`); the trainer's shards it over its
    mesh, `evaluate_tokens`' runs a loaded model. part: None for every window, "tuning" or
    "test" for that half of them (`part_windows`, after max_windows).
    """
    stride = seq_len if stride is None else stride
    if max_windows is not None:  # read only the tokens the first max_windows windows cover
        tokens = tokens[:(max_windows - 1) * stride + seq_len + 1]
    # Text tokens read per window: its seq_len + 1 tokens, or with BOS seq_len after it.
    read = seq_len + 1 if bos is None else seq_len
    window_starts = data.eval_window_starts(len(tokens) + (bos is not None), seq_len, stride=stride)
    selected = part_windows(len(window_starts), part)
    loss_sum, count = 0.0, 0.0
    # Tokens scored, with their rate and the time left: every target of the first window
    # and `stride` of each later one.
    bar = tqdm.tqdm(total=len(selected) * stride + (seq_len - stride) * (selected.start == 0),
                    desc="eval", unit="token", unit_scale=True, disable=not progress,
                    file=sys.stderr, dynamic_ncols=True,
                    mininterval=0.5 if sys.stderr.isatty() else 30.0)
    for start in range(selected.start, selected.stop, batch_size):
        # One batch of windows at a time: memory stays flat however long the split is.
        stop = min(start + batch_size, selected.stop)
        chunk = token_files.read_windows(tokens, window_starts[start:stop], read)
        if bos is not None:
            chunk = np.concatenate([np.full((len(chunk), 1), bos, chunk.dtype), chunk], axis=1)
        weights = scored_positions(len(chunk), seq_len, stride, first=start)
        pad = batch_size - len(chunk)
        if pad:  # keep one compiled shape; padded rows weigh nothing
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            weights = np.concatenate([weights, np.zeros((pad, seq_len), bool)])
        nll, n = batch_nll(chunk.astype(np.int32), weights.astype(np.float32))
        loss_sum += float(nll)
        count += float(n)
        bar.update(int(n))
    bar.close()
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": int(count)}


def model_batch_nll(model: LoadedModel, *, cached: bool | None = None) -> BatchNll:
    """A loaded model's `BatchNll`, on this process's devices (one compiled shape);
    `cached`: through the KV cache (`make_eval_step`)."""
    eval_step = jax.jit(make_eval_step(model.graphdef, cached=cached))

    def batch_nll(windows: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
        out = eval_step(model.params, jnp.asarray(windows), jnp.asarray(weights))
        return float(out["loss_sum"]), float(out["tokens"])

    return batch_nll


def evaluate_tokens(model: LoadedModel, tokens: np.ndarray, *, seq_len: int,
                    stride: int | None = None, batch_size: int = 8, bytes_per_token: float = 1.0,
                    progress: bool = True, cached: bool | None = None,
                    max_windows: int | None = None, part: str | None = None,
                    bos: int | None = None) -> dict:
    """`held_out_loss` of a loaded model on `tokens` (int [n]); bos: a BOS id to start each
    window with (see `held_out_loss`).

    stride: None (= seq_len) for non-overlapping windows; smaller for a sliding window in
    which every scored token sees at least seq_len - stride tokens of context.
    cached: score through the KV cache, as decoding reads it (`make_eval_step`; None:
    exactly when the model has an int8 cache). max_windows, part: as `held_out_loss`.
    """
    return held_out_loss(model_batch_nll(model, cached=cached), tokens, seq_len=seq_len, batch_size=batch_size,
                         stride=stride, bytes_per_token=bytes_per_token, progress=progress,
                         max_windows=max_windows, part=part, bos=bos)


@dataclasses.dataclass(frozen=True)
class EvaluationText:
    """What `evaluate` scores: tokens int [n] (an array or a token_files.TokenStream), the
    text's bytes per token (for bits per byte) and a description for the log line."""

    tokens: np.ndarray | token_files.TokenStream
    bytes_per_token: float
    source: str


def encode_text_file(model: LoadedModel, text: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(token ids int32 [n], the file's size in bytes): the text file encoded with the model's
    tokenizer; a one-line DataError when the file does not exist or the model has no
    tokenizer."""
    path = pathlib.Path(text)
    if not path.is_file():
        raise DataError(f"--text file {str(text)!r} does not exist")
    if model.tokenizer is None:
        raise DataError(f"{model.path} has no tokenizer.json, so text cannot be encoded; "
                        "copy the model's tokenizer.json there")
    raw = path.read_bytes()
    return model.tokenizer.encode(raw if model.tokenizer.name == "byte" else raw.decode("utf-8")), len(raw)


def evaluation_text(model: LoadedModel, text: str | os.PathLike | None,
                    seq_len: int) -> EvaluationText:
    """The text file `text` encoded with the model's tokenizer, or (None) the held-out split
    of the corpus the model was trained on, read as its run prepared it; a one-line
    DataError when the file does not exist or the model's tokenizer cannot read it."""
    if text:
        tokens, num_bytes = encode_text_file(model, text)
        return EvaluationText(tokens, num_bytes / max(len(tokens), 1), str(pathlib.Path(text)))
    data_config = model.config.data
    builtin = data_config.tokenizer in data.TOKENIZER_NAMES
    if model.tokenizer is None or builtin and model.tokenizer.name != data_config.tokenizer:
        raise DataError(
            f"the held-out split is tokenized with data.tokenizer={data_config.tokenizer!r}, "
            f"which is not this model's tokenizer ({getattr(model.tokenizer, 'name', None)!r}); "
            "evaluate with --text=FILE")
    if not builtin:  # a pretrained tokenizer: the run saved it in its workdir
        data_config = ml_collections.ConfigDict({**data_config.to_dict(),
                                                 "tokenizer": str(model.path)})
    corpus = data.load_corpus(data_config, model.path / "data", min_tokens=seq_len + 1)
    return EvaluationText(corpus.heldout, corpus.heldout_bytes / len(corpus.heldout),
                          f"held-out split of {corpus.source}")


def evaluate(workdir: str | os.PathLike, *, step: int | None = None,
             overrides: dict | None = None, text: str | os.PathLike | None = None,
             seq_len: int | None = None, stride: int | None = None, batch_size: int = 8,
             cached: bool | None = None, progress: bool = True,
             max_windows: int | None = None, part: str | None = None) -> dict:
    """A trained model's held-out loss: {"loss" (nats/token), "perplexity",
    "bits_per_byte", "tokens" (targets scored)}, what `eval.py` prints.

    workdir: a training workdir or a checkpoint step directory; step: its checkpoint
    (default: the newest); overrides: config changes, e.g. {"model.attention_impl": "xla"}
    (`load_model`). text: a text file to score instead of the run's held-out split.
    seq_len: the window (default: train.seq_len); stride: score overlapping windows every
    `stride` tokens (`held_out_loss`); cached: through the KV cache (`evaluate_tokens`).
    max_windows: only the first this many windows (None: all; a run's final evaluation
    scores `mqa.train_schedule.final_eval_windows`); part: None for all of them, "tuning" or
    "test" for that half (`part_windows`). A model whose tokenizer has a BOS (`bos_id`: a
    converted Gemma's, Llama 2's) gets it at the start of every window.
    progress: a bar on stderr with tokens scored, tokens/s and the time left. What is
    scored is named on `sys.__stderr__` first (which a damaged checkpoint's fallback
    leaves open; see `mqa.checkpoint`). Errors are one line: CheckpointError,
    ConfigError, DataError.
    """
    model = load_model(workdir, step=step, overrides=overrides)
    if model.tokenizer is None and text:
        raise DataError(f"{model.path} has no tokenizer.json, so text cannot be encoded; "
                        "copy the model's tokenizer.json there")
    seq_len = seq_len or model.config.train.seq_len
    if seq_len > model.model_config.max_seq_len:
        raise ConfigError(f"--seq_len={seq_len} exceeds model.max_seq_len="
                          f"{model.model_config.max_seq_len}")
    scored = evaluation_text(model, text, seq_len)
    bos = getattr(model.tokenizer, "bos_id", None)
    print(f"evaluating step {model.step} of {model.path} on {scored.source} "
          f"({len(scored.tokens):,} tokens, windows of {seq_len}"
          f"{f', stride {stride}' if stride else ''}"
          f"{f', first {max_windows:,}' if max_windows else ''}"
          f"{f'; its {part} half' if part else ''}{', each after BOS' if bos is not None else ''})",
          file=sys.__stderr__, flush=True)
    return evaluate_tokens(model, scored.tokens, seq_len=seq_len, stride=stride,
                           batch_size=batch_size, bytes_per_token=scored.bytes_per_token,
                           progress=progress, cached=cached, max_windows=max_windows, part=part,
                           bos=bos)

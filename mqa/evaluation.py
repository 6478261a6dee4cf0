"""Held-out loss over windows of a token stream: the one windowing that `eval.py`,
`mqa.load_model` users and the trainer's evaluations (periodic and final) all share.

A stream of n tokens is cut into windows of `seq_len + 1` tokens (`data.eval_windows`):
non-overlapping by default, or every `stride` tokens, in which case each window scores only
the `stride` targets no earlier window scored. Windows are scored `batch_size` at a time,
the last batch padded with rows that weigh nothing, so one compiled shape serves them all.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mqa import data, token_files
from mqa.loading import LoadedModel
from mqa.training import make_eval_step

# (windows int32 [batch, seq_len + 1], weights float32 [batch, seq_len]) -> (nll sum, weight sum)
BatchNll = Callable[[np.ndarray, np.ndarray], tuple[float, float]]


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
                  bytes_per_token: float = 1.0, progress: bool = False) -> dict:
    """{"loss" (nats/token), "perplexity", "bits_per_byte", "tokens" (targets scored)}.

    tokens: int [n] (an array or a token_files.TokenStream). max_windows: score only the
    first this many windows (None: all), reading only the tokens they cover.
    batch_nll: scores one padded batch (see `BatchNll`); the trainer's shards it over its
    mesh, `evaluate_tokens`' runs a loaded model.
    """
    stride = seq_len if stride is None else stride
    if max_windows is not None:  # read only the tokens the first max_windows windows cover
        tokens = tokens[:(max_windows - 1) * stride + seq_len + 1]
    window_starts = data.eval_window_starts(len(tokens), seq_len, stride=stride)
    loss_sum, count = 0.0, 0.0
    starts = range(0, len(window_starts), batch_size)
    for start in tqdm.tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        # One batch of windows at a time: memory stays flat however long the split is.
        chunk = token_files.read_windows(tokens, window_starts[start:start + batch_size], seq_len + 1)
        weights = scored_positions(len(chunk), seq_len, stride, first=start)
        pad = batch_size - len(chunk)
        if pad:  # keep one compiled shape; padded rows weigh nothing
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            weights = np.concatenate([weights, np.zeros((pad, seq_len), bool)])
        nll, n = batch_nll(chunk.astype(np.int32), weights.astype(np.float32))
        loss_sum += float(nll)
        count += float(n)
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
                    progress: bool = True, cached: bool | None = None) -> dict:
    """`held_out_loss` of a loaded model on `tokens` (int [n]).

    stride: None (= seq_len) for non-overlapping windows; smaller for a sliding window in
    which every scored token sees at least seq_len - stride tokens of context.
    cached: score through the KV cache, as decoding reads it (`make_eval_step`; None:
    exactly when the model has an int8 cache).
    """
    return held_out_loss(model_batch_nll(model, cached=cached), tokens, seq_len=seq_len, batch_size=batch_size,
                         stride=stride, bytes_per_token=bytes_per_token, progress=progress)

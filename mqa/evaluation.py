"""Perplexity of a loaded model on a token stream: non-overlapping or sliding windows."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from flax import nnx

from mqa import data
from mqa.loading import LoadedModel
from mqa.training import cross_entropy


def scored_positions(num_windows: int, seq_len: int, stride: int) -> np.ndarray:
    """bool [num_windows, seq_len]: which targets of each window count.

    Window i covers targets i*stride+1 .. i*stride+seq_len. The first window scores all of
    them; each later one only the `stride` targets no earlier window scored, so every
    token is scored once, with up to seq_len - stride tokens of context before it.
    """
    mask = np.zeros((num_windows, seq_len), bool)
    mask[0] = True
    mask[1:, seq_len - stride:] = True
    return mask


def evaluate_tokens(model: LoadedModel, tokens: np.ndarray, *, seq_len: int,
                    stride: int | None = None, batch_size: int = 8, bytes_per_token: float = 1.0,
                    progress: bool = True) -> dict:
    """Loss (nats/token), perplexity and bits per byte of `tokens` (int [n]).

    stride: None (= seq_len) for non-overlapping windows; smaller for a sliding window in
    which every scored token sees at least seq_len - stride tokens of context.
    """
    stride = seq_len if stride is None else stride
    windows = data.eval_windows(np.asarray(tokens), seq_len, stride=stride)  # [n, seq_len + 1]
    mask = scored_positions(len(windows), seq_len, stride)
    graphdef = model.graphdef

    @jax.jit
    def batch_nll(params, batch, weights):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        nll = cross_entropy(logits, batch[:, 1:])
        return jnp.sum(nll * weights), jnp.sum(weights)

    loss_sum, count = 0.0, 0.0
    starts = range(0, len(windows), batch_size)
    for start in tqdm.tqdm(starts, desc="eval", unit="batch", disable=not progress, leave=False):
        chunk, weights = windows[start:start + batch_size], mask[start:start + batch_size]
        pad = batch_size - len(chunk)
        if pad:  # keep one compiled shape; padded rows weigh nothing
            chunk = np.concatenate([chunk, np.zeros((pad, chunk.shape[1]), chunk.dtype)])
            weights = np.concatenate([weights, np.zeros((pad, seq_len), bool)])
        nll, n = batch_nll(model.params, jnp.asarray(chunk, jnp.int32),
                           jnp.asarray(weights, jnp.float32))
        loss_sum += float(nll)
        count += float(n)
    loss = loss_sum / count
    return {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": loss / math.log(2) / bytes_per_token, "tokens": int(count)}

"""Calibration data for the calibrated conversions (`mqa.convert uptrain --text FILE`).

A calibration text is read the way a training run reads a text file: its last
`data.heldout_fraction` is held out, and calibration sees only the part before it
(`calibration_tokens`), so the same file's tail can score the converted model
(`benchmarks/retrofit.py` does) without the conversion having seen it. What a conversion
fits to is each layer's attention input on those tokens (`attention_inputs`).
"""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import nnx

from mqa.config import ModelConfig
from mqa.convert.errors import ConvertError
from mqa.data.sources import split_text
from mqa.loading import LoadedModel

WINDOWS, SEQ_LEN = 16, 256  # calibration tokens: 16 windows of 256 by default (4,096 tokens)


def calibration_tokens(model: LoadedModel, text: str | pathlib.Path | None, *,
                       windows: int = WINDOWS, seq_len: int = SEQ_LEN) -> np.ndarray:
    """int32 [windows, seq_len]: evenly spaced windows of the text file's calibration part
    (all but its last `data.heldout_fraction`, as the source run's config sets it),
    tokenized with the model's tokenizer. A ConvertError in one line for no text, a
    missing file, a model without a tokenizer or too little text."""
    if not text:
        raise ConvertError("a calibrated conversion needs calibration text: pass --text FILE "
                           "(for example data/factbook.txt; its held-out tail is not read)")
    path = pathlib.Path(text)
    if not path.is_file():
        raise ConvertError(f"--text file {str(text)!r} does not exist")
    if model.tokenizer is None:
        raise ConvertError(f"{model.path} has no tokenizer.json, so --text cannot be encoded")
    head, _ = split_text(path.read_text(encoding="utf-8"), model.config.data.heldout_fraction)
    tokens = np.asarray(model.tokenizer.encode(head), np.int32)
    if len(tokens) < seq_len:
        raise ConvertError(f"--text {str(text)!r} has {len(tokens):,} calibration tokens, fewer "
                           f"than one window of {seq_len}")
    starts = np.linspace(0, len(tokens) - seq_len, windows).astype(int)
    return np.stack([tokens[s:s + seq_len] for s in starts])


def attention_inputs(model: LoadedModel, tokens: np.ndarray, batch: int = 4) -> np.ndarray:
    """float32 [num_layers, windows * seq, d_model]: each layer's attention input (after its
    norm) on tokens int32 [windows, seq], from the model's own layer loop."""
    graphdef, chunks = model.graphdef, []
    layer_inputs = jax.jit(lambda params, x: nnx.merge(graphdef, params)(x, attention_inputs=True)[1])
    for start in range(0, len(tokens), batch):
        inputs = layer_inputs(model.params, tokens[start:start + batch])  # [L, b, t, m]
        chunks.append(np.asarray(inputs, np.float32).reshape(inputs.shape[0], -1, inputs.shape[-1]))
    return np.concatenate(chunks, axis=1)


def check_plain_keys(config: ModelConfig, option: str, reason: str, remedy: str) -> None:
    """One-line ConvertErrors for a source the calibrated rewrites of K/V cannot take: keys
    normalised per head (`qk_norm`; `reason` says why not) or K/V shared across layers."""
    if config.qk_norm:
        raise ConvertError(f"{option}: the source normalises keys (model.qk_norm), {reason}; {remedy}")
    if config.kv_share_every != 1:
        raise ConvertError(f"{option} needs a source with model.kv_share_every=1, not "
                           f"{config.kv_share_every}; {remedy}")

"""A trained workdir's model continuing a prompt: `sample`, what `eval.py --sample` prints."""

from __future__ import annotations

import os

import numpy as np

from mqa.data import DataError
from mqa.decode import generate
from mqa.loading import load_model


def sample(workdir: str | os.PathLike, prompt: str, *, step: int | None = None,
           overrides: dict | None = None, max_new_tokens: int = 200,
           temperature: float = 0.8, top_k: int | None = None, top_p: float | None = None,
           seed: int = 0) -> str:
    """The prompt and `max_new_tokens` tokens generated after it (`mqa.generate`, with the
    KV cache), decoded to text with the model's tokenizer.

    workdir: a training workdir or a checkpoint step directory; step, overrides: as
    `load_model` takes them. temperature: 0 is greedy; top_k, top_p: sample from the k
    most likely tokens, or the smallest set with this probability; seed: the sampling
    seed. A model whose tokenizer has a BOS (`bos_id`: a converted Gemma's, Llama 2's)
    gets it before the prompt, and the text returned leaves it out. Errors are one line: CheckpointError, ConfigError, DataError (no tokenizer),
    ValueError (an empty prompt, or more tokens than model.max_seq_len).
    """
    model = load_model(workdir, step=step, overrides=overrides)
    if model.tokenizer is None:
        raise DataError(f"{model.path} has no tokenizer.json, so text cannot be encoded; "
                        "copy the model's tokenizer.json there")
    ids = model.tokenizer.encode(prompt)
    bos = getattr(model.tokenizer, "bos_id", None)
    if bos is not None:
        ids = np.concatenate([np.asarray([bos], ids.dtype), ids])
    tokens = generate(model, ids, max_new_tokens,
                      temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return model.tokenizer.decode(tokens[0][0 if bos is None else 1:])

"""A prepared corpus read back (`Corpus`, `load_corpus`), and the windows cut from it.

Batches are pure functions of their arguments: train_batch(tokens, step, seed=..., sampling=...) gives
the same windows for a step whether the run was interrupted or not, and on every host; each host reads
only its rows. Held-out windows (eval_windows) are deterministic and cover the split in order.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from mqa import token_files
from mqa.data.preparation import SHARD_TOKENS, prepared_folder
from mqa.data.errors import DataError
from mqa.data.tokenizers import BpeTokenizer, ByteTokenizer, load_tokenizer
from mqa.data.window_order import permuted_starts

Tokens = np.ndarray | token_files.TokenStream  # int32 ids [n], in memory or memory-mapped


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus: train and held-out token ids, and the tokenizer that made them."""

    train: Tokens  # int32 ids [n_train_tokens], memory-mapped
    heldout: Tokens  # int32 ids [n_heldout_tokens]; text disjoint from train
    tokenizer: ByteTokenizer | BpeTokenizer
    heldout_bytes: int  # raw bytes the held-out tokens stand for (for bits per byte)
    source: str  # one line for humans, e.g. "file ../x.txt (1,115,394 bytes)"
    dropped_rows: int = 0  # rows of a document source left out for having no text


def load_corpus(data_config, cache_dir: str | os.PathLike, *, min_tokens: int,
                shard_tokens: int = SHARD_TOKENS) -> Corpus:
    """Reads, splits and tokenizes the corpus `data_config` names into token files, or opens them.

    Fields of data_config: path, hf_name, hf_config, tokenizer ('byte'|'bpe'|a tokenizer.json
    or a folder holding one), bpe_vocab_size, heldout_fraction, and, where present, text_column,
    bpe_train_bytes, token_dir (where the token files go instead of cache_dir) and strict (rows
    without text are an error, also in a folder prepared without it). Both splits must have at
    least `min_tokens` tokens. An interrupted preparation resumes from its shards.
    """
    source, folder = prepared_folder(data_config, cache_dir, shard_tokens=shard_tokens)
    index = json.loads((folder / token_files.INDEX_FILE).read_text())
    dropped = index.get("dropped_rows", {})
    if dropped and data_config.get("strict", False):
        raise DataError(f"{folder} was prepared without {sum(dropped.values()):,} rows of {source.description} "
                        f"that have no text ({', '.join(dropped)}); data.strict=true refuses it; fix those rows "
                        "or set data.strict=false")
    corpus = Corpus(
        train=token_files.TokenStream.open(folder, "train"),
        heldout=token_files.TokenStream.open(folder, "heldout"),
        tokenizer=load_tokenizer(folder),
        heldout_bytes=sum(shard["bytes"] for shard in index["splits"]["heldout"]),
        source=source.description,
        dropped_rows=sum(dropped.values()),
    )
    for split, tokens, remedy in [("train", corpus.train, "smaller"), ("held-out", corpus.heldout, "larger")]:
        if len(tokens) < min_tokens:
            raise DataError(
                f"{split} split of {source.description} has {len(tokens):,} tokens; need at least {min_tokens} "
                f"(train.seq_len + 1); use a longer corpus, a {remedy} data.heldout_fraction or a smaller train.seq_len"
            )
    return corpus


SAMPLINGS = ("permutation", "uniform")  # train.sampling: how train_batch picks window starts


def train_batch(tokens: Tokens, step: int, *, seed: int, batch_size: int, seq_len: int, sampling: str,
                rows: slice | None = None) -> np.ndarray:
    """Windows of seq_len + 1 tokens: int32 [batch_size, seq_len + 1], or [len(rows), seq_len + 1].

    Window i is tokens[o_i : o_i + seq_len + 1], o_i one of the n = len(tokens) - seq_len starts:
    - sampling="permutation": without replacement. The starts are visited pass after pass, each
      pass a per-seed random order of all n (`window_order.permuted_starts`), and batch `step`
      takes positions step * batch_size ... (step + 1) * batch_size - 1 of the concatenated passes
      (a batch may straddle two passes);
    - sampling="uniform": with replacement, o_i uniform on 0..n-1 drawn from
      np.random.default_rng([seed, step]) (what every run did before train.sampling existed).
    Either way the batch depends only on its arguments, so a resumed run sees the same batches as
    an uninterrupted one. `rows` picks this host's slice of the full batch (host p of P:
    rows=slice(p * batch_size // P, (p + 1) * batch_size // P)); a host reads only its windows.
    """
    num_starts = len(tokens) - seq_len
    if num_starts < 1:
        raise DataError(f"{len(tokens)} tokens cannot fill a training window of seq_len + 1 = {seq_len + 1} tokens")
    if sampling == "uniform":
        starts = np.random.default_rng([seed, step]).integers(0, num_starts, size=batch_size)
        if rows is not None:
            starts = starts[rows]
    elif sampling == "permutation":
        positions = step * batch_size + np.arange(batch_size, dtype=np.int64)[rows or slice(None)]
        starts = permuted_starts(num_starts, positions, seed=seed)
    else:
        raise DataError(f"sampling={sampling!r} is not one of: {', '.join(map(repr, SAMPLINGS))}")
    return token_files.read_windows(tokens, starts, seq_len + 1)


def eval_windows(tokens: Tokens, seq_len: int, *, stride: int | None = None) -> np.ndarray:
    """Deterministic windows of seq_len + 1 tokens from the start of `tokens`: int32 [num_windows, seq_len + 1].

    Default stride = seq_len: consecutive windows share one boundary token, so every token after the
    first is a target exactly once. A smaller stride gives overlapping (sliding) windows. A trailing
    partial window is dropped.
    """
    return token_files.read_windows(tokens, eval_window_starts(len(tokens), seq_len, stride=stride),
                                    seq_len + 1)


def eval_window_starts(num_tokens: int, seq_len: int, *, stride: int | None = None) -> np.ndarray:
    """int [num_windows]: where each of `eval_windows`' windows starts, for `num_tokens` tokens."""
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"eval stride={stride} is invalid; need 1 <= stride <= seq_len ({seq_len})")
    if num_tokens < seq_len + 1:
        raise DataError(f"{num_tokens} held-out tokens cannot fill one eval window of seq_len + 1 = {seq_len + 1}")
    return np.arange((num_tokens - seq_len - 1) // stride + 1) * stride

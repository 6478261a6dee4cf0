"""Preparing a corpus: its source tokenized, on all cores, into a folder of token files.

The folder (mqa/token_files.py: uint8/16/32 shards with a JSON index) is named by everything its
ids depend on (the source's identity, the tokenizer, the hold-out fraction, BPE's sample size),
under the run's cache folder or data.token_dir. An interrupted preparation resumes from the shards
it wrote and ends with the same files. Rows a document source drops are reported in one line and
recorded in the index (data.strict makes them an error).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Iterator

from mqa import token_files
from mqa.data.sources import DroppedRows, Source, find_source, source_pieces, text_column
from mqa.data.errors import DataError
from mqa.data.tokenizers import (TOKENIZER_FILE, BpeTokenizer, ByteTokenizer, check_bpe_vocab_size,
                                 load_tokenizer, pretrained_tokenizer_file)

ENCODE_BATCH_CHARS = 1 << 20  # text handed to the tokenizer per call (16 pieces its threads share)
SHARD_TOKENS = 1 << 24  # ids per token file (32 MB as uint16), held in memory until it is written
DEFAULT_BPE_TRAIN_BYTES = 100_000_000  # more than any corpus the repository ships


def prepare(data_config, cache_dir: str | os.PathLike, *, shard_tokens: int = SHARD_TOKENS) -> Path:
    """The complete token folder of the corpus `data_config` names (see `mqa.data.load_corpus`),
    prepared (or its interrupted preparation resumed) unless it is complete already; opens nothing."""
    return prepared_folder(data_config, cache_dir, shard_tokens=shard_tokens)[1]


def prepared_folder(data_config, cache_dir: str | os.PathLike, *,
                    shard_tokens: int = SHARD_TOKENS) -> tuple[Source, Path]:
    """(the source, its complete token folder), prepared first unless it is complete."""
    source, folder = token_folder(data_config, cache_dir)
    if not (folder / token_files.INDEX_FILE).is_file():
        with token_files.preparing(folder):  # removes what a killed preparation left half-written
            tokenize_into(data_config, source, folder, shard_tokens)
    return source, folder


def token_folder(data_config, cache_dir: str | os.PathLike) -> tuple[Source, Path]:
    """(source, the folder its token files go to): cache_dir or data.token_dir / tokens-<hash of
    what the ids depend on>. Checks the config first."""
    check_data_config(data_config)
    source = find_source(data_config)
    pretrained = pretrained_tokenizer_file(data_config.tokenizer)
    tokenizer_identity = hashlib.sha256(pretrained.read_bytes()).hexdigest() if pretrained else data_config.tokenizer
    bpe_vocab_size = data_config.bpe_vocab_size if data_config.tokenizer == "bpe" else None
    key = [token_files.FORMAT, source.identity, tokenizer_identity, bpe_vocab_size, data_config.heldout_fraction,
           bpe_train_bytes(data_config) if data_config.tokenizer == "bpe" else None]
    name = f"tokens-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}"
    return source, Path(data_config.get("token_dir") or cache_dir).expanduser() / name


def bpe_train_bytes(data_config) -> int:
    """How much train text BPE learns its merges on: data.bpe_train_bytes, or the default."""
    return data_config.get("bpe_train_bytes") or DEFAULT_BPE_TRAIN_BYTES


def check_data_config(data_config) -> None:
    """One-line DataErrors for the data fields that are checked before any reading."""
    pretrained_tokenizer_file(data_config.tokenizer)  # a path that is not a tokenizer: one line
    if data_config.tokenizer == "bpe":
        check_bpe_vocab_size(data_config.bpe_vocab_size)
    if not 0 < data_config.heldout_fraction < 1:
        raise DataError(f"data.heldout_fraction={data_config.heldout_fraction} is out of range; need 0 < fraction < 1")
    if data_config.get("bpe_train_bytes", 1) < 1:
        raise DataError(f"data.bpe_train_bytes={data_config.bpe_train_bytes} must be at least 1 (bytes of train text BPE learns on)")


def tokenize_into(data_config, source: Source, folder: Path, shard_tokens: int) -> None:
    """Tokenizes the source into token files in `folder`, resuming from shards already there: a text
    source is read from where they end; a document source from its start, skipping (without
    tokenizing) the pieces they hold."""
    tokenizer = prepared_tokenizer(data_config, source, folder)
    as_text = tokenizer.name != "byte"
    shard_tokens, next_piece, written = token_files.read_progress(folder, shard_tokens)
    dtype = token_files.token_dtype(tokenizer.vocab_size)
    writers = {split: token_files.ShardWriter(folder, split, dtype, shard_tokens, written[split])
               for split in token_files.SPLITS}
    position = token_files.resume_position(written, next_piece)  # where piece next_piece starts, if recorded
    dropped = DroppedRows(text_column(data_config), strict=bool(data_config.get("strict", False)))
    pieces = source_pieces(source, as_text, data_config.heldout_fraction, start=position, dropped=dropped)
    if position is None:  # read from the start, skipping the pieces the shards hold
        numbered = itertools.islice(enumerate(pieces), next_piece, None)
    else:
        numbered = enumerate(pieces, next_piece)
    count = next_piece  # pieces before next_piece are all in shards already
    for batch in encode_batches(numbered):
        for (index, (split, piece, position)), ids in zip(batch, tokenizer.encode_batch([p for _, (_, p, _) in batch])):
            count = index + 1
            num_bytes = len(piece.encode("utf-8") if isinstance(piece, str) else piece)
            if writers[split].add(index, ids, num_bytes, position):
                token_files.write_progress(folder, shard_tokens, writers, count)
    for writer in writers.values():
        writer.finish(count, position)  # position: where the source stands after the last piece
    if dropped.counts:
        print(f"warning: {dropped.summary()} (data.strict=false); recorded in "
              f"{folder / token_files.INDEX_FILE}", file=sys.stderr)
    token_files.write_index(folder, tokenizer.vocab_size, shard_tokens, writers, dropped_rows=dropped.counts)


def encode_batches(pieces: Iterator[tuple[int, tuple[str, str | bytes, object]]]) -> Iterator[list]:
    """Consecutive numbered pieces grouped into lists of about ENCODE_BATCH_CHARS characters, one
    tokenizer call each."""
    batch, size = [], 0
    for item in pieces:
        batch.append(item)
        size += len(item[1][1])
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def prepared_tokenizer(data_config, source: Source, folder: Path) -> ByteTokenizer | BpeTokenizer:
    """The tokenizer saved in `folder` by an interrupted preparation, or a new one, saved there first."""
    if (folder / TOKENIZER_FILE).is_file():
        return load_tokenizer(folder)
    if data_config.tokenizer == "bpe":  # trained on a bounded sample of the train split only
        pieces = source_pieces(source, True, data_config.heldout_fraction)
        train_pieces = (piece for split, piece, _ in pieces if split == "train")
        tokenizer = BpeTokenizer.train(bounded(train_pieces, bpe_train_bytes(data_config)), data_config.bpe_vocab_size)
    elif data_config.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:  # a pretrained model's tokenizer, e.g. for uptraining it
        tokenizer = load_tokenizer(pretrained_tokenizer_file(data_config.tokenizer))
    tokenizer.save(folder)
    return tokenizer


def bounded(pieces: Iterator[str], max_bytes: int) -> Iterator[str]:
    """The leading pieces whose UTF-8 bytes add up to at most max_bytes (at least one piece)."""
    total = 0
    for piece in pieces:
        total += len(piece.encode("utf-8"))
        if total > max_bytes and total != len(piece.encode("utf-8")):
            return
        yield piece

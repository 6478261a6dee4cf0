"""Text corpora for language-model training: sources, tokenizers, token files and batches.

A corpus comes from one source, in order of precedence:
  data.path     a local text file, or a folder whose regular files are concatenated in name order;
                or .jsonl / .parquet files (one, or a folder of them): one document per row, column
                data.text_column, streamed through `datasets`;
  data.hf_name  a Hugging Face hub dataset, streamed (column data.text_column; data.hf_config picks its configuration);
  otherwise     the English documentation that ships with every CPython (pydoc_data), so it works offline.

Text sources keep a contiguous held-out tail (data.heldout_fraction of the text); document sources hold
out whole documents, or the hub dataset's own "validation" or "test" split. The text is tokenized with a
byte tokenizer (256 ids, lossless on any bytes), a byte-level BPE trained on the first data.bpe_train_bytes
of the train split only, or a pretrained model's tokenizer (data.tokenizer names its tokenizer.json or the
workdir holding it). Everything is read in bounded pieces, tokenized on all cores and written as token
files (mqa/token_files.py: uint8/16/32 shards with a JSON index) in cache_dir or data.token_dir; an
interrupted preparation resumes. `python -m mqa.data prepare` does it ahead of training.

Batches are pure functions of their arguments: train_batch(tokens, step, seed=...) gives the same
windows for a step whether the run was interrupted or not, and on every host; each host reads only its rows.
"""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import itertools
import json
import operator
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from mqa import token_files
from mqa.data.errors import DataError
from mqa.data.tokenizers import (TOKENIZER_FILE, TOKENIZER_NAMES, BpeTokenizer,  # noqa: F401 (re-exported)
                                 ByteTokenizer, _byte_level_chars, _check_bpe_vocab_size,
                                 _checked_ids, _decode_utf8, _line_chunks, load_tokenizer,
                                 pretrained_tokenizer_file)
from mqa.token_files import file_mode  # noqa: F401 (re-exported)


# ----------------------------------------------------------------------------- sources

BLOCK_BYTES = 1 << 20  # files are read this many bytes at a time
ENCODE_BATCH_CHARS = 1 << 20  # text handed to the tokenizer per call (16 pieces its threads share)
SHARD_TOKENS = 1 << 24  # ids per token file (32 MB as uint16), held in memory until it is written
DEFAULT_BPE_TRAIN_BYTES = 100_000_000  # more than any corpus the repository ships
DOCUMENT_FORMATS = {".jsonl": "json", ".parquet": "parquet"}  # suffix -> `datasets` builder


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where the text comes from, read lazily and in bounded pieces.

    A text source (a file, a folder of them, pydoc) is one stream whose tail is held out; `blocks`
    yields it in order as str blocks or, as_text=False, as bytes where the source is bytes (files),
    from a byte offset into it (its files concatenated; pydoc: its UTF-8), between characters.
    A document source (.jsonl/.parquet files, a hub dataset) yields (split or None, document text)
    from `documents`; None leaves the choice to `_assign_documents`.
    """

    description: str  # one line for humans, e.g. "file ../x.txt (1,115,394 bytes)"
    identity: list  # JSON-able; changes whenever the text could change
    blocks: Callable[[bool, int], Iterator[str | bytes]] | None = None  # (as_text, start byte) -> blocks
    num_bytes: int | None = None  # the length of blocks(False) when it yields bytes (files), else None
    documents: Callable[[], Iterator[tuple[str | None, str]]] | None = None


def _find_source(data_config) -> _Source:
    """Picks the source the config names and checks it cheaply; reading the text is deferred."""
    if data_config.path:
        return _local_source(data_config.path, _text_column(data_config))
    if data_config.hf_name:
        return _hub_source(data_config.hf_name, data_config.hf_config, _text_column(data_config))
    return _pydoc_source()


def _text_column(data_config) -> str:
    return data_config.get("text_column") or "text"


def _local_source(path_name: str, text_column: str) -> _Source:
    """A file, or a folder whose regular files are read in name order: plain text (the files
    concatenated, byte for byte) or, if they end in .jsonl / .parquet, documents."""
    path = Path(path_name).expanduser()
    if not path.exists():
        raise DataError(f"data.path {path_name!r} does not exist; give a text file, a folder of them, or '' for the default")
    is_folder = path.is_dir()
    files = sorted((f for f in path.iterdir() if f.is_file()), key=lambda f: f.name) if is_folder else [path]
    if not files:
        raise DataError(f"data.path folder {path_name!r} has no files; put text files in it or point data.path at a file")
    stats = [f.stat() for f in files]
    num_bytes = sum(s.st_size for s in stats)
    if num_bytes == 0:
        raise DataError(f"data.path {path_name!r} is empty (0 bytes); give a file or folder with text in it")
    identity = ["path", [[str(f.resolve()), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)]]
    kinds = {f.suffix in DOCUMENT_FORMATS for f in files}
    if len(kinds) > 1:
        document = next(f for f in files if f.suffix in DOCUMENT_FORMATS)
        text = next(f for f in files if f.suffix not in DOCUMENT_FORMATS)
        raise DataError(f"data.path folder {path_name!r} mixes document files ({document.name}) and plain text "
                        f"({text.name}); give a folder of one kind: .jsonl/.parquet files or text files")
    what = f"folder {path_name} ({len(files)} files, {num_bytes:,} bytes)" if is_folder else f"file {path_name} ({num_bytes:,} bytes)"
    if kinds == {True}:
        return _Source(what, [*identity, text_column], documents=lambda: _file_documents(files, text_column))
    sizes = [s.st_size for s in stats]
    return _Source(what, identity, blocks=lambda as_text, start: _file_blocks(files, sizes, as_text, start),
                   num_bytes=num_bytes)


def _file_blocks(files: list[Path], sizes: list[int], as_text: bool, start: int = 0) -> Iterator[str | bytes]:
    """The files' contents in order from byte `start` of their concatenation, BLOCK_BYTES at a time (a file's
    blocks end at multiples of BLOCK_BYTES into it, wherever reading starts); as_text: decoded as UTF-8
    (each file must be). Files wholly before `start` are not opened."""
    for file, size in zip(files, sizes):
        if start and start >= size:
            start -= size
            continue
        decoder = codecs.getincrementaldecoder("utf-8")()
        offset, start = start, 0  # bytes of this file read (or passed over) so far
        try:
            with open(file, "rb") as f:
                f.seek(offset)
                while block := f.read(BLOCK_BYTES - offset % BLOCK_BYTES):
                    if not as_text:
                        yield block
                    else:
                        pending = decoder.getstate()[0]  # an incomplete character from the last block
                        try:
                            yield decoder.decode(block)
                        except UnicodeDecodeError as e:
                            _decode_utf8((pending + block)[e.start:], f"file {str(file)!r}", offset - len(pending) + e.start)
                    offset += len(block)
            if as_text and (pending := decoder.getstate()[0]):  # the file ends inside a character
                _decode_utf8(pending, f"file {str(file)!r}", offset - len(pending))
        except OSError as e:
            raise DataError(f"cannot read file {str(file)!r}: {e.strerror or e}; fix its permissions or move it out of data.path") from None


def _file_documents(files: list[Path], text_column: str) -> Iterator[tuple[None, str]]:
    """The `text_column` of every row of .jsonl / .parquet files, in order, streamed by `datasets`."""
    import datasets  # imported here: it is slow to import and only documents need it

    for file in files:
        def rows(file=file):
            return datasets.load_dataset(DOCUMENT_FORMATS[file.suffix], data_files=str(file), split="train", streaming=True)

        yield from ((None, text) for text in _column(rows, text_column, f"file {str(file)!r}"))


def _column(rows: Callable[[], Iterable[dict]], text_column: str, label: str) -> Iterator[str]:
    """The text column of the streamed `datasets` split rows() opens; read errors and a missing column raise one line."""
    try:
        for row in rows():
            if text_column not in row:
                raise DataError(f"{label} has no {text_column!r} column; it has {sorted(row)}; "
                                "set data.text_column to the one holding the text")
            text = row[text_column]
            if text is not None:
                yield text if isinstance(text, str) else str(text)
    except DataError:
        raise
    except Exception as e:  # unparsable JSON, a damaged parquet file, a dropped connection, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot read {label}: {reason}") from None


def _hub_source(name: str, config: str, text_column: str) -> _Source:
    """A hub dataset, streamed: its "train" split, and its "validation" (or "test") split held out."""
    label = f"hub dataset {name!r}" + (f" (config {config!r})" if config else "")

    def documents():
        try:
            import datasets  # imported here: it is slow to import and only the hub needs it

            splits = datasets.load_dataset(name, config or None, streaming=True)
        except Exception as e:  # offline, unknown name, bad config, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"could not load {label}: {reason}; set data.path to a local file for offline use") from e
        if "train" not in splits:
            raise DataError(f"{label} has no 'train' split; it has {sorted(splits)}")
        heldout_name = next((s for s in ("validation", "test") if s in splits), None)
        train_split = "train" if heldout_name else None  # None: hold out whole train documents
        yield from ((train_split, text) for text in _column(lambda: splits["train"], text_column, f"{label} split 'train'"))
        if heldout_name:
            yield from (("heldout", text) for text in _column(lambda: splits[heldout_name], text_column, f"{label} split {heldout_name!r}"))

    identity = ["hub", name, config] + ([text_column] if text_column != "text" else [])  # as before for "text"
    return _Source(label, identity, documents=documents)


def _pydoc_source() -> _Source:
    """The English documentation topics every CPython ships (pydoc_data.topics): ~0.5 MB, offline."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    version = sys.version.split()[0]
    description = f"CPython {version} documentation topics ({len(text.encode()):,} bytes)"
    # str even for byte tokens: its held-out tail is counted in characters, as it always was
    return _Source(description, ["pydoc_data", sys.version],
                   blocks=lambda as_text, start: iter([text.encode()[start:].decode() if start else text]))


# ----------------------------------------------------------------------------- pieces


def _pieces(source: _Source, as_text: bool, heldout_fraction: float,
            start: list[int] | None = None) -> Iterator[tuple[str, str | bytes, list[int] | None]]:
    """The source as ("train" | "heldout", piece, where the source stands after it), in order, each
    piece at most a few MB.

    A text source's held-out split is its last heldout_fraction of bytes (byte tokens) or of
    characters (others), as _split_text cuts it; str pieces are cut just after a newline, as
    _line_chunks cuts them. Its positions are [bytes read, the same in the blocks' units
    (characters, or bytes), where held-out begins in those units]; `start`, one of them, resumes
    the pieces there without reading what comes before. A document source holds out whole
    documents (_assign_documents); its positions are None and it cannot start later.
    """
    if source.documents is not None:
        for split, document in _assign_documents(source.documents(), heldout_fraction):
            text = document + "\n"  # documents are separated by newlines
            yield from ((split, p, None) for p in (_line_chunks(text) if as_text else _byte_blocks(text.encode())))
        return
    if start is None:
        if not as_text and source.num_bytes is not None:
            total = source.num_bytes
        else:  # a first pass, counting in the blocks' own units
            total = sum(len(block) for block in source.blocks(as_text, 0))
        start = [0, 0, total - round(total * heldout_fraction)]
    offset, units, cut = start
    labelled = _split_blocks(source.blocks(as_text, offset), cut, units)
    for split, group in itertools.groupby(labelled, key=operator.itemgetter(0)):
        blocks = (block for _, block in group)
        for piece in (_streamed_line_chunks(blocks) if as_text else blocks):
            offset += len(piece.encode("utf-8")) if isinstance(piece, str) else len(piece)
            units += len(piece)
            yield split, piece, [offset, units, cut]


def _split_blocks(blocks: Iterator[str | bytes], cut: int, position: int = 0) -> Iterator[tuple[str, str | bytes]]:
    """("train", ...) for the stream's first `cut` characters (or bytes), ("heldout", ...) for the rest;
    `position`: where in the stream the blocks start."""
    for block in blocks:
        if position < cut < position + len(block):
            yield "train", block[: cut - position]
            yield "heldout", block[cut - position :]
        elif block:
            yield ("train" if position + len(block) <= cut else "heldout"), block
        position += len(block)


def _assign_documents(documents: Iterator[tuple[str | None, str]], heldout_fraction: float) -> Iterator[tuple[str, str]]:
    """Documents without a split go to held-out when that keeps the held-out share of the documents
    so far at most heldout_fraction: every 10th for 0.1, whatever their lengths; the rest to train."""
    seen = heldout = 0
    for split, text in documents:
        if split is None:
            seen += 1
            split = "heldout" if heldout + 1 <= heldout_fraction * seen + 1e-9 else "train"
            heldout += split == "heldout"
        yield split, text


def _byte_blocks(data: bytes) -> Iterator[bytes]:
    for start in range(0, len(data), BLOCK_BYTES):
        yield data[start : start + BLOCK_BYTES]


def _streamed_line_chunks(blocks: Iterator[str], size: int = 1 << 16, limit: int = 1 << 20) -> Iterator[str]:
    """The pieces _line_chunks cuts the concatenated blocks into, read block by block; a piece
    with no newline is cut after `limit` characters so that memory stays bounded."""
    buffer = ""
    for block in blocks:
        buffer += block
        start = 0
        while (newline := buffer.find("\n", start + size)) >= 0 or len(buffer) - start > limit:
            end = newline + 1 if 0 <= newline < start + limit else start + limit
            yield buffer[start:end]
            start = end
        buffer = buffer[start:]
    if buffer:
        yield buffer


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus: train and held-out token ids, and the tokenizer that made them."""

    train: token_files.TokenStream | np.ndarray  # int32 ids [n_train_tokens], memory-mapped
    heldout: token_files.TokenStream | np.ndarray  # int32 ids [n_heldout_tokens]; text disjoint from train
    tokenizer: ByteTokenizer | BpeTokenizer
    heldout_bytes: int  # raw bytes the held-out tokens stand for (for bits per byte)
    source: str  # one line for humans, e.g. "file ../x.txt (1,115,394 bytes)"


def load_corpus(data_config, cache_dir: str | os.PathLike, *, min_tokens: int, shard_tokens: int = SHARD_TOKENS) -> Corpus:
    """Reads, splits and tokenizes the corpus `data_config` names into token files, or opens them.

    Fields of data_config: path, hf_name, hf_config, tokenizer ('byte'|'bpe'|a tokenizer.json
    or a folder holding one), bpe_vocab_size, heldout_fraction, and, where present, text_column,
    bpe_train_bytes and token_dir (where the token files go instead of cache_dir). Both splits must
    have at least `min_tokens` tokens. An interrupted preparation resumes from its shards.
    """
    source, folder, legacy_folder = _token_folders(data_config, cache_dir)
    corpus = _load_legacy(legacy_folder, source) or _load_token_files(
        _prepare_unless_complete(data_config, source, folder, shard_tokens), source)
    for split, tokens, remedy in [
        ("train", corpus.train, "smaller"),
        ("held-out", corpus.heldout, "larger"),
    ]:
        if len(tokens) < min_tokens:
            raise DataError(
                f"{split} split of {source.description} has {len(tokens):,} tokens; need at least {min_tokens} "
                f"(train.seq_len + 1); use a longer corpus, a {remedy} data.heldout_fraction or a smaller train.seq_len"
            )
    return corpus


def prepare(data_config, cache_dir: str | os.PathLike, *, shard_tokens: int = SHARD_TOKENS) -> Path:
    """The complete token folder of the corpus `data_config` names (see load_corpus), prepared
    (or its interrupted preparation resumed) unless it is complete already; opens nothing."""
    source, folder, _ = _token_folders(data_config, cache_dir)
    return _prepare_unless_complete(data_config, source, folder, shard_tokens)


def _token_folders(data_config, cache_dir: str | os.PathLike) -> tuple[_Source, Path, Path]:
    """(source, its token folder, where the previous version would have cached its tokens)."""
    _check_data_config(data_config)
    source = _find_source(data_config)
    pretrained = pretrained_tokenizer_file(data_config.tokenizer)
    tokenizer_identity = hashlib.sha256(pretrained.read_bytes()).hexdigest() if pretrained else data_config.tokenizer
    bpe_vocab_size = data_config.bpe_vocab_size if data_config.tokenizer == "bpe" else None
    legacy_key = [1, source.identity, tokenizer_identity, bpe_vocab_size, data_config.heldout_fraction]
    key = [token_files.FORMAT, source.identity, tokenizer_identity, bpe_vocab_size, data_config.heldout_fraction,
           _bpe_train_bytes(data_config) if data_config.tokenizer == "bpe" else None]
    folder = Path(data_config.get("token_dir") or cache_dir).expanduser() / _folder_name(key)
    return source, folder, Path(cache_dir) / _folder_name(legacy_key)


def _folder_name(key: list) -> str:
    return f"tokens-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}"


def _bpe_train_bytes(data_config) -> int:
    return data_config.get("bpe_train_bytes") or DEFAULT_BPE_TRAIN_BYTES


def _split_text(text: str | bytes, heldout_fraction: float) -> tuple[str | bytes, str | bytes]:
    """Contiguous split: the first (1 - heldout_fraction) of the characters (or bytes) is train, the rest held out."""
    cut = len(text) - round(len(text) * heldout_fraction)
    return text[:cut], text[cut:]


def _check_data_config(data_config) -> None:
    pretrained_tokenizer_file(data_config.tokenizer)  # a path that is not a tokenizer: one line
    if data_config.tokenizer == "bpe":
        _check_bpe_vocab_size(data_config.bpe_vocab_size)
    if not 0 < data_config.heldout_fraction < 1:
        raise DataError(f"data.heldout_fraction={data_config.heldout_fraction} is out of range; need 0 < fraction < 1")
    if data_config.get("bpe_train_bytes", 1) < 1:
        raise DataError(f"data.bpe_train_bytes={data_config.bpe_train_bytes} must be at least 1 (bytes of train text BPE learns on)")


def _load_legacy(cache: Path, source: _Source) -> Corpus | None:
    """A corpus cached by earlier versions (int32 train.npy / heldout.npy, meta.json written last), or None."""
    meta_file = cache / "meta.json"
    if not meta_file.is_file():
        return None
    meta = json.loads(meta_file.read_text())
    return Corpus(
        train=np.load(cache / "train.npy", mmap_mode="r"),  # memory-mapped: large corpora load instantly
        heldout=np.load(cache / "heldout.npy", mmap_mode="r"),
        tokenizer=load_tokenizer(cache),
        heldout_bytes=meta["heldout_bytes"],
        source=source.description,
    )


def _load_token_files(folder: Path, source: _Source) -> Corpus:
    """The corpus in the complete token folder `folder`."""
    index = json.loads((folder / token_files.INDEX_FILE).read_text())
    return Corpus(
        train=token_files.TokenStream.open(folder, "train"),
        heldout=token_files.TokenStream.open(folder, "heldout"),
        tokenizer=load_tokenizer(folder),
        heldout_bytes=sum(shard["bytes"] for shard in index["splits"]["heldout"]),
        source=source.description,
    )


def _prepare_unless_complete(data_config, source: _Source, folder: Path, shard_tokens: int) -> Path:
    if not (folder / token_files.INDEX_FILE).is_file():
        with token_files.preparing(folder):  # removes what a killed preparation left half-written
            _prepare(data_config, source, folder, shard_tokens)
    return folder


def _prepare(data_config, source: _Source, folder: Path, shard_tokens: int) -> None:
    """Tokenizes the source into token files in `folder`, resuming from shards already there: a text
    source is read from where they end; a document source from its start, skipping (without
    tokenizing) the pieces they hold."""
    tokenizer = _prepared_tokenizer(data_config, source, folder)
    as_text = tokenizer.name != "byte"
    shard_tokens, next_piece, written = token_files.read_progress(folder, shard_tokens)
    dtype = token_files.token_dtype(tokenizer.vocab_size)
    writers = {split: token_files.ShardWriter(folder, split, dtype, shard_tokens, written[split])
               for split in token_files.SPLITS}
    position = token_files.resume_position(written, next_piece)  # where piece next_piece starts, if recorded
    pieces = _pieces(source, as_text, data_config.heldout_fraction, start=position)
    if position is None:  # read from the start, skipping the pieces the shards hold
        numbered = itertools.islice(enumerate(pieces), next_piece, None)
    else:
        numbered = enumerate(pieces, next_piece)
    count = next_piece  # pieces before next_piece are all in shards already
    for batch in _batches(numbered):
        for (index, (split, piece, position)), ids in zip(batch, tokenizer.encode_batch([p for _, (_, p, _) in batch])):
            count = index + 1
            num_bytes = len(piece.encode("utf-8") if isinstance(piece, str) else piece)
            if writers[split].add(index, ids, num_bytes, position):
                token_files.write_progress(folder, shard_tokens, writers, count)
    for writer in writers.values():
        writer.finish(count, position)  # position: where the source stands after the last piece
    token_files.write_index(folder, tokenizer.vocab_size, shard_tokens, writers)


def _batches(pieces: Iterator[tuple[int, tuple[str, str | bytes]]]) -> Iterator[list]:
    """Consecutive pieces grouped into lists of about ENCODE_BATCH_CHARS characters, one tokenizer call each."""
    batch, size = [], 0
    for item in pieces:
        batch.append(item)
        size += len(item[1][1])
        if size >= ENCODE_BATCH_CHARS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _prepared_tokenizer(data_config, source: _Source, folder: Path) -> ByteTokenizer | BpeTokenizer:
    """The tokenizer saved in `folder` by an interrupted preparation, or a new one, saved there first."""
    if (folder / TOKENIZER_FILE).is_file():
        return load_tokenizer(folder)
    if data_config.tokenizer == "bpe":  # trained on a bounded sample of the train split only
        pieces = _pieces(source, True, data_config.heldout_fraction)
        train_pieces = (piece for split, piece, _ in pieces if split == "train")
        tokenizer = BpeTokenizer.train(_bounded(train_pieces, _bpe_train_bytes(data_config)), data_config.bpe_vocab_size)
    elif data_config.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:  # a pretrained model's tokenizer, e.g. for uptraining it
        tokenizer = load_tokenizer(pretrained_tokenizer_file(data_config.tokenizer))
    tokenizer.save(folder)
    return tokenizer


def _bounded(pieces: Iterator[str], max_bytes: int) -> Iterator[str]:
    """The leading pieces whose UTF-8 bytes add up to at most max_bytes (at least one piece)."""
    total = 0
    for piece in pieces:
        total += len(piece.encode("utf-8"))
        if total > max_bytes and total != len(piece.encode("utf-8")):
            return
        yield piece


# ----------------------------------------------------------------------------- batches


def train_batch(
    tokens: np.ndarray | token_files.TokenStream, step: int, *, seed: int, batch_size: int, seq_len: int,
    rows: slice | None = None,
) -> np.ndarray:
    """Random windows of seq_len + 1 tokens: int32 [batch_size, seq_len + 1], or [len(rows), seq_len + 1].

    Window i is tokens[o_i : o_i + seq_len + 1], with o_i uniform on 0..len(tokens)-seq_len-1 drawn from
    np.random.default_rng([seed, step]); so the batch depends only on its arguments, and a resumed run
    sees the same batches as an uninterrupted one. `rows` picks this host's slice of the full batch
    (host p of P: rows=slice(p * batch_size // P, (p + 1) * batch_size // P)); a host reads only its windows.
    """
    num_starts = len(tokens) - seq_len
    if num_starts < 1:
        raise DataError(f"{len(tokens)} tokens cannot fill a training window of seq_len + 1 = {seq_len + 1} tokens")
    starts = np.random.default_rng([seed, step]).integers(0, num_starts, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    return token_files.read_windows(tokens, starts, seq_len + 1)


def eval_windows(tokens: np.ndarray | token_files.TokenStream, seq_len: int, *, stride: int | None = None) -> np.ndarray:
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


"""Text corpora for language-model training.

A corpus comes from one source, in order of precedence:
  data.path     a local text file, or a folder whose regular files are concatenated in name order;
  data.hf_name  a Hugging Face hub dataset (column "text"; data.hf_config picks its configuration);
  otherwise     the English documentation that ships with every CPython (pydoc_data), so it works offline.

The text is split into a contiguous train head and held-out tail (unless the hub dataset has its own
"validation" or "test" split), tokenized with a byte tokenizer (256 ids, lossless on any bytes), a
byte-level BPE trained on the train split only, or a pretrained model's tokenizer (data.tokenizer names
its tokenizer.json or the workdir holding it), and the token ids are cached as .npy files in cache_dir.

Batches are pure functions of their arguments: train_batch(tokens, step, seed=...) gives the same
windows for a step whether the run was interrupted or not, and on every host.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import tokenizers

TOKENIZER_NAMES = ("byte", "bpe")  # data.tokenizer may also name a tokenizer.json, or a folder holding one
TOKENIZER_FILE = "tokenizer.json"
_CACHE_FORMAT = 1  # bump whenever the cached files would change for the same config


class DataError(ValueError):
    """Bad data input; the message is one line naming the value and what would be valid."""


# ----------------------------------------------------------------------------- tokenizers


class ByteTokenizer:
    """Every byte is one token: ids 0..255, lossless on any bytes, UTF-8 or not."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str | bytes) -> np.ndarray:
        """str (encoded as UTF-8 first) or bytes -> int32 [number of bytes]."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def decode_bytes(self, ids) -> bytes:
        """int [n] in 0..255 -> the n bytes they stand for."""
        return _checked_ids(ids, self.vocab_size).astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """int [n] -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Writes directory/tokenizer.json so that load_tokenizer(directory) restores this tokenizer."""
        _write_atomically(Path(directory) / TOKENIZER_FILE, json.dumps({"mqa_tokenizer": "byte"}).encode())


class BpeTokenizer:
    """Byte-level BPE from the `tokenizers` library: lossless on UTF-8 text, ids 0..vocab_size-1.

    Also wraps any other `tokenizers` vocabulary (e.g. a converted Llama's SentencePiece-style
    "▁the", "<0x0A>"): then decoding is the library's own decoder, see decode_bytes.
    """

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        byte_of_char = {char: byte for byte, char in enumerate(_byte_level_chars())}
        tokens = [tokenizer.id_to_token(i) for i in range(self.vocab_size)]
        byte_level = isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel) and all(
            token is not None and all(char in byte_of_char for char in token) for token in tokens
        )
        # The bytes each token stands for; None when the vocabulary is not byte-level.
        self._token_bytes = [bytes(byte_of_char[char] for char in token) for token in tokens] if byte_level else None

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BpeTokenizer:
        """Learns merges on `text` until the vocabulary (256 byte tokens + merges) has vocab_size ids."""
        _check_bpe_vocab_size(vocab_size)
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
            show_progress=False,
        )
        tokenizer.train_from_iterator(_line_chunks(text), trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str | bytes) -> np.ndarray:
        """str, or bytes that are UTF-8 -> int32 [number of tokens]."""
        if isinstance(text, bytes):
            text = _decode_utf8(text, "bytes given to the BPE tokenizer")
        pieces = list(_line_chunks(text))
        ids = [  # add_special_tokens=False: no BOS per piece from a converted model's tokenizer
            np.asarray(encoding.ids, dtype=np.int32)
            for i in range(0, len(pieces), 64)  # a few MB per call keeps memory flat on large corpora
            for encoding in self._tokenizer.encode_batch(pieces[i : i + 64], add_special_tokens=False)
        ]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)

    def decode_bytes(self, ids) -> bytes:
        """int [n] -> the exact bytes the tokens stand for (may split a multi-byte character).

        For a vocabulary that is not byte-level this is best effort: the library's decoded text
        as UTF-8, exact for whole texts; a piece of a multi-byte character becomes U+FFFD.
        """
        ids = _checked_ids(ids, self.vocab_size).tolist()
        if self._token_bytes is None:
            return self._tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8")
        return b"".join(self._token_bytes[i] for i in ids)

    def decode(self, ids) -> str:
        """int [n] -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Writes directory/tokenizer.json (the `tokenizers` format)."""
        _write_atomically(Path(directory) / TOKENIZER_FILE, self._tokenizer.to_str().encode())


def load_tokenizer(directory: str | os.PathLike) -> ByteTokenizer | BpeTokenizer:
    """Restores the tokenizer that ByteTokenizer.save or BpeTokenizer.save wrote into `directory`
    (or into the tokenizer.json file named)."""
    path = Path(directory)
    path = path if path.is_file() else path / TOKENIZER_FILE
    if not path.is_file():
        raise DataError(f"no tokenizer saved in {str(directory)!r}; expected {path} written by a tokenizer's save()")
    text = path.read_text()
    if json.loads(text).get("mqa_tokenizer") == "byte":
        return ByteTokenizer()
    return BpeTokenizer(tokenizers.Tokenizer.from_str(text))


def _byte_level_chars() -> list[str]:
    """The printable character that byte-level BPE uses for each byte value 0..255.

    Bytes that already print as a visible Latin-1 character stand for themselves; the others
    (control characters, space, DEL, NBSP, soft hyphen) are moved, in order, to chr(256), chr(257), ...
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    chars, moved = [], 0
    for byte in range(256):
        if byte in visible:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + moved))
            moved += 1
    return chars


def _line_chunks(text: str, size: int = 1 << 16):
    """Yields consecutive pieces of `text` of about `size` characters, each cut just after a newline."""
    start = 0
    while start < len(text):
        newline = text.find("\n", start + size)
        end = len(text) if newline < 0 else newline + 1
        yield text[start:end]
        start = end


def _checked_ids(ids, vocab_size: int) -> np.ndarray:
    """ids as a flat integer array [n], after checking each is in 0..vocab_size-1."""
    ids = np.asarray(ids).reshape(-1)
    outside = ids[(ids < 0) | (ids >= vocab_size)]
    if outside.size:
        raise DataError(f"token id {outside[0]} is outside the vocabulary; valid ids are 0..{vocab_size - 1}")
    return ids


def pretrained_tokenizer_file(name: str) -> Path | None:
    """The tokenizer.json that data.tokenizer=`name` names (the file, or a folder holding one such
    as a converted model's workdir); None for the built-in 'byte' and 'bpe'."""
    if name in TOKENIZER_NAMES:
        return None
    path = Path(name).expanduser()
    path = path / TOKENIZER_FILE if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"data.tokenizer={name!r} is neither one of {', '.join(map(repr, TOKENIZER_NAMES))} "
                        f"nor a tokenizer.json file or a folder holding one (e.g. a converted model's workdir)")
    return path


def _check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise DataError(f"data.bpe_vocab_size={vocab_size} is too small; need at least 257 (256 bytes + 1 merge)")


def _decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
            "set data.tokenizer=byte for arbitrary bytes"
        ) from None


# ----------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class _Source:
    description: str  # one line for humans, e.g. "file ../x.txt (1,115,394 bytes)"
    identity: list  # JSON-able; changes whenever the text could change
    read: Callable[[], tuple[str | bytes, str | bytes | None]]  # -> (text, held-out text or None)


def _find_source(data_config) -> _Source:
    """Picks the source the config names and checks it cheaply; reading the text is deferred to .read()."""
    if data_config.path:
        return _local_source(data_config.path, data_config.tokenizer)
    if data_config.hf_name:
        return _hub_source(data_config.hf_name, data_config.hf_config)
    return _pydoc_source()


def _local_source(path_name: str, tokenizer_name: str) -> _Source:
    """A file, or a folder whose regular files are concatenated in name order, read byte for byte.

    With the byte tokenizer the text is the raw bytes; with BPE each file must be UTF-8.
    """
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

    def read():
        if tokenizer_name == "byte":
            return b"".join(f.read_bytes() for f in files), None
        return "".join(_decode_utf8(f.read_bytes(), f"file {str(f)!r}") for f in files), None

    if is_folder:
        description = f"folder {path_name} ({len(files)} files, {num_bytes:,} bytes)"
    else:
        description = f"file {path_name} ({num_bytes:,} bytes)"
    identity = ["path", [[str(f.resolve()), s.st_size, s.st_mtime_ns] for f, s in zip(files, stats)]]
    return _Source(description, identity, read)


def _hub_source(name: str, config: str) -> _Source:
    """A hub dataset: documents of column "text" joined with newlines; its validation/test split is held out."""
    label = f"hub dataset {name!r}" + (f" (config {config!r})" if config else "")

    def read():
        try:
            import datasets  # imported here: it is slow to import and only the hub needs it

            splits = datasets.load_dataset(name, config or None)
        except Exception as e:  # offline, unknown name, bad config, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise DataError(f"could not load {label}: {reason}; set data.path to a local file for offline use") from e
        if "train" not in splits:
            raise DataError(f"{label} has no 'train' split; it has {sorted(splits)}")
        text = _join_text_column(splits["train"], label, "train")
        heldout_name = next((s for s in ("validation", "test") if s in splits), None)
        if heldout_name is None:
            return text, None
        return text, _join_text_column(splits[heldout_name], label, heldout_name)

    return _Source(label, ["hub", name, config], read)


def _join_text_column(split, label: str, split_name: str) -> str:
    if "text" not in split.column_names:
        raise DataError(f"{label} split {split_name!r} has no 'text' column; it has {split.column_names}")
    return "\n".join(split["text"])


def _pydoc_source() -> _Source:
    """The English documentation topics every CPython ships (pydoc_data.topics): ~0.5 MB, offline."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    version = sys.version.split()[0]
    description = f"CPython {version} documentation topics ({len(text.encode()):,} bytes)"
    return _Source(description, ["pydoc_data", sys.version], lambda: (text, None))


# ----------------------------------------------------------------------------- corpus


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenized corpus: train and held-out token ids, and the tokenizer that made them."""

    train: np.ndarray  # int32 [n_train_tokens]
    heldout: np.ndarray  # int32 [n_heldout_tokens]; text disjoint from train
    tokenizer: ByteTokenizer | BpeTokenizer
    heldout_bytes: int  # raw bytes the held-out tokens stand for (for bits per byte)
    source: str  # one line for humans, e.g. "file ../x.txt (1,115,394 bytes)"


def load_corpus(data_config, cache_dir: str | os.PathLike, *, min_tokens: int) -> Corpus:
    """Reads, splits and tokenizes the corpus `data_config` names, or loads its tokens from cache_dir.

    Fields of data_config: path, hf_name, hf_config, tokenizer ('byte'|'bpe'|a tokenizer.json
    or a folder holding one), bpe_vocab_size,
    heldout_fraction. Both splits must have at least `min_tokens` tokens.
    """
    _check_data_config(data_config)
    source = _find_source(data_config)
    pretrained = pretrained_tokenizer_file(data_config.tokenizer)
    key = json.dumps(
        [
            _CACHE_FORMAT,
            source.identity,
            hashlib.sha256(pretrained.read_bytes()).hexdigest() if pretrained else data_config.tokenizer,
            data_config.bpe_vocab_size if data_config.tokenizer == "bpe" else None,
            data_config.heldout_fraction,
        ]
    )
    cache = Path(cache_dir) / f"tokens-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    corpus = _load_cached(cache, source) or _tokenize_and_cache(data_config, source, cache)

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


def _load_cached(cache: Path, source: _Source) -> Corpus | None:
    """The corpus saved in `cache`, or None if it is not (completely) there. meta.json is written last."""
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


def _tokenize_and_cache(data_config, source: _Source, cache: Path) -> Corpus:
    text, heldout_text = source.read()
    if heldout_text is None:
        text, heldout_text = _split_text(text, data_config.heldout_fraction)
    if data_config.tokenizer == "bpe":
        tokenizer = BpeTokenizer.train(text, data_config.bpe_vocab_size)  # never sees held-out text
    elif data_config.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:  # a pretrained model's tokenizer, e.g. for uptraining it
        tokenizer = load_tokenizer(pretrained_tokenizer_file(data_config.tokenizer))
    corpus = Corpus(
        train=tokenizer.encode(text),
        heldout=tokenizer.encode(heldout_text),
        tokenizer=tokenizer,
        heldout_bytes=len(heldout_text.encode("utf-8") if isinstance(heldout_text, str) else heldout_text),
        source=source.description,
    )
    tokenizer.save(cache)
    _write_atomically(cache / "train.npy", lambda f: np.save(f, corpus.train))
    _write_atomically(cache / "heldout.npy", lambda f: np.save(f, corpus.heldout))
    _write_atomically(cache / "meta.json", json.dumps({"heldout_bytes": corpus.heldout_bytes}).encode())
    return corpus


def file_mode() -> int:
    """The mode a newly created file gets under the process's umask (0o644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _write_atomically(path: Path, content: bytes | Callable) -> None:
    """Writes `content` (bytes, or a function of a binary file) to a temporary file, then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, bytes):
                f.write(content)
            else:
                content(f)
        os.chmod(tmp, file_mode())  # mkstemp makes it owner-only; give it a new file's mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------- batches


def train_batch(
    tokens: np.ndarray, step: int, *, seed: int, batch_size: int, seq_len: int, rows: slice | None = None
) -> np.ndarray:
    """Random windows of seq_len + 1 tokens: int32 [batch_size, seq_len + 1], or [len(rows), seq_len + 1].

    Window i is tokens[o_i : o_i + seq_len + 1], with o_i uniform on 0..len(tokens)-seq_len-1 drawn from
    np.random.default_rng([seed, step]); so the batch depends only on its arguments, and a resumed run
    sees the same batches as an uninterrupted one. `rows` picks this host's slice of the full batch
    (host p of P: rows=slice(p * batch_size // P, (p + 1) * batch_size // P)).
    """
    num_starts = len(tokens) - seq_len
    if num_starts < 1:
        raise DataError(f"{len(tokens)} tokens cannot fill a training window of seq_len + 1 = {seq_len + 1} tokens")
    starts = np.random.default_rng([seed, step]).integers(0, num_starts, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    return np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32, copy=False)


def eval_windows(tokens: np.ndarray, seq_len: int, *, stride: int | None = None) -> np.ndarray:
    """Deterministic windows of seq_len + 1 tokens from the start of `tokens`: int32 [num_windows, seq_len + 1].

    Default stride = seq_len: consecutive windows share one boundary token, so every token after the
    first is a target exactly once. A smaller stride gives overlapping (sliding) windows. A trailing
    partial window is dropped.
    """
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise DataError(f"eval stride={stride} is invalid; need 1 <= stride <= seq_len ({seq_len})")
    if len(tokens) < seq_len + 1:
        raise DataError(f"{len(tokens)} held-out tokens cannot fill one eval window of seq_len + 1 = {seq_len + 1}")
    num_windows = (len(tokens) - seq_len - 1) // stride + 1
    starts = np.arange(num_windows) * stride
    return np.asarray(tokens)[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32, copy=False)

"""Tokenizers: bytes (256 ids, lossless on any bytes), a byte-level BPE trained on the
corpus, or a pretrained model's tokenizer.json; and reading them back from a workdir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import tokenizers

from mqa.data.errors import DataError
from mqa.token_files import write_atomically

TOKENIZER_NAMES = ("byte", "bpe")  # data.tokenizer may also name a tokenizer.json, or a folder holding one
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
    """Every byte is one token: ids 0..255, lossless on any bytes, UTF-8 or not."""

    name = "byte"
    vocab_size = 256
    bos_id = None  # no beginning-of-sequence token

    def encode(self, text: str | bytes) -> np.ndarray:
        """str (encoded as UTF-8 first) or bytes -> int32 [number of bytes]."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

    def encode_batch(self, pieces: list[str | bytes]) -> list[np.ndarray]:
        """Each piece encoded: uint8 [bytes of piece i] for piece i (ids as bytes, no copy)."""
        return [np.frombuffer(p.encode("utf-8") if isinstance(p, str) else p, dtype=np.uint8) for p in pieces]

    def decode_bytes(self, ids) -> bytes:
        """int [n] in 0..255 -> the n bytes they stand for."""
        return checked_ids(ids, self.vocab_size).astype(np.uint8).tobytes()

    def decode(self, ids) -> str:
        """int [n] -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Writes directory/tokenizer.json so that load_tokenizer(directory) restores this tokenizer."""
        write_atomically(Path(directory) / TOKENIZER_FILE, json.dumps({"mqa_tokenizer": "byte"}).encode())


class BpeTokenizer:
    """Byte-level BPE from the `tokenizers` library: lossless on UTF-8 text, ids 0..vocab_size-1.

    Also wraps any other `tokenizers` vocabulary (e.g. a converted Llama's SentencePiece-style
    "▁the", "<0x0A>"): then decoding is the library's own decoder, see decode_bytes.
    """

    name = "bpe"

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self._tokenizer = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        byte_of_char = {char: byte for byte, char in enumerate(byte_level_chars())}
        tokens = [tokenizer.id_to_token(i) for i in range(self.vocab_size)]
        byte_level = isinstance(tokenizer.decoder, tokenizers.decoders.ByteLevel) and all(
            token is not None and all(char in byte_of_char for char in token) for token in tokens
        )
        # The bytes each token stands for; None when the vocabulary is not byte-level.
        self._token_bytes = [bytes(byte_of_char[char] for char in token) for token in tokens] if byte_level else None
        # The BOS its post-processor puts before a text (a converted Gemma's, Llama 2's), the
        # token such a model expects first: eval.py and mqa.sample add it; `encode` does not.
        plain = tokenizer.encode("a", add_special_tokens=False).ids
        full = tokenizer.encode("a", add_special_tokens=True).ids
        self.bos_id = full[0] if len(full) > len(plain) and full[1:1 + len(plain)] == plain else None

    @classmethod
    def train(cls, text: str | Iterable[str], vocab_size: int) -> BpeTokenizer:
        """Learns merges on `text` (a str, or its pieces as line_chunks cuts them, streamed) until the
        vocabulary (256 byte tokens + merges) has vocab_size ids."""
        check_bpe_vocab_size(vocab_size)
        tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),  # every byte, seen or not
            show_progress=False,
        )
        tokenizer.train_from_iterator(line_chunks(text) if isinstance(text, str) else text, trainer=trainer)
        return cls(tokenizer)

    def encode(self, text: str | bytes) -> np.ndarray:
        """str, or bytes that are UTF-8 -> int32 [number of tokens]."""
        if isinstance(text, bytes):
            text = decode_utf8(text, "bytes given to the BPE tokenizer")
        pieces = list(line_chunks(text))
        ids = [  # a few MB per call keeps memory flat on large corpora
            piece_ids for i in range(0, len(pieces), 64) for piece_ids in self.encode_batch(pieces[i : i + 64])
        ]
        return np.concatenate(ids) if ids else np.zeros(0, dtype=np.int32)

    def encode_batch(self, pieces: list[str]) -> list[np.ndarray]:
        """Each piece encoded on all cores (the library's threads): int32 [tokens of piece i] for piece i."""
        # add_special_tokens=False: no BOS per piece from a converted model's tokenizer
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tokenizer.encode_batch(pieces, add_special_tokens=False)]

    def decode_bytes(self, ids) -> bytes:
        """int [n] -> the exact bytes the tokens stand for (may split a multi-byte character).

        For a vocabulary that is not byte-level this is best effort: the library's decoded text
        as UTF-8, exact for whole texts; a piece of a multi-byte character becomes U+FFFD.
        """
        ids = checked_ids(ids, self.vocab_size).tolist()
        if self._token_bytes is None:
            return self._tokenizer.decode(ids, skip_special_tokens=False).encode("utf-8")
        return b"".join(self._token_bytes[i] for i in ids)

    def decode(self, ids) -> str:
        """int [n] -> text; bytes that are not valid UTF-8 become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def save(self, directory: str | os.PathLike) -> None:
        """Writes directory/tokenizer.json (the `tokenizers` format)."""
        write_atomically(Path(directory) / TOKENIZER_FILE, self._tokenizer.to_str().encode())


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


def byte_level_chars() -> list[str]:
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


def line_chunks(text: str | Iterable[str], size: int = 1 << 16, limit: int | None = None) -> Iterator[str]:
    """Consecutive pieces of `text` (a str, or its consecutive blocks, read one at a time) of about
    `size` characters, each cut just after the first newline at least `size` characters in; with a
    `limit`, a piece that finds no newline within `limit` characters is cut there, so that memory
    stays bounded on text without newlines. The pieces concatenated are the text."""
    buffer = ""
    for block in [text] if isinstance(text, str) else text:
        buffer += block
        start = 0
        while ((newline := buffer.find("\n", start + size)) >= 0
               or (limit is not None and len(buffer) - start > limit)):
            end = newline + 1 if 0 <= newline and (limit is None or newline < start + limit) else start + limit
            yield buffer[start:end]
            start = end
        buffer = buffer[start:]
    if buffer:
        yield buffer


def checked_ids(ids, vocab_size: int) -> np.ndarray:
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


def check_bpe_vocab_size(vocab_size: int) -> None:
    if vocab_size < 257:
        raise DataError(f"data.bpe_vocab_size={vocab_size} is too small; need at least 257 (256 bytes + 1 merge)")


def decode_utf8(data: bytes, what: str, offset: int = 0) -> str:
    """data as text; `offset`: where data starts in the file, for the message when it is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{what} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {offset + e.start}); "
            "set data.tokenizer=byte for arbitrary bytes"
        ) from None

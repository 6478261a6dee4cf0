"""Token files: a tokenized corpus on disk as shards of the smallest unsigned dtype, read through memmaps.

One prepared corpus is one folder:

  tokenizer.json           the tokenizer that made the ids (written first)
  train-00000.npy, ...     uint8 | uint16 | uint32 [tokens]: consecutive pieces of the train split's ids
  heldout-00000.npy, ...   the same for the held-out split
  progress.json            while preparing: the shards written so far (removed at the end)
  index.json               written last, so its presence means the folder is complete:
                           {"format": 2, "dtype": "uint16", "vocab_size": 1024, "shard_tokens": N,
                            "splits": {"train": [{"file": "train-00000.npy", "tokens": t, "bytes": b,
                                                  "end": e, "source": s}, ...], "heldout": [...]},
                            "dropped_rows": {"file 'a.jsonl'": 3}}  (only if the input dropped rows)

A shard holds the ids of whole input pieces: a ShardWriter closes it after the first piece that
brings it to `shard_tokens` ids, and records `end`, the number of pieces (counted over the whole
input stream, both splits) consumed by then, and, for an input that can be read from a position
(text sources), `source`: where the input stood then (opaque here; see mqa.data.sources.source_pieces). Shard
contents are therefore a function of the input and `shard_tokens` alone; an interrupted
preparation reads on from the position its shards end at, or else skips the pieces they hold, and
ends with the same files. Every file is written to a temporary name (.NAME.XXXXXXXX.tmp) and
renamed into place; a preparation removes those a killed one left (`preparing`).

A TokenStream reads a split as one sequence of int32 ids, whatever its storage dtype, through
np.memmap (np.load(mmap_mode="r")): a window costs the pages it touches, not the corpus.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

FORMAT = 2
INDEX_FILE = "index.json"
PROGRESS_FILE = "progress.json"
SPLITS = ("train", "heldout")
TEMPORARY_SUFFIX = ".tmp"  # write_atomically's temporary files: .NAME.XXXXXXXX.tmp beside NAME


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0..vocab_size-1: uint8 up to 256 ids, uint16 up to 65,536, else uint32."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in uint32 token files")


# ----------------------------------------------------------------------------- writing


def file_mode() -> int:
    """The mode a newly created file gets under the process's umask (0o644 under 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def write_atomically(path: Path, content: bytes | Callable) -> None:
    """Writes `content` (bytes, or a function of a binary file) to a temporary file, then renames it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX)
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


def _write_json(path: Path, value) -> None:
    write_atomically(path, (json.dumps(value, indent=1) + "\n").encode())


@contextlib.contextmanager
def preparing(folder: Path) -> Iterator[None]:
    """Held while this process prepares `folder`: first removes the temporary files a killed preparation
    left there, unless another process is preparing it now (they may be its own, still being written)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        if _lock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB):  # no other process holds the folder
            for leftover in folder.glob(f".*.*{TEMPORARY_SUFFIX}"):
                leftover.unlink(missing_ok=True)
        _lock(fd, fcntl.LOCK_SH)  # until this process is done, no later one removes its files
        yield
    finally:
        os.close(fd)  # drops the lock


def _lock(fd: int, operation: int) -> bool:
    """flock(fd, operation): False if another process holds a conflicting lock, or the file system has no locks."""
    try:
        fcntl.flock(fd, operation)
        return True
    except OSError:
        return False


class ShardWriter:
    """Collects one split's ids piece by piece and writes them as shards of about shard_tokens ids.

    `written`: the shard records a previous, interrupted preparation left (from read_progress);
    pieces before the last one's `end` are already in them and are ignored.
    """

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int, written: list[dict]):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards = list(written)
        self.resume_from = self.shards[-1]["end"] if self.shards else 0  # first piece not yet in a shard
        self._buffer: list[np.ndarray] = []
        self._tokens = self._bytes = 0
        self._first_buffered = 0  # the first piece in the buffer, when there is one

    def add(self, piece_index: int, ids: np.ndarray, num_bytes: int, source=None) -> bool:
        """Adds piece `piece_index` (ids: int [n]; num_bytes: the bytes it stands for; source: where the input
        stands after it, JSON-able, or None where it has no such position); True if a shard was written."""
        if piece_index < self.resume_from:
            return False
        if not self._buffer:
            self._first_buffered = piece_index
        self._buffer.append(np.asarray(ids).astype(self.dtype, copy=False))
        self._tokens += len(ids)
        self._bytes += num_bytes
        if self._tokens < self.shard_tokens:
            return False
        self._flush(piece_index + 1, source)
        return True

    def finish(self, end: int, source=None) -> None:
        """Writes what is left as a last shard; `end` is the number of pieces in the whole input, `source`
        where the input stands after them."""
        if self._buffer and self._tokens:
            self._flush(end, source)

    def unwritten_from(self, position: int) -> int:
        """The first piece not yet in a shard, when `position` pieces of the input have been added."""
        return self._first_buffered if self._buffer else position

    def _flush(self, end: int, source) -> None:
        name = f"{self.split}-{len(self.shards):05d}.npy"

        def write(f) -> None:  # the .npy header, then the pieces one by one: no concatenated copy
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                     "fortran_order": False, "shape": (self._tokens,)})
            for ids in self._buffer:
                f.write(ids.tobytes())

        write_atomically(self.folder / name, write)
        self.shards.append({"file": name, "tokens": self._tokens, "bytes": self._bytes, "end": end,
                            **({} if source is None else {"source": source})})
        self._buffer, self._tokens, self._bytes = [], 0, 0


def read_progress(folder: Path, shard_tokens: int) -> tuple[int, int, dict[str, list[dict]]]:
    """(shard_tokens, next_piece, shards per split) an interrupted preparation left in `folder`: every
    piece before next_piece is in a shard. A shard whose file is missing or short ends its split's
    list (and then the input is read again from that shard's first piece).
    With no progress: (shard_tokens, 0, empty lists)."""
    path = folder / PROGRESS_FILE
    if not path.is_file():
        return shard_tokens, 0, {split: [] for split in SPLITS}
    progress = json.loads(path.read_text())
    splits = {}
    for split in SPLITS:
        splits[split] = []
        for shard in progress["splits"][split]:
            file = folder / shard["file"]
            if not file.is_file() or len(np.load(file, mmap_mode="r")) != shard["tokens"]:
                break
            splits[split].append(shard)
    complete = all(len(splits[split]) == len(progress["splits"][split]) for split in SPLITS)
    next_piece = progress["next_piece"] if complete else 0
    return progress["shard_tokens"], next_piece, splits


def resume_position(shards: dict[str, list[dict]], next_piece: int):
    """Where the input stands before piece `next_piece`, as a shard that ends there recorded it (read_progress's
    shards); None if none did (no shard yet, or an input without positions)."""
    return next((shard["source"] for split in SPLITS for shard in shards[split]
                 if shard["end"] == next_piece and "source" in shard), None)


def write_progress(folder: Path, shard_tokens: int, writers: dict[str, ShardWriter], position: int) -> None:
    """Records the shards written so far, `position` pieces into the input."""
    _write_json(folder / PROGRESS_FILE, {
        "shard_tokens": shard_tokens,
        "next_piece": min(writer.unwritten_from(position) for writer in writers.values()),
        "splits": {split: writer.shards for split, writer in writers.items()},
    })


def write_index(folder: Path, vocab_size: int, shard_tokens: int, writers: dict[str, ShardWriter],
                dropped_rows: dict[str, int] | None = None) -> None:
    """Marks `folder` complete: index.json names every shard and, if the input dropped rows, how many
    of each file or split (`dropped_rows`, absent when none were); progress.json goes."""
    _write_json(folder / INDEX_FILE, {
        "format": FORMAT,
        "dtype": token_dtype(vocab_size).name,
        "vocab_size": vocab_size,
        "shard_tokens": shard_tokens,
        "splits": {split: w.shards for split, w in writers.items()},
        **({"dropped_rows": dict(dropped_rows)} if dropped_rows else {}),
    })
    (folder / PROGRESS_FILE).unlink(missing_ok=True)


# ----------------------------------------------------------------------------- reading


class TokenStream:
    """A split's shards read as one sequence of int32 ids [len(self)], memory-mapped."""

    dtype = np.dtype(np.int32)  # what reads return; the files hold file_dtype

    def __init__(self, shards: list[np.ndarray]):
        self._shards = [shard for shard in shards if len(shard)]
        self.file_dtype = shards[0].dtype if shards else np.dtype(np.uint8)
        self.offsets = np.cumsum([0] + [len(shard) for shard in self._shards])  # int64 [num_shards + 1]

    @classmethod
    def open(cls, folder: Path, split: str) -> TokenStream:
        """The split `split` of the complete token folder `folder` (one whose index.json exists)."""
        index = json.loads((folder / INDEX_FILE).read_text())
        return cls([np.load(folder / shard["file"], mmap_mode="r") for shard in index["splits"][split]])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    def read(self, start: int, stop: int) -> np.ndarray:
        """ids start..stop-1 (0 <= start <= stop <= len): int32 [stop - start], across shard boundaries."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"tokens {start}..{stop} are outside 0..{len(self)}")
        out = np.empty(stop - start, np.int32)
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled = 0
        while start + filled < stop:
            begin = start + filled - self.offsets[shard]
            take = min(stop - start - filled, len(self._shards[shard]) - begin)
            out[filled:filled + take] = self._shards[shard][begin:begin + take]
            filled += take
            shard += 1
        return out

    def __getitem__(self, index):
        if isinstance(index, slice):
            start, stop, step = index.indices(len(self))
            return self.read(start, max(start, stop))[::step]
        position = int(index) + (len(self) if int(index) < 0 else 0)
        return self.read(position, position + 1)[0]

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        ids = self.read(0, len(self))
        return ids if dtype is None else ids.astype(dtype)


def read_windows(tokens: np.ndarray | TokenStream, starts: np.ndarray, length: int) -> np.ndarray:
    """Windows tokens[s : s + length] for s in starts: int32 [len(starts), length]; reads only those."""
    if isinstance(tokens, TokenStream):
        out = np.empty((len(starts), length), np.int32)
        for row, start in enumerate(starts):
            out[row] = tokens.read(int(start), int(start) + length)
        return out
    return np.asarray(tokens)[np.asarray(starts)[:, None] + np.arange(length)].astype(np.int32, copy=False)

"""Where a corpus's text comes from, and the text streamed as train / held-out pieces.

A source is, in order of precedence:
  data.path     a local text file, or a folder whose regular files are concatenated in name order;
                or .jsonl / .parquet files (one, or a folder of them): one document per row, column
                data.text_column, streamed through `datasets`;
  data.hf_name  a Hugging Face hub dataset, streamed (column data.text_column; data.hf_config picks
                its configuration);
  otherwise     the English documentation that ships with every CPython (pydoc_data): offline.

A text source (a file, a folder of them, pydoc) keeps its last data.heldout_fraction as held-out;
a document source holds out whole documents, or the hub dataset's own "validation" or "test"
split. Rows of a document source without text (a missing or null column) are dropped and
counted (`DroppedRows`); with data.strict they are an error.
"""

from __future__ import annotations

import codecs
import dataclasses
import itertools
import operator
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mqa.data.errors import DataError
from mqa.data.tokenizers import decode_utf8, line_chunks

BLOCK_BYTES = 1 << 20  # files are read this many bytes at a time
PIECE_LIMIT_CHARS = 1 << 20  # a text piece without a newline is cut after this many characters
DOCUMENT_FORMATS = {".jsonl": "json", ".parquet": "parquet"}  # suffix -> `datasets` builder


@dataclasses.dataclass
class DroppedRows:
    """Rows of a document source dropped for having no text (a missing or null text column):
    `counts` maps each file or hub split that had some to how many. With `strict`, the first
    such file or split raises a DataError instead."""

    text_column: str
    strict: bool = False
    counts: dict[str, int] = dataclasses.field(default_factory=dict)

    def record(self, label: str, dropped: int, rows: int) -> None:
        """`dropped` of the `rows` rows of `label` (e.g. "file 'a.jsonl'") had no text."""
        if not dropped:
            return
        if self.strict:
            raise DataError(f"{label} has {dropped:,} of {rows:,} rows without a {self.text_column!r} value; "
                            "data.strict=true refuses them; fix those rows or set data.strict=false to drop them")
        self.counts[label] = self.counts.get(label, 0) + dropped

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """One line, e.g. "dropped 3 rows without a 'text' value: 2 in file 'a.jsonl', 1 in file 'b.jsonl'"."""
        where = ", ".join(f"{count:,} in {label}" for label, count in self.counts.items())
        return f"dropped {self.total:,} rows without a {self.text_column!r} value: {where}"


@dataclasses.dataclass(frozen=True)
class Source:
    """Where the text comes from, read lazily and in bounded pieces.

    A text source (a file, a folder of them, pydoc) is one stream whose tail is held out; `blocks`
    yields it in order as str blocks or, as_text=False, as bytes where the source is bytes (files),
    from a byte offset into it (its files concatenated; pydoc: its UTF-8), between characters.
    A document source (.jsonl/.parquet files, a hub dataset) yields (split or None, document text)
    from `documents(dropped)`, counting the rows it drops in `dropped`; a None split leaves the
    choice to `assign_documents`.
    """

    description: str  # one line for humans, e.g. "file ../x.txt (1,115,394 bytes)"
    identity: list  # JSON-able; changes whenever the text could change
    blocks: Callable[[bool, int], Iterator[str | bytes]] | None = None  # (as_text, start byte) -> blocks
    num_bytes: int | None = None  # the length of blocks(False) when it yields bytes (files), else None
    documents: Callable[[DroppedRows], Iterator[tuple[str | None, str]]] | None = None


def text_column(data_config) -> str:
    """The documents' text column: data.text_column, "text" where the config has none."""
    return data_config.get("text_column") or "text"


def find_source(data_config) -> Source:
    """The source the config names, checked cheaply; reading the text is deferred."""
    if data_config.path:
        return local_source(data_config.path, text_column(data_config))
    if data_config.hf_name:
        return hub_source(data_config.hf_name, data_config.hf_config, text_column(data_config))
    return pydoc_source()


def local_source(path_name: str, column: str) -> Source:
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
        return Source(what, [*identity, column], documents=lambda dropped: file_documents(files, column, dropped))
    sizes = [s.st_size for s in stats]
    return Source(what, identity, blocks=lambda as_text, start: file_blocks(files, sizes, as_text, start),
                  num_bytes=num_bytes)


def file_blocks(files: list[Path], sizes: list[int], as_text: bool, start: int = 0) -> Iterator[str | bytes]:
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
                            decode_utf8((pending + block)[e.start:], f"file {str(file)!r}", offset - len(pending) + e.start)
                    offset += len(block)
            if as_text and (pending := decoder.getstate()[0]):  # the file ends inside a character
                decode_utf8(pending, f"file {str(file)!r}", offset - len(pending))
        except OSError as e:
            raise DataError(f"cannot read file {str(file)!r}: {e.strerror or e}; fix its permissions or move it out of data.path") from None


def file_documents(files: list[Path], column: str, dropped: DroppedRows) -> Iterator[tuple[None, str]]:
    """The `column` of every row of .jsonl / .parquet files, in order, streamed by `datasets`."""
    import datasets  # imported here: it is slow to import and only documents need it

    for file in files:
        def rows(file=file):
            return datasets.load_dataset(DOCUMENT_FORMATS[file.suffix], data_files=str(file), split="train", streaming=True)

        yield from ((None, text) for text in column_texts(rows, column, f"file {str(file)!r}", dropped))


def column_texts(rows: Callable[[], Iterable[dict]], column: str, label: str, dropped: DroppedRows) -> Iterator[str]:
    """The text column of the streamed `datasets` split rows() opens. Rows whose value is missing or
    null are dropped and counted in `dropped` once the split is read; read errors and a column that
    no row has raise one line."""
    rows_read = rows_dropped = 0
    try:
        for row in rows():
            if column not in row:
                raise DataError(f"{label} has no {column!r} column; it has {sorted(row)}; "
                                "set data.text_column to the one holding the text")
            rows_read += 1
            text = row[column]
            if text is None:
                rows_dropped += 1
            else:
                yield text if isinstance(text, str) else str(text)
    except DataError:
        raise
    except Exception as e:  # unparsable JSON, a damaged parquet file, a dropped connection, ...
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"cannot read {label}: {reason}") from None
    dropped.record(label, rows_dropped, rows_read)


def hub_source(name: str, config: str, column: str) -> Source:
    """A hub dataset, streamed: its "train" split, and its "validation" (or "test") split held out."""
    label = f"hub dataset {name!r}" + (f" (config {config!r})" if config else "")

    def documents(dropped: DroppedRows):
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
        yield from ((train_split, text) for text in
                    column_texts(lambda: splits["train"], column, f"{label} split 'train'", dropped))
        if heldout_name:
            yield from (("heldout", text) for text in
                        column_texts(lambda: splits[heldout_name], column, f"{label} split {heldout_name!r}", dropped))

    identity = ["hub", name, config] + ([column] if column != "text" else [])  # as before for "text"
    return Source(label, identity, documents=documents)


def pydoc_source() -> Source:
    """The English documentation topics every CPython ships (pydoc_data.topics): ~0.5 MB, offline."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    version = sys.version.split()[0]
    description = f"CPython {version} documentation topics ({len(text.encode()):,} bytes)"
    # str even for byte tokens: its held-out tail is counted in characters, as it always was
    return Source(description, ["pydoc_data", sys.version],
                  blocks=lambda as_text, start: iter([text.encode()[start:].decode() if start else text]))


# ----------------------------------------------------------------------------- pieces


def heldout_start(length: int, heldout_fraction: float) -> int:
    """Where a text of `length` characters (or bytes) is cut: its last heldout_fraction is held out."""
    return length - round(length * heldout_fraction)


def split_text(text: str | bytes, heldout_fraction: float) -> tuple[str | bytes, str | bytes]:
    """(train, held-out): a text source's contiguous split, as `source_pieces` cuts it."""
    cut = heldout_start(len(text), heldout_fraction)
    return text[:cut], text[cut:]


def source_pieces(source: Source, as_text: bool, heldout_fraction: float, start: list[int] | None = None,
                  dropped: DroppedRows | None = None) -> Iterator[tuple[str, str | bytes, list[int] | None]]:
    """The source as ("train" | "heldout", piece, where the source stands after it), in order, each
    piece at most a few MB.

    A text source's held-out split is its last heldout_fraction of bytes (byte tokens) or of
    characters (others), as `split_text` cuts it; str pieces are cut just after a newline, as
    `line_chunks` cuts them. Its positions are [bytes read, the same in the blocks' units
    (characters, or bytes), where held-out begins in those units]; `start`, one of them, resumes
    the pieces there without reading what comes before. A document source holds out whole
    documents (`assign_documents`) and counts the rows it drops in `dropped` (None: not kept);
    its positions are None and it cannot start later.
    """
    if source.documents is not None:
        documents = source.documents(dropped or DroppedRows("text"))
        for split, document in assign_documents(documents, heldout_fraction):
            text = document + "\n"  # documents are separated by newlines
            yield from ((split, p, None) for p in (line_chunks(text) if as_text else byte_blocks(text.encode())))
        return
    if start is None:
        if not as_text and source.num_bytes is not None:
            total = source.num_bytes
        else:  # a first pass, counting in the blocks' own units
            total = sum(len(block) for block in source.blocks(as_text, 0))
        start = [0, 0, heldout_start(total, heldout_fraction)]
    offset, units, cut = start
    labelled = split_blocks(source.blocks(as_text, offset), cut, units)
    for split, group in itertools.groupby(labelled, key=operator.itemgetter(0)):
        blocks = (block for _, block in group)
        for piece in (line_chunks(blocks, limit=PIECE_LIMIT_CHARS) if as_text else blocks):
            offset += len(piece.encode("utf-8")) if isinstance(piece, str) else len(piece)
            units += len(piece)
            yield split, piece, [offset, units, cut]


def split_blocks(blocks: Iterator[str | bytes], cut: int, position: int = 0) -> Iterator[tuple[str, str | bytes]]:
    """("train", ...) for the stream's first `cut` characters (or bytes), ("heldout", ...) for the rest;
    `position`: where in the stream the blocks start."""
    for block in blocks:
        if position < cut < position + len(block):
            yield "train", block[: cut - position]
            yield "heldout", block[cut - position :]
        elif block:
            yield ("train" if position + len(block) <= cut else "heldout"), block
        position += len(block)


def assign_documents(documents: Iterator[tuple[str | None, str]], heldout_fraction: float) -> Iterator[tuple[str, str]]:
    """Documents without a split go to held-out when that keeps the held-out share of the documents
    so far at most heldout_fraction: every 10th for 0.1, whatever their lengths; the rest to train."""
    seen = heldout = 0
    for split, text in documents:
        if split is None:
            seen += 1
            split = "heldout" if heldout + 1 <= heldout_fraction * seen + 1e-9 else "train"
            heldout += split == "heldout"
        yield split, text


def byte_blocks(data: bytes) -> Iterator[bytes]:
    """`data` in consecutive blocks of BLOCK_BYTES."""
    for start in range(0, len(data), BLOCK_BYTES):
        yield data[start : start + BLOCK_BYTES]

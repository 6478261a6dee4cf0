"""Tests for preparing token files (mqa.data.load_corpus and python -m mqa.data prepare): streamed
sources, deterministic and resumable shards, document hold-out, dtypes, errors and bounded memory."""

import io
import json
import os
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import ml_collections
import numpy as np
import pytest

from mqa import data, token_files
from mqa.data import preparation, sources

REPO = Path(__file__).resolve().parents[1]


def data_config(path="", **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(dict(
        path=str(path), hf_name="", hf_config="", tokenizer="byte", bpe_vocab_size=1024, heldout_fraction=0.1,
        bpe_train_bytes=100_000_000, text_column="text", token_dir=""))
    config.update(overrides)
    return config


def words_text(num_words: int, seed: int = 0) -> str:
    """Reproducible English-like text with newlines every ~12 words."""
    vocabulary = "the of and to in is that for it as with was on be by this are from at or an but not".split()
    rng = np.random.default_rng(seed)
    words = np.asarray(vocabulary)[rng.integers(0, len(vocabulary), num_words)]
    return "".join(w + ("\n" if i % 12 == 11 else " ") for i, w in enumerate(words))


def documents(count: int, seed: int = 0) -> list[str]:
    """Distinct documents, each starting with a marker no other document contains."""
    rng = np.random.default_rng(seed)
    return [f"doc{i:05d}: " + words_text(int(rng.integers(5, 300)), seed + i).strip() for i in range(count)]


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({"id": i, column: t}) + "\n" for i, t in enumerate(texts)))
    return path


def folder_files(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


class Interrupted(Exception):
    pass


def count_encoded_pieces(monkeypatch) -> list[int]:
    """Counts the pieces handed to either tokenizer's encode_batch from now on."""
    counter = [0]
    for cls in (data.ByteTokenizer, data.BpeTokenizer):
        original = cls.encode_batch

        def counting(self, pieces, original=original):
            counter[0] += len(pieces)
            return original(self, pieces)

        monkeypatch.setattr(cls, "encode_batch", counting)
    return counter


def interrupted_preparation(config, cache: Path, monkeypatch, *, shard_tokens: int, shards: int = 2) -> Path:
    """Prepares `config` into `cache` and stops it after its first `shards` shards; returns the token folder."""
    write_progress = token_files.write_progress
    calls = []

    def interrupt(*args, **kwargs):
        write_progress(*args, **kwargs)
        calls.append(1)
        if len(calls) == shards:
            raise Interrupted

    monkeypatch.setattr(token_files, "write_progress", interrupt)
    with pytest.raises(Interrupted):
        data.prepare(config, cache, shard_tokens=shard_tokens)
    monkeypatch.setattr(token_files, "write_progress", write_progress)
    [folder] = cache.iterdir()
    assert not (folder / token_files.INDEX_FILE).exists() and (folder / token_files.PROGRESS_FILE).exists()
    return folder


# ----------------------------------------------------------------------------- deterministic, resumable


def text_source(tmp_path):
    text = words_text(60_000)  # ~250 kB
    (tmp_path / "a.txt").write_text(text)
    return tmp_path / "a.txt", text


def jsonl_source(tmp_path):
    texts = documents(400)
    return write_jsonl(tmp_path / "docs.jsonl", texts), texts


@pytest.mark.parametrize("kind, tokenizer", [("text", "byte"), ("text", "bpe"), ("jsonl", "byte"), ("jsonl", "bpe")])
def test_interrupted_preparation_resumes_to_identical_files_and_batches(kind, tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)  # byte-token pieces of 4 kB: many shards from a small corpus
    monkeypatch.setattr(preparation, "ENCODE_BATCH_CHARS", 20_000)
    path, _ = (text_source if kind == "text" else jsonl_source)(tmp_path)
    config = data_config(path, tokenizer=tokenizer, bpe_vocab_size=300)
    shard_tokens = 6_000

    counter = count_encoded_pieces(monkeypatch)
    full = data.load_corpus(config, tmp_path / "full", min_tokens=65, shard_tokens=shard_tokens)
    full_pieces = counter[0]
    [full_folder] = (tmp_path / "full").iterdir()
    assert len(list(full_folder.glob("train-*.npy"))) >= 3

    folder = interrupted_preparation(config, tmp_path / "resumed", monkeypatch, shard_tokens=shard_tokens)

    counter[0] = 0
    resumed = data.load_corpus(config, tmp_path / "resumed", min_tokens=65, shard_tokens=shard_tokens)
    assert 0 < counter[0] < full_pieces  # the shards already written were not tokenized again
    assert folder.name == full_folder.name and folder_files(folder) == folder_files(full_folder)
    batch = dict(seed=0, batch_size=4, seq_len=64, sampling="permutation")
    for step in range(10):
        assert np.array_equal(data.train_batch(resumed.train, step, **batch),
                              data.train_batch(full.train, step, **batch))
    assert np.array_equal(np.asarray(resumed.heldout), np.asarray(full.heldout))
    assert resumed.heldout_bytes == full.heldout_bytes

    counter[0] = 0  # a complete folder is opened, not prepared
    data.load_corpus(config, tmp_path / "resumed", min_tokens=65, shard_tokens=shard_tokens)
    assert counter[0] == 0


def test_a_temporary_file_left_by_a_killed_preparation_is_removed_when_it_resumes(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    path, _ = text_source(tmp_path)
    config = data_config(path)
    full = data.prepare(config, tmp_path / "full", shard_tokens=6_000)
    folder = interrupted_preparation(config, tmp_path / "resumed", monkeypatch, shard_tokens=6_000)
    # killed while writing the third shard: half of it under write_atomically's temporary name, beside it
    third = (full / "train-00002.npy").read_bytes()
    fd, leftover = tempfile.mkstemp(dir=folder, prefix=".train-00002.npy.", suffix=token_files.TEMPORARY_SUFFIX)
    os.write(fd, third[:len(third) // 2])
    os.close(fd)

    assert data.prepare(config, tmp_path / "resumed", shard_tokens=6_000) == folder
    assert not Path(leftover).exists() and not list(folder.glob("*.tmp"))
    assert folder_files(folder) == folder_files(full)  # byte-identical, hidden files included


def record_reads(monkeypatch) -> list[tuple[str, int, int]]:
    """(file name, offset, bytes) of every read of a source file by mqa.data.sources from now on."""
    reads = []

    class Recorded(io.FileIO):
        def read(self, size=-1):
            offset = self.tell()
            block = super().read(size)
            reads.append((Path(self.name).name, offset, len(block)))
            return block

    monkeypatch.setattr(sources, "open", lambda file, mode: Recorded(file), raising=False)
    return reads


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_a_resumed_preparation_of_text_files_reads_them_only_from_where_its_shards_end(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    text = words_text(60_000).replace("of", "öf")  # characters of 1 and 2 bytes
    folder = tmp_path / "texts"
    folder.mkdir()
    for i, start in enumerate(range(0, len(text), 12_500)):
        (folder / f"{i:02d}.txt").write_bytes(text[start:start + 12_500].encode())
    sizes = [f.stat().st_size for f in sorted(folder.iterdir())]
    config = data_config(folder, tokenizer=tokenizer, bpe_vocab_size=300)
    full = data.prepare(config, tmp_path / "full", shard_tokens=6_000)
    resumed = interrupted_preparation(config, tmp_path / "resumed", monkeypatch, shard_tokens=6_000, shards=3)
    progress = json.loads((resumed / token_files.PROGRESS_FILE).read_text())
    offset, _, _ = token_files.resume_position(progress["splits"], progress["next_piece"])
    assert sizes[0] < offset < sum(sizes[:-2])  # in a later file, with two more to go

    reads = record_reads(monkeypatch)
    assert data.prepare(config, tmp_path / "resumed", shard_tokens=6_000) == resumed
    assert folder_files(resumed) == folder_files(full)
    starts = dict(zip((f"{i:02d}.txt" for i in range(len(sizes))), np.cumsum([0, *sizes])))
    read = [(starts[name] + at, length) for name, at, length in reads if length]  # in the files concatenated
    assert read[0][0] == offset and sum(length for _, length in read) == sum(sizes) - offset  # from there, once
    assert all(a + n == b for (a, n), (b, _) in zip(read, read[1:]))


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_text_file_keeps_its_tail_split_across_many_shards(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "BLOCK_BYTES", 4096)
    path, text = text_source(tmp_path)
    corpus = data.load_corpus(data_config(path, tokenizer=tokenizer, bpe_vocab_size=300), tmp_path / "c",
                              min_tokens=1, shard_tokens=5_000)
    assert len(list((tmp_path / "c").rglob("train-*.npy"))) >= 3
    cut = len(text) - round(len(text) * 0.1)  # characters (all ASCII here, so also bytes)
    assert corpus.tokenizer.decode(np.asarray(corpus.train)) == text[:cut]
    assert corpus.tokenizer.decode(np.asarray(corpus.heldout)) == text[cut:]
    assert np.array_equal(np.asarray(corpus.train), corpus.tokenizer.encode(text[:cut]))
    assert corpus.heldout_bytes == len(text) - cut


# ----------------------------------------------------------------------------- held-out documents


def test_heldout_documents_never_appear_in_training_windows(tmp_path):
    texts = documents(300)
    corpus = data.load_corpus(data_config(write_jsonl(tmp_path / "d.jsonl", texts)), tmp_path / "c", min_tokens=65)
    train = corpus.tokenizer.decode(np.asarray(corpus.train))
    heldout = corpus.tokenizer.decode(np.asarray(corpus.heldout))
    heldout_docs = [t for t in texts if t + "\n" in heldout]
    train_docs = [t for t in texts if t not in heldout_docs]
    assert heldout == "".join(t + "\n" for t in heldout_docs)  # whole documents, in order
    assert train == "".join(t + "\n" for t in train_docs)
    assert len(heldout_docs) == 30 and 0.05 < len(heldout) / (len(heldout) + len(train)) < 0.15
    assert [texts.index(t) for t in heldout_docs] == list(range(9, 300, 10))  # every 10th, whatever its length
    markers = [t.split(":")[0] for t in heldout_docs]
    assert not any(marker in train for marker in markers)
    for step in range(50):
        for window in data.train_batch(corpus.train, step, seed=0, batch_size=16, seq_len=64,
                                       sampling="permutation"):
            assert not any(marker in corpus.tokenizer.decode(window) for marker in markers)


@pytest.mark.parametrize("has_validation", [True, False])
def test_hub_dataset_streams_and_holds_out_its_validation_split(has_validation, tmp_path, monkeypatch):
    import datasets

    splits = {"train": documents(50, seed=1), "validation": documents(8, seed=2)}
    if not has_validation:  # then every 10th train document is held out
        splits = {"train": splits["train"]}
    calls = []

    def load_dataset(name, config=None, *, streaming=False, **kwargs):
        calls.append((name, config, streaming))
        return datasets.IterableDatasetDict({
            split: datasets.IterableDataset.from_generator(lambda texts=texts: ({"text": t} for t in texts))
            for split, texts in splits.items()})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    corpus = data.load_corpus(data_config(hf_name="some/dataset", hf_config="cfg"), tmp_path / "c", min_tokens=1)
    assert calls and all(call == ("some/dataset", "cfg", True) for call in calls)
    if has_validation:
        train, heldout = splits["train"], splits["validation"]
    else:
        train = [t for i, t in enumerate(splits["train"]) if i % 10 != 9]
        heldout = splits["train"][9::10]
    assert corpus.tokenizer.decode(np.asarray(corpus.train)) == "".join(t + "\n" for t in train)
    assert corpus.tokenizer.decode(np.asarray(corpus.heldout)) == "".join(t + "\n" for t in heldout)


def test_parquet_files_read_the_configured_text_column(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [t.replace("\n", " ") for t in documents(40)]  # one line each
    folder = tmp_path / "parquet"
    folder.mkdir()
    for i in range(2):
        pq.write_table(pa.table({"body": texts[i * 20:(i + 1) * 20], "n": list(range(20))}), folder / f"part{i}.parquet")
    corpus = data.load_corpus(data_config(folder, text_column="body", heldout_fraction=0.2), tmp_path / "c", min_tokens=1)
    both = corpus.tokenizer.decode(np.asarray(corpus.train)) + corpus.tokenizer.decode(np.asarray(corpus.heldout))
    assert sorted(both.splitlines()) == sorted(texts)


# ----------------------------------------------------------------------------- tokenizers and dtypes


def test_bpe_learns_only_from_the_first_bpe_train_bytes(tmp_path):
    head = words_text(20_000)
    word = " Zqxjvkw"
    text = head + word * 3_000 + "\n" + words_text(1_000, seed=3)  # the word is in the train split
    (tmp_path / "a.txt").write_text(text)
    bounded = data.load_corpus(data_config(tmp_path / "a.txt", tokenizer="bpe", bpe_vocab_size=300,
                                           bpe_train_bytes=len(head)), tmp_path / "one", min_tokens=1)
    unbounded = data.load_corpus(data_config(tmp_path / "a.txt", tokenizer="bpe", bpe_vocab_size=300),
                                 tmp_path / "two", min_tokens=1)
    assert len(bounded.tokenizer.encode(word)) > 2
    assert len(unbounded.tokenizer.encode(word)) == 1


def wordlevel_tokenizer_file(path: Path, vocab_size: int) -> Path:
    import tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size - 1)} | {"[UNK]": vocab_size - 1}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(path))
    return path


@pytest.mark.parametrize("tokenizer, dtype", [("byte", np.uint8), ("bpe", np.uint16), ("wordlevel-70000", np.uint32)])
def test_token_files_use_the_smallest_dtype_and_keep_every_id(tokenizer, dtype, tmp_path):
    if tokenizer.startswith("wordlevel"):
        ids = np.random.default_rng(0).integers(0, 69_999, 5_000)
        ids[:3] = [69_998, 65_536, 0]  # beyond uint16
        (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in ids) + "\n")
        tokenizer = str(wordlevel_tokenizer_file(tmp_path / "tokenizer.json", 70_000))
    else:
        (tmp_path / "a.txt").write_text(words_text(5_000))
    corpus = data.load_corpus(data_config(tmp_path / "a.txt", tokenizer=tokenizer, bpe_vocab_size=300),
                              tmp_path / "c", min_tokens=1)
    [folder] = (tmp_path / "c").iterdir()
    assert json.loads((folder / "index.json").read_text())["dtype"] == np.dtype(dtype).name
    shards = sorted(folder.glob("*-0*.npy"))
    assert shards and all(np.load(shard).dtype == dtype for shard in shards)
    text = (tmp_path / "a.txt").read_text()
    both = np.concatenate([np.asarray(corpus.train), np.asarray(corpus.heldout)])
    if dtype == np.uint32:  # the library's own encoding of each split (the tail cut may split a word)
        import tokenizers

        reference = tokenizers.Tokenizer.from_file(tokenizer)
        cut = len(text) - round(len(text) * 0.1)
        assert corpus.train[0] == 69_998 and corpus.train[1] == 65_536
        assert both.tolist() == reference.encode(text[:cut]).ids + reference.encode(text[cut:]).ids
    else:
        assert corpus.tokenizer.decode(both) == text


def test_token_dir_is_shared_by_runs(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(words_text(5_000))
    config = data_config(tmp_path / "a.txt", token_dir=str(tmp_path / "shared"))
    first = data.load_corpus(config, tmp_path / "run1" / "data", min_tokens=1)
    assert (tmp_path / "shared").is_dir() and not (tmp_path / "run1").exists()
    counter = count_encoded_pieces(monkeypatch)
    second = data.load_corpus(config, tmp_path / "run2" / "data", min_tokens=1)
    assert counter[0] == 0 and np.array_equal(np.asarray(first.train), np.asarray(second.train))


# ----------------------------------------------------------------------------- rows without text


def jsonl_with_rows_without_text(path: Path) -> tuple[Path, list[str]]:
    """A .jsonl file whose rows 3 and 7 have no text (missing, null); returns it and the texts kept."""
    texts = [t.replace("\n", " ") for t in documents(12)]  # one line each
    rows = [{"id": i, "text": t} for i, t in enumerate(texts)]
    del rows[3]["text"]
    rows[7]["text"] = None
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, [t for i, t in enumerate(texts) if i not in (3, 7)]


def test_rows_without_text_are_dropped_counted_reported_and_recorded(tmp_path, capsys):
    path, kept = jsonl_with_rows_without_text(tmp_path / "d.jsonl")
    corpus = data.load_corpus(data_config(path), tmp_path / "c", min_tokens=1)
    both = corpus.tokenizer.decode(np.asarray(corpus.train)) + corpus.tokenizer.decode(np.asarray(corpus.heldout))
    assert sorted(both.splitlines()) == sorted(kept)
    assert corpus.dropped_rows == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "dropped 2 rows without a 'text' value: 2 in file" in err[0] and "d.jsonl" in err[0]
    [index] = (tmp_path / "c").glob("tokens-*/index.json")
    assert json.loads(index.read_text())["dropped_rows"] == {f"file {str(path)!r}": 2}
    data.load_corpus(data_config(path), tmp_path / "c", min_tokens=1)  # opened, not prepared: no report
    assert capsys.readouterr().err == ""
    # data.strict refuses the folder that was prepared without them, too
    with pytest.raises(data.DataError, match=r"prepared without 2 rows .*data.strict=true refuses it") as error:
        data.load_corpus(data_config(path, strict=True), tmp_path / "c", min_tokens=1)
    assert "\n" not in str(error.value)


def test_strict_data_makes_rows_without_text_an_error_naming_the_file_and_count(tmp_path):
    path, _ = jsonl_with_rows_without_text(tmp_path / "d.jsonl")
    with pytest.raises(data.DataError) as error:
        data.load_corpus(data_config(path, strict=True), tmp_path / "c", min_tokens=1)
    message = str(error.value)
    assert "\n" not in message and "d.jsonl" in message and "has 2 of 12 rows without a 'text' value" in message
    assert "data.strict=true" in message
    assert not list((tmp_path / "c").glob("tokens-*/index.json"))  # nothing half-prepared looks complete


def test_a_source_without_dropped_rows_writes_no_dropped_rows_field(tmp_path):
    corpus = data.load_corpus(data_config(write_jsonl(tmp_path / "d.jsonl", documents(20))), tmp_path / "c",
                              min_tokens=1)
    [index] = (tmp_path / "c").glob("tokens-*/index.json")
    assert "dropped_rows" not in json.loads(index.read_text()) and corpus.dropped_rows == 0


# ----------------------------------------------------------------------------- errors


def test_an_unreadable_file_in_a_folder_is_named(tmp_path, monkeypatch):
    folder = tmp_path / "texts"
    folder.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (folder / name).write_text(words_text(200))
    if os.getuid() != 0:
        (folder / "b.txt").chmod(0)
    else:  # root reads any file: refuse this one as the kernel would for anyone else
        def refuse_b(file, *args, **kwargs):
            if Path(file).name == "b.txt":
                raise PermissionError(13, "Permission denied", str(file))
            return open(file, *args, **kwargs)

        monkeypatch.setattr(sources, "open", refuse_b, raising=False)
    with pytest.raises(data.DataError, match=r"cannot read file '.*texts/b.txt': Permission denied") as error:
        data.load_corpus(data_config(folder), tmp_path / "cache", min_tokens=1)
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------- memory and the command line


MEMORY_CHILD = textwrap.dedent("""
    import json, resource, sys
    import ml_collections
    from mqa import data

    def address_space():  # bytes of virtual memory this process maps now
        return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()

    mode, path, cache, headroom = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    limit = address_space() + headroom
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if mode == "in-memory":  # what the previous version did: the whole text, then int32 ids
        tokens = data.ByteTokenizer().encode(open(path, "rb").read())
    else:
        config = ml_collections.ConfigDict(dict(path=path, hf_name="", hf_config="", tokenizer="byte",
                                                bpe_vocab_size=1024, heldout_fraction=0.1))
        index = json.loads((data.prepare(config, cache) / "index.json").read_text())
        print(sum(shard["tokens"] for shards in index["splits"].values() for shard in shards))
""")


def test_preparing_a_corpus_larger_than_the_memory_limit(tmp_path):
    """200 MB of text prepared under an address-space limit of 128 MB above what the imports map;
    reading the text whole and converting it to int32 ids, as before, fails under the same limit."""
    corpus_bytes, headroom = 200 << 20, 128 << 20
    block = words_text(200_000).encode()
    with open(tmp_path / "big.txt", "wb") as f:
        for _ in range(corpus_bytes // len(block)):
            f.write(block)
    size = (tmp_path / "big.txt").stat().st_size
    assert size > headroom

    def child(mode):
        return subprocess.run([sys.executable, "-c", MEMORY_CHILD, mode, str(tmp_path / "big.txt"),
                               str(tmp_path / "cache"), str(headroom)],
                              capture_output=True, text=True, cwd=REPO, timeout=120)

    streamed = child("streamed")
    assert streamed.returncode == 0, streamed.stderr[-2000:]
    assert int(streamed.stdout.split()[-1]) == size
    corpus = data.load_corpus(data_config(tmp_path / "big.txt"), tmp_path / "cache", min_tokens=1)  # no limit here
    assert np.array_equal(corpus.train[:len(block)], np.frombuffer(block, np.uint8))  # the file starts with it
    in_memory = child("in-memory")  # control: the limit does bite
    assert in_memory.returncode != 0 and "MemoryError" in in_memory.stderr


def test_prepare_command_writes_token_files_then_reports_bad_input_in_one_line(tmp_path):
    """The command prepares a .jsonl corpus printing only its report (and the dropped rows' line: no
    log lines, e.g. absl's "JAX version ... available" from `datasets`); bad data exits 2 in one line."""
    path, _ = jsonl_with_rows_without_text(tmp_path / "a.jsonl")
    command = [sys.executable, "-m", "mqa.data", "prepare", "--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}",
               "--config.train.seq_len=16"]
    result = subprocess.run([*command, f"--config.data.path={path}"], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "a.jsonl" in result.stdout and "train /" in result.stdout
    assert [line for line in result.stderr.splitlines() if line.strip()] == [
        line for line in result.stderr.splitlines() if line.startswith("warning: ") and "dropped 2 rows" in line], result.stderr
    [index] = (tmp_path / "run" / "data").glob("tokens-*/index.json")
    assert json.loads(index.read_text())["dtype"] == "uint8"
    bad = subprocess.run([*command, f"--config.data.path={tmp_path / 'missing.txt'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0
    assert "missing.txt" in bad.stderr and "does not exist" in bad.stderr

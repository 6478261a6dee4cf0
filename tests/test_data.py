"""Tests for mqa/data/: tokenizers, sources, split, token cache, batches and error messages."""

import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from mqa import data

SHAKESPEARE = Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt"
NON_ASCII = "naïve café, Ελληνικά, 日本語, emoji 🙂, tabs\tand\r\nCRLF, NUL \x00, soft\u00adhyphen, nbsp\u00a0."


def data_config(path="", **overrides) -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict(
        dict(path=str(path), hf_name="", hf_config="", tokenizer="byte", bpe_vocab_size=1024, heldout_fraction=0.1)
    )
    config.update(overrides)
    return config


def pydoc_text() -> str:
    """The embedded default corpus, rebuilt here independently of mqa.data."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


@pytest.fixture(scope="module")
def small_bpe() -> data.BpeTokenizer:
    return data.BpeTokenizer.train(pydoc_text()[:200_000], vocab_size=512)


def load(path, tmp_path, min_tokens=1, **overrides) -> data.Corpus:
    return data.load_corpus(data_config(path, **overrides), tmp_path / "cache", min_tokens=min_tokens)


def corpus_bytes(corpus: data.Corpus) -> tuple[bytes, bytes]:
    return corpus.tokenizer.decode_bytes(corpus.train), corpus.tokenizer.decode_bytes(corpus.heldout)


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_any_bytes():
    tokenizer = data.ByteTokenizer()
    raw = bytes(range(256)) + b"\xff\xfe invalid \xc3( utf-8 \x80\r\n\r"
    ids = tokenizer.encode(raw)
    assert tokenizer.vocab_size == 256
    assert ids.dtype == np.int32 and ids.tolist() == list(raw)
    assert tokenizer.decode_bytes(ids) == raw
    assert tokenizer.encode(NON_ASCII).tolist() == list(NON_ASCII.encode("utf-8"))
    assert tokenizer.decode(tokenizer.encode(NON_ASCII)) == NON_ASCII
    assert tokenizer.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"


def test_byte_corpus_round_trips_binary_file(tmp_path):
    raw = bytes(range(256)) + np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes() + b"\r\n\r"
    (tmp_path / "blob.bin").write_bytes(raw)
    corpus = load(tmp_path / "blob.bin", tmp_path, tokenizer="byte")
    train, heldout = corpus_bytes(corpus)
    assert train + heldout == raw
    assert corpus.train.dtype == np.int32 and corpus.heldout.dtype == np.int32
    assert corpus.heldout_bytes == len(heldout)
    assert "blob.bin" in corpus.source and f"{len(raw):,} bytes" in corpus.source


def test_bpe_round_trips_utf8_text(small_bpe):
    assert 256 < small_bpe.vocab_size <= 512
    for text in [NON_ASCII, pydoc_text()[250_000:260_000], ""]:
        ids = small_bpe.encode(text)
        assert ids.dtype == np.int32 and ((0 <= ids) & (ids < small_bpe.vocab_size)).all()
        assert small_bpe.decode(ids) == text
        assert small_bpe.decode_bytes(ids) == text.encode("utf-8")
    assert small_bpe.encode(NON_ASCII.encode("utf-8")).tolist() == small_bpe.encode(NON_ASCII).tolist()


def test_bpe_decode_bytes_agrees_with_the_library_decoder(small_bpe):
    ids = small_bpe.encode(NON_ASCII + pydoc_text()[:3000])
    assert small_bpe.decode_bytes(ids).decode("utf-8") == small_bpe._tokenizer.decode(ids.tolist())
    # token by token, even where a token ends inside a multi-byte character, the bytes stay exact
    ids = small_bpe.encode("日本🙂")
    assert b"".join(small_bpe.decode_bytes([i]) for i in ids) == "日本🙂".encode("utf-8")


def test_bpe_compresses_tinyshakespeare(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not present")
    raw = SHAKESPEARE.read_bytes()
    corpus = load(SHAKESPEARE, tmp_path, tokenizer="bpe", bpe_vocab_size=1024, min_tokens=257)
    assert isinstance(corpus.tokenizer, data.BpeTokenizer) and corpus.tokenizer.vocab_size <= 1024
    assert len(corpus.train) + len(corpus.heldout) < 0.5 * len(raw)
    train, heldout = corpus_bytes(corpus)
    assert train + heldout == raw
    assert corpus.heldout_bytes == len(heldout)


def test_bpe_is_trained_on_the_train_split_only(tmp_path):
    train_text = pydoc_text()[:40_000]
    word = " Zqxjvkw"
    heldout_text = (word * (len(train_text) // len(word) + 1))[: len(train_text)]
    (tmp_path / "text.txt").write_text(train_text + heldout_text)
    corpus = load(tmp_path / "text.txt", tmp_path, tokenizer="bpe", bpe_vocab_size=400, heldout_fraction=0.5)
    assert corpus.tokenizer.decode(corpus.heldout) == heldout_text
    assert len(corpus.tokenizer.encode(word)) > 2
    # control: the same training on all of the text does learn the word as one token
    assert len(data.BpeTokenizer.train(train_text + heldout_text, 400).encode(word)) == 1


@pytest.mark.parametrize("name", ["byte", "bpe"])
def test_tokenizer_save_and_load_give_identical_encodings(name, small_bpe, tmp_path):
    tokenizer = data.ByteTokenizer() if name == "byte" else small_bpe
    tokenizer.save(tmp_path)
    restored = data.load_tokenizer(tmp_path)
    assert type(restored) is type(tokenizer) and restored.name == tokenizer.name
    assert restored.vocab_size == tokenizer.vocab_size
    assert restored.encode(NON_ASCII).tolist() == tokenizer.encode(NON_ASCII).tolist()


def test_load_tokenizer_names_the_directory_when_none_saved(tmp_path):
    with pytest.raises(data.DataError, match="nothing-here"):
        data.load_tokenizer(tmp_path / "nothing-here")


def test_decode_rejects_ids_outside_the_vocabulary(small_bpe):
    with pytest.raises(data.DataError, match="256"):
        data.ByteTokenizer().decode_bytes([1, 256])
    with pytest.raises(data.DataError, match="-1"):
        small_bpe.decode_bytes([-1])


def test_line_chunks_cut_after_newlines_whether_the_text_comes_whole_or_in_blocks():
    text = "".join(f"line {i} " * (i % 7) + "\n" for i in range(3000))
    whole = list(data.line_chunks(text, size=100))
    assert "".join(whole) == text and all(piece.endswith("\n") for piece in whole)
    assert all(100 <= len(piece) for piece in whole[:-1])
    for block in (1, 37, 1000, len(text)):  # any blocking of the same text gives the same pieces
        blocks = (text[i:i + block] for i in range(0, len(text), block))
        assert list(data.line_chunks(blocks, size=100)) == whole
    # without newlines, a limit bounds the pieces; without one, the rest is one piece
    flat = "x" * 1050
    assert [len(p) for p in data.line_chunks(iter([flat[:500], flat[500:]]), size=100, limit=300)] == [300, 300, 300, 150]
    assert list(data.line_chunks(flat, size=100)) == [flat]
    assert list(data.line_chunks("")) == []


# ----------------------------------------------------------------------------- sources and split


def test_split_is_the_contiguous_tail_fraction(tmp_path):
    raw = bytes(np.random.default_rng(1).integers(32, 127, 1000, dtype=np.uint8))
    (tmp_path / "a.txt").write_bytes(raw)
    train, heldout = corpus_bytes(load(tmp_path / "a.txt", tmp_path, heldout_fraction=0.25))
    assert train + heldout == raw and len(heldout) == 250


def test_bpe_split_counts_characters_not_bytes(tmp_path):
    text = "ü" * 600 + "abc" * 200  # 1,200 characters, 1,800 bytes
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    corpus = load(tmp_path / "a.txt", tmp_path, tokenizer="bpe", bpe_vocab_size=300, heldout_fraction=0.5)
    train, heldout = corpus.tokenizer.decode(corpus.train), corpus.tokenizer.decode(corpus.heldout)
    assert train == "ü" * 600 and heldout == "abc" * 200
    assert corpus.heldout_bytes == 600


def test_folder_concatenates_its_files_in_name_order(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, content in [("b.txt", b"BBBB"), ("10.txt", b"1010"), ("a.txt", b"AAAA"), ("c.bin", b"\xffC\r\n")]:
        (folder / name).write_bytes(content * 50)
    (folder / "subfolder").mkdir()
    (folder / "subfolder" / "0.txt").write_bytes(b"ignored")
    corpus = load(folder, tmp_path)
    train, heldout = corpus_bytes(corpus)
    assert train + heldout == b"1010" * 50 + b"AAAA" * 50 + b"BBBB" * 50 + b"\xffC\r\n" * 50
    assert "4 files" in corpus.source


def test_default_corpus_is_pydoc_text_and_deterministic(tmp_path):
    first = data.load_corpus(data_config(), tmp_path / "one", min_tokens=1025)
    second = data.load_corpus(data_config(), tmp_path / "two", min_tokens=1025)
    train, heldout = corpus_bytes(first)
    assert train + heldout == pydoc_text().encode("utf-8")
    assert len(train) + len(heldout) > 100_000
    assert np.array_equal(first.train, second.train) and np.array_equal(first.heldout, second.heldout)
    assert "documentation" in first.source


# ----------------------------------------------------------------------------- token cache


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_second_load_reads_the_cache_without_tokenizing(tokenizer, tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text(pydoc_text()[:30_000])
    first = load(tmp_path / "a.txt", tmp_path, tokenizer=tokenizer, bpe_vocab_size=300)

    def fail(*args, **kwargs):
        raise AssertionError("re-tokenized although the cache was valid")

    for name in ["encode", "train"]:
        monkeypatch.setattr(data.ByteTokenizer, name, fail, raising=False)
        monkeypatch.setattr(data.BpeTokenizer, name, fail)
    second = load(tmp_path / "a.txt", tmp_path, tokenizer=tokenizer, bpe_vocab_size=300)
    assert np.array_equal(first.train, second.train) and np.array_equal(first.heldout, second.heldout)
    assert second.heldout_bytes == first.heldout_bytes and second.source == first.source
    assert type(second.tokenizer) is type(first.tokenizer)


def test_cache_is_invalidated_when_the_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_bytes(b"old text " * 100)
    assert corpus_bytes(load(path, tmp_path))[0].startswith(b"old text")
    path.write_bytes(b"new words " * 120)
    train, heldout = corpus_bytes(load(path, tmp_path))
    assert train + heldout == b"new words " * 120


def test_cache_is_keyed_by_tokenizer_and_fraction(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(pydoc_text()[:20_000])
    byte = load(path, tmp_path, heldout_fraction=0.1)
    other_fraction = load(path, tmp_path, heldout_fraction=0.2)
    bpe = load(path, tmp_path, tokenizer="bpe", bpe_vocab_size=300)
    assert len(other_fraction.heldout) == 2 * len(byte.heldout)
    assert isinstance(bpe.tokenizer, data.BpeTokenizer) and len(bpe.train) < len(byte.train)


# ----------------------------------------------------------------------------- batches


def occurs_in(row: np.ndarray, tokens: np.ndarray) -> bool:
    return bool((sliding_window_view(tokens, len(row)) == row).all(axis=1).any())


@pytest.mark.parametrize("sampling", data.SAMPLINGS)
def test_train_batch_is_a_function_of_seed_and_step(sampling):
    tokens = np.random.default_rng(0).integers(0, 1000, 500).astype(np.int32)
    batch = data.train_batch(tokens, 7, seed=3, batch_size=8, seq_len=16, sampling=sampling)
    assert batch.shape == (8, 17) and batch.dtype == np.int32
    assert np.array_equal(batch, data.train_batch(tokens, 7, seed=3, batch_size=8, seq_len=16, sampling=sampling))
    assert not np.array_equal(batch, data.train_batch(tokens, 8, seed=3, batch_size=8, seq_len=16, sampling=sampling))
    assert not np.array_equal(batch, data.train_batch(tokens, 7, seed=4, batch_size=8, seq_len=16, sampling=sampling))
    assert all(occurs_in(row, tokens) for row in batch)


@pytest.mark.parametrize("sampling", data.SAMPLINGS)
def test_train_batch_rows_split_the_same_batch_across_hosts(sampling):
    tokens = np.random.default_rng(0).integers(0, 1000, 500).astype(np.int32)
    batch = dict(seed=0, batch_size=8, seq_len=16, sampling=sampling)
    full = data.train_batch(tokens, 11, **batch)
    hosts = 4
    parts = [data.train_batch(tokens, 11, **batch, rows=slice(p * 8 // hosts, (p + 1) * 8 // hosts))
             for p in range(hosts)]
    assert all(part.shape == (2, 17) for part in parts)
    assert np.array_equal(np.concatenate(parts), full)


@pytest.mark.parametrize("sampling", data.SAMPLINGS)
def test_train_batch_reaches_every_valid_start_and_no_other(sampling):
    tokens = np.arange(20, dtype=np.int32)  # a window's first token is its start
    starts = {int(row[0]) for step in range(200)
              for row in data.train_batch(tokens, step, seed=0, batch_size=8, seq_len=4, sampling=sampling)}
    assert starts == set(range(16))


def test_eval_windows_predict_each_token_once():
    tokens = np.arange(23, dtype=np.int32) * 3
    windows = data.eval_windows(tokens, 5)
    assert windows.dtype == np.int32
    assert windows.tolist() == [list(tokens[s : s + 6]) for s in (0, 5, 10, 15)]  # 20..22 is partial: dropped
    targets = windows[:, 1:].reshape(-1)
    assert targets.tolist() == tokens[1:21].tolist()  # each once, in order
    assert np.array_equal(windows[1:, 0], windows[:-1, -1])  # consecutive windows share a boundary token


def test_eval_windows_with_stride_overlap():
    tokens = np.arange(12, dtype=np.int32)
    windows = data.eval_windows(tokens, 5, stride=2)
    assert windows.tolist() == [list(range(s, s + 6)) for s in (0, 2, 4, 6)]
    assert data.eval_windows(tokens, 11).tolist() == [list(range(12))]


def test_batches_reject_too_few_tokens():
    tokens = np.arange(16, dtype=np.int32)
    with pytest.raises(data.DataError, match="16 tokens"):
        data.train_batch(tokens, 0, seed=0, batch_size=2, seq_len=16, sampling="permutation")
    with pytest.raises(data.DataError, match="16 held-out tokens"):
        data.eval_windows(tokens, 16)
    with pytest.raises(data.DataError, match="stride=9"):
        data.eval_windows(tokens, 8, stride=9)


# ----------------------------------------------------------------------------- errors


def make_missing(tmp_path):
    return data_config(tmp_path / "missing.txt"), "missing.txt"


def make_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    return data_config(tmp_path / "empty.txt"), "empty.txt"


def make_empty_folder(tmp_path):
    (tmp_path / "hollow").mkdir()
    return data_config(tmp_path / "hollow"), "hollow"


def make_short_heldout(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"x" * 2000)
    return data_config(tmp_path / "short.txt"), "held-out split of file .*short.txt.* has 200 tokens; need at least 257"


def make_short_train(tmp_path):
    (tmp_path / "short.txt").write_bytes(b"x" * 400)
    return data_config(tmp_path / "short.txt", heldout_fraction=0.5), "train split .* has 200 tokens"


def make_unknown_tokenizer(tmp_path):
    return data_config(tokenizer="wordpiece"), ("data.tokenizer='wordpiece' is neither one of 'byte', "
                                                "'bpe' nor a tokenizer.json file or a folder holding one")


def make_bpe_not_utf8(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café ".encode("latin-1") * 100)
    return data_config(tmp_path / "latin1.txt", tokenizer="bpe"), "latin1.txt.*0xe9.*data.tokenizer=byte"


def make_small_vocab(tmp_path):
    return data_config(tokenizer="bpe", bpe_vocab_size=100), "bpe_vocab_size=100 .*257"


def make_bad_fraction(fraction):
    def make(tmp_path):
        return data_config(heldout_fraction=fraction), f"heldout_fraction={fraction} .*0 < fraction < 1"

    make.__name__ = f"make_heldout_fraction_{fraction}"
    return make


def make_jsonl_without_text_column(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": 0, "content": "a"}\n{"id": 1, "content": "b"}\n')
    return data_config(tmp_path / "d.jsonl"), r"d.jsonl.* has no 'text' column; it has \['content', 'id'\]"


def make_damaged_parquet(tmp_path):
    folder = tmp_path / "pq"
    folder.mkdir()
    (folder / "part0.parquet").write_bytes(b"PAR1 this is not parquet")
    return data_config(folder), "cannot read file .*part0.parquet"


def make_unparsable_jsonl(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    return data_config(tmp_path / "d.jsonl"), "cannot read file .*d.jsonl"


def make_mixed_folder(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "a.jsonl").write_text('{"text": "x"}\n')
    (folder / "b.txt").write_text("y" * 400)
    return data_config(folder), "mixes document files \\(a.jsonl\\) and plain text \\(b.txt\\)"


def make_bad_bpe_train_bytes(tmp_path):
    return data_config(tokenizer="bpe", bpe_train_bytes=-5), "data.bpe_train_bytes=-5 must be at least 1"


@pytest.mark.parametrize(
    "make",
    [
        make_missing,
        make_empty_file,
        make_empty_folder,
        make_short_heldout,
        make_short_train,
        make_unknown_tokenizer,
        make_bpe_not_utf8,
        make_small_vocab,
        make_bad_fraction(0.0),
        make_bad_fraction(1.0),
        make_bad_fraction(1.5),
        make_jsonl_without_text_column,
        make_damaged_parquet,
        make_unparsable_jsonl,
        make_mixed_folder,
        make_bad_bpe_train_bytes,
    ],
    ids=lambda make: make.__name__.removeprefix("make_"),
)
def test_bad_data_input_raises_one_line_data_error(make, tmp_path):
    config, pattern = make(tmp_path)
    with pytest.raises(data.DataError, match=pattern) as error:
        data.load_corpus(config, tmp_path / "cache", min_tokens=257)
    assert "\n" not in str(error.value)


def test_unreachable_hub_dataset_raises_data_error_fast(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    # the env vars are read at import time, so also switch the already-imported modules offline
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = data_config(hf_name="mqa-tests/no-such-dataset", hf_config="nope")
    start = time.monotonic()
    with pytest.raises(data.DataError, match="'mqa-tests/no-such-dataset' \\(config 'nope'\\).*data.path") as error:
        data.load_corpus(config, tmp_path / "cache", min_tokens=1)
    assert time.monotonic() - start < 10
    assert "\n" not in str(error.value)

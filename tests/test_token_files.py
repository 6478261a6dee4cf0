"""Tests for mqa/token_files.py: dtype choice, shard writing and reading a split across shards."""

import numpy as np
import pytest

from mqa import data, token_files


@pytest.mark.parametrize("vocab_size, dtype", [(2, np.uint8), (256, np.uint8), (257, np.uint16), (1024, np.uint16),
                                               (65_536, np.uint16), (65_537, np.uint32), (2**32, np.uint32)])
def test_token_dtype_is_the_smallest_unsigned_dtype_holding_the_vocabulary(vocab_size, dtype):
    assert token_files.token_dtype(vocab_size) == dtype
    assert np.iinfo(dtype).max >= vocab_size - 1  # the largest id fits


def test_token_dtype_rejects_vocabularies_beyond_uint32():
    with pytest.raises(ValueError, match="4294967297"):
        token_files.token_dtype(2**32 + 1)


def write_shards(folder, lengths, seed=0, vocab_size=1000):
    """Shards of the given lengths (uint16) and their index; returns the ids concatenated: int32 [sum(lengths)]."""
    ids = np.random.default_rng(seed).integers(0, vocab_size, sum(lengths)).astype(np.int32)
    writer = token_files.ShardWriter(folder, "train", np.dtype(np.uint16), shard_tokens=1, written=[])
    offsets = np.cumsum([0, *lengths])
    for i, (start, stop) in enumerate(zip(offsets[:-1], offsets[1:])):
        writer.add(i, ids[start:stop], num_bytes=int(stop - start))  # shard_tokens=1: a shard per piece
    writer.finish(end=len(lengths))
    empty = token_files.ShardWriter(folder, "heldout", np.dtype(np.uint16), shard_tokens=1, written=[])
    token_files.write_index(folder, vocab_size, 1, {"train": writer, "heldout": empty})
    return ids


def test_stream_reads_across_shard_boundaries_like_the_concatenation(tmp_path):
    lengths = [5, 1, 7, 3, 1, 9]
    reference = write_shards(tmp_path, lengths)
    stream = token_files.TokenStream.open(tmp_path, "train")
    assert len(stream) == len(reference) == 26 and stream.shape == (26,)
    assert stream.file_dtype == np.uint16 and stream.dtype == np.int32
    assert len(list(tmp_path.glob("train-*.npy"))) == len(lengths)
    for start in range(len(reference) + 1):
        for stop in range(start, len(reference) + 1):
            got = stream.read(start, stop)
            assert got.dtype == np.int32 and np.array_equal(got, reference[start:stop]), (start, stop)
    assert np.array_equal(np.asarray(stream), reference)
    assert np.array_equal(stream[3:20], reference[3:20]) and np.array_equal(stream[::3], reference[::3])
    assert stream[-1] == reference[-1] and stream[6] == reference[6]
    with pytest.raises(IndexError):
        stream.read(20, 27)
    assert len(token_files.TokenStream.open(tmp_path, "heldout")) == 0


def test_windows_and_batches_over_shards_equal_those_of_the_array_in_memory(tmp_path):
    reference = write_shards(tmp_path, [37, 2, 64, 1, 50, 90])
    stream = token_files.TokenStream.open(tmp_path, "train")
    starts = np.arange(len(reference) - 16)
    assert np.array_equal(token_files.read_windows(stream, starts, 17), token_files.read_windows(reference, starts, 17))
    for step in range(20):
        for sampling in ("permutation", "uniform"):
            batch = data.train_batch(stream, step, seed=5, batch_size=8, seq_len=16, sampling=sampling)
            assert batch.dtype == np.int32 and np.array_equal(
                batch, data.train_batch(reference, step, seed=5, batch_size=8, seq_len=16, sampling=sampling))
    assert np.array_equal(data.eval_windows(stream, 16, stride=5), data.eval_windows(reference, 16, stride=5))


def test_each_host_reads_its_rows_of_the_same_batch(tmp_path):
    reference = write_shards(tmp_path, [100, 3, 100, 50])
    stream = token_files.TokenStream.open(tmp_path, "train")
    batch = dict(seed=1, batch_size=8, seq_len=32, sampling="permutation")
    for step in range(5):
        full = data.train_batch(stream, step, **batch)
        for hosts in (1, 2):
            parts = [data.train_batch(stream, step, **batch, rows=slice(p * 8 // hosts, (p + 1) * 8 // hosts))
                     for p in range(hosts)]
            assert np.array_equal(np.concatenate(parts), full)
        assert np.array_equal(full, data.train_batch(reference, step, **batch))


def test_shard_writer_closes_shards_after_whole_pieces_and_records_them(tmp_path):
    writer = token_files.ShardWriter(tmp_path, "train", np.dtype(np.uint8), shard_tokens=10, written=[])
    pieces = [np.arange(4), np.arange(4, 8), np.arange(8, 13), np.arange(13, 15)]
    wrote = [writer.add(i, ids, num_bytes=2 * len(ids)) for i, ids in enumerate(pieces)]
    writer.finish(end=6)
    assert wrote == [False, False, True, False]  # 4 + 4 + 5 = 13 >= 10 after the third piece
    assert writer.shards == [{"file": "train-00000.npy", "tokens": 13, "bytes": 26, "end": 3},
                             {"file": "train-00001.npy", "tokens": 2, "bytes": 4, "end": 6}]
    first = np.load(tmp_path / "train-00000.npy")
    assert first.dtype == np.uint8 and first.tolist() == list(range(13))
    # a writer resumed from these records ignores the pieces they hold
    resumed = token_files.ShardWriter(tmp_path, "train", np.dtype(np.uint8), 10, writer.shards[:1])
    assert resumed.resume_from == 3 and not resumed.add(2, np.arange(99), 1) and resumed._tokens == 0


def test_progress_says_where_to_restart_and_stops_at_the_first_missing_or_short_shard(tmp_path):
    writers = {split: token_files.ShardWriter(tmp_path, split, np.dtype(np.uint8), 5, []) for split in token_files.SPLITS}
    splits = ["train", "train", "heldout", "train", "train", "train", "heldout"]  # pieces 0..6
    for i, split in enumerate(splits):
        writers[split].add(i, np.arange(3 if split == "train" else 2), 3)
    # train shards end after pieces 1 and 4; heldout holds pieces 2 and 6 in its buffer, train piece 5
    token_files.write_progress(tmp_path, 5, writers, position=7)
    assert token_files.read_progress(tmp_path, 99)[:2] == (5, 2)  # piece 2 is in no shard yet
    writers["heldout"].add(7, np.arange(2), 3)  # piece 7 closes the heldout shard (2, 6, 7)
    token_files.write_progress(tmp_path, 5, writers, position=8)
    shard_tokens, next_piece, shards = token_files.read_progress(tmp_path, 99)
    assert (shard_tokens, next_piece) == (5, 5) and [len(s) for s in shards.values()] == [2, 1]
    np.save(tmp_path / "train-00001.npy", np.arange(2, dtype=np.uint8))  # short: written by something else
    shard_tokens, next_piece, shards = token_files.read_progress(tmp_path, 99)
    assert next_piece == 0 and [s["file"] for s in shards["train"]] == ["train-00000.npy"]
    assert [s["end"] for s in shards["heldout"]] == [8]


def test_preparing_removes_temporary_files_a_kill_left_but_not_those_of_a_running_preparation(tmp_path):
    leftover = tmp_path / ".train-00003.npy.k2j4h1x9.tmp"  # as write_atomically names them
    other = tmp_path / "notes.tmp"  # not such a name
    other.write_bytes(b"notes")
    with token_files.preparing(tmp_path):  # a preparation running now, writing a shard ...
        leftover.write_bytes(b"\x93NUMPY")
        with token_files.preparing(tmp_path):  # ... is left alone by one that starts meanwhile
            assert leftover.exists()
    with token_files.preparing(tmp_path):  # a later one, once the first is gone (killed): removed
        assert not leftover.exists() and other.exists()


@pytest.mark.parametrize("max_windows", [None, 1, 3, 100])
def test_held_out_loss_over_shards_scores_the_windows_of_the_array(max_windows, tmp_path):
    from mqa import evaluation

    reference = write_shards(tmp_path, [40, 7, 55, 30])
    stream = token_files.TokenStream.open(tmp_path, "train")

    def scored(tokens):
        seen = []

        def batch_nll(windows, weights):  # a stand-in model: the loss is a function of the ids scored
            seen.append(windows.copy())
            return float((windows[:, 1:] * weights).sum()), float(weights.sum())

        result = evaluation.held_out_loss(batch_nll, tokens, seq_len=8, batch_size=4, stride=4, max_windows=max_windows)
        return result, np.concatenate(seen)

    (got, got_windows), (want, want_windows) = scored(stream), scored(reference)
    assert got == want and np.array_equal(got_windows, want_windows)
    full = data.eval_windows(reference, 8, stride=4)
    assert np.array_equal(want_windows[:len(full)][:max_windows], full[:max_windows])

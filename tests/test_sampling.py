"""train.sampling: training windows without replacement (a per-seed permutation of the window
starts, pass after pass) or uniformly with replacement (what runs did before the field).

Tokens are np.arange here, so a window's first token is its start. Both orders a pass can
take are checked: the uniformly random permutation (up to window_order.EXACT_LIMIT starts,
against np.random.default_rng([seed, pass]).permutation written out here) and the keyed
Feistel bijection past it (forced by lowering the limit to 0).
"""

import json

import numpy as np
import pytest

from mqa import data
from mqa import config as config_lib
from mqa.config import ConfigError, load_config_file
from mqa.data import window_order
from mqa.workdir import FIXED_TRAIN_FIELDS, RESUMABLE_CHANGES, check_resumable, read_config
from commands import REPO


@pytest.fixture(params=["exact", "feistel"])
def order(request, monkeypatch):
    """Which order a pass takes: the permutation, or (limit 0) the Feistel bijection."""
    if request.param == "feistel":
        monkeypatch.setattr(window_order, "EXACT_LIMIT", 0)
    window_order.pass_permutation.cache_clear()
    yield request.param
    window_order.pass_permutation.cache_clear()


def starts_of(num_starts, steps, *, seed, batch_size, seq_len=3, rows=None):
    """The window starts of `steps`, batch after batch: int [len(steps) * rows]."""
    tokens = np.arange(num_starts + seq_len, dtype=np.int32)
    return np.concatenate([data.train_batch(tokens, step, seed=seed, batch_size=batch_size, seq_len=seq_len,
                                            sampling="permutation", rows=rows)[:, 0] for step in steps])


@pytest.mark.parametrize("num_starts, batch_size", [(23, 4), (16, 4), (5, 7), (1, 3)])
def test_every_window_start_comes_once_a_pass_and_each_pass_differs(order, num_starts, batch_size):
    """Over the steps that make 3 passes (batches straddling two passes included: 23 starts
    in batches of 4, or batches longer than a pass), each pass is 0..n-1 once each."""
    passes = 3
    steps = range(-(-passes * num_starts // batch_size))  # ceil: the last batch reaches into pass 4
    starts = starts_of(num_starts, steps, seed=5, batch_size=batch_size)
    by_pass = starts[:passes * num_starts].reshape(passes, num_starts)
    for p in range(passes):
        assert sorted(by_pass[p]) == list(range(num_starts)), (p, by_pass[p])
    if num_starts > 4:
        assert len({tuple(row) for row in by_pass}) == passes  # every pass in its own order
        assert all(list(row) != list(range(num_starts)) for row in by_pass)  # and none in order


def test_the_exact_order_is_the_generators_permutation_of_each_pass():
    num_starts, batch_size, seed = 23, 4, 7
    passes = np.concatenate([np.random.default_rng([seed, p]).permutation(num_starts) for p in range(3)])
    assert np.array_equal(starts_of(num_starts, range(17), seed=seed, batch_size=batch_size),
                          passes[:17 * batch_size])


def test_seeds_give_different_orders(order):
    orders = [tuple(starts_of(50, range(5), seed=seed, batch_size=10)) for seed in range(4)]
    assert len(set(orders)) == 4
    assert all(sorted(o) == list(range(50)) for o in orders)


@pytest.mark.parametrize("step", [0, 5, 6])  # 6 straddles the passes: positions 24..27 of 23 starts
def test_each_hosts_rows_are_its_rows_of_the_full_batch(order, step):
    full = starts_of(23, [step], seed=1, batch_size=4)
    for hosts in (2, 4):
        parts = [starts_of(23, [step], seed=1, batch_size=4, rows=slice(p * 4 // hosts, (p + 1) * 4 // hosts))
                 for p in range(hosts)]
        assert np.array_equal(np.concatenate(parts), full)


def test_a_step_alone_equals_the_same_step_in_a_run(order):
    """What a resumed run computes first (nothing cached, any step) is what the uninterrupted run
    computed at that step, whichever steps came before it in this process."""
    in_order = [starts_of(23, [step], seed=2, batch_size=4) for step in range(20)]
    for step in (19, 6, 0, 11, 5):
        window_order.pass_permutation.cache_clear()
        assert np.array_equal(starts_of(23, [step], seed=2, batch_size=4), in_order[step]), step
    backwards = [starts_of(23, [step], seed=2, batch_size=4) for step in reversed(range(20))]
    assert all(np.array_equal(a, b) for a, b in zip(backwards[::-1], in_order))


def test_feistel_order_is_a_bijection_at_a_billion_starts_without_building_it():
    """Past the limit a pass is never built: the starts of a million positions in the middle
    of a pass of 10^9 are distinct and in range, and two passes differ."""
    n, positions = 10 ** 9, np.arange(10 ** 6) + 5 * 10 ** 8
    starts = window_order.permuted_starts(n, positions, seed=3)
    assert starts.min() >= 0 and starts.max() < n and len(np.unique(starts)) == len(starts)
    assert not np.array_equal(starts[:100], window_order.permuted_starts(n, positions[:100] + n, seed=3))
    for num_starts in (2, 3, 100, 2 ** 12 + 1):  # each small domain: a permutation
        got = window_order.feistel_walk(np.arange(num_starts), num_starts, window_order.round_keys(0, 0))
        assert sorted(got) == list(range(num_starts))


@pytest.mark.parametrize("step, seed, batch_size, rows", [(0, 0, 8, None), (17, 3, 5, None), (4, 1, 8, slice(2, 6))])
def test_uniform_sampling_is_the_former_draw_with_replacement(step, seed, batch_size, rows):
    """sampling="uniform": starts drawn as train_batch drew them before train.sampling
    existed, byte for byte, windows cut here."""
    tokens = np.random.default_rng(9).integers(0, 50_000, 300).astype(np.int32)
    seq_len = 16
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, size=batch_size)
    if rows is not None:
        starts = starts[rows]
    want = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    got = data.train_batch(tokens, step, seed=seed, batch_size=batch_size, seq_len=seq_len, sampling="uniform",
                           rows=rows)
    assert got.dtype == np.int32 and got.tobytes() == want.tobytes()


def test_an_unknown_sampling_is_one_line():
    with pytest.raises(data.DataError, match="sampling='shuffle' is not one of: 'permutation', 'uniform'"):
        data.train_batch(np.arange(40, dtype=np.int32), 0, seed=0, batch_size=2, seq_len=4, sampling="shuffle")
    with pytest.raises(ConfigError) as error:
        load_config_file(REPO / "configs" / "tiny.py", ["train.sampling=shuffle"])
    assert str(error.value) == "train.sampling='shuffle' is not one of: 'permutation', 'uniform'"


def test_the_default_permutes_and_the_published_experiments_draw_uniformly():
    assert config_lib.SAMPLINGS == data.SAMPLINGS
    assert load_config_file(REPO / "configs" / "default.py").train.sampling == "permutation"
    for name in ("sweep_kv_heads", "sweep_kv_budget"):
        config = load_config_file(REPO / "configs" / f"{name}.py", validate_config=False)  # sweeps add a section
        assert config.train.sampling == "uniform", name


def test_a_resumed_run_keeps_its_sampling_and_old_workdirs_read_as_they_ran(tmp_path):
    """train.sampling may not change on resume; a config.json written before the field
    existed reads as uniform, which is what that run trained with."""
    assert "train.sampling" in FIXED_TRAIN_FIELDS and "train.sampling" not in RESUMABLE_CHANGES
    config = load_config_file(REPO / "configs" / "tiny.py")
    saved = json.loads(config.to_json())
    del saved["train"]["sampling"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    assert read_config(tmp_path).train.sampling == "uniform"
    with pytest.raises(ConfigError) as error:
        check_resumable(config, tmp_path)  # tiny.py permutes; the workdir drew uniformly
    assert "was trained with train.sampling='uniform', not 'permutation'" in str(error.value)
    config.train.sampling = "uniform"
    check_resumable(config, tmp_path)


@pytest.mark.parametrize("field,value", [("seed", 7), ("batch_size", 3), ("seq_len", 24)])
def test_a_resumed_run_keeps_the_fields_that_choose_its_windows(tmp_path, field, value):
    """Step s reads `data.train_batch(step=s, seed, batch_size, seq_len)`: a resumed run that
    changed any of them would read other windows than the run it continues."""
    config = load_config_file(REPO / "configs" / "tiny.py")
    (tmp_path / "config.json").write_text(config.to_json())
    (tmp_path / "checkpoints" / "10").mkdir(parents=True)
    before = config.train[field]
    config.train[field] = value
    with pytest.raises(ConfigError) as error:
        check_resumable(config, tmp_path)
    assert f"was trained with train.{field}={before!r}, not {value!r}" in str(error.value)

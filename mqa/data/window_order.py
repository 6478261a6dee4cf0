"""The order in which training visits window starts without replacement (`permuted_starts`).

The starts 0..n-1 are read pass after pass, pass p in an order drawn from the generator
np.random.default_rng([seed, p]); position i of the concatenated passes holds start
order_{i // n}[i % n]. Each start comes once in every pass, and the start at a position is a
pure function of (n, seed, position), so a resumed run reads what an uninterrupted one does.

Up to `EXACT_LIMIT` starts, a pass is a uniformly random permutation (`Generator.permutation`),
built once and kept with the one before (a batch straddling two passes needs both; 8 bytes a
start: 128 MiB at the limit). Past it (e.g. a corpus of ~1e9 tokens, whose permutation would
not fit) no permutation is built: the pass is a keyed pseudo-random bijection of 0..n-1,
computed at the batch's positions only. It is a balanced Feistel network of `FEISTEL_ROUNDS`
rounds on the smallest domain 2^(2h) >= n, with round keys from the pass's generator and a
splitmix64 round function (Luby & Rackoff 1988), applied again until the value falls below n
("cycle walking", Black & Rogaway 2002: a bijection of the larger domain, so walked, is one of
0..n-1; as 2^(2h) < 4n, fewer than 4 applications on average). It is not a uniform draw from
all n! orders, but it visits each start once a pass in an order no simple structure
predicts, with no memory and O(batch) work a step. (On tiny domains, a few bits a half, its
orders are measurably non-uniform; it is only used past 2^24 starts.)
"""

from __future__ import annotations

import functools

import numpy as np

EXACT_LIMIT = 1 << 24  # starts up to which a pass is a uniformly random permutation
FEISTEL_ROUNDS = 6


def permuted_starts(num_starts: int, positions: np.ndarray, *, seed: int,
                    exact_limit: int | None = None) -> np.ndarray:
    """int64 starts at `positions` (int, any shape) of the concatenated passes over
    0..num_starts-1. Up to `exact_limit` starts (None: `EXACT_LIMIT`) a pass is a uniformly
    random permutation, past it the Feistel order (module docstring)."""
    positions = np.asarray(positions, np.int64)
    passes, index = np.divmod(positions, num_starts)
    starts = np.empty_like(positions)
    exact = num_starts <= (EXACT_LIMIT if exact_limit is None else exact_limit)
    for p in np.unique(passes):  # one pass, or two where a batch straddles them
        here = passes == p
        if exact:
            starts[here] = pass_permutation(num_starts, seed, int(p))[index[here]]
        else:
            starts[here] = feistel_walk(index[here], num_starts, round_keys(seed, int(p)))
    return starts


@functools.lru_cache(maxsize=2)
def pass_permutation(num_starts: int, seed: int, p: int) -> np.ndarray:
    """Pass p's order of 0..num_starts-1 (read-only): np.random.default_rng([seed, p]).permutation."""
    order = np.random.default_rng([seed, p]).permutation(num_starts)
    order.flags.writeable = False
    return order


def round_keys(seed: int, p: int) -> np.ndarray:
    """Pass p's Feistel round keys: uint64 [FEISTEL_ROUNDS] from np.random.default_rng([seed, p])."""
    return np.random.default_rng([seed, p]).integers(0, 2 ** 64, size=FEISTEL_ROUNDS, dtype=np.uint64)


def feistel_walk(index: np.ndarray, num_starts: int, keys: np.ndarray) -> np.ndarray:
    """The keyed bijection of 0..num_starts-1 at `index` (int, each < num_starts): int64."""
    half = max(1, ((num_starts - 1).bit_length() + 1) // 2)  # 2^(2 half) >= num_starts
    x = np.asarray(index, np.int64).astype(np.uint64)
    walking = np.ones(x.shape, bool)  # every value takes one step, then those out of range more
    while walking.any():
        x[walking] = _feistel(x[walking], half, keys)
        walking = x >= np.uint64(num_starts)
    return x.astype(np.int64)


def _feistel(x: np.ndarray, half: int, keys: np.ndarray) -> np.ndarray:
    """A balanced Feistel network on 2 * half bits (a bijection of 0..2^(2 half)-1)."""
    mask = np.uint64((1 << half) - 1)
    left, right = x >> np.uint64(half), x & mask
    for key in keys:
        left, right = right, left ^ (_splitmix64(right ^ key) & mask)
    return (left << np.uint64(half)) | right


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer (Steele, Lea and Flood 2014): a well-mixing bijection of uint64."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))

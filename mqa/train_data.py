"""A run's data: its corpus, its batches laid out on the mesh, and held-out evaluation on it.

Each host builds only its rows of a global batch (`BatchFeeder`); `held_out_metrics` scores the
held-out split as eval.py does (`evaluation.held_out_loss`), each host feeding its rows.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import numpy as np

from mqa import data, evaluation
from mqa.config import ConfigError
from mqa.workdir import data_config


def load_run_corpus(config: ml_collections.ConfigDict, workdir: pathlib.Path) -> data.Corpus:
    """The corpus `config` trains on, prepared under WORKDIR/data (or data.token_dir) on first use;
    both splits hold at least one training window."""
    return data.load_corpus(data_config(config), workdir / "data", min_tokens=config.train.seq_len + 1)


def resolve_vocab(config: ml_collections.ConfigDict, tokenizer) -> None:
    """Sets config.model.vocab_size to a BPE tokenizer's size (saying so); a vocabulary smaller than
    the tokenizer's is a ConfigError."""
    if tokenizer.name == "bpe" and config.model.vocab_size != tokenizer.vocab_size:
        print(f"model.vocab_size set to {tokenizer.vocab_size}, the BPE tokenizer's size")
        config.model.vocab_size = tokenizer.vocab_size
    elif config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model.vocab_size={config.model.vocab_size} is smaller than the "
                          f"{tokenizer.name} tokenizer's {tokenizer.vocab_size} tokens")


class BatchFeeder:
    """Global batches of `batch_size` windows of `seq_len + 1` tokens in `batch_sharding`, each host
    building only the rows its devices hold. bos: the tokenizer's beginning-of-sequence id
    (`bos_id`, a model such as Gemma that expects its text to start with one) or None: every
    window, for training and held-out scoring alike, is then BOS and `seq_len` tokens of text,
    as eval.py scores such a model (`mqa.evaluation.held_out_loss`)."""

    def __init__(self, batch_sharding: jax.sharding.Sharding, batch_size: int, seq_len: int,
                 bos: int | None = None):
        self.sharding, self.batch_size, self.seq_len, self.bos = batch_sharding, batch_size, seq_len, bos
        self.shape = (batch_size, seq_len + 1)
        self.rows = local_rows(batch_sharding, self.shape)

    def global_array(self, local: np.ndarray, shape: tuple[int, ...]) -> jax.Array:
        """This host's rows `local` of a global array of `shape` (rows first)."""
        return jax.make_array_from_process_local_data(self.sharding, local, shape)

    def train_batch(self, tokens: data.Tokens, step: int, seed: int, sampling: str) -> jax.Array:
        """int32 [batch_size, seq_len + 1]: `data.train_batch` of `step` (train.seed, train.sampling),
        on the mesh; with a BOS, BOS then `data.train_batch`'s windows of seq_len tokens."""
        text = self.seq_len if self.bos is None else self.seq_len - 1
        local = data.train_batch(tokens, step, seed=seed, batch_size=self.batch_size, seq_len=text,
                                 sampling=sampling, rows=self.rows)
        if self.bos is not None:
            local = np.concatenate([np.full((len(local), 1), self.bos, local.dtype), local], axis=1)
        return self.global_array(local, self.shape)


def local_rows(batch_sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a global batch that this process's devices hold."""
    index_map = batch_sharding.addressable_devices_indices_map(global_shape)
    starts = [idx[0].start or 0 for idx in index_map.values()]
    stops = [global_shape[0] if idx[0].stop is None else idx[0].stop for idx in index_map.values()]
    return slice(min(starts), max(stops))


def held_out_metrics(params, eval_step, corpus: data.Corpus, feeder: BatchFeeder, *,
                     max_windows: int | None) -> dict[str, float]:
    """{"eval_loss" (nats/token), "eval_perplexity", "eval_bits_per_byte", "eval_tokens"} over the
    first `max_windows` non-overlapping held-out windows (None: all), scored in batches of the
    feeder's shape by `eval_step(params, windows, weights)`, each after the feeder's BOS if it has one."""
    batch_size, seq_len, rows = feeder.batch_size, feeder.seq_len, feeder.rows

    def batch_nll(windows: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
        out = eval_step(params, feeder.global_array(windows[rows], feeder.shape),
                        feeder.global_array(weights[rows], (batch_size, seq_len)))
        return float(out["loss_sum"]), float(out["tokens"])

    result = evaluation.held_out_loss(
        batch_nll, corpus.heldout, seq_len=seq_len, batch_size=batch_size,
        max_windows=max_windows, bytes_per_token=corpus.heldout_bytes / len(corpus.heldout),
        bos=feeder.bos)
    return {f"eval_{key}": value for key, value in result.items()}

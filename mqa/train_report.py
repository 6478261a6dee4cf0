"""The lines a training run prints about itself: its data, its model, and its one final
held-out figure."""

from __future__ import annotations

from jax.sharding import Mesh

from mqa import accounting, data
from mqa.config import ModelConfig


def plural(count: int, noun: str) -> str:
    """"1 KV head", "2 KV heads"."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def attention_summary(config: ModelConfig) -> str:
    """The query heads and what the KV cache keeps per token and K/V layer, e.g. "8 query heads,
    1 KV head", "4 query heads, 2 tied KV heads + a shared rope key of 8", "4 query heads, KV
    cache latent 24 + rope 8 per token"; cross-layer sharing appended."""
    queries = plural(config.num_heads, "query head")
    if config.attention == "latent":
        keys = f"{config.rope_key_heads} x " if config.rope_key_heads > 1 else ""
        cache = f"KV cache latent {config.kv_latent_dim} + rope {keys}{config.rope_head_dim} per token"
    elif config.attention == "tied":
        cache = f"{plural(config.num_kv_heads, 'tied KV head')} + a shared rope key of {config.head_dim // 2}"
    else:
        cache = plural(config.num_kv_heads, "KV head")
        if config.rope_head_dim:
            cache += f" (rope on {config.rope_head_dim} of {config.head_dim} dims)"
    shared = f", K/V shared by every {config.kv_share_every} layers" if config.kv_share_every > 1 else ""
    return f"{queries}, {cache}{shared}"


def data_line(corpus: data.Corpus) -> str:
    """e.g. "data: file x.txt (1,115,394 bytes); 1,003,855 train / 111,539 held-out tokens"."""
    dropped = f" ({plural(corpus.dropped_rows, 'row')} without text left out)" if corpus.dropped_rows else ""
    return (f"data: {corpus.source}; {len(corpus.train):,} train / {len(corpus.heldout):,} "
            f"held-out tokens{dropped}")


def model_line(config: ModelConfig, mesh: Mesh) -> str:
    return (f"model: {accounting.param_count(config):,} parameters, {attention_summary(config)}; "
            f"mesh {dict(mesh.shape)}")


def final_line(metrics: dict, step: int) -> str:
    """The run's one held-out figure: the final evaluation's (`held_out_metrics` keys)."""
    return (f"held-out perplexity {metrics['eval_perplexity']:.4f} "
            f"(loss {metrics['eval_loss']:.4f} nats/token, "
            f"{metrics['eval_bits_per_byte']:.4f} bits/byte) at step {step}, "
            f"over {metrics['eval_tokens']:,} held-out tokens")


def initial_line(metrics: dict) -> str:
    """Where uptraining starts: the converted model's held-out loss before the first update."""
    return (f"before training: held-out loss {metrics['eval_loss']:.4f} nats/token over "
            f"{metrics['eval_tokens']:,} held-out tokens")

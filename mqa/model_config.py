"""`ModelConfig`: the model's hyperparameters as plain, hashable data (static under `jax.jit`).

It has no defaults of its own: `configs/default.py` is the one source of them, and
`mqa.config.model_config(...)` builds a `ModelConfig` from that file's `model` section with
any fields overridden. A workdir's saved config is read the same way, so fields added
since it was written take their defaults from the same file.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Every field of `configs/default.py`'s `model` section that shapes the model
    (`match_mha_params` is resolved into `mlp_dim` when the config is built)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    mlp_dim: int
    mlp_activation: str
    kv_share_every: int
    attention: str
    kv_latent_dim: int
    q_latent_dim: int
    rope_head_dim: int
    rope_key_heads: int
    rope_frequency_dim: int
    rope_pairs: tuple[int, ...]
    kv_latent_norm: bool
    qk_nope_dim: int
    sliding_window: int
    attention_sinks: int
    global_every: int
    kv_cache_dtype: str
    kv_quant_group: int
    tie_embeddings: bool
    attention_impl: str
    decode_impl: str
    attention_block: int
    rope_theta: float
    rope_local_theta: float
    rope_global_every: int
    norm_eps: float
    norm_scale: str
    qk_norm: bool
    post_norms: bool
    embed_scale: bool
    attention_score_dim: int
    max_seq_len: int
    dtype: str
    remat: bool
    scan_unroll: int

    @property
    def group_size(self) -> int:
        """Query heads that share one key/value head."""
        return self.num_heads // self.num_kv_heads

    @property
    def num_kv_layers(self) -> int:
        """Layers that compute (and cache) keys and values: one per `kv_share_every`."""
        return self.num_layers // self.kv_share_every

    def is_local(self, layer: int) -> bool:
        """Whether layer `layer` (0-based) attends to a sliding window of positions: every
        layer when `sliding_window` > 0, except every `global_every`-th (layers N-1, 2N-1, ...)."""
        return self.sliding_window > 0 and not (
            self.global_every > 0 and (layer + 1) % self.global_every == 0)

    def window(self, layer: int) -> int:
        """Positions layer `layer` sees back from each query (itself included): the sliding
        window for a local layer, `max_seq_len` (everything) for a global one."""
        return self.sliding_window if self.is_local(layer) else self.max_seq_len

    def layer_rope_theta(self, layer: int) -> float:
        """The RoPE base of layer `layer`: `rope_local_theta` for a local layer when it is
        set (Gemma 3's 10,000 against 1,000,000 for its global layers), else `rope_theta`;
        with `rope_global_every` N the layers N-1, 2N-1, ... take `rope_theta` and the others
        the local base, whatever their windows (a model converted to fewer global layers
        keeps each layer's base)."""
        if not self.rope_local_theta:
            return self.rope_theta
        every = self.rope_global_every
        local = (layer + 1) % every != 0 if every else self.is_local(layer)
        return self.rope_local_theta if local else self.rope_theta

    def layer_rope_pairs(self, layer: int) -> np.ndarray | None:
        """Latent attention's rotary pairs in layer `layer`: int [rope_key_heads,
        rope_head_dim / 2], the frequency index each rotary key's pairs turn at (`rope_pairs`;
        `mqa.rope.apply_rope`'s `pairs`), or None for the highest frequencies."""
        if not self.rope_pairs:
            return None
        table = np.asarray(self.rope_pairs, np.int32).reshape(self.num_layers, self.rope_key_heads, -1)
        return table[layer]

    @property
    def score_dim(self) -> int:
        """Attention scores are q.k / sqrt(score_dim): `attention_score_dim`, or head_dim."""
        return self.attention_score_dim or self.head_dim

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

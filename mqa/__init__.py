"""mqa: multi-query, grouped-query and multi-head attention language models in JAX."""

from mqa.attention import (GroupedAttention, LatentAttention, TiedAttention, attend, attend_jax,
                           attention_fn, family)
from mqa.decode import generate
from mqa.config import ConfigError, ModelConfig, load_config_file, validate
from mqa.kv_cache import KVCache, init_cache
from mqa.loading import LoadedModel, load_model
from mqa.model import Transformer
from mqa.workdir import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "GroupedAttention", "KVCache", "LatentAttention",
    "LoadedModel", "ModelConfig", "TiedAttention", "Transformer", "attend", "attend_jax",
    "attention_fn", "family", "init_cache", "load_config_file",
    "load_model", "validate",
]

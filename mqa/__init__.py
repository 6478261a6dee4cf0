"""mqa: multi-query, grouped-query and multi-head attention language models in JAX."""

from mqa.attention import Attention, attend, attend_jax, attention_fn
from mqa.decode import generate
from mqa.config import ConfigError, ModelConfig, load_config_file, validate
from mqa.kv_cache import KVCache, init_cache
from mqa.loading import CheckpointError, LoadedModel, load_model
from mqa.model import Transformer

__all__ = [
    "Attention", "CheckpointError", "ConfigError", "KVCache", "LoadedModel", "ModelConfig",
    "Transformer", "attend", "attend_jax", "attention_fn", "init_cache", "load_config_file",
    "load_model", "validate",
]

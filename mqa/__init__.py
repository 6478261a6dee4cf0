"""mqa: multi-query, grouped-query and multi-head attention language models in JAX."""

from mqa.attention import Attention, attend, attend_jax, attention_fn
from mqa.config import ConfigError, ModelConfig, load_config_file, validate
from mqa.kv_cache import KVCache, init_cache
from mqa.model import Transformer

__all__ = [
    "Attention", "ConfigError", "KVCache", "ModelConfig", "Transformer", "attend", "attend_jax",
    "attention_fn", "init_cache", "load_config_file", "validate",
]

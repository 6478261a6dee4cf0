"""mqa: multi-query, grouped-query and multi-head attention language models in JAX."""

from mqa.attention import (FAMILIES, GroupedAttention, LatentAttention, TiedAttention, attend,
                           attend_jax, family, self_attention)
from mqa.config import ConfigError, ModelConfig, build_model_config, load_config_file, validate
from mqa.decode import generate
from mqa.kv_cache import KVCache, init_cache
from mqa.loading import LoadedModel, load_model
from mqa.model import Transformer
from mqa.serving import serve
from mqa.workdir import CheckpointError

__all__ = [
    "FAMILIES", "CheckpointError", "ConfigError", "GroupedAttention", "KVCache", "LatentAttention",
    "LoadedModel", "ModelConfig", "TiedAttention", "Transformer", "attend", "attend_jax",
    "build_model_config", "family", "generate", "init_cache", "load_config_file", "load_model",
    "self_attention", "serve", "validate",
]

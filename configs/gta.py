"""Grouped-tied attention (Zadouri, Strauss and Dao 2025): 2 K/V heads whose keys and values
are one tied state, plus a rotary key shared by all heads; caches (2 + 1/2) * head_dim numbers
per token and layer, a little over half of GQA-2's 4 * head_dim."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.attention = "tied"
    config.model.num_kv_heads = 2
    return config

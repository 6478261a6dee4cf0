"""Grouped-query attention: 8 query heads share 2 key/value heads (groups of 4)."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.num_kv_heads = 2
    return config

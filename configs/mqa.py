"""Multi-query attention (Shazeer 2019): all query heads share one key/value head."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.num_kv_heads = 1
    return config

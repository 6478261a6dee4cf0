"""Multi-head attention: every query head has its own key/value head."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.num_kv_heads = config.model.num_heads
    return config

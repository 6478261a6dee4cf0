"""Sliding-window attention: three of every four layers see the last 64 positions (their
caches are 64-position rings), every fourth layer sees everything (Gemma-style local/global)."""

from configs import default


def get_config():
    config = default.get_config()
    config.model.update(sliding_window=64, global_every=4)
    return config

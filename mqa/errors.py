"""The library's configuration error: raised where a bad value enters, one line naming it.

Its own leaf module so that every layer (the config loader, the attention families'
`validate`, the sharding code) raises the same class without importing each other.
"""


class ConfigError(ValueError):
    """A config value is invalid. The message is one line naming the value and what would
    be valid."""

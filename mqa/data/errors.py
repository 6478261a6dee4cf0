"""The one exception bad data input raises."""


class DataError(ValueError):
    """Bad data input; the message is one line naming the value and what would be valid."""

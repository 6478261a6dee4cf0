"""The error every converter raises for input it cannot convert."""


class ConvertError(ValueError):
    """The source cannot be converted; the message is one line naming the value and, where
    there is one, what would be valid."""

"""One exception type for bad input, so callers (CLI, Ray stages) can turn it into a message."""


class InputError(ValueError):
    """The input named in the message is missing, unreadable or malformed."""

"""One exception type for bad input, so callers (CLI, Ray stages) can turn it into a message."""

from __future__ import annotations


import sys
from collections.abc import Callable


class InputError(ValueError):
    """The input named in the message is missing, unreadable or malformed."""


def exit_status(body: Callable[[], object], failures: tuple[type[Exception], ...] = ()) -> int:
    """How every command ends: 0; bad input -> ``error: ...`` and 2; one of ``failures``
    (something that broke on the way, e.g. an interrupted training run) -> ``error: ...`` and 1."""
    try:
        body()
    except InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except failures as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0

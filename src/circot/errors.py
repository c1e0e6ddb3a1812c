"""User-facing errors.

Every problem caused by the user's input (a missing root, a malformed record, a bad image, a bad
predictions file) is raised as :class:`CircotError` with a one-line message that names the problem and the
file or field. The command line prints the message and exits non-zero, without a traceback.
"""

from __future__ import annotations


class CircotError(Exception):
    """An error in the user's input or environment, reported as one line."""

    exit_code: int = 2


class DataError(CircotError):
    """A dataset file is missing, malformed or incomplete."""


class ConfigError(CircotError):
    """A configuration file or option is invalid."""


def check_batch_size(batch_size: object, name: str = "batch_size") -> int:
    """``batch_size`` if it is a positive integer; a :class:`CircotError` naming it otherwise."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CircotError(f"{name} must be a positive integer, not {batch_size!r}")
    return batch_size

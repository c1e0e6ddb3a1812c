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

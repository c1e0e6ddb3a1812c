"""Progress bars that suit where they are written: live on a terminal, a few lines a minute in a log file.

A bar redrawn ten times a second is right on a terminal and wrong in a log: ``circot eval 2> eval.log`` would
hold thousands of carriage-return updates. :func:`progress_bar` draws on a terminal as tqdm does, and
elsewhere (a file, a pipe, a CI log) one plain line every :data:`LOG_INTERVAL_S` seconds at most.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import IO, Any

LOG_INTERVAL_S = 20.0  # at most three updates a minute when stderr is not a terminal


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or replaced streams
        return False


def progress_bar(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    disable: bool = False,
    file: IO[str] | None = None,
    **kwargs: Any,
) -> Any:
    """A ``tqdm`` bar on ``file`` (default stderr): live on a terminal, every ``LOG_INTERVAL_S`` s otherwise."""
    from tqdm.auto import tqdm

    stream = file if file is not None else sys.stderr
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", max(LOG_INTERVAL_S, kwargs["mininterval"]) * 3)
        kwargs.setdefault("ascii", True)
        kwargs.setdefault("ncols", 100)
        kwargs.pop("dynamic_ncols", None)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable, file=stream, **kwargs)


__all__ = ["LOG_INTERVAL_S", "progress_bar"]

"""The annotation files: one JSONL record per triplet, appended and fsync'ed one by one.

Record format (one JSON object per line)::

    {"query_id", "dataset", "split", "caption", "reasoning", "conclusion", "teacher", "prompt_version",
     "timings": {...}}

Rejected triplets go to a sibling file ``<out>.rejects.jsonl`` (``FILE.jsonl`` -> ``FILE.rejects.jsonl``) with
the same identifying fields plus ``reason`` and ``retryable``. A crash can leave at most one torn last line,
which :class:`JsonlAppender` detects and truncates when it opens the file again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from circot.errors import DataError
from circot.prompts import COT_FIELDS, CoT

logger = logging.getLogger(__name__)

RECORD_KEYS = (
    "query_id",
    "dataset",
    "split",
    "caption",
    "reasoning",
    "conclusion",
    "teacher",
    "prompt_version",
    "timings",
)


def rejects_path(out: str | Path) -> Path:
    """``FILE.jsonl`` -> ``FILE.rejects.jsonl`` (any other name gets ``.rejects.jsonl`` appended)."""
    out = Path(out)
    stem = out.name[: -len(".jsonl")] if out.name.endswith(".jsonl") else out.name
    return out.with_name(stem + ".rejects.jsonl")


def iter_jsonl(path: str | Path, *, tolerate_torn_tail: bool = True) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield ``(line_number, record)`` of a JSONL file (1-based line numbers, blank lines skipped).

    A last line without its newline that does not parse (a write torn by a crash) is skipped with a warning
    when ``tolerate_torn_tail``; any other malformed line raises :class:`DataError` naming the line.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"annotations file {str(path)!r} does not exist") from None
    lines = data.split(b"\n")
    torn_tail = not data.endswith(b"\n") and bool(data)
    for index, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = index == len(lines)
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            if last and torn_tail and tolerate_torn_tail:
                logger.warning("%s: ignoring a torn last line (line %d)", path, index)
                return
            raise DataError(f"{path}: line {index} is not valid JSON") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}: line {index} is not a JSON object")
        yield index, record


def read_annotations(path: str | Path) -> dict[str, CoT]:
    """Read an annotations JSONL file into ``{query_id: CoT}``.

    Every record must have ``query_id``, ``caption``, ``reasoning`` and ``conclusion``; a torn last line left by
    a crash is ignored. If a query id occurs twice (files concatenated by hand), the last record wins.
    """
    path = Path(path)
    out: dict[str, CoT] = {}
    for line_no, record in iter_jsonl(path):
        missing = [k for k in ("query_id", *COT_FIELDS) if not isinstance(record.get(k), str)]
        if missing:
            raise DataError(f"{path}: line {line_no}: missing or non-string field {missing[0]!r}")
        qid = record["query_id"]
        if qid in out:
            logger.warning("%s: query %r occurs more than once; keeping line %d", path, qid, line_no)
        out[qid] = CoT(
            caption=record["caption"], reasoning=record["reasoning"], conclusion=record["conclusion"]
        )
    return out


def repair_torn_tail(path: str | Path) -> int:
    """Truncate a torn last line (no final newline, or not valid JSON) in place; return the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    with open(path, "r+b") as fh:
        data = fh.read()
        if not data:
            return 0
        keep = len(data)
        if not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1  # 0 when the file holds a single torn line
        else:
            # the last complete line must parse too (a crash can leave garbage that ends in a newline only
            # if something else wrote it; check anyway)
            start = data.rfind(b"\n", 0, len(data) - 1) + 1
            try:
                json.loads(data[start:])
            except (json.JSONDecodeError, UnicodeDecodeError):
                keep = start
        removed = len(data) - keep
        if removed:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
            logger.warning("%s: repaired a torn last line (%d bytes removed)", path, removed)
        return removed


class JsonlAppender:
    """Append JSON records to a file, one line per record, flushed and fsync'ed each time.

    Opening repairs a torn last line. Each record is written with a single ``write`` of one complete line on
    a descriptor opened with ``O_APPEND``, then ``fsync``'ed, so a crash loses at most the record being written.
    """

    def __init__(self, path: str | Path, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.repaired_bytes = repair_torn_tail(self.path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"{self.path} is closed")
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> JsonlAppender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Small file helpers shared by the dataset loaders, the checker and the submission tools."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from circot.errors import DataError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def read_json(path: Path, what: str = "file", *, reject_duplicate_keys: bool = False) -> Any:
    """Parse a JSON file, turning a missing file or a syntax error into a one-line :class:`DataError`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"missing {what} {str(path)!r}")
    try:
        with open(path, encoding="utf-8") as f:
            if reject_duplicate_keys:
                return json.load(f, object_pairs_hook=_reject_duplicate_keys)
            return json.load(f)
    except _DuplicateKey as exc:
        raise DataError(f"{path}: key {exc.key!r} appears twice") from None
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot be read ({exc.strerror})") from None


def read_json_list(path: Path, what: str) -> list[Any]:
    data = read_json(path, what)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}")
    return data


def record_error(path: Path, index: int, message: str) -> DataError:
    return DataError(f"{path}: record {index}: {message}")


def require_fields(path: Path, index: int, record: Any, fields: Iterable[str]) -> None:
    if not isinstance(record, dict):
        raise record_error(path, index, f"expected an object, got {type(record).__name__}")
    for name in fields:
        if name not in record:
            raise record_error(path, index, f"missing field {name!r}")


def require_str(path: Path, index: int, record: dict, name: str) -> str:
    value = record[name]
    if not isinstance(value, str):
        raise record_error(path, index, f"field {name!r} must be a string, got {type(value).__name__}")
    return value


def require_int(path: Path, index: int, record: dict, name: str) -> int:
    value = record[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise record_error(path, index, f"field {name!r} must be an integer, got {value!r}")
    return value


def write_json_atomic(path: Path, obj: Any, *, indent: int | None = None) -> Path:
    """Write JSON to a temporary file in the same folder, then move it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            if indent is not None:
                f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def gallery_size_note(what: str, n: int, official: int | None) -> str:
    """A conventions entry saying whether a gallery has its official size (logged when it does not)."""
    if official is None or n == official:
        return f"{n} images" + (" (official)" if official is not None else "")
    logger.warning(
        "%s gallery has %d images; the official one has %d: numbers are not comparable", what, n, official
    )
    return f"{n} images, NOT the official {official}"


def list_dir_names(folder: Path) -> set[str]:
    """Names of the entries of ``folder`` (one directory read instead of one stat per image)."""
    try:
        with os.scandir(folder) as it:
            return {entry.name for entry in it}
    except (FileNotFoundError, NotADirectoryError):
        return set()

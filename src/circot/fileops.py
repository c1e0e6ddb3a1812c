"""Replacing a folder so that its path always names a complete folder, old or new.

``os.replace`` cannot put a folder over a non-empty one, and two renames (old away, new in) leave a moment
where the path names nothing: a crash there loses the folder. On Linux, ``renameat2(RENAME_EXCHANGE)`` swaps
two paths in one step; elsewhere the old folder is kept beside the new one until the new one is in place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange_paths(a: str | Path, b: str | Path) -> bool:
    """Swap two existing paths in one atomic step; False when the system or filesystem cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    renameat2.restype = ctypes.c_int
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    logger.debug("renameat2(RENAME_EXCHANGE) failed: %s", os.strerror(ctypes.get_errno()))
    return False


def replace_directory(new: str | Path, directory: str | Path) -> None:
    """Move the complete folder ``new`` to ``directory`` (same filesystem), replacing what is there.

    ``directory`` names a complete folder at every moment: the old one until the swap, then the new one.
    Where no atomic swap exists, the old folder is first renamed to a hidden sibling and put back if the
    new one cannot be moved in.
    """
    new, directory = Path(new), Path(directory)
    if not directory.exists():
        os.replace(new, directory)
        return
    if exchange_paths(new, directory):  # ``new`` now holds the old folder
        shutil.rmtree(new, ignore_errors=True)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old.", dir=directory.parent))
    old = holder / directory.name
    os.replace(directory, old)
    try:
        os.replace(new, directory)
    except BaseException:
        os.replace(old, directory)
        shutil.rmtree(holder, ignore_errors=True)
        raise
    shutil.rmtree(holder, ignore_errors=True)

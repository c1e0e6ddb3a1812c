"""JSON for people and machines alike: floats rounded to the digits that mean something.

``55.400000000000006`` (a percentage computed in floating point) is written as ``55.4``.
"""

from __future__ import annotations

import math
from typing import Any

METRIC_DIGITS = 4  # percentages: 55.4, 12.3457
SCORE_DIGITS = 6  # cosine similarities and seconds


def rounded(obj: Any, digits: int = METRIC_DIGITS) -> Any:
    """``obj`` with every float (in dicts, lists and tuples, recursively) rounded to ``digits`` decimals."""
    if isinstance(obj, float):
        return round(obj, digits) if math.isfinite(obj) else obj
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [rounded(v, digits) for v in obj]
    if type(obj).__module__ == "numpy" and hasattr(obj, "item"):  # numpy scalars
        return rounded(obj.item(), digits)
    return obj


__all__ = ["METRIC_DIGITS", "SCORE_DIGITS", "rounded"]

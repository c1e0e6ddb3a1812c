"""circot: composed image retrieval with explicit chain-of-thought (CIR-CoT)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]

"""circot: composed image retrieval with explicit chain-of-thought (CIR-CoT).

The public names are importable from the package itself (``from circot import CIRCoT``); each is imported
from its module on first use, so ``import circot`` (and the command line) stays fast and loads no torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "CIRCoT": "circot.model",
    "CIRCoTConfig": "circot.config",
    "CoT": "circot.prompts",
    "parse_cot": "circot.prompts",
    "CircotError": "circot.errors",
    "DataError": "circot.errors",
    "ConfigError": "circot.errors",
    "GalleryIndex": "circot.index",
    "IndexManifest": "circot.index",
    "build_index": "circot.gallery",
    "add_images": "circot.gallery",
    "search_query": "circot.search",
    "QueryResult": "circot.search",
    "load_split": "circot.data",
    "VectorStore": "circot.store",
    "open_store": "circot.store",
    "build_store": "circot.store",
}

__all__ = [
    "CIRCoT",
    "CIRCoTConfig",
    "CircotError",
    "CoT",
    "ConfigError",
    "DataError",
    "GalleryIndex",
    "IndexManifest",
    "QueryResult",
    "VectorStore",
    "__version__",
    "add_images",
    "build_index",
    "build_store",
    "load_split",
    "open_store",
    "parse_cot",
    "search_query",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names are imported lazily
    from circot.config import CIRCoTConfig
    from circot.data import load_split
    from circot.errors import CircotError, ConfigError, DataError
    from circot.gallery import add_images, build_index
    from circot.index import GalleryIndex, IndexManifest
    from circot.model import CIRCoT
    from circot.prompts import CoT, parse_cot
    from circot.search import QueryResult, search_query
    from circot.store import VectorStore, build_store, open_store


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'circot' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))

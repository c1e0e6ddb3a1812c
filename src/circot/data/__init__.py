"""Datasets: FashionIQ, CIRR, CIRCO and the generated shapes world, all loaded as :class:`CIRSplit`."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from circot.data.records import CIRQuery, CIRSplit, Gallery
from circot.errors import DataError

# dataset name -> module that defines ``SPLITS`` and ``load(root, split, **options) -> CIRSplit``
DATASETS = {
    "fashioniq": "circot.data.fashioniq",
    "cirr": "circot.data.cirr",
    "circo": "circot.data.circo",
    "shapes": "circot.data.shapes",
}


def dataset_module(name: str):
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")
    return importlib.import_module(DATASETS[name])


def load_split(dataset: str, root: str | Path, split: str, **options: Any) -> CIRSplit:
    """Load one split of a dataset from ``root`` (never a path derived from the source tree)."""
    module = dataset_module(dataset)
    root = Path(root)
    if not root.exists():
        raise DataError(f"{dataset}: root folder {str(root)!r} does not exist")
    if split not in module.SPLITS:
        raise DataError(f"{dataset}: unknown split {split!r}; choose one of: {', '.join(module.SPLITS)}")
    return module.load(root, split, **options)


__all__ = ["CIRQuery", "CIRSplit", "Gallery", "DATASETS", "dataset_module", "load_split"]

"""``circot data check``: are a dataset's annotations and images complete and readable?

For each split (and each FashionIQ category) the check loads the annotations, compares the query and gallery
counts with the official ones, looks for every image the split needs (gallery, references, targets, CIRR
image-set members) on disk, and decodes a sample of them (or all of them with ``decode=True``). The report is
written in plain words; :attr:`CheckReport.ok` is False when anything is missing, unreadable or miscounted.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from circot.data import dataset_module, load_split
from circot.data.records import CIRSplit
from circot.errors import CircotError, DataError

logger = logging.getLogger(__name__)

DISPLAY_NAMES = {"fashioniq": "FashionIQ", "cirr": "CIRR", "circo": "CIRCO", "shapes": "shapes"}
_SHOW = 5  # how many missing / unreadable images to name in the text report


@dataclass
class SplitReport:
    """What one split (one FashionIQ category of a split) holds and lacks."""

    dataset: str
    split: str
    category: str | None = None
    error: str | None = None
    n_queries: int = 0
    expected_queries: int | None = None
    n_gallery: int = 0
    expected_gallery: int | None = None
    n_images: int = 0
    missing: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    undecodable: list[str] = field(default_factory=list)
    n_decoded: int = 0
    decode_all: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        name = DISPLAY_NAMES.get(self.dataset, self.dataset)
        return f"{name} {self.category} {self.split}" if self.category else f"{name} {self.split}"

    @property
    def count_problems(self) -> list[str]:
        problems = []
        if self.expected_queries is not None and self.n_queries != self.expected_queries:
            problems.append(f"{self.n_queries} queries instead of the official {self.expected_queries}")
        if self.expected_gallery is not None and self.n_gallery != self.expected_gallery:
            problems.append(
                f"a gallery of {self.n_gallery} images instead of the official {self.expected_gallery}"
            )
        return problems

    @property
    def ok(self) -> bool:
        return (
            self.error is None
            and not self.missing
            and not self.empty
            and not self.undecodable
            and not self.count_problems
        )

    def lines(self) -> list[str]:
        if self.error is not None:
            return [f"{self.label}: cannot be loaded: {self.error}"]

        def expect(n: int, expected: int | None, noun: str) -> str:
            return f"{n} {noun}" + (f" (expected {expected})" if expected is not None else "")

        lines = [
            f"{self.label}: {expect(self.n_queries, self.expected_queries, 'queries')}, "
            f"gallery of {expect(self.n_gallery, self.expected_gallery, 'images')}."
        ]
        found = self.n_images - len(self.missing)
        line = f"  images needed: {self.n_images}; found on disk: {found}; missing: {len(self.missing)}"
        if self.empty:
            line += f"; empty files: {len(self.empty)}"
        lines.append(line + ".")
        if self.n_decoded:
            what = "all of them" if self.decode_all else f"a random sample of {self.n_decoded}"
            bad = len(self.undecodable)
            lines.append(f"  decoded {what}: {'all readable' if not bad else f'{bad} could not be decoded'}.")
        for title, items in (
            ("missing", self.missing),
            ("empty", self.empty),
            ("unreadable", self.undecodable),
        ):
            if items:
                shown = ", ".join(items[:_SHOW]) + (
                    f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else ""
                )
                lines.append(f"  {title}: {shown}")
        for problem in self.count_problems:
            lines.append(f"  count problem: {problem}.")
        lines += [f"  note: {note}" for note in self.notes]
        lines.append("  OK" if self.ok else "  INCOMPLETE")
        return lines

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["label"] = self.label
        d["ok"] = self.ok
        d["count_problems"] = self.count_problems
        return d


@dataclass
class CheckReport:
    dataset: str
    root: Path
    splits: list[SplitReport]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.splits)

    def summary(self) -> str:
        bad = [s for s in self.splits if not s.ok]
        name = DISPLAY_NAMES.get(self.dataset, self.dataset)
        if not bad:
            return (
                f"{name} at {self.root}: complete ({len(self.splits)} split(s) checked, every image present)."
            )
        return (
            f"{name} at {self.root}: INCOMPLETE: {len(bad)} of {len(self.splits)} split(s) have problems "
            f"({', '.join(s.label for s in bad)})."
        )

    def format(self) -> str:
        lines: list[str] = []
        for s in self.splits:
            lines += s.lines()
        lines.append(self.summary())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "root": str(self.root),
            "ok": self.ok,
            "summary": self.summary(),
            "splits": [s.to_dict() for s in self.splits],
        }


def _needed_images(split: CIRSplit) -> tuple[list[str], dict[str, Path | None]]:
    ids: dict[str, None] = dict.fromkeys(split.gallery.ids)
    for q in split.queries:
        ids[q.reference] = None
        for t in q.targets:
            ids[t] = None
        for m in q.extras.get("members", ()) or ():
            ids[m] = None
    paths: dict[str, Path | None] = {}
    for image_id in ids:
        try:
            paths[image_id] = split.image_path(image_id)
        except KeyError:
            paths[image_id] = None
    return list(ids), paths


def _scan_sizes(folder: Path) -> dict[str, int]:
    sizes: dict[str, int] = {}
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    sizes[entry.name] = entry.stat().st_size
                except OSError:
                    sizes[entry.name] = 0
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        pass
    return sizes


def _decode(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
    except Exception as exc:  # any decoder failure means the file is unusable
        return f"{type(exc).__name__}: {exc}".splitlines()[0]
    return None


def check_loaded(
    split: CIRSplit,
    report: SplitReport,
    decode: bool = False,
    sample: int = 50,
    seed: int = 0,
    workers: int = 4,
    listings: dict[Path, dict[str, int]] | None = None,
) -> SplitReport:
    """Fill ``report`` with the image checks of a loaded split.

    ``listings`` caches folder listings (name -> size) between splits that share image folders.
    """
    ids, paths = _needed_images(split)
    report.n_images = len(ids)
    folders: dict[Path, dict[str, int]] = {} if listings is None else listings
    present: list[tuple[str, Path]] = []
    for image_id in ids:
        path = paths[image_id]
        if path is None:
            report.missing.append(f"{image_id} (no file known)")
            continue
        if path.parent not in folders:
            folders[path.parent] = _scan_sizes(path.parent)
        size = folders[path.parent].get(path.name)
        if size is None:
            report.missing.append(f"{image_id} ({path})")
        elif size == 0:
            report.empty.append(f"{image_id} ({path})")
        else:
            present.append((image_id, path))
    if decode:
        to_decode = present
        report.decode_all = True
    else:
        to_decode = random.Random(seed).sample(present, min(sample, len(present))) if sample > 0 else []
    if to_decode:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(pool.map(_decode, [p for _, p in to_decode]))
        report.n_decoded = len(to_decode)
        report.undecodable = [
            f"{i} ({p}: {err})" for (i, p), err in zip(to_decode, results, strict=True) if err
        ]
    return report


def _units(dataset: str, root: Path, split: str | None) -> list[tuple[str, str | None]]:
    module = dataset_module(dataset)
    if split is not None and split not in module.SPLITS:
        raise DataError(f"{dataset}: unknown split {split!r}; choose one of: {', '.join(module.SPLITS)}")
    splits: Iterable[str] = (split,) if split is not None else module.SPLITS
    if dataset == "fashioniq":
        return [(s, cat) for s in splits for cat in module.CATEGORIES]
    return [(s, None) for s in splits]


def check_dataset(
    dataset: str,
    root: str | Path,
    split: str | None = None,
    *,
    decode: bool = False,
    sample: int = 50,
    official_counts: bool = True,
    seed: int = 0,
) -> CheckReport:
    """Check one split (or every split) of ``dataset`` under ``root``.

    Args:
        decode: decode every image (slow on large galleries); otherwise a random ``sample`` is decoded.
        official_counts: compare query and gallery counts with the official ones (off for custom subsets).
    """
    root = Path(root)
    module = dataset_module(dataset)
    if not root.exists():
        raise DataError(f"{dataset}: root folder {str(root)!r} does not exist")
    units = _units(dataset, root, split)
    expected_table: dict = getattr(module, "EXPECTED_COUNTS", {}) if official_counts else {}
    reports = []
    listings: dict[Path, dict[str, int]] = {}
    for split_name, category in units:
        report = SplitReport(dataset=dataset, split=split_name, category=category)
        options = {"category": category} if category else {}
        try:
            loaded = load_split(dataset, root, split_name, **options)
        except CircotError as exc:
            report.error = str(exc)
            reports.append(report)
            continue
        key = (category, split_name) if category else split_name
        exp_q, exp_g = expected_table.get(key, (None, None))
        report.n_queries, report.expected_queries = len(loaded.queries), exp_q
        report.n_gallery, report.expected_gallery = len(loaded.gallery.ids), exp_g
        if dataset == "circo" and official_counts:
            from circot.data.circo import COCO_UNLABELED_IMAGES

            if report.n_gallery != COCO_UNLABELED_IMAGES:
                report.notes.append(
                    f"COCO 2017 unlabeled is commonly quoted at {COCO_UNLABELED_IMAGES} images; "
                    f"this image info file lists {report.n_gallery}"
                )
        check_loaded(loaded, report, decode=decode, sample=sample, seed=seed, listings=listings)
        logger.debug("checked %s", report.label)
        reports.append(report)
    return CheckReport(dataset=dataset, root=root, splits=reports)


__all__ = ["SplitReport", "CheckReport", "check_dataset", "check_loaded"]

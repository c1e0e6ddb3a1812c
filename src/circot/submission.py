"""Test-server files (CIRR, CIRCO), their validation, and local scoring of predictions files.

File formats:

* CIRR ``recall``: ``{"version": "rc2", "metric": "recall", "<pairid>": [50 image names], ...}`` -- the ranking
  with the reference removed; ``recall_subset``: the same with ``"metric": "recall_subset"`` and the first 3
  of that ranking filtered to the image set's members. One flat object each, compact JSON (no indentation),
  under 5 MB.
* CIRCO: ``{"<id>": [50 unique COCO image ids], ...}`` for every query id.
* FashionIQ predictions (for local scoring): ``{"dress": {"<index in cap.dress.<split>.json>": [ranked ids],
  ...}, "shirt": {...}, "toptee": {...}}`` with any subset of the categories.
* shapes predictions: ``{"<query_id>": [ranked ids], ...}``.

With a gallery smaller than 50 images (tiny test data) the lists hold every candidate instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circot import metrics
from circot.data._io import read_json, write_json_atomic
from circot.data.records import CIRSplit
from circot.errors import CircotError, DataError

logger = logging.getLogger(__name__)

CIRR_VERSION = "rc2"
CIRR_RECALL_K = 50
CIRR_SUBSET_K = 3
CIRCO_K = 50
CIRR_MAX_BYTES = 5_000_000
DEFAULT_SPLITS = {"cirr": "test1", "circo": "test"}
SUBMISSION_DATASETS = ("cirr", "circo")


# --------------------------------------------------------------------------------------------------------------
# writers


def cirr_submission(
    split: CIRSplit, scores: np.ndarray | None = None, *, ranked=None, subset_ranked=None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The CIRR ``recall`` and ``recall_subset`` objects, from a similarity matrix or from rankings.

    Rankings (query id -> ids, best first) must already exclude the reference; they are cut to 50 and 3.
    """
    _require(split, "cirr")
    if scores is not None:
        ranked = metrics.ranked_ids(split, scores, CIRR_RECALL_K, mask_reference=True)
        subset_ranked = metrics.cirr_subset_ranking(split, scores)
    if ranked is None or subset_ranked is None:
        raise CircotError("cirr_submission needs scores, or both ranked and subset_ranked")
    recall: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall"}
    subset: dict[str, Any] = {"version": CIRR_VERSION, "metric": "recall_subset"}
    for q in split.queries:
        recall[q.query_id] = [str(x) for x in ranked[q.query_id]][:CIRR_RECALL_K]
        subset[q.query_id] = [str(x) for x in subset_ranked[q.query_id]][:CIRR_SUBSET_K]
    return recall, subset


def circo_submission(
    split: CIRSplit, scores: np.ndarray | None = None, *, ranked=None
) -> dict[str, list[int]]:
    """The CIRCO object ``{str(id): [50 COCO ids as ints]}`` from a similarity matrix or from rankings."""
    _require(split, "circo")
    if scores is not None:
        ranked = metrics.ranked_ids(split, scores, CIRCO_K, mask_reference=False)
    if ranked is None:
        raise CircotError("circo_submission needs scores or ranked")
    return {q.query_id: [int(x) for x in ranked[q.query_id]][:CIRCO_K] for q in split.queries}


def write_cirr_submission(
    split: CIRSplit, out_dir: str | Path, scores: np.ndarray | None = None, *, ranked=None, subset_ranked=None
) -> tuple[Path, Path]:
    """Write ``cirr_<split>_recall.json`` and ``cirr_<split>_recall_subset.json`` (compact JSON) to ``out_dir``."""
    recall, subset = cirr_submission(split, scores, ranked=ranked, subset_ranked=subset_ranked)
    out_dir = Path(out_dir)
    paths = (
        write_json_atomic(out_dir / f"cirr_{split.split}_recall.json", recall),
        write_json_atomic(out_dir / f"cirr_{split.split}_recall_subset.json", subset),
    )
    size = paths[0].stat().st_size
    if size >= CIRR_MAX_BYTES:
        logger.warning("%s is %.2f MB; the CIRR server accepts at most 5 MB", paths[0], size / 1e6)
    return paths


def write_circo_submission(
    split: CIRSplit, path: str | Path, scores: np.ndarray | None = None, *, ranked=None
) -> Path:
    """Write the CIRCO top-50 file to ``path``."""
    return write_json_atomic(Path(path), circo_submission(split, scores, ranked=ranked))


def predictions(split: CIRSplit, scores: np.ndarray, k: int = 50) -> dict[str, Any]:
    """Predictions object in the format :func:`score_predictions` reads, for FashionIQ and shapes
    (CIRR and CIRCO use their test-server formats, see :func:`cirr_submission` / :func:`circo_submission`)."""
    if split.dataset == "fashioniq":
        ranked = metrics.ranked_ids(split, scores, k)
        out: dict[str, dict[str, list[str]]] = {}
        for q in split.queries:
            out.setdefault(q.extras["category"], {})[str(q.extras["index"])] = ranked[q.query_id]
        return out
    if split.dataset == "shapes":
        return metrics.ranked_ids(split, scores, k)
    raise CircotError(f"use the test-server writers for {split.dataset}")


def write_predictions(split: CIRSplit, path: str | Path, scores: np.ndarray, k: int = 50) -> Path:
    return write_json_atomic(Path(path), predictions(split, scores, k))


def _require(split: CIRSplit, dataset: str) -> None:
    if split.dataset != dataset:
        raise CircotError(f"expected a {dataset} split, got {split.dataset}")


# --------------------------------------------------------------------------------------------------------------
# validation


@dataclass
class FileReport:
    """Validation result of one submission file.

    ``problems`` make the file wrong; ``format_problems`` (CIRR size limit, indentation) make the server refuse
    it but do not change its metrics, so local scoring accepts them; ``warnings`` are advice.
    """

    path: Path
    dataset: str
    metric: str | None = None
    n_queries: int = 0
    size_bytes: int = 0
    problems: list[str] = field(default_factory=list)
    format_problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    data: Any = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.format_problems

    @property
    def all_problems(self) -> list[str]:
        return self.problems + self.format_problems

    def line(self) -> str:
        what = f"{self.dataset} {self.metric}" if self.metric else self.dataset
        if self.ok:
            text = f"{self.path}: ok ({what}, {self.n_queries} queries, {self.size_bytes / 1e6:.2f} MB)"
        else:
            text = f"{self.path}: {len(self.all_problems)} problem(s): {self.all_problems[0]}"
        if self.warnings:
            text += f"; warning: {self.warnings[0]}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "dataset": self.dataset,
            "metric": self.metric,
            "ok": self.ok,
            "n_queries": self.n_queries,
            "size_bytes": self.size_bytes,
            "problems": self.all_problems,
            "warnings": self.warnings,
        }


def _load_file(path: Path, report: FileReport, compact: bool = False) -> Any:
    try:
        report.size_bytes = path.stat().st_size
    except OSError:
        report.problems.append("file does not exist")
        return None
    try:
        data = read_json(path, "submission file", reject_duplicate_keys=True)
    except DataError as exc:
        report.problems.append(str(exc).replace(f"{path}: ", ""))
        return None
    if not isinstance(data, dict):
        report.problems.append(f"expected one JSON object, got a {type(data).__name__}")
        return None
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    if "\n" in text:
        message = "the JSON is indented over several lines; write it compact (no indent=)"
        (report.format_problems if compact else report.warnings).append(message)
    return data


def _check_ids(
    report: FileReport,
    data: Mapping[str, Any],
    expected_ids: Sequence[str],
    ignore: Sequence[str] = (),
) -> list[str]:
    keys = [k for k in data if k not in ignore]
    expected = set(expected_ids)
    missing = [q for q in expected_ids if q not in data]
    unknown = [k for k in keys if k not in expected]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        report.problems.append(f"query id {missing[0]!r} is missing{more}")
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        report.problems.append(f"unknown query id {unknown[0]!r}{more}")
    report.n_queries = len([k for k in keys if k in expected])
    return [k for k in keys if k in expected]


def _check_list(
    report: FileReport,
    qid: str,
    value: Any,
    length: int,
    allowed: set[str],
    allowed_what: str,
    forbidden: str | None = None,
    ints: bool = False,
) -> None:
    if not isinstance(value, list):
        report.problems.append(f"query {qid!r}: expected a list of image ids, got {type(value).__name__}")
        return
    if len(value) != length:
        report.problems.append(f"query {qid!r}: {len(value)} image ids instead of {length}")
    names = []
    for v in value:
        if ints:
            ok = (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, str) and v.isdigit())
        else:
            ok = isinstance(v, str)
        if not ok:
            kind = "an integer COCO id" if ints else "an image name string"
            report.problems.append(f"query {qid!r}: {v!r} is not {kind}")
            return
        names.append(str(int(v)) if ints else v)
    dup = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if dup is not None:
        report.problems.append(f"query {qid!r}: image id {dup!r} appears twice")
    if forbidden is not None and forbidden in names:
        report.problems.append(f"query {qid!r}: the reference image {forbidden!r} must not be in the ranking")
    outside = [n for n in names if n not in allowed and n != forbidden]
    if outside:
        report.problems.append(f"query {qid!r}: {outside[0]!r} is not {allowed_what}")


def validate_cirr_file(split: CIRSplit, path: str | Path) -> FileReport:
    """Check one CIRR test-server file (``recall`` or ``recall_subset``) against ``split``."""
    path = Path(path)
    report = FileReport(path=path, dataset="cirr")
    data = _load_file(path, report, compact=True)
    if data is None:
        return report
    if report.size_bytes >= CIRR_MAX_BYTES:
        report.format_problems.append(
            f"file is {report.size_bytes / 1e6:.2f} MB; the CIRR server accepts at most 5 MB"
        )
    if data.get("version") != CIRR_VERSION:
        report.problems.append(f"'version' must be {CIRR_VERSION!r}, got {data.get('version')!r}")
    metric = data.get("metric")
    if metric not in ("recall", "recall_subset"):
        report.problems.append(f"'metric' must be 'recall' or 'recall_subset', got {metric!r}")
        return report
    report.metric = metric
    queries = {q.query_id: q for q in split.queries}
    keys = _check_ids(report, data, list(queries), ignore=("version", "metric"))
    gallery = set(split.gallery.ids)
    for qid in keys:
        q = queries[qid]
        if metric == "recall":
            length = min(CIRR_RECALL_K, len(gallery) - 1)
            _check_list(report, qid, data[qid], length, gallery, "in the gallery", forbidden=q.reference)
        else:
            members = set(q.extras.get("members", ())) - {q.reference}
            length = min(CIRR_SUBSET_K, len(members))
            _check_list(
                report, qid, data[qid], length, members, "a member of its image set", forbidden=q.reference
            )
    report.data = data
    return report


def validate_circo_file(split: CIRSplit, path: str | Path) -> FileReport:
    """Check a CIRCO test-server file: every query id, 50 unique gallery ids each."""
    path = Path(path)
    report = FileReport(path=path, dataset="circo", metric="mAP")
    data = _load_file(path, report)
    if data is None:
        return report
    keys = _check_ids(report, data, [q.query_id for q in split.queries])
    gallery = set(split.gallery.ids)
    length = min(CIRCO_K, len(gallery))
    for qid in keys:
        _check_list(report, qid, data[qid], length, gallery, "in the COCO 2017 unlabeled gallery", ints=True)
    report.data = data
    return report


def validate_files(split: CIRSplit, paths: Sequence[str | Path]) -> list[FileReport]:
    """Validate CIRR (one or two files, one per metric) or CIRCO (one file) submissions."""
    if not paths:
        raise CircotError("no files to validate")
    if split.dataset == "cirr":
        reports = [validate_cirr_file(split, p) for p in paths]
        metrics_seen = [r.metric for r in reports if r.metric]
        for m in set(metrics_seen):
            if metrics_seen.count(m) > 1:
                reports[-1].problems.append(f"more than one file with metric {m!r}")
        return reports
    if split.dataset == "circo":
        if len(paths) != 1:
            raise CircotError(f"CIRCO takes one submission file, got {len(paths)}")
        return [validate_circo_file(split, paths[0])]
    raise CircotError(f"no test server for {split.dataset}; choose one of: {', '.join(SUBMISSION_DATASETS)}")


def raise_for_reports(reports: Sequence[FileReport], include_format: bool = True) -> None:
    """Raise a one-line :class:`CircotError` for the first file with problems (``include_format=False``:
    ignore size and indentation, which do not change the metrics)."""
    for r in reports:
        problems = r.all_problems if include_format else r.problems
        if problems:
            more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
            raise CircotError(f"{r.path}: {problems[0]}{more}")


# --------------------------------------------------------------------------------------------------------------
# local scoring


def _read_predictions(path: Path) -> dict[str, Any]:
    data = read_json(path, "predictions file", reject_duplicate_keys=True)
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected one JSON object, got a {type(data).__name__}")
    return data


def _score_fashioniq(split: CIRSplit, paths: Sequence[Path]) -> metrics.EvalResult:
    if len(paths) != 1:
        raise CircotError(f"FashionIQ takes one predictions file, got {len(paths)}")
    path = paths[0]
    data = _read_predictions(path)
    galleries: dict[str, list[str]] = getattr(split, "category_galleries", {})
    unknown = [c for c in data if c not in galleries]
    if unknown:
        raise DataError(f"{path}: unknown category {unknown[0]!r}; expected some of: {', '.join(galleries)}")
    if not data:
        raise DataError(f"{path}: no category in the predictions")
    ranked: dict[str, Any] = {}
    for cat, per_query in data.items():
        if not isinstance(per_query, dict):
            raise DataError(f"{path}: {cat!r} must map query indices to ranked image ids")
        for index, ids in per_query.items():
            ranked[f"{cat}/{index}"] = ids
        known = {str(q.extras["index"]) for q in split.queries if q.extras["category"] == cat}
        extra = [i for i in per_query if i not in known]
        if extra:
            raise DataError(f"{path}: {cat!r}: unknown query index {extra[0]!r}")
    sub = dataclasses.replace(
        split,
        queries=[q for q in split.queries if q.extras["category"] in data],
        category_galleries={c: g for c, g in galleries.items() if c in data},
    )
    return metrics.evaluate_ranked(sub, ranked, source=f"predictions file {path.name}")


def _score_generic(split: CIRSplit, paths: Sequence[Path]) -> metrics.EvalResult:
    if len(paths) != 1:
        raise CircotError(f"{split.dataset} takes one predictions file, got {len(paths)}")
    data = _read_predictions(paths[0])
    known = {q.query_id for q in split.queries}
    extra = [k for k in data if k not in known]
    if extra:
        raise DataError(f"{paths[0]}: unknown query id {extra[0]!r}")
    return metrics.evaluate_ranked(split, data, source=f"predictions file {paths[0].name}")


def score_predictions(split: CIRSplit, paths: Sequence[str | Path]) -> metrics.EvalResult:
    """Official metrics of predictions files in the test-server formats (see the module docstring)."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise CircotError("no predictions file given")
    if not any(q.targets for q in split.queries):
        raise CircotError(f"{split.dataset} {split.split} has no public ground truth to score against")
    if split.dataset == "fashioniq":
        return _score_fashioniq(split, paths)
    if split.dataset == "shapes":
        return _score_generic(split, paths)
    reports = validate_files(split, paths)
    raise_for_reports(reports, include_format=False)
    for r in reports:
        for w in r.format_problems + r.warnings:
            logger.warning("%s: %s", r.path, w)
    if split.dataset == "cirr":
        by_metric = {r.metric: r for r in reports}
        if "recall" not in by_metric:
            raise CircotError("CIRR scoring needs the recall file (metric 'recall')")
        recall = {k: v for k, v in by_metric["recall"].data.items() if k not in ("version", "metric")}
        subset = None
        if "recall_subset" in by_metric:
            subset = {
                k: v for k, v in by_metric["recall_subset"].data.items() if k not in ("version", "metric")
            }
        names = " + ".join(r.path.name for r in reports)
        return metrics.evaluate_ranked(split, recall, subset, source=f"test-server files {names}")
    return metrics.evaluate_ranked(split, reports[0].data, source=f"test-server file {reports[0].path.name}")


__all__ = [
    "cirr_submission",
    "circo_submission",
    "write_cirr_submission",
    "write_circo_submission",
    "predictions",
    "write_predictions",
    "FileReport",
    "validate_cirr_file",
    "validate_circo_file",
    "validate_files",
    "raise_for_reports",
    "score_predictions",
]

"""Official CIR metrics for FashionIQ, CIRR, CIRCO and the shapes world, in one module.

Everything works from either a similarity matrix ``scores`` of shape ``(n_queries, n_gallery)`` (columns in
the order of ``split.gallery.ids``) or from ranked id lists (one list per query id, best first), which is
what the test-server files hold. Similarities are cast to float32 and ranked with a stable sort, so ties are
broken by gallery order and results are deterministic.

Protocols (see the conventions reference of the project):

* FashionIQ: per category R@10 and R@50 (reference kept in the ranking), their means over the categories
  present and ``Avg = (mean R@10 + mean R@50) / 2``.
* CIRR: R@1/5/10/50 on the ranking with the reference removed; Recall_subset@1/2/3 on the same ranking
  filtered to the image set's members (members minus reference: 5 candidates); ``Avg = (R@5 + Rs@1) / 2``.
* CIRCO: mAP@5/10/25/50 with ``AP@K = sum_{i<=K} P@i * rel_i / min(K, |GT|)``; Recall@K on ``target_img_id``;
  mAP@10 per semantic aspect. The reference is not removed.
* shapes: R@1/5/10 (any ground truth in the top K) and mAP@5/10 over multiple ground truths, plus R@1 per
  ``extras["family"]`` and per ``extras["subset"]``. The reference is not removed.

Every community-varying choice is a named option and is stored in :attr:`EvalResult.conventions`, which
:meth:`EvalResult.format` prints beside the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from circot.data.records import CIRQuery, CIRSplit
from circot.errors import CircotError

logger = logging.getLogger(__name__)

FASHIONIQ_CATEGORIES = ("dress", "shirt", "toptee")
FASHIONIQ_KS = (10, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
CIRCO_KS = (5, 10, 25, 50)
CIRCO_ASPECT_K = 10
SHAPES_RECALL_KS = (1, 5, 10)
SHAPES_MAP_KS = (5, 10)

# Whether the reference image is removed from the ranking, per dataset, as the official protocol does it.
DEFAULT_MASK_REFERENCE = {"fashioniq": False, "cirr": True, "circo": False, "shapes": False}

# Depth of the ranked lists each dataset's metrics need.
RANK_DEPTH = {"fashioniq": 50, "cirr": 50, "circo": 50, "shapes": 10}

_SORT_NOTE = "fp32 scores, stable sort (ties broken by gallery order)"


@dataclass
class EvalResult:
    """Metrics of one evaluation (percentages) with the conventions that produced them."""

    dataset: str
    split: str
    metrics: dict[str, float]
    conventions: dict[str, Any]
    n_queries: int
    n_gallery: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "split": self.split,
            "n_queries": self.n_queries,
            "n_gallery": self.n_gallery,
            "metrics": dict(self.metrics),
            "conventions": dict(self.conventions),
            "counts": dict(self.counts),
        }

    def format(self) -> str:
        """A plain-text table of the metrics followed by the conventions used."""
        lines = [f"{self.dataset} {self.split}: {self.n_queries} queries, gallery of {self.n_gallery} images"]
        if self.dataset == "fashioniq":
            lines += _format_fashioniq(self.metrics)
        else:
            lines += _format_flat(self.metrics, self.counts)
        lines.append("conventions:")
        for key, value in self.conventions.items():
            lines.append(f"  {key} = {value}")
        return "\n".join(lines)


def _format_flat(metrics: Mapping[str, float], counts: Mapping[str, int]) -> list[str]:
    main = [(k, v) for k, v in metrics.items() if "|" not in k]
    groups = [(k, v) for k, v in metrics.items() if "|" in k]
    lines = []
    if main:
        width = max(len(k) for k, _ in main)
        lines += [f"  {k:<{width}}  {v:7.2f}" for k, v in main]
    if groups:
        width = max(len(k) for k, _ in groups)
        lines.append("  breakdown:")
        for k, v in groups:
            n = counts.get(k.split("|", 1)[1])
            suffix = f"  (n={n})" if n is not None else ""
            lines.append(f"    {k:<{width}}  {v:7.2f}{suffix}")
    return lines


def _format_fashioniq(metrics: Mapping[str, float]) -> list[str]:
    rows = [c for c in FASHIONIQ_CATEGORIES if f"{c}/R@10" in metrics] + ["avg"]
    lines = [f"  {'category':<9} {'R@10':>7} {'R@50':>7} {'Avg':>7}"]
    for row in rows:
        r10, r50 = metrics.get(f"{row}/R@10", float("nan")), metrics.get(f"{row}/R@50", float("nan"))
        avg = metrics["Avg"] if row == "avg" else (r10 + r50) / 2
        lines.append(f"  {row:<9} {r10:7.2f} {r50:7.2f} {avg:7.2f}")
    return lines


# --------------------------------------------------------------------------------------------------------------
# ranking


def rank(scores: np.ndarray, k: int | None = None) -> np.ndarray:
    """Indices of the top-``k`` columns of each row, by descending score; ties are broken by column index.

    Args:
        scores: ``(q, g)`` similarities (cast to float32). A 1-D array is treated as one row.
        k: how many indices per row; ``None`` ranks every column.

    Returns:
        ``(q, min(k, g))`` int64 array of column indices.
    """
    s = np.asarray(scores, dtype=np.float32)
    if s.ndim == 1:
        s = s[None, :]
    if s.ndim != 2:
        raise CircotError(f"scores must be a 2-D array (queries x gallery), got shape {s.shape}")
    if np.isnan(s).any():
        raise CircotError("scores contain NaN values")
    q, g = s.shape
    k = g if k is None else max(0, min(int(k), g))
    out = np.empty((q, k), dtype=np.int64)
    if k == 0 or q == 0:
        return out
    if 4 * k >= g:
        chunk = max(1, (1 << 24) // max(g, 1))
        for start in range(0, q, chunk):
            out[start : start + chunk] = np.argsort(-s[start : start + chunk], axis=1, kind="stable")[:, :k]
        return out
    # Partial sort: every column scoring at least the k-th largest value is a candidate (ties included, so the
    # stable order among them is exact), then a stable sort of the few candidates.
    kth = np.partition(s, g - k, axis=1)[:, g - k]
    for i in range(q):
        row = s[i]
        cand = np.flatnonzero(row >= kth[i])
        out[i] = cand[np.argsort(-row[cand], kind="stable")[:k]]
    return out


def _check_scores(split: CIRSplit, scores: np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float32)
    expected = (len(split.queries), len(split.gallery.ids))
    if s.shape != expected:
        raise CircotError(
            f"scores have shape {tuple(s.shape)} but {split.dataset} {split.split} needs {expected} "
            "(queries x gallery images)"
        )
    if np.isnan(s).any():
        raise CircotError("scores contain NaN values")
    return s


def _candidate_groups(split: CIRSplit) -> list[tuple[list[int], list[int]]]:
    """(query rows, gallery columns) groups: FashionIQ ranks each category within its own gallery."""
    rows_all = list(range(len(split.queries)))
    galleries = getattr(split, "category_galleries", None) or {}
    if split.dataset != "fashioniq" or len(galleries) <= 1:
        return [(rows_all, list(range(len(split.gallery.ids))))]
    col = {image_id: j for j, image_id in enumerate(split.gallery.ids)}
    by_cat: dict[str, list[int]] = {}
    for i, query in enumerate(split.queries):
        by_cat.setdefault(query.extras.get("category", ""), []).append(i)
    groups = []
    for cat, rows in by_cat.items():
        if cat not in galleries:
            raise CircotError(f"fashioniq: query category {cat!r} has no gallery in this split")
        groups.append((rows, [col[image_id] for image_id in galleries[cat]]))
    return groups


def ranked_ids(
    split: CIRSplit, scores: np.ndarray, k: int | None = None, mask_reference: bool | None = None
) -> dict[str, list[str]]:
    """Top-``k`` gallery ids per query id from a similarity matrix.

    ``mask_reference`` removes the query's reference image from its ranking (default: the dataset's official
    protocol, see :data:`DEFAULT_MASK_REFERENCE`). FashionIQ queries are ranked within their category's gallery.
    """
    s = _check_scores(split, scores)
    if mask_reference is None:
        mask_reference = DEFAULT_MASK_REFERENCE.get(split.dataset, False)
    k = len(split.gallery.ids) if k is None else k
    out: dict[str, list[str]] = {}
    for rows, cols in _candidate_groups(split):
        ids = np.asarray(split.gallery.ids, dtype=object)[cols]
        sub = s[np.ix_(rows, cols)] if len(cols) != s.shape[1] else s[rows]
        top = rank(sub, k + 1 if mask_reference else k)
        for r, row_top in zip(rows, top, strict=True):
            query = split.queries[r]
            names = ids[row_top].tolist()
            if mask_reference:
                names = [n for n in names if n != query.reference][:k]
            out[query.query_id] = names
    return out


def cirr_subset_ranking(split: CIRSplit, scores: np.ndarray) -> dict[str, list[str]]:
    """Ranking of each CIRR query's image-set members minus its reference (the Recall_subset candidates).

    Equivalent to filtering the full reference-free ranking to the members: members are ordered by score,
    ties by gallery order.
    """
    s = _check_scores(split, scores)
    col = {image_id: j for j, image_id in enumerate(split.gallery.ids)}
    out: dict[str, list[str]] = {}
    for i, query in enumerate(split.queries):
        members = [m for m in query.extras.get("members", ()) if m != query.reference]
        missing = [m for m in members if m not in col]
        if missing:
            raise CircotError(f"cirr query {query.query_id}: member {missing[0]!r} is not in the gallery")
        cols = sorted(col[m] for m in members)
        order = np.argsort(-s[i, cols], kind="stable")
        out[query.query_id] = [split.gallery.ids[cols[j]] for j in order]
    return out


# --------------------------------------------------------------------------------------------------------------
# per-query measures


def average_precision_at_k(ranked: Sequence[str], ground_truth: Sequence[str] | set[str], k: int) -> float:
    """CIRCO AP@K: sum over the top K of precision-at-hit, divided by ``min(K, |GT|)``. Returns a fraction."""
    gt = set(ground_truth)
    if not gt:
        raise CircotError("average precision needs at least one ground-truth image")
    hits = 0
    total = 0.0
    for i, image_id in enumerate(ranked[:k], start=1):
        if image_id in gt:
            hits += 1
            total += hits / i
    return total / min(k, len(gt))


def _hit_at(ranked: Sequence[str], targets: Sequence[str] | set[str], k: int) -> bool:
    return any(image_id in targets for image_id in ranked[:k])


def _pct(values: Sequence[float] | np.ndarray) -> float:
    return float(100.0 * np.mean(np.asarray(values, dtype=np.float64))) if len(values) else float("nan")


# --------------------------------------------------------------------------------------------------------------
# dataset metrics from ranked lists


def fashioniq_metrics(queries: Sequence[CIRQuery], ranked: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Per-category R@10/R@50, their means over the categories present, and Avg = (R@10 + R@50) / 2."""
    by_cat: dict[str, list[CIRQuery]] = {}
    for query in queries:
        by_cat.setdefault(query.extras.get("category", "all"), []).append(query)
    metrics: dict[str, float] = {}
    cats = [c for c in FASHIONIQ_CATEGORIES if c in by_cat] + sorted(set(by_cat) - set(FASHIONIQ_CATEGORIES))
    for cat in cats:
        for k in FASHIONIQ_KS:
            metrics[f"{cat}/R@{k}"] = _pct(
                [_hit_at(ranked[q.query_id], q.targets[:1], k) for q in by_cat[cat]]
            )
    for k in FASHIONIQ_KS:
        metrics[f"avg/R@{k}"] = float(np.mean([metrics[f"{c}/R@{k}"] for c in cats]))
    metrics["Avg"] = (metrics["avg/R@10"] + metrics["avg/R@50"]) / 2
    return metrics


def cirr_metrics(
    queries: Sequence[CIRQuery],
    ranked: Mapping[str, Sequence[str]],
    subset_ranked: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, float]:
    """R@1/5/10/50 on reference-free rankings; Rs@1/2/3 and Avg when subset rankings are given."""
    metrics = {
        f"R@{k}": _pct([_hit_at(ranked[q.query_id], q.targets[:1], k) for q in queries]) for k in CIRR_KS
    }
    if subset_ranked is not None:
        for k in CIRR_SUBSET_KS:
            metrics[f"Rs@{k}"] = _pct([_hit_at(subset_ranked[q.query_id], q.targets[:1], k) for q in queries])
        metrics["Avg"] = (metrics["R@5"] + metrics["Rs@1"]) / 2
    return metrics


def circo_metrics(
    queries: Sequence[CIRQuery], ranked: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], dict[str, int]]:
    """mAP@5/10/25/50, Recall@K on target_img_id, and mAP@10 per semantic aspect (with per-aspect counts)."""
    metrics: dict[str, float] = {}
    for k in CIRCO_KS:
        metrics[f"mAP@{k}"] = _pct(
            [average_precision_at_k(ranked[q.query_id], q.targets, k) for q in queries]
        )
    for k in CIRCO_KS:
        metrics[f"R@{k}"] = _pct([_hit_at(ranked[q.query_id], q.targets[:1], k) for q in queries])
    aspects: dict[str, list[float]] = {}
    for q in queries:
        ap = average_precision_at_k(ranked[q.query_id], q.targets, CIRCO_ASPECT_K)
        for aspect in q.extras.get("semantic_aspects") or ():
            aspects.setdefault(str(aspect), []).append(ap)
    counts: dict[str, int] = {}
    for aspect in sorted(aspects):
        metrics[f"mAP@{CIRCO_ASPECT_K}|aspect={aspect}"] = _pct(aspects[aspect])
        counts[f"aspect={aspect}"] = len(aspects[aspect])
    return metrics, counts


def shapes_metrics(
    queries: Sequence[CIRQuery], ranked: Mapping[str, Sequence[str]]
) -> tuple[dict[str, float], dict[str, int]]:
    """R@1/5/10 and mAP@5/10 over multiple ground truths, plus R@1 per family and per subset."""
    metrics: dict[str, float] = {}
    for k in SHAPES_RECALL_KS:
        metrics[f"R@{k}"] = _pct([_hit_at(ranked[q.query_id], set(q.targets), k) for q in queries])
    for k in SHAPES_MAP_KS:
        metrics[f"mAP@{k}"] = _pct(
            [average_precision_at_k(ranked[q.query_id], q.targets, k) for q in queries]
        )
    counts: dict[str, int] = {}
    for key in ("family", "subset"):
        groups: dict[str, list[bool]] = {}
        for q in queries:
            value = q.extras.get(key)
            if value is not None:
                groups.setdefault(str(value), []).append(_hit_at(ranked[q.query_id], set(q.targets), 1))
        for value in sorted(groups):
            metrics[f"R@1|{key}={value}"] = _pct(groups[value])
            counts[f"{key}={value}"] = len(groups[value])
    return metrics, counts


# --------------------------------------------------------------------------------------------------------------
# evaluation entry points


def _evaluable_queries(split: CIRSplit) -> list[CIRQuery]:
    queries = [q for q in split.queries if q.targets]
    if not queries:
        raise CircotError(
            f"{split.dataset} {split.split} has no public ground truth; "
            "write a test-server file (circot.submission) instead of evaluating"
        )
    if len(queries) != len(split.queries):
        logger.warning("%d queries without ground truth are skipped", len(split.queries) - len(queries))
    return queries


def _n_candidates(split: CIRSplit, query: CIRQuery) -> int:
    galleries = getattr(split, "category_galleries", None) or {}
    cat = query.extras.get("category")
    if split.dataset == "fashioniq" and cat in galleries:
        return len(galleries[cat])
    return len(split.gallery.ids)


def _compute(
    split: CIRSplit,
    queries: list[CIRQuery],
    ranked: Mapping[str, Sequence[str]],
    subset_ranked: Mapping[str, Sequence[str]] | None,
    conventions: dict[str, Any],
) -> EvalResult:
    counts: dict[str, int] = {}
    if split.dataset == "fashioniq":
        metrics = fashioniq_metrics(queries, ranked)
    elif split.dataset == "cirr":
        metrics = cirr_metrics(queries, ranked, subset_ranked)
    elif split.dataset == "circo":
        metrics, counts = circo_metrics(queries, ranked)
    elif split.dataset == "shapes":
        metrics, counts = shapes_metrics(queries, ranked)
    else:
        raise CircotError(f"no metrics defined for dataset {split.dataset!r}")
    return EvalResult(
        dataset=split.dataset,
        split=split.split,
        metrics=metrics,
        conventions=conventions,
        n_queries=len(queries),
        n_gallery=len(split.gallery.ids),
        counts=counts,
    )


def _conventions(split: CIRSplit, mask_reference: bool, source: str) -> dict[str, Any]:
    conv: dict[str, Any] = dict(split.conventions)
    conv["mask_reference"] = mask_reference
    official = DEFAULT_MASK_REFERENCE.get(split.dataset)
    if official is not None and mask_reference != official:
        conv["mask_reference"] = f"{mask_reference} (differs from the official protocol)"
    if split.dataset == "cirr":
        conv["recall_subset"] = "ranking filtered to img_set members minus the reference (5 candidates)"
    if split.dataset == "circo":
        conv["recall"] = "R@K counts target_img_id only"
    conv["ranking"] = _SORT_NOTE if source == "scores" else source
    return conv


def evaluate(split: CIRSplit, scores: np.ndarray, *, mask_reference: bool | None = None) -> EvalResult:
    """Official metrics of a similarity matrix ``(n_queries, len(split.gallery.ids))``.

    Args:
        split: the loaded split (queries with ground truth, gallery).
        scores: similarities; higher is better. Cast to float32; stable sort.
        mask_reference: remove each query's reference from its ranking. ``None`` = the dataset's official
            protocol (CIRR: removed; FashionIQ, CIRCO, shapes: kept). Recorded in the result's conventions.
    """
    s = _check_scores(split, scores)
    if mask_reference is None:
        mask_reference = DEFAULT_MASK_REFERENCE.get(split.dataset, False)
    queries = _evaluable_queries(split)
    keep = {q.query_id for q in queries}
    rows = [i for i, q in enumerate(split.queries) if q.query_id in keep]
    if len(rows) != len(split.queries):
        split, s = dataclasses.replace(split, queries=queries), s[rows]
    depth = RANK_DEPTH.get(split.dataset, 50)
    ranked = ranked_ids(split, s, depth, mask_reference=mask_reference)
    subset = cirr_subset_ranking(split, s) if split.dataset == "cirr" else None
    return _compute(split, queries, ranked, subset, _conventions(split, mask_reference, "scores"))


def _normalise_ranking(query_id: str, values: Any, gallery: set[str] | None, what: str) -> list[str]:
    if not isinstance(values, list | tuple):
        raise CircotError(
            f"{what}: query {query_id!r}: expected a list of image ids, got {type(values).__name__}"
        )
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, str | int):
            raise CircotError(f"{what}: query {query_id!r}: image id {v!r} is not a string or integer")
        out.append(str(v))
    seen: set[str] = set()
    for v in out:
        if v in seen:
            raise CircotError(f"{what}: query {query_id!r}: image id {v!r} appears twice in its ranking")
        seen.add(v)
    if gallery is not None:
        for v in out:
            if v not in gallery:
                raise CircotError(f"{what}: query {query_id!r}: image id {v!r} is not in the gallery")
    return out


def evaluate_ranked(
    split: CIRSplit,
    ranked: Mapping[str, Sequence[str | int]],
    subset_ranked: Mapping[str, Sequence[str | int]] | None = None,
    *,
    source: str = "ranked lists",
    check_gallery: bool = True,
) -> EvalResult:
    """Official metrics of ranked id lists (best first), e.g. read from a test-server file.

    Every query with ground truth must have a ranking of unique gallery ids that is at least as deep as the
    metrics need (50, or the number of candidates when the gallery is smaller). CIRR rankings must exclude the
    reference; ``subset_ranked`` (CIRR only) holds the Recall_subset rankings (at least 3 members each).
    """
    queries = _evaluable_queries(split)
    gallery = set(split.gallery.ids) if check_gallery else None
    depth = RANK_DEPTH.get(split.dataset, 50)
    norm: dict[str, list[str]] = {}
    for q in queries:
        if q.query_id not in ranked:
            missing = sum(1 for x in queries if x.query_id not in ranked)
            raise CircotError(
                f"{source}: no ranking for query {q.query_id!r}"
                + (f" (and {missing - 1} more queries missing)" if missing > 1 else "")
            )
        ids = _normalise_ranking(q.query_id, ranked[q.query_id], gallery, source)
        need = min(depth, _n_candidates(split, q) - 1)
        if len(ids) < need:
            raise CircotError(f"{source}: query {q.query_id!r} has {len(ids)} ids; the metrics need {need}")
        if split.dataset == "cirr" and q.reference in ids:
            raise CircotError(
                f"{source}: query {q.query_id!r}: the reference {q.reference!r} is in the ranking; "
                "CIRR rankings must exclude it"
            )
        norm[q.query_id] = ids
    norm_subset = None
    if subset_ranked is not None:
        if split.dataset != "cirr":
            raise CircotError("subset rankings exist only for CIRR")
        norm_subset = {}
        for q in queries:
            if q.query_id not in subset_ranked:
                raise CircotError(f"{source}: no recall_subset ranking for query {q.query_id!r}")
            ids = _normalise_ranking(q.query_id, subset_ranked[q.query_id], gallery, source)
            members = set(q.extras.get("members", ())) - {q.reference}
            need = min(max(CIRR_SUBSET_KS), len(members))
            if len(ids) < need:
                raise CircotError(f"{source}: query {q.query_id!r} has {len(ids)} subset ids; need {need}")
            outside = [v for v in ids if v not in members]
            if outside:
                raise CircotError(
                    f"{source}: query {q.query_id!r}: subset id {outside[0]!r} is not a member of its image set "
                    "(members minus the reference)"
                )
            norm_subset[q.query_id] = ids
    conv = dict(split.conventions)
    conv["ranking"] = source
    conv["mask_reference"] = "as in the rankings"
    if split.dataset == "circo":
        conv["recall"] = "R@K counts target_img_id only"
    if split.dataset == "cirr":
        conv["mask_reference"] = True
        conv["recall_subset"] = (
            "from the recall_subset rankings"
            if norm_subset is not None
            else "not scored (no recall_subset file)"
        )
    return _compute(split, queries, norm, norm_subset, conv)


__all__ = [
    "EvalResult",
    "rank",
    "ranked_ids",
    "cirr_subset_ranking",
    "average_precision_at_k",
    "fashioniq_metrics",
    "cirr_metrics",
    "circo_metrics",
    "shapes_metrics",
    "evaluate",
    "evaluate_ranked",
    "DEFAULT_MASK_REFERENCE",
]

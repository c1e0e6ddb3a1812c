"""The whole benchmark in one call: what ``circot eval`` runs.

load split → embed the gallery (embedding cache) → reason about and embed each query through the one query path
(:func:`circot.search.embed_queries`; in ``full`` mode a CoT found in the cache, keyed by model fingerprint,
reference-image hash and text, is given instead of generated) → similarity matrix →
official metrics (:func:`circot.metrics.evaluate`) → for the shapes world, the reasoning scores of the generated
CoT against the gold one (:func:`circot.data.shapes.score_cot`) → test-server / predictions files on request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circot.cache import CoTCache, EmbeddingCache, default_cache_dir, hash_file
from circot.data.records import CIRSplit
from circot.errors import CircotError, DataError
from circot.gallery import encode_gallery
from circot.jsonout import SCORE_DIGITS, rounded
from circot.prompts import CoT
from circot.search import MODES, matrix_best_match, shown_cots

logger = logging.getLogger(__name__)


@dataclass
class EvaluationReport:
    """Result of :func:`evaluate`: metrics (None when the split has no public ground truth), reasoning scores,
    timings (seconds), cache use and the files written."""

    dataset: str
    split: str
    mode: str
    model_fingerprint: str
    n_queries: int
    n_gallery: int
    metrics: Any = None  # circot.metrics.EvalResult
    cot_scores: dict[str, float] | None = None
    cot_scores_by_group: dict[str, dict[str, float]] | None = None  # shapes: per edit family and subset
    timings: dict[str, float] = field(default_factory=dict)
    cache: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    model: str | None = None
    query_ids: list[str] = field(default_factory=list)
    cots: list[CoT | None] = field(default_factory=list)
    scores: np.ndarray | None = None  # (n_queries, n_gallery) similarity matrix
    reasoner: str = "local"  # where the CoTs came from (circot.reasoner)

    def to_dict(self, with_cots: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "split": self.split,
            "mode": self.mode,
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "reasoner": self.reasoner,
            "n_queries": self.n_queries,
            "n_gallery": self.n_gallery,
            "metrics": rounded(self.metrics.metrics) if self.metrics is not None else None,
            "conventions": self.metrics.conventions if self.metrics is not None else None,
            "cot_scores": rounded(self.cot_scores, SCORE_DIGITS),
            "cot_scores_by_group": (
                {g: rounded(v, SCORE_DIGITS) for g, v in self.cot_scores_by_group.items()}
                if self.cot_scores_by_group
                else None
            ),
            "timings": rounded(self.timings),
            "cache": self.cache,
            "files": self.files,
        }
        if with_cots:
            out["cots"] = {
                qid: None if c is None else {k: getattr(c, k) for k in ("caption", "reasoning", "conclusion")}
                for qid, c in zip(self.query_ids, self.cots, strict=True)
            }
        return out

    def format(self) -> str:
        lines = [f"model {self.model or '?'} [{self.model_fingerprint}], {self.mode} mode"]
        if self.reasoner != "local" and self.mode == "full":
            lines[0] += f", reasoner {self.reasoner}"
        if self.metrics is not None:
            lines.append(self.metrics.format())
        else:
            lines.append(f"{self.dataset} {self.split}: {self.n_queries} queries (no public ground truth)")
        if self.cot_scores:
            lines.append("reasoning vs gold CoT:")
            lines += [f"  {k:<20} {v * 100:6.2f}" for k, v in self.cot_scores.items()]
        if self.cot_scores_by_group:
            lines += format_cot_groups(self.cot_scores_by_group)
        t = self.timings
        lines.append(
            "time: " + ", ".join(f"{k[:-2] if k.endswith('_s') else k} {v:.1f}s" for k, v in t.items())
        )
        if self.cache:
            lines.append("cache: " + ", ".join(f"{k} {v}" for k, v in self.cache.items()))
        for f in self.files:
            lines.append(f"wrote {f}")
        return "\n".join(lines)


def _query_images(split: CIRSplit) -> list[Path]:
    paths = []
    for i, q in enumerate(split.queries):
        try:
            paths.append(Path(split.image_path(q.reference)))
        except KeyError:
            raise DataError(
                f"{split.dataset} {split.split}: query {i} ({q.query_id}) references image {q.reference!r} "
                "which has no file"
            ) from None
    return paths


def _embed_queries_cached(
    model: Any,
    images: Sequence[Path],
    texts: Sequence[str],
    mode: str,
    cache: CoTCache | None,
    batch_size: int,
    flush_every: int,
    progress: bool,
    reasoner: Any = None,
    best_match: Any = None,
) -> tuple[np.ndarray, list[CoT | None], int]:
    """Query embeddings through :func:`circot.search.embed_queries`, in full mode with the CoTs found in
    ``cache`` given and the others generated (and stored); returns (embeddings, cots, cache hits). With the
    model's ``cot_samples`` > 0 nothing is read from the cache: a given CoT embeds alone, without the samples.
    ``best_match``: the gallery's, for the shown CoT (:func:`circot.search.shown_cots`; None: the CoTs as
    generated)."""
    from circot.search import embed_queries

    n = len(texts)
    given: list[CoT | None] = [None] * n
    keys: list[str] = []
    if mode == "full" and cache is not None:
        keys = [CoTCache.key(hash_file(p), t) for p, t in zip(images, texts, strict=True)]
        if not model.config.cot_samples:  # with samples, nothing is read; new CoTs are still stored
            for i, k in enumerate(keys):
                hit = cache.get(k)
                if hit is not None:
                    given[i] = _cached_cot(hit)
    hits = sum(c is not None for c in given)
    bar = None
    if progress:
        from circot.progress import progress_bar

        bar = progress_bar(total=n, desc="queries", unit="query")
    embeddings: list[np.ndarray] = []
    cots: list[CoT | None] = []
    pending: dict[str, dict[str, Any]] = {}
    for start in range(0, n, batch_size):
        rows = range(start, min(n, start + batch_size))
        q = embed_queries(
            model,
            [str(images[i]) for i in rows],
            [texts[i] for i in rows],
            mode,
            [given[i] for i in rows],
            batch_size,
            reasoner,
        )
        embeddings.append(q.embeddings)
        # the cache keeps the greedy CoTs (a run without samples reads them); the one shown is chosen after
        cots.extend(shown_cots(model, q.cots, best_match))
        if keys:
            for i, c, new in zip(rows, q.cots, q.generated, strict=True):
                if new and c is not None:
                    # with its token ids, so that a cached CoT embeds exactly as when generated
                    pending[keys[i]] = _cot_record(c)
            if len(pending) >= flush_every:
                cache.put(pending)  # type: ignore[union-attr]
                pending = {}
        if bar is not None:
            bar.update(len(rows))
    if pending:
        cache.put(pending)  # type: ignore[union-attr]
    if bar is not None:
        bar.close()
    return np.concatenate(embeddings).astype(np.float32, copy=False), cots, hits


def _cot_record(cot: CoT, with_samples: bool = False) -> dict[str, Any]:
    """A CoT as JSON: with its token ids, so that a cached CoT embeds exactly as when generated; with its own
    embedding and its samples' too when ``with_samples`` (for the shown CoT's choice after a sharded run)."""
    out = {**cot.to_dict(), "token_ids": cot.token_ids}
    if with_samples and cot.embedding is not None:
        out["embedding"] = np.asarray(cot.embedding, np.float32).tolist()
        out["samples"] = [_cot_record(c, True) for c in cot.samples]
    return out


def _cached_cot(entry: dict[str, Any]) -> CoT:
    ids = entry.get("token_ids")
    emb = entry.get("embedding")
    return CoT(
        caption=entry.get("caption", ""),
        reasoning=entry.get("reasoning", ""),
        conclusion=entry.get("conclusion", ""),
        well_formed=bool(entry.get("well_formed", True)),
        problems=list(entry.get("problems", [])),
        raw=entry.get("raw", ""),
        token_ids=ids if isinstance(ids, list) and all(type(t) is int for t in ids) and ids else None,
        embedding=None if emb is None else np.asarray(emb, np.float32),
        samples=[_cached_cot(e) for e in entry.get("samples", [])],
    )


def _sharded_embeddings(
    model: Any,
    gallery_paths: list[Path],
    images: list[Path],
    texts: list[str],
    mode: str,
    emb_cache: EmbeddingCache | None,
    cot_cache: CoTCache | None,
    batch_size: int,
    gallery_batch_size: int,
    work_dir: Path,
    rank: int,
    world_size: int,
    progress: bool,
    timeout: float,
    reasoner: Any = None,
) -> tuple[np.ndarray, np.ndarray, list[CoT | None], dict[str, int], dict[str, float]] | None:
    """This rank's shards of the gallery and of the queries (see :mod:`circot.shard`); on rank 0, once every
    rank's shards are written: (gallery, queries, cots, cache counts, timings), else None."""
    from circot.gallery import gallery_shard, merge_gallery_shards
    from circot.shard import ShardPlan, compute_shard, file_identity, gather, remove_shards

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    gallery_plan = gallery_shard(
        model, gallery_paths, emb_cache, work_dir, rank, world_size, gallery_batch_size,
        progress=progress,
    )  # fmt: skip
    timings["gallery_s"] = time.perf_counter() - t0
    plan = ShardPlan.make(
        "queries",
        model.fingerprint,
        [[*file_identity(p), t] for p, t in zip(images, texts, strict=True)],
        work_dir,
        rank,
        world_size,
        settings={
            "mode": mode,
            "reasoner": getattr(reasoner, "remote", False) and reasoner.cache_tag(model),
            "fast_weight": model.config.fast_weight if mode == "full" else 0.0,
            "cot_samples": model.config.cot_samples if mode == "full" else 0,
            "cot_choice": model.config.cot_choice if mode == "full" else "greedy",
        },
    )

    def compute() -> tuple[np.ndarray, list[Any], dict[str, Any]]:
        start, end = plan.bounds()
        if start == end:  # more ranks than queries
            return np.zeros((0, 0), np.float32), [], {}
        emb, cots, hits = _embed_queries_cached(
            model, images[start:end], texts[start:end], mode, cot_cache, batch_size, 256,
            progress and rank == 0, reasoner,
        )  # fmt: skip
        # the shown CoT is chosen on rank 0, where the whole gallery is: the candidates travel with the shard
        choose = model.config.cot_choice == "gallery"
        extras = [None if c is None else _cot_record(c, with_samples=choose) for c in cots]
        return emb.reshape(end - start, -1), extras, {"cot_cached": hits, "cot_generated": end - start - hits}

    t0 = time.perf_counter()
    compute_shard(plan, compute)
    timings["queries_s"] = time.perf_counter() - t0
    if rank != 0:
        logger.info("rank %d: shards written to %s", rank, work_dir)
        return None
    t0 = time.perf_counter()
    gallery_stats: dict[str, int] = {}
    gallery = merge_gallery_shards(gallery_plan, gallery_paths, timeout, stats=gallery_stats)
    merged = gather(plan, timeout)
    timings["wait_s"] = time.perf_counter() - t0
    assert gallery is not None and merged is not None  # rank 0
    cots = [None if e is None else _cached_cot(e) for e in merged.extras or [None] * len(texts)]
    cots = shown_cots(model, cots, matrix_best_match(gallery))
    cache_info = {"shards": world_size}
    if emb_cache is not None:
        cache_info["gallery_encoded"] = gallery_stats.get("encoded", 0)
        cache_info["gallery_cached"] = gallery_stats.get("cached", 0)
    if mode == "full":
        for k in ("cot_cached", "cot_generated"):
            cache_info[k] = sum(int(info.get(k, 0)) for info in merged.info["shards"])
    remove_shards(gallery_plan)
    remove_shards(plan)
    return gallery, merged.vectors, cots, cache_info, timings


def write_submission(split: CIRSplit, scores: np.ndarray, out_dir: str | Path) -> list[Path]:
    """Test-server files (CIRR, CIRCO) or predictions files (FashionIQ, shapes) for ``scores`` in ``out_dir``."""
    from circot import submission

    out_dir = Path(out_dir)
    if split.dataset == "cirr":
        return list(submission.write_cirr_submission(split, out_dir, scores))
    if split.dataset == "circo":
        return [submission.write_circo_submission(split, out_dir / f"circo_{split.split}.json", scores)]
    return [
        submission.write_predictions(
            split, out_dir / f"{split.dataset}_{split.split}_predictions.json", scores
        )
    ]


def evaluate_split(
    model: Any,
    split: CIRSplit,
    mode: str = "full",
    batch_size: int = 16,
    gallery_batch_size: int = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    submission_dir: str | Path | None = None,
    model_ref: str | None = None,
    keep_scores: bool = False,
    progress: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    work_dir: str | Path | None = None,
    timeout: float = 24 * 3600.0,
    reasoner: Any = None,
    store: str | None = None,
) -> EvaluationReport | None:
    """Evaluate ``model`` on a loaded split (see :func:`evaluate`).

    ``rank`` / ``world_size`` (default: from the launcher's environment, see
    :func:`circot.shard.distributed_context`): with ``world_size > 1`` this process embeds its contiguous
    shard of the gallery and of the queries into shard files under ``work_dir`` (default: ``work`` in the
    cache folder; shared by all ranks); rank 0 waits for every shard, merges and scores, the other ranks
    return None. Shards already written by an earlier run of the same model and inputs are reused.
    ``reasoner``: where full mode's CoTs come from (:mod:`circot.reasoner`; default the model's own decode).
    ``store``: rank through this vector store (see :func:`evaluate`).
    """
    from circot.shard import distributed_context

    if mode not in MODES:
        raise CircotError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if not split.queries:
        raise DataError(f"{split.dataset} {split.split}: no queries")
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    fp = model.fingerprint
    timings: dict[str, float] = {}
    cache_info: dict[str, int] = {}
    if rank is None or world_size is None:
        env_rank, env_world = distributed_context()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size

    t0 = time.perf_counter()
    gallery_paths = [Path(split.gallery.paths[i]) for i in split.gallery.ids]
    emb_cache = EmbeddingCache(root, fp, dim=getattr(model, "embedding_dim", None)) if use_cache else None
    images = _query_images(split)
    texts = [q.text for q in split.queries]
    remote = getattr(reasoner, "remote", False)
    source = reasoner.describe() if remote else "local"
    # a served reasoner's CoTs are kept apart from the local decode's: they depend on its endpoint and model
    cot_space = f"{fp}-{reasoner.cache_tag(model)}" if remote else fp
    cot_cache = CoTCache(root, cot_space) if use_cache and mode == "full" else None
    if world_size > 1:
        sharded = _sharded_embeddings(
            model, gallery_paths, images, texts, mode, emb_cache, cot_cache,
            batch_size, gallery_batch_size, Path(work_dir) if work_dir is not None else root / "work",
            rank, world_size, progress, timeout, reasoner,
        )  # fmt: skip
        if sharded is None:
            return None
        gallery, queries, cots, cache_info, timings = sharded
        return _finish(
            split, mode, fp, model_ref, gallery, queries, cots, cache_info, timings, submission_dir,
            keep_scores, source, store,
        )  # fmt: skip
    before = len(emb_cache) if emb_cache is not None else 0
    gallery = encode_gallery(
        model, gallery_paths, emb_cache, gallery_batch_size, rank=0, world_size=1, progress=progress
    )
    timings["gallery_s"] = time.perf_counter() - t0
    if emb_cache is not None:
        cache_info["gallery_encoded"] = len(emb_cache) - before
        cache_info["gallery_cached"] = len(gallery_paths) - cache_info["gallery_encoded"]

    t0 = time.perf_counter()
    queries, cots, hits = _embed_queries_cached(
        model,
        images,
        texts,
        mode,
        cot_cache,
        batch_size,
        256,
        progress,
        reasoner,
        matrix_best_match(gallery),
    )
    if mode == "full":
        cache_info["cot_cached"] = hits
        cache_info["cot_generated"] = len(texts) - hits
    timings["queries_s"] = time.perf_counter() - t0
    return _finish(
        split, mode, fp, model_ref, gallery, queries, cots, cache_info, timings, submission_dir, keep_scores,
        source, store,
    )  # fmt: skip


def _finish(
    split: CIRSplit,
    mode: str,
    fp: str,
    model_ref: str | None,
    gallery: np.ndarray,
    queries: np.ndarray,
    cots: list[CoT | None],
    cache_info: dict[str, int],
    timings: dict[str, float],
    submission_dir: str | Path | None,
    keep_scores: bool,
    reasoner: str,
    store: str | None,
) -> EvaluationReport:
    """Score the query embeddings against the gallery's (exactly, or through the vector store at ``store``)
    and make the report (``reasoner``: where the CoTs came from)."""
    from circot import metrics

    t0 = time.perf_counter()
    if store is not None:
        scores = _scores_through_store(store, split, np.asarray(gallery, np.float32), queries, fp, model_ref)
    else:
        scores = queries @ np.asarray(gallery, np.float32).T
    result = None
    if any(q.targets for q in split.queries):
        result = metrics.evaluate(split, scores)
    timings["scoring_s"] = time.perf_counter() - t0

    cot_scores = cot_groups = None
    if split.dataset == "shapes" and mode == "full":
        cot_scores, cot_groups = _shapes_cot_scores(split, cots)

    files: list[str] = []
    if submission_dir is not None:
        files = [str(p) for p in write_submission(split, scores, submission_dir)]
    return EvaluationReport(
        dataset=split.dataset,
        split=split.split,
        mode=mode,
        model_fingerprint=fp,
        model=model_ref,
        n_queries=len(split.queries),
        n_gallery=len(split.gallery.ids),
        metrics=result,
        cot_scores=cot_scores,
        cot_scores_by_group=cot_groups,
        timings={k: round(v, 3) for k, v in timings.items()},
        cache=cache_info,
        files=files,
        query_ids=[q.query_id for q in split.queries],
        cots=cots,
        scores=scores if keep_scores else None,
        reasoner=reasoner,
    )


def _scores_through_store(
    uri: str,
    split: CIRSplit,
    gallery: np.ndarray,
    queries: np.ndarray,
    fingerprint: str,
    model_ref: str | None,
) -> np.ndarray:
    """The score matrix of a ranking done by the vector store at ``uri`` (:mod:`circot.store`).

    The store is built from the split's gallery when there is none at ``uri``; an existing one must hold
    exactly the split's gallery ids, made by this model. Each query's top ranks (as deep as the metrics read,
    plus the reference) get the store's scores, every other image ``-inf``; CIRR's image-set members get their
    exact scores, as Recall_subset ranks them all."""
    from circot.metrics import RANK_DEPTH
    from circot.store import build_store, check_fingerprint, open_store, store_exists

    ids = list(split.gallery.ids)
    if not store_exists(uri):
        with build_store(uri, gallery.shape[1], fingerprint, model=model_ref) as built:
            built.add(gallery, ids, [str(split.gallery.paths[i]) for i in ids])
    index = open_store(uri)
    try:
        check_fingerprint(index, fingerprint, uri)
        held = set(index.ids)
        if held != set(ids):
            missing = len(set(ids) - held)
            raise CircotError(
                f"--store {uri!r} holds {len(held)} images, not this split's gallery of {len(ids)} "
                f"({missing} of them missing); point --store at a new location to build it for this split"
            )
        categories = max(1, len(getattr(split, "category_galleries", None) or {}))
        depth = min(len(ids), (RANK_DEPTH.get(split.dataset, 50) + 1) * categories)
        top_scores, top_ids = index.search(queries, depth)
    finally:
        if hasattr(index, "close"):
            index.close()
    col = {image_id: j for j, image_id in enumerate(ids)}
    scores = np.full((len(queries), len(ids)), -np.inf, np.float32)
    for i, (row_scores, row_ids) in enumerate(zip(top_scores, top_ids, strict=True)):
        found = [(col[str(g)], s) for g, s in zip(row_ids, row_scores, strict=True) if str(g) in col]
        if found:
            cols, values = zip(*found, strict=True)
            scores[i, list(cols)] = values
    if split.dataset == "cirr":
        for i, query in enumerate(split.queries):
            members = [col[m] for m in query.extras.get("members", ()) if m in col]
            scores[i, members] = queries[i] @ gallery[members].T
    return scores


def _shapes_cot_scores(
    split: CIRSplit, cots: Sequence[CoT | None]
) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """The reasoning scores of the whole split, and per edit family and test-novel subset."""
    from circot.data.shapes import gold_cot, score_cot, score_cot_by_group

    gold = [gold_cot(q) for q in split.queries]
    return score_cot(cots, gold), score_cot_by_group(cots, gold, split.queries)


# columns of the per-group reasoning table: (heading, score key)
_GROUP_COLUMNS = (
    ("caption", "caption_exact"),
    ("reasoning", "reasoning_exact"),
    ("conclusion", "conclusion_exact"),
)


def format_cot_groups(groups: dict[str, dict[str, float]]) -> list[str]:
    """Lines of the per-group reasoning table: exact match (%) of each part, and the conclusion's when the
    caption and the reasoning are right (with the count of such queries), so that a wrong conclusion is
    told apart from one that inherits a wrong reading."""
    from circot.data.shapes import conclusion_given_read_right

    width = max(len(g) for g in groups)
    head = "".join(f" {h:>10}" for h, _ in _GROUP_COLUMNS)
    lines = [
        "reasoning exact match per group (%):",
        f"  {'group':<{width}} {'n':>5}{head}  conclusion | read right",
    ]
    for group, s in groups.items():
        cells = "".join(f" {100 * s[k]:10.1f}" for _, k in _GROUP_COLUMNS)
        given, n_read = conclusion_given_read_right(s)
        value = "     —" if given is None else f"{100 * given:6.1f}"
        lines.append(f"  {group:<{width}} {int(s['n']):>5}{cells}  {value} (n = {n_read})")
    return lines


def evaluate(
    model: Any,
    dataset: str,
    root: str | Path,
    split: str,
    mode: str = "full",
    batch_size: int = 16,
    gallery_batch_size: int = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    submission_dir: str | Path | None = None,
    limit: int | None = None,
    model_ref: str | None = None,
    progress: bool = False,
    reasoner: Any = None,
    store: str | None = None,
    **load_options: Any,
) -> EvaluationReport | None:
    """Evaluate ``model`` on ``dataset``/``split`` under ``root`` with the official metrics.

    ``limit``: evaluate the first ``limit`` queries only (quick checks; the gallery stays whole).
    ``submission_dir``: also write test-server files (CIRR, CIRCO) or predictions files (FashionIQ, shapes).
    Splits without public ground truth (CIRR test1, CIRCO test) give no metrics; write their files instead.
    Launched with several processes, each embeds its shard and rank 0 returns the report; the other ranks
    return None (see :func:`evaluate_split`).
    ``reasoner``: where full mode's CoTs come from (:mod:`circot.reasoner`; default the model's own decode).
    ``store``: rank through this vector store (a URI, see :mod:`circot.store`; built from the gallery when
    missing) instead of scoring every gallery image exactly.
    """
    import dataclasses

    from circot.data import load_split

    loaded = load_split(dataset, root, split, **load_options)
    if limit is not None:
        if limit <= 0:
            raise CircotError(f"limit must be positive, got {limit}")
        loaded = dataclasses.replace(loaded, queries=loaded.queries[:limit])
    if not any(q.targets for q in loaded.queries) and submission_dir is None:
        raise CircotError(
            f"{dataset} {split} has no public ground truth; pass a submission folder to write test-server files"
        )
    return evaluate_split(
        model,
        loaded,
        mode=mode,
        batch_size=batch_size,
        gallery_batch_size=gallery_batch_size,
        cache_dir=cache_dir,
        use_cache=use_cache,
        submission_dir=submission_dir,
        model_ref=model_ref,
        progress=progress,
        reasoner=reasoner,
        store=store,
    )


__all__ = ["EvaluationReport", "evaluate", "evaluate_split", "write_submission"]

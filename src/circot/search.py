"""One composed query against a gallery index: reason, embed, search — with the reasoning and the timings.

:func:`embed_queries` is the one "reason, then embed" path: ``circot search``, ``circot eval``, the demo, the
web service and the trainer's evaluation all call it. In ``full`` mode the model writes caption → reasoning →
conclusion and embeds at the ``<emb>`` that closes it, in one decode; a caller may pass its own ``cot`` (e.g. a
user-edited conclusion) to embed from that reasoning without generating, or a served ``reasoner``
(:mod:`circot.reasoner`) whose CoTs are embedded as given ones. :func:`rank` turns embeddings into
ranked :class:`Hit` lists, the same way for all of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circot.errors import CircotError
from circot.index import GalleryIndex
from circot.jsonout import SCORE_DIGITS, rounded
from circot.prompts import CoT

MODES = ("full", "fast")


@dataclass
class Hit:
    """One ranked gallery image."""

    rank: int
    id: str
    score: float
    path: str

    def to_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "id": self.id, "score": round(self.score, SCORE_DIGITS), "path": self.path}


@dataclass
class QueryResult:
    """The answer to one query: the CoT (None in fast mode), the hits, and where the time went (seconds)."""

    text: str
    mode: str
    cot: CoT | None
    hits: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)
    cot_given: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "mode": self.mode,
            "cot": None if self.cot is None else self.cot.to_dict(),
            "cot_given": self.cot_given,
            "results": [h.to_dict() for h in self.hits],
            "timings": rounded(self.timings, SCORE_DIGITS),
        }


def resolve_device(device: str | None = "auto") -> str:
    """``auto``: this process's GPU (``LOCAL_RANK``, modulo the GPUs there are, so that several processes may
    share one) when CUDA is available, else ``cpu``."""
    import os

    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
        return "cpu"
    return check_device(device)


def check_device(device: str) -> str:
    """``device`` if this torch can use it; a one-line :class:`CircotError` naming it otherwise."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise CircotError(
            f"--device {device!r} is not a torch device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only torch" if torch.version.cuda is None else "no visible CUDA GPU"
            raise CircotError(f"--device {device!r}: CUDA is not available here ({build}); use --device cpu")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise CircotError(f"--device {device!r}: there are only {count} CUDA device(s)")
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CircotError(f"--device {device!r}: MPS is not available here; use --device cpu")
    elif parsed.type != "cpu":
        raise CircotError(f"--device {device!r}: unsupported device type; use auto, cpu, cuda, cuda:N or mps")
    return device


def load_model(
    model: str | Path | None,
    device: str | None = "auto",
    fast_weight: float | None = None,
    cot_samples: int | None = None,
    cot_choice: str | None = None,
) -> Any:
    """Load a circot model by folder or hub id (``None``: the shipped shapes model) onto ``device``;
    ``fast_weight``, ``cot_samples``, ``cot_choice``: in place of the model's own
    (:class:`circot.config.CIRCoTConfig`)."""
    from circot.model import CIRCoT

    given = {"fast_weight": fast_weight, "cot_samples": cot_samples, "cot_choice": cot_choice}
    over = {k: v for k, v in given.items() if v is not None}
    return CIRCoT.from_pretrained(
        str(model) if model is not None else None, device=resolve_device(device), **over
    )


def model_reference(model: str | Path | None) -> str:
    """How to find ``model`` again later (absolute path for a local folder), recorded in index manifests."""
    from circot.model import DEFAULT_MODEL

    if model is None:
        return DEFAULT_MODEL
    p = Path(model)
    return str(p.resolve()) if p.exists() else str(model)


def _as_cot(cot: CoT | dict[str, str]) -> CoT:
    if isinstance(cot, CoT):
        return cot
    if not isinstance(cot, dict):
        raise CircotError(
            f"cot must be a CoT or a dict with caption/reasoning/conclusion, not {type(cot).__name__}"
        )
    return CoT.from_dict(cot)


@dataclass
class QueryEmbeddings:
    """What :func:`embed_queries` returns: ``embeddings`` ``(n, d)`` float32, the CoT each query was embedded
    from (None in fast mode), which of them were generated, and the time spent (seconds): ``cot_s`` for the
    queries whose reasoning was generated (their embedding is read at the ``<emb>`` that closes it, so this is
    reasoning and embedding together; with a served reasoner, the time waiting for its replies), ``embed_s`` for
    the one forward of fast queries and given CoTs."""

    embeddings: np.ndarray
    cots: list[CoT | None]
    generated: list[bool]
    timings: dict[str, float]


BestMatch = Callable[[np.ndarray], np.ndarray]


def choose_cots(cots: Sequence[CoT | None], best_match: BestMatch) -> list[CoT | None]:
    """The CoT shown for each query under the config's ``cot_choice: gallery``: of a generated CoT and the CoTs
    sampled with it (``CoT.samples``), the one whose own embedding's best gallery score is highest
    (``best_match``: ``(m, d)`` float32 embeddings to ``(m,)`` scores); the greedy CoT on a tie. CoTs without
    samples stay as they are. A wrong conclusion tends to describe a scene that no gallery image shows."""
    rows = [i for i, c in enumerate(cots) if c is not None and c.samples and c.embedding is not None]
    out = list(cots)
    if not rows:
        return out
    candidates = [[cots[i], *cots[i].samples] for i in rows]  # type: ignore[misc]
    stacked = np.stack([np.asarray(c.embedding, np.float32) for cs in candidates for c in cs])
    scores = np.nan_to_num(np.asarray(best_match(stacked), np.float64), nan=-np.inf)
    start = 0
    for i, cs in zip(rows, candidates, strict=True):
        out[i] = cs[int(np.argmax(scores[start : start + len(cs)]))]
        start += len(cs)
    return out


def shown_cots(model: Any, cots: Sequence[CoT | None], best_match: BestMatch | None) -> list[CoT | None]:
    """The CoTs to show: :func:`choose_cots`'s when ``model``'s config says ``cot_choice: gallery`` and a
    gallery is at hand (``best_match``), else ``cots`` as they are."""
    if best_match is None or model.config.cot_choice != "gallery":
        return list(cots)
    return choose_cots(cots, best_match)


def index_best_match(index: Any) -> BestMatch:
    """:func:`choose_cots`'s ``best_match`` through a gallery index or vector store (anything with ``search``):
    each embedding's top score."""

    def best(embeddings: np.ndarray) -> np.ndarray:
        scores, _ = index.search(np.ascontiguousarray(embeddings, dtype=np.float32), 1)
        return np.asarray(scores, np.float64).reshape(len(embeddings), -1)[:, 0]

    return best


def matrix_best_match(gallery: np.ndarray) -> BestMatch:
    """:func:`choose_cots`'s ``best_match`` over a gallery's embeddings ``(n, d)``: exact top scores."""
    return lambda embeddings: (np.asarray(embeddings, np.float32) @ gallery.T).max(axis=1)


def embed_queries(
    model: Any,
    images: Sequence[Any],
    texts: Sequence[str],
    mode: str = "full",
    cots: Sequence[CoT | dict[str, str] | None] | None = None,
    batch_size: int = 16,
    reasoner: Any = None,
    best_match: BestMatch | None = None,
) -> QueryEmbeddings:
    """Reason (full mode: the CoTs not given) and embed every query — the one query path of circot.

    Given and generated CoTs are embedded by the same rule; a generated one costs one decode (no second
    forward), a given one a forward over prompt + CoT + ``<emb>``. ``reasoner``: where generated CoTs come
    from; None or a local one: the model's own decode; a remote one (:class:`circot.reasoner.OpenAIReasoner`):
    its CoTs are then embedded as given ones (and count as generated). ``best_match``: the gallery's best score
    of embeddings (:func:`index_best_match`); with it, a model whose config says ``cot_choice: gallery`` shows
    the CoT :func:`choose_cots` picks (the query's embedding does not change).
    """
    if mode not in MODES:
        raise CircotError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    n = len(images)
    if len(texts) != n:
        raise CircotError(f"{n} images but {len(texts)} texts")
    if cots is not None and len(cots) != n:
        raise CircotError(f"{len(cots)} CoTs for {n} queries")
    given: list[CoT | None] = [None] * n
    if mode == "full" and cots is not None:
        given = [None if c is None else _as_cot(c) for c in cots]
    generated = [mode == "full" and c is None for c in given]
    remote_s = 0.0
    if any(generated) and getattr(reasoner, "remote", False):
        todo = [i for i in range(n) if generated[i]]
        t0 = time.perf_counter()
        served = reasoner.reason(model, [images[i] for i in todo], [texts[i] for i in todo], batch_size)
        remote_s = time.perf_counter() - t0
        for i, c in zip(todo, served, strict=True):
            given[i] = c
    t0 = time.perf_counter()
    if mode == "fast":
        emb = model.encode_queries(list(images), list(texts), mode="fast", batch_size=batch_size)
        used: list[CoT | None] = [None] * n
    else:
        emb, used = model.encode_queries(
            list(images), list(texts), mode="full", batch_size=batch_size, cots=given, return_reasoning=True
        )
        used = shown_cots(model, used, best_match)
    spent = time.perf_counter() - t0
    share = 0.0 if remote_s else sum(generated) / max(1, n)
    timings = {"cot_s": remote_s + spent * share, "embed_s": spent * (1.0 - share)}
    return QueryEmbeddings(np.asarray(emb, np.float32).reshape(n, -1), list(used), generated, timings)


def rank(index: Any, embeddings: np.ndarray, k: int) -> list[list[Hit]]:
    """The top-``k`` gallery images of each query embedding as :class:`Hit` lists (``index``: a
    :class:`~circot.index.GalleryIndex`, a :class:`~circot.store.VectorStore` or anything with ``search``,
    ``len`` and ``path_of``). k is capped at the gallery size; empty slots of an approximate index (no id, or a
    non-finite score) are dropped."""
    query = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32).reshape(len(embeddings), -1))
    scores, ids = index.search(query, max(1, min(int(k), len(index))))
    out: list[list[Hit]] = []
    for row_scores, row_ids in zip(
        np.asarray(scores).tolist(), np.asarray(ids, dtype=object).tolist(), strict=True
    ):
        found = [
            (float(s), str(i)) for s, i in zip(row_scores, row_ids, strict=True) if str(i) not in ("", "-1")
        ]
        hits = [(s, i) for s, i in found if np.isfinite(s)]
        out.append(
            [Hit(rank=r + 1, id=i, score=s, path=str(index.path_of(i))) for r, (s, i) in enumerate(hits)]
        )
    return out


def search_query(
    model: Any,
    index: GalleryIndex,
    image: Any,
    text: str,
    k: int = 10,
    mode: str = "full",
    cot: CoT | dict[str, str] | None = None,
    check_fingerprint: bool = True,
    reasoner: Any = None,
) -> QueryResult:
    """Search ``index`` with a reference image (path or PIL image) and a modification text.

    ``cot``: embed from this reasoning instead of generating it (full mode only). ``reasoner``: see
    :func:`embed_queries`. Raises
    :class:`CircotError` if the index was built by another model (unless ``check_fingerprint=False``).
    """
    if check_fingerprint and index.model_fingerprint != model.fingerprint:
        raise CircotError(
            f"the index was built by model {index.model_fingerprint[:16]}, not by the loaded model "
            f"{model.fingerprint[:16]}; rebuild the index or load the matching model"
        )
    if not isinstance(text, str) or not text.strip():
        raise CircotError("the modification text is empty")
    if cot is not None and mode != "full":
        raise CircotError("a given CoT needs mode 'full'")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise CircotError(f"k must be a positive integer, not {k!r}")
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise CircotError(f"{image}: image file not found")
    q = embed_queries(
        model, [image], [text], mode, [cot] if cot is not None else None, 1, reasoner, index_best_match(index)
    )
    timings = dict(q.timings)
    t0 = time.perf_counter()
    hits = rank(index, q.embeddings, k)[0]
    timings["search_s"] = time.perf_counter() - t0
    timings["total_s"] = sum(timings.values())
    return QueryResult(
        text=text, mode=mode, cot=q.cots[0], hits=hits, timings=timings, cot_given=cot is not None
    )


__all__ = [
    "Hit",
    "MODES",
    "QueryEmbeddings",
    "QueryResult",
    "check_device",
    "choose_cots",
    "embed_queries",
    "index_best_match",
    "load_model",
    "matrix_best_match",
    "model_reference",
    "rank",
    "resolve_device",
    "search_query",
    "shown_cots",
]

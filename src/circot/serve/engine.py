"""The search engine behind the web service: one model, one gallery index, thread-safe.

The model is never entered by two threads at once: every model call (reasoning, streaming, embedding)
holds :attr:`SearchEngine.model_lock` for its whole duration, while the server keeps accepting and parsing
other requests. With a served reasoner (:mod:`circot.reasoner`), the wait for its CoT holds no lock; only
the pooling pass that embeds it does. Index searches hold their own lock. Gallery ids from a request are
looked up in the index's id map; a request never names a file.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from circot.errors import CircotError
from circot.prompts import CoT, parse_cot
from circot.search import Hit, embed_queries, index_best_match, rank, shown_cots
from circot.serve.uploads import UploadRejected

logger = logging.getLogger(__name__)


class QueryModel(Protocol):
    """What the engine needs from :class:`circot.model.CIRCoT`."""

    fingerprint: str
    embedding_dim: int

    def encode_queries(self, images: Sequence[Any], texts: Sequence[str], **kwargs: Any) -> Any: ...

    def generate_reasoning(
        self, images: Sequence[Any], texts: Sequence[str], batch_size: int = ...
    ) -> Any: ...

    def stream_reasoning(
        self, image: Any, text: str, embedding: dict[str, np.ndarray] | None = None
    ) -> Iterator[str]: ...


class Gallery(Protocol):
    """What the engine needs from :class:`circot.index.GalleryIndex`."""

    ids: Sequence[Any]

    def search(self, query_embs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def path_of(self, image_id: Any) -> Path: ...


@dataclass
class SearchOutcome:
    """The answer to one query: the reasoning (None in fast mode), the ranked hits and timings in ms."""

    cot: CoT | None
    hits: list[Hit]
    timings_ms: dict[str, float] = field(default_factory=dict)


class ServerBusy(CircotError):
    """Too many requests are waiting for the model."""


def _manifest_value(manifest: Any, *names: str) -> Any:
    for name in names:
        if isinstance(manifest, dict) and name in manifest:
            return manifest[name]
        if hasattr(manifest, name):
            return getattr(manifest, name)
    return None


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000.0, 2)


class SearchEngine:
    """Searches a gallery index with a CIR-CoT model; safe to call from many threads.

    Args:
        index: the gallery index (``search``, ``ids``, ``path_of``, optionally ``manifest``).
        model: the query model (``encode_queries``, ``stream_reasoning``, ``fingerprint``).
        max_pending: requests that may wait for the model at once; one more raises :class:`ServerBusy`.
        check_fingerprint: refuse an index built by another model (its manifest's fingerprint differs).
        reasoner: where full mode's CoTs come from; None: the model's own decode.
    """

    def __init__(
        self,
        index: Gallery,
        model: QueryModel,
        max_pending: int = 32,
        check_fingerprint: bool = True,
        reasoner: Any = None,
    ):
        self.index = index
        self.model = model
        self.reasoner = reasoner if getattr(reasoner, "remote", False) else None
        self.model_lock = threading.Lock()
        self._index_lock = threading.Lock()
        self._admission = threading.BoundedSemaphore(max_pending)
        self._by_str: dict[str, Any] = {str(i): i for i in index.ids}
        self._id_list: tuple[str, ...] = tuple(self._by_str)
        manifest = getattr(index, "manifest", None)
        index_fp = _manifest_value(manifest, "model_fingerprint", "fingerprint")
        model_fp = getattr(model, "fingerprint", None)
        self.fingerprint_matches = index_fp is None or model_fp is None or index_fp == model_fp
        if not self.fingerprint_matches:
            message = (
                f"the index was built with model {index_fp}, but the served model is {model_fp}; "
                "rebuild the index with this model"
            )
            if check_fingerprint:
                raise CircotError(message)
            logger.warning(message)

    # -- gallery -----------------------------------------------------------------------------------------
    @property
    def gallery_ids(self) -> tuple[str, ...]:
        """Every gallery id, as strings, in index order."""
        return self._id_list

    def resolve(self, gallery_id: str) -> Any:
        """The index's id for a client-given id string; :class:`UploadRejected` (404) when unknown."""
        try:
            return self._by_str[gallery_id]
        except (KeyError, TypeError):
            shown = gallery_id if len(gallery_id) <= 80 else gallery_id[:77] + "..."
            raise UploadRejected(f"no gallery image has id {shown!r}", 404) from None

    def gallery_path(self, gallery_id: str) -> Path:
        """The file of a gallery image, found through the index's id map only."""
        path = Path(self.index.path_of(self.resolve(gallery_id)))
        if not path.is_file():
            raise UploadRejected(f"the image file of gallery id {gallery_id!r} is missing on the server", 404)
        return path

    def gallery_image(self, gallery_id: str) -> Image.Image:
        """A gallery image as RGB, to use as a query's reference."""
        path = self.gallery_path(gallery_id)
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except OSError as exc:
            raise UploadRejected(
                f"the image of gallery id {gallery_id!r} could not be read: {exc}", 500
            ) from exc

    # -- admission ---------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def admitted(self) -> Iterator[None]:
        """Hold one of the ``max_pending`` places in the model's queue, or raise :class:`ServerBusy`."""
        if not self._admission.acquire(blocking=False):
            raise ServerBusy("the server is busy: too many searches are waiting; try again shortly")
        try:
            yield
        finally:
            self._admission.release()

    def try_admit(self) -> bool:
        return self._admission.acquire(blocking=False)

    def release_admission(self) -> None:
        self._admission.release()

    # -- searching ---------------------------------------------------------------------------------------
    def rank(self, embedding: np.ndarray, k: int) -> list[Hit]:
        """Top-``k`` gallery images for one query embedding (fewer when the gallery is smaller)."""
        with self._index_lock:
            return rank(self.index, np.asarray(embedding, dtype=np.float32).reshape(1, -1), k)[0]

    def best_match(self, embeddings: np.ndarray) -> np.ndarray:
        """Each embedding's best gallery score: how the shown CoT is chosen (config ``cot_choice``)."""
        with self._index_lock:
            return index_best_match(self.index)(embeddings)

    def search(self, image: Image.Image, text: str, mode: str, k: int) -> SearchOutcome:
        """Reason about (full mode) and embed one query, then search the gallery.

        Full mode generates the reasoning and embeds at its closing ``<emb>`` (:func:`circot.search.embed_queries`,
        as ``circot search`` does).
        """
        if mode == "full" and self.reasoner is not None:
            return self._search_served(image, text, k)
        start = time.perf_counter()
        with self.model_lock:
            waited = _ms(start)
            q = embed_queries(self.model, [image], [text], mode, None, 1, best_match=self.best_match)
        start = time.perf_counter()
        hits = self.rank(q.embeddings[0], k)
        timings = {"queue": waited}
        if mode == "full":
            timings["reasoning"] = round(q.timings["cot_s"] * 1000.0, 2)
        timings.update(embedding=round(q.timings["embed_s"] * 1000.0, 2), search=_ms(start))
        return SearchOutcome(cot=q.cots[0], hits=hits, timings_ms=timings)

    def _search_served(self, image: Image.Image, text: str, k: int) -> SearchOutcome:
        """Full mode with a served reasoner: its CoT (no lock held), then the pooling pass under the lock."""
        start = time.perf_counter()
        (cot,) = self.reasoner.reason(self.model, [image], [text], 1)  # type: ignore[union-attr]
        reasoning_ms = _ms(start)
        outcome = self.search_from_cot(image, text, cot, k)
        outcome.timings_ms = {"reasoning": reasoning_ms, **outcome.timings_ms}
        return outcome

    def search_from_cot(self, image: Image.Image, text: str, cot: CoT, k: int) -> SearchOutcome:
        """Embed one query from a given (user-edited) reasoning instead of generating it, then search."""
        start = time.perf_counter()
        with self.model_lock:
            waited = _ms(start)
            q = embed_queries(self.model, [image], [text], "full", [cot], 1)
        start = time.perf_counter()
        hits = self.rank(q.embeddings[0], k)
        timings = {
            "queue": waited,
            "embedding": round(q.timings["embed_s"] * 1000.0, 2),
            "search": _ms(start),
        }
        return SearchOutcome(cot=cot, hits=hits, timings_ms=timings)

    def stream_search(
        self,
        image: Image.Image,
        text: str,
        mode: str,
        k: int,
        emit: Callable[[str, Any], None],
        cancel: threading.Event,
    ) -> SearchOutcome | None:
        """Search while reporting progress through ``emit(event, data)``.

        Full mode emits ``("token", piece)`` for each piece of reasoning as it is generated, then
        ``("cot", CoT)``; both modes end with the returned outcome (the caller emits the results). The
        query is embedded at the ``<emb>`` that closes the reasoning, as in :meth:`search`. Returns None when ``cancel`` was set (the client went away).
        """
        if mode == "fast":
            return self.search(image, text, "fast", k)
        if self.reasoner is not None:  # a served CoT arrives whole: one piece, then the CoT
            outcome = self._search_served(image, text, k)
            if cancel.is_set():
                return None
            emit("token", outcome.cot.raw if outcome.cot is not None else "")
            emit("cot", outcome.cot)
            return outcome
        start = time.perf_counter()
        with self.model_lock:
            waited = _ms(start)
            start = time.perf_counter()
            pieces: list[str] = []
            closing: dict[str, np.ndarray] = {}
            stream = self.model.stream_reasoning(image, text, embedding=closing)
            try:
                for piece in stream:
                    if cancel.is_set():
                        return None
                    if piece:
                        pieces.append(piece)
                        emit("token", piece)
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
            reasoning_ms = _ms(start)
            cot = parse_cot("".join(pieces))
            # the streamed CoT is the greedy one; the one shown at the end may be one of its samples, as in search
            cot.embedding, cot.samples = closing.get("cot_embedding"), closing.get("samples", [])
            (cot,) = shown_cots(self.model, [cot], self.best_match)
            emit("cot", cot)
            if cancel.is_set():
                return None
            start = time.perf_counter()
            # the state at the <emb> that closed the reasoning: what the non-streaming search embeds
            query = closing.get("embedding")
            if query is None:
                query = embed_queries(self.model, [image], [text], "full", [cot], 1).embeddings[0]
            embed_ms = _ms(start)
        start = time.perf_counter()
        hits = self.rank(query, k)
        return SearchOutcome(
            cot=cot,
            hits=hits,
            timings_ms={
                "queue": waited,
                "reasoning": reasoning_ms,
                "embedding": embed_ms,
                "search": _ms(start),
            },
        )

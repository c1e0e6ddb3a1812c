"""The gallery index: faiss vectors, the id ↔ image-path map and a manifest, saved as one folder.

An index folder holds::

    manifest.json           the commit point: model fingerprint, dimension, normalisation, count, factory,
                            circot and faiss versions, and the names of the current generation's files
    vectors-<gen>.faiss     the faiss index (row i ↔ item i)
    items-<gen>.json        {"ids": [...], "paths": [...]} in row order

Saving writes a new generation's files beside the old ones, then replaces ``manifest.json`` atomically, then
removes the previous generation's files, and those that a crashed save of an earlier generation left behind. A
crash at any moment leaves either the old index or the new one, never a mix.

Scores are inner products of L2-normalised vectors (cosine similarity) with the default ``"Flat"`` factory,
which is exact. Any faiss factory string works (``"IVF1024,Flat"``, ``"IVF4096,PQ32"``, ``"HNSW32"``...);
indexes that need training are trained by :meth:`GalleryIndex.train` (the builders in :mod:`circot.gallery`
do it for you).

Search follows faiss's conventions: ``(n, d)`` float queries in, ``(n, k)`` scores and ids out, best first;
slots beyond the number of indexed vectors hold score ``-inf`` and id ``""`` (position ``-1``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from circot.errors import CircotError

logger = logging.getLogger(__name__)

INDEX_FORMAT = "circot-index"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
DEFAULT_FACTORY = "Flat"
# From this many queries in one call, exact flat search runs as blocked BLAS products in numpy: faiss's own
# batched flat search measured several times slower here (benchmarks/retrieval.py); single queries stay in faiss.
NUMPY_BATCH_MIN = 8


def _faiss():
    import faiss

    return faiss


# The files of one save and their temporary forms, e.g. vectors-000012-1a2b3c4d.faiss and
# .items-000012-1a2b3c4d.json.<32 hex>.tmp
_SAVE_FILE = re.compile(
    r"\.?(?:vectors|items)-(\d{6,})-[0-9a-f]{8}\.(?:faiss|json)(?:\.[0-9a-f]{32})?(?:\.tmp)?"
)


def _save_files(folder: Path) -> list[tuple[int, Path]]:
    """``(generation, path)`` of every file in ``folder`` named exactly as a save names its files, so that a
    user's own files, whatever their names, are never taken for them."""
    found = []
    for path in folder.iterdir():
        match = _SAVE_FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8"))


@dataclass
class IndexManifest:
    """What an index folder holds and how it was made (``manifest.json``)."""

    model_fingerprint: str
    dim: int
    normalized: bool = True
    metric: str = "inner_product"
    factory: str = DEFAULT_FACTORY
    count: int = 0
    model: str | None = None  # how to load the model that made the vectors (hub id or path), if known
    search_params: dict[str, Any] = field(default_factory=dict)  # e.g. {"nprobe": 16}, applied on load
    circot_version: str = ""
    faiss_version: str = ""
    generation: int = 0
    files: dict[str, str] = field(default_factory=dict)
    created: float = 0.0
    updated: float = 0.0
    format: str = INDEX_FORMAT
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> IndexManifest:
        if data.get("format") != INDEX_FORMAT:
            raise CircotError(f"{source}: not a circot index manifest (format={data.get('format')!r})")
        if int(data.get("format_version", 0)) > FORMAT_VERSION:
            raise CircotError(
                f"{source}: index format version {data['format_version']} is newer than this circot "
                f"supports ({FORMAT_VERSION}); upgrade circot"
            )
        known = set(cls.__dataclass_fields__)
        missing = [k for k in ("model_fingerprint", "dim") if k not in data]
        if missing:
            raise CircotError(f"{source}: missing field {missing[0]!r}")
        _check_manifest_types(data, source)
        return cls(**{k: v for k, v in data.items() if k in known})


def _check_manifest_types(data: dict[str, Any], source: str) -> None:
    """Raise :class:`CircotError` naming the first manifest field whose JSON type is wrong."""

    def bad(name: str, expected: str) -> CircotError:
        return CircotError(f"{source}: field {name!r} must be {expected}, got {data[name]!r}")

    if not isinstance(data["model_fingerprint"], str):
        raise bad("model_fingerprint", "a string")
    for name in ("dim", "count", "generation", "format_version"):
        if name in data and (isinstance(data[name], bool) or not isinstance(data[name], int)):
            raise bad(name, "an integer")
    if data["dim"] <= 0:
        raise bad("dim", "a positive integer")
    for name in ("factory", "metric", "circot_version", "faiss_version"):
        if name in data and not isinstance(data[name], str):
            raise bad(name, "a string")
    if "model" in data and data["model"] is not None and not isinstance(data["model"], str):
        raise bad("model", "a string or null")
    if "normalized" in data and not isinstance(data["normalized"], bool):
        raise bad("normalized", "true or false")
    if "search_params" in data and not isinstance(data["search_params"], dict):
        raise bad("search_params", "an object")
    if "files" in data:
        files = data["files"]
        if not isinstance(files, dict) or not all(
            isinstance(v, str) and v and "/" not in v and "\\" not in v and v not in (".", "..")
            for v in files.values()
        ):
            raise bad("files", "an object of file names in the index folder")
    for name in ("created", "updated"):
        if name in data and (isinstance(data[name], bool) or not isinstance(data[name], (int, float))):
            raise bad(name, "a number")


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _as_matrix(x: Any, dim: int, what: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float32)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != dim:
        raise CircotError(f"{what}: expected an array of shape (n, {dim}), got {tuple(np.shape(x))}")
    if not np.isfinite(arr).all():
        raise CircotError(f"{what}: contains NaN or infinite values")
    return np.ascontiguousarray(arr)


class GalleryIndex:
    """A faiss index over gallery embeddings with string ids and image paths.

    Create with :meth:`create` (empty) or :meth:`load` (from a folder); fill with :meth:`add`; query with
    :meth:`search`; persist with :meth:`save`.
    """

    def __init__(
        self, index: Any, ids: list[str], paths: list[str], manifest: IndexManifest, mmapped: bool = False
    ) -> None:
        if index.ntotal != len(ids) or len(ids) != len(paths):
            raise CircotError(
                f"index is inconsistent: {index.ntotal} vectors, {len(ids)} ids, {len(paths)} paths"
            )
        self._index = index
        self.ids = ids
        self.paths = paths
        self.manifest = manifest
        self._mmapped = mmapped
        self.skipped: dict[str, str] = {}  # images a build left out (path -> reason), see build_index
        self._row_of = {image_id: i for i, image_id in enumerate(ids)}
        if len(self._row_of) != len(ids):
            raise CircotError("index is inconsistent: duplicate ids in the item map")
        if manifest.search_params:
            self.set_search_params(**manifest.search_params)

    # ----------------------------------------------------------------------------------------- creation
    @classmethod
    def create(
        cls,
        dim: int,
        model_fingerprint: str,
        factory: str = DEFAULT_FACTORY,
        normalized: bool = True,
        model: str | None = None,
    ) -> GalleryIndex:
        """An empty index of ``dim``-dimensional vectors, inner-product metric, built by a faiss factory string."""
        faiss = _faiss()
        if dim <= 0:
            raise CircotError(f"index dimension must be positive, got {dim}")
        try:
            index = faiss.index_factory(int(dim), factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as exc:
            raise CircotError(
                f"invalid faiss factory string {factory!r}: {str(exc).splitlines()[-1]}"
            ) from None
        from circot import __version__

        now = time.time()
        manifest = IndexManifest(
            model_fingerprint=model_fingerprint,
            dim=int(dim),
            normalized=normalized,
            factory=factory,
            model=model,
            circot_version=__version__,
            faiss_version=faiss.__version__,
            created=now,
            updated=now,
        )
        return cls(index, [], [], manifest)

    # ----------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    @property
    def faiss_index(self) -> Any:
        """The underlying faiss index (row i ↔ ``ids[i]``)."""
        return self._index

    @property
    def mmapped(self) -> bool:
        return self._mmapped

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, image_id: object) -> bool:
        return image_id in self._row_of

    def row(self, image_id: str) -> int:
        """Row of ``image_id``; raises :class:`CircotError` for an unknown id."""
        try:
            return self._row_of[image_id]
        except KeyError:
            raise CircotError(f"unknown gallery id {image_id!r}") from None

    def path(self, image_id: str) -> Path:
        """Image path of ``image_id`` as stored in the index; raises :class:`CircotError` if unknown."""
        return Path(self.paths[self.row(image_id)])

    path_of = path

    # ----------------------------------------------------------------------------------------- writing
    def _ensure_writable(self) -> None:
        # faiss aborts the process when a memory-mapped index is resized: read it back into memory first.
        if self._mmapped:
            raise CircotError(
                "this index was loaded memory-mapped (read-only); load it with mmap=False to add"
            )

    def train(self, vectors: np.ndarray) -> None:
        """Train the index (IVF centroids, PQ codebooks) on representative vectors; no-op when not needed."""
        self._ensure_writable()
        if self.is_trained:
            return
        x = _as_matrix(vectors, self.dim, "training vectors")
        if self.manifest.normalized:
            x = _l2_normalize(x)
        try:
            self._index.train(x)
        except RuntimeError as exc:
            raise CircotError(
                f"cannot train faiss index {self.manifest.factory!r} on {len(x)} vectors: "
                f"{str(exc).splitlines()[-1]} (use more images or a smaller factory, e.g. 'Flat')"
            ) from None

    def add(self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None = None) -> None:
        """Append vectors with their ids (and image paths). Ids must be new and unique."""
        self._ensure_writable()
        x = _as_matrix(vectors, self.dim, "vectors")
        ids = [str(i) for i in ids]
        paths_s = [str(p) for p in paths] if paths is not None else [""] * len(ids)
        if len(ids) != len(x) or len(paths_s) != len(x):
            raise CircotError(f"add: {len(x)} vectors but {len(ids)} ids and {len(paths_s)} paths")
        seen: set[str] = set()
        for i in ids:
            if i in self._row_of or i in seen:
                raise CircotError(f"add: id {i!r} is already in the index")
            if not i:
                raise CircotError("add: empty id")
            seen.add(i)
        if not len(x):
            return
        if not self.is_trained:
            raise CircotError(f"index {self.manifest.factory!r} must be trained before adding vectors")
        if self.manifest.normalized:
            x = _l2_normalize(x)
        self._index.add(x)
        start = len(self.ids)
        self.ids.extend(ids)
        self.paths.extend(paths_s)
        for offset, i in enumerate(ids):
            self._row_of[i] = start + offset
        self.manifest.count = len(self.ids)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove the items with these ids (unknown ids are ignored); returns how many were removed.

        The rows are compacted at once (the later rows move up), so the index stays row ↔ item; the folder
        changes only at the next :meth:`save`, atomically as ever."""
        self._ensure_writable()
        dead = sorted({self._row_of[str(i)] for i in ids if str(i) in self._row_of})
        if not dead:
            return 0
        self._index = _without_rows(self._index, np.asarray(dead, np.int64), self.manifest.factory)
        gone = set(dead)
        self.ids = [i for r, i in enumerate(self.ids) if r not in gone]
        self.paths = [p for r, p in enumerate(self.paths) if r not in gone]
        self._row_of = {image_id: r for r, image_id in enumerate(self.ids)}
        self.manifest.count = len(self.ids)
        return len(dead)

    def upsert(
        self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None = None
    ) -> None:
        """Add the items, replacing the vector and path of those whose id is already indexed (they move to
        the end of the row order)."""
        self._ensure_writable()
        x = _as_matrix(vectors, self.dim, "vectors")
        ids = [str(i) for i in ids]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise CircotError(f"upsert: id {dup!r} is given twice")
        if len(ids) != len(x):
            raise CircotError(f"upsert: {len(x)} vectors but {len(ids)} ids")
        self.delete([i for i in ids if i in self._row_of])
        self.add(x, ids, paths)

    @property
    def location(self) -> Path | None:
        """The folder this index was loaded from or last saved to (None for a new index)."""
        return getattr(self, "_location", None)

    def commit(self) -> Path:
        """Save to :attr:`location` (see :meth:`save`): the store interface's way to persist the changes."""
        if self.location is None:
            raise CircotError("this index has no folder yet; save it with save(path)")
        return self.save(self.location)

    def set_search_params(self, **params: Any) -> None:
        """Set faiss search-time parameters (``nprobe`` for IVF, ``efSearch`` for HNSW); saved in the manifest."""
        faiss = _faiss()
        space = faiss.ParameterSpace()
        for name, value in params.items():
            try:
                space.set_index_parameter(self._index, name, value)
            except RuntimeError:
                raise CircotError(
                    f"search parameter {name!r} does not apply to index {self.manifest.factory!r}"
                ) from None
        self.manifest.search_params = {**self.manifest.search_params, **params}

    # ----------------------------------------------------------------------------------------- search
    def search_positions(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query: ``(scores float32 (n, k), rows int64 (n, k))``; empty slots are -inf / -1."""
        if k <= 0:
            raise CircotError(f"k must be positive, got {k}")
        q = _as_matrix(queries, self.dim, "queries")
        if self.manifest.normalized:
            q = _l2_normalize(q)
        if len(q) == 0:
            return np.zeros((0, k), np.float32), np.full((0, k), -1, np.int64)
        if self._index.ntotal == 0:
            return np.full((len(q), k), -np.inf, np.float32), np.full((len(q), k), -1, np.int64)
        flat = self._flat_vectors() if len(q) >= NUMPY_BATCH_MIN else None
        if flat is not None:
            scores, rows = _blocked_topk(flat, q, int(k))
        else:
            scores, rows = self._index.search(q, int(k))
        scores = scores.astype(np.float32, copy=False)
        rows = rows.astype(np.int64, copy=False)
        scores[rows < 0] = -np.inf
        return scores, rows

    def _flat_vectors(self) -> np.ndarray | None:
        """A zero-copy (n, d) view of an exact flat inner-product index's vectors, else None."""
        faiss = _faiss()
        index = faiss.downcast_index(self._index)
        if (
            type(index) not in (faiss.IndexFlatIP, faiss.IndexFlat)
            or index.metric_type != faiss.METRIC_INNER_PRODUCT
        ):
            return None
        n = index.ntotal
        if n == 0:
            return None
        view = faiss.rev_swig_ptr(index.get_xb(), n * self.dim)
        return np.asarray(view).reshape(n, self.dim)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` gallery ids per query: ``(scores float32 (n, k), ids object array of str (n, k))``.

        Empty slots (fewer than ``k`` vectors, or an approximate index that found fewer) have score ``-inf``
        and id ``""``.
        """
        scores, rows = self.search_positions(queries, k)
        ids = self.ids
        flat = np.empty(rows.size, dtype=object)
        flat[:] = [ids[r] if r >= 0 else "" for r in rows.ravel().tolist()]
        return scores, flat.reshape(rows.shape)

    def vectors(self) -> np.ndarray:
        """All stored vectors (n, d) float32 when the index can reconstruct them (flat and HNSW indexes)."""
        try:
            return self._index.reconstruct_n(0, self._index.ntotal)
        except RuntimeError:
            raise CircotError(f"index {self.manifest.factory!r} cannot return its vectors") from None

    # ----------------------------------------------------------------------------------------- persistence
    def save(self, path: str | Path) -> Path:
        """Save to folder ``path`` atomically (see the module docstring); returns the folder.

        One writer at a time: the builders in :mod:`circot.gallery` hold :func:`index_lock` around it."""
        faiss = _faiss()
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        previous = _read_manifest_if_any(folder)
        on_disk = _save_files(folder)  # the committed generation's, and any a killed save left uncommitted
        gen = 1 + max(
            [self.manifest.generation, previous.generation if previous else 0, *(g for g, _ in on_disk)]
        )
        tag = f"{gen:06d}-{uuid.uuid4().hex[:8]}"
        files = {"index": f"vectors-{tag}.faiss", "items": f"items-{tag}.json"}
        tmp_index = folder / f".{files['index']}.tmp"
        try:
            faiss.write_index(self._index, str(tmp_index))
            with open(tmp_index, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp_index, folder / files["index"])
        finally:
            if tmp_index.exists():
                tmp_index.unlink()
        atomic_write_json(folder / files["items"], {"ids": self.ids, "paths": self.paths})
        manifest = IndexManifest(
            **{
                **self.manifest.to_dict(),
                "generation": gen,
                "files": files,
                "count": len(self.ids),
                "updated": time.time(),
            }
        )
        atomic_write_json(folder / MANIFEST_NAME, manifest.to_dict())  # the commit point
        self.manifest = manifest
        self._location = folder
        # Everything older than this generation goes: the previous one's files and those of killed saves.
        for _, path in on_disk:
            if path.is_file():
                with contextlib.suppress(OSError):  # another process may be cleaning too
                    path.unlink()
        logger.info("saved index with %d vectors to %s", len(self.ids), folder)
        return folder

    @classmethod
    def load(cls, path: str | Path, mmap: bool = False) -> GalleryIndex:
        """Load an index folder. ``mmap=True`` memory-maps the vectors where faiss allows (read-only then)."""
        faiss = _faiss()
        folder = Path(path)
        manifest = _read_manifest_if_any(folder)
        if manifest is None:
            raise CircotError(f"{folder}: not an index folder (no {MANIFEST_NAME})")
        try:
            index_file = folder / manifest.files["index"]
            items_file = folder / manifest.files["items"]
        except KeyError as exc:
            raise CircotError(f"{folder / MANIFEST_NAME}: missing file entry {exc.args[0]!r}") from None
        for f in (index_file, items_file):
            if not f.is_file():
                raise CircotError(f"{folder}: index file {f.name} is missing")
        mmapped = False
        index = None
        if mmap:
            ivf = "IVF" in manifest.factory
            flag_sets = [faiss.IO_FLAG_MMAP] if ivf else [faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY]
            for flags in flag_sets:
                try:
                    index = faiss.read_index(str(index_file), flags)
                    mmapped = True
                    break
                except RuntimeError as exc:
                    logger.info("memory-mapped read not possible (%s); reading into memory", exc)
        if index is None:
            try:
                index = faiss.read_index(str(index_file))
            except RuntimeError as exc:
                raise CircotError(
                    f"{index_file}: cannot read faiss index: {str(exc).splitlines()[-1]}"
                ) from None
        ids, paths = _read_items(items_file)
        if index.d != manifest.dim:
            raise CircotError(f"{folder}: faiss index has dimension {index.d}, manifest says {manifest.dim}")
        loaded = cls(index, ids, paths, manifest, mmapped=mmapped)
        loaded._location = folder
        return loaded


def _without_rows(index: Any, rows: np.ndarray, factory: str) -> Any:
    """``index`` without ``rows`` (sorted), the later rows renumbered down: faiss's ``remove_ids`` where it
    compacts (flat indexes), else a trained copy refilled with the kept vectors."""
    faiss = _faiss()
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexFlat):
        index.remove_ids(np.ascontiguousarray(rows, np.int64))  # shifts the later rows up
        return index
    keep = np.ones(index.ntotal, bool)
    keep[rows] = False
    try:
        if hasattr(inner, "make_direct_map"):  # IVF indexes reconstruct through their direct map
            inner.make_direct_map()
        kept = index.reconstruct_n(0, index.ntotal)[keep]
    except RuntimeError:
        raise CircotError(
            f"index {factory!r} cannot delete items (its vectors cannot be read back)"
        ) from None
    if hasattr(inner, "make_direct_map"):
        inner.set_direct_map_type(faiss.DirectMap.NoMap)
    fresh = faiss.clone_index(index)
    fresh.reset()  # keeps the training (IVF centroids, PQ codebooks); HNSW graphs are rebuilt on add
    if len(kept):
        fresh.add(np.ascontiguousarray(kept, np.float32))
    return fresh


def _blocked_topk(
    gallery: np.ndarray, queries: np.ndarray, k: int, block: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner product: one BLAS product per gallery block, top-k kept across blocks; -inf/-1 padding.

    ``block`` defaults to ~64M scores (256 MB) per product."""
    nq, n = len(queries), len(gallery)
    block = block or max(65536, (1 << 26) // max(nq, 1))
    best_s = np.full((nq, 0), -np.inf, np.float32)
    best_i = np.zeros((nq, 0), np.int64)
    for start in range(0, n, block):
        s = queries @ gallery[start : start + block].T
        m = s.shape[1]
        kk = min(k, m)
        part = (
            np.argpartition(s, m - kk, axis=1)[:, m - kk :]  # the kk largest, unordered
            if kk < m
            else np.broadcast_to(np.arange(m), (nq, m))
        )
        cand_s = np.concatenate([best_s, np.take_along_axis(s, part, axis=1)], axis=1)
        cand_i = np.concatenate([best_i, part + start], axis=1)
        keep = min(k, cand_s.shape[1])
        # order by score descending, ties by row (as the exact scan would)
        order = np.lexsort((cand_i, -cand_s), axis=1)[:, :keep]
        best_s = np.take_along_axis(cand_s, order, axis=1)
        best_i = np.take_along_axis(cand_i, order, axis=1)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = np.pad(best_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        best_i = np.pad(best_i, ((0, 0), (0, pad)), constant_values=-1)
    return best_s.astype(np.float32, copy=False), best_i


def _read_items(items_file: Path) -> tuple[list[str], list[str]]:
    """Ids and paths of an item map; ids written as JSON numbers become their decimal strings."""
    try:
        items = json.loads(items_file.read_text(encoding="utf-8"))
        raw_ids, raw_paths = items["ids"], items["paths"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CircotError(f"{items_file}: malformed item map ({exc})") from None
    if not isinstance(raw_ids, list) or not isinstance(raw_paths, list):
        raise CircotError(f"{items_file}: malformed item map ('ids' and 'paths' must be lists)")
    for name, values in (("ids", raw_ids), ("paths", raw_paths)):
        for i, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise CircotError(f"{items_file}: {name}[{i}] must be a string, got {value!r}")
    return [str(i) for i in raw_ids], [str(p) for p in raw_paths]


@contextlib.contextmanager
def index_lock(folder: str | Path, create: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on an index folder while it is being written (``index build`` / ``index add``).

    The lock is an ``flock`` on the folder itself, released when the process ends, however it ends. A second
    writer gets a :class:`CircotError` at once instead of silently losing the first one's images.
    ``create``: make the folder first when it does not exist.
    """
    import fcntl

    folder = Path(folder)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError as exc:
        raise CircotError(f"{folder}: cannot open the index folder ({exc.strerror or exc})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CircotError(
                f"{folder}: another circot run is writing this index; wait for it to finish, then run "
                "this command again"
            ) from None
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _read_manifest_if_any(folder: Path) -> IndexManifest | None:
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CircotError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CircotError(f"{path}: expected a JSON object")
    return IndexManifest.from_dict(data, source=str(path))


def read_manifest(folder: str | Path) -> IndexManifest:
    """The manifest of an index folder (raises :class:`CircotError` when there is none)."""
    manifest = _read_manifest_if_any(Path(folder))
    if manifest is None:
        raise CircotError(f"{folder}: not an index folder (no {MANIFEST_NAME})")
    return manifest


def brute_force_search(gallery: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` inner-product search in numpy (reference and baseline): ``(scores, rows)``, ties by row."""
    scores = np.asarray(queries, np.float32) @ np.asarray(gallery, np.float32).T
    k_eff = min(k, scores.shape[1])
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k_eff]
    top = np.take_along_axis(scores, order, axis=1)
    if k_eff < k:
        pad = k - k_eff
        top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
        order = np.pad(order, ((0, 0), (0, pad)), constant_values=-1)
    return top.astype(np.float32), order.astype(np.int64)


__all__ = [
    "DEFAULT_FACTORY",
    "GalleryIndex",
    "IndexManifest",
    "atomic_write_bytes",
    "atomic_write_json",
    "brute_force_search",
    "index_lock",
    "read_manifest",
]

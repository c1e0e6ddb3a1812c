"""On-disk caches keyed by model fingerprint: image embeddings (by image content hash) and generated CoT.

Layout under a cache root (default ``$CIRCOT_CACHE`` or ``~/.cache/circot``)::

    embeddings/<fingerprint>/meta.json                      dimension, storage dtype
    embeddings/<fingerprint>/<chunk>.npy + <chunk>.keys.json one chunk per flush: vectors, then their keys
    cot/<fingerprint>/<chunk>.json                          {key: {"caption", "reasoning", "conclusion", ...}}

Chunks are written once, atomically, with unique names, and a chunk counts only once its keys file exists
(written after its vectors), so several processes (ranks of a sharded encode) may fill one cache at once and a
crash never leaves a half-written entry. Vectors may be stored as float16 to halve the disk space; they are
always returned (and scored) as float32.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from circot.errors import CircotError
from circot.index import atomic_write_bytes, atomic_write_json

logger = logging.getLogger(__name__)

_HASH_BLOCK = 1 << 20


def default_cache_dir() -> Path:
    """``$CIRCOT_CACHE`` if set, else ``$XDG_CACHE_HOME/circot``, else ``~/.cache/circot``."""
    if os.environ.get("CIRCOT_CACHE"):
        return Path(os.environ["CIRCOT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "circot"


def hash_file(path: str | Path) -> str:
    """sha256 hex digest of a file's bytes (the identity of an image in the cache)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while block := fh.read(_HASH_BLOCK):
                h.update(block)
    except OSError as exc:
        raise CircotError(f"cannot read image {str(path)!r}: {exc.strerror or exc}") from None
    return h.hexdigest()


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def hash_image(image: Any) -> str:
    """Content hash of an image given as a path or a PIL image (its mode, size and pixels)."""
    if isinstance(image, (str, Path)):
        return hash_file(image)
    h = hashlib.sha256()
    h.update(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def _safe_name(fingerprint: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in fingerprint)
    if not keep:
        raise CircotError("empty model fingerprint")
    return keep[:128]


def _chunk_name() -> str:
    return f"{os.getpid()}-{uuid.uuid4().hex}"


class EmbeddingCache:
    """Embeddings of images by content hash, for one model fingerprint.

    ``get(keys)`` returns float32 vectors for the keys found and a hit mask; ``put(keys, vectors)`` adds a
    chunk. Entries written by other processes become visible after :meth:`refresh` (called by ``get``
    on a miss).
    """

    def __init__(
        self, root: str | Path, fingerprint: str, dim: int | None = None, dtype: str = "float32"
    ) -> None:
        if dtype not in ("float32", "float16"):
            raise CircotError(f"cache dtype must be 'float32' or 'float16', not {dtype!r}")
        self.folder = Path(root) / "embeddings" / _safe_name(fingerprint)
        self.fingerprint = fingerprint
        self.dtype = dtype
        self.dim = dim
        self._where: dict[str, tuple[str, int]] = {}
        self._chunks: dict[str, np.ndarray] = {}
        self._seen_chunks: set[str] = set()
        meta = self.folder / "meta.json"
        if meta.is_file():
            try:
                info = json.loads(meta.read_text())
            except ValueError:
                info = {}
            if info.get("fingerprint") not in (None, fingerprint):
                raise CircotError(f"{meta}: cache folder belongs to another model fingerprint")
            if dim is not None and info.get("dim") not in (None, dim):
                raise CircotError(
                    f"{meta}: cached dimension {info.get('dim')} differs from the model's {dim}"
                )
            self.dim = info.get("dim", dim)
        self.refresh()

    def refresh(self) -> None:
        """Pick up chunks written since the last look (by this or another process)."""
        if not self.folder.is_dir():
            return
        for keys_file in sorted(self.folder.glob("*.keys.json")):
            chunk = keys_file.name[: -len(".keys.json")]
            if chunk in self._seen_chunks:
                continue
            try:
                keys = json.loads(keys_file.read_text())
            except (OSError, ValueError):
                logger.warning("ignoring unreadable cache chunk %s", keys_file)
                continue
            self._seen_chunks.add(chunk)
            for row, key in enumerate(keys):
                self._where.setdefault(key, (chunk, row))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def _chunk(self, chunk: str) -> np.ndarray:
        arr = self._chunks.get(chunk)
        if arr is None:
            arr = np.load(self.folder / f"{chunk}.npy", mmap_mode="r")
            self._chunks[chunk] = arr
        return arr

    def get(self, keys: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """``(vectors float32 (n, d), hit bool (n,))`` — rows of misses are zeros."""
        if any(k not in self._where for k in keys):
            self.refresh()
        hit = np.array([k in self._where for k in keys], dtype=bool)
        dim = self.dim or 0
        out = np.zeros((len(keys), dim), np.float32)
        for i, key in enumerate(keys):
            if hit[i]:
                chunk, row = self._where[key]
                try:
                    out[i] = self._chunk(chunk)[row]
                except (OSError, ValueError, IndexError):
                    logger.warning("cache chunk %s is unreadable; re-encoding its images", chunk)
                    hit[i] = False
        return out, hit

    def put(self, keys: Sequence[str], vectors: np.ndarray) -> None:
        """Store one chunk of vectors (n, d) under ``keys``."""
        vectors = np.asarray(vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(keys):
            raise ValueError(f"put: {len(keys)} keys for vectors of shape {vectors.shape}")
        if not len(keys):
            return
        if self.dim is None:
            self.dim = int(vectors.shape[1])
        if vectors.shape[1] != self.dim:
            raise CircotError(
                f"embedding cache: vectors of dimension {vectors.shape[1]}, cache holds {self.dim}"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / "meta.json"
        if not meta.is_file():
            atomic_write_json(meta, {"fingerprint": self.fingerprint, "dim": self.dim, "dtype": self.dtype})
        chunk = _chunk_name()
        tmp = self.folder / f".{chunk}.npy.tmp"
        try:
            with open(tmp, "wb") as fh:
                np.save(fh, vectors.astype(self.dtype))
            os.replace(tmp, self.folder / f"{chunk}.npy")
        finally:
            if tmp.exists():
                tmp.unlink()
        atomic_write_json(self.folder / f"{chunk}.keys.json", list(keys))  # commit point of the chunk
        self._seen_chunks.add(chunk)
        for row, key in enumerate(keys):
            self._where.setdefault(key, (chunk, row))


def encode_cached(
    items: Sequence[Any],
    keys: Sequence[str],
    encode: Callable[[list[Any]], np.ndarray],
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    flush_every: int = 1024,
    progress: bool = False,
    stats: dict[str, int] | None = None,
) -> np.ndarray:
    """Embeddings of ``items`` (float32, (n, d)), encoding only cache misses, in batches of ``batch_size``.

    New embeddings are written to the cache every ``flush_every`` items, so an interrupted run loses at most
    that much work and a re-run resumes from the cache. Duplicate keys are encoded once. ``stats``: a dict
    that receives the number of items ``encoded`` and ``cached`` (found in the cache).
    """
    n = len(items)
    if len(keys) != n:
        raise ValueError("encode_cached: items and keys differ in length")
    if cache is not None:
        cached, hit = cache.get(keys)
    else:
        cached, hit = None, np.zeros(n, bool)
    todo: dict[str, int] = {}
    for i in range(n):
        if not hit[i] and keys[i] not in todo:
            todo[keys[i]] = i
    logger.info("encoding %d of %d images (%d found in the cache)", len(todo), n, int(hit.sum()))
    if stats is not None:
        stats.update(encoded=len(todo), cached=int(hit.sum()))
    new: dict[str, np.ndarray] = {}
    pending_keys: list[str] = []
    pending_vecs: list[np.ndarray] = []
    order = list(todo.items())
    bar = None
    if progress and order:
        from circot.progress import progress_bar

        bar = progress_bar(total=len(order), desc="encoding", unit="img")

    def flush() -> None:
        if cache is not None and pending_keys:
            cache.put(pending_keys, np.concatenate(pending_vecs))
        pending_keys.clear()
        pending_vecs.clear()

    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        vecs = np.asarray(encode([items[i] for _, i in batch]), np.float32)
        if vecs.ndim != 2 or len(vecs) != len(batch):
            raise RuntimeError(f"encoder returned shape {vecs.shape} for a batch of {len(batch)}")
        finite = np.isfinite(vecs).all(axis=1)  # a NaN row marks an image that was skipped: never cached
        for (key, _), v in zip(batch, vecs, strict=True):
            new[key] = v
        pending_keys.extend(k for (k, _), ok in zip(batch, finite, strict=True) if ok)
        pending_vecs.append(vecs[finite])
        if len(pending_keys) >= flush_every:
            flush()
        if bar is not None:
            bar.update(len(batch))
    flush()
    if bar is not None:
        bar.close()
    dim = next(iter(new.values())).shape[0] if new else (cached.shape[1] if cached is not None else 0)
    out = np.zeros((n, dim), np.float32)
    for i in range(n):
        out[i] = cached[i] if hit[i] else new[keys[i]]
    return out


class CoTCache:
    """Generated chains of thought by query key, for one model fingerprint (and generation settings)."""

    def __init__(self, root: str | Path, fingerprint: str) -> None:
        self.folder = Path(root) / "cot" / _safe_name(fingerprint)
        self._data: dict[str, dict[str, Any]] = {}
        self._seen: set[str] = set()
        self.refresh()

    @staticmethod
    def key(image_hash: str, text: str) -> str:
        """Cache key of a query: the reference image's content hash and the modification text."""
        return hashlib.sha256(f"{image_hash}\n{text}".encode()).hexdigest()

    def refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for f in sorted(self.folder.glob("*.json")):
            if f.name in self._seen:
                continue
            try:
                data = json.loads(f.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                logger.warning("ignoring unreadable CoT cache chunk %s", f)
                continue
            self._seen.add(f.name)
            for k, v in data.items():
                self._data.setdefault(k, v)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def get(self, key: str) -> dict[str, Any] | None:
        return self._data.get(key)

    def put(self, entries: dict[str, dict[str, Any]] | Iterable[tuple[str, dict[str, Any]]]) -> None:
        entries = dict(entries)
        if not entries:
            return
        name = f"{_chunk_name()}.json"
        atomic_write_bytes(self.folder / name, json.dumps(entries, ensure_ascii=False).encode("utf-8"))
        self._seen.add(name)
        for k, v in entries.items():
            self._data.setdefault(k, v)


__all__ = [
    "CoTCache",
    "EmbeddingCache",
    "default_cache_dir",
    "encode_cached",
    "hash_bytes",
    "hash_file",
    "hash_image",
]

"""The vector store behind a gallery: one interface, two backends, chosen by a URI.

=========================================  =================================================================
URI                                        backend
=========================================  =================================================================
``path/to/folder``                         faiss (:class:`circot.index.GalleryIndex`): embedded, the default
``milvus-lite:///path/to/file.db``         Milvus, embedded (milvus-lite): the engine runs in this process
``path/to/file.db``                        the same (a path ending in ``.db``)
``milvus://host:19530/collection``         a Milvus server or cluster (``milvus+https://`` for TLS)
=========================================  =================================================================

Query parameters: ``collection=NAME`` (milvus-lite; default ``gallery``), ``index=FLAT|HNSW|IVF_FLAT|...``
(the Milvus index type, ``FLAT`` exact by default) with its build parameters ``M``, ``efConstruction``,
``nlist`` and search parameters ``ef``, ``nprobe``. A server's token is read from ``$MILVUS_TOKEN``
(``user:password`` or an API key).

Every store has the same operations (:class:`VectorStore`): ``add``, ``upsert``, ``delete``, ``search`` (the
shapes of :meth:`GalleryIndex.search`: ``(n, k)`` float32 scores and ``(n, k)`` id strings, best first,
padded with ``-inf`` / ``""``), ``len``, ``ids``, ``path_of``, the ``manifest`` (model fingerprint,
dimension, model reference) and ``commit``. :func:`open_store` opens one, :func:`build_store` (re)builds one.

Guarantees, for both backends:

- A build replaces the store only when it completes: faiss writes a new generation and switches the manifest;
  Milvus fills a new collection and switches the store's alias to it, then drops the collection the alias
  named before. An error during the build leaves the previous store as it was.
- A build removes only what it wrote: the files of the faiss manifest; the Milvus collections that the
  store's alias named (never another collection of the database, never a file).
- Writers are serialised: faiss by :func:`circot.index.index_lock`; milvus-lite by the engine, which holds
  an exclusive lock on its database while a process has it open (a second process gets a clear error); a
  Milvus server applies each write atomically (of two builds at once, the last to finish wins).
- Vectors are L2-normalised and scored by inner product (cosine) in both.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlsplit

import numpy as np

from circot.errors import CircotError
from circot.index import (
    DEFAULT_FACTORY,
    GalleryIndex,
    IndexManifest,
    _as_matrix,
    _l2_normalize,
    index_lock,
)

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "gallery"
META_KEY = "circot.manifest"  # the collection property that holds the manifest
PHYSICAL_TAG = "__circot_"  # physical collections are <alias>__circot_<generation>_<hex>
MAX_ID_CHARS = 4096
MAX_PATH_CHARS = 65535
INSERT_BATCH_BYTES = 32 << 20  # rows per insert request: under the 64 MB gRPC message limit
MILVUS_SEARCH_MAX_K = 16384
ID_PAGE = 8192  # rows per page when listing the ids
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,200}$")
_INDEX_TYPES = ("FLAT", "HNSW", "IVF_FLAT", "IVF_SQ8", "HNSW_SQ", "AUTOINDEX")
_BUILD_PARAMS = {"M": int, "efConstruction": int, "nlist": int}
_SEARCH_PARAMS = {"ef": int, "nprobe": int}


@runtime_checkable
class VectorStore(Protocol):
    """What circot needs from a gallery store (:class:`GalleryIndex` and :class:`MilvusStore` provide it)."""

    manifest: IndexManifest

    @property
    def dim(self) -> int: ...

    @property
    def model_fingerprint(self) -> str: ...

    @property
    def ids(self) -> Sequence[str]: ...

    def __len__(self) -> int: ...

    def __contains__(self, image_id: object) -> bool: ...

    def path_of(self, image_id: str) -> Path: ...

    def train(self, vectors: np.ndarray) -> None: ...

    def add(
        self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None = None
    ) -> None: ...

    def upsert(
        self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None = None
    ) -> None: ...

    def delete(self, ids: Sequence[str]) -> int: ...

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]: ...

    def commit(self) -> Any: ...


# --------------------------------------------------------------------------------------------- URIs
@dataclass(frozen=True)
class StoreSpec:
    """A parsed store URI: ``kind`` is ``faiss``, ``milvus-lite`` or ``milvus``."""

    kind: str
    uri: str  # as the user wrote it
    path: Path | None = None  # faiss folder or milvus-lite database
    client_uri: str = ""  # what MilvusClient is given
    collection: str = DEFAULT_COLLECTION
    index_type: str = "FLAT"
    build_params: dict[str, int] = field(default_factory=dict)
    search_params: dict[str, int] = field(default_factory=dict)

    @property
    def is_faiss(self) -> bool:
        return self.kind == "faiss"

    def __str__(self) -> str:
        return self.uri


def parse_store_uri(uri: str | Path | StoreSpec) -> StoreSpec:
    """Parse a store URI (see the module docstring); a bad one is a :class:`CircotError` naming it."""
    if isinstance(uri, StoreSpec):
        return uri
    text = str(uri)
    if not text.strip():
        raise CircotError("store: empty URI")
    scheme = text.split("://", 1)[0].lower() if "://" in text else ""
    if scheme in ("milvus", "milvus+http", "milvus+https"):
        parts = urlsplit(text)
        if not parts.hostname:
            raise CircotError(f"store {text!r}: no host (expected milvus://host:19530/collection)")
        try:
            port = parts.port or 19530
        except ValueError:
            raise CircotError(f"store {text!r}: the port is not a number") from None
        collection = parts.path.strip("/") or DEFAULT_COLLECTION
        options = _options(text, parts.query, allow_collection=False)
        http = "https" if scheme == "milvus+https" else "http"
        return StoreSpec(
            "milvus",
            text,
            None,
            f"{http}://{parts.hostname}:{port}",
            _collection(text, collection),
            **options,
        )
    if scheme == "milvus-lite":
        rest = text.split("://", 1)[1]
        path_part, _, query = rest.partition("?")
        if not path_part:
            raise CircotError(f"store {text!r}: no database path (expected milvus-lite:///path/file.db)")
        options = _options(text, query, allow_collection=True)
        collection = options.pop("collection", DEFAULT_COLLECTION)
        path = Path(path_part).expanduser()
        return StoreSpec("milvus-lite", text, path, str(path), _collection(text, collection), **options)
    if scheme:
        raise CircotError(
            f"store {text!r}: unknown scheme {scheme!r}; use a folder (faiss), milvus-lite:///file.db "
            "or milvus://host:19530/collection"
        )
    path_part, _, query = text.partition("?")
    path = Path(path_part).expanduser()
    if path.suffix == ".db" and not (path / "manifest.json").is_file():
        options = _options(text, query, allow_collection=True)
        collection = options.pop("collection", DEFAULT_COLLECTION)
        return StoreSpec("milvus-lite", text, path, str(path), _collection(text, collection), **options)
    return StoreSpec("faiss", text, Path(text).expanduser())


def _collection(uri: str, name: str) -> str:
    if not _NAME.match(name) or PHYSICAL_TAG in name:
        raise CircotError(
            f"store {uri!r}: collection name {name!r} must be letters, digits and underscores, starting "
            f"with a letter or underscore (and must not contain {PHYSICAL_TAG!r})"
        )
    return name


def _options(uri: str, query: str, allow_collection: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"build_params": {}, "search_params": {}}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key == "collection" and allow_collection:
            out["collection"] = value
        elif key == "index":
            if value.upper() not in _INDEX_TYPES:
                raise CircotError(f"store {uri!r}: index={value!r}; choose one of {', '.join(_INDEX_TYPES)}")
            out["index_type"] = value.upper()
        elif key in _BUILD_PARAMS or key in _SEARCH_PARAMS:
            try:
                number = int(value)
            except ValueError:
                raise CircotError(f"store {uri!r}: {key}={value!r} must be an integer") from None
            if number < 1:
                raise CircotError(f"store {uri!r}: {key}={value!r} must be positive")
            out["build_params" if key in _BUILD_PARAMS else "search_params"][key] = number
        else:
            known = ["collection"] if allow_collection else []
            known += ["index", *_BUILD_PARAMS, *_SEARCH_PARAMS]
            raise CircotError(f"store {uri!r}: unknown option {key!r}; known: {', '.join(known)}")
    return out


# --------------------------------------------------------------------------------------------- factory
def open_store(
    uri: str | Path | StoreSpec, mmap: bool = False, model_fingerprint: str | None = None
) -> VectorStore:
    """Open an existing store. ``model_fingerprint``: refuse a store built by another model.

    ``mmap`` applies to faiss (a memory-mapped index is read-only)."""
    spec = parse_store_uri(uri)
    if spec.is_faiss:
        store: VectorStore = GalleryIndex.load(spec.path, mmap=mmap)
    else:
        store = MilvusStore.open(spec)
    if model_fingerprint is not None:
        check_fingerprint(store, model_fingerprint, spec)
    return store


def store_exists(uri: str | Path | StoreSpec) -> bool:
    """Whether there is a circot store at ``uri`` (a Milvus server must be reachable to tell)."""
    spec = parse_store_uri(uri)
    if spec.is_faiss:
        return (spec.path / "manifest.json").is_file()
    if spec.kind == "milvus-lite" and not spec.path.exists():
        return False
    client = _connect(spec)
    try:
        return client.target_of(spec.collection) is not None
    finally:
        client.close()


def check_fingerprint(store: Any, model_fingerprint: str, where: Any = "the index") -> None:
    """A :class:`CircotError` when ``store`` was built by another model than ``model_fingerprint``."""
    if store.model_fingerprint != model_fingerprint:
        raise CircotError(
            f"{where}: index was built by model {store.model_fingerprint[:16]}, not by the given model "
            f"{model_fingerprint[:16]}; use the same model or build a new index"
        )


def read_store_manifest(uri: str | Path | StoreSpec) -> IndexManifest:
    """The manifest of a store (faiss: without loading the vectors)."""
    from circot.index import read_manifest

    spec = parse_store_uri(uri)
    if spec.is_faiss:
        return read_manifest(spec.path)
    with contextlib.closing(MilvusStore.open(spec)) as store:
        return store.manifest


@contextlib.contextmanager
def store_writer(uri: str | Path | StoreSpec) -> Iterator[VectorStore]:
    """An existing store opened for writing, under its lock; the changes are committed when the block ends
    without an error (faiss: one new generation; Milvus: applied as they are made, flushed at the end)."""
    spec = parse_store_uri(uri)
    if spec.is_faiss:
        with index_lock(spec.path):
            index = GalleryIndex.load(spec.path, mmap=False)
            yield index
            index.commit()
        return
    with contextlib.closing(MilvusStore.open(spec)) as store:
        yield store
        store.commit()


@contextlib.contextmanager
def build_store(
    uri: str | Path | StoreSpec,
    dim: int,
    model_fingerprint: str,
    model: str | None = None,
    factory: str = DEFAULT_FACTORY,
    search_params: dict[str, Any] | None = None,
) -> Iterator[VectorStore]:
    """A new, empty store to fill; it replaces the store at ``uri`` when the block ends without an error.

    On an error nothing changes at ``uri`` (the previous store stays usable). ``factory`` and
    ``search_params`` are faiss's (a Milvus index type is set in the URI)."""
    spec = parse_store_uri(uri)
    if spec.is_faiss:
        folder = spec.path
        with index_lock(folder, create=True):
            index = GalleryIndex.create(dim, model_fingerprint, factory=factory, model=model)
            yield index
            if search_params:
                index.set_search_params(**search_params)
            index.save(folder)
        return
    if factory != DEFAULT_FACTORY:
        raise CircotError(
            f"store {spec.uri!r}: a faiss factory ({factory!r}) does not apply to Milvus; set the index type "
            "in the URI instead, e.g. ?index=HNSW"
        )
    with contextlib.closing(_connect(spec)) as client:
        building = _MilvusBuild(client, spec, dim, model_fingerprint, model)
        try:
            yield building.store
        except BaseException:
            building.abandon()
            raise
        building.commit()


# --------------------------------------------------------------------------------------------- Milvus
def _pymilvus():
    try:
        import pymilvus
    except ImportError:
        raise CircotError(
            "the Milvus store needs pymilvus and milvus-lite: pip install 'circot[milvus]'"
        ) from None
    # pymilvus logs every failed call with a traceback on its own handlers; circot reports them itself, in
    # one line (the CircotError of _Client.call)
    for name in ("pymilvus", "pymilvus.milvus_client"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    return pymilvus


_LITE_CLIENTS: dict[str, int] = {}  # open clients per milvus-lite database in this process


class _Client:
    """A MilvusClient with the errors of connecting turned into one clear :class:`CircotError`."""

    def __init__(self, spec: StoreSpec) -> None:
        pymilvus = _pymilvus()
        self.spec = spec
        kwargs: dict[str, Any] = {}
        if spec.kind == "milvus-lite":
            path = spec.path
            if path.exists() and not path.is_dir():
                raise CircotError(
                    f"store {spec.uri!r}: {str(path)!r} is a file, not a milvus-lite database (a folder)"
                )
            if path.is_dir() and any(path.iterdir()) and not (path / "collections").is_dir():
                raise CircotError(
                    f"store {spec.uri!r}: {str(path)!r} is a folder that is not a milvus-lite database"
                )
            path.parent.mkdir(parents=True, exist_ok=True)
            grpc_log = logging.getLogger("grpc._server")
            if _DROP_UNIMPLEMENTED not in grpc_log.filters:
                grpc_log.addFilter(_DROP_UNIMPLEMENTED)
        else:
            token = os.environ.get("MILVUS_TOKEN", "")
            if token:
                kwargs["token"] = token
        timeout = float(os.environ.get("CIRCOT_MILVUS_TIMEOUT", "10"))
        self.client = None
        try:
            self.client = pymilvus.MilvusClient(spec.client_uri, timeout=timeout, **kwargs)
            if spec.kind == "milvus-lite":
                key = str(Path(spec.path).resolve())
                _LITE_CLIENTS[key] = _LITE_CLIENTS.get(key, 0) + 1
        except Exception as exc:  # pymilvus and milvus-lite raise their own exception types
            text = str(exc)
            if "lock" in text.lower() or "Open local milvus failed" in text:
                raise CircotError(
                    f"store {spec.uri!r}: another process has this milvus-lite database open (the engine "
                    "holds its lock); wait for it to finish, or serve it from a Milvus server"
                ) from None
            where = "reach the Milvus server at " + spec.client_uri if spec.kind == "milvus" else "open"
            raise CircotError(f"store {spec.uri!r}: cannot {where}: {_message(exc)}") from None

    def close(self) -> None:
        if self.client is None:
            return
        with contextlib.suppress(Exception):
            self.client.close()
        self.client = None
        if self.spec.kind == "milvus-lite":
            # milvus-lite keeps its engine (and the database's lock) until the process ends; stop it when the
            # last client of this database in the process closes, so that it is free for other processes
            key = str(Path(self.spec.path).resolve())
            _LITE_CLIENTS[key] -= 1
            if _LITE_CLIENTS[key] == 0:
                with contextlib.suppress(Exception):
                    from milvus_lite.server_manager import server_manager_instance

                    server_manager_instance.release_server(str(self.spec.path))

    def call(self, what: str, fn: str, *args: Any, **kwargs: Any) -> Any:
        if self.client is None:
            raise CircotError(
                f"store {self.spec.uri!r}: {what} on a closed store handle; open it again with "
                "circot.open_store(uri)"
            )
        try:
            return getattr(self.client, fn)(*args, **kwargs)
        except Exception as exc:
            raise CircotError(f"store {self.spec.uri!r}: {what} failed: {_message(exc)}") from None

    def target_of(self, alias: str) -> str | None:
        """The physical collection that ``alias`` names, None when there is no such alias."""
        listing = self.call("listing aliases", "list_aliases")
        names = listing.get("aliases", []) if isinstance(listing, dict) else list(listing)
        if alias not in names:
            return None
        return self.call("describing the alias", "describe_alias", alias)["collection_name"]


def _literal(text: str) -> str:
    """A Milvus filter-expression string literal (pymilvus's own ``ids=`` arguments do not escape ``\\``)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


ID_CHUNK = 4096  # ids per filter expression


def _id_filter(ids: Sequence[str]) -> str:
    return "id in [" + ",".join(_literal(i) for i in ids) + "]"


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or str(exc).splitlines()[0] or type(exc).__name__


class _DropUnimplemented(logging.Filter):
    """pymilvus asks milvus-lite for services it lacks (a timestamp for query iterators, ...); it then falls
    back, and works, but the in-process engine logs each such request as an error with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Method not implemented" not in record.getMessage()


_DROP_UNIMPLEMENTED = _DropUnimplemented()


def _connect(spec: StoreSpec) -> _Client:
    return _Client(spec)


class MilvusStore:
    """A gallery in a Milvus collection: ``id`` (VARCHAR primary key), ``path`` (VARCHAR) and ``vector``
    (FLOAT_VECTOR, inner product on L2-normalised vectors); the manifest is the collection property
    ``circot.manifest``. The store's name is an alias of the collection that holds the current build."""

    def __init__(self, client: _Client, spec: StoreSpec, collection: str, manifest: IndexManifest) -> None:
        self._client = client
        self.spec = spec
        self.collection = collection  # what reads and writes address: the alias, or a build's own collection
        self.manifest = manifest
        self.skipped: dict[str, str] = {}
        self._paths: dict[str, str] = {}  # id -> path seen so far (search results, gets)
        self._ids: list[str] | None = None
        self._owns_client = False

    @classmethod
    def open(cls, spec: StoreSpec) -> MilvusStore:
        client = _connect(spec)
        try:
            physical = client.target_of(spec.collection)
            if physical is None:
                collections = client.call("listing collections", "list_collections")
                if spec.collection in collections:
                    raise CircotError(
                        f"store {spec.uri!r}: collection {spec.collection!r} was not made by circot (it is not "
                        "a circot store's alias); choose another name"
                    )
                raise CircotError(
                    f"store {spec.uri!r}: no circot index named {spec.collection!r} here; build one with "
                    "`circot index build --store ...`"
                )
            manifest = _read_collection_manifest(client, physical, spec)
            manifest.search_params = {**manifest.search_params, **spec.search_params}  # the URI's win
            client.call("loading the collection", "load_collection", physical)
            store = cls(client, spec, spec.collection, manifest)
            store._owns_client = True
            store.manifest.count = len(store)
            return store
        except BaseException:
            client.close()
            raise

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    # -- the interface -------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def location(self) -> str:
        return self.spec.uri

    def __len__(self) -> int:
        rows = self._client.call("counting", "query", self.collection, filter="", output_fields=["count(*)"])
        return int(rows[0]["count(*)"])

    @property
    def ids(self) -> list[str]:
        """Every id (read from the collection once, then kept until the next write)."""
        if self._ids is None:
            ids: list[str] = []
            try:
                iterator = self._client.client.query_iterator(
                    self.collection, batch_size=ID_PAGE, filter="", output_fields=["id", "path"]
                )
                while batch := iterator.next():
                    for row in batch:
                        ids.append(row["id"])
                        self._paths[row["id"]] = row["path"]
                iterator.close()
            except Exception as exc:
                raise CircotError(
                    f"store {self.spec.uri!r}: reading the ids failed: {_message(exc)}"
                ) from None
            self._ids = ids
        return self._ids

    def __contains__(self, image_id: object) -> bool:
        return isinstance(image_id, str) and self._lookup(image_id) is not None

    def _lookup(self, image_id: str) -> str | None:
        if image_id in self._paths:
            return self._paths[image_id]
        rows = self._client.call(
            "reading a path", "query", self.collection, filter=_id_filter([image_id]), output_fields=["path"]
        )
        if not rows:
            return None
        self._paths[image_id] = rows[0]["path"]
        return self._paths[image_id]

    def path_of(self, image_id: str) -> Path:
        path = self._lookup(str(image_id))
        if path is None:
            raise CircotError(f"unknown gallery id {image_id!r}")
        return Path(path)

    path = path_of

    def train(self, vectors: np.ndarray) -> None:
        """Nothing to do: Milvus builds its index itself."""

    def add(self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None = None) -> None:
        """Insert new items; an id that is already stored is a :class:`CircotError` (use :meth:`upsert`)."""
        x, ids_s, paths_s = self._rows(vectors, ids, paths, "add")
        found = self._query_ids(ids_s, ["id"], "checking ids")
        if found:
            raise CircotError(f"add: id {found[0]['id']!r} is already in the index")
        self._write("insert", x, ids_s, paths_s)

    def upsert(
        self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None = None
    ) -> None:
        """Insert the items, replacing the vector and path of the ids already stored."""
        x, ids_s, paths_s = self._rows(vectors, ids, paths, "upsert")
        self._write("upsert", x, ids_s, paths_s)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove the items with these ids (unknown ids are ignored); returns how many were removed."""
        ids_s = list(dict.fromkeys(str(i) for i in ids))
        if not ids_s:
            return 0
        present = [r["id"] for r in self._query_ids(ids_s, ["id"], "checking ids")]
        for start in range(0, len(present), ID_CHUNK):
            chunk = present[start : start + ID_CHUNK]
            self._client.call("deleting", "delete", self.collection, filter=_id_filter(chunk))
        self._changed(ids_s)
        return len(present)

    def search(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` ids per query, as :meth:`GalleryIndex.search`: scores float32 (n, k), ids (n, k)."""
        if k <= 0:
            raise CircotError(f"k must be positive, got {k}")
        q = _as_matrix(queries, self.dim, "queries")
        if self.manifest.normalized:
            q = _l2_normalize(q)
        n = len(q)
        scores = np.full((n, k), -np.inf, np.float32)
        found = np.full((n, k), "", dtype=object)
        if n == 0:
            return scores, found
        limit = min(int(k), MILVUS_SEARCH_MAX_K)
        params: dict[str, Any] = {"metric_type": "IP", "params": dict(self.manifest.search_params)}
        if self.manifest.factory == "HNSW":
            params["params"]["ef"] = max(limit, int(params["params"].get("ef", 64)))
        results = self._client.call(
            "searching",
            "search",
            self.collection,
            data=list(q),
            limit=limit,
            output_fields=["path"],
            search_params=params,
            anns_field="vector",
        )
        for row, hits in enumerate(results):
            for col, hit in enumerate(hits):
                image_id = str(hit["id"])
                scores[row, col] = hit["distance"]
                found[row, col] = image_id
                self._paths[image_id] = hit["entity"]["path"]
        return scores, found

    def commit(self) -> str:
        """Flush the writes to storage (they are visible to searches already)."""
        self._client.call("flushing", "flush", self.collection)
        self.manifest.count = len(self)
        return self.spec.uri

    def vectors_of(self, ids: Sequence[str]) -> np.ndarray:
        """The stored (normalised) vectors of ``ids``, in that order; an unknown id is a :class:`CircotError`."""
        out = np.zeros((len(ids), self.dim), np.float32)
        where = {str(i): n for n, i in enumerate(ids)}
        rows = self._query_ids(list(where), ["vector"], "reading vectors", chunk=1024)
        if len(rows) != len(where):
            got = {r["id"] for r in rows}
            missing = next(i for i in where if i not in got)
            raise CircotError(f"unknown gallery id {missing!r}")
        for r in rows:
            out[where[r["id"]]] = np.asarray(r["vector"], np.float32)
        return out

    # -- helpers -------------------------------------------------------------------------------------------
    def _rows(
        self, vectors: np.ndarray, ids: Sequence[str], paths: Sequence[str | Path] | None, what: str
    ) -> tuple[np.ndarray, list[str], list[str]]:
        x = _as_matrix(vectors, self.dim, "vectors")
        ids_s = [str(i) for i in ids]
        paths_s = [str(p) for p in paths] if paths is not None else [""] * len(ids_s)
        if len(ids_s) != len(x) or len(paths_s) != len(x):
            raise CircotError(f"{what}: {len(x)} vectors but {len(ids_s)} ids and {len(paths_s)} paths")
        if len(set(ids_s)) != len(ids_s):
            dup = next(i for i in ids_s if ids_s.count(i) > 1)
            raise CircotError(f"{what}: id {dup!r} is given twice")
        for i, p in zip(ids_s, paths_s, strict=True):
            if not i:
                raise CircotError(f"{what}: empty id")
            if len(i.encode("utf-8")) > MAX_ID_CHARS:
                raise CircotError(f"{what}: id {i[:40]!r}... is longer than {MAX_ID_CHARS} bytes")
            if len(p.encode("utf-8")) > MAX_PATH_CHARS:
                raise CircotError(f"{what}: path {p[:40]!r}... is longer than {MAX_PATH_CHARS} bytes")
        if self.manifest.normalized:
            x = _l2_normalize(x)
        return x.astype(np.float32, copy=False), ids_s, paths_s

    def _query_ids(
        self, ids: Sequence[str], fields: list[str], what: str, chunk: int = ID_CHUNK
    ) -> list[dict]:
        """The stored rows (the id and ``fields``) of those of ``ids`` that exist, ``chunk`` ids per query."""
        rows: list[dict] = []
        for start in range(0, len(ids), chunk):
            part = ids[start : start + chunk]
            rows += self._client.call(
                what, "query", self.collection, filter=_id_filter(part), output_fields=fields
            )
        return rows

    def _write(self, op: str, x: np.ndarray, ids: list[str], paths: list[str]) -> None:
        step = max(1, INSERT_BATCH_BYTES // (4 * self.dim + 256))
        for start in range(0, len(ids), step):
            end = start + step
            rows = [
                {"id": i, "path": p, "vector": v}
                for i, p, v in zip(ids[start:end], paths[start:end], x[start:end], strict=True)
            ]
            self._client.call(op, op, self.collection, rows)
        self._changed(ids)
        self._paths.update(zip(ids, paths, strict=True))

    def _changed(self, ids: Sequence[str]) -> None:
        self._ids = None
        for i in ids:
            self._paths.pop(i, None)


def _read_collection_manifest(client: _Client, physical: str, spec: StoreSpec) -> IndexManifest:
    info = client.call("describing the collection", "describe_collection", physical)
    raw = (info.get("properties") or {}).get(META_KEY)
    if raw is None:
        raise CircotError(f"store {spec.uri!r}: collection {physical!r} has no circot manifest ({META_KEY})")
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CircotError(
            f"store {spec.uri!r}: the manifest of {physical!r} is not valid JSON ({exc})"
        ) from None
    if not isinstance(data, dict):
        raise CircotError(f"store {spec.uri!r}: the manifest of {physical!r} is not a JSON object")
    return IndexManifest.from_dict(data, source=f"store {spec.uri!r}")


class _MilvusBuild:
    """A build into a new physical collection, switched in by the store's alias at :meth:`commit`."""

    def __init__(
        self, client: _Client, spec: StoreSpec, dim: int, fingerprint: str, model: str | None
    ) -> None:
        pymilvus = _pymilvus()
        from circot import __version__

        if dim <= 0:
            raise CircotError(f"index dimension must be positive, got {dim}")
        self.client = client
        self.spec = spec
        self.previous = client.target_of(spec.collection)
        if self.previous is None and spec.collection in client.call(
            "listing collections", "list_collections"
        ):
            raise CircotError(
                f"store {spec.uri!r}: collection {spec.collection!r} was not made by circot; choose another name"
            )
        generation = 0
        if self.previous is not None:
            generation = _read_collection_manifest(client, self.previous, spec).generation
        generation += 1
        self.physical = f"{spec.collection}{PHYSICAL_TAG}{generation:06d}_{uuid.uuid4().hex[:8]}"
        now = time.time()
        manifest = IndexManifest(
            model_fingerprint=fingerprint,
            dim=int(dim),
            factory=spec.index_type,
            model=model,
            search_params=dict(spec.search_params),
            circot_version=__version__,
            faiss_version="",
            generation=generation,
            files={"collection": self.physical},
            created=now,
            updated=now,
        )
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.VARCHAR, is_primary=True, max_length=MAX_ID_CHARS)
        schema.add_field("path", pymilvus.DataType.VARCHAR, max_length=MAX_PATH_CHARS)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=int(dim))
        index_params = client.client.prepare_index_params()
        index_params.add_index(
            field_name="vector", index_type=spec.index_type, metric_type="IP", params=dict(spec.build_params)
        )
        client.call(
            "creating the collection",
            "create_collection",
            self.physical,
            schema=schema,
            index_params=index_params,
            consistency_level="Strong",
            properties={META_KEY: json.dumps(manifest.to_dict())},
        )
        self.store = MilvusStore(client, spec, self.physical, manifest)

    def commit(self) -> None:
        self.client.call("flushing", "flush", self.physical)
        self.store.manifest.count = len(self.store)
        current = self.client.target_of(self.spec.collection)  # another build may have finished meanwhile
        if current is None:
            self.client.call("naming the collection", "create_alias", self.physical, self.spec.collection)
        else:
            self.client.call("switching the alias", "alter_alias", self.physical, self.spec.collection)
        self.store.collection = self.spec.collection
        if current is not None and PHYSICAL_TAG in current:  # only what a circot build made
            self.client.call("dropping the previous build", "drop_collection", current)
        logger.info("built %s with %d vectors", self.spec.uri, self.store.manifest.count)

    def abandon(self) -> None:
        with contextlib.suppress(CircotError):
            self.client.call("dropping the unfinished build", "drop_collection", self.physical)


__all__ = [
    "MilvusStore",
    "StoreSpec",
    "VectorStore",
    "build_store",
    "check_fingerprint",
    "open_store",
    "parse_store_uri",
    "read_store_manifest",
    "store_exists",
    "store_writer",
]

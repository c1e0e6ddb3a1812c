"""Gallery encoding and index building: list images, embed them (cached, sharded across processes), index them.

``build_index`` and ``add_images`` are what ``circot index build`` / ``circot index add`` run. Both are
resumable: embeddings are written to the :class:`~circot.cache.EmbeddingCache` every ``flush_every`` images,
and the index folder only changes at the final atomic save, so re-running an interrupted command skips the
images already encoded and never sees a half-written index.

Launched with several processes (``torchrun`` / ``accelerate launch`` set ``RANK`` and ``WORLD_SIZE``), each
rank encodes a contiguous shard of the image list and writes a shard file; rank 0 waits for every shard,
merges them in order and writes the index. Other ranks return ``None``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from circot.cache import EmbeddingCache, default_cache_dir, encode_cached, hash_bytes, hash_file
from circot.data.records import Gallery
from circot.errors import CircotError, check_batch_size
from circot.index import (
    DEFAULT_FACTORY,
    MANIFEST_NAME,
    GalleryIndex,
    _read_items,
    atomic_write_bytes,
    index_lock,
    read_manifest,
)
from circot.shard import (
    ShardPlan,
    compute_shard,
    distributed_context,
    file_identity,
    gather,
    shard_bounds,
)
from circot.store import StoreSpec, build_store, check_fingerprint, parse_store_uri, store_writer

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MAX_TRAIN_VECTORS = 256 * 1024


class ImageEncoder(Protocol):
    """What the gallery code needs from a model (``circot.model.CIRCoT`` provides it)."""

    fingerprint: str

    def encode_images(
        self, images: Sequence[Any], batch_size: int = 32, show_progress_bar: bool = False
    ) -> np.ndarray: ...


# --------------------------------------------------------------------------------------------- listing images
def list_images(source: str | Path) -> tuple[list[str], list[Path]]:
    """Ids and paths of the images under a folder (recursive, sorted) or listed in a text file (one per line).

    Ids are the paths relative to the folder (or as written in the list file), with forward slashes.
    """
    source = Path(source)
    if source.is_dir():
        paths = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        ids = [p.relative_to(source).as_posix() for p in paths]
        paths = [p.resolve() for p in paths]
    elif source.is_file():
        ids, paths = [], []
        for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            p = Path(line)
            p = p if p.is_absolute() else source.parent / p
            if not p.is_file():
                raise CircotError(f"{source}:{lineno}: image {line!r} does not exist")
            ids.append(line.replace(os.sep, "/"))
            paths.append(p.resolve())
    else:
        raise CircotError(f"images: {str(source)!r} is neither a folder nor a list file")
    if not paths:
        raise CircotError(
            f"images: no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {str(source)!r}"
        )
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise CircotError(f"images: {dup!r} is listed twice in {str(source)!r}")
    return ids, paths


ImageSource = str | Path | Gallery | Sequence[str | Path]


def _items(images: ImageSource, ids: Sequence[str] | None = None) -> tuple[list[str], list[Path]]:
    """Ids and paths from a folder, a list file, a :class:`Gallery` or a sequence of paths (ids: file names
    unless ``ids`` is given)."""
    if isinstance(images, Gallery):
        found_ids, paths = list(images.ids), [Path(images.paths[i]) for i in images.ids]
    elif isinstance(images, (str, Path)):
        found_ids, paths = list_images(images)
    else:
        paths = [Path(p) for p in images]
        found_ids = [p.name for p in paths]
        for p in paths:
            if not p.is_file():
                raise CircotError(f"images: {str(p)!r} does not exist")
    if ids is not None:
        found_ids = [str(i) for i in ids]
        if len(found_ids) != len(paths):
            raise CircotError(f"images: {len(paths)} images but {len(found_ids)} ids")
    if len(set(found_ids)) != len(found_ids):
        dup = next(i for i in found_ids if found_ids.count(i) > 1)
        raise CircotError(f"images: id {dup!r} appears twice")
    return found_ids, paths


# --------------------------------------------------------------------------------------------- encoding
def _encode_fn(model: ImageEncoder, paths: Sequence[Path], skipped: dict[str, str] | None = None):
    """The batch encoder of ``paths``. With ``skipped`` (a dict), an image that cannot be read or embedded
    gets a NaN row (never cached, left out of the index) and its reason is stored under its path."""

    def one(batch: list[Path]) -> np.ndarray:
        return np.asarray(model.encode_images([str(p) for p in batch], batch_size=len(batch)), np.float32)

    def encode(batch: list[Path]) -> np.ndarray:
        try:
            return one(batch)
        except Exception as exc:
            if skipped is None:
                if isinstance(exc, CircotError):
                    raise
                _raise_unreadable(batch, exc)
            rows: list[np.ndarray | None] = []
            for p in batch:  # encode one by one to find the bad ones
                try:
                    rows.append(one([p])[0])
                except Exception as bad:
                    skipped[str(p)] = str(bad).splitlines()[0] if str(bad) else type(bad).__name__
                    logger.warning("skipping %s: %s", p, skipped[str(p)])
                    rows.append(None)
            dim = next((len(r) for r in rows if r is not None), getattr(model, "embedding_dim", 0))
            return np.stack([r if r is not None else np.full(dim, np.nan, np.float32) for r in rows])

    return encode


def _raise_unreadable(batch: Sequence[Path], exc: BaseException) -> None:
    """Raise a :class:`CircotError` naming the unreadable image of ``batch``, else re-raise ``exc``."""
    from PIL import Image

    for p in batch:
        try:
            with Image.open(p) as im:
                im.load()
        except Exception as bad:
            raise CircotError(f"cannot read image {str(p)!r}: {bad}") from None
    raise exc


def encode_gallery(
    model: ImageEncoder,
    paths: Sequence[str | Path],
    cache: EmbeddingCache | None,
    batch_size: int = 32,
    work_dir: str | Path | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    flush_every: int = 1024,
    progress: bool = False,
    timeout: float = 24 * 3600.0,
    skipped: dict[str, str] | None = None,
    stats: dict[str, int] | None = None,
) -> np.ndarray | None:
    """Embeddings (n, d) float32 of the images at ``paths``, reusing and filling ``cache``.

    With ``world_size > 1`` (default: from the environment), this process encodes its shard and writes a
    shard file into ``work_dir`` (see :mod:`circot.shard`); rank 0 then waits for all shards and returns the
    merged array, other ranks return ``None``. A shard file of the same model, images and settings is
    reused as is.

    ``skipped``: a dict to collect the images that cannot be read (path -> reason) instead of failing;
    their rows are NaN. ``stats``: a dict that receives ``encoded`` / ``cached`` image counts.
    """
    if rank is None or world_size is None:
        env_rank, env_world = distributed_context()
        rank = env_rank if rank is None else rank
        world_size = env_world if world_size is None else world_size
    if world_size == 1:
        paths = [Path(p) for p in paths]
        keys = [_hash_or_skip(p, skipped) for p in paths]
        encode = _encode_fn(model, paths, skipped)
        return encode_cached(paths, keys, encode, cache, batch_size, flush_every, progress, stats=stats)
    if work_dir is None:
        raise CircotError("a sharded encode needs a work folder shared by all ranks")
    plan = gallery_shard(
        model, paths, cache, work_dir, rank, world_size, batch_size, flush_every, progress, skipped
    )
    return merge_gallery_shards(plan, paths, timeout, skipped, stats)


def gallery_shard(
    model: ImageEncoder,
    paths: Sequence[str | Path],
    cache: EmbeddingCache | None,
    work_dir: str | Path,
    rank: int,
    world_size: int,
    batch_size: int = 32,
    flush_every: int = 1024,
    progress: bool = False,
    skipped: dict[str, str] | None = None,
) -> ShardPlan:
    """Encode this rank's shard of ``paths`` into its shard file (reused when already written); the plan."""
    paths = [Path(p) for p in paths]
    plan = ShardPlan.make(
        "gallery",
        model.fingerprint,
        [file_identity(p) for p in paths],
        work_dir,
        rank,
        world_size,
        settings={"skip_bad": skipped is not None},
    )
    start, end = plan.bounds()
    mine = paths[start:end]
    keys = [_hash_or_skip(p, skipped) for p in mine]

    def compute() -> tuple[np.ndarray, list[Any], dict[str, Any]]:
        mine_skipped: dict[str, str] | None = {} if skipped is not None else None
        stats: dict[str, int] = {}
        encode = _encode_fn(model, mine, mine_skipped)
        vectors = encode_cached(
            mine, keys, encode, cache, batch_size, flush_every, progress and rank == 0, stats=stats
        )
        if mine_skipped:
            skipped.update(mine_skipped)  # type: ignore[union-attr]
        # one extra per row: why the image was left out (None: it was encoded)
        return vectors, [(mine_skipped or {}).get(str(p)) for p in mine], stats

    compute_shard(plan, compute, keys=keys)
    return plan


def merge_gallery_shards(
    plan: ShardPlan,
    paths: Sequence[str | Path],
    timeout: float = 24 * 3600.0,
    skipped: dict[str, str] | None = None,
    stats: dict[str, int] | None = None,
) -> np.ndarray | None:
    """On rank 0: every rank's gallery shard of ``plan``, merged in order (None on other ranks); the
    reasons of skipped images go into ``skipped``, the cache counts the shards recorded into ``stats``."""
    merged = gather(plan, timeout)
    if merged is None:
        return None
    for p, reason in zip(paths, merged.extras or [], strict=False):
        if reason is not None and skipped is not None:
            skipped.setdefault(str(p), str(reason))
    if stats is not None:
        for info in merged.info["shards"]:
            for k in ("encoded", "cached"):
                stats[k] = stats.get(k, 0) + int(info.get(k, 0))
    return merged.vectors


def _hash_or_skip(path: Path, skipped: dict[str, str] | None) -> str:
    try:
        return hash_file(path)
    except CircotError as exc:
        if skipped is None:
            raise
        return f"unreadable:{path}:{exc}"  # never in the cache: the image is tried, and skipped, again


# --------------------------------------------------------------------------------------------- building
def check_out_folder(out: str | Path, overwrite: bool = False) -> Path:
    """Check, before any image is encoded, that ``out`` can become an index folder.

    ``out`` may be missing, an empty folder or an existing circot index; a non-empty folder that is not an
    index is refused unless ``overwrite`` (its other files are then left alone). A file, or a place where
    nothing can be written, is refused.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CircotError(f"--out {str(out)!r} is an existing file, not an index folder")
    if out.is_dir():
        if not (out / MANIFEST_NAME).is_file() and any(out.iterdir()) and not overwrite:
            raise CircotError(
                f"--out {str(out)!r} is a folder that is not empty and is not a circot index; choose "
                "another folder, or pass --overwrite to write the index into it (its files are kept)"
            )
        if (out / MANIFEST_NAME).is_file():
            read_manifest(out)  # a damaged manifest is reported now, not after encoding
        probe_dir = out
    else:
        probe_dir = out.parent
        while not probe_dir.exists() and probe_dir != probe_dir.parent:
            probe_dir = probe_dir.parent
        if not probe_dir.is_dir():
            raise CircotError(f"--out {str(out)!r}: {str(probe_dir)!r} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".circot-write-test.", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise CircotError(
            f"--out {str(out)!r}: cannot write in {str(probe_dir)!r} ({exc.strerror or exc})"
        ) from None
    return out


def write_skip_report(
    path: str | Path,
    ids: Sequence[str],
    skipped: dict[str, str],
    paths: Sequence[Path],
    keep_earlier: bool = False,
) -> Path:
    """Write the images left out by ``skip_bad`` as JSON ``[{"id", "path", "reason"}]``, atomically.

    ``keep_earlier`` (an add to an index): the rows of an earlier report stay, except those of ``paths``, which
    this run has read again (and either indexed or lists anew)."""
    by_path = {str(p): i for i, p in zip(ids, paths, strict=True)}
    rows = [{"id": by_path.get(p, ""), "path": p, "reason": r} for p, r in sorted(skipped.items())]
    if keep_earlier and Path(path).is_file():
        try:
            earlier = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CircotError(
                f"{path}: the earlier skip report cannot be read ({exc}); move it away"
            ) from None
        rows = [r for r in earlier if isinstance(r, dict) and r.get("path") not in by_path] + rows
    atomic_write_bytes(Path(path), (json.dumps(rows, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))
    return Path(path)


SKIP_REPORT_NAME = "skipped.json"


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.shards"


def _cleanup(work_dir: Path) -> None:
    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)


def build_index(
    model: ImageEncoder,
    images: ImageSource,
    out: str | Path | None = None,
    ids: Sequence[str] | None = None,
    factory: str = DEFAULT_FACTORY,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    cache_dtype: str = "float32",
    model_ref: str | None = None,
    search_params: dict[str, Any] | None = None,
    flush_every: int = 1024,
    progress: bool = False,
    overwrite: bool = False,
    skip_bad: bool = False,
) -> GalleryIndex | None:
    """Embed the images and index them; save the index at ``out`` when given.

    ``images``: a folder (ids = relative paths), a list file, a :class:`Gallery` (its ids) or a sequence of
    image paths (ids = ``ids`` or the file names). Without ``out`` nothing is written except the cache (and
    a work folder under the cache root while encoding).

    ``out`` must be missing, empty or an index (see :func:`check_out_folder`; ``overwrite`` accepts any
    folder); it is locked while the index is built. ``skip_bad``: leave out the images that cannot be read
    instead of failing, and list them in ``out/skipped.json`` (also in ``index.skipped``).

    ``model_ref`` (a hub id or path) is recorded so that ``circot search`` can load the model by itself.
    Returns the index on rank 0 and ``None`` on other ranks of a sharded run; a Milvus store comes back
    closed, for its ``manifest`` and ``skipped`` (open it again with :func:`circot.open_store` to search).
    """
    check_batch_size(batch_size)
    ids, paths = _items(images, ids)
    rank, world = distributed_context()
    spec = parse_store_uri(out) if out is not None else None
    if spec is not None and not spec.is_faiss:
        return _build_in_milvus(
            model, ids, paths, spec, rank, world, factory, batch_size, cache_dir, use_cache, cache_dtype,
            model_ref, search_params, flush_every, progress, skip_bad,
        )  # fmt: skip
    if out is None:
        root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        # the ranks of a sharded build must agree on the folder: name it after the image list
        tag = os.getpid() if world == 1 else hash_bytes("\n".join(map(str, paths)).encode())[:16]
        work_dir = root / "work" / f"build-{tag}"
        lock: Any = contextlib.nullcontext()
    else:
        out = check_out_folder(out, overwrite)
        work_dir = _work_dir(out)
        lock = index_lock(out, create=True) if rank == 0 else contextlib.nullcontext()
    with lock:
        return _build_locked(
            model, ids, paths, out, work_dir, rank, world, factory, batch_size, cache_dir, use_cache,
            cache_dtype, model_ref, search_params, flush_every, progress, skip_bad,
        )  # fmt: skip


def _build_locked(
    model: ImageEncoder,
    ids: list[str],
    paths: list[Path],
    out: Path | None,
    work_dir: Path,
    rank: int,
    world: int,
    factory: str,
    batch_size: int,
    cache_dir: str | Path | None,
    use_cache: bool,
    cache_dtype: str,
    model_ref: str | None,
    search_params: dict[str, Any] | None,
    flush_every: int,
    progress: bool,
    skip_bad: bool,
) -> GalleryIndex | None:
    t0 = time.perf_counter()
    encoded = _encode_readable(
        model, ids, paths, work_dir, rank, world, batch_size, cache_dir, use_cache, cache_dtype, flush_every,
        progress, skip_bad,
    )  # fmt: skip
    if encoded is None:
        return None
    encode_s = time.perf_counter() - t0
    all_ids, all_paths = ids, paths
    vectors, ids, paths, skipped = encoded
    index = GalleryIndex.create(
        vectors.shape[1], model.fingerprint, factory, normalized=True, model=model_ref
    )
    if not index.is_trained:
        sample = vectors
        if len(vectors) > MAX_TRAIN_VECTORS:
            rng = np.random.default_rng(0)
            sample = vectors[rng.choice(len(vectors), MAX_TRAIN_VECTORS, replace=False)]
        index.train(sample)
    index.add(vectors, ids, [str(p) for p in paths])
    if search_params:
        index.set_search_params(**search_params)
    if out is not None:
        index.save(out)
        if skipped is not None:
            write_skip_report(out / SKIP_REPORT_NAME, all_ids, skipped, all_paths)
    index.skipped = dict(skipped or {})
    _cleanup(work_dir)
    logger.info(
        "indexed %d images in %.1fs (%.1f images/s encoding)",
        len(ids),
        time.perf_counter() - t0,
        len(ids) / max(encode_s, 1e-9),
    )
    return index


def _encode_readable(
    model: ImageEncoder,
    ids: list[str],
    paths: list[Path],
    work_dir: Path,
    rank: int,
    world: int,
    batch_size: int,
    cache_dir: str | Path | None,
    use_cache: bool,
    cache_dtype: str,
    flush_every: int,
    progress: bool,
    skip_bad: bool,
) -> tuple[np.ndarray, list[str], list[Path], dict[str, str] | None] | None:
    """What both stores' builds index: (vectors, ids, paths, skipped) of the images that could be read
    (``skipped``: None unless ``skip_bad``); None on ranks other than 0 of a sharded run."""
    cache = _open_cache(model, cache_dir, use_cache, cache_dtype, work_dir)
    skipped: dict[str, str] | None = {} if skip_bad else None
    vectors = encode_gallery(
        model, paths, cache, batch_size, work_dir, rank, world, flush_every, progress, skipped=skipped
    )
    if vectors is None:
        return None
    if skipped is not None:
        vectors, ids, paths = _drop_unreadable(vectors, ids, paths, skipped)
    return vectors, ids, paths, skipped


def _drop_unreadable(
    vectors: np.ndarray, ids: list[str], paths: list[Path], skipped: dict[str, str]
) -> tuple[np.ndarray, list[str], list[Path]]:
    """The rows that were read (the unreadable ones are NaN), noting in ``skipped`` those another rank met."""
    good = np.isfinite(vectors).all(axis=1) if vectors.size else np.ones(len(vectors), bool)
    for p, ok in zip(paths, good, strict=True):
        if not ok and str(p) not in skipped:  # encoded by another rank
            skipped[str(p)] = "could not be read (reported in the log of the rank that encoded it)"
    if not good.any():
        raise CircotError(f"none of the {len(paths)} images could be read; nothing to index")
    ids = [i for i, ok in zip(ids, good, strict=True) if ok]
    paths = [p for p, ok in zip(paths, good, strict=True) if ok]
    return vectors[good], ids, paths


def store_work_dir(spec: StoreSpec, cache_dir: str | Path | None = None) -> Path:
    """Where a build or add into a Milvus store keeps its shard files: beside a milvus-lite database, else
    under the cache root (shared by the ranks of a sharded run)."""
    if spec.kind == "milvus-lite":
        return spec.path.parent / f".{spec.path.name}.{spec.collection}.shards"
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    host = spec.client_uri.split("://", 1)[-1].replace(":", "_").replace("/", "_")
    return root / "work" / f"milvus-{host}-{spec.collection}"


def skip_report_path(spec: StoreSpec) -> Path | None:
    """Where a build with ``skip_bad`` lists the images it left out (None for a Milvus server)."""
    if spec.is_faiss:
        return spec.path / SKIP_REPORT_NAME
    if spec.kind == "milvus-lite":
        return spec.path.parent / f"{spec.path.name}.{spec.collection}.{SKIP_REPORT_NAME}"
    return None


def _build_in_milvus(
    model: ImageEncoder,
    ids: list[str],
    paths: list[Path],
    spec: StoreSpec,
    rank: int,
    world: int,
    factory: str,
    batch_size: int,
    cache_dir: str | Path | None,
    use_cache: bool,
    cache_dtype: str,
    model_ref: str | None,
    search_params: dict[str, Any] | None,
    flush_every: int,
    progress: bool,
    skip_bad: bool,
) -> Any:
    """:func:`build_index` into a Milvus store: encode as ever, then fill a new collection and switch it in."""
    from circot.store import _connect

    if factory != DEFAULT_FACTORY or search_params:
        raise CircotError(
            f"store {spec.uri!r}: faiss options (--factory, --nprobe) do not apply to Milvus; set the index "
            "type and its parameters in the URI, e.g. ?index=HNSW&ef=64"
        )
    if rank == 0:
        _connect(spec).close()  # an unreachable server or a locked database is reported before encoding
    work_dir = store_work_dir(spec, cache_dir)
    encoded = _encode_readable(
        model, ids, paths, work_dir, rank, world, batch_size, cache_dir, use_cache, cache_dtype, flush_every,
        progress, skip_bad,
    )  # fmt: skip
    if encoded is None:
        return None
    all_ids, all_paths = ids, paths
    vectors, ids, paths, skipped = encoded
    with build_store(spec, vectors.shape[1], model.fingerprint, model=model_ref) as store:
        store.add(vectors, ids, [str(p) for p in paths])
    report = skip_report_path(spec)
    if skipped is not None and report is not None:
        write_skip_report(report, all_ids, skipped, all_paths)
    store.skipped = dict(skipped or {})
    _cleanup(work_dir)
    return store


def add_images(
    index_path: str | Path,
    model: ImageEncoder,
    images: ImageSource,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    cache_dtype: str = "float32",
    flush_every: int = 1024,
    progress: bool = False,
    skip_bad: bool = False,
    replace: bool = False,
) -> tuple[GalleryIndex | None, int]:
    """Add the images not yet in the index at ``index_path`` (by id); without ``replace``, the images it holds
    are never re-encoded.

    ``replace``: encode the images whose ids the index holds as well, and replace their vectors and paths (an
    image edited or moved on disk; the embedding cache is keyed by the image's bytes, so only changed images
    are encoded again).

    Returns ``(index, number added or replaced)``; ``(None, 0)`` on ranks other than 0. A Milvus store comes back
    closed, as from :func:`build_index`. The index folder is locked
    from reading to saving, so that two runs at once cannot lose each other's images: the second one stops
    with a :class:`CircotError`. ``skip_bad``: as for :func:`build_index`; the images left out are in
    ``index.skipped`` and added to the index's skip report.
    """
    check_batch_size(batch_size)
    spec = parse_store_uri(index_path)
    if not spec.is_faiss:
        return _add_to_milvus(
            spec,
            model,
            images,
            batch_size,
            cache_dir,
            use_cache,
            cache_dtype,
            flush_every,
            progress,
            skip_bad,
            replace,
        )
    index_path = Path(index_path)
    read_manifest(index_path)
    rank, _ = distributed_context()
    with index_lock(index_path) if rank == 0 else contextlib.nullcontext():
        return _add_locked(
            index_path, model, images, batch_size, cache_dir, use_cache, cache_dtype, flush_every, progress,
            skip_bad, replace,
        )  # fmt: skip


def _new_items(
    ids: list[str], paths: list[Path], known: set[str], replace: bool
) -> tuple[list[str], list[Path]]:
    """The ids and paths that an add writes: those the index does not hold yet, or all of them (``replace``)."""
    held = sum(i in known for i in ids)
    if held:
        logger.info(
            "%d of %d images are already in the index%s",
            held,
            len(ids),
            "; they are replaced" if replace else "",
        )
    if replace:
        return ids, paths
    new = [(i, p) for i, p in zip(ids, paths, strict=True) if i not in known]
    return [i for i, _ in new], [p for _, p in new]


def _add_locked(
    index_path: Path,
    model: ImageEncoder,
    images: ImageSource,
    batch_size: int,
    cache_dir: str | Path | None,
    use_cache: bool,
    cache_dtype: str,
    flush_every: int,
    progress: bool,
    skip_bad: bool,
    replace: bool,
) -> tuple[GalleryIndex | None, int]:
    manifest = read_manifest(index_path)
    check_fingerprint(manifest, model.fingerprint, index_path)
    ids, paths = _items(images)
    rank, world = distributed_context()
    if rank == 0:
        index = GalleryIndex.load(index_path, mmap=False)
        known = set(index.ids)
    else:
        index, known = None, set(read_ids(index_path))
    new_ids, new_paths = _new_items(ids, paths, known, replace)
    if not new_ids:
        return index, 0
    work_dir = _work_dir(index_path)
    encoded = _encode_readable(
        model, new_ids, new_paths, work_dir, rank, world, batch_size, cache_dir, use_cache, cache_dtype,
        flush_every, progress, skip_bad,
    )  # fmt: skip
    if encoded is None or index is None:
        return None, 0
    vectors, ids, paths, skipped = encoded
    index.upsert(vectors, ids, [str(p) for p in paths])  # = add when nothing is replaced
    index.save(index_path)
    if skipped is not None:  # after the save: the report never lists an add that did not land
        write_skip_report(index_path / SKIP_REPORT_NAME, new_ids, skipped, new_paths, keep_earlier=True)
    index.skipped = dict(skipped or {})
    _cleanup(work_dir)
    return index, len(ids)


def _add_to_milvus(
    spec: StoreSpec,
    model: ImageEncoder,
    images: ImageSource,
    batch_size: int,
    cache_dir: str | Path | None,
    use_cache: bool,
    cache_dtype: str,
    flush_every: int,
    progress: bool,
    skip_bad: bool,
    replace: bool,
) -> tuple[Any, int]:
    """:func:`add_images` into a Milvus store (one process: the engine serialises the writers)."""
    _, world = distributed_context()
    if world > 1:
        raise CircotError(
            f"store {spec.uri!r}: adding to a Milvus store runs in one process; launch it without "
            "torchrun / accelerate (a build may be sharded)"
        )
    ids, paths = _items(images)
    with store_writer(spec) as store:
        check_fingerprint(store, model.fingerprint, spec)
        known = set(store.ids)
        new_ids, new_paths = _new_items(ids, paths, known, replace)
        if not new_ids:
            return store, 0
        work_dir = store_work_dir(spec, cache_dir)
        encoded = _encode_readable(
            model, new_ids, new_paths, work_dir, 0, 1, batch_size, cache_dir, use_cache, cache_dtype,
            flush_every, progress, skip_bad,
        )  # fmt: skip
        assert encoded is not None  # rank 0 of one process
        vectors, ids, paths, skipped = encoded
        store.upsert(vectors, ids, [str(p) for p in paths])  # = add when nothing is replaced
    report = skip_report_path(spec)
    if skipped is not None and report is not None:  # after the writer closed: the add has landed
        write_skip_report(report, new_ids, skipped, new_paths, keep_earlier=True)
    store.skipped = dict(skipped or {})
    _cleanup(work_dir)
    return store, len(ids)


def read_ids(index_path: str | Path) -> list[str]:
    """The ids of an index folder, without loading its vectors."""
    manifest = read_manifest(index_path)
    if "items" not in manifest.files:
        raise CircotError(f"{Path(index_path) / MANIFEST_NAME}: missing file entry 'items'")
    return _read_items(Path(index_path) / manifest.files["items"])[0]


def _open_cache(
    model: ImageEncoder, cache_dir: str | Path | None, use_cache: bool, dtype: str, work_dir: Path
) -> EmbeddingCache:
    # Without the user's cache, a private one inside the work folder still lets an interrupted run resume;
    # it is removed with the work folder when the index is saved.
    root = (
        (Path(cache_dir) if cache_dir is not None else default_cache_dir())
        if use_cache
        else work_dir / "cache"
    )
    return EmbeddingCache(root, model.fingerprint, dim=getattr(model, "embedding_dim", None), dtype=dtype)


__all__ = [
    "IMAGE_EXTENSIONS",
    "add_images",
    "build_index",
    "check_out_folder",
    "distributed_context",
    "encode_gallery",
    "gallery_shard",
    "merge_gallery_shards",
    "list_images",
    "read_ids",
    "shard_bounds",
    "skip_report_path",
    "store_work_dir",
]

"""Sharded work across processes: the shard plan, the shard files, and rank 0's merge.

``circot eval`` and ``circot index build`` launched with several processes (``torchrun``, or
``accelerate launch`` on GPUs, which starts them through torchrun) split their image and query lists the same
way: rank ``r`` of ``N`` takes the contiguous slice :func:`shard_bounds` gives it, embeds it, and writes one
shard file into a work folder shared by all ranks. Rank 0 waits for every shard file of the plan, checks it,
and concatenates them in rank order; the other ranks are done once their file is written.

The ranks meet through the files, not through collective calls, so that a slow rank never trips a collective
timeout and a rerun after a crash skips every shard already written. A shard file is named after the plan's
digest: the kind of work, the model fingerprint, the settings, and every input (its path, size and
modification time, plus whatever else the caller lists, e.g. the query text). Another model, another input
list, or an input file changed since, gives another digest, so a stale shard is never reused; a rank also
checks the content hashes stored in its own shard before reusing it. Shard files are written atomically
(temporary file, then rename): a crash leaves either no shard file or a complete one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from circot.errors import CircotError
from circot.index import atomic_write_bytes

logger = logging.getLogger(__name__)

SHARD_FORMAT = "circot-shard"
# (rank, world size) variables of the launchers: torchrun / accelerate first, then the MPI launchers that
# ``accelerate launch`` uses for several CPU processes.
_RANK_ENV = (
    ("RANK", "WORLD_SIZE"),
    ("PMI_RANK", "PMI_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"),
)


def distributed_context() -> tuple[int, int]:
    """``(rank, world_size)`` of this process: torch.distributed if initialised, else the launcher's
    environment (``RANK`` / ``WORLD_SIZE``, or the MPI variables), else ``(0, 1)``."""
    dist = sys.modules.get("torch.distributed")  # a process group exists only if torch was imported
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    for rank_var, world_var in _RANK_ENV:
        if world_var in os.environ:
            try:
                rank = int(os.environ.get(rank_var, "0"))
                world = int(os.environ[world_var])
            except ValueError:
                raise CircotError(
                    f"invalid {rank_var}={os.environ.get(rank_var)!r} / {world_var}={os.environ[world_var]!r} "
                    "in the environment"
                ) from None
            if world < 1 or not 0 <= rank < world:
                raise CircotError(f"invalid {rank_var}={rank} / {world_var}={world} in the environment")
            return rank, world
    return 0, 1


def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int]:
    """Contiguous ``[start, end)`` of ``n`` items for ``rank`` of ``world_size`` (sizes differ by at most 1)."""
    return n * rank // world_size, n * (rank + 1) // world_size


def file_identity(path: str | Path) -> list[Any]:
    """What ties a shard to an input file without reading it: its path, size and modification time."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise CircotError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    return [str(p), st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class ShardPlan:
    """How ``n`` items of one kind of work are split over ``world_size`` ranks, and where the shards go."""

    kind: str
    n: int
    rank: int
    world_size: int
    digest: str
    work_dir: Path

    @classmethod
    def make(
        cls,
        kind: str,
        fingerprint: str,
        items: Sequence[Any],
        work_dir: str | Path,
        rank: int,
        world_size: int,
        settings: dict[str, Any] | None = None,
    ) -> ShardPlan:
        """A plan over ``items`` (JSON-able, e.g. :func:`file_identity` lists), tied to the model
        ``fingerprint`` and ``settings``: any change to them gives other shard files."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise CircotError(f"invalid rank {rank} of world size {world_size}")
        h = hashlib.sha256()
        h.update(json.dumps([SHARD_FORMAT, kind, fingerprint, world_size, settings or {}]).encode())
        for item in items:
            h.update(b"\n")
            h.update(json.dumps(item, ensure_ascii=False).encode("utf-8"))
        return cls(kind, len(items), rank, world_size, h.hexdigest(), Path(work_dir))

    def bounds(self, rank: int | None = None) -> tuple[int, int]:
        return shard_bounds(self.n, self.rank if rank is None else rank, self.world_size)

    def file(self, rank: int | None = None) -> Path:
        r = self.rank if rank is None else rank
        return self.work_dir / f"{self.kind}-{self.digest[:16]}-{r:05d}-of-{self.world_size:05d}.npz"

    def files(self) -> list[Path]:
        return [self.file(r) for r in range(self.world_size)]


@dataclass
class Shard:
    """The contents of one shard file: vectors (rows of the shard), content keys, JSON extras (one per row,
    e.g. a query's CoT) and ``info`` (a JSON object about the shard, e.g. cache counts). A merged shard's
    ``info`` holds ``{"shards": [each shard's info]}``."""

    vectors: np.ndarray
    keys: list[str] | None
    extras: list[Any] | None
    info: dict[str, Any]


def write_shard(
    plan: ShardPlan,
    vectors: np.ndarray,
    keys: Sequence[str] | None = None,
    extras: Sequence[Any] | None = None,
    info: dict[str, Any] | None = None,
) -> Path:
    """Write this rank's shard file atomically; returns its path."""
    start, end = plan.bounds()
    vectors = np.asarray(vectors, np.float32)
    if len(vectors) != end - start or (keys is not None and len(keys) != end - start):
        raise ValueError(f"shard {plan.rank}: {len(vectors)} rows for items [{start}, {end})")
    meta = {
        "format": SHARD_FORMAT,
        "kind": plan.kind,
        "digest": plan.digest,
        "rank": plan.rank,
        "world_size": plan.world_size,
        "start": start,
        "end": end,
        "keys": list(keys) if keys is not None else None,
        "extras": list(extras) if extras is not None else None,
        "info": dict(info or {}),
    }
    buf = io.BytesIO()
    np.savez(buf, vectors=vectors, meta=np.asarray(json.dumps(meta, ensure_ascii=False)))
    plan.work_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(plan.file(), buf.getvalue())
    return plan.file()


def read_shard(plan: ShardPlan, rank: int | None = None, keys: Sequence[str] | None = None) -> Shard | None:
    """Rank ``rank``'s shard file of ``plan`` if it is complete and belongs to the plan (and, with ``keys``,
    holds exactly these content keys); else None."""
    r = plan.rank if rank is None else rank
    path = plan.file(r)
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            vectors = np.asarray(data["vectors"], np.float32)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring unreadable shard file %s (%s)", path, exc)
        return None
    start, end = plan.bounds(r)
    if (
        not isinstance(meta, dict)
        or meta.get("format") != SHARD_FORMAT
        or meta.get("digest") != plan.digest
        or (meta.get("rank"), meta.get("world_size"), meta.get("start"), meta.get("end"))
        != (r, plan.world_size, start, end)
        or vectors.ndim != 2
        or len(vectors) != end - start
    ):
        logger.warning("ignoring shard file %s: it does not belong to this run's plan", path)
        return None
    if keys is not None and meta.get("keys") != list(keys):
        logger.info("shard file %s holds other image contents; recomputing it", path)
        return None
    extras = meta.get("extras")
    if extras is not None and (not isinstance(extras, list) or len(extras) != end - start):
        logger.warning("ignoring shard file %s: its extras do not match its rows", path)
        return None
    info = meta.get("info")
    return Shard(vectors, meta.get("keys"), extras, info if isinstance(info, dict) else {})


def compute_shard(
    plan: ShardPlan,
    compute: Callable[[], tuple[np.ndarray, Sequence[Any] | None, dict[str, Any] | None]],
    keys: Sequence[str] | None = None,
) -> bool:
    """Make sure this rank's shard file exists: reuse a valid one, else run ``compute()`` (the vectors of
    the rank's rows, their extras or None, an info object or None) and write it. Returns True when the
    shard was reused."""
    if read_shard(plan, keys=keys) is not None:
        logger.info("rank %d: reusing shard file %s", plan.rank, plan.file())
        return True
    vectors, extras, info = compute()
    write_shard(plan, vectors, keys, extras, info)
    return False


def gather(plan: ShardPlan, timeout: float = 24 * 3600.0, poll: float = 0.5) -> Shard | None:
    """On rank 0: wait (up to ``timeout`` seconds) for every shard of the plan and return them merged in rank
    order (extras None if any shard has none). On other ranks: None at once."""
    if plan.rank != 0:
        return None
    deadline = time.monotonic() + timeout
    parts: dict[int, Shard] = {}
    while len(parts) < plan.world_size:
        for r in range(plan.world_size):
            if r not in parts and plan.file(r).exists():
                shard = read_shard(plan, r)
                if shard is not None:
                    parts[r] = shard
        if len(parts) == plan.world_size:
            break
        if time.monotonic() > deadline:
            missing = [plan.file(r).name for r in range(plan.world_size) if r not in parts]
            raise CircotError(
                f"timed out after {timeout:.0f}s waiting for the shard files of other ranks in "
                f"{plan.work_dir}: {', '.join(missing)}"
            )
        time.sleep(poll)
    ordered = [parts[r] for r in range(plan.world_size)]
    dims = {s.vectors.shape[1] for s in ordered if len(s.vectors)}
    if len(dims) > 1:
        raise CircotError(
            f"shard files in {plan.work_dir} hold vectors of different dimensions {sorted(dims)}"
        )
    dim = dims.pop() if dims else 0
    vectors = np.concatenate([s.vectors.reshape(-1, dim) for s in ordered]).astype(np.float32, copy=False)
    extras = None
    if all(s.extras is not None for s in ordered):
        extras = [e for s in ordered for e in s.extras]  # type: ignore[union-attr]
    keys = None
    if all(s.keys is not None for s in ordered):
        keys = [k for s in ordered for k in s.keys]  # type: ignore[union-attr]
    return Shard(vectors, keys, extras, {"shards": [s.info for s in ordered]})


def remove_shards(plan: ShardPlan) -> None:
    """Delete the plan's shard files (rank 0, once their merge has been used), and the work folder if empty."""
    for f in plan.files():
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    with contextlib.suppress(OSError):  # not empty: other work is in progress there
        plan.work_dir.rmdir()


__all__ = [
    "Shard",
    "ShardPlan",
    "compute_shard",
    "distributed_context",
    "file_identity",
    "gather",
    "read_shard",
    "remove_shards",
    "shard_bounds",
    "write_shard",
]

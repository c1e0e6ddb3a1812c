"""The annotation run: resume, concurrency, quality control, records and rejects, statistics.

:func:`annotate_split` annotates the queries of a :class:`~circot.data.records.CIRSplit` with a teacher and
appends one JSONL record per accepted triplet to ``out`` and one per rejected triplet to
``out.rejects.jsonl``. Every record is flushed and fsync'ed as soon as it is done. Run it again on the same
file and it does only what is missing: query ids already in ``out`` are skipped, and so are ids rejected by
quality control (``retry_rejects=True`` retries them); ids whose requests failed (retries exhausted, server
errors) are retried on every run. An exclusive lock on ``out`` keeps two runs from writing the same file.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circot.annotate.client import TeacherRequestError
from circot.annotate.quality import QualityConfig, check_cot
from circot.annotate.store import JsonlAppender, iter_jsonl, rejects_path, repair_torn_tail
from circot.annotate.teachers import Teacher
from circot.data.records import CIRQuery, CIRSplit
from circot.errors import CircotError
from circot.prompts import CoT

logger = logging.getLogger(__name__)

# Datasets with training triplets worth annotating (CIRCO is evaluation-only).
ANNOTATABLE = ("fashioniq", "cirr", "shapes")


@dataclass
class AnnotationReport:
    """What a run did. ``records_per_s`` counts the triplets finished (accepted or rejected) in this run."""

    out: str
    rejects: str
    dataset: str
    split: str
    teacher: str
    prompt_version: str
    n_queries: int = 0
    already_done: int = 0
    todo: int = 0
    written: int = 0
    rejected: int = 0
    failed: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    repaired_bytes: int = 0
    seconds: float = 0.0
    records_per_s: float = 0.0
    teacher_stats: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        from circot.jsonout import rounded

        return rounded(asdict(self))

    def format(self) -> str:
        s = self.teacher_stats
        lines = [
            f"annotated {self.dataset}/{self.split} with {self.teacher} (prompts {self.prompt_version})",
            f"  queries {self.n_queries}: already done {self.already_done}, this run {self.todo} -> "
            f"written {self.written}, rejected {self.rejected} (of which request failures {self.failed})",
            f"  {self.seconds:.1f} s, {self.records_per_s:.2f} records/s",
        ]
        if s.get("requests"):
            tokens = s.get("prompt_tokens", 0) + s.get("completion_tokens", 0)
            lines.append(
                f"  requests {s['requests']} (retries {sum(s.get('retries', {}).values())}), tokens "
                f"{s.get('prompt_tokens', 0)} in + {s.get('completion_tokens', 0)} out "
                f"({tokens / max(self.seconds, 1e-9):.0f} tokens/s)"
            )
        for reason, n in sorted(self.reject_reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected {n}: {reason}")
        lines.append(f"  records: {self.out}")
        lines.append(f"  rejects: {self.rejects}")
        return "\n".join(lines)


def _kind(problem: str) -> str:
    """A short category of one problem, for the summary (details in parentheses dropped)."""
    if problem.startswith("request failed: "):
        return ":".join(problem.split(":")[:2])
    return problem.split(" (")[0]


class _OutputLock:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise CircotError(f"{path}: another annotation run is writing this file") from None

    def release(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _existing(out: Path, dataset: str, split: str) -> set[str]:
    done: set[str] = set()
    for line_no, record in iter_jsonl(out, tolerate_torn_tail=False):
        qid = record.get("query_id")
        if not isinstance(qid, str):
            raise CircotError(f"{out}: line {line_no} has no query_id")
        if (record.get("dataset"), record.get("split")) != (dataset, split):
            raise CircotError(
                f"{out}: line {line_no} belongs to {record.get('dataset')}/{record.get('split')}, not "
                f"{dataset}/{split}; choose another --out"
            )
        if qid in done:
            logger.warning("%s: query %r occurs twice (line %d)", out, qid, line_no)
        done.add(qid)
    return done


def _compact_rejects(path: Path, done: set[str], retry: set[str]) -> set[str]:
    """Rewrite the rejects file (atomically) keeping one final reject per query; return the ids kept.

    Dropped: ids annotated since, request failures (retried now), and the ids in ``retry``.
    """
    if not path.exists():
        return set()
    repair_torn_tail(path)
    last: dict[str, dict[str, Any]] = {}
    n_lines = 0
    for _, record in iter_jsonl(path, tolerate_torn_tail=False):
        n_lines += 1
        qid = record.get("query_id")
        if isinstance(qid, str):
            last[qid] = record
    keep = {
        qid: rec
        for qid, rec in last.items()
        if qid not in done and not rec.get("retryable", False) and qid not in retry
    }
    if len(keep) != n_lines:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            for rec in keep.values():
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        logger.info("%s: %d rejects kept, %d to retry or superseded", path, len(keep), n_lines - len(keep))
    return set(keep)


async def annotate_split_async(
    split: CIRSplit,
    teacher: Teacher,
    out: str | Path,
    *,
    concurrency: int = 8,
    limit: int | None = None,
    verify: bool = False,
    quality: QualityConfig | None = None,
    retry_rejects: bool = False,
    max_consecutive_failures: int = 20,
    progress: bool = False,
    fsync: bool = True,
) -> AnnotationReport:
    """Annotate ``split`` into ``out`` (see the module docstring); returns the run's report.

    ``limit`` restricts the run to the first ``limit`` queries of the split (so a resumed run with the same
    limit finishes the same set). ``max_consecutive_failures`` failed requests in a row stop the run.
    """
    out = Path(out)
    rej_path = rejects_path(out)
    quality = quality or QualityConfig()
    if concurrency < 1:
        raise CircotError(f"--concurrency must be at least 1, not {concurrency}")
    report = AnnotationReport(
        out=str(out),
        rejects=str(rej_path),
        dataset=split.dataset,
        split=split.split,
        teacher=teacher.name,
        prompt_version=teacher.prompt_version,
    )
    queries: list[CIRQuery] = split.queries[:limit] if limit is not None else list(split.queries)
    seen: set[str] = set()
    unique: list[CIRQuery] = []
    for q in queries:
        if q.query_id in seen:
            logger.warning("%s/%s: duplicate query id %r skipped", split.dataset, split.split, q.query_id)
            continue
        seen.add(q.query_id)
        unique.append(q)
    report.n_queries = len(unique)
    if verify and not any(q.targets for q in unique):
        logger.warning("--verify: this split has no target images; nothing to verify against")
    if unique and not any(q.targets for q in unique):
        logger.warning(
            "%s/%s has no targets: conclusions are not grounded in a target image", split.dataset, split.split
        )

    lock = _OutputLock(out)
    records = rejects = None
    try:
        records = JsonlAppender(out, fsync=fsync)
        report.repaired_bytes = records.repaired_bytes
        done = _existing(out, split.dataset, split.split)
        kept_rejects = _compact_rejects(rej_path, done, seen if retry_rejects else set())
        rejects = JsonlAppender(rej_path, fsync=fsync)
        todo = [q for q in unique if q.query_id not in done and q.query_id not in kept_rejects]
        report.already_done = len(unique) - len(todo)
        report.todo = len(todo)
        logger.info(
            "%s/%s: %d queries, %d already done, %d to annotate with %s",
            split.dataset,
            split.split,
            len(unique),
            report.already_done,
            len(todo),
            teacher.name,
        )
        reasons: Counter = Counter()
        state = {"consecutive_failures": 0}
        bar = None
        if progress and todo:
            from circot.progress import progress_bar

            bar = progress_bar(total=len(todo), desc="annotate", unit="triplet", dynamic_ncols=True)

        base = {"dataset": split.dataset, "split": split.split, "teacher": teacher.name}

        def reject(query: CIRQuery, problems: list[str], retryable: bool, cot: CoT | None = None) -> None:
            reason = "; ".join(problems)
            record = {"query_id": query.query_id, **base, "prompt_version": teacher.prompt_version}
            if cot is not None:
                record.update(caption=cot.caption, reasoning=cot.reasoning, conclusion=cot.conclusion)
            record.update(reason=reason, retryable=retryable)
            rejects.write(record)
            report.rejected += 1
            reasons.update(_kind(p) for p in problems)

        async def one(query: CIRQuery) -> None:
            try:
                answer = await teacher.annotate(query, split, verify=verify)
            except TeacherRequestError as exc:
                report.failed += 1
                state["consecutive_failures"] += 1
                reject(query, [f"request failed: {exc}"], exc.retryable)
                if state["consecutive_failures"] >= max_consecutive_failures:
                    raise CircotError(
                        f"{max_consecutive_failures} triplets in a row failed; last: {exc}. Stopping"
                    ) from None
                return
            state["consecutive_failures"] = 0
            cot = CoT(caption=answer.caption, reasoning=answer.reasoning, conclusion=answer.conclusion)
            problems = check_cot(cot, query.text, quality) + answer.problems
            if problems:
                reject(query, problems, False, cot)
                return
            records.write(
                {
                    "query_id": query.query_id,
                    "dataset": split.dataset,
                    "split": split.split,
                    "caption": cot.caption,
                    "reasoning": cot.reasoning,
                    "conclusion": cot.conclusion,
                    "teacher": teacher.name,
                    "prompt_version": teacher.prompt_version,
                    "timings": answer.timings,
                }
            )
            report.written += 1

        queue: asyncio.Queue[CIRQuery] = asyncio.Queue()
        for q in todo:
            queue.put_nowait(q)

        async def worker() -> None:
            while True:
                try:
                    query = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one(query)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(rejected=report.rejected, refresh=False)

        start = time.perf_counter()
        tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(todo)))]
        try:
            if tasks:
                await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if bar is not None:
                bar.close()
            report.seconds = round(time.perf_counter() - start, 4)
            finished = report.written + report.rejected
            report.records_per_s = round(finished / report.seconds, 3) if report.seconds > 0 else 0.0
            report.reject_reasons = dict(reasons)
            report.teacher_stats = teacher.stats()
    finally:
        if records is not None:
            records.close()
        if rejects is not None:
            rejects.close()
        lock.release()
    return report


def annotate_split(split: CIRSplit, teacher: Teacher, out: str | Path, **options: Any) -> AnnotationReport:
    """Synchronous wrapper of :func:`annotate_split_async`; closes the teacher at the end."""

    async def run() -> AnnotationReport:
        try:
            return await annotate_split_async(split, teacher, out, **options)
        finally:
            await teacher.aclose()

    return asyncio.run(run())


def run_annotation(
    dataset: str,
    root: str | Path,
    split: str,
    teacher: str,
    out: str | Path,
    *,
    concurrency: int = 8,
    limit: int | None = None,
    verify: bool = False,
    retry_rejects: bool = False,
    quality: QualityConfig | None = None,
    progress: bool = False,
    **teacher_options: Any,
) -> AnnotationReport:
    """Load ``dataset``/``split`` from ``root``, build the teacher by name, annotate into ``out``.

    ``teacher_options`` go to :func:`circot.annotate.teachers.build_teacher` (base_url, model, api_key_env,
    timeout, max_retries, max_tokens, ...).
    """
    from circot.annotate.teachers import build_teacher
    from circot.data import load_split

    if dataset not in ANNOTATABLE:
        raise CircotError(f"annotate: dataset must be one of {', '.join(ANNOTATABLE)}, not {dataset!r}")
    if teacher == "shapes" and dataset != "shapes":
        raise CircotError(f"--teacher shapes gives gold CoT for the shapes world only, not {dataset!r}")
    if limit is not None and limit < 0:
        raise CircotError(f"--limit must be positive, not {limit}")
    data = load_split(dataset, root, split)
    built = build_teacher(teacher, **teacher_options)
    return annotate_split(
        data,
        built,
        out,
        concurrency=concurrency,
        limit=limit,
        verify=verify,
        retry_rejects=retry_rejects,
        quality=quality,
        progress=progress,
    )

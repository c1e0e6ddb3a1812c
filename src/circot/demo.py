"""``circot demo``: the whole method, offline, in seconds.

Makes (or reuses) a small shapes gallery in a work folder, loads the shipped shapes model, indexes the gallery,
runs a handful of composed queries from different edit families, and reports each query's reasoning (caption →
reasoning → conclusion, beside the gold one) and its top results — as text and as a self-contained HTML page
(images inlined as base64).

If the shipped model is missing (a development checkout before it is trained), a tiny *random* model stands in
so the command still runs end to end; the result says so loudly (``DemoResult.fallback_model``).
"""

from __future__ import annotations

import base64
import html
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from circot.cache import default_cache_dir
from circot.errors import CircotError
from circot.index import GalleryIndex, atomic_write_bytes, read_manifest

logger = logging.getLogger(__name__)

DEMO_SEED = 7
DEMO_QUERIES = 32  # queries in the generated split (the gallery holds ~6 images per query)
DEMO_SPLIT = "test"
FALLBACK_COT_TOKENS = 32
FALLBACK_WARNING = (
    "the shipped model (circot.model.DEFAULT_MODEL) is not installed; using a tiny RANDOM, UNTRAINED model "
    "instead - the reasoning is gibberish and the rankings are chance. Train one with `circot train` or pass "
    "--model."
)


@dataclass
class DemoQuery:
    """One demo query and what the model made of it."""

    query_id: str
    family: str
    text: str
    reference: str
    targets: list[str]
    gold: dict[str, str]
    result: Any  # circot.search.QueryResult
    target_rank: int | None  # 1-based rank of the first ground truth within the shown results, None if absent

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_id": self.query_id,
            "family": self.family,
            "text": self.text,
            "reference": self.reference,
            "targets": self.targets,
            "gold_cot": self.gold,
            "target_rank": self.target_rank,
            **{k: v for k, v in self.result.to_dict().items() if k in ("cot", "results", "timings")},
        }


@dataclass
class DemoResult:
    workdir: Path
    report: Path
    model: str
    model_fingerprint: str
    fallback_model: bool
    gallery_size: int
    queries: list[DemoQuery]
    timings: dict[str, float] = field(default_factory=dict)
    reused: dict[str, bool] = field(default_factory=dict)

    @property
    def found(self) -> int:
        return sum(q.target_rank is not None for q in self.queries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "workdir": str(self.workdir),
            "report": str(self.report),
            "model": self.model,
            "model_fingerprint": self.model_fingerprint,
            "fallback_model": self.fallback_model,
            "warning": FALLBACK_WARNING if self.fallback_model else None,
            "gallery_size": self.gallery_size,
            "found": self.found,
            "timings": self.timings,
            "reused": self.reused,
            "queries": [q.to_dict() for q in self.queries],
        }


def default_workdir() -> Path:
    return default_cache_dir() / "demo"


# ------------------------------------------------------------------------------------------------- pieces
def ensure_world(workdir: Path, n_queries: int = DEMO_QUERIES, seed: int = DEMO_SEED) -> tuple[Path, bool]:
    """The demo's shapes world under ``workdir`` (generated once, atomically); returns (root, reused)."""
    from circot.data.shapes import GENERATOR_VERSION, generate

    root = workdir / f"shapes-v{GENERATOR_VERSION}-s{seed}-n{n_queries}"
    if (root / f"{DEMO_SPLIT}.json").is_file():
        return root, True
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f".tmp-{uuid.uuid4().hex[:8]}"
    try:
        generate(tmp, seed=seed, n_train=0, n_val=0, n_test=n_queries, n_novel=0)
        try:
            os.replace(tmp, root)
        except OSError:  # another run finished first
            if not (root / f"{DEMO_SPLIT}.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root, False


def load_demo_model(
    model: str | None, device: str = "cpu", workdir: Path | None = None
) -> tuple[Any, str, bool]:
    """(model, how it was found, is_fallback). ``None`` = the shipped model, else a random tiny one (saved in
    ``workdir`` the first time, so later runs skip building its tokenizer)."""
    from circot.loading import DEFAULT_MODEL, default_model_path
    from circot.model import CIRCoT
    from circot.search import load_model

    if model is not None:
        return load_model(model, device), str(model), False
    if (default_model_path() / "circot_config.json").is_file():
        return load_model(None, device), DEFAULT_MODEL, False
    logger.warning(FALLBACK_WARNING)
    name = "random tiny model (fallback)"
    saved = workdir / f"fallback-model-{FALLBACK_COT_TOKENS}" if workdir is not None else None
    if saved is not None and (saved / "circot_config.json").is_file():
        try:
            return load_model(saved, device), name, True
        except CircotError:
            logger.info("cached fallback model unreadable; building it again")
    # a random model never writes <emb> by itself: cap its reasoning so the demo stays quick
    net = CIRCoT.tiny(seed=0, max_cot_tokens=FALLBACK_COT_TOKENS).to(device)
    if saved is not None:
        net.save_pretrained(saved)
    return net, name, True


def pick_queries(queries: list, n: int) -> list:
    """Up to ``n`` queries, one per edit family first (in the world's family order), then the rest."""
    by_family: dict[str, list] = {}
    for q in queries:
        by_family.setdefault(q.extras.get("family", "?"), []).append(q)
    picked: list = []
    depth = 0
    while len(picked) < n and any(len(v) > depth for v in by_family.values()):
        for qs in by_family.values():
            if len(qs) > depth and len(picked) < n:
                picked.append(qs[depth])
        depth += 1
    return picked


def ensure_index(model: Any, split: Any, workdir: Path) -> tuple[GalleryIndex, bool]:
    """The demo gallery's index for this model (built once per model fingerprint)."""
    from circot.gallery import build_index

    path = workdir / f"index-{model.fingerprint}"
    try:
        manifest = read_manifest(path)
        if manifest.model_fingerprint == model.fingerprint and manifest.count == len(split.gallery.ids):
            return GalleryIndex.load(path), True
    except CircotError:
        pass
    index = build_index(model, split.gallery, path, cache_dir=workdir / "cache", batch_size=64)
    assert index is not None  # single process
    return index, False


# ------------------------------------------------------------------------------------------------- run
def run_demo(
    workdir: str | Path | None = None,
    model: str | None = None,
    n_queries: int = 6,
    k: int = 5,
    mode: str = "full",
    report: str | Path | None = None,
    device: str = "cpu",
) -> DemoResult:
    """Run the demo; returns what it did (the HTML report is at ``result.report``)."""
    from circot.data.shapes import load
    from circot.search import QueryResult, embed_queries, index_best_match, rank

    t_start = time.perf_counter()
    workdir = Path(workdir) if workdir is not None else default_workdir()
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    root, world_reused = ensure_world(workdir)
    split = load(root, DEMO_SPLIT)
    timings["world_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    net, model_name, fallback = load_demo_model(model, device, workdir)
    timings["model_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    index, index_reused = ensure_index(net, split, workdir)
    timings["index_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    picked = pick_queries(split.queries, n_queries)
    ref_paths = [str(split.image_path(q.reference)) for q in picked]
    # one batch: generation is amortised over the queries
    queries = embed_queries(
        net,
        ref_paths,
        [q.text for q in picked],
        mode,
        batch_size=len(picked),
        best_match=index_best_match(index),
    )
    ts = time.perf_counter()
    ranked = rank(index, queries.embeddings, k)
    search_s = time.perf_counter() - ts
    shown: list[DemoQuery] = []
    for row, q in enumerate(picked):
        hits = ranked[row]
        per_query = {
            "cot_s": queries.timings["cot_s"] / len(picked),
            "embed_s": queries.timings["embed_s"] / len(picked),
            "search_s": search_s / len(picked),
        }
        per_query["total_s"] = sum(per_query.values())
        result = QueryResult(text=q.text, mode=mode, cot=queries.cots[row], hits=hits, timings=per_query)
        targets = set(q.targets)
        rank = next((h.rank for h in hits if h.id in targets), None)
        gold = q.extras.get("gold_cot") or {}
        shown.append(
            DemoQuery(
                query_id=q.query_id,
                family=q.extras.get("family", "?"),
                text=q.text,
                reference=q.reference,
                targets=list(q.targets),
                gold={k2: gold.get(k2, "") for k2 in ("caption", "reasoning", "conclusion")},
                result=result,
                target_rank=rank,
            )
        )
    timings["queries_s"] = time.perf_counter() - t0
    out = Path(report) if report is not None else workdir / "report.html"
    result = DemoResult(
        workdir=workdir,
        report=out,
        model=model_name,
        model_fingerprint=net.fingerprint,
        fallback_model=fallback,
        gallery_size=len(index),
        queries=shown,
        timings=timings,
        reused={"world": world_reused, "index": index_reused},
    )
    t0 = time.perf_counter()
    write_report(result, index, split, out)
    timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    result.timings = {k2: round(v, 3) for k2, v in timings.items()}
    return result


# ------------------------------------------------------------------------------------------------- text
def format_demo(result: DemoResult) -> str:
    """The demo's terminal output."""
    lines: list[str] = []
    if result.fallback_model:
        bar = "!" * 100
        lines += [bar, "WARNING: " + FALLBACK_WARNING, bar]
    lines.append(
        f"circot demo - model {result.model} [{result.model_fingerprint}], gallery of {result.gallery_size} "
        f"shapes images ({result.workdir})"
    )
    for n, q in enumerate(result.queries, 1):
        r = q.result
        lines.append("")
        lines.append(f"[{n}] {q.family}: {q.text!r}   (reference {q.reference})")
        if r.cot is not None:
            for name in ("caption", "reasoning", "conclusion"):
                lines.append(f"    {name:>10}: {getattr(r.cot, name) or '(empty)'}")
            if not r.cot.well_formed and r.cot.raw.strip():
                lines.append(
                    f"    {'raw':>10}: {_clip(r.cot.raw)!r}  (malformed: {'; '.join(r.cot.problems)})"
                )
            lines.append(f"    {'gold':>10}: {q.gold.get('conclusion', '')}")
        found = (
            f"target found at rank {q.target_rank}"
            if q.target_rank
            else f"target not in the top {len(r.hits)}"
        )
        lines.append(f"    results ({found}):")
        for h in r.hits:
            mark = "  <- target" if h.id in q.targets else ""
            lines.append(f"      {h.rank}. {h.score:+.3f}  {h.id}{mark}")
    t = result.timings
    lines.append("")
    lines.append(
        f"targets found in the top results: {result.found}/{len(result.queries)}; "
        f"time {t.get('total_s', 0):.1f}s (world {t.get('world_s', 0):.1f}s, model {t.get('model_s', 0):.1f}s, "
        f"index {t.get('index_s', 0):.1f}s, queries {t.get('queries_s', 0):.1f}s)"
    )
    lines.append(f"report: {result.report}")
    return "\n".join(lines)


def _clip(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ------------------------------------------------------------------------------------------------- html
def _data_uri(path: Path) -> str:
    mime = "image/png" if path.suffix.lower() == ".png" else "image/jpeg"
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


_CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
.warn{background:#fee;border:2px solid #c00;padding:1em;font-weight:bold}
.q{border-top:1px solid #ccc;padding:1em 0}
.cot{flex:1;min-width:320px;display:grid;grid-template-columns:8em 1fr;gap:.2em 1em;margin:.5em 0}
.cot .k{color:#666;text-align:right}
.row{display:flex;gap:10px;flex-wrap:wrap;align-items:flex-start}
figure{margin:0;text-align:center;font-size:12px}
figure img{width:112px;height:112px;image-rendering:pixelated;border:3px solid transparent}
figure.ref img{border-color:#888} figure.hit img{border-color:#0a0}
.gold{color:#060}
"""


def write_report(result: DemoResult, index: GalleryIndex, split: Any, out: Path) -> Path:
    """Write the self-contained HTML report (images inlined) atomically."""
    e = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>circot demo</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>circot demo: reason, then retrieve</h1>",
    ]
    if result.fallback_model:
        parts.append(f"<p class='warn'>WARNING: {e(FALLBACK_WARNING)}</p>")
    parts.append(
        f"<p>Model <code>{e(result.model)}</code> [{e(result.model_fingerprint)}]; gallery of "
        f"{result.gallery_size} generated shapes images. Targets found in the top results: "
        f"{result.found}/{len(result.queries)}.</p>"
    )
    for n, q in enumerate(result.queries, 1):
        r = q.result
        parts.append(f"<div class='q'><h2>{n}. {e(q.family)}: “{e(q.text)}”</h2><div class='row'>")
        parts.append(
            f"<figure class='ref'><img alt='reference' src='{_data_uri(Path(split.image_path(q.reference)))}'>"
            f"<figcaption>reference<br>{e(q.reference)}</figcaption></figure>"
        )
        parts.append("<div class='cot'>")
        if r.cot is not None:
            for name in ("caption", "reasoning", "conclusion"):
                parts.append(
                    f"<span class='k'>{name}</span><span>{e(getattr(r.cot, name) or '(empty)')}</span>"
                )
        if r.cot is not None and not r.cot.well_formed and r.cot.raw.strip():
            parts.append(f"<span class='k'>raw output</span><span><code>{e(_clip(r.cot.raw))}</code></span>")
        parts.append(
            f"<span class='k gold'>gold conclusion</span><span class='gold'>{e(q.gold.get('conclusion', ''))}</span>"
        )
        found = (
            f"target found at rank {q.target_rank}" if q.target_rank else "target not in the shown results"
        )
        parts.append(f"<span class='k'>result</span><span>{found}</span></div></div><div class='row'>")
        for h in r.hits:
            cls = "hit" if h.id in q.targets else ""
            parts.append(
                f"<figure class='{cls}'><img alt='{e(h.id)}' src='{_data_uri(index.path(h.id))}'>"
                f"<figcaption>#{h.rank} {h.score:+.3f}<br>{e(h.id)}</figcaption></figure>"
            )
        parts.append("</div></div>")
    parts.append("</body></html>")
    atomic_write_bytes(out, "\n".join(parts).encode("utf-8"))
    return out


__all__ = ["DemoQuery", "DemoResult", "FALLBACK_WARNING", "format_demo", "run_demo", "write_report"]

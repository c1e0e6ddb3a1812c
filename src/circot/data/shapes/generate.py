"""Generate the shapes world on disk: images, one annotation JSON per split, gallery lists, a dataset card.

Layout of ``out_dir``::

    README.md                  dataset card (sizes, held-out combinations, seed, generator version)
    <split>.json               annotations (format below), split in train, val, test, test-novel
    <split>_gallery.txt        gallery image ids, one per line (train: every train image)
    images/<split>/<id>.png    RGB images

``<split>.json`` (keys sorted, compact)::

    {"dataset": "shapes", "split": ..., "generator_version": ..., "seed": ..., "image_size": ...,
     "world": {"held_out_pairs": [[color, shape], ...], "held_out_combos": [[op1, op2], ...], ...},
     "gallery": [image id, ...],
     "images": {id: {"file": "images/<split>/<id>.png", "scene": {"objects": [...]}, "role": ..., "query": ...}},
     "queries": [{"id", "reference", "text", "targets" (every gallery image of the target scene, main first),
                  "family", "subset", "ops", "ref_kinds", "program" (steps), "reference_scene", "target_scene",
                  "gold_cot": {"caption", "reasoning", "conclusion"}}, ...]}

Image roles: reference, target, duplicate (another rendering of a target scene: an extra ground truth),
unedited (another rendering of a reference scene), near_miss (wrong object / wrong value / partial edit),
distractor (a random single edit of the reference; only with ``distractors`` > 0), random. Determinism: every random draw comes from generators seeded by (seed, split, stage, index), so the
same seed and generator version give byte-identical files, with any number of worker processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from circot.data.shapes.render import render_scene
from circot.data.shapes.sampling import (
    FAMILIES,
    NOVEL_SUBSETS,
    Rules,
    Sampled,
    World,
    make_world,
    near_misses,
    random_edits,
    sample_query,
    sample_scene,
    split_rules,
)
from circot.data.shapes.scene import Scene, describe, scene_to_dict
from circot.errors import CircotError

log = logging.getLogger(__name__)

GENERATOR_VERSION = "1.0"
SPLITS = ("train", "val", "test", "test-novel")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test-novel": 3}
DUPLICATE_P = (0.5, 0.3, 0.2)  # probabilities of 0, 1, 2 extra renderings of a target scene
UNEDITED_P = 0.5  # probability of another rendering of the reference scene in the gallery
RANDOM_PER_QUERY = 0.5  # random scenes in an evaluation gallery, per query
PNG_COMPRESS_LEVEL = 3  # fast; level 6+ saves ~15 % of disk at twice the time


@dataclass
class ImageSpec:
    id: str
    scene: Scene
    role: str
    query: str | None


@dataclass
class SplitPlan:
    split: str
    queries: list[dict[str, Any]]
    images: list[ImageSpec]
    gallery: list[str]


def _rng(seed: int, split: str, stage: int, index: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, SPLIT_CODES[split], stage, index])


def _families_and_subsets(split: str, n: int, rng: np.random.Generator) -> list[tuple[str, str | None]]:
    """Balanced families (and test-novel subsets), in a shuffled order."""
    if split != "test-novel":
        plan: list[tuple[str, str | None]] = [(FAMILIES[i % len(FAMILIES)], None) for i in range(n)]
    else:
        plan = []
        for i in range(n):
            subset = NOVEL_SUBSETS[i % len(NOVEL_SUBSETS)]
            if subset == "novel_combos":
                plan.append(("two_step", subset))
            else:
                plan.append((FAMILIES[(i // len(NOVEL_SUBSETS)) % len(FAMILIES)], subset))
    order = rng.permutation(n)
    return [plan[int(i)] for i in order]


def _query_record(split: str, index: int, sampled: Sampled, ref_id: str) -> dict[str, Any]:
    return {
        "id": f"{split}_q{index:06d}",
        "reference": ref_id,
        "text": sampled.realization.text,
        "targets": [],
        "family": sampled.family,
        "subset": sampled.subset,
        "ops": list(sampled.ops),
        "ref_kinds": sorted(set(sampled.realization.kinds)),
        "program": [s.to_dict() for s in sampled.program],
        "reference_scene": scene_to_dict(sampled.reference),
        "target_scene": scene_to_dict(sampled.target),
        "gold_cot": {
            "caption": describe(sampled.reference),
            "reasoning": sampled.realization.reasoning,
            "conclusion": describe(sampled.target),
        },
    }


def plan_split(
    world: World,
    split: str,
    n_queries: int,
    seed: int,
    distractors: int = 0,
    intermediate_scenes: bool = False,
) -> SplitPlan:
    """Sample a split's queries and the scenes of its images (no pixels yet).

    ``distractors``: extra gallery images per evaluation query, each a random single edit of the reference
    that is not the target (0 keeps the galleries of generator version 1.0 unchanged).
    ``intermediate_scenes``: two-step gold reasoning writes out the scene after the first step (only the text of
    that reasoning changes).
    """
    images: list[ImageSpec] = []

    def add_image(scene: Scene, role: str, query: str | None) -> str:
        image_id = f"{split}_{len(images):06d}"
        images.append(ImageSpec(image_id, scene, role, query))
        return image_id

    plan = _families_and_subsets(split, n_queries, _rng(seed, split, 0))
    records: list[dict[str, Any]] = []
    main_target: list[tuple[str, Scene]] = []
    for index, (family, subset) in enumerate(plan):
        rng = _rng(seed, split, 1, index)
        rules = split_rules(world, split, subset)
        sampled = sample_query(rng, family, rules, subset, intermediate_scenes=intermediate_scenes)
        qid = f"{split}_q{index:06d}"
        ref_id = add_image(sampled.reference, "reference", qid)
        record = _query_record(split, index, sampled, ref_id)
        main_target.append((add_image(sampled.target, "target", qid), sampled.target))
        if split != "train":
            for _ in range(int(rng.choice(3, p=DUPLICATE_P))):
                add_image(sampled.target, "duplicate", qid)
            if rng.random() < UNEDITED_P:
                add_image(sampled.reference, "unedited", qid)
            for _kind, scene in near_misses(rng, sampled, rules):
                add_image(scene, "near_miss", qid)
            for scene in random_edits(rng, sampled, rules, distractors):
                add_image(scene, "distractor", qid)
        records.append(record)
    if split == "train":
        for record, (target_id, _) in zip(records, main_target, strict=True):
            record["targets"] = [target_id]
        gallery = [im.id for im in images]
        return SplitPlan(split, records, images, gallery)
    rng = _rng(seed, split, 2)
    n_random = int(round(RANDOM_PER_QUERY * n_queries))
    subsets = [r["subset"] for r in records]
    for i in range(n_random):
        rules: Rules = split_rules(world, split, subsets[i % len(subsets)] if split == "test-novel" else None)
        add_image(sample_scene(rng, rules), "random", None)
    # ground truth: every gallery image whose scene is the target scene, the main target first
    by_scene: dict[Scene, list[str]] = {}
    for im in images:
        by_scene.setdefault(im.scene, []).append(im.id)
    for record, (target_id, target_scene) in zip(records, main_target, strict=True):
        same = by_scene[target_scene]
        record["targets"] = [target_id] + [i for i in same if i != target_id]
    order = _rng(seed, split, 3).permutation(len(images))
    gallery = [images[int(i)].id for i in order]
    return SplitPlan(split, records, images, gallery)


# --- writing -------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the dataset is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _render_job(job: tuple[str, Scene, int, int, int, int]) -> None:
    path, scene, seed, split_code, index, size = job
    rng = np.random.default_rng([seed, split_code, 4, index])
    image = render_scene(scene, size, rng)
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        image.save(tmp, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _image_file(split: str, image_id: str) -> str:
    return f"images/{split}/{image_id}.png"


def _render_all(
    out_dir: Path, plans: list[SplitPlan], seed: int, size: int, workers: int, progress: bool
) -> None:
    jobs = [
        (str(out_dir / _image_file(p.split, im.id)), im.scene, seed, SPLIT_CODES[p.split], i, size)
        for p in plans
        for i, im in enumerate(p.images)
    ]
    for p in plans:
        (out_dir / "images" / p.split).mkdir(parents=True, exist_ok=True)
    from circot.progress import progress_bar

    bar = progress_bar(total=len(jobs), desc="rendering", unit="img", disable=not progress)
    if workers <= 1:
        for job in jobs:
            _render_job(job)
            bar.update(1)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            for _ in pool.map(_render_job, jobs, chunksize=64):
                bar.update(1)
    bar.close()


def _split_json(
    plan: SplitPlan,
    world: World,
    seed: int,
    size: int,
    distractors: int = 0,
    intermediate_scenes: bool = False,
) -> dict[str, Any]:
    extra: dict[str, Any] = {}  # options are absent by default, so that v1.0 files stay unchanged
    if distractors:
        extra["distractors"] = distractors
    if intermediate_scenes:
        extra["intermediate_scenes"] = True
    return extra | {
        "dataset": "shapes",
        "split": plan.split,
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "image_size": size,
        "world": world.to_dict(),
        "gallery": plan.gallery,
        "images": {
            im.id: {
                "file": _image_file(plan.split, im.id),
                "scene": scene_to_dict(im.scene),
                "role": im.role,
                "query": im.query,
            }
            for im in plan.images
        },
        "queries": plan.queries,
    }


def dumps(data: Any) -> bytes:
    """Deterministic compact JSON."""
    return (json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n").encode(
        "utf-8"
    )


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise CircotError(
                f"output folder {str(out_dir)!r} is not empty; pass overwrite (--overwrite) to replace it"
            )
        if not (out_dir / "README.md").exists() and not any((out_dir / f"{s}.json").exists() for s in SPLITS):
            raise CircotError(
                f"output folder {str(out_dir)!r} is not empty and holds no shapes dataset; not overwriting"
            )
        for split in SPLITS:
            shutil.rmtree(out_dir / "images" / split, ignore_errors=True)
            for name in (f"{split}.json", f"{split}_gallery.txt"):
                (out_dir / name).unlink(missing_ok=True)
        (out_dir / "README.md").unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 1000,
    n_test: int = 1000,
    n_novel: int = 1000,
    image_size: int = 112,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    distractors: int = 0,
    intermediate_scenes: bool = False,
) -> Path:
    """Generate the shapes world into ``out_dir`` and return it.

    Args:
        out_dir: output folder (created; must be empty unless ``overwrite``).
        seed: the world's seed (held-out combinations, scenes, texts, renderings).
        n_train, n_val, n_test, n_novel: number of queries per split (0 skips the split).
        image_size: side of the square images in pixels.
        workers: processes rendering images (the output does not depend on it).
        overwrite: replace a shapes dataset already in ``out_dir``.
        progress: show progress bars.
        distractors: extra gallery images per evaluation query, random single edits of its reference
            (harder R@5/R@10: the reference's neighbourhood in the gallery grows). 0 by default.
        intermediate_scenes: two-step gold reasoning writes out the scene after the first step. Images, texts
            and galleries are those of the default; only that reasoning's text changes.
    """
    report = generate_report(
        out_dir, seed, n_train, n_val, n_test, n_novel, image_size, workers, overwrite, progress, distractors,
        intermediate_scenes,
    )  # fmt: skip
    return Path(report["out"])


def generate_report(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 20000,
    n_val: int = 1000,
    n_test: int = 1000,
    n_novel: int = 1000,
    image_size: int = 112,
    workers: int = 1,
    overwrite: bool = False,
    progress: bool = False,
    distractors: int = 0,
    intermediate_scenes: bool = False,
) -> dict[str, Any]:
    """:func:`generate`, returning a summary: output folder, timings, sizes, families and subsets per split."""
    out_dir = Path(out_dir)
    for name, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test), ("n_novel", n_novel)):
        if n < 0:
            raise CircotError(f"{name} must be >= 0, got {n}")
    if image_size < 16:
        raise CircotError(f"image_size must be at least 16 pixels, got {image_size}")
    if workers < 1:
        raise CircotError(f"workers must be >= 1, got {workers}")
    if distractors < 0:
        raise CircotError(f"distractors must be >= 0, got {distractors}")
    _prepare_out_dir(out_dir, overwrite)
    world = make_world(seed)
    sizes = {"train": n_train, "val": n_val, "test": n_test, "test-novel": n_novel}
    t0 = time.perf_counter()
    split_iter = [(split, n) for split, n in sizes.items() if n > 0]
    plans = []
    from circot.progress import progress_bar

    for split, n in progress_bar(split_iter, desc="sampling", unit="split", disable=not progress):
        plans.append(plan_split(world, split, n, seed, distractors, intermediate_scenes))
    t_plan = time.perf_counter() - t0
    _render_all(out_dir, plans, seed, image_size, workers, progress)
    t_render = time.perf_counter() - t0 - t_plan
    for plan in plans:
        _atomic_write_bytes(
            out_dir / f"{plan.split}.json",
            dumps(_split_json(plan, world, seed, image_size, distractors, intermediate_scenes)),
        )
        _atomic_write_bytes(out_dir / f"{plan.split}_gallery.txt", ("\n".join(plan.gallery) + "\n").encode())
    _atomic_write_bytes(
        out_dir / "README.md",
        dataset_card(plans, world, seed, image_size, intermediate_scenes).encode("utf-8"),
    )
    seconds = time.perf_counter() - t0
    splits = {
        p.split: {
            "queries": len(p.queries),
            "images": len(p.images),
            "gallery": len(p.gallery),
            "families": dict(sorted(Counter(q["family"] for q in p.queries).items())),
            "subsets": dict(sorted(Counter(q["subset"] for q in p.queries if q["subset"]).items())),
        }
        for p in plans
    }
    n_q = sum(v["queries"] for v in splits.values())
    n_img = sum(v["images"] for v in splits.values())
    summary = (
        f"shapes world (seed {seed}, generator {GENERATOR_VERSION}) written to {out_dir}: "
        f"{n_q} queries, {n_img} images in {seconds:.1f}s "
        f"(sampling {t_plan:.1f}s, rendering {t_render:.1f}s)\n"
        + "\n".join(
            f"  {name}: {v['queries']} queries, {v['images']} images, gallery {v['gallery']}"
            for name, v in splits.items()
        )
    )
    log.debug("%s", summary)
    return {
        "out": str(out_dir),
        "seed": seed,
        "generator_version": GENERATOR_VERSION,
        "image_size": image_size,
        "seconds": {"total": seconds, "sampling": t_plan, "rendering": t_render},
        "splits": splits,
        "world": world.to_dict(),
        "summary": summary,
    }


# --- dataset card ----------------------------------------------------------------------------------------------


def _table(header: list[str], rows: Iterable[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def dataset_card(
    plans: list[SplitPlan], world: World, seed: int, image_size: int, intermediate_scenes: bool = False
) -> str:
    """README.md of a generated world. Holds no timings or paths, so it is deterministic too."""
    size_rows = []
    for p in plans:
        roles = Counter(im.role for im in p.images)
        n_gt = sum(len(q["targets"]) for q in p.queries)
        size_rows.append(
            [
                p.split,
                len(p.queries),
                len(p.images),
                len(p.gallery) if p.split != "train" else "— (train)",
                f"{n_gt / max(1, len(p.queries)):.2f}",
                ", ".join(f"{k} {v}" for k, v in sorted(roles.items())),
            ]
        )
    fam_rows = []
    for p in plans:
        fams = Counter(q["family"] for q in p.queries)
        fam_rows.append([p.split] + [fams.get(f, 0) for f in FAMILIES])
    novel = next((p for p in plans if p.split == "test-novel"), None)
    subset_rows = []
    if novel is not None:
        subs = Counter(q["subset"] for q in novel.queries)
        subset_rows = [[s, subs.get(s, 0)] for s in NOVEL_SUBSETS]
    pairs = ", ".join(f"{c} {s}" for c, s in world.held_out_pairs)
    combos = ", ".join(f"{a} → {b}" for a, b in world.held_out_combos)
    lo, hi = world.novel_objects
    parts = [
        "# shapes — a generated composed image retrieval benchmark with ground-truth reasoning",
        "",
        f"Generated by circot's shapes world, generator version {GENERATOR_VERSION}, seed {seed}, "
        f"images {image_size}×{image_size} px PNG. The same seed and version give byte-identical files.",
        "",
        "Each query is a reference image, a modification text, and every gallery image of the target scene "
        "(CIRCO-style multiple ground truths), with the scene graphs and a gold chain of thought "
        "(caption → reasoning → conclusion)."
        + (
            ' A two-step query\'s gold reasoning writes out the scene after its first step ("the image is …").'
            if intermediate_scenes
            else ""
        ),
        "",
        "## Sizes",
        "",
        _table(["split", "queries", "images", "gallery", "ground truths / query", "image roles"], size_rows),
        "",
        "## Edit families",
        "",
        _table(["split", *FAMILIES], fam_rows),
        "",
        "## Held out of train, val and test (test-novel only)",
        "",
        f"- **novel_pairs** — colour–shape pairs that appear in no train/val/test image: {pairs}. "
        "Every novel_pairs target holds at least one of them.",
        f"- **more_objects** — reference scenes with {lo}–{hi} objects (at most {hi + 1} after an edit); "
        f"train/val/test scenes hold 1–{world.max_objects}.",
        f"- **novel_combos** — two-step edits whose ordered combination of operations never occurs in training: {combos}.",
        "",
    ]
    if subset_rows:
        parts += [
            "test-novel subsets (scored separately, `extras['subset']`):",
            "",
            _table(["subset", "queries"], subset_rows),
            "",
        ]
    parts += [
        "## Vocabulary",
        "",
        "colours: red, orange, yellow, green, blue, purple · shapes: circle, square, triangle, star, cross · "
        "sizes: small, large · positions: a 3×3 grid (top left … bottom right, center).",
        "",
        "## Files",
        "",
        "- `<split>.json` — annotations: queries (id, reference, text, targets, family, subset, ops, program, "
        "reference/target scene graphs, gold CoT) and every image's scene graph and role.",
        "- `<split>_gallery.txt` — the gallery's image ids (train: every train image).",
        "- `images/<split>/<id>.png` — the images.",
        "",
        "Gold caption and conclusion: one clause per object in row-major order, joined by `; `, e.g. "
        "`a large red circle at the top left; a small blue star at the center`.",
        "",
    ]
    return "\n".join(parts)

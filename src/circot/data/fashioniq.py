"""FashionIQ loader (official layout, categories dress / shirt / toptee).

Layout under ``root``::

    captions/cap.<cat>.<split>.json       list of {"candidate", "target", "captions": [c0, c1]} (test: no target)
    image_splits/split.<cat>.<split>.json list of image ids (ASINs) = the retrieval gallery of that category
    images/<ASIN>.jpg                     (or .png)

Conventions (named options, recorded in ``split.conventions``):

* ``category``: one of dress / shirt / toptee, or "all" (default; each query is ranked within its own
  category's gallery, see :class:`FashionIQSplit`).
* ``caption_join``: "eval" (default, deterministic ``"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"``),
  "eval_cased" (same without lowercasing after the first character, for case-sensitive tokenizers) or
  "random" (the four-way training join drawn once per query with ``seed``; training should call
  :func:`training_caption` each epoch instead).
* ``gallery``: "official" (the split file, 3817/6346/5373 images on val) or "val_union" (the union of the
  split's candidates and targets, the smaller gallery some papers use; numbers are not comparable).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from circot.data._io import (
    gallery_size_note,
    list_dir_names,
    read_json_list,
    record_error,
    require_fields,
    require_str,
)
from circot.data.records import CIRQuery, CIRSplit, Gallery
from circot.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
CATEGORIES = ("dress", "shirt", "toptee")
CAPTION_JOINS = ("eval", "eval_cased", "random")
GALLERIES = ("official", "val_union")
IMAGE_EXTENSIONS = (".jpg", ".png")

# Official counts: (queries, gallery images) per category and split.
EXPECTED_COUNTS = {
    ("dress", "train"): (5985, 11452),
    ("shirt", "train"): (5988, 19036),
    ("toptee", "train"): (6027, 16121),
    ("dress", "val"): (2017, 3817),
    ("shirt", "val"): (2038, 6346),
    ("toptee", "val"): (1961, 5373),
    ("dress", "test"): (2024, 3818),
    ("shirt", "test"): (2038, 6346),
    ("toptee", "test"): (2056, 5374),
}

_STRIP = ".?, "


@dataclass
class FashionIQSplit(CIRSplit):
    """A FashionIQ split: the gallery is the union over the loaded categories; each category ranks only within
    its own gallery, given in ``category_galleries`` (category -> ordered image ids)."""

    category_galleries: dict[str, list[str]] = field(default_factory=dict)


def _cap_first(text: str) -> str:
    return text[:1].upper() + text[1:]


def eval_caption(captions: Sequence[str], cased: bool = False) -> str:
    """The deterministic evaluation join: ``"{c0.strip('.?, ').capitalize()} and {c1.strip('.?, ')}"``.

    ``cased=True`` upper-cases only the first character instead of ``str.capitalize()`` (which lowercases the
    rest), for case-sensitive tokenizers; state it when reporting numbers.
    """
    c0, c1 = captions[0].strip(_STRIP), captions[1].strip(_STRIP)
    first = _cap_first(c0) if cased else c0.capitalize()
    return f"{first} and {c1}"


def training_caption(captions: Sequence[str], rng: random.Random) -> str:
    """The four-way random training join (each with probability 1/4).

    ``"C0 and c1"``, ``"C1 and c0"``, ``"C0"``, ``"C1"`` (stripped of ``.?,`` and spaces, first part capitalised);
    as in the community's code, a draw of exactly 0.25, 0.5 or 0.75 falls to the last branch.
    """
    c0, c1 = captions[0].strip(_STRIP), captions[1].strip(_STRIP)
    u = rng.random()
    if u < 0.25:
        return f"{c0.capitalize()} and {c1}"
    if 0.25 < u < 0.5:
        return f"{c1.capitalize()} and {c0}"
    if 0.5 < u < 0.75:
        return c0.capitalize()
    return c1.capitalize()


def _resolve_images(images_dir: Path, ids: Sequence[str]) -> dict[str, Path]:
    names = list_dir_names(images_dir)
    paths: dict[str, Path] = {}
    for image_id in ids:
        for ext in IMAGE_EXTENSIONS:
            if image_id + ext in names:
                paths[image_id] = images_dir / (image_id + ext)
                break
        else:
            paths[image_id] = images_dir / (
                image_id + IMAGE_EXTENSIONS[0]
            )  # missing: reported by `data check`
    return paths


def _read_split_file(path: Path) -> list[str]:
    ids = read_json_list(path, "FashionIQ image split file")
    seen: set[str] = set()
    for i, image_id in enumerate(ids):
        if not isinstance(image_id, str):
            raise record_error(path, i, f"expected an image id string, got {image_id!r}")
        if image_id in seen:
            raise record_error(path, i, f"image {image_id!r} is listed twice")
        seen.add(image_id)
    return ids


def _read_captions(path: Path, cat: str, split: str, join: str, rng: random.Random) -> list[CIRQuery]:
    records = read_json_list(path, "FashionIQ caption file")
    needs_target = split != "test"
    queries = []
    for i, rec in enumerate(records):
        require_fields(
            path, i, rec, ("candidate", "captions", "target") if needs_target else ("candidate", "captions")
        )
        candidate = require_str(path, i, rec, "candidate")
        captions = rec["captions"]
        if not (
            isinstance(captions, list) and len(captions) == 2 and all(isinstance(c, str) for c in captions)
        ):
            raise record_error(path, i, "field 'captions' must be a list of 2 strings")
        target = require_str(path, i, rec, "target") if "target" in rec else None
        if join == "random":
            text = training_caption(captions, rng)
        else:
            text = eval_caption(captions, cased=join == "eval_cased")
        queries.append(
            CIRQuery(
                query_id=f"{cat}/{i}",
                reference=candidate,
                text=text,
                raw_texts=tuple(captions),
                targets=(target,) if target is not None else (),
                extras={"category": cat, "index": i},
            )
        )
    return queries


def load(
    root: Path,
    split: str,
    category: str = "all",
    caption_join: str = "eval",
    gallery: str = "official",
    seed: int = 0,
) -> FashionIQSplit:
    """Load FashionIQ ``split`` ("train", "val", "test") of one category or all three."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"fashioniq: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if category != "all" and category not in CATEGORIES:
        raise DataError(
            f"fashioniq: unknown category {category!r}; choose one of: {', '.join(CATEGORIES)}, all"
        )
    if caption_join not in CAPTION_JOINS:
        raise DataError(
            f"fashioniq: unknown caption_join {caption_join!r}; choose one of: {', '.join(CAPTION_JOINS)}"
        )
    if gallery not in GALLERIES:
        raise DataError(f"fashioniq: unknown gallery {gallery!r}; choose one of: {', '.join(GALLERIES)}")
    cats = CATEGORIES if category == "all" else (category,)
    rng = random.Random(seed)

    queries: list[CIRQuery] = []
    category_galleries: dict[str, list[str]] = {}
    for cat in cats:
        cap_path = root / "captions" / f"cap.{cat}.{split}.json"
        split_path = root / "image_splits" / f"split.{cat}.{split}.json"
        cat_queries = _read_captions(cap_path, cat, split, caption_join, rng)
        if gallery == "official":
            ids = _read_split_file(split_path)
        else:
            ids = list(dict.fromkeys(x for q in cat_queries for x in (q.reference, *q.targets)))
        members = set(ids)
        for q in cat_queries:
            for target in q.targets:
                if target not in members:
                    raise record_error(
                        cap_path,
                        q.extras["index"],
                        f"target {target!r} is not in the gallery {split_path.name}",
                    )
        queries += cat_queries
        category_galleries[cat] = ids

    all_ids = list(dict.fromkeys(i for cat in cats for i in category_galleries[cat]))
    in_gallery = set(all_ids)
    references = list(dict.fromkeys(q.reference for q in queries if q.reference not in in_gallery))
    paths = _resolve_images(root / "images", all_ids + references)
    extra_paths = {r: paths.pop(r) for r in references}
    conventions = {
        "category": category,
        "caption_join": caption_join if caption_join != "random" else f"random (seed={seed})",
        "gallery": gallery,
        "gallery_sizes": {
            cat: gallery_size_note(
                f"fashioniq {cat} {split}",
                len(category_galleries[cat]),
                EXPECTED_COUNTS[(cat, split)][1] if gallery == "official" else None,
            )
            for cat in cats
        },
    }
    logger.info("fashioniq %s %s: %d queries, %d gallery images", category, split, len(queries), len(all_ids))
    return FashionIQSplit(
        dataset="fashioniq",
        split=split,
        root=root,
        queries=queries,
        gallery=Gallery(ids=all_ids, paths=paths),
        conventions=conventions,
        extra_paths=extra_paths,
        category_galleries=category_galleries,
    )


__all__ = [
    "SPLITS",
    "CATEGORIES",
    "EXPECTED_COUNTS",
    "FashionIQSplit",
    "eval_caption",
    "training_caption",
    "load",
]

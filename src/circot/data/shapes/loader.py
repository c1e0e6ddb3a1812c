"""Read a generated shapes world as :class:`circot.data.records.CIRSplit` (dataset name ``shapes``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from circot.data.records import CIRQuery, CIRSplit, Gallery
from circot.errors import DataError

SPLITS = ("train", "val", "test", "test-novel")
QUERY_FIELDS = ("id", "reference", "text", "targets", "family", "gold_cot", "reference_scene", "target_scene")


def read_annotations(root: str | Path, split: str) -> dict[str, Any]:
    """The raw annotation JSON of one split (see :mod:`circot.data.shapes.generate` for the format)."""
    path = Path(root) / f"{split}.json"
    if split not in SPLITS:
        raise DataError(f"shapes: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    if not path.is_file():
        raise DataError(
            f"shapes: annotation file {str(path)!r} not found (generate it with `circot data shapes`)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"shapes: {path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise DataError(f"shapes: {path}: expected a JSON object at the top level, got {_kind(data)}")
    for key in ("queries", "images", "gallery"):
        if key not in data:
            raise DataError(f"shapes: {path}: missing field {key!r}")
    _check_types(data, path)
    return data


def _kind(value: Any) -> str:
    return "null" if value is None else f"{type(value).__name__} {value!r}"[:80]


def _check_types(data: dict[str, Any], path: Path) -> None:
    """Raise a one-line :class:`DataError` naming the first field of ``data`` whose JSON type is wrong."""

    def fail(where: str, expected: str, value: Any) -> DataError:
        return DataError(f"shapes: {path}: {where} must be {expected}, got {_kind(value)}")

    def need(where: str, value: Any, types: type | tuple[type, ...], expected: str) -> None:
        if isinstance(value, bool) or not isinstance(value, types):
            raise fail(where, expected, value)

    def scene(where: str, value: Any) -> None:
        need(where, value, dict, "a scene object")
        objects = value.get("objects")
        need(f"{where}.objects", objects, list, "a list")
        for j, obj in enumerate(objects):
            need(f"{where}.objects[{j}]", obj, dict, "an object")
            for key, types, expected in (
                ("row", int, "an integer"),
                ("col", int, "an integer"),
                ("color", str, "a string"),
                ("shape", str, "a string"),
                ("size", str, "a string"),
            ):
                if key not in obj:
                    raise DataError(f"shapes: {path}: {where}.objects[{j}] is missing field {key!r}")
                need(f"{where}.objects[{j}].{key}", obj[key], types, expected)

    need("'queries'", data["queries"], list, "a list")
    need("'images'", data["images"], dict, "an object")
    need("'gallery'", data["gallery"], list, "a list")
    for i, image_id in enumerate(data["gallery"]):
        need(f"gallery[{i}]", image_id, str, "an image id (string)")
    for image_id, info in data["images"].items():
        where = f"images[{image_id!r}]"
        need(where, info, dict, "an object")
        if "file" in info:
            need(f"{where}.file", info["file"], str, "a string")
        if "scene" in info:
            scene(f"{where}.scene", info["scene"])
    for i, q in enumerate(data["queries"]):
        where = f"queries[{i}]"
        need(where, q, dict, "an object")
        missing = [k for k in QUERY_FIELDS if k not in q]
        if missing:
            raise DataError(f"shapes: {path}: {where} is missing field(s) {', '.join(missing)}")
        need(f"{where}.id", q["id"], (str, int), "a string")
        for key in ("reference", "text", "family"):
            need(f"{where}.{key}", q[key], str, "a string")
        need(f"{where}.targets", q["targets"], list, "a list of image ids")
        for j, t in enumerate(q["targets"]):
            need(f"{where}.targets[{j}]", t, str, "an image id (string)")
        if q.get("subset") is not None:
            need(f"{where}.subset", q["subset"], str, "a string or null")
        need(f"{where}.gold_cot", q["gold_cot"], dict, "an object with caption, reasoning and conclusion")
        for key in ("caption", "reasoning", "conclusion"):
            if key not in q["gold_cot"]:
                raise DataError(f"shapes: {path}: {where}.gold_cot is missing field {key!r}")
            need(f"{where}.gold_cot.{key}", q["gold_cot"][key], str, "a string")
        scene(f"{where}.reference_scene", q["reference_scene"])
        scene(f"{where}.target_scene", q["target_scene"])
        for key in ("ops", "ref_kinds", "program"):
            if key in q:
                need(f"{where}.{key}", q[key], list, "a list")


def load(root: str | Path, split: str, **options: Any) -> CIRSplit:
    """Load one split of a generated shapes world.

    Queries carry ``extras``: ``family``, ``subset`` (a test-novel subset name or None), ``gold_cot``
    ({"caption", "reasoning", "conclusion"}), ``reference_scene`` and ``target_scene`` (scene graphs),
    ``ops``, ``ref_kinds`` and ``program``. ``targets`` lists every gallery image of the target scene.
    """
    if options:
        raise DataError(f"shapes: unknown load option(s): {', '.join(sorted(options))}")
    root = Path(root)
    data = read_annotations(root, split)
    path = root / f"{split}.json"
    images: dict[str, Any] = data["images"]
    paths: dict[str, Path] = {}
    for image_id, info in images.items():
        if not isinstance(info, dict) or "file" not in info:
            raise DataError(f"shapes: {path}: images[{image_id!r}] has no 'file'")
        paths[image_id] = root / info["file"]
    gallery_ids = [str(i) for i in data["gallery"]]
    for i, image_id in enumerate(gallery_ids):
        if image_id not in paths:
            raise DataError(f"shapes: {path}: gallery[{i}] = {image_id!r} is not in 'images'")
    gallery_set = set(gallery_ids)
    queries: list[CIRQuery] = []
    extra_paths: dict[str, Path] = {}
    for index, q in enumerate(data["queries"]):
        missing = [k for k in QUERY_FIELDS if k not in q]
        if missing:
            raise DataError(f"shapes: {path}: queries[{index}] is missing field(s) {', '.join(missing)}")
        for image_id in [q["reference"], *q["targets"]]:
            if image_id not in paths:
                raise DataError(
                    f"shapes: {path}: queries[{index}] names image {image_id!r} that is not in 'images'"
                )
            if image_id not in gallery_set:
                extra_paths[image_id] = paths[image_id]
        extras = {
            "family": q["family"],
            "subset": q.get("subset"),
            "gold_cot": dict(q["gold_cot"]),
            "reference_scene": q["reference_scene"],
            "target_scene": q["target_scene"],
            "ops": list(q.get("ops", [])),
            "ref_kinds": list(q.get("ref_kinds", [])),
            "program": q.get("program", []),
        }
        queries.append(
            CIRQuery(
                query_id=str(q["id"]),
                reference=str(q["reference"]),
                text=str(q["text"]),
                raw_texts=(str(q["text"]),),
                targets=tuple(str(t) for t in q["targets"]),
                extras=extras,
            )
        )
    conventions = {
        "gallery": "train: every train image"
        if split == "train"
        else "generated: targets, duplicates, references, unedited re-renderings, near misses, random scenes",
        "ground_truth": "every gallery image whose scene equals the target scene (main target first)",
        "reference_masking": False,
        "generator_version": data.get("generator_version"),
        "seed": data.get("seed"),
        "image_size": data.get("image_size"),
        "held_out": data.get("world"),
    }
    return CIRSplit(
        dataset="shapes",
        split=split,
        root=root,
        queries=queries,
        gallery=Gallery(ids=gallery_ids, paths={i: paths[i] for i in gallery_ids}),
        conventions=conventions,
        extra_paths=extra_paths,
    )


def image_scenes(root: str | Path, split: str) -> dict[str, dict[str, Any]]:
    """Scene graph of every image of a split, by image id (for oracles and analyses)."""
    return {image_id: info["scene"] for image_id, info in read_annotations(root, split)["images"].items()}

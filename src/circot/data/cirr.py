"""CIRR loader (annotations version rc2; splits train / val / test1).

Layout under ``root`` (the folder holding the raw image folders ``train/``, ``dev/``, ``test1/``)::

    cirr/captions/cap.rc2.<split>.json         list of {"pairid", "reference", "target_hard", "caption", "img_set"}
    cirr/image_splits/split.rc2.<split>.json   {image name: "./dev/dev-244-0-img0.png", ...}
    train/<k>/train-*.png   dev/dev-*.png   test1/test1-*.png

The annotation folder may also be ``root`` itself (``root/captions``, ``root/image_splits``).

* Gallery = the keys of the split file, in file order (2297 on val, 2315 on test1) -- not "all references".
* Image paths come from the split file, relative to ``root``. An image that is not there is looked up by its
  file name in a flat folder: ``image_dir`` when given, then the split's image folder (``root/dev`` for
  ``./dev/...``, which also covers ``train/`` without its numbered sub-folders), then ``root/images``.
* Each query's ``extras["members"]`` holds the six img_set members (reference included), used by Recall_subset.
"""

from __future__ import annotations

import logging
from pathlib import Path, PurePosixPath

from circot.data._io import (
    gallery_size_note,
    list_dir_names,
    read_json,
    read_json_list,
    record_error,
    require_fields,
    require_int,
    require_str,
)
from circot.data.records import CIRQuery, CIRSplit, Gallery
from circot.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test1")
VERSION = "rc2"

# Official counts: (queries, gallery images); None = not fixed by the reference.
EXPECTED_COUNTS = {"train": (None, 16939), "val": (4181, 2297), "test1": (4148, 2315)}

_FLAT_SUFFIXES = (".png", ".jpg", ".jpeg")


def annotation_dir(root: Path) -> Path:
    """The folder with ``captions/`` and ``image_splits/``: ``root/cirr`` or ``root`` itself."""
    for candidate in (root / "cirr", root):
        if (candidate / "captions").is_dir() or (candidate / "image_splits").is_dir():
            return candidate
    raise DataError(
        f"cirr: no annotation folder under {str(root)!r} (expected cirr/captions and cirr/image_splits)"
    )


class _PathResolver:
    """Resolves split-file paths, falling back to flat folders by file name; lists each folder only once."""

    def __init__(self, root: Path, image_dir: Path | None) -> None:
        self.root = root
        self.image_dir = image_dir
        self._listings: dict[Path, set[str]] = {}
        self.fallbacks = 0

    def _names(self, folder: Path) -> set[str]:
        if folder not in self._listings:
            self._listings[folder] = list_dir_names(folder)
        return self._listings[folder]

    def _find_flat(self, folder: Path, name: str) -> Path | None:
        names = self._names(folder)
        if name in names:
            return folder / name
        stem = PurePosixPath(name).stem
        for suffix in _FLAT_SUFFIXES:
            if stem + suffix in names:
                return folder / (stem + suffix)
        return None

    def resolve(self, rel: str) -> Path:
        rel_path = PurePosixPath(rel.replace("\\", "/"))
        parts = [p for p in rel_path.parts if p not in (".", "")]
        primary = self.root.joinpath(*parts)
        if rel_path.name in self._names(primary.parent):
            return primary
        folders = []
        if self.image_dir is not None:
            folders.append(self.image_dir)
        if len(parts) > 1:
            folders.append(self.root / parts[0])
        folders.append(self.root / "images")
        for folder in folders:
            found = self._find_flat(folder, rel_path.name)
            if found is not None:
                self.fallbacks += 1
                return found
        return primary  # missing: reported by `circot data check`


def _read_split_file(path: Path) -> dict[str, str]:
    data = read_json(path, "CIRR image split file")
    if not isinstance(data, dict):
        raise DataError(
            f"{path}: expected a JSON object mapping image names to paths, got {type(data).__name__}"
        )
    for i, (name, rel) in enumerate(data.items()):
        if not isinstance(rel, str):
            raise record_error(path, i, f"path of image {name!r} must be a string, got {rel!r}")
    return data


def load(root: Path, split: str, image_dir: str | Path | None = None) -> CIRSplit:
    """Load CIRR ``split`` ("train", "val", "test1")."""
    root = Path(root)
    if split not in SPLITS:
        hint = " (the CIRR test split is called test1)" if split == "test" else ""
        raise DataError(f"cirr: unknown split {split!r}{hint}; choose one of: {', '.join(SPLITS)}")
    anno = annotation_dir(root)
    cap_path = anno / "captions" / f"cap.{VERSION}.{split}.json"
    split_path = anno / "image_splits" / f"split.{VERSION}.{split}.json"
    records = read_json_list(cap_path, "CIRR caption file")
    split_map = _read_split_file(split_path)
    gallery_set = set(split_map)

    has_targets = split != "test1"
    fields = ("pairid", "reference", "caption", "img_set") + (("target_hard",) if has_targets else ())
    queries: list[CIRQuery] = []
    seen: set[int] = set()
    for i, rec in enumerate(records):
        require_fields(cap_path, i, rec, fields)
        pairid = require_int(cap_path, i, rec, "pairid")
        if pairid in seen:
            raise record_error(cap_path, i, f"pairid {pairid} appears twice")
        seen.add(pairid)
        reference = require_str(cap_path, i, rec, "reference")
        caption = require_str(cap_path, i, rec, "caption")
        img_set = rec["img_set"]
        members = img_set.get("members") if isinstance(img_set, dict) else None
        if not (isinstance(members, list) and all(isinstance(m, str) for m in members)):
            raise record_error(cap_path, i, "field 'img_set.members' must be a list of image names")
        targets: tuple[str, ...] = ()
        if has_targets:
            target = require_str(cap_path, i, rec, "target_hard")
            if target not in gallery_set:
                raise record_error(cap_path, i, f"target_hard {target!r} is not in {split_path.name}")
            targets = (target,)
        if reference not in gallery_set:
            raise record_error(cap_path, i, f"reference {reference!r} is not in {split_path.name}")
        if split != "train":
            outside = [m for m in members if m not in gallery_set]
            if outside:
                raise record_error(cap_path, i, f"img_set member {outside[0]!r} is not in {split_path.name}")
        extras = {
            "pairid": pairid,
            "members": list(members),
            "img_set_id": img_set.get("id"),
            "reference_rank": img_set.get("reference_rank"),
        }
        if has_targets:
            extras["target_rank"] = img_set.get("target_rank")
            extras["target_soft"] = rec.get("target_soft")
        queries.append(
            CIRQuery(
                query_id=str(pairid),
                reference=reference,
                text=caption,
                raw_texts=(caption,),
                targets=targets,
                extras=extras,
            )
        )

    resolver = _PathResolver(root, Path(image_dir) if image_dir is not None else None)
    paths = {name: resolver.resolve(rel) for name, rel in split_map.items()}
    if resolver.fallbacks:
        logger.info("cirr %s: %d images found by file name in a flat folder", split, resolver.fallbacks)
    conventions = {
        "annotations": VERSION,
        "gallery": f"keys of {split_path.name}",
        "gallery_size": gallery_size_note(f"cirr {split}", len(split_map), EXPECTED_COUNTS[split][1]),
        "caption": "caption as given",
    }
    logger.info("cirr %s: %d queries, %d gallery images", split, len(queries), len(split_map))
    return CIRSplit(
        dataset="cirr",
        split=split,
        root=root,
        queries=queries,
        gallery=Gallery(ids=list(split_map), paths=paths),
        conventions=conventions,
    )


__all__ = ["SPLITS", "VERSION", "EXPECTED_COUNTS", "annotation_dir", "load"]

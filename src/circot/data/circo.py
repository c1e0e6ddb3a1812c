"""CIRCO loader (splits val / test).

Layout under ``root``::

    annotations/{val,test}.json                                 list of query records
    COCO2017_unlabeled/annotations/image_info_unlabeled2017.json  {"images": [{"id", "file_name"}, ...]}
    COCO2017_unlabeled/unlabeled2017/000000243611.jpg ...

* Gallery = every image listed in ``image_info_unlabeled2017.json``, in file order; ids are the COCO ids as
  decimal strings, files are ``file_name`` (= the id zero-padded to 12 digits + ".jpg").
* Query text (named option ``use_shared_concept``): the ``relative_caption`` alone by default, as the
  official baselines do; with ``use_shared_concept=True`` it is ``shared_concept_template`` filled with the
  ``shared_concept`` and the ``relative_caption``.
* ``targets`` = ``gt_img_ids`` with ``target_img_id`` first (val only; test ground truth is withheld).
"""

from __future__ import annotations

import logging
from pathlib import Path

from circot.data._io import read_json, read_json_list, record_error, require_fields, require_int, require_str
from circot.data.records import CIRQuery, CIRSplit, Gallery
from circot.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("val", "test")
EXPECTED_COUNTS = {"val": (220, None), "test": (800, None)}
# Commonly quoted size of COCO 2017 unlabeled; not fixed by the reference, so `data check` only reports it.
COCO_UNLABELED_IMAGES = 123403
DEFAULT_SHARED_CONCEPT_TEMPLATE = "find {shared_concept} but {relative_caption}"

IMAGE_INFO = Path("COCO2017_unlabeled") / "annotations" / "image_info_unlabeled2017.json"
IMAGE_FOLDER = Path("COCO2017_unlabeled") / "unlabeled2017"


def image_file_name(image_id: int | str) -> str:
    """COCO file name of an image id: the id zero-padded to 12 digits + ".jpg"."""
    return f"{int(image_id):012d}.jpg"


def load_gallery(root: Path) -> Gallery:
    """The COCO 2017 unlabeled gallery listed in ``image_info_unlabeled2017.json``."""
    path = Path(root) / IMAGE_INFO
    info = read_json(path, "COCO image info file")
    images = info.get("images") if isinstance(info, dict) else None
    if not isinstance(images, list):
        raise DataError(f"{path}: expected an object with an 'images' list")
    folder = Path(root) / IMAGE_FOLDER
    ids: list[str] = []
    paths: dict[str, Path] = {}
    for i, rec in enumerate(images):
        require_fields(path, i, rec, ("id",))
        image_id = str(require_int(path, i, rec, "id"))
        if image_id in paths:
            raise record_error(path, i, f"image id {image_id} appears twice")
        name = rec.get("file_name") or image_file_name(image_id)
        if not isinstance(name, str):
            raise record_error(path, i, f"field 'file_name' must be a string, got {name!r}")
        ids.append(image_id)
        paths[image_id] = folder / name
    return Gallery(ids=ids, paths=paths)


def load(
    root: Path,
    split: str,
    use_shared_concept: bool = False,
    shared_concept_template: str = DEFAULT_SHARED_CONCEPT_TEMPLATE,
) -> CIRSplit:
    """Load CIRCO ``split`` ("val", "test")."""
    root = Path(root)
    if split not in SPLITS:
        raise DataError(f"circo: unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    anno_path = root / "annotations" / f"{split}.json"
    records = read_json_list(anno_path, "CIRCO annotation file")
    gallery = load_gallery(root)
    in_gallery = set(gallery.ids)
    has_targets = split == "val"
    fields = ("id", "reference_img_id", "relative_caption", "shared_concept")
    if has_targets:
        fields += ("target_img_id", "gt_img_ids")
    queries: list[CIRQuery] = []
    extra_paths: dict[str, Path] = {}
    seen: set[int] = set()
    for i, rec in enumerate(records):
        require_fields(anno_path, i, rec, fields)
        qid = require_int(anno_path, i, rec, "id")
        if qid in seen:
            raise record_error(anno_path, i, f"id {qid} appears twice")
        seen.add(qid)
        reference = str(require_int(anno_path, i, rec, "reference_img_id"))
        caption = require_str(anno_path, i, rec, "relative_caption")
        concept = require_str(anno_path, i, rec, "shared_concept")
        targets: tuple[str, ...] = ()
        if has_targets:
            target = str(require_int(anno_path, i, rec, "target_img_id"))
            gt = rec["gt_img_ids"]
            if not (
                isinstance(gt, list)
                and gt
                and all(isinstance(x, int) and not isinstance(x, bool) for x in gt)
            ):
                raise record_error(anno_path, i, "field 'gt_img_ids' must be a non-empty list of integer ids")
            gts = [str(x) for x in gt]
            targets = tuple(dict.fromkeys([target, *gts]))
            outside = [t for t in targets if t not in in_gallery]
            if outside:
                raise record_error(
                    anno_path, i, f"ground-truth image {outside[0]} is not in {IMAGE_INFO.name}"
                )
        aspects = rec.get("semantic_aspects") or []
        if not (isinstance(aspects, list) and all(isinstance(a, str) for a in aspects)):
            raise record_error(anno_path, i, "field 'semantic_aspects' must be a list of strings")
        if use_shared_concept:
            try:
                text = shared_concept_template.format(shared_concept=concept, relative_caption=caption)
            except (KeyError, IndexError) as exc:
                raise DataError(f"circo: shared_concept_template has an unknown field {exc}") from None
        else:
            text = caption
        if reference not in in_gallery:
            extra_paths[reference] = root / IMAGE_FOLDER / image_file_name(reference)
        queries.append(
            CIRQuery(
                query_id=str(qid),
                reference=reference,
                text=text,
                raw_texts=(caption,),
                targets=targets,
                extras={
                    "shared_concept": concept,
                    "semantic_aspects": list(aspects),
                    "relative_caption": caption,
                },
            )
        )
    conventions = {
        "use_shared_concept": use_shared_concept,
        "text": repr(shared_concept_template) if use_shared_concept else "relative_caption",
        "gallery": f"all images of {IMAGE_INFO.name}",
    }
    logger.info("circo %s: %d queries, %d gallery images", split, len(queries), len(gallery.ids))
    return CIRSplit(
        dataset="circo",
        split=split,
        root=root,
        queries=queries,
        gallery=gallery,
        conventions=conventions,
        extra_paths=extra_paths,
    )


__all__ = [
    "SPLITS",
    "EXPECTED_COUNTS",
    "DEFAULT_SHARED_CONCEPT_TEMPLATE",
    "image_file_name",
    "load_gallery",
    "load",
]

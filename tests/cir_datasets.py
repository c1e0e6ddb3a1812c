"""Builders of tiny FashionIQ, CIRR and CIRCO folders in the exact official layouts (placeholder images).

Used by the data, check, metrics, submission and CLI tests; each builder writes under a tmp_path.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image


def write_image(path: Path, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    color = ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256)
    Image.new("RGB", (8, 8), color).save(path)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


# ---------------------------------------------------------------------------------------------------------- FashionIQ

FIQ_CATEGORIES = ("dress", "shirt", "toptee")


def fiq_ids(cat: str, split: str, n: int) -> list[str]:
    return [f"B{cat[:2].upper()}{split[:2].upper()}{i:05d}" for i in range(n)]


def build_fashioniq(
    root: Path,
    n_gallery: int = 8,
    n_queries: int = 3,
    png: tuple[str, ...] = (),
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> Path:
    """captions/cap.<cat>.<split>.json, image_splits/split.<cat>.<split>.json, images/<ASIN>.jpg (.png for
    categories in ``png``). shirt val and toptee val share one image, as in the real data."""
    seed = 0
    for cat in FIQ_CATEGORIES:
        for split in splits:
            ids = fiq_ids(cat, split, n_gallery)
            if split == "val" and cat == "toptee":
                ids[-1] = fiq_ids("shirt", "val", n_gallery)[-1]
            write_json(root / "image_splits" / f"split.{cat}.{split}.json", ids)
            caps = []
            for i in range(n_queries):
                rec = {"candidate": ids[i], "captions": [f"is {cat} number {i}.", f" has  {split} colour?"]}
                if split != "test":
                    rec = {"target": ids[i + 1], **rec}
                caps.append(rec)
            write_json(root / "captions" / f"cap.{cat}.{split}.json", caps)
            ext = ".png" if cat in png else ".jpg"
            for image_id in ids:
                seed += 1
                if not (root / "images" / f"{image_id}.jpg").exists():
                    write_image(root / "images" / f"{image_id}{ext}", seed)
    return root


# ---------------------------------------------------------------------------------------------------------- CIRR

CIRR_FOLDERS = {"train": "train", "val": "dev", "test1": "test1"}


def cirr_name(split: str, i: int) -> str:
    return f"{CIRR_FOLDERS[split]}-{i}-{i % 3}-img{i % 2}"


def build_cirr(root: Path, n_gallery: int = 56, n_queries: int = 6, splits=("train", "val", "test1")) -> Path:
    """cirr/captions/cap.rc2.<split>.json, cirr/image_splits/split.rc2.<split>.json, dev/*.png,
    test1/*.png, train/<k>/*.png. The last gallery images are never references (as in the real data)."""
    pairid = 12060
    for split in splits:
        folder = CIRR_FOLDERS[split]
        names = [cirr_name(split, i) for i in range(n_gallery)]
        rel = {}
        for i, name in enumerate(names):
            sub = f"./{folder}/{i % 3}/{name}.png" if split == "train" else f"./{folder}/{name}.png"
            rel[name] = sub
            write_image(root / sub, i)
        write_json(root / "cirr" / "image_splits" / f"split.rc2.{split}.json", rel)
        caps = []
        for q in range(n_queries):
            ref, target = names[q], names[q + 1]
            members = [names[q + 2], ref, names[q + 3], target, names[q + 4], names[q + 5]]
            rec = {
                "pairid": pairid,
                "reference": ref,
                "caption": f"make picture {q} brighter",
                "img_set": {"id": q, "members": members, "reference_rank": 1},
            }
            if split != "test1":
                rec["target_hard"] = target
                rec["target_soft"] = {target: 1.0}
                rec["img_set"]["target_rank"] = 3
            caps.append(rec)
            pairid += 3
        write_json(root / "cirr" / "captions" / f"cap.rc2.{split}.json", caps)
    return root


# ---------------------------------------------------------------------------------------------------------- CIRCO


def circo_id(i: int) -> int:
    return 100000 + 37 * i


def build_circo(root: Path, n_gallery: int = 60, n_val: int = 5, n_test: int = 4) -> Path:
    """annotations/{val,test}.json and COCO2017_unlabeled/{annotations/image_info_unlabeled2017.json,
    unlabeled2017/<12-digit id>.jpg}."""
    ids = [circo_id(i) for i in range(n_gallery)]
    images = [{"file_name": f"{i:012d}.jpg", "id": i, "width": 8, "height": 8} for i in ids]
    write_json(
        root / "COCO2017_unlabeled" / "annotations" / "image_info_unlabeled2017.json", {"images": images}
    )
    for k, i in enumerate(ids):
        write_image(root / "COCO2017_unlabeled" / "unlabeled2017" / f"{i:012d}.jpg", k)
    val = []
    for q in range(n_val):
        gts = [ids[q + 1], ids[q + 7], ids[q + 9]][: 1 + q % 3]
        val.append(
            {
                "reference_img_id": ids[q],
                "target_img_id": gts[0],
                "relative_caption": f"has {q} more dogs",
                "shared_concept": f"a scene number {q}",
                "gt_img_ids": gts,
                "id": q,
                "semantic_aspects": ["cardinality", "addition"] if q % 2 == 0 else ["cardinality"],
            }
        )
    write_json(root / "annotations" / "val.json", val)
    test = [
        {
            "reference_img_id": ids[q + 20],
            "relative_caption": f"is at night {q}",
            "shared_concept": "a car",
            "id": q,
        }
        for q in range(n_test)
    ]
    write_json(root / "annotations" / "test.json", test)
    return root

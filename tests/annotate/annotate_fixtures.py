"""Helpers of the annotation tests: tiny splits (built directly and in the official CIRR/FashionIQ layouts)."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from circot.data.records import CIRQuery, CIRSplit, Gallery

EDITS = [
    "is red with longer sleeves",
    "has a floral pattern and no collar",
    "show two dogs instead of one",
    "make the background a sunny beach",
    "is shorter and made of denim",
]


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 20), (shade % 256, (3 * shade) % 256, 90)).save(path)


def make_split(
    root: Path, n: int = 12, n_images: int = 6, dataset: str = "cirr", split: str = "val"
) -> CIRSplit:
    """A split of ``n`` queries over ``n_images`` tiny PNGs, built without a loader."""
    ids = [f"img{i}" for i in range(n_images)]
    paths = {x: root / f"{x}.png" for x in ids}
    for i, x in enumerate(ids):
        _png(paths[x], 40 * i)
    queries = [
        CIRQuery(f"q{i:03d}", ids[i % n_images], EDITS[i % len(EDITS)], targets=(ids[(i + 1) % n_images],))
        for i in range(n)
    ]
    return CIRSplit(dataset, split, root, queries, Gallery(ids, paths))


def write_cirr(root: Path, n: int = 6) -> Path:
    """A CIRR val split in the official layout (cirr/captions, cirr/image_splits, dev/)."""
    names = [f"dev-{i}-0-img{i % 2}" for i in range(n + 1)]
    for i, name in enumerate(names):
        _png(root / "dev" / f"{name}.png", 30 * i)
    captions = []
    for i in range(n):
        members = [names[(i + k) % len(names)] for k in range(6)]
        captions.append(
            {
                "pairid": 12060 + i,
                "reference": names[i],
                "target_hard": names[i + 1],
                "target_soft": {names[i + 1]: 1.0},
                "caption": EDITS[i % len(EDITS)],
                "img_set": {"id": i, "members": members, "reference_rank": 0, "target_rank": 1},
            }
        )
    (root / "cirr" / "captions").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "image_splits").mkdir(parents=True, exist_ok=True)
    (root / "cirr" / "captions" / "cap.rc2.val.json").write_text(json.dumps(captions))
    (root / "cirr" / "image_splits" / "split.rc2.val.json").write_text(
        json.dumps({name: f"./dev/{name}.png" for name in names})
    )
    return root


def write_fashioniq(root: Path, n: int = 4) -> Path:
    """A FashionIQ val split (dress only) in the official layout (captions/, image_splits/, images/)."""
    asins = [f"B00000{i:04d}" for i in range(n + 1)]
    for i, asin in enumerate(asins):
        _png(root / "images" / f"{asin}.jpg", 25 * i)
    (root / "captions").mkdir(parents=True, exist_ok=True)
    (root / "image_splits").mkdir(parents=True, exist_ok=True)
    for cat in ("dress", "shirt", "toptee"):
        triplets = []
        if cat == "dress":
            triplets = [
                {
                    "candidate": asins[i],
                    "target": asins[i + 1],
                    "captions": ["is shiny and silver", "has short sleeves"],
                }
                for i in range(n)
            ]
        (root / "captions" / f"cap.{cat}.val.json").write_text(json.dumps(triplets))
        (root / "image_splits" / f"split.{cat}.val.json").write_text(
            json.dumps(asins if cat == "dress" else [])
        )
    return root

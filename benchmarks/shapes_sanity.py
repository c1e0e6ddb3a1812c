"""Two sanity rankings for a shapes split, written as prediction files for ``circot score``.

- oracle: ranks first the gallery images whose canonical description equals the gold conclusion
  (expected R@1 = 100);
- pixels: ranks the gallery by pixel similarity to the reference image (expected near 0: the reference
  itself and its unedited re-renderings come first).

    python benchmarks/shapes_sanity.py --root data/shapes --split test --out results/shapes-sanity
    circot score --dataset shapes --root data/shapes --split test --predictions results/shapes-sanity/oracle.json
    circot score --dataset shapes --root data/shapes --split test --predictions results/shapes-sanity/pixels.json
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from circot.data import load_split
from circot.data.shapes import describe, image_scenes, scene_from_dict
from circot.submission import write_predictions

log = logging.getLogger("shapes_sanity")


def oracle_scores(root: Path, split_name: str) -> np.ndarray:
    split = load_split("shapes", root, split_name)
    scenes = image_scenes(root, split_name)
    gallery_desc = np.array([describe(scene_from_dict(scenes[i])) for i in split.gallery.ids])
    return np.stack(
        [(gallery_desc == q.extras["gold_cot"]["conclusion"]).astype(np.float32) for q in split.queries]
    )


def _pixels(path: Path, side: int) -> np.ndarray:
    with Image.open(path) as im:
        arr = np.asarray(im.convert("RGB").resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    return arr.reshape(-1) / 255.0


def pixel_scores(root: Path, split_name: str, side: int = 28) -> np.ndarray:
    """Negative squared L2 distance between downscaled reference and gallery images."""
    split = load_split("shapes", root, split_name)
    gallery = np.stack([_pixels(split.gallery.path(i), side) for i in split.gallery.ids])
    refs = np.stack([_pixels(split.image_path(q.reference), side) for q in split.queries])
    d = (refs**2).sum(1)[:, None] - 2 * refs @ gallery.T + (gallery**2).sum(1)[None, :]
    return -d


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    split = load_split("shapes", args.root, args.split)
    for name, scores in (
        ("oracle", oracle_scores(args.root, args.split)),
        ("pixels", pixel_scores(args.root, args.split)),
    ):
        path = write_predictions(split, args.out / f"{name}.json", scores, k=50)
        log.info("wrote %s", path)


if __name__ == "__main__":
    main()

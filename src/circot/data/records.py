"""One record type for every CIR dataset: a query and a gallery.

Every loader (FashionIQ, CIRR, CIRCO, shapes) is a small adapter that produces a :class:`CIRSplit`.
Image ids are strings in every dataset (CIRCO's integer COCO ids are stored as their decimal string).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CIRQuery:
    """One composed query.

    Attributes:
        query_id: unique id within the split (CIRR: str(pairid); CIRCO: str(id); FashionIQ:
            "<category>/<index in the caption file>"; shapes: the annotation's id).
        reference: image id of the reference image (a key of the gallery's ``paths`` when the image exists).
        text: the modification text as given to a model, after the dataset's join convention.
        raw_texts: the modification text(s) as in the file (FashionIQ has two captions).
        targets: ground-truth image ids; the first is the main target (CIRR target_hard, CIRCO
            target_img_id). Empty when the split has no public ground truth.
        extras: dataset-specific fields (CIRR ``members``; CIRCO ``shared_concept``,
            ``semantic_aspects``; FashionIQ ``category``; shapes ``family``, ``subset``, ``gold_cot``...).
    """

    query_id: str
    reference: str
    text: str
    raw_texts: tuple[str, ...] = ()
    targets: tuple[str, ...] = ()
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class Gallery:
    """The images a split retrieves from: ordered ids and where each image lives on disk."""

    ids: list[str]
    paths: dict[str, Path]

    def __len__(self) -> int:
        return len(self.ids)

    def path(self, image_id: str) -> Path:
        return self.paths[image_id]


@dataclass
class CIRSplit:
    """A loaded dataset split: its queries, its gallery and the conventions used to build them.

    ``conventions`` records every community-varying choice (caption join, reference masking, gallery kind,
    CIRCO shared concept...) so that it can be printed beside the numbers it produced.
    """

    dataset: str
    split: str
    root: Path
    queries: list[CIRQuery]
    gallery: Gallery
    conventions: dict[str, Any] = field(default_factory=dict)
    # Paths of images that queries reference but which are not in the gallery (e.g. nothing today).
    extra_paths: dict[str, Path] = field(default_factory=dict)

    def image_path(self, image_id: str) -> Path:
        if image_id in self.gallery.paths:
            return self.gallery.paths[image_id]
        return self.extra_paths[image_id]

"""The shapes world: an offline, generated composed-image-retrieval benchmark with ground-truth reasoning.

Scenes of coloured shapes on a 3×3 grid; modification texts from an edit grammar (attribute changes, add,
remove, move, swap, relational references, set-level and two-step edits) with paraphrases; galleries with
duplicates, near misses and random scenes; a test-novel split with held-out colour–shape pairs, more objects
and held-out two-step combinations; gold chains of thought and a scorer.

Public API: :data:`SPLITS`, :func:`generate`, :func:`load`, :func:`gold_cot`, :func:`score_cot`,
:func:`score_cot_by_group`, :func:`corpus`, :func:`render_scene`.
"""

from __future__ import annotations

from circot.data.shapes.cot import (
    canonical_description,
    conclusion_given_read_right,
    corpus,
    gold_cot,
    score_cot,
    score_cot_by_group,
)
from circot.data.shapes.generate import GENERATOR_VERSION, generate, generate_report
from circot.data.shapes.loader import SPLITS, image_scenes, load, read_annotations
from circot.data.shapes.render import render_scene
from circot.data.shapes.sampling import FAMILIES, NOVEL_SUBSETS, World, make_world
from circot.data.shapes.scene import describe, parse_description, scene_from_dict, scene_to_dict

__all__ = [
    "FAMILIES",
    "GENERATOR_VERSION",
    "NOVEL_SUBSETS",
    "SPLITS",
    "World",
    "canonical_description",
    "conclusion_given_read_right",
    "corpus",
    "describe",
    "generate",
    "generate_report",
    "gold_cot",
    "image_scenes",
    "load",
    "make_world",
    "parse_description",
    "read_annotations",
    "render_scene",
    "scene_from_dict",
    "scene_to_dict",
    "score_cot",
    "score_cot_by_group",
]

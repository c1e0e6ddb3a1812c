"""Three-stage chain-of-thought annotation of CIR triplets by a teacher model.

Stages per triplet: (1) a caption of the reference image; (2) reasoning from the reference image, its caption
and the modification text; (3) a conclusion describing the target, with the target image shown to the teacher
for grounding. Teachers: an OpenAI-compatible endpoint, a local transformers Qwen2.5-VL, or the shapes world's
gold CoT. Output: a resumable JSONL file (see :mod:`circot.annotate.store`).

``read_annotations(path) -> dict[query_id, CoT]`` is what training reads. Heavy modules (httpx, torch) are
imported only when a teacher needs them.
"""

from __future__ import annotations

from typing import Any

from circot.annotate.store import read_annotations, rejects_path

__all__ = [
    "read_annotations",
    "rejects_path",
    "run_annotation",
    "annotate_split",
    "annotate_split_async",
    "AnnotationReport",
    "build_teacher",
    "ANNOTATION_PROMPT_VERSION",
]

_LAZY = {
    "run_annotation": "circot.annotate.pipeline",
    "annotate_split": "circot.annotate.pipeline",
    "annotate_split_async": "circot.annotate.pipeline",
    "AnnotationReport": "circot.annotate.pipeline",
    "build_teacher": "circot.annotate.teachers",
    "ANNOTATION_PROMPT_VERSION": "circot.annotate.prompts",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'circot.annotate' has no attribute {name!r}")

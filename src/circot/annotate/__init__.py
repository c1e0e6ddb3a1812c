"""Three-stage chain-of-thought annotation of CIR triplets by a teacher model.

Stages per triplet: (1) a caption of the reference image; (2) reasoning from the reference image, its caption
and the modification text; (3) a conclusion describing the target, with the target image shown to the teacher
for grounding. Teachers: an OpenAI-compatible endpoint, a local transformers Qwen2.5-VL, or the shapes world's
gold CoT. Output: a resumable JSONL file (see :mod:`circot.annotate.store`).

``read_annotations(path) -> dict[query_id, CoT]`` is what training reads.
"""

from __future__ import annotations

from circot.annotate.store import read_annotations, rejects_path

__all__ = ["read_annotations", "rejects_path"]

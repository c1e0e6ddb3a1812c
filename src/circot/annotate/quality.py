"""Quality control of an annotated triplet: structure, length, leakage and whether the conclusion reflects the edit.

All checks are cheap text heuristics; :func:`check_cot` returns every problem found (empty list = accepted).
The optional teacher verification (``--verify``) is run by the pipeline, not here.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

from circot.annotate.prompts import LEAK_RE
from circot.prompts import COT_FIELDS, EMB_TOKEN, TAGS, CoT, format_cot, parse_cot

_WORD_RE = re.compile(r"[a-z0-9]+")
_SPECIAL_RE = re.compile(r"<\|[^|>]*\|>")
_STOPWORDS_TEXT = """a an the and or but of to in on at by for with without from into onto over under is are was were be been
    being it its this that these those make makes made making more less much very same than then there their
    have has had do does did not no can could should would will want wants like look looks looking image
    picture photo one ones some any all just only also instead change changed changes same as so too"""
STOPWORDS = frozenset(_STOPWORDS_TEXT.split())


@dataclass
class QualityConfig:
    """Limits of the checks: words per field; whether the reasoning or conclusion must share a content word
    with the modification text."""

    min_words: int = 3
    max_words: dict[str, int] | None = None
    require_text_overlap: bool = True

    def limit(self, name: str) -> int:
        defaults = {"caption": 120, "reasoning": 220, "conclusion": 120}
        return (self.max_words or {}).get(name, defaults[name])


def words(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def content_words(text: str) -> set[str]:
    """Lower-case words that carry content (no stop words, no single letters)."""
    return {w for w in words(text) if w not in STOPWORDS and len(w) > 1}


def _stem(word: str) -> str:
    # a crude stem: enough to match "yello"/"yellow", "sleeves"/"sleeveless", "dogs"/"dog"
    return word[:4] if len(word) > 4 else word


def edit_overlap(text: str, cot: CoT) -> float:
    """Fraction of the modification text's content words that the reasoning or conclusion mention (by stem)."""
    wanted = {_stem(w) for w in content_words(text)}
    if not wanted:
        return 1.0
    said = {_stem(w) for w in content_words(cot.reasoning + " " + cot.conclusion)}
    return len(wanted & said) / len(wanted)


def changed_words(before: str, after: str) -> set[str]:
    """Content words in the parts where ``after`` differs from ``before`` (word-sequence diff).

    Empty when the two texts say the same thing up to stop words and punctuation; a swap of two objects
    (same words, new order) still counts as a change.
    """
    a, b = words(before), words(after)
    changed: set[str] = set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(a=a, b=b, autojunk=False).get_opcodes():
        if tag != "equal":
            changed |= {w for w in a[i1:i2] + b[j1:j2] if w not in STOPWORDS}
    return changed


def structure_problems(name: str, value: str, config: QualityConfig | None = None) -> list[str]:
    """Problems of one field on its own: empty, too short/long, tags or special tokens inside."""
    config = config or QualityConfig()
    problems = []
    n = len(words(value))
    if not value.strip():
        return [f"{name}: empty"]
    if n < config.min_words:
        problems.append(f"{name}: too short ({n} words < {config.min_words})")
    if n > config.limit(name):
        problems.append(f"{name}: too long ({n} words > {config.limit(name)})")
    tags = [EMB_TOKEN] + [t for field_name in COT_FIELDS for t in TAGS[field_name]]
    if any(t in value for t in tags) or _SPECIAL_RE.search(value):
        problems.append(f"{name}: contains tags or special tokens")
    return problems


def leak_problems(conclusion: str) -> list[str]:
    """The conclusion mentions having seen the target image (or compares with the images)."""
    match = LEAK_RE.search(conclusion)
    return [f"conclusion: mentions the images ({match.group(0)!r})"] if match else []


def check_cot(cot: CoT, text: str, config: QualityConfig | None = None) -> list[str]:
    """Every problem of an annotated triplet; an empty list means accepted.

    Checks: each field's structure and length; the CoT survives the model's template round trip
    (:func:`circot.prompts.format_cot` then :func:`~circot.prompts.parse_cot`); the conclusion does not betray
    the target image; the conclusion differs from the caption in at least one content word (an edit was made); and the reasoning or conclusion mention at
    least one content word of the modification text (when it has any).
    """
    config = config or QualityConfig()
    problems: list[str] = []
    for name in COT_FIELDS:
        problems += structure_problems(name, getattr(cot, name), config)
    if problems:
        return problems
    parsed = parse_cot(format_cot(cot, with_emb=True), require_emb=True)
    if not parsed.well_formed or any(getattr(parsed, n) != getattr(cot, n).strip() for n in COT_FIELDS):
        problems.append("template round trip changed the CoT")
    problems += leak_problems(cot.conclusion)
    if not changed_words(cot.caption, cot.conclusion):
        problems.append("conclusion repeats the caption (the edit is not reflected)")
    if config.require_text_overlap and edit_overlap(text, cot) == 0.0:
        problems.append("reasoning and conclusion share no content word with the modification text")
    return problems

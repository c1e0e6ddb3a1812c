"""The annotation prompts: the teacher's instructions for the three stages and the optional verification.

Every prompt that the annotator sends lives here, and :data:`ANNOTATION_PROMPT_VERSION` is written into
every record: change any text below and bump the version. The CoT output format itself (tags, the
:class:`~circot.prompts.CoT` record) is defined by :mod:`circot.prompts`, not here; the teacher answers each
stage in plain text and the annotator assembles the CoT.

A prompt is a list of :class:`Message`; a message holds text pieces and :class:`ImagePart` placeholders in
order. Each backend renders them (base64 data URLs for an HTTP endpoint, PIL images for transformers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

ANNOTATION_PROMPT_VERSION = "annotate-v1"

SYSTEM = (
    "You write precise, factual annotations of images for an image retrieval dataset. "
    "Answer with the requested text only: no preamble, no markdown, no lists, no tags."
)

CAPTION = (
    "Describe this image in one or two sentences for someone who cannot see it. Name the main subject and "
    "its visible attributes (category, colour, pattern, material, shape, count, position, background) that "
    "someone could use to find this exact image. Do not guess at anything that is not visible."
)

REASONING = (
    "This image is the reference image. Its description: {caption}\n"
    'A user wants a different image, described relative to this one by the modification: "{text}"\n'
    "Reason step by step, in two to four sentences, about what the modification asks for: which parts of the "
    "reference image must change and how, and which parts must stay the same. Resolve vague or misspelt "
    "words using the image. Do not describe the final image yet."
)

CONCLUSION_GROUNDED = (
    "The first image is the reference image. Its description: {caption}\n"
    'Modification requested by the user: "{text}"\n'
    "Reasoning about the modification: {reasoning}\n"
    "The second image is the image that the user is looking for. It is shown to you only so that your answer "
    "is correct. Write one or two sentences describing the image the user is looking for, as it follows from "
    "the reference image and the modification, and consistent with the second image. Write it as a plain "
    "description of the wanted image. Never mention the second image, a target image, a picture you were "
    "given, or that you have seen or been shown anything; never compare with the first image."
)

CONCLUSION_UNGROUNDED = (
    "This image is the reference image. Its description: {caption}\n"
    'Modification requested by the user: "{text}"\n'
    "Reasoning about the modification: {reasoning}\n"
    "Write one or two sentences describing the image the user is looking for, as it follows from the "
    "reference image and the modification. Write it as a plain description of the wanted image; never "
    "compare with the reference image."
)

VERIFY = (
    'Here is a description of an image: "{conclusion}"\n'
    "Does this description match the image shown? Minor omissions are fine; a wrong attribute, object or "
    "count is not. Answer YES or NO on the first line, then give a reason of at most one sentence."
)

# Phrases that betray that the conclusion was written while looking at the target image.
LEAK_PATTERNS = [
    r"\bsecond (image|picture|photo)\b",
    r"\btarget (image|picture|photo)\b",
    r"\b(image|picture|photo) (2|two)\b",
    r"\b(provided|given|shown|attached) (image|picture|photo)\b",
    r"\b(i|we) (can )?(see|saw|observe|notice)\b",
    r"\bas (shown|seen|depicted|pictured)\b",
    r"\b(was|were|been) (shown|given|provided)\b",
    r"\b(first|reference) (image|picture|photo)\b",
]
LEAK_RE = re.compile("|".join(LEAK_PATTERNS), re.IGNORECASE)


@dataclass(frozen=True)
class ImagePart:
    """An image in a prompt, by path; backends load and encode it. ``url``: an image already encoded as a
    ``data:`` URL (an in-memory image), sent as is by the HTTP client."""

    path: Path
    url: str | None = None


@dataclass
class Message:
    role: str
    parts: list[str | ImagePart] = field(default_factory=list)


def _user(*parts: str | ImagePart) -> list[Message]:
    return [Message("system", [SYSTEM]), Message("user", list(parts))]


def caption_prompt(reference: Path) -> list[Message]:
    """Stage 1: describe the reference image."""
    return _user(ImagePart(reference), CAPTION)


def reasoning_prompt(reference: Path, caption: str, text: str) -> list[Message]:
    """Stage 2: reason about the modification from the reference image and its caption."""
    return _user(ImagePart(reference), REASONING.format(caption=caption.strip(), text=text.strip()))


def conclusion_prompt(
    reference: Path, target: Path | None, caption: str, text: str, reasoning: str
) -> list[Message]:
    """Stage 3: describe the target; the target image (when known) grounds the answer but must not be mentioned."""
    values = {"caption": caption.strip(), "text": text.strip(), "reasoning": reasoning.strip()}
    if target is None:
        return _user(ImagePart(reference), CONCLUSION_UNGROUNDED.format(**values))
    return _user(ImagePart(reference), ImagePart(target), CONCLUSION_GROUNDED.format(**values))


def verify_prompt(target: Path, conclusion: str) -> list[Message]:
    """Optional check: does the conclusion describe the target image?"""
    return _user(ImagePart(target), VERIFY.format(conclusion=conclusion.strip()))


_PREFIX_RE = re.compile(
    r"^\s*(\**\s*)?(caption|description|reasoning|conclusion|answer|target description)\s*:\s*(\**\s*)?",
    re.IGNORECASE,
)


def clean_answer(text: str) -> str:
    """Normalise a stage answer: drop a leading "Caption:"-style label, markdown emphasis, quotes, extra spaces."""
    text = text.strip()
    text = _PREFIX_RE.sub("", text, count=1)
    text = text.strip().strip("*").strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return re.sub(r"\s+", " ", text)


def parse_verdict(text: str) -> tuple[bool | None, str]:
    """Parse a verification answer: (True for YES, False for NO, None when neither), and the reason."""
    stripped = text.strip()
    match = re.match(r"^\W*(yes|no)\b\W*(.*)$", stripped, re.IGNORECASE | re.DOTALL)
    if not match:
        return None, stripped[:200]
    return match.group(1).lower() == "yes", re.sub(r"\s+", " ", match.group(2)).strip()[:200]

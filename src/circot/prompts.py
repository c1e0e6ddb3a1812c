"""The single source of truth for circot's prompts, CoT tags and the ``<emb>`` rule.

Training, evaluation, the command line, the annotator and the server all call this module; nothing else
spells a tag or a prompt.

Output template of a query (the assistant's answer)::

    <caption>…</caption><reasoning>…</reasoning><conclusion>…</conclusion><emb>

Fast mode answers ``<emb>`` directly. A gallery image is embedded by answering ``<emb>`` to
:data:`GALLERY_INSTRUCTION`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

EMB_TOKEN = "<emb>"
COT_FIELDS = ("caption", "reasoning", "conclusion")
TAGS = {name: (f"<{name}>", f"</{name}>") for name in COT_FIELDS}
# Tag strings that are added to the tokenizer as special tokens, in this order.
SPECIAL_TOKENS = [EMB_TOKEN] + [t for name in COT_FIELDS for t in TAGS[name]]

GALLERY_INSTRUCTION = "Summarize above image in one word:"
QUERY_INSTRUCTION_FULL = (
    "Modification: {text}\n"
    "Describe the image, reason about the modification, conclude with the target image, then embed it."
)
QUERY_INSTRUCTION_FAST = "Modification: {text}\nEmbed the target image."
PROMPT_VERSION = "1"


@dataclass
class CoT:
    """A parsed chain of thought.

    ``well_formed`` is True only when all three parts were present, closed, in order, and followed by
    ``<emb>`` (or by nothing but whitespace when ``require_emb`` was False). ``problems`` says what was wrong.
    """

    caption: str = ""
    reasoning: str = ""
    conclusion: str = ""
    well_formed: bool = True
    problems: list[str] = field(default_factory=list)
    raw: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoT:
        return cls(**{k: data[k] for k in ("caption", "reasoning", "conclusion") if k in data})


def format_cot(cot: CoT | dict[str, str], with_emb: bool = True) -> str:
    """Render a CoT as the assistant's answer text, ending with ``<emb>`` by default."""
    if isinstance(cot, dict):
        cot = CoT.from_dict(cot)
    parts = [f"{TAGS[name][0]}{getattr(cot, name).strip()}{TAGS[name][1]}" for name in COT_FIELDS]
    return "".join(parts) + (EMB_TOKEN if with_emb else "")


_SPECIAL_STRIP = re.compile(r"<\|[^|>]*\|>")


def parse_cot(text: str, require_emb: bool = False) -> CoT:
    """Parse generated text into caption / reasoning / conclusion; never raises.

    Robust to truncation (an open tag without its close takes the rest of the text), missing parts (left
    empty), and junk around tags. ``require_emb``: a missing ``<emb>`` counts as a problem.
    """
    raw = text
    text = _SPECIAL_STRIP.sub("", text)
    problems: list[str] = []
    emb_at = text.find(EMB_TOKEN)
    if emb_at >= 0:
        if text[emb_at + len(EMB_TOKEN):].strip():
            problems.append("text after <emb>")
        text = text[:emb_at]
    elif require_emb:
        problems.append("no <emb>")
    values: dict[str, str] = {}
    cursor = 0
    for name in COT_FIELDS:
        open_tag, close_tag = TAGS[name]
        start = text.find(open_tag, cursor)
        if start < 0:
            problems.append(f"missing {open_tag}")
            values[name] = ""
            continue
        if text[cursor:start].strip():
            problems.append(f"text before {open_tag}")
        body_start = start + len(open_tag)
        end = text.find(close_tag, body_start)
        if end < 0:
            problems.append(f"unclosed {open_tag}")
            # the body runs until the next known tag or the end of the text
            nxt = [text.find(t, body_start) for n in COT_FIELDS for t in TAGS[n]]
            nxt = [i for i in nxt if i >= 0]
            end_body = min(nxt) if nxt else len(text)
            values[name] = text[body_start:end_body].strip()
            cursor = end_body
            continue
        values[name] = text[body_start:end].strip()
        cursor = end + len(close_tag)
    if text[cursor:].strip():
        problems.append("text after </conclusion>")
    return CoT(**values, well_formed=not problems, problems=problems, raw=raw)


def query_instruction(text: str, mode: str) -> str:
    """The user turn's text (after the image) of a query in ``full`` or ``fast`` mode."""
    if mode == "full":
        return QUERY_INSTRUCTION_FULL.format(text=text.strip())
    if mode == "fast":
        return QUERY_INSTRUCTION_FAST.format(text=text.strip())
    raise ValueError(f"mode must be 'full' or 'fast', not {mode!r}")

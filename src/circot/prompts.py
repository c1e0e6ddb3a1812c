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
from dataclasses import dataclass, field
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
    ``token_ids``: for a generated CoT, the answer's token ids as the model wrote them (up to, without, the
    closing ``<emb>``); a model embeds such a CoT from exactly these tokens, a CoT without them from its text.
    ``embedding``: for a generated CoT, its own ``<emb>`` embedding (before any blend), and ``samples``: the CoTs
    sampled for the same query (config ``cot_samples``), each with its own; the shown CoT may be chosen among
    them (config ``cot_choice``, :func:`circot.search.choose_cots`).
    """

    caption: str = ""
    reasoning: str = ""
    conclusion: str = ""
    well_formed: bool = True
    problems: list[str] = field(default_factory=list)
    raw: str = ""
    token_ids: list[int] | None = field(default=None, repr=False, compare=False)
    embedding: Any = field(default=None, repr=False, compare=False)
    samples: list[CoT] = field(default_factory=list, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "caption": self.caption,
            "reasoning": self.reasoning,
            "conclusion": self.conclusion,
            "well_formed": self.well_formed,
            "problems": list(self.problems),
            "raw": self.raw,
        }

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
        if text[emb_at + len(EMB_TOKEN) :].strip():
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


# --------------------------------------------------------------------------------------------------------------
# Token-level helpers: the chat template, the prompts as the model sees them, and the <emb> rule.
# --------------------------------------------------------------------------------------------------------------

# Qwen-VL special tokens (the same strings as the Qwen2-VL / Qwen2.5-VL tokenizers), in id order.
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
PAD_TOKEN = "<|endoftext|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
# Tokens after which generation stops even when no <emb> was written (the model ended its turn).
STOP_TOKENS = (IM_END, PAD_TOKEN)
SYSTEM_PROMPT = "You are a helpful assistant."
EXTRACTION_RULES = ("at_emb", "before_emb")

# The Qwen2-VL chat template (Jinja), shipped with every tokenizer circot saves. render_prompt() below writes the
# same text directly (no Jinja at encode time); tests check that the two agree.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def strip_special_tokens(text: str) -> str:
    """Remove special-token strings (Qwen's and circot's tags) from user text, so it cannot forge an image
    placeholder or an ``<emb>``."""
    for tok in QWEN_SPECIAL_TOKENS + SPECIAL_TOKENS:
        text = text.replace(tok, "")
    return text


def render_prompt(instruction: str, n_image_tokens: int, system: str | None = SYSTEM_PROMPT) -> str:
    """The full prompt text of one image + one instruction, up to and including the assistant header.

    ``n_image_tokens``: how many ``<|image_pad|>`` placeholders the image takes (the vision tower's merged
    patch count); 1 gives the un-expanded chat-template form.
    """
    head = f"{IM_START}system\n{system}{IM_END}\n" if system is not None else ""
    image = VISION_START + IMAGE_PAD * n_image_tokens + VISION_END
    return f"{head}{IM_START}user\n{image}{instruction}{IM_END}\n{IM_START}assistant\n"


def chat_messages(instruction: str) -> list[dict[str, Any]]:
    """The same prompt as chat messages (for ``apply_chat_template`` / OpenAI-style servers)."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def prompt_instruction(mode: str, text: str | None = None) -> str:
    """The user instruction for ``mode`` in ``gallery`` | ``fast`` | ``full``."""
    if mode == "gallery":
        return GALLERY_INSTRUCTION
    if text is None:
        raise ValueError(f"mode {mode!r} needs a modification text")
    return query_instruction(text, mode)


def user_instruction(mode: str, text: str | None = None) -> str:
    """The user turn's instruction as every query path sends it: :func:`prompt_instruction` of the text with
    special-token strings removed (the local prompt and the one a served reasoner gets)."""
    return prompt_instruction(mode, None if text is None else strip_special_tokens(text))


def answer_text(mode: str, cot: CoT | dict[str, str] | None = None) -> str:
    """The assistant's answer that is embedded: ``<emb>`` (gallery, fast) or the CoT then ``<emb>`` (full)."""
    if mode in ("gallery", "fast"):
        return EMB_TOKEN
    if mode == "full":
        if cot is None:
            raise ValueError("mode 'full' needs a CoT to format")
        return format_cot(cot, with_emb=True)
    raise ValueError(f"mode must be 'gallery', 'fast' or 'full', not {mode!r}")


def close_with_emb(
    generated: list[int], emb_id: int, stop_ids: tuple[int, ...] | list[int] = ()
) -> list[int]:
    """Cut generated token ids at the first ``<emb>`` (kept) or stop token (dropped); append ``<emb>`` if absent."""
    out: list[int] = []
    for tok in generated:
        if tok == emb_id:
            return out + [emb_id]
        if tok in stop_ids:
            break
        out.append(tok)
    return out + [emb_id]


def locate_emb(input_ids: Any, attention_mask: Any, emb_id: int, rule: str = "at_emb") -> Any:
    """Index, per row, of the position whose last-layer hidden state is the embedding.

    ``input_ids``, ``attention_mask``: (b, L) torch tensors (left or right padding). The position is the last
    ``<emb>`` of each row (``rule="at_emb"``) or the one just before it (``"before_emb"``). Raises ValueError
    when a row has no ``<emb>``. Returns a (b,) long tensor.
    """
    import torch

    if rule not in EXTRACTION_RULES:
        raise ValueError(f"extraction rule must be one of {EXTRACTION_RULES}, not {rule!r}")
    hits = (input_ids == emb_id) & attention_mask.bool()
    if not bool(hits.any(dim=1).all()):
        raise ValueError("a sequence has no <emb> token to embed at")
    idx = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    pos = torch.where(hits, idx, -1).max(dim=1).values
    return pos - 1 if rule == "before_emb" else pos

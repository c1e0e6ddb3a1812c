"""Tokenizers: a small byte-level BPE trained on a corpus (the tiny model's), and the special-token setup shared
with real Qwen-VL tokenizers."""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken

from circot import prompts
from circot.errors import CircotError

logger = logging.getLogger(__name__)

# Always in the tiny tokenizer's training text, so that any corpus yields the words of our prompts.
_PROMPT_TEXT = [
    prompts.SYSTEM_PROMPT,
    prompts.GALLERY_INSTRUCTION,
    prompts.QUERY_INSTRUCTION_FULL.format(text=""),
    prompts.QUERY_INSTRUCTION_FAST.format(text=""),
    "system user assistant",
]


def train_bpe_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, min_frequency: int = 2) -> Any:
    """Train a byte-level BPE on ``corpus`` and wrap it as a Qwen-style ``PreTrainedTokenizerFast``.

    The Qwen special tokens (``<|endoftext|>``, ``<|im_start|>`` … ``<|video_pad|>``) take ids 0–13 and circot's
    tags (``<emb>``, ``<caption>`` …) follow; all are atomic special tokens. The tokenizer carries the Qwen chat
    template. Byte-level: any text encodes, none is ``unk``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = prompts.QWEN_SPECIAL_TOKENS + prompts.SPECIAL_TOKENS
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    def texts() -> Iterable[str]:
        for _ in range(max(min_frequency, 1)):  # the prompt words always become tokens
            yield from _PROMPT_TEXT
        n = 0
        for text in corpus:
            n += 1
            yield text
        if n == 0:
            raise ValueError("the tokenizer corpus is empty")

    tok.train_from_iterator(texts(), trainer=trainer)
    logger.info("trained a BPE tokenizer with %d tokens", tok.get_vocab_size())
    return wrap_tokenizer(tok)


def wrap_tokenizer(tok: Any) -> Any:
    """Wrap a ``tokenizers.Tokenizer`` as a ``PreTrainedTokenizerFast`` with Qwen's conventions."""
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=prompts.IM_END,
        pad_token=prompts.PAD_TOKEN,
        padding_side="left",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        chat_template=prompts.CHAT_TEMPLATE,
    )
    add_circot_tokens(fast)
    return fast


def add_circot_tokens(tokenizer: Any) -> int:
    """Make sure the Qwen special tokens and circot's tags are atomic special tokens; returns how many were new.

    Also sets left padding (generation) and the Qwen chat template when the tokenizer has none.
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in prompts.QWEN_SPECIAL_TOKENS + prompts.SPECIAL_TOKENS if t not in vocab]
    # tokens already in the vocabulary must still be registered as special (never split, kept whole)
    tokens = [AddedToken(t, special=True, normalized=False) for t in prompts.SPECIAL_TOKENS]
    tokenizer.add_tokens(tokens, special_tokens=True)
    if missing:
        extra = [
            AddedToken(t, special=True, normalized=False) for t in missing if t not in prompts.SPECIAL_TOKENS
        ]
        if extra:
            tokenizer.add_tokens(extra, special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = prompts.PAD_TOKEN
    tokenizer.padding_side = "left"
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = prompts.CHAT_TEMPLATE
    return len(missing)


def token_id(tokenizer: Any, token: str) -> int:
    """The id of an atomic token; ValueError when the tokenizer does not know it."""
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no token {token!r}")
    return int(ids[0])


# The pre-tokenizer split of Qwen2 / Qwen2-VL (single digits, unlike GPT-4's groups of three).
QWEN_PATTERN = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def read_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a ``.tiktoken`` file (one ``base64-token rank`` per line) without the tiktoken package."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError:
                raise CircotError(f"{path}:{lineno}: not a 'base64-token rank' line") from None
    return ranks


def qwen_tokenizer_from_tiktoken(path: str | Path) -> Any:
    """The real Qwen BPE (e.g. ``dashscope/resources/qwen.tiktoken``) as a Qwen-style fast tokenizer.

    The 151,643 ranks keep their ids; the Qwen special tokens follow at their usual ids (``<|endoftext|>`` =
    151643 … ``<|video_pad|>`` = 151656), then circot's tags. Conversion takes a few seconds.
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(path)
    if not path.is_file():
        raise CircotError(f"{path}: tiktoken file not found")

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return read_tiktoken_ranks(tiktoken_url)

    tok = _Converter(vocab_file=str(path), pattern=QWEN_PATTERN).converted()
    n = tok.get_vocab_size()
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in prompts.QWEN_SPECIAL_TOKENS]
    )
    if tok.token_to_id(prompts.PAD_TOKEN) != n:
        raise CircotError(f"{path}: unexpected vocabulary layout ({n} ranks)")
    return wrap_tokenizer(tok)

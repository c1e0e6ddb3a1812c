"""CIRCoT: a Qwen-VL model that writes caption → reasoning → conclusion, then embeds at ``<emb>``.

Inference API (sentence-transformers style)::

    model = CIRCoT.from_pretrained(None)                      # the shipped tiny shapes model
    g = model.encode_images(paths)                            # (n, d) float32, L2-normalised
    q, cots = model.encode_queries(refs, texts, mode="full", return_reasoning=True)

Training API: :meth:`CIRCoT.build_batch` turns images/texts/CoTs into tensors (labels on the CoT answer);
:meth:`CIRCoT.embed_batch` (also ``forward``) returns differentiable embeddings and logits.

Every embedding — gallery, fast, full, training, generated or given CoT — is the last-layer state at the
``<emb>`` rule's position (:func:`circot.prompts.locate_emb`, applied by :meth:`CIRCoT.extract_embedding`);
in full mode the decoding loop feeds the closing ``<emb>`` itself and keeps that state, so a generated CoT
costs one decode and no second forward. Both end in ``CIRCoT._finish_embedding``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from circot import loading, prompts
from circot.config import CIRCoTConfig, LoRASettings
from circot.errors import CircotError
from circot.generation import _cut_at, _LeanDecoder, decode_steps, fused_decoder_weights
from circot.loading import DEFAULT_MODEL, TINY_DEFAULTS, default_model_path, tiny_hf_config
from circot.processing import CIRCoTProcessor, ImageLike, ImagePreprocessor
from circot.prompts import CoT
from circot.tokenizer import token_id

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# the seed that full mode's sampled CoTs (config `cot_samples`) start from: each query's generators are seeded
# from it, the query's image pixels and its prompt, so that its samples do not depend on the queries decoded with it
COT_SAMPLE_SEED = 0
MODES = ("gallery", "fast", "full")


@dataclass
class _Seqs:
    """Left-padded token sequences of one batch, with their images."""

    input_ids: torch.Tensor  # (b, L)
    attention_mask: torch.Tensor  # (b, L)
    position_ids: torch.Tensor  # (3, b, L) multimodal rotary positions
    labels: torch.Tensor | None  # (b, L)


class CIRCoT(nn.Module):
    """A CIR-CoT retrieval model around a Qwen2-VL / Qwen2.5-VL ``...ForConditionalGeneration``.

    ``model``: the transformers model (possibly wrapped by peft); ``tokenizer``: a fast tokenizer that knows
    circot's tags; ``image_processor``: a ``Qwen2VLImageProcessorPil``. Prefer :meth:`from_pretrained` and
    :meth:`tiny` over calling this directly.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, image_processor: Any, config: CIRCoTConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.images = ImagePreprocessor(image_processor)
        self.emb_token_id = token_id(tokenizer, config.emb_token)
        self.pad_token_id = token_id(tokenizer, prompts.PAD_TOKEN)
        self.image_token_id = token_id(tokenizer, prompts.IMAGE_PAD)
        self.stop_token_ids = tuple(token_id(tokenizer, t) for t in prompts.STOP_TOKENS)
        # never generated: image/video placeholders and vision markers (they would corrupt the pooling pass)
        vision = (
            prompts.IMAGE_PAD,
            "<|video_pad|>",
            prompts.VISION_START,
            prompts.VISION_END,
            "<|vision_pad|>",
        )
        self._banned_ids = torch.tensor([token_id(tokenizer, t) for t in vision], dtype=torch.long)
        self._fingerprint: tuple[int, str] | None = None
        # one-token decoding steps through _LeanDecoder (same results, a fraction of the per-token overhead)
        self.lean_decoding = True
        self._fused: tuple[int, list] | None = None
        changed = config.check_prompts()
        if changed:
            logger.warning("this model was saved with different prompt strings (%s)", ", ".join(changed))
        if config.gradient_checkpointing:
            self.set_gradient_checkpointing(True)

    # ------------------------------------------------------------------ construction
    @classmethod
    def tiny(
        cls,
        tokenizer_corpus: Iterable[str] | None = None,
        image_size: int = 112,
        seed: int = 0,
        vocab_size: int | None = None,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> CIRCoT:
        """A random tiny Qwen2-VL (or ``model_type="qwen2_5_vl"`` / ``"qwen3_vl"``) with a BPE tokenizer trained on a corpus.

        ``tokenizer_corpus`` defaults to the shapes world's :func:`circot.data.shapes.corpus`. ``overrides``: keys
        of :data:`TINY_DEFAULTS` (architecture) or fields of :class:`CIRCoTConfig`. Images are resized to a fixed
        ``image_size``² pixels (16 image tokens at 112 px with patch 14, merge 2). ``tokenizer``: use this
        tokenizer (e.g. the real Qwen BPE, :func:`circot.tokenizer.qwen_tokenizer_from_tiktoken`) instead of
        training one.
        """
        return loading.build_tiny(cls, tokenizer_corpus, image_size, seed, vocab_size, tokenizer, **overrides)

    @classmethod
    def from_config(
        cls,
        hf_config: str | Path | dict[str, Any],
        dtype: str | torch.dtype | None = "bfloat16",
        image_size: int = 224,
        seed: int = 0,
        tokenizer: Any = None,
        **overrides: Any,
    ) -> CIRCoT:
        """A backbone of a real checkpoint's exact shape with random weights, from its ``config.json`` (a path or
        dict; ``configs/backbones/`` holds the published ones): for measuring memory and speed at real size
        without downloading anything.

        The tokenizer defaults to the shapes world's small BPE (the embedding keeps the config's vocabulary
        size); the config's image-token ids are replaced by the tokenizer's. Weights are allocated in ``dtype``
        and filled from one random pool (seeded, so the same call gives the same weights). Images are resized to
        ``image_size``² pixels. ``overrides``: fields of :class:`CIRCoTConfig` (``lora``, ``max_cot_tokens``...).
        """
        return loading.build_from_config(cls, hf_config, dtype, image_size, seed, tokenizer, **overrides)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        config: CIRCoTConfig | None = None,
        **overrides: Any,
    ) -> CIRCoT:
        """Load a circot model directory, or start from a Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoint (hub id or path).

        ``None`` or ``"shapes-tiny"``: the tiny shapes model shipped in the package. A circot directory (with
        ``circot_config.json``) holds full weights or a LoRA adapter over ``base_model``. A plain checkpoint gets
        circot's tokens added (embeddings resized) and a new config (``config`` / ``overrides``, e.g.
        ``lora=LoRASettings()``). ``dtype``: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype.
        """
        return loading.load_pretrained(cls, id_or_path, device, dtype, config, **overrides)

    # ------------------------------------------------------------------ properties
    @property
    def hf(self) -> nn.Module:
        """The transformers ``...ForConditionalGeneration`` (under peft, its base model with LoRA layers)."""
        return self.model.get_base_model() if self.is_lora else self.model

    @property
    def is_lora(self) -> bool:
        return hasattr(self.model, "peft_config")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def has_deepstack(self) -> bool:
        """Whether the vision tower also feeds features into the decoder's first layers (Qwen3-VL)."""
        return bool(getattr(self.hf.config.vision_config, "deepstack_visual_indexes", None))

    @property
    def embedding_dim(self) -> int:
        return int(self.hf.config.text_config.hidden_size)

    @property
    def processor(self) -> CIRCoTProcessor:
        """A transformers processor (image processor + tokenizer) equivalent to what this model uses."""
        return CIRCoTProcessor(
            self.images.image_processor, self.tokenizer, chat_template=prompts.CHAT_TEMPLATE
        )

    @property
    def fingerprint(self) -> str:
        """A stable hash of the config and the weights (recomputed only after the weights change)."""
        version = sum(p._version for p in self.model.parameters())
        if self._fingerprint is not None and self._fingerprint[0] == version:
            return self._fingerprint[1]
        h = hashlib.sha256()
        cfg = self.config.to_dict()
        cfg.pop("gradient_checkpointing", None)  # a training switch; embeddings do not depend on it
        # query-side settings: neither the gallery's embeddings nor the greedy CoTs depend on them, so an index
        # stays valid (and the fingerprints of models saved before these existed stay as they were)
        cfg.pop("fast_weight", None)
        cfg.pop("cot_samples", None)
        cfg.pop("cot_choice", None)
        h.update(json.dumps(cfg, sort_keys=True).encode())
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        hash_weights(h, self.model)
        digest = h.hexdigest()[:16]
        self._fingerprint = (version, digest)
        return digest

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ training switches
    def enable_lora(self, settings: LoRASettings | None = None) -> None:
        """Wrap the language model's linear layers with LoRA; circot's token rows stay trainable (and saved)."""
        from peft import LoraConfig, get_peft_model

        if self.is_lora:
            return
        settings = settings or self.config.lora or LoRASettings()
        names = "|".join(settings.target_modules)
        token_ids = [token_id(self.tokenizer, t) for t in prompts.SPECIAL_TOKENS]
        tied = bool(getattr(self.hf.config, "tie_word_embeddings", False))
        trainable = {"embed_tokens": token_ids} if tied else {"embed_tokens": token_ids, "lm_head": token_ids}
        lora_config = LoraConfig(
            r=settings.r,
            lora_alpha=settings.alpha,
            lora_dropout=settings.dropout,
            target_modules=rf".*language_model.*\.({names})",
            trainable_token_indices=trainable,
        )
        self.model = get_peft_model(self.model, lora_config)
        self.config.lora = settings
        self._fingerprint = None

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Trade compute for memory in training (no effect in eval mode)."""
        hf = self.hf
        kwargs = {"use_reentrant": False}
        if enabled:
            if hasattr(hf, "activation_checkpointing_enable"):  # transformers >= 5.2x (the old name warns)
                hf.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
            if self.is_lora:
                hf.enable_input_require_grads()
        elif hasattr(hf, "activation_checkpointing_disable"):
            hf.activation_checkpointing_disable()
        else:
            hf.gradient_checkpointing_disable()
        self.config.gradient_checkpointing = enabled

    # ------------------------------------------------------------------ token sequences
    def _prompt_ids(
        self, mode: str, texts: Sequence[str | None], n_image_tokens: list[int]
    ) -> list[list[int]]:
        strings = [
            prompts.render_prompt(prompts.user_instruction(mode, t), n, self.config.system_prompt)
            for t, n in zip(texts, n_image_tokens, strict=True)
        ]
        return self.tokenizer(strings, add_special_tokens=False)["input_ids"]

    def _answer_ids(self, cots: Sequence[CoT | dict[str, str]]) -> list[list[int]]:
        """Token ids of the CoT answers, without ``<emb>`` (the caller appends the token itself)."""
        strings = [prompts.format_cot(_clean_cot(c), with_emb=False) for c in cots]
        return self.tokenizer(strings, add_special_tokens=False)["input_ids"]

    def _pad(
        self, seqs: list[list[int]], grids: torch.Tensor, label_from: list[int | None] | None = None
    ) -> _Seqs:
        """Left-pad sequences; positions come from the model's multimodal rotary index."""
        length = max(len(s) for s in seqs)
        b = len(seqs)
        ids = torch.full((b, length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((b, length), dtype=torch.long)
        labels = torch.full((b, length), IGNORE_INDEX, dtype=torch.long) if label_from is not None else None
        for i, s in enumerate(seqs):
            ids[i, length - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, length - len(s) :] = 1
            if labels is not None and label_from[i] is not None:
                start = length - len(s) + label_from[i]
                labels[i, start:] = ids[i, start:]
        positions = self._rope_index(ids, mask, grids)
        return _Seqs(ids, mask, positions, labels)

    def _rope_index(self, ids: torch.Tensor, mask: torch.Tensor, grids: torch.Tensor) -> torch.Tensor:
        mm_types = (ids == self.image_token_id).to(torch.int)
        positions, _ = self.hf.model.get_rope_index(
            input_ids=ids, mm_token_type_ids=mm_types, image_grid_thw=grids, attention_mask=mask
        )
        return positions

    # ------------------------------------------------------------------ training-facing
    def build_batch(
        self,
        images: Sequence[ImageLike],
        texts: Sequence[str] | None = None,
        cots: Sequence[CoT | dict[str, str]] | None = None,
        mode: str = "gallery",
        image_features: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Tensors for :meth:`embed_batch` (on CPU; embed_batch moves them to the model's device).

        ``image_features`` (not for Qwen3-VL, whose tower also feeds deep-stack features): the vision tower's
        merged outputs of ``images``, already computed
        (``(n_tokens, hidden)`` for all images in order, grids ``(n, 3)``), e.g. cached while the tower is frozen;
        the batch then carries them instead of pixels and :meth:`embed_batch` skips the tower.

        ``mode="gallery"``: image + gallery instruction, answered by ``<emb>``. ``"fast"``: reference + text,
        answered by ``<emb>``. ``"full"``: reference + text, answered by the given CoT then ``<emb>``; ``labels``
        hold the answer tokens (the CoT and the closing ``<emb>``, which teaches the model to stop) and -100
        elsewhere. Keys: input_ids, attention_mask, position_ids (3, b, L), pixel_values, image_grid_thw, labels.
        """
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
        n = len(images)
        if mode != "gallery" and (texts is None or len(texts) != n):
            raise ValueError(f"mode {mode!r} needs one text per image")
        if mode == "full" and (cots is None or len(cots) != n):
            raise ValueError("mode 'full' needs one CoT per image (generate with encode_queries instead)")
        if image_features is not None:
            features, grids = image_features
        else:
            pixels, grids = self.images(images)
        n_img = self.images.n_tokens(grids)
        prompt_ids = self._prompt_ids(mode, texts if texts is not None else [None] * n, n_img)
        if mode == "full":
            answers = [a + [self.emb_token_id] for a in self._answer_ids(cots)]  # type: ignore[arg-type]
            seqs = [p + a for p, a in zip(prompt_ids, answers, strict=True)]
            seq = self._pad(seqs, grids, label_from=[len(p) for p in prompt_ids])
        else:
            seqs = [p + [self.emb_token_id] for p in prompt_ids]
            seq = self._pad(seqs, grids, label_from=[None] * n)
        batch = {
            "input_ids": seq.input_ids,
            "attention_mask": seq.attention_mask,
            "position_ids": seq.position_ids,
            "image_grid_thw": grids,
            "labels": seq.labels,  # type: ignore[dict-item]
        }
        if image_features is not None:
            batch["image_features"] = features
        else:
            batch["pixel_values"] = pixels
        return batch

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.embed_batch(batch)

    def embed_batch(
        self, batch: dict[str, torch.Tensor], labelled_logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Differentiable embeddings ``(b, d)`` (L2-normalised if the config says so) and the logits.

        Logits ``(b, L, V)`` aligned with ``batch["labels"]`` (shift them for next-token CE) are computed only
        when some label is not -100; otherwise None. ``labelled_logits``: only the logits that predict a
        label, ``(n, V)`` for the positions ``t`` whose ``labels[:, t + 1]`` is not -100, in row-major order (the
        LM head then runs over the answer only).
        """
        dev = self.device
        b = {k: v.to(dev) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        if "image_features" in b:
            image_out = _image_output(b["image_features"])
        else:
            image_out = self._image_features(b["pixel_values"], b["image_grid_thw"])
        hidden = self._hidden(b["input_ids"], b["attention_mask"], b["position_ids"], image_out)
        emb = self.extract_embedding(hidden, b["input_ids"], b["attention_mask"])
        logits = None
        labels = b.get("labels")
        if labels is not None and bool((labels != IGNORE_INDEX).any()):
            if labelled_logits:
                logits = self.hf.lm_head(hidden[:, :-1][labels[:, 1:] != IGNORE_INDEX])
            else:
                logits = self.hf.lm_head(hidden)
        return emb, logits

    def extract_embedding(
        self, hidden: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """THE embedding rule: last-layer hidden state at (or just before) each row's last ``<emb>``."""
        pos = prompts.locate_emb(input_ids, attention_mask, self.emb_token_id, self.config.extraction)
        return self._finish_embedding(hidden[torch.arange(hidden.shape[0], device=hidden.device), pos])

    def _finish_embedding(self, states: torch.Tensor) -> torch.Tensor:
        """(b, hidden) states at the ``<emb>`` rule's position → float32 embeddings, L2-normalised if the
        config says so. The decoding loop's closing states go through here too."""
        return F.normalize(states.float(), dim=-1) if self.config.normalize else states.float()

    # ------------------------------------------------------------------ forward pieces
    def _image_features(self, pixel_values: torch.Tensor, grids: torch.Tensor) -> Any:
        return self.hf.model.get_image_features(pixel_values.to(self.dtype), grids, return_dict=True)

    def image_features(self, images: Sequence[ImageLike]) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The vision tower's merged outputs of each image (``(tokens_i, hidden)`` tensors) and the grids.

        Differentiable when called with gradients enabled; :meth:`build_batch` takes them back (concatenated)
        as ``image_features``.
        """
        pixels, grids = self.images(images)
        out = self._image_features(pixels.to(self.device), grids.to(self.device))
        return list(torch.cat(out.pooler_output).split(self.images.n_tokens(grids))), grids

    def _lm(
        self, input_ids, attention_mask, position_ids, image_out=None, cache=None, use_cache=False
    ) -> Any:
        return self.hf.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            mm_encoder_outputs={"image": image_out} if image_out is not None else None,
            cache=cache,
            use_cache=use_cache,
        )

    def _hidden(self, input_ids, attention_mask, position_ids, image_out) -> torch.Tensor:
        return self._lm(input_ids, attention_mask, position_ids, image_out).last_hidden_state

    def _next_token(
        self, logits: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Greedy unless the config samples or a ``generator`` to sample from is given (a list: one per row)."""
        logits = logits.index_fill(-1, self._banned_ids.to(logits.device), float("-inf"))
        if not self.config.do_sample and generator is None:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.config.sampling_temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.config.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        if isinstance(generator, list):
            rows = [torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generator, strict=True)]
            return torch.cat(rows)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def _decode_steps(
        self,
        seq: _Seqs,
        image_out: Any,
        max_new: int,
        embed: dict[str, torch.Tensor] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> Iterator[torch.Tensor]:
        """The decoding loop of full mode: :func:`circot.generation.decode_steps` (its docstring has the details)."""
        return decode_steps(self, seq, image_out, max_new, embed, generator)

    def _parse_generated(self, generated: list[int]) -> CoT:
        """The parsed CoT of one row of generated token ids, with the ids it embeds from."""
        emitted = _cut_at(generated, self.emb_token_id, self.stop_token_ids)
        cot = prompts.parse_cot(self.tokenizer.decode(emitted, skip_special_tokens=False), require_emb=True)
        cot.token_ids = prompts.close_with_emb(generated, self.emb_token_id, self.stop_token_ids)[:-1]
        return cot

    def _sample_seeds(
        self, pixels: torch.Tensor, grids: torch.Tensor, prompt_ids: list[list[int]]
    ) -> list[int]:
        """One seed per query for its sampled CoTs: a hash of :data:`COT_SAMPLE_SEED`, the query image's pixels
        (as preprocessed, one image's patches apart from another's) and its prompt's token ids (zeros, unused,
        while the config samples none)."""
        if not self.config.cot_samples:
            return [0] * len(prompt_ids)
        seeds = []
        patches = pixels.detach().float().cpu().split(grids.prod(-1).tolist())
        for image, ids in zip(patches, prompt_ids, strict=True):
            h = hashlib.sha256(str(COT_SAMPLE_SEED).encode())
            h.update(image.contiguous().numpy().tobytes())
            h.update(np.asarray(ids, np.int64).tobytes())
            seeds.append(int.from_bytes(h.digest()[:8], "little") >> 1)
        return seeds

    def _add_cot_samples(
        self,
        cot_emb: torch.Tensor,
        prompt_ids: list[list[int]],
        grids: torch.Tensor,
        image_out: Any,
        seeds: list[int],
    ) -> tuple[torch.Tensor, list[list[CoT]]]:
        """Generated rows' embeddings ``(b, d)`` from their greedy CoTs' ``<emb>`` embeddings, and the CoTs
        sampled per row (each with its own ``embedding``): as they are and none when the config's
        ``cot_samples`` k is 0, else the mean of those and of k CoTs sampled per row (at
        ``sampling_temperature``; the j-th from a generator seeded with the row's ``seeds`` entry and j, so that
        a query's samples are the same whatever else is decoded with it), renormalised."""
        k = int(self.config.cot_samples)
        if k == 0:
            return cot_emb, [[] for _ in prompt_ids]
        rows = [i for i in range(len(prompt_ids)) for _ in range(k)]
        closed: dict[str, torch.Tensor] = {}
        generator = [
            torch.Generator(device=self.device).manual_seed((seeds[i] + j) % 2**63)
            for i in range(len(prompt_ids))
            for j in range(k)
        ]
        seq = self._pad([prompt_ids[i] for i in rows], grids[rows])
        steps = list(
            self._decode_steps(
                seq, _select_images(image_out, rows), self.config.max_cot_tokens, closed, generator
            )
        )
        generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in rows]
        sampled = self._finish_embedding(closed["hidden"]).cpu()
        cots = []
        for g, e in zip(generated, sampled, strict=True):
            cots.append(self._parse_generated(g))
            cots[-1].embedding = e.numpy()
        per_row = [cots[i * k : (i + 1) * k] for i in range(len(prompt_ids))]
        mean = (cot_emb + sampled.view(len(prompt_ids), k, -1).sum(1)) / (1 + k)
        return self._finish_embedding(mean), per_row

    # ------------------------------------------------------------------ inference
    def _encode_query_batch(
        self,
        images: Sequence[ImageLike],
        texts: Sequence[str],
        mode: str,
        cots: Sequence[CoT | dict[str, str] | None] | None,
        embed: bool = True,
    ) -> tuple[np.ndarray | None, list[CoT | None]]:
        """Embeddings and parsed CoTs of one batch. Fast rows and rows with a given CoT are embedded by one
        forward over prompt + answer + ``<emb>``; generated rows take their ``<emb>`` state from the decoding
        loop itself (:meth:`_decode_steps` closes them with ``<emb>``), with no second forward."""
        n = len(images)
        pixels, grids = self.images(images)
        image_out = self._image_features(pixels.to(self.device), grids.to(self.device))
        n_img = self.images.n_tokens(grids)
        parsed: list[CoT | None] = [None] * n
        out = torch.zeros((n, self.embedding_dim), dtype=torch.float32)
        if mode == "fast":
            prompt_ids = self._prompt_ids("fast", texts, n_img)
            pooled = {i: p + [self.emb_token_id] for i, p in enumerate(prompt_ids)}
        else:
            prompt_ids = self._prompt_ids("full", texts, n_img)
            pooled = {}
            given = [i for i in range(n) if cots is not None and cots[i] is not None]
            # a generated CoT handed back embeds from its own tokens, any other from its text
            as_text = [i for i in given if not getattr(cots[i], "token_ids", None)]  # type: ignore[index]
            answers = {}
            if as_text:
                answers = dict(zip(as_text, self._answer_ids([cots[i] for i in as_text]), strict=True))  # type: ignore[index,misc]
            for i in given:
                c = cots[i]  # type: ignore[index]
                answer = answers[i] if i in answers else list(c.token_ids)  # type: ignore[union-attr]
                pooled[i] = prompt_ids[i] + answer + [self.emb_token_id]
                parsed[i] = prompts.parse_cot(prompts.format_cot(c)) if isinstance(c, dict) else c
            todo = [i for i in range(n) if i not in pooled]
            if todo:
                todo_prompts = [prompt_ids[i] for i in todo]
                gen_seq = self._pad(todo_prompts, grids[todo])
                sub_out = _select_images(image_out, todo) if len(todo) < n else image_out
                closed: dict[str, torch.Tensor] | None = {} if embed else None
                steps = list(self._decode_steps(gen_seq, sub_out, self.config.max_cot_tokens, embed=closed))
                generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in todo]
                for i, g in zip(todo, generated, strict=True):
                    parsed[i] = self._parse_generated(g)
                if closed is not None:
                    cot_emb = self._finish_embedding(closed["hidden"]).cpu()
                    seeds = self._sample_seeds(pixels, grids, prompt_ids)
                    out[todo], samples = self._add_cot_samples(
                        cot_emb, todo_prompts, grids[todo], sub_out, [seeds[i] for i in todo]
                    )
                    for i, own, row_samples in zip(todo, cot_emb, samples, strict=True):
                        parsed[i].embedding, parsed[i].samples = own.numpy(), row_samples  # type: ignore[union-attr]
        if not embed:
            return None, parsed
        if pooled:
            rows = sorted(pooled)
            seq = self._pad([pooled[i] for i in rows], grids[rows])
            sub_out = _select_images(image_out, rows) if len(rows) < n else image_out
            out[rows] = self._pool(seq, sub_out).cpu()
        if mode == "full":
            out = self._blend_fast(out, texts, n_img, grids, image_out)
        return out.numpy(), parsed

    def _blend_fast(
        self, cot_emb: torch.Tensor, texts: Sequence[str], n_img: Any, grids: torch.Tensor, image_out: Any
    ) -> torch.Tensor:
        """Full mode's embeddings ``(b, d)`` from their CoT ``<emb>`` embeddings: as they are when the config's
        ``fast_weight`` is 0, else ``(1 - w) * cot + w * fast`` (renormalised), the fast rows embedded from the
        same image features by one more forward over the fast prompts."""
        w = float(self.config.fast_weight)
        if w == 0.0:
            return cot_emb
        fast_ids = [p + [self.emb_token_id] for p in self._prompt_ids("fast", texts, n_img)]
        fast = self._pool(self._pad(fast_ids, grids), image_out).cpu()
        return self._finish_embedding((1.0 - w) * cot_emb + w * fast)

    def _pool(self, seq: _Seqs, image_out: Any) -> torch.Tensor:
        """Embeddings of token sequences that end in ``<emb>`` (one forward)."""
        dev = self.device
        ids, mask = seq.input_ids.to(dev), seq.attention_mask.to(dev)
        hidden = self._hidden(ids, mask, seq.position_ids.to(dev), image_out)
        return self.extract_embedding(hidden, ids, mask)

    def encode_images(
        self, images: Sequence[ImageLike], batch_size: int = 32, show_progress_bar: bool = False
    ) -> np.ndarray:
        """Gallery embeddings: float32 ``(n, d)``, L2-normalised (when the config normalises).

        One image (a path or a PIL image) instead of a sequence gives one embedding ``(d,)``.
        """
        from circot.errors import check_batch_size
        from circot.processing import is_single_image

        check_batch_size(batch_size)
        if is_single_image(images):
            return self.encode_images([images], batch_size, show_progress_bar)[0]  # type: ignore[list-item]
        out = np.zeros((len(images), self.embedding_dim), dtype=np.float32)
        with self._inference():
            for start in _progress(range(0, len(images), batch_size), show_progress_bar, "images"):
                batch = self.build_batch(images[start : start + batch_size], mode="gallery")
                emb, _ = self.embed_batch(batch)
                out[start : start + len(emb)] = emb.cpu().numpy()
        return out

    def encode_queries(
        self,
        images: Sequence[ImageLike],
        texts: Sequence[str],
        mode: str = "full",
        batch_size: int = 16,
        return_reasoning: bool = False,
        cots: Sequence[CoT | dict[str, str] | None] | None = None,
        show_progress_bar: bool = False,
    ) -> np.ndarray | tuple[np.ndarray, list[CoT | None]]:
        """Query embeddings ``(n, d)`` float32 from reference images and modification texts.

        ``mode="full"``: generate caption → reasoning → conclusion (batched, left-padded, KV cache, stops at
        ``<emb>``; ``<emb>`` is appended if never written); the embedding is the decoding loop's state at that
        closing ``<emb>`` (equal, to float tolerance, to a forward over prompt + CoT + ``<emb>``).
        ``mode="fast"``: embed directly. ``cots``: embed from these CoTs instead of generating (entries that are
        None are generated). ``return_reasoning``: also return the parsed CoT per query (None in fast mode).
        One query (an image and a text string; ``cots`` then one CoT or None) gives one embedding ``(d,)``.
        """
        from circot.errors import check_batch_size
        from circot.processing import is_single_image

        check_batch_size(batch_size)
        if isinstance(texts, str):
            if not is_single_image(images):
                raise CircotError("one text needs one image (a path or a PIL image), not a sequence")
            one_cot = None if cots is None else [cots] if isinstance(cots, (CoT, dict)) else cots
            one_image: list[ImageLike] = [images]  # type: ignore[list-item]
            embs, parsed = self.encode_queries(
                one_image, [texts], mode, batch_size, True, one_cot, show_progress_bar
            )
            return (embs[0], parsed[0]) if return_reasoning else embs[0]
        if is_single_image(images):
            raise CircotError("one image needs one text (a string), not a sequence of texts")
        if mode not in ("full", "fast"):
            raise CircotError(f"mode must be 'full' or 'fast', not {mode!r}")
        if len(images) != len(texts):
            raise CircotError(f"{len(images)} images but {len(texts)} texts")
        if cots is not None and len(cots) != len(texts):
            raise CircotError(f"{len(cots)} CoTs for {len(texts)} queries")
        out = np.zeros((len(images), self.embedding_dim), dtype=np.float32)
        reasoning: list[CoT | None] = []
        for start in _progress(range(0, len(images), batch_size), show_progress_bar, "queries"):
            stop = start + batch_size
            with self._inference():
                emb, parsed = self._encode_query_batch(
                    images[start:stop],
                    texts[start:stop],
                    mode,
                    cots[start:stop] if cots is not None else None,
                )
            out[start : start + len(parsed)] = emb
            reasoning.extend(parsed)
        return (out, reasoning) if return_reasoning else out

    def generate_reasoning(
        self, images: Sequence[ImageLike], texts: Sequence[str], batch_size: int = 16
    ) -> list[CoT]:
        """The parsed CoT of each query (no embedding pass)."""
        if len(images) != len(texts):
            raise CircotError(f"{len(images)} images but {len(texts)} texts")
        result: list[CoT] = []
        for start in range(0, len(images), batch_size):
            with self._inference():
                _, parsed = self._encode_query_batch(
                    images[start : start + batch_size],
                    texts[start : start + batch_size],
                    "full",
                    None,
                    embed=False,
                )
            result.extend(parsed)  # type: ignore[arg-type]
        return result

    def stream_reasoning(
        self, image: ImageLike, text: str, embedding: dict[str, np.ndarray] | None = None
    ) -> Iterator[str]:
        """Yield the CoT text piece by piece as it is generated (ends before ``<emb>``).

        ``embedding``: a dict that receives ``"embedding"`` (d,) once the reasoning is complete — the state at
        the ``<emb>`` that closes it, as ``encode_queries(mode="full")`` embeds the same query — and, as that
        query's CoT carries them, ``"cot_embedding"`` (the streamed CoT's own) and ``"samples"`` (sampled CoTs). Each step runs
        under its own ``inference_mode`` (the generator may be resumed from another thread).
        """
        closed: dict[str, torch.Tensor] | None = {} if embedding is not None else None
        with self._inference():
            pixels, grids = self.images([image])
            image_out = self._image_features(pixels.to(self.device), grids.to(self.device))
            prompt_ids = self._prompt_ids("full", [text], self.images.n_tokens(grids))
            steps = self._decode_steps(
                self._pad(prompt_ids, grids), image_out, self.config.max_cot_tokens, embed=closed
            )
        tokens: list[int] = []
        sent = ""
        while True:
            with self._inference():
                token = next(steps, None)
                if closed is not None and (
                    token is None or int(token[0]) in (self.emb_token_id, *self.stop_token_ids)
                ):
                    for _ in steps:  # the closing <emb> step
                        pass
                    cot_emb = self._finish_embedding(closed["hidden"]).cpu()  # type: ignore[index]
                    seeds = self._sample_seeds(pixels, grids, prompt_ids)
                    mean, samples = self._add_cot_samples(cot_emb, prompt_ids, grids, image_out, seeds)
                    blended = self._blend_fast(mean, [text], self.images.n_tokens(grids), grids, image_out)
                    embedding["embedding"] = blended[0].numpy()  # type: ignore[index]
                    embedding["cot_embedding"] = cot_emb[0].numpy()  # type: ignore[index]
                    embedding["samples"] = samples[0]  # type: ignore[index]
            if token is None:
                return
            t = int(token[0])
            if t == self.emb_token_id or t in self.stop_token_ids:
                return
            tokens.append(t)
            text_so_far = self.tokenizer.decode(tokens, skip_special_tokens=False)
            if text_so_far.endswith("\ufffd"):  # an incomplete multi-byte character
                continue
            if len(text_so_far) > len(sent):
                yield text_so_far[len(sent) :]
                sent = text_so_far

    @contextlib.contextmanager
    def _inference(self) -> Iterator[None]:
        """Eval mode (no LoRA dropout) and inference_mode for encoding; the previous mode is restored."""
        was_training = self.training
        if was_training:
            self.eval()
        try:
            with torch.inference_mode():
                yield
        finally:
            if was_training:
                self.train()

    # ------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        directory: str | Path,
        results: dict[str, Any] | None = None,
        storage_dtype: str | torch.dtype | None = None,
    ) -> Path:
        """Write a self-describing model directory atomically.

        Contents: ``circot_config.json`` (with library versions), ``config.json`` + ``model.safetensors`` (full
        weights) or ``adapter_config.json`` + ``adapter_model.safetensors`` (LoRA + circot token rows), tokenizer
        and image-processor files, and a ``README.md`` model card (``results``: metrics to list in it).
        ``storage_dtype`` (e.g. ``"fp16"``): store the floating-point weights in that type; the config then
        records the dtype they are used in, which :meth:`from_pretrained` restores when given no dtype.
        """
        return loading.save_pretrained(self, directory, results, storage_dtype)

    def model_card(self, results: dict[str, Any] | None = None) -> str:
        """The README.md of a saved model."""
        return loading.model_card(self, results)


# ---------------------------------------------------------------------------------------------------------------
def hash_weights(h: Any, module: nn.Module) -> Any:
    """Feed every tensor of ``module``'s state dict (name, dtype, shape, bytes; sorted by name) into hash ``h``."""
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h


def _clean_cot(cot: CoT | dict[str, str]) -> dict[str, str]:
    """A CoT's fields with any special-token strings removed (the tags are added back by format_cot)."""
    get = cot.get if isinstance(cot, dict) else lambda k, d="": getattr(cot, k, d)
    return {k: prompts.strip_special_tokens(str(get(k, "") or "")) for k in prompts.COT_FIELDS}


def _image_output(features: torch.Tensor) -> Any:
    """Precomputed merged vision features (all images concatenated) as the vision tower's output object."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    return BaseModelOutputWithPooling(pooler_output=(features,))


def _select_images(image_out: Any, rows: list[int]) -> Any:
    """The vision outputs of some images of a batch (pooler_output, and Qwen3-VL's deep-stack features, are
    per-image tuples)."""
    out = type(image_out)(pooler_output=tuple(image_out.pooler_output[i] for i in rows))
    deepstack = getattr(image_out, "deepstack_features", None)
    if deepstack is not None:
        out.deepstack_features = [tuple(level[i] for i in rows) for level in deepstack]
    return out


def _progress(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from circot.progress import progress_bar

    return progress_bar(it, desc=desc)


__all__ = [
    "DEFAULT_MODEL",
    "MODES",
    "TINY_DEFAULTS",
    "CIRCoT",
    "default_model_path",
    "fused_decoder_weights",
    "tiny_hf_config",
    "_LeanDecoder",
]

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
import importlib.resources
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from circot import prompts
from circot.config import CONFIG_NAME, CIRCoTConfig, LoRASettings
from circot.errors import CircotError, ConfigError
from circot.processing import CIRCoTProcessor, ImageLike, ImagePreprocessor, make_image_processor
from circot.prompts import CoT
from circot.tokenizer import add_circot_tokens, token_id, train_bpe_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "shapes-tiny"
IGNORE_INDEX = -100
MODES = ("gallery", "fast", "full")
# the lean decoder keeps concatenated copies of the projection weights only for models this small
FUSE_MAX_PARAMETERS = 200_000_000

# transformers class per model_type. Qwen3-VL adds its deep-stack visual features to the hidden states of the
# image positions inside the first decoder layers: circot's forwards pass the vision output (with those
# features) to transformers' own forward, and its one-token decoding steps, which see text tokens only, need
# none of them.
_MODEL_CLASSES = {
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
}

# The tiny default: text hidden 128, 4 layers, 4 heads; vision depth 2, width 128, patch 14, merge 2
# (16 image tokens at 112 px). Any key can be overridden through CIRCoT.tiny(**overrides).
TINY_DEFAULTS: dict[str, Any] = {
    "model_type": "qwen2_vl",
    "vocab_size": 1024,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "vision_depth": 2,
    "vision_embed_dim": 128,
    "vision_num_heads": 4,
    "vision_mlp_ratio": 4,
    "patch_size": 14,
    "spatial_merge_size": 2,
    "temporal_patch_size": 2,
}


def default_model_path() -> Path:
    """Where the shipped tiny shapes model lives inside the package."""
    return Path(str(importlib.resources.files("circot"))) / "assets" / DEFAULT_MODEL


def _model_class(model_type: str) -> type:
    import transformers

    if model_type not in _MODEL_CLASSES:
        raise CircotError(
            f"model type {model_type!r} is not supported (supported: {', '.join(sorted(_MODEL_CLASSES))})"
        )
    return getattr(transformers, _MODEL_CLASSES[model_type])


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into (temporal, height, width) like Qwen's [16, 24, 24] for 128."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_hf_config(vocab_size: int, token_ids: dict[str, int], **overrides: Any) -> Any:
    """A small ``Qwen2VLConfig`` / ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` built from :data:`TINY_DEFAULTS` and
    ``overrides``."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig, Qwen3VLConfig

    o = {**TINY_DEFAULTS, **overrides}
    unknown = sorted(set(overrides) - set(TINY_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown tiny model option(s): {', '.join(unknown)}")
    head_dim = o["hidden_size"] // o["num_attention_heads"]
    text = {
        "vocab_size": vocab_size,
        "hidden_size": o["hidden_size"],
        "intermediate_size": o["intermediate_size"],
        "num_hidden_layers": o["num_hidden_layers"],
        "num_attention_heads": o["num_attention_heads"],
        "num_key_value_heads": o["num_key_value_heads"],
        "max_position_embeddings": o["max_position_embeddings"],
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": o["rope_theta"],
            "mrope_section": _mrope_section(head_dim),
        },
        "bos_token_id": token_ids[prompts.PAD_TOKEN],
        "eos_token_id": token_ids[prompts.IM_END],
        "pad_token_id": token_ids[prompts.PAD_TOKEN],
    }
    common = {
        "image_token_id": token_ids[prompts.IMAGE_PAD],
        "video_token_id": token_ids["<|video_pad|>"],
        "vision_start_token_id": token_ids[prompts.VISION_START],
        "vision_end_token_id": token_ids[prompts.VISION_END],
        "tie_word_embeddings": o["tie_word_embeddings"],
    }
    vision_common = {
        "depth": o["vision_depth"],
        "num_heads": o["vision_num_heads"],
        "patch_size": o["patch_size"],
        "spatial_merge_size": o["spatial_merge_size"],
        "temporal_patch_size": o["temporal_patch_size"],
    }
    if o["model_type"] == "qwen2_vl":
        vision = {
            **vision_common,
            "embed_dim": o["vision_embed_dim"],
            "hidden_size": o["hidden_size"],
            "mlp_ratio": o["vision_mlp_ratio"],
        }
        return Qwen2VLConfig(text_config=text, vision_config=vision, **common)
    if o["model_type"] == "qwen2_5_vl":
        vision = {
            **vision_common,
            "hidden_size": o["vision_embed_dim"],
            "intermediate_size": o["vision_embed_dim"] * o["vision_mlp_ratio"],
            "out_hidden_size": o["hidden_size"],
            "window_size": o["patch_size"] * o["spatial_merge_size"] * 2,
            "fullatt_block_indexes": [o["vision_depth"] - 1],
        }
        return Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
    if o["model_type"] == "qwen3_vl":
        # interleaved multimodal rotary sections and QK-norm in the text model; deep-stack features taken from
        # vision layers spread over the tower (Qwen3-VL-2B: 24 layers, indexes 5, 11, 17)
        depth = o["vision_depth"]
        text["head_dim"] = head_dim
        text["rope_parameters"] = {**text["rope_parameters"], "mrope_interleaved": True}
        vision = {
            **vision_common,
            "hidden_size": o["vision_embed_dim"],
            "intermediate_size": o["vision_embed_dim"] * o["vision_mlp_ratio"],
            "out_hidden_size": o["hidden_size"],
            "num_position_embeddings": 64,
            "deepstack_visual_indexes": sorted({max(0, depth // 2 - 1), depth - 1}),
        }
        return Qwen3VLConfig(text_config=text, vision_config=vision, **common)
    raise ConfigError(
        f"tiny model_type must be 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl', got {o['model_type']!r}"
    )


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
        """A random tiny Qwen2-VL (or ``model_type="qwen2_5_vl"``) with a BPE tokenizer trained on a corpus.

        ``tokenizer_corpus`` defaults to the shapes world's :func:`circot.data.shapes.corpus`. ``overrides``: keys
        of :data:`TINY_DEFAULTS` (architecture) or fields of :class:`CIRCoTConfig`. Images are resized to a fixed
        ``image_size``² pixels (16 image tokens at 112 px with patch 14, merge 2). ``tokenizer``: use this
        tokenizer (e.g. the real Qwen BPE, :func:`circot.tokenizer.qwen_tokenizer_from_tiktoken`) instead of
        training one.
        """
        from dataclasses import fields

        cfg_names = {f.name for f in fields(CIRCoTConfig)}
        cfg_over = {k: v for k, v in overrides.items() if k in cfg_names and k != "model_type"}
        arch_over = {k: v for k, v in overrides.items() if k not in cfg_over}
        if tokenizer is None and tokenizer_corpus is None:
            try:
                from circot.data.shapes import corpus as shapes_corpus
            except ImportError:
                raise CircotError(
                    "no tokenizer corpus given and circot.data.shapes.corpus is unavailable"
                ) from None
            tokenizer_corpus = shapes_corpus()
        arch = {**TINY_DEFAULTS, **arch_over}
        if tokenizer is None:
            tokenizer = train_bpe_tokenizer(tokenizer_corpus, vocab_size=vocab_size or arch["vocab_size"])
        else:
            add_circot_tokens(tokenizer)
        ids = tokenizer.get_vocab()
        hf_config = tiny_hf_config(len(tokenizer), ids, **arch_over)
        torch.manual_seed(seed)
        model = _model_class(arch["model_type"])(hf_config)
        model.eval()
        pixels = image_size * image_size
        config = CIRCoTConfig(
            base_model="tiny", model_type=arch["model_type"], min_pixels=pixels, max_pixels=pixels, **cfg_over
        )
        image_processor = make_image_processor(
            pixels, pixels, arch["patch_size"], arch["spatial_merge_size"], arch["temporal_patch_size"]
        )
        return cls(model, tokenizer, image_processor, config)

    @classmethod
    def from_pretrained(
        cls,
        id_or_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        config: CIRCoTConfig | None = None,
        **overrides: Any,
    ) -> CIRCoT:
        """Load a circot model directory, or start from a Qwen2-VL / Qwen2.5-VL checkpoint (hub id or path).

        ``None`` or ``"shapes-tiny"``: the tiny shapes model shipped in the package. A circot directory (with
        ``circot_config.json``) holds full weights or a LoRA adapter over ``base_model``. A plain checkpoint gets
        circot's tokens added (embeddings resized) and a new config (``config`` / ``overrides``, e.g.
        ``lora=LoRASettings()``). ``dtype``: ``"bf16"``, ``"fp16"``, ``"fp32"`` or a torch dtype.
        """
        torch_dtype = _resolve_dtype(dtype)
        if id_or_path is None or str(id_or_path) == DEFAULT_MODEL:
            path = default_model_path()
            if not (path / CONFIG_NAME).is_file():
                raise CircotError(
                    f"the shipped model {DEFAULT_MODEL!r} is missing ({path}); train it with `circot train` "
                    "or pass a model directory"
                )
            id_or_path = path
        path = Path(id_or_path)
        if (path / CONFIG_NAME).is_file():
            model = cls._load_circot_dir(path, torch_dtype, config, overrides)
        elif path.exists() and not (path / "config.json").is_file():
            raise CircotError(f"{path}: not a model directory (no {CONFIG_NAME} or config.json)")
        else:
            model = cls._load_base(str(id_or_path), torch_dtype, config, overrides)
        return model.to(device)

    @classmethod
    def _load_circot_dir(
        cls, path: Path, dtype: torch.dtype | None, config: CIRCoTConfig | None, overrides: dict[str, Any]
    ) -> CIRCoT:
        from transformers import AutoTokenizer

        saved = CIRCoTConfig.load(path)
        cfg = config or saved
        if dtype is None and saved.compute_dtype is not None:
            dtype = _resolve_dtype(saved.compute_dtype)
        if overrides:
            cfg = cfg.replace(**overrides)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        add_circot_tokens(tokenizer)
        image_processor = _load_image_processor(path)
        if (path / "adapter_config.json").is_file():
            from peft import PeftModel

            base = _load_hf_model(saved.base_model, dtype)
            _resize_for_tokenizer(base, tokenizer)
            peft_model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
            peft_model.eval()
            return cls(peft_model, tokenizer, image_processor, cfg)
        hf = _load_hf_model(str(path), dtype)
        hf.eval()
        if cfg.lora is not None:  # LoRA over these weights: they are the adapter's base
            cfg = cfg.replace(base_model=str(path.resolve()))
        self = cls(hf, tokenizer, image_processor, cfg)
        if cfg.lora is not None:
            self.enable_lora(cfg.lora)
        return self

    @classmethod
    def _load_base(
        cls,
        id_or_path: str,
        dtype: torch.dtype | None,
        config: CIRCoTConfig | None,
        overrides: dict[str, Any],
    ) -> CIRCoT:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(id_or_path)
        except (OSError, ValueError) as exc:
            raise CircotError(f"{id_or_path}: cannot load a tokenizer ({str(exc).splitlines()[0]})") from None
        hf = _load_hf_model(id_or_path, dtype)
        new = [t for t in prompts.SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
        added = add_circot_tokens(tokenizer)
        _resize_for_tokenizer(hf, tokenizer, init_new=[token_id(tokenizer, t) for t in new])
        logger.info("added %d tokens to %s", added, id_or_path)
        cfg = (config or CIRCoTConfig()).replace(
            base_model=id_or_path, model_type=hf.config.model_type, **overrides
        )
        image_processor = _load_image_processor(id_or_path, cfg.min_pixels, cfg.max_pixels)
        hf.eval()
        self = cls(hf, tokenizer, image_processor, cfg)
        if cfg.lora is not None:
            self.enable_lora(cfg.lora)
        return self

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
        h.update(json.dumps(cfg, sort_keys=True).encode())
        h.update(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode())
        for name, tensor in sorted(self.model.state_dict().items()):
            t = tensor.detach().to("cpu").contiguous()
            h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
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
            prompts.render_prompt(
                prompts.prompt_instruction(mode, None if t is None else prompts.strip_special_tokens(t)),
                n,
                self.config.system_prompt,
            )
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

    def embed_batch(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Differentiable embeddings ``(b, d)`` (L2-normalised if the config says so) and the logits.

        Logits ``(b, L, V)`` aligned with ``batch["labels"]`` (shift them for next-token CE) are computed only
        when some label is not -100; otherwise None.
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

    def _next_token(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.index_fill(-1, self._banned_ids.to(logits.device), float("-inf"))
        if not self.config.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits.float() / self.config.sampling_temperature, dim=-1)
        if self.config.top_p < 1.0:
            sorted_p, order = probs.sort(dim=-1, descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < self.config.top_p
            sorted_p = sorted_p * keep
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        return torch.multinomial(probs, 1).squeeze(-1)

    def _decode_steps(
        self, seq: _Seqs, image_out: Any, max_new: int, embed: dict[str, torch.Tensor] | None = None
    ) -> Iterator[torch.Tensor]:
        """Greedy (or sampled) decoding with the KV cache; yields the (b,) next tokens until all rows stop.

        The prompt is prefilled by the transformers model; the one-token steps run through
        :class:`_LeanDecoder` (same modules and weights, without transformers' per-call machinery) when the
        text decoder allows it, else through the transformers forward.

        ``embed``: a dict that receives ``"hidden"`` (b, hidden), each row's last-layer state at its closing
        ``<emb>`` (or just before it, by the extraction rule) — the state a forward over prompt + answer would
        give there, with the answer closed as :func:`circot.prompts.close_with_emb` closes it: a row that stops
        gets ``<emb>`` fed in place of its stop token, and a row that runs out of tokens gets it fed after its
        last one. So full mode needs no second forward.
        """
        dev = self.device
        ids, mask, pos = seq.input_ids.to(dev), seq.attention_mask.to(dev), seq.position_ids.to(dev)
        out = self._lm(ids, mask, pos, image_out, use_cache=True)
        cache, hidden = out.cache, out.last_hidden_state[:, -1]
        next_pos = pos.amax(dim=(0, 2)) + 1  # (b,)
        stops = torch.tensor((self.emb_token_id, *self.stop_token_ids), device=dev)
        done = torch.zeros(ids.shape[0], dtype=torch.bool, device=dev)
        ones = torch.ones((ids.shape[0], 1), dtype=mask.dtype, device=dev)
        closing = embed is not None
        before = closing and self.config.extraction == "before_emb"
        state = torch.zeros_like(hidden) if closing else None
        lean = (
            _LeanDecoder(self.hf, cache, mask, max_new + int(closing), self._fused_weights())
            if self.lean_decoding and _LeanDecoder.supports(self.hf) and _LeanDecoder.cache_supported(cache)
            else None
        )
        for step in range(max_new + int(closing)):
            if step < max_new:
                token = self._next_token(self.hf.lm_head(hidden))
                token = torch.where(done, torch.full_like(token, self.pad_token_id), token)
                yield token
                finishing = ~done & torch.isin(token, stops)
            else:  # out of tokens: close with <emb>
                token = torch.full_like(token, self.pad_token_id)
                finishing = ~done
            done = done | finishing
            if not closing:
                if bool(done.all()) or step == max_new - 1:
                    return
            else:
                if before:
                    state[finishing] = hidden[finishing]
                if bool(done.all()) and (before or not bool(finishing.any())):
                    break
                token = torch.where(finishing, torch.full_like(token, self.emb_token_id), token)
            if lean is not None:
                hidden = lean.step(token, next_pos)
            else:
                mask = torch.cat([mask, ones], dim=1)
                step_pos = next_pos.view(1, -1, 1).expand(3, -1, 1)
                out = self._lm(token[:, None], mask, step_pos, cache=cache, use_cache=True)
                cache, hidden = out.cache, out.last_hidden_state[:, -1]
            next_pos = next_pos + 1
            if closing and not before:
                state[finishing] = hidden[finishing]
                if bool(done.all()):
                    break
        if closing:
            embed["hidden"] = state

    def _fused_weights(self) -> list | None:
        """Concatenated q|k|v and gate|up weights for the lean decoder (small models only; cached until the
        weights change)."""
        if self.num_parameters() > FUSE_MAX_PARAMETERS:
            return None
        version = sum(p._version for p in self.model.parameters())
        if self._fused is None or self._fused[0] != version:
            self._fused = (version, fused_decoder_weights(self.hf.model.language_model))
        return self._fused[1]

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
            as_text = [i for i in given if not getattr(cots[i], "token_ids", None)]  # type: ignore[index]
            texts_ids = (
                dict(zip(as_text, self._answer_ids([cots[i] for i in as_text]), strict=True))
                if as_text
                else {}
            )  # type: ignore[index,misc]
            for i in given:
                c = cots[i]  # type: ignore[index]
                answer = texts_ids[i] if i in texts_ids else list(c.token_ids)  # type: ignore[union-attr]
                pooled[i] = prompt_ids[i] + answer + [self.emb_token_id]
                parsed[i] = prompts.parse_cot(prompts.format_cot(c)) if isinstance(c, dict) else c
            todo = [i for i in range(n) if i not in pooled]
            if todo:
                gen_seq = self._pad([prompt_ids[i] for i in todo], grids[todo])
                sub_out = _select_images(image_out, todo) if len(todo) < n else image_out
                closed: dict[str, torch.Tensor] | None = {} if embed else None
                steps = list(self._decode_steps(gen_seq, sub_out, self.config.max_cot_tokens, embed=closed))
                generated = torch.stack(steps, dim=1).tolist() if steps else [[] for _ in todo]
                for i, g in zip(todo, generated, strict=True):
                    emitted = _cut_at(g, self.emb_token_id, self.stop_token_ids)
                    text = self.tokenizer.decode(emitted, skip_special_tokens=False)
                    parsed[i] = prompts.parse_cot(text, require_emb=True)
                    parsed[i].token_ids = prompts.close_with_emb(g, self.emb_token_id, self.stop_token_ids)[
                        :-1
                    ]
                if closed is not None:
                    out[todo] = self._finish_embedding(closed["hidden"]).cpu()
        if not embed:
            return None, parsed
        if pooled:
            rows = sorted(pooled)
            seq = self._pad([pooled[i] for i in rows], grids[rows])
            sub_out = _select_images(image_out, rows) if len(rows) < n else image_out
            out[rows] = self._pool(seq, sub_out).cpu()
        return out.numpy(), parsed

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
        the ``<emb>`` that closes it, as ``encode_queries(mode="full")`` embeds the same query. Each step runs
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
                    embedding["embedding"] = self._finish_embedding(closed["hidden"])[0].cpu().numpy()  # type: ignore[index]
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
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        store = _resolve_dtype(storage_dtype)
        config = self.config
        if store is not None and store != self.dtype:
            config = config.replace(compute_dtype=str(self.dtype).removeprefix("torch."))
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            with _quiet_transformers():
                self.model.save_pretrained(str(tmp))
            self.processor.save_pretrained(str(tmp))
            config.save(tmp / CONFIG_NAME, extra={"versions": _versions()})
            stored = self
            if config is not self.config:
                _cast_safetensors(tmp, store)
                stored = type(self).from_pretrained(tmp, device="cpu")  # the card describes what was stored
            (tmp / "README.md").write_text(stored.model_card(results), encoding="utf-8")
            from circot.fileops import replace_directory

            for written in tmp.iterdir():  # on disk before the swap makes them the model
                if written.is_file():
                    with open(written, "rb") as fh:
                        os.fsync(fh.fileno())
            replace_directory(tmp, directory)  # the old model stays in place until the new one is complete
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved model to %s", directory)
        return directory

    def model_card(self, results: dict[str, Any] | None = None) -> str:
        """The README.md of a saved model."""
        cfg = self.config
        hf_cfg = self.hf.config
        text_cfg, vis_cfg = hf_cfg.text_config, hf_cfg.vision_config
        lines = [
            "---",
            "library_name: circot",
            "tags: [composed-image-retrieval, chain-of-thought, qwen2-vl]",
            "---",
            "",
            "# CIR-CoT model",
            "",
            "A composed image retrieval model: given a reference image and a modification text it writes",
            "`<caption>…</caption><reasoning>…</reasoning><conclusion>…</conclusion>` and then `<emb>`, whose",
            "last-layer hidden state is the query embedding. Gallery images are embedded by answering `<emb>` to",
            f'"{cfg.gallery_instruction}".',
            "",
            "## Usage",
            "",
            "```python",
            "from circot.model import CIRCoT",
            "model = CIRCoT.from_pretrained('path/to/this/folder')",
            "gallery = model.encode_images(image_paths)",
            "queries, cots = model.encode_queries(reference_paths, texts, mode='full', return_reasoning=True)",
            "scores = queries @ gallery.T",
            "```",
            "",
            "## Model",
            "",
            f"- base: `{cfg.base_model}` ({hf_cfg.model_type}); weights: {'LoRA adapter' if self.is_lora else 'full'}",
            f"- parameters: {self.num_parameters():,}; embedding dim: {self.embedding_dim}",
            f"- text: hidden {text_cfg.hidden_size}, {text_cfg.num_hidden_layers} layers, "
            f"{text_cfg.num_attention_heads} heads; vocabulary {len(self.tokenizer)}",
            f"- vision: depth {vis_cfg.depth}, patch {vis_cfg.patch_size}, merge {vis_cfg.spatial_merge_size}; "
            f"pixels {cfg.min_pixels}–{cfg.max_pixels}",
            f"- embedding: {cfg.extraction}, normalised: {cfg.normalize}, temperature {cfg.temperature}",
            f"- max CoT tokens: {cfg.max_cot_tokens}; sampling: {cfg.do_sample}; prompt version {cfg.prompt_version}",
            f"- fingerprint: `{self.fingerprint}`",
            "",
        ]
        if results:
            lines += ["## Results", "", "| metric | value |", "|---|---|"]
            for k, v in results.items():
                lines.append(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
            lines.append("")
        lines += ["## Versions", ""] + [f"- {k}: {v}" for k, v in _versions().items()] + [""]
        return "\n".join(lines)


class _LeanDecoder:
    """One-token decoding steps of a Qwen2-VL / Qwen2.5-VL text decoder over a preallocated KV cache.

    Calls the model's own modules (norms, projections, MLPs — LoRA-wrapped or not) and does the attention
    with one ``scaled_dot_product_attention``; it skips transformers' mask building, output capturing and cache
    bookkeeping, which dominate the cost of a step for small models. For text tokens the three multimodal
    rotary sections share one position, so the rotary embedding is the ordinary one at that position.
    """

    _CLASSES = ("Qwen2VLTextModel", "Qwen2_5_VLTextModel")

    @classmethod
    def supports(cls, hf: nn.Module) -> bool:
        """Whether the text decoder is one this class knows and has every internal it reads (transformers'
        module layout changes between releases; without them decoding uses transformers' own forward)."""
        lm = getattr(getattr(hf, "model", None), "language_model", None)
        if lm is None or type(lm).__name__ not in cls._CLASSES or lm.training:
            return False
        cfg = lm.config
        if not all(t == "full_attention" for t in getattr(cfg, "layer_types", ["?"])):
            return False
        if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
            return False
        rotary, layers = getattr(lm, "rotary_emb", None), getattr(lm, "layers", None)
        if not (hasattr(rotary, "inv_freq") and hasattr(rotary, "attention_scaling") and layers):
            return False
        if not all(hasattr(getattr(lm, n, None), "weight") for n in ("embed_tokens", "norm")):
            return False
        layer = layers[0]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        need = [(attn, ("q_proj", "k_proj", "v_proj", "o_proj", "scaling")), (mlp, ("act_fn", "down_proj"))]
        need += [(layer, ("input_layernorm", "post_attention_layernorm"))]
        return all(hasattr(m, a) for m, names in need for a in names)

    @staticmethod
    def cache_supported(cache: Any) -> bool:
        """A prefill cache with per-layer ``keys`` / ``values`` tensors (transformers 5's ``DynamicCache``)."""
        layers = getattr(cache, "layers", None)
        return bool(layers) and all(
            torch.is_tensor(getattr(layer, "keys", None)) and torch.is_tensor(getattr(layer, "values", None))
            for layer in layers
        )

    def __init__(
        self, hf: nn.Module, cache: Any, mask: torch.Tensor, max_new: int, fused: list | None = None
    ) -> None:
        lm = hf.model.language_model
        self.lm = lm
        self.fused = fused if fused is not None else [None] * len(lm.layers)
        cfg = lm.config
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        self.inv_freq = lm.rotary_emb.inv_freq
        self.rope_scale = lm.rotary_emb.attention_scaling
        b, length = mask.shape
        total = length + max_new
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for layer in cache.layers:
            k, v = layer.keys, layer.values  # (b, kv heads, length, head_dim)
            kb = k.new_zeros(b, k.shape[1], total, k.shape[3])
            vb = v.new_zeros(b, v.shape[1], total, v.shape[3])
            kb[:, :, :length] = k
            vb[:, :, :length] = v
            self.keys.append(kb)
            self.values.append(vb)
        self.mask = torch.zeros(b, 1, 1, total, dtype=torch.bool, device=mask.device)
        self.mask[:, 0, 0, :length] = mask.bool()
        self.length = length

    def step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Feed ``token`` (b,) at rotary ``position`` (b,); returns the final-norm hidden state (b, hidden)."""
        lm, b, hd, nh, nkv = self.lm, token.shape[0], self.head_dim, self.n_heads, self.n_kv
        x = lm.embed_tokens(token[:, None])
        freqs = position[:, None].float() * self.inv_freq.to(x.device)
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, None, :]  # (b, 1, 1, hd)
        cos = (angles.cos() * self.rope_scale).to(x.dtype)
        sin = (angles.sin() * self.rope_scale).to(x.dtype)
        t = self.length
        self.mask[:, :, :, t] = True
        mask = self.mask[:, :, :, : t + 1]
        for i, layer in enumerate(lm.layers):
            attn, fused = layer.self_attn, self.fused[i]
            h = self._norm(layer.input_layernorm, x)
            if fused is not None:
                qkv = F.linear(h, fused[0], fused[1]).view(b, 1, nh + 2 * nkv, hd)
            else:
                qkv = torch.cat((attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)), dim=-1).view(
                    b, 1, nh + 2 * nkv, hd
                )
            qk = qkv[:, :, : nh + nkv]
            qk = qk * cos + _rotate_half(qk) * sin  # (b, 1, heads, hd): rotary on queries and keys at once
            q = qk[:, :, :nh].transpose(1, 2)
            self.keys[i][:, :, t] = qk[:, 0, nh:]
            self.values[i][:, :, t] = qkv[:, 0, nh + nkv :]
            o = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, : t + 1],
                self.values[i][:, :, : t + 1],
                attn_mask=mask,
                scale=attn.scaling,
                enable_gqa=nh != nkv,
            )
            x = x + attn.o_proj(o.transpose(1, 2).reshape(b, 1, nh * hd))
            h = self._norm(layer.post_attention_layernorm, x)
            mlp = layer.mlp
            if fused is not None:
                gate, up = F.linear(h, fused[2]).chunk(2, dim=-1)
                x = x + mlp.down_proj(mlp.act_fn(gate) * up)
            else:
                x = x + mlp(h)
        self.length = t + 1
        return self._norm(lm.norm, x)[:, 0]

    @staticmethod
    def _norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op; transformers' RMSNorm computes the same in float32
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)
        return norm(x)


def fused_decoder_weights(
    lm: nn.Module,
) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None]:
    """Per layer (q|k|v weight, q|k|v bias, gate|up weight) concatenated, or None where a projection is not a
    plain ``nn.Linear`` (e.g. LoRA-wrapped)."""
    out: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None] = []
    for layer in lm.layers:
        a, m = layer.self_attn, layer.mlp
        projs = (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj)
        if any(type(p) is not nn.Linear for p in projs) or m.gate_proj.bias is not None:
            out.append(None)
            continue
        with torch.no_grad():
            w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
            bias = torch.cat(biases) if all(x is not None for x in biases) else None
            if bias is None and any(x is not None for x in biases):
                out.append(None)
                continue
            gu = torch.cat([m.gate_proj.weight, m.up_proj.weight])
        out.append((w, bias, gu))
    return out


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# ---------------------------------------------------------------------------------------------------------------
def _clean_cot(cot: CoT | dict[str, str]) -> dict[str, str]:
    """A CoT's fields with any special-token strings removed (the tags are added back by format_cot)."""
    get = cot.get if isinstance(cot, dict) else lambda k, d="": getattr(cot, k, d)
    return {k: prompts.strip_special_tokens(str(get(k, "") or "")) for k in prompts.COT_FIELDS}


def _cut_at(generated: list[int], emb_id: int, stop_ids: Sequence[int]) -> list[int]:
    """Generated ids up to the first ``<emb>`` (kept) or stop token (dropped)."""
    for i, t in enumerate(generated):
        if t == emb_id:
            return generated[: i + 1]
        if t in stop_ids:
            return generated[:i]
    return generated


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


def _resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    if dtype not in names:
        raise CircotError(f"dtype must be one of {', '.join(names)}, got {dtype!r}")
    return names[dtype]


def _cast_safetensors(directory: Path, dtype: torch.dtype) -> None:
    """Rewrite every ``*.safetensors`` file of ``directory`` with its floating-point tensors cast to ``dtype``."""
    from safetensors.torch import load_file, save_file

    for file in directory.glob("*.safetensors"):
        tensors = load_file(str(file))
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
        save_file(cast, str(file), metadata={"format": "pt"})


def _load_hf_model(id_or_path: str, dtype: torch.dtype | None) -> nn.Module:
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(id_or_path)
    except (OSError, ValueError) as exc:
        raise CircotError(f"{id_or_path}: cannot load a model config ({str(exc).splitlines()[0]})") from None
    cls = _model_class(hf_config.model_type)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with _quiet_transformers():
        return cls.from_pretrained(id_or_path, **kwargs)


def _load_image_processor(
    path: str | Path, min_pixels: int | None = None, max_pixels: int | None = None
) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    kwargs: dict[str, Any] = {}
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    try:
        return Qwen2VLImageProcessorPil.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise CircotError(f"{path}: cannot load the image processor ({str(exc).splitlines()[0]})") from None


def _resize_for_tokenizer(hf: nn.Module, tokenizer: Any, init_new: list[int] | None = None) -> None:
    """Grow the embeddings (and an untied LM head) to the tokenizer; new circot rows start at the mean row."""
    emb = hf.get_input_embeddings()
    old = emb.weight.shape[0]
    if len(tokenizer) > old:
        hf.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    if not init_new:
        return
    with torch.no_grad():
        for layer in (hf.get_input_embeddings(), hf.get_output_embeddings()):
            if layer is None:
                continue
            w = layer.weight
            mean = w[: min(old, w.shape[0])].float().mean(0).to(w.dtype)
            for i in init_new:
                w[i] = mean


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No transformers progress bars (loading a few-MB model should not draw bars)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _versions() -> dict[str, str]:
    import transformers

    import circot

    out = {"circot": circot.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import peft

        out["peft"] = peft.__version__
    except ImportError:
        pass
    return out


def _progress(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc)

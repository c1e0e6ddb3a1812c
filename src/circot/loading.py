"""Building, loading and saving CIR-CoT models: what ``CIRCoT.tiny``, ``CIRCoT.from_pretrained`` and
``CIRCoT.save_pretrained`` do.

A tiny random Qwen2-VL / Qwen2.5-VL / Qwen3-VL from a config (the shapes world's default model and the tests'
models), a circot model directory (full weights or a LoRA adapter over its base), or a plain Qwen-VL checkpoint
by hub id or path (circot's tokens are added); and the atomic, self-describing model directory they are saved to.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from circot import prompts
from circot.config import CONFIG_NAME, CIRCoTConfig
from circot.errors import CircotError, ConfigError
from circot.processing import make_image_processor
from circot.tokenizer import add_circot_tokens, token_id, train_bpe_tokenizer

logger = logging.getLogger("circot.model")

DEFAULT_MODEL = "shapes-tiny"

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


def build_tiny(
    cls: type,
    tokenizer_corpus: Iterable[str] | None = None,
    image_size: int = 112,
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer: Any = None,
    **overrides: Any,
) -> Any:
    """What :meth:`circot.model.CIRCoT.tiny` does (its docstring has the options)."""
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


def build_from_config(
    cls: type,
    hf_config: str | Path | dict[str, Any],
    dtype: str | torch.dtype | None = "bfloat16",
    image_size: int = 224,
    seed: int = 0,
    tokenizer: Any = None,
    **overrides: Any,
) -> Any:
    """What :meth:`circot.model.CIRCoT.from_config` does (its docstring has the options)."""
    import json

    from transformers import AutoConfig
    from transformers.initialization import no_init_weights

    source = str(hf_config) if not isinstance(hf_config, dict) else "the given config"
    if not isinstance(hf_config, dict):
        try:
            hf_config = json.loads(Path(hf_config).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{source}: cannot read a model config ({exc})") from None
    data = dict(hf_config)
    model_type = data.pop("model_type", None)
    cls_model = _model_class(str(model_type))
    if tokenizer is None:
        from circot.data.shapes import corpus as shapes_corpus

        tokenizer = train_bpe_tokenizer(shapes_corpus(), vocab_size=TINY_DEFAULTS["vocab_size"])
    else:
        add_circot_tokens(tokenizer)
    ids = tokenizer.get_vocab()
    # the published shapes, with this tokenizer's ids for the tokens the model reads
    data.update(
        image_token_id=ids[prompts.IMAGE_PAD],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids[prompts.VISION_START],
        vision_end_token_id=ids[prompts.VISION_END],
    )
    specials = {
        "bos_token_id": ids[prompts.PAD_TOKEN],
        "eos_token_id": ids[prompts.IM_END],
        "pad_token_id": ids[prompts.PAD_TOKEN],
    }
    data.update(specials)
    if isinstance(data.get("text_config"), dict):
        data["text_config"] = {**data["text_config"], **specials}
    config = AutoConfig.for_model(model_type, **data)
    text = config.get_text_config()
    if len(tokenizer) > text.vocab_size:
        raise ConfigError(
            f"{source}: vocab_size {text.vocab_size} is smaller than the tokenizer ({len(tokenizer)})"
        )
    torch_dtype = _resolve_dtype(dtype) or torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch_dtype)
    try:
        with no_init_weights():  # allocated, not initialised: filled below at memcpy speed
            hf = cls_model(config)
    finally:
        torch.set_default_dtype(previous)
    _fill_random(hf, seed, float(getattr(text, "initializer_range", 0.02)))
    hf.tie_weights()
    hf.eval()
    vision = config.vision_config
    pixels = image_size * image_size
    cfg = CIRCoTConfig(
        base_model=source, model_type=str(model_type), min_pixels=pixels, max_pixels=pixels, **overrides
    )
    image_processor = make_image_processor(
        pixels, pixels, vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    )
    self = cls(hf, tokenizer, image_processor, cfg)
    if cfg.lora is not None:
        self.enable_lora(cfg.lora)
    return self


def _fill_random(model: nn.Module, seed: int, std: float) -> None:
    """Random weights without a random draw per element: matrices tile one normal(0, std) pool (its length is
    prime, so rows do not repeat in step); norm weights are one, biases zero."""
    gen = torch.Generator().manual_seed(seed)
    pool_len = 1_048_573
    with torch.no_grad():
        pool = torch.randn(pool_len, generator=gen).mul_(std)
        for name, p in model.named_parameters():
            flat = p.view(-1)
            if p.dim() == 1:
                flat.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
                continue
            src = pool.to(p.dtype)
            for start in range(0, flat.numel(), pool_len):
                n = min(pool_len, flat.numel() - start)
                flat[start : start + n].copy_(src[:n])
        for name, b in model.named_buffers():  # computed in __init__ (rotary frequencies), never left empty
            if b.is_floating_point() and not torch.isfinite(b).all():
                raise CircotError(f"buffer {name} is not finite after building the model")


def load_pretrained(
    cls: type,
    id_or_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    config: CIRCoTConfig | None = None,
    **overrides: Any,
) -> Any:
    """What :meth:`circot.model.CIRCoT.from_pretrained` does (its docstring has the options)."""
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
        model = _load_circot_dir(cls, path, torch_dtype, config, overrides)
    elif path.exists() and not (path / "config.json").is_file():
        raise CircotError(f"{path}: not a model directory (no {CONFIG_NAME} or config.json)")
    else:
        model = _load_base(cls, str(id_or_path), torch_dtype, config, overrides)
    return model.to(device)


def _load_circot_dir(
    cls: type, path: Path, dtype: torch.dtype | None, config: CIRCoTConfig | None, overrides: dict[str, Any]
) -> Any:
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


def _load_base(
    cls: type,
    id_or_path: str,
    dtype: torch.dtype | None,
    config: CIRCoTConfig | None,
    overrides: dict[str, Any],
) -> Any:
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


def save_pretrained(
    model: Any,
    directory: str | Path,
    results: dict[str, Any] | None = None,
    storage_dtype: str | torch.dtype | None = None,
) -> Path:
    """What :meth:`circot.model.CIRCoT.save_pretrained` does (its docstring lists the files)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    store = _resolve_dtype(storage_dtype)
    config = model.config
    if store is not None and store != model.dtype:
        config = config.replace(compute_dtype=str(model.dtype).removeprefix("torch."))
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        with _quiet_transformers():
            model.model.save_pretrained(str(tmp))
        model.processor.save_pretrained(str(tmp))
        config.save(tmp / CONFIG_NAME, extra={"versions": _versions()})
        stored = model
        if config is not model.config:
            _cast_safetensors(tmp, store)
            stored = type(model).from_pretrained(tmp, device="cpu")  # the card describes what was stored
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


def model_card(model: Any, results: dict[str, Any] | None = None) -> str:
    """The README.md of a saved model."""
    cfg = model.config
    hf_cfg = model.hf.config
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
        "",
        'model = CIRCoT.from_pretrained("path/to/this/folder")',
        "gallery = model.encode_images(image_paths)",
        'queries, cots = model.encode_queries(reference_paths, texts, mode="full", return_reasoning=True)',
        "scores = queries @ gallery.T",
        "```",
        "",
        "## Model",
        "",
        f"- base: `{cfg.base_model}` ({hf_cfg.model_type}); weights: {'LoRA adapter' if model.is_lora else 'full'}",
        f"- parameters: {model.num_parameters():,}; embedding dim: {model.embedding_dim}",
        f"- text: hidden {text_cfg.hidden_size}, {text_cfg.num_hidden_layers} layers, "
        f"{text_cfg.num_attention_heads} heads; vocabulary {len(model.tokenizer)}",
        f"- vision: depth {vis_cfg.depth}, patch {vis_cfg.patch_size}, merge {vis_cfg.spatial_merge_size}; "
        f"pixels {cfg.min_pixels}–{cfg.max_pixels}",
        f"- embedding: {cfg.extraction}, normalised: {cfg.normalize}, temperature {cfg.temperature}; full mode "
        f"blends in the fast embedding with weight {cfg.fast_weight}"
        + (
            f" and averages {cfg.cot_samples} CoTs sampled at temperature {cfg.sampling_temperature} into the "
            "greedy one's"
            + (
                "; it shows the CoT whose own embedding best matches a gallery image"
                if cfg.cot_choice == "gallery"
                else ""
            )
            if cfg.cot_samples
            else ""
        ),
        f"- max CoT tokens: {cfg.max_cot_tokens}; sampling: {cfg.do_sample}; prompt version {cfg.prompt_version}",
        f"- fingerprint: `{model.fingerprint}`",
        "",
    ]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        for k, v in results.items():
            lines.append(f"| {k} | {v:.2f} |" if isinstance(v, float) else f"| {k} | {v} |")
        lines.append("")
    lines += ["## Versions", ""] + [f"- {k}: {v}" for k, v in _versions().items()] + [""]
    return "\n".join(lines)


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

"""Images in, pixel patches out — without torchvision.

:class:`CIRCoTProcessor` is a Qwen2-VL processor with no video processor (the stock one needs torchvision);
:class:`ImagePreprocessor` loads images (paths or PIL) and patchifies them with ``Qwen2VLImageProcessorPil``,
with an optional in-memory cache keyed by path, modification time and size.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from circot import prompts
from circot.errors import CircotError

logger = logging.getLogger(__name__)

ImageLike = Image.Image | str | Path


class CIRCoTProcessor(Qwen2VLProcessor):
    """A Qwen2-VL processor made of an image processor and a tokenizer only (no video, no torchvision)."""

    def __init__(
        self, image_processor: Any = None, tokenizer: Any = None, chat_template: str | None = None, **kwargs
    ):
        self.image_token = getattr(tokenizer, "image_token", None) or prompts.IMAGE_PAD
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def make_image_processor(
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    patch_size: int = 14,
    merge_size: int = 2,
    temporal_patch_size: int = 2,
) -> Qwen2VLImageProcessorPil:
    """A PIL (torchvision-free) Qwen2-VL image processor; ``None`` bounds keep the Qwen defaults."""
    kwargs: dict[str, Any] = {
        "patch_size": patch_size,
        "merge_size": merge_size,
        "temporal_patch_size": temporal_patch_size,
    }
    if min_pixels is not None:
        kwargs["min_pixels"] = min_pixels
    if max_pixels is not None:
        kwargs["max_pixels"] = max_pixels
    return Qwen2VLImageProcessorPil(**kwargs)


def load_image(image: ImageLike, index: int | None = None) -> Image.Image:
    """An RGB PIL image from a path or an image; CircotError naming the file when it cannot be read."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if not isinstance(image, (str, Path)):
        where = f" #{index}" if index is not None else ""
        raise CircotError(f"image{where}: expected a path or a PIL image, got {type(image).__name__}")
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise CircotError(f"{image}: image file not found") from None
    except (OSError, ValueError) as exc:
        raise CircotError(f"{image}: cannot read image ({exc})") from None


class ImagePreprocessor:
    """Turn images into ``(pixel_values (n_patches, c·t·p·p), image_grid_thw (n, 3))`` for the vision tower.

    ``cache_size`` > 0 keeps that many preprocessed images given as paths (keyed by path, mtime and size), so
    that repeated references and gallery images during training are decoded once.
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, cache_size: int = 0) -> None:
        self.image_processor = image_processor
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @property
    def merge_size(self) -> int:
        return int(self.image_processor.merge_size)

    def n_tokens(self, grid_thw: torch.Tensor) -> list[int]:
        """Placeholder tokens per image for grids ``(n, 3)``."""
        return (grid_thw.prod(-1) // self.merge_size**2).tolist()

    def _key(self, image: ImageLike) -> tuple | None:
        if self.cache_size <= 0 or isinstance(image, Image.Image):
            return None
        try:
            st = Path(image).stat()
        except OSError:
            return None
        return (str(image), st.st_mtime_ns, st.st_size)

    def _process(self, images: list[Image.Image]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = self.image_processor(images=images, return_tensors="pt")
        pixels, grids = out["pixel_values"], out["image_grid_thw"]
        sizes = grids.prod(-1).tolist()
        return list(zip(torch.split(pixels, sizes), grids, strict=True))

    def __call__(self, images: Sequence[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) == 0:
            raise CircotError("no images given")
        results: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(images)
        todo: list[int] = []
        keys = [self._key(im) for im in images]
        for i, key in enumerate(keys):
            if key is not None and key in self._cache:
                self._cache.move_to_end(key)
                results[i] = self._cache[key]
            else:
                todo.append(i)
        if todo:
            loaded = [load_image(images[i], i) for i in todo]
            try:
                processed = self._process(loaded)
            except (ValueError, OSError) as exc:
                raise CircotError(f"cannot preprocess images: {exc}") from None
            for i, item in zip(todo, processed, strict=True):
                results[i] = item
                key = keys[i]
                if key is not None:
                    self._cache[key] = item
                    if len(self._cache) > self.cache_size:
                        self._cache.popitem(last=False)
        pixels = torch.cat([r[0] for r in results])  # type: ignore[index]
        grids = torch.stack([r[1] for r in results])  # type: ignore[index]
        return pixels, grids

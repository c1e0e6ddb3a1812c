"""Images in, pixel patches out — without torchvision.

:class:`CIRCoTProcessor` is a Qwen2-VL processor with no video processor (the stock one needs torchvision);
:class:`ImagePreprocessor` loads images (paths or PIL) and patchifies them with ``Qwen2VLImageProcessorPil``,
with an optional in-memory cache keyed by path, modification time and size.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import ProcessorMixin, Qwen2VLProcessor
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil, smart_resize

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
    except Image.DecompressionBombError as exc:
        raise CircotError(f"{image}: image too large to decode safely ({exc}); downscale it first") from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise CircotError(f"{image}: cannot read image ({exc})") from None


# Qwen2-VL's ``smart_resize`` refuses images whose long side is more than 200 times the short one.
MAX_ASPECT_RATIO = 200


def fit_aspect_ratio(image: Image.Image, max_ratio: float = MAX_ASPECT_RATIO) -> Image.Image:
    """``image`` itself, or, when one side is more than ``max_ratio`` times the other, the image centred on a
    black canvas whose short side is just long enough (a 5000×10 strip becomes 5000×25); nothing is cut."""
    w, h = image.size
    if min(w, h) >= 1 and max(w, h) / min(w, h) <= max_ratio:
        return image
    long_side = max(w, h, 1)
    short_side = max(1, math.ceil(long_side / max_ratio))
    size = (long_side, max(short_side, h)) if w >= h else (max(short_side, w), long_side)
    canvas = Image.new(image.mode, size)
    canvas.paste(image, ((size[0] - w) // 2, (size[1] - h) // 2))
    logger.debug("padded a %dx%d image to %dx%d (aspect ratio limit %s)", w, h, *size, max_ratio)
    return canvas


def is_single_image(value: Any) -> bool:
    """True for one image (a path or a PIL image) rather than a sequence of them."""
    return isinstance(value, (str, Path, Image.Image))


class ImagePreprocessor:
    """Turn images into ``(pixel_values (n_patches, c·t·p·p), image_grid_thw (n, 3))`` for the vision tower.

    Images that need no resizing (already at the size the processor would pick, e.g. 112×112 for the tiny
    model) are rescaled, normalised and patchified in one vectorised torch pass, with the same layout and values
    as ``Qwen2VLImageProcessorPil``; others go through that processor. ``cache_size`` > 0 keeps that many decoded
    images given as paths (keyed by path, mtime and size; ~37 KB each at 112 px), so that repeated references and
    gallery images during training are read once.
    """

    def __init__(self, image_processor: Qwen2VLImageProcessorPil, cache_size: int = 0) -> None:
        self.image_processor = image_processor
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple, Any] = OrderedDict()
        ip = image_processor
        self._patch = int(ip.patch_size)
        self._temporal = int(ip.temporal_patch_size)
        self._vectorised = bool(ip.do_resize and ip.do_rescale and ip.do_normalize and ip.size.shortest_edge)
        if self._vectorised:
            self._mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
            self._std = torch.tensor(ip.image_std, dtype=torch.float32).view(1, 3, 1, 1)
            self._scale = float(ip.rescale_factor)

    def set_cache_size(self, n: int) -> None:
        """Keep at most ``n`` decoded images (0: none); the oldest are dropped at once."""
        self.cache_size = n
        while len(self._cache) > max(n, 0):
            self._cache.popitem(last=False)

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

    def _needs_no_resize(self, image: Image.Image) -> bool:
        if not self._vectorised:
            return False
        size = self.image_processor.size
        h, w = smart_resize(
            image.height,
            image.width,
            factor=self._patch * self.merge_size,
            min_pixels=size.shortest_edge,
            max_pixels=size.longest_edge,
        )
        return (h, w) == (image.height, image.width)

    def _prepare(self, image: Image.Image) -> Any:
        """What is cached per image: a uint8 (H, W, 3) array (vectorised path) or processed patches."""
        image = fit_aspect_ratio(image)
        if self._needs_no_resize(image):
            return np.array(image, dtype=np.uint8)
        try:
            out = self.image_processor(images=[image], return_tensors="pt")
        except (ValueError, OSError) as exc:
            raise CircotError(f"cannot preprocess an image of size {image.size}: {exc}") from None
        return out["pixel_values"], out["image_grid_thw"][0]

    def _patchify(self, arrays: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Patches of same-size uint8 (H, W, 3) images, in one vectorised pass."""
        p, m, t = self._patch, self.merge_size, self._temporal
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (n, 3, H, W)
        x = (x * self._scale - self._mean) / self._std
        n, c, h, w = x.shape
        gh, gw = h // p, w // p
        x = x.reshape(n, c, gh // m, m, p, gw // m, m, p).permute(0, 2, 5, 3, 6, 1, 4, 7)
        x = x.unsqueeze(6).expand(*x.shape[:6], t, p, p)  # (n, gh/m, gw/m, m, m, c, t, p, p): t repeats
        return x.reshape(n * gh * gw, c * t * p * p), torch.tensor([[1, gh, gw]] * n)

    def __call__(self, images: Sequence[ImageLike]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(images) == 0:
            raise CircotError("no images given")
        items: list[Any] = []
        for i, image in enumerate(images):
            key = self._key(image)
            if key is not None and key in self._cache:
                self._cache.move_to_end(key)
                items.append(self._cache[key])
                continue
            item = self._prepare(load_image(image, i))
            items.append(item)
            if key is not None:
                self._cache[key] = item
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        # same-size arrays are patchified together; results go back in input order
        out: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, item in enumerate(items):
            if isinstance(item, np.ndarray):
                groups.setdefault(item.shape, []).append(i)
            else:
                out[i] = item
        for rows in groups.values():
            patches, grids = self._patchify([items[i] for i in rows])
            per = int(grids[0].prod())
            for j, i in enumerate(rows):
                out[i] = (patches[j * per : (j + 1) * per], grids[j])
        return torch.cat([o[0] for o in out]), torch.stack([o[1] for o in out])  # type: ignore[index]

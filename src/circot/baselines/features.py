"""Frozen feature extractors for the late-fusion baseline and an on-disk feature cache.

Image features come from EfficientNet-Lite0 (ImageNet weights, frozen), text features from all-MiniLM-L6-v2
(frozen). Both are cached in ``.npz`` files keyed by a content hash (SHA-1 of the image file bytes; SHA-1 of the
UTF-8 text), one file per extractor setting, so a combiner can be retrained in seconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from circot.baselines.efficientnet_lite import IMAGE_MEAN, IMAGE_STD, load_efficientnet_lite0
from circot.errors import DataError

logger = logging.getLogger(__name__)

POOLS = ("avg", "grid2", "avg+grid2")


def file_hash(path: str | Path) -> str:
    return hashlib.sha1(Path(path).read_bytes()).hexdigest()


def text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def load_image_tensor(path: str | Path, image_size: int) -> torch.Tensor:
    """Image file → (3, S, S) float tensor, resized (bilinear) and normalised for EfficientNet-Lite."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB").resize((image_size, image_size), Image.Resampling.BILINEAR)
            x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read image {str(path)!r}: {exc}") from exc
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    return (x - mean) / std


def select_pool(features: np.ndarray | torch.Tensor, pool: str):
    """Columns of :class:`ImageFeatureExtractor` output for one pooling: "avg" (1280), "grid2" (5120), both (6400)."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
    if pool == "avg":
        return features[:, :1280]
    if pool == "grid2":
        return features[:, 1280:]
    return features


class ImageFeatureExtractor:
    """Frozen EfficientNet-Lite0 features of image files: (n, 6400) = [global average | 2×2 grid average].

    Both are taken from the 1280-channel head map: the global average (1280-d, CLIP-like pooled feature) and the
    2×2 average grid (4 × 1280, row-major, keeps coarse position). :func:`select_pool` picks the columns.
    """

    dim = 5 * 1280

    def __init__(self, image_size: int = 112, weights: str | Path | None = None) -> None:
        self.image_size = image_size
        # channels-last runs the depthwise convolutions ~1.7x faster on CPU
        self.model = load_efficientnet_lite0(weights).to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def encode_tensors(self, x: torch.Tensor) -> torch.Tensor:
        """(b, 3, S, S) normalised images → (b, 6400) features."""
        fmap = self.model.feature_map(x.contiguous(memory_format=torch.channels_last))
        return torch.cat([fmap.mean(dim=(2, 3)), F.adaptive_avg_pool2d(fmap, 2).flatten(1)], dim=1)

    def encode(self, paths: Sequence[str | Path], batch_size: int = 32) -> np.ndarray:
        out = np.zeros((len(paths), self.dim), dtype=np.float32)
        for start in range(0, len(paths), batch_size):
            chunk = paths[start : start + batch_size]
            x = torch.stack([load_image_tensor(p, self.image_size) for p in chunk])
            out[start : start + len(chunk)] = self.encode_tensors(x).numpy()
        return out


class FeatureCache:
    """Features by content hash in one ``.npz`` file (arrays ``keys`` and ``features``); atomic saves.

    ``dtype``: storage type (float16 halves the size of wide image features); rows come back as float32.
    """

    def __init__(self, path: str | Path, dtype: str = "float32") -> None:
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._rows: dict[str, np.ndarray] = {}
        if self.path.exists():
            with np.load(self.path) as data:
                for k, v in zip(data["keys"].tolist(), data["features"], strict=True):
                    self._rows[k] = v
        self._dirty = False

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, key: str) -> bool:
        return key in self._rows

    def get_many(
        self,
        keys: Sequence[str],
        compute: Callable[[list[int]], np.ndarray],
        chunk: int = 1024,
        progress: bool = False,
    ) -> np.ndarray:
        """Rows for ``keys``; missing ones computed by ``compute(indices into keys)`` in chunks and saved."""
        missing, seen = [], set()
        for i, k in enumerate(keys):
            if k not in self._rows and k not in seen:
                missing.append(i)
                seen.add(k)
        if missing:
            logger.info("computing %d features for %s", len(missing), self.path.name)
            bar = None
            if progress:
                from tqdm import tqdm

                bar = tqdm(total=len(missing), desc=self.path.stem, unit="item")
            for start in range(0, len(missing), chunk):
                idx = missing[start : start + chunk]
                for i, row in zip(idx, compute(idx), strict=True):
                    self._rows[keys[i]] = row.astype(self.dtype)
                self._dirty = True
                self.save()
                if bar is not None:
                    bar.update(len(idx))
            if bar is not None:
                bar.close()
        if not keys:
            return np.zeros((0, 0), np.float32)
        return np.stack([self._rows[k] for k in keys]).astype(np.float32)

    def save(self) -> None:
        if not self._dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = list(self._rows)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, suffix=".npz.tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, keys=np.array(keys), features=np.stack([self._rows[k] for k in keys]))
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self._dirty = False

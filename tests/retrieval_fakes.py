"""Test doubles for the retrieval tests: a deterministic image encoder that counts its calls."""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

# the architecture of the training and export tests' tiny models (a few seconds a run on one thread)
TINY = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "vision_depth": 1,
    "vision_embed_dim": 64,
    "max_cot_tokens": 8,
}


class FakeEncoder:
    """Embeds an image file as a unit vector seeded by its bytes; counts batches and images."""

    def __init__(
        self, dim: int = 16, fingerprint: str = "fake-encoder-v1", fail_after: int | None = None
    ) -> None:
        self.dim = dim
        self.embedding_dim = dim
        self.fingerprint = fingerprint
        self.calls = 0
        self.images = 0
        self.fail_after = fail_after

    def encode_images(self, images, batch_size=32, show_progress_bar=False):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated crash")
        self.calls += 1
        self.images += len(images)
        out = []
        for im in images:
            seed = int.from_bytes(hashlib.sha256(Path(im).read_bytes()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            out.append(v / np.linalg.norm(v))
        return np.stack(out)


def write_images(folder: Path, n: int, start: int = 0, size: int = 8) -> list[Path]:
    """Write ``n`` distinct small PNG images named img-<i>.png."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        arr = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        p = folder / f"img-{i:04d}.png"
        Image.fromarray(arr).save(p)
        paths.append(p)
    return paths


TINY_CORPUS = [
    "a big red circle left of a small blue square",
    "make the circle green and remove the square",
    "add a yellow triangle above the circle",
] * 10


def tiny_model(**overrides):
    """A very small random CIRCoT (2 text layers, hidden 32, 56 px images), one thread."""
    import torch

    from circot.model import CIRCoT

    torch.set_num_threads(1)
    settings = dict(
        image_size=56,
        max_cot_tokens=12,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        vision_embed_dim=32,
        vision_depth=1,
    )
    settings.update(overrides)
    corpus = settings.pop("corpus", TINY_CORPUS)
    return CIRCoT.tiny(corpus, **settings)


def small_world(folder: Path, n_val: int = 8) -> Path:
    """A shapes world of ``n_val`` val queries at 56 px (no other split): for evaluation tests."""
    from circot.data.shapes import generate

    return generate(folder, n_train=0, n_val=n_val, n_test=0, n_novel=0, image_size=56)


def shapes_tiny_model():
    """:func:`tiny_model` with a tokenizer trained on the shapes world's texts."""
    from circot.data.shapes import corpus

    return tiny_model(corpus=list(corpus()))


def tiny_model_dir(folder: Path, **overrides) -> Path:
    """Save :func:`tiny_model` to ``folder`` and return it."""
    tiny_model(**overrides).save_pretrained(folder)
    return folder


def png_claiming(width: int, height: int) -> bytes:
    """A small PNG file whose header claims ``width`` × ``height`` pixels (a decompression bomb's header)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1024))
        + chunk(b"IEND", b"")
    )

"""Helpers of the web-service tests: drawn shapes, crafted image files, a model wrapper that checks the lock."""

from __future__ import annotations

import contextlib
import io
import threading
import time

from PIL import Image, ImageDraw

from retrieval_fakes import png_claiming  # noqa: F401  (re-exported for the serve tests)

CORPUS = [
    "a small red circle left of a big blue square",
    "make the circle green and move it to the right",
    "remove the small yellow triangle",
    "add a blue triangle below the circle",
    "the target has a green square and a red circle",
] * 5
COLORS = {"red": (220, 50, 47), "green": (60, 170, 80), "blue": (40, 100, 220), "yellow": (230, 190, 30)}
SHAPES = ("circle", "square", "triangle")

# Small limits so that every limit is cheap to hit.
LIMITS = {
    "max_upload_bytes": 60_000,
    "max_pixels": 200 * 200,
    "max_text_chars": 120,
    "max_k": 20,
    "max_cot_chars": 300,
}


def draw(shape: str, color: tuple[int, int, int], size: int = 96, offset: int = 0) -> Image.Image:
    image = Image.new("RGB", (size, size), (246, 246, 242))
    d = ImageDraw.Draw(image)
    lo, hi = size // 5 + offset, size - size // 5 + offset
    if shape == "circle":
        d.ellipse((lo, lo, hi, hi), fill=color)
    elif shape == "square":
        d.rectangle((lo, lo, hi, hi), fill=color)
    else:
        d.polygon([(size // 2 + offset, lo), (lo, hi), (hi, hi)], fill=color)
    return image


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


class GuardedModel:
    """Wraps a model and records how many threads are inside it at once (it must never exceed one)."""

    def __init__(self, inner, pause: float = 0.005) -> None:
        self.inner = inner
        self.pause = pause
        self.active = 0
        self.max_active = 0
        self.calls = 0
        self.gate: threading.Event | None = None  # when set to an Event, calls wait for it (bounded)
        self.entered = threading.Event()
        self._lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.inner.embedding_dim

    @property
    def config(self):
        return self.inner.config

    @contextlib.contextmanager
    def _inside(self):
        with self._lock:
            self.active += 1
            self.calls += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.set()
        try:
            if self.gate is not None:
                self.gate.wait(timeout=20)
            time.sleep(self.pause)  # widen the window in which a second caller could slip in
            yield
        finally:
            with self._lock:
                self.active -= 1

    def encode_queries(self, *args, **kwargs):
        with self._inside():
            return self.inner.encode_queries(*args, **kwargs)

    def generate_reasoning(self, *args, **kwargs):
        with self._inside():
            return self.inner.generate_reasoning(*args, **kwargs)

    def stream_reasoning(self, image, text, **kwargs):
        with self._inside():
            yield from self.inner.stream_reasoning(image, text, **kwargs)


class SlowStream:
    """Wraps a model so that each streamed piece takes ``delay`` seconds; counts the pieces handed out."""

    def __init__(self, inner, delay: float = 0.05) -> None:
        self.inner = inner
        self.delay = delay
        self.pieces = 0
        self.closed = threading.Event()

    @property
    def fingerprint(self) -> str:
        return self.inner.fingerprint

    @property
    def embedding_dim(self) -> int:
        return self.inner.embedding_dim

    def encode_queries(self, *args, **kwargs):
        return self.inner.encode_queries(*args, **kwargs)

    def generate_reasoning(self, *args, **kwargs):
        return self.inner.generate_reasoning(*args, **kwargs)

    def stream_reasoning(self, image, text, **kwargs):
        try:
            for piece in self.inner.stream_reasoning(image, text, **kwargs):
                time.sleep(self.delay)
                self.pieces += 1
                yield piece
        finally:
            self.closed.set()

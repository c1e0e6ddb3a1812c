"""PIL renderer of shapes scenes: anti-aliased shapes on a pale, varying background.

Drawn at 4× the output size and box-downscaled, so edges are smooth. Each rendering varies the background
tint, a soft gradient, light pixel noise, and each object's position (jitter within its cell), scale and
rotation, so exact pixels never identify a scene; colours, shapes, sizes and cells stay unmistakable.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from circot.data.shapes.scene import GRID, Obj, Scene

PALETTE = {
    "red": (216, 52, 58),
    "orange": (243, 140, 38),
    "yellow": (240, 198, 30),
    "green": (56, 158, 84),
    "blue": (46, 108, 212),
    "purple": (142, 78, 194),
}
SIZE_SCALE = {"small": 0.27, "large": 0.43}  # radius as a fraction of the cell side
SUPERSAMPLE = 4
JITTER = 0.07  # centre jitter, fraction of the cell side
SCALE_JITTER = 0.05
ROTATION_JITTER = 7.0  # degrees
TEXTURE = 2.5  # amplitude of the smooth, paper-like background texture (grey levels)


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def _regular(cx: float, cy: float, r: float, n: int, start_deg: float) -> list[tuple[float, float]]:
    return [
        (
            cx + r * math.cos(math.radians(start_deg + 360 * i / n)),
            cy + r * math.sin(math.radians(start_deg + 360 * i / n)),
        )
        for i in range(n)
    ]


def _rotate(points: list[tuple[float, float]], cx: float, cy: float, deg: float) -> list[tuple[float, float]]:
    a = math.radians(deg)
    ca, sa = math.cos(a), math.sin(a)
    return [(cx + (x - cx) * ca - (y - cy) * sa, cy + (x - cx) * sa + (y - cy) * ca) for x, y in points]


def shape_polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]] | None:
    """Outline of a shape of radius ``r`` centred at (cx, cy); None for the circle (drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        h = 0.8 * r
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        # equilateral, pointing up, centred on its bounding box
        pts = _regular(cx, cy + 0.2 * r, 1.2 * r, 3, -90)
    elif shape == "star":
        outer = _regular(cx, cy + 0.06 * r, 1.08 * r, 5, -90)
        inner = _regular(cx, cy + 0.06 * r, 0.46 * r, 5, -90 + 36)
        pts = [p for pair in zip(outer, inner, strict=True) for p in pair]
    elif shape == "cross":
        e, w = 0.92 * r, 0.33 * r
        pts = [
            (cx - w, cy - e), (cx + w, cy - e), (cx + w, cy - w), (cx + e, cy - w), (cx + e, cy + w), (cx + w, cy + w),
            (cx + w, cy + e), (cx - w, cy + e), (cx - w, cy + w), (cx - e, cy + w), (cx - e, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return _rotate(pts, cx, cy, rot)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    coords = (np.arange(size, dtype=np.float32) + 0.5) / size - 0.5
    return np.meshgrid(coords, coords)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Pale tinted background with a soft linear gradient and a smooth texture, as float32 (size, size, 3)."""
    base = (np.array([244.0, 242.0, 236.0]) + rng.uniform(-9, 7, size=3)).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    strength = rng.uniform(3, 10)
    gx, gy = _grid(size)
    field = gx * np.float32(math.cos(angle) * strength) + gy * np.float32(math.sin(angle) * strength)
    # smooth texture: a coarse random field, bilinearly upsampled (compresses well, unlike pixel noise)
    coarse = Image.fromarray(rng.normal(0.0, TEXTURE, size=(6, 6)).astype(np.float32), "F")
    field = field + np.asarray(coarse.resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)
    return base[None, None, :] + field[..., None]


def render_scene(
    scene: Scene, size: int = 112, rng: np.random.Generator | int | None = None, noise: float = 0.0
) -> Image.Image:
    """Render ``scene`` as an RGB image of ``size``×``size`` pixels; ``rng`` draws all the variation.

    Shapes are drawn on a nearest-upscaled copy of the background at 4× and box-downscaled, so the
    background is exact and the edges are anti-aliased. ``noise``: standard deviation of optional
    per-pixel Gaussian noise (grey levels; it makes PNGs ~5× larger and slower to write).
    """
    rng = _as_rng(rng)
    bg = Image.fromarray(np.clip(np.rint(_background(size, rng)), 0, 255).astype(np.uint8), "RGB")
    big = size * SUPERSAMPLE
    canvas = bg.resize((big, big), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(canvas)
    cell = big / GRID
    outline_w = max(1, round(SUPERSAMPLE * size / 112 * 1.2))
    for obj in scene:
        _draw_object(draw, obj, cell, outline_w, rng)
    image = canvas.reduce(SUPERSAMPLE)
    if noise > 0:
        arr = np.asarray(image, dtype=np.float32) + rng.normal(0.0, noise, size=(size, size, 3)).astype(
            np.float32
        )
        image = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "RGB")
    return image


def _draw_object(
    draw: ImageDraw.ImageDraw, obj: Obj, cell: float, outline_w: int, rng: np.random.Generator
) -> None:
    jx, jy = rng.uniform(-JITTER, JITTER, size=2) * cell
    cx = (obj.col + 0.5) * cell + jx
    cy = (obj.row + 0.5) * cell + jy
    r = SIZE_SCALE[obj.size] * cell * (1 + rng.uniform(-SCALE_JITTER, SCALE_JITTER))
    rot = rng.uniform(-ROTATION_JITTER, ROTATION_JITTER)
    fill = PALETTE[obj.color]
    edge = tuple(int(v * 0.72) for v in fill)
    pts = shape_polygon(obj.shape, cx, cy, r, rot)
    if pts is None:
        box = (cx - r, cy - r, cx + r, cy + r)
        draw.ellipse(box, fill=edge)
        draw.ellipse(
            (box[0] + outline_w, box[1] + outline_w, box[2] - outline_w, box[3] - outline_w), fill=fill
        )
    else:
        draw.polygon(pts, fill=fill, outline=edge, width=outline_w)

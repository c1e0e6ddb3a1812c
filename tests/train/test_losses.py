"""Losses: values against hand computations, masking, hard negatives, and the two-process gather path."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F

from circot.train.losses import IGNORE_INDEX, CoTCrossEntropy, InfoNCELoss


def _unit(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g), dim=-1)


def test_infonce_matches_hand_computation():
    q, t = _unit(4, 8, seed=1), _unit(4, 8, seed=2)
    loss = InfoNCELoss(temperature=0.1)(q, t)
    logits = q @ t.T / 0.1
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    assert torch.allclose(loss, expected, atol=1e-6)


def test_infonce_perfect_alignment_is_near_zero_and_symmetric_option():
    q = _unit(6, 16, seed=3)
    assert InfoNCELoss(temperature=0.01)(q, q).item() < 1e-3
    t = _unit(6, 16, seed=4)
    one_way = InfoNCELoss(0.1)(q, t)
    back = InfoNCELoss(0.1)(t, q)
    both = InfoNCELoss(0.1, symmetric=True)(q, t)
    assert torch.allclose(both, 0.5 * (one_way + back), atol=1e-6)


def test_duplicate_targets_are_not_negatives():
    q = _unit(3, 8, seed=5)
    t = q.clone()
    t[2] = t[0]  # rows 0 and 2 share a target image
    keys = torch.tensor([7, 8, 7])
    masked = InfoNCELoss(0.1)(q, t, target_keys=keys)
    logits = q @ t.T / 0.1
    logits[0, 2] = logits[2, 0] = float("-inf")
    expected = -torch.log_softmax(logits, dim=1).diagonal().mean()
    assert torch.allclose(masked, expected, atol=1e-6)


def test_hard_negatives_raise_the_loss_and_accept_both_shapes():
    q, t = _unit(4, 8, seed=6), _unit(4, 8, seed=7)
    base = InfoNCELoss(0.1)(q, t)
    shared = InfoNCELoss(0.1)(q, t, hard_negatives=_unit(5, 8, seed=8))
    per_query = InfoNCELoss(0.1)(q, t, hard_negatives=_unit(4, 2, 8, seed=9))
    assert shared > base and per_query > base
    logits = torch.cat([q @ t.T, torch.einsum("bd,bhd->bh", q, _unit(4, 2, 8, seed=9))], 1) / 0.1
    assert torch.allclose(per_query, F.cross_entropy(logits, torch.arange(4)), atol=1e-6)
    with pytest.raises(ValueError):
        InfoNCELoss(0.1)(q, t, hard_negatives=_unit(3, 2, 8))


def test_cot_cross_entropy_ignores_masked_positions():
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 3], labels[1, 4] = 4, 9
    loss = CoTCrossEntropy()(logits, labels)
    expected = F.cross_entropy(torch.stack([logits[0, 2], logits[1, 3]]), torch.tensor([4, 9]))
    assert torch.allclose(loss, expected)
    loss.backward()
    assert logits.grad[0, 0].abs().sum() == 0 and logits.grad[0, 2].abs().sum() > 0
    none = CoTCrossEntropy()(logits, torch.full((2, 5), IGNORE_INDEX))
    assert none.item() == 0.0 and none.requires_grad


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        q_all, t_all = _unit(5, 8, seed=11), _unit(5, 8, seed=12)
        keys = torch.tensor([0, 1, 2, 0, 3])
        # uneven shards: rank 0 holds 3 rows, rank 1 holds 2
        rows = slice(0, 3) if rank == 0 else slice(3, 5)
        q = q_all[rows].clone().requires_grad_(True)
        t = t_all[rows].clone().requires_grad_(True)
        loss = InfoNCELoss(0.1, symmetric=True)(q, t, target_keys=keys[rows])
        loss.backward()
        torch.save({"loss": loss.detach(), "gq": q.grad, "gt": t.grad}, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_gather_gives_the_global_loss_and_local_gradients(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    q = _unit(5, 8, seed=11).requires_grad_(True)
    t = _unit(5, 8, seed=12).requires_grad_(True)
    loss = InfoNCELoss(0.1, symmetric=True, gather=False)(q, t, target_keys=torch.tensor([0, 1, 2, 0, 3]))
    loss.backward()
    # every process computes the loss of the global batch ...
    assert torch.allclose(r0["loss"], loss.detach(), atol=1e-6)
    assert torch.allclose(r1["loss"], loss.detach(), atol=1e-6)
    # ... and the gradients of its own rows; their sum over processes is the full gradient of its rows
    assert torch.allclose(torch.cat([r0["gq"], r1["gq"]]), q.grad, atol=1e-6)
    assert torch.allclose(torch.cat([r0["gt"], r1["gt"]]), t.grad, atol=1e-6)

"""LoRA through the Trainer: only the adapter and circot's token rows get gradients, in every stage."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from circot.model import CIRCoT
from circot.train.config import TrainConfig
from circot.train.trainer import Trainer
from retrieval_fakes import TINY

LAYER0 = "model.base_model.model.model.language_model.layers.0."


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from circot.data import shapes

    torch.set_num_threads(1)
    return shapes.generate(
        tmp_path_factory.mktemp("shapes"), seed=7, n_train=16, n_val=4, n_test=0, n_novel=0
    )


def test_lora_training_touches_only_the_adapter_and_token_rows(tmp_path, world):
    base_dir = CIRCoT.tiny(seed=0, **TINY).save_pretrained(tmp_path / "base")
    cfg = TrainConfig.from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "seed": 0,
            "num_threads": 1,
            "model": {"init": str(base_dir), "overrides": {"lora": {"r": 4, "alpha": 8, "dropout": 0.0}}},
            "data": {"dataset": "shapes", "root": str(world), "val_split": None},
            "optim": {"batch_size": 4},
            "loss": {"hard_negatives": 1},
            "stages": [
                {"name": "align", "mode": "fast", "steps": 2, "lr": 1e-2, "freeze": [LAYER0]},
                {"name": "cot", "mode": "full", "steps": 2, "lr": 1e-2, "fast_fraction": 0.25},
            ],
            "eval": {"every": 0},
            "save_every": 0,
        }
    )
    tr = Trainer(cfg)
    tr._load_data()
    tr._setup_model(0)
    model = tr.model
    assert model.is_lora
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(("lora_" in n) or ("trainable_tokens" in n) for n in trainable)
    assert any("trainable_tokens" in n for n in trainable)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    model.train()
    step = 0
    for stage_idx, stage in enumerate(cfg.stages):
        tr._enter_stage(stage_idx, fresh=True)
        want = {n for n in trainable if not any(n.startswith(f) for f in stage.freeze)}
        assert want != trainable if stage.freeze else want == trainable
        if not (stage.mode == "full" and stage.lambda_txt > 0):  # no CE: the LM head is not in the graph
            want = {n for n in want if ".lm_head." not in n}
        for _ in range(stage.steps):
            batch = {"index": list(range(4)), "example": tr.examples[step * 4 : step * 4 + 4]}
            losses = tr._micro_step(batch, stage, random.Random(step))
            tr.accelerator.backward(losses["total"])
            got = {n for n, p in model.named_parameters() if p.grad is not None}
            assert got == want, (sorted(got ^ want))[:5]
            tr.optimizer.step()
            tr.optimizer.zero_grad(set_to_none=True)
            step += 1
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
    assert any(not torch.equal(p, torch.zeros_like(p)) for n, p in model.named_parameters() if "lora_B" in n)

    model.eval()
    images = [tr.examples[i].reference for i in range(3)]
    texts = [tr.examples[i].text for i in range(3)]
    want_g, want_q = model.encode_images(images), model.encode_queries(images, texts, mode="fast")
    saved = model.save_pretrained(tmp_path / "adapter")
    assert (saved / "adapter_config.json").is_file()
    again = CIRCoT.from_pretrained(saved)
    np.testing.assert_allclose(again.encode_images(images), want_g, atol=1e-5)
    np.testing.assert_allclose(again.encode_queries(images, texts, mode="fast"), want_q, atol=1e-5)

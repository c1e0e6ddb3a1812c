"""Which CoT full mode shows: config ``cot_choice`` (``greedy``, or ``gallery``: of the greedy CoT and its samples,
the one whose own embedding best matches a gallery image) — the rule, and through evaluate (one process and
sharded) and search."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from circot.prompts import CoT
from circot.search import choose_cots, shown_cots
from retrieval_fakes import shapes_tiny_model, small_world


def _cot(name: str, emb: list[float], samples: tuple[CoT, ...] = ()) -> CoT:
    return CoT(conclusion=name, embedding=np.asarray(emb, np.float32), samples=list(samples))


def _best_of(gallery: np.ndarray):
    return lambda emb: (emb @ gallery.T).max(axis=1)


def test_the_candidate_with_the_best_gallery_match_is_shown():
    best = _best_of(np.eye(3, dtype=np.float32))
    a = _cot("greedy-a", [0.6, 0.8, 0], (_cot("s1", [0.95, 0.3, 0]), _cot("s2", [0.5, 0.5, 0.7])))
    b = _cot("greedy-b", [1, 0, 0], (_cot("t1", [0, 0.7, 0.7]),))
    tie = _cot("greedy-c", [0, 1, 0], (_cot("u1", [0, 0, 1]),))  # a tie: the greedy CoT
    given = CoT(conclusion="given")  # no samples (a given or served CoT): as it is
    got = choose_cots([a, None, b, tie, given], best)
    assert [c.conclusion if c else None for c in got] == ["s1", None, "greedy-b", "greedy-c", "given"]
    # no candidates at all: the gallery is not asked
    asked = []
    assert choose_cots([given, None], lambda e: asked.append(e)) == [given, None] and not asked


def test_the_config_and_a_gallery_decide_whether_to_choose():
    best = _best_of(np.eye(2, dtype=np.float32))
    cots = [_cot("greedy", [0.8, 0.6], (_cot("sample", [1, 0]),))]
    gallery = SimpleNamespace(config=SimpleNamespace(cot_choice="gallery"))
    greedy = SimpleNamespace(config=SimpleNamespace(cot_choice="greedy"))
    assert shown_cots(gallery, cots, best)[0].conclusion == "sample"
    assert shown_cots(greedy, cots, best)[0].conclusion == "greedy"
    assert shown_cots(gallery, cots, None)[0].conclusion == "greedy"  # no gallery at hand


def test_cot_choice_is_checked():
    from circot.config import CIRCoTConfig
    from circot.errors import ConfigError

    with pytest.raises(ConfigError, match="cot_choice must be one of"):
        CIRCoTConfig(cot_choice="vote")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("shapes") / "w")


@pytest.fixture(scope="module")
def sampling_model():
    model = shapes_tiny_model()
    model.config.cot_samples, model.config.sampling_temperature = 4, 1.5
    return model


def test_evaluate_shows_the_gallery_choice_and_ranks_as_before(world, sampling_model, tmp_path):
    """The shown CoT (and so the reasoning scores) is each query's candidate with the best gallery match,
    computed here from the model's own candidates; the ranking does not change; a sharded run agrees."""
    from circot.data.shapes import load
    from circot.evaluate import evaluate_split

    model = sampling_model
    split = load(world, "val")
    run = dict(mode="full", use_cache=False, keep_scores=True)
    fp = model.fingerprint
    greedy = evaluate_split(model, split, rank=0, world_size=1, **run)
    model.config.cot_choice = "gallery"
    try:
        assert model.fingerprint == fp  # a query-side setting: an index stays valid
        chosen = evaluate_split(model, split, rank=0, world_size=1, **run)
        kw = dict(world_size=2, work_dir=tmp_path / "work", **run)
        assert evaluate_split(model, split, rank=1, **kw) is None
        sharded = evaluate_split(model, split, rank=0, timeout=10, **kw)
    finally:
        model.config.cot_choice = "greedy"
    np.testing.assert_array_equal(chosen.scores, greedy.scores)
    gallery = model.encode_images([str(split.gallery.paths[i]) for i in split.gallery.ids])
    _, cots = model.encode_queries(
        [str(split.image_path(q.reference)) for q in split.queries],
        [q.text for q in split.queries],
        mode="full",
        return_reasoning=True,
    )
    want = []
    for c in cots:
        candidates = [c, *c.samples]
        assert len(candidates) == 5
        want.append(candidates[int(np.argmax([(x.embedding @ gallery.T).max() for x in candidates]))].raw)
    assert [c.raw for c in chosen.cots] == want
    assert [c.raw for c in greedy.cots] == [c.raw for c in cots]
    assert want != [c.raw for c in cots]  # some query shows a sample: the choice was made
    assert [c.raw for c in sharded.cots] == want
    assert [c.token_ids for c in sharded.cots] == [c.token_ids for c in chosen.cots]
    assert sharded.cot_scores == chosen.cot_scores


def test_search_shows_the_gallery_choice(world, sampling_model, tmp_path):
    from circot.data.shapes import load
    from circot.gallery import build_index
    from circot.index import GalleryIndex
    from circot.search import embed_queries, index_best_match, search_query

    model = sampling_model
    split = load(world, "val")
    paths = [split.gallery.paths[i] for i in split.gallery.ids]
    build_index(model, paths, out=tmp_path / "g.index", use_cache=False)
    index = GalleryIndex.load(tmp_path / "g.index")
    queries = split.queries[:4]
    images = [str(split.image_path(q.reference)) for q in queries]
    texts = [q.text for q in queries]
    model.config.cot_choice = "gallery"
    try:
        results = [search_query(model, index, img, t, k=3) for img, t in zip(images, texts, strict=True)]
        batch = embed_queries(model, images, texts, "full", best_match=index_best_match(index))
    finally:
        model.config.cot_choice = "greedy"
    plain = embed_queries(model, images, texts, "full")
    assert [r.cot.raw for r in results] == [c.raw for c in batch.cots]
    np.testing.assert_allclose(batch.embeddings, plain.embeddings, atol=1e-6)
    best = index_best_match(index)
    for shown, c in zip(batch.cots, plain.cots, strict=True):
        candidates = [c, *c.samples]
        assert shown.raw == candidates[int(np.argmax(best(np.stack([x.embedding for x in candidates]))))].raw


def test_the_cot_cache_keeps_the_greedy_cot(world, sampling_model, tmp_path):
    """The eval's CoT cache stores each query's greedy CoT, not the one shown, so that a run without samples,
    which reads the cache, embeds the CoT it would have generated."""
    from circot.data.shapes import load
    from circot.evaluate import evaluate_split

    model = sampling_model
    split = load(world, "val")
    model.config.cot_choice = "gallery"
    try:
        chosen = evaluate_split(model, split, mode="full", cache_dir=tmp_path)
    finally:
        model.config.cot_choice = "greedy"
    model.config.cot_samples = 0
    try:
        cached = evaluate_split(model, split, mode="full", cache_dir=tmp_path)
        fresh = evaluate_split(model, split, mode="full", use_cache=False)
    finally:
        model.config.cot_samples = 4
    assert cached.cache["cot_cached"] == len(split.queries)
    assert [c.raw for c in cached.cots] == [c.raw for c in fresh.cots]
    assert [c.raw for c in chosen.cots] != [c.raw for c in fresh.cots]  # a sample was shown in the first run

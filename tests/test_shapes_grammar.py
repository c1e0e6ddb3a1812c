"""The shapes world's grammar, scorer, renderer and corpus, on hand-made scenes."""

from __future__ import annotations

import numpy as np
import pytest

from circot.data.records import CIRQuery
from circot.data.shapes import (
    corpus,
    describe,
    parse_description,
    render_scene,
    score_cot,
    score_cot_by_group,
)
from circot.data.shapes.grammar import Step, apply_step, interpretations, realize
from circot.data.shapes.render import PALETTE
from circot.data.shapes.sampling import FAMILIES, make_world, sample_query, split_rules
from circot.data.shapes.scene import Obj, make_scene
from circot.errors import DataError
from circot.prompts import CoT, format_cot

RED_CIRCLE = Obj(1, 1, "circle", "red", "large")
SCENE = make_scene([RED_CIRCLE, Obj(1, 0, "star", "blue", "small"), Obj(0, 2, "square", "green", "large")])


def test_caption_is_one_clause_per_object_in_canonical_order() -> None:
    assert describe(SCENE) == (
        "a large green square at the top right; a small blue star at the middle left; a large red circle at the center"
    )
    assert parse_description(describe(SCENE)) == SCENE
    assert parse_description("a huge red circle at the center") is None


def test_references_are_unique_in_generation_and_ambiguity_is_detected() -> None:
    two_red = make_scene([RED_CIRCLE, Obj(2, 2, "circle", "red", "small")])
    step = Step("attribute", cell=RED_CIRCLE.cell, attr="color", value="blue")
    texts = {r.text for r in realize(two_red, step, unique=True)}
    assert "make the large red circle blue" in texts
    assert "make the red circle blue" not in texts  # two red circles: never generated
    # ...and the independent check finds both meanings of the ambiguous text
    assert len(interpretations(two_red, "make the red circle blue")) == 2
    assert len(interpretations(two_red, "make the large red circle blue")) == 1


def test_relations_need_both_readings_to_agree() -> None:
    # the star is the only object left of the circle and in its row: "the object to the left of the red circle"
    step = Step("remove", cell=(1, 0))
    texts = {r.text for r in realize(SCENE, step, unique=True)}
    assert "remove the object to the left of the red circle" in texts
    # add an object up and to the left of the circle: "left of" is no longer unambiguous
    crowded = make_scene([*SCENE, Obj(0, 0, "cross", "yellow", "small")])
    texts = {r.text for r in realize(crowded, step, unique=True)}
    assert "remove the object to the left of the red circle" not in texts
    assert len(interpretations(crowded, "remove the object to the left of the red circle")) == 2


def test_edits_apply() -> None:
    assert apply_step(SCENE, Step("remove", cell=(1, 1))) == make_scene(SCENE[:2])
    moved = apply_step(SCENE, Step("move", cell=(1, 1), dest=(2, 2)))
    assert RED_CIRCLE.with_(cell=(2, 2)) in moved
    swapped = apply_step(SCENE, Step("swap", cell=(1, 1), other=(1, 0)))
    assert RED_CIRCLE.with_(cell=(1, 0)) in swapped
    recolored = apply_step(SCENE, Step("set", select=("size", "large"), attr="color", value="purple"))
    assert sorted(o.color for o in recolored) == ["blue", "purple", "purple"]
    with pytest.raises(ValueError):
        apply_step(SCENE, Step("move", cell=(1, 1), dest=(1, 0)))  # destination taken


@pytest.mark.parametrize("family", FAMILIES)
def test_sampled_queries_are_unambiguous(family: str) -> None:
    rules = split_rules(make_world(0), "train")
    rng = np.random.default_rng(11)
    for _ in range(6):
        q = sample_query(rng, family, rules)
        assert interpretations(q.reference, q.realization.text) == {q.target}, q.realization.text


def _cot(caption: str, conclusion: str, reasoning: str = "r") -> CoT:
    return CoT(caption=caption, reasoning=reasoning, conclusion=conclusion)


def test_score_cot_perfect_partial_malformed() -> None:
    gold = _cot(describe(SCENE), "a large red circle at the center; a small blue star at the middle left")
    perfect = score_cot([gold], [gold])
    assert all(v == 1.0 for v in perfect.values())
    # one of two caption clauses right, one extra wrong clause; conclusion in another order and case
    partial = _cot(
        "a large red circle at the center; a small red star at the middle left",
        "A small blue star at the middle left;  a large red circle at the center.",
    )
    s = score_cot([partial], [gold])
    assert s["caption_precision"] == pytest.approx(1 / 2)
    assert s["caption_recall"] == pytest.approx(1 / 3)
    assert s["caption_f1"] == pytest.approx(2 * (1 / 2) * (1 / 3) / (1 / 2 + 1 / 3))
    assert s["conclusion_exact"] == 1.0 and s["well_formed"] == 1.0
    # a truncated generation: parsed from text, not well formed, conclusion missing
    text = format_cot(gold, with_emb=False).split("<conclusion>")[0] + "<conclusion>a large red"
    s = score_cot([text, gold], [gold, gold])
    assert s["well_formed"] == 0.5
    assert s["conclusion_exact"] == 0.5
    assert s["caption_f1"] == 1.0
    empty = score_cot([_cot("", "")], [gold])
    assert empty["caption_precision"] == 0.0 and empty["caption_recall"] == 0.0
    assert (
        score_cot([{"caption": gold.caption, "reasoning": "", "conclusion": gold.conclusion}], [gold])[
            "conclusion_exact"
        ]
        == 1.0
    )
    with pytest.raises(DataError):
        score_cot([gold], [])


def test_score_cot_tells_a_wrong_conclusion_from_a_wrong_reading() -> None:
    gold = _cot(describe(SCENE), "a large red circle at the center", "the star is removed; then x")
    right = score_cot([gold], [gold])
    assert right["reasoning_exact"] == right["read_right"] == right["all_exact"] == 1.0
    # the same reasoning up to case, spacing and final punctuation; the clauses out of order are wrong
    loose = _cot(gold.caption, gold.conclusion, "The star is removed;  then x.")
    assert score_cot([loose], [gold])["reasoning_exact"] == 1.0
    swapped = _cot(gold.caption, gold.conclusion, "then x; the star is removed")
    assert score_cot([swapped], [gold])["reasoning_exact"] == 0.0
    # read right, concluded wrong; read wrong (caption), concluded right
    bad_conclusion = _cot(gold.caption, "a small red circle at the center", gold.reasoning)
    bad_caption = _cot("a large red circle at the center", gold.conclusion, gold.reasoning)
    s = score_cot([gold, bad_conclusion, bad_caption, swapped], [gold] * 4)
    assert s["read_right"] == pytest.approx(2 / 4)  # gold and bad_conclusion
    assert s["all_exact"] == pytest.approx(1 / 4)
    assert s["conclusion_exact"] == pytest.approx(3 / 4)
    assert s["caption_exact"] == pytest.approx(3 / 4) and s["reasoning_exact"] == pytest.approx(3 / 4)


def test_score_cot_by_group_matches_score_cot_per_family_and_subset() -> None:
    gold = _cot(describe(SCENE), "a large red circle at the center")
    wrong = _cot(describe(SCENE), "a small red circle at the center")
    queries = [
        CIRQuery("q0", "r", "t", extras={"family": "add", "subset": None}),
        CIRQuery("q1", "r", "t", extras={"family": "add", "subset": "novel_pairs"}),
        CIRQuery("q2", "r", "t", extras={"family": "set", "subset": "novel_pairs"}),
    ]
    groups = score_cot_by_group([gold, wrong, wrong], [gold] * 3, queries)
    assert list(groups) == ["family=add", "family=set", "subset=novel_pairs"]
    assert groups["family=add"] == {**score_cot([gold, wrong], [gold, gold]), "n": 2.0}
    assert groups["subset=novel_pairs"]["conclusion_exact"] == 0.0
    assert groups["subset=novel_pairs"]["read_right"] == 1.0 and groups["family=set"]["n"] == 1.0
    with pytest.raises(DataError):
        score_cot_by_group([gold], [gold], queries)


def test_render_is_deterministic_and_clean() -> None:
    a = np.asarray(render_scene(SCENE, 112, np.random.default_rng(0)))
    b = np.asarray(render_scene(SCENE, 112, np.random.default_rng(0)))
    c = np.asarray(render_scene(SCENE, 112, np.random.default_rng(1)))
    assert a.shape == (112, 112, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    # the centre of the large red circle is red, the empty bottom-left cell is pale background
    assert np.abs(a[56, 56].astype(int) - PALETTE["red"]).max() < 12
    assert a[100, 12].min() > 200
    assert render_scene(SCENE, 224, 0).size == (224, 224)


def test_corpus_covers_the_vocabulary() -> None:
    lines = list(corpus(n_per_family=3))
    assert lines == list(corpus(n_per_family=3))
    words = {w for line in lines for w in line.replace(";", " ").replace(",", " ").split()}
    for word in (
        "red",
        "purple",
        "cross",
        "crosses",
        "triangle",
        "small",
        "large",
        "center",
        "above",
        "swap",
        "then",
    ):
        assert word in words
    texts = " ".join(lines)
    for color, shape in make_world(0).held_out_pairs:  # the tokenizer must know the held-out pairs too
        assert f"{color} {shape}" in texts

"""circot.evaluate and `circot eval` on a tiny generated shapes world with a tiny random model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from circot.errors import CircotError
from circot.evaluate import format_cot_groups
from retrieval_fakes import shapes_tiny_model, small_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return small_world(tmp_path_factory.mktemp("shapes") / "w")


@pytest.fixture(scope="module")
def model():
    return shapes_tiny_model()


def test_evaluate_uses_caches_and_matches_direct_scoring(world, model, tmp_path):
    from circot.data.shapes import load
    from circot.evaluate import evaluate, evaluate_split
    from circot.metrics import evaluate as official

    calls = {"gen": 0}
    original = model._decode_steps

    def counting(seq, *args, **kwargs):  # queries whose reasoning is generated
        calls["gen"] += seq.input_ids.shape[0]
        yield from original(seq, *args, **kwargs)

    model._decode_steps = counting
    try:
        first = evaluate(model, "shapes", world, "val", cache_dir=tmp_path, submission_dir=tmp_path / "sub")
        assert calls["gen"] == 8 and first.cache["cot_generated"] == 8
        assert first.cache["gallery_encoded"] == first.n_gallery
        second = evaluate(model, "shapes", world, "val", cache_dir=tmp_path)
        assert calls["gen"] == 8  # reasoning came from the cache
        assert second.cache == {
            "gallery_encoded": 0,
            "gallery_cached": first.n_gallery,
            "cot_cached": 8,
            "cot_generated": 0,
        }
        assert second.metrics.metrics == first.metrics.metrics
        # with sampled CoTs averaged in, a cached CoT would embed alone: the cache is not read
        model.config.cot_samples = 1
        sampled = evaluate(model, "shapes", world, "val", cache_dir=tmp_path)
        assert calls["gen"] == 8 + 2 * 8 and sampled.cache["cot_cached"] == 0  # greedy and sampled decodes
    finally:
        model.config.cot_samples = 0
        del model._decode_steps
    assert set(first.cot_scores) >= {"caption_f1", "reasoning_exact", "conclusion_exact", "read_right"}
    # per edit family: the counts add up to the split, and the table prints a line per family
    families = {g: v for g, v in first.cot_scores_by_group.items() if g.startswith("family=")}
    assert sum(v["n"] for v in families.values()) == first.n_queries
    table = first.format()
    assert "reasoning exact match per group" in table
    assert all(f"\n  {g} " in table for g in families)
    assert first.to_dict()["cot_scores_by_group"].keys() == first.cot_scores_by_group.keys()
    assert {"R@1", "R@10", "mAP@5"} <= set(first.metrics.metrics)
    preds = json.loads((tmp_path / "sub" / "shapes_val_predictions.json").read_text())
    assert len(preds) == 8

    # the metrics are the official ones on the model's own similarity matrix
    split = load(world, "val")
    report = evaluate_split(model, split, mode="fast", cache_dir=tmp_path, keep_scores=True)
    gallery = model.encode_images([str(split.gallery.paths[i]) for i in split.gallery.ids])
    queries = model.encode_queries(
        [str(split.image_path(q.reference)) for q in split.queries],
        [q.text for q in split.queries],
        mode="fast",
    )
    np.testing.assert_allclose(report.scores, queries @ gallery.T, atol=1e-5)
    assert report.metrics.metrics == official(split, queries @ gallery.T).metrics
    assert report.cot_scores is None and report.cot_scores_by_group is None


def test_eval_cli(cli, world, tmp_path, model):
    model_dir = tmp_path / "m"
    model.save_pretrained(model_dir)
    code, out, err = cli(
        "eval",
        "--dataset",
        "shapes",
        "--root",
        world,
        "--split",
        "val",
        "--model",
        model_dir,
        "--mode",
        "full",
        "--json",
        tmp_path / "r.json",
        "--cache",
        tmp_path / "c",
        "--limit",
        "4",
    )
    assert code == 0, err
    assert "R@1" in out and "caption_f1" in out and "conventions" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["n_queries"] == 4 and set(report["cots"]) and report["mode"] == "full"
    code, _, err = cli(
        "eval", "--dataset", "shapes", "--root", world, "--split", "nope", "--model", model_dir
    )
    assert code != 0 and "unknown split" in err
    code, _, err = cli("eval", "--dataset", "shapes", "--root", tmp_path / "missing", "--split", "val")
    assert code != 0 and "does not exist" in err


def test_evaluate_rejects_bad_mode(world, model, tmp_path):
    from circot.evaluate import evaluate

    with pytest.raises(CircotError, match="mode"):
        evaluate(model, "shapes", world, "val", mode="slow", cache_dir=tmp_path)


def test_format_cot_groups_gives_the_conclusion_given_a_right_reading() -> None:
    base = {"caption_exact": 0.75, "reasoning_exact": 0.5, "conclusion_exact": 0.25}
    lines = format_cot_groups(
        {
            "family=add": {**base, "n": 4.0, "read_right": 0.5, "all_exact": 0.25},
            "subset=novel_pairs": {**base, "n": 2.0, "read_right": 0.0, "all_exact": 0.0},
        }
    )
    assert lines[2].split() == ["family=add", "4", "75.0", "50.0", "25.0", "50.0", "(n", "=", "2)"]
    assert lines[3].split()[-4:] == ["—", "(n", "=", "0)"]

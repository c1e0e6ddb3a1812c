"""Test-server writers, validation and scoring: write -> validate -> score round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cir_datasets import build_circo, build_cirr, build_fashioniq
from circot import metrics, submission
from circot.data import load_split
from circot.errors import CircotError


@pytest.fixture(scope="module")
def cirr_root(tmp_path_factory):
    return build_cirr(tmp_path_factory.mktemp("cirr") / "cirr_dataset", splits=("val", "test1"))


@pytest.fixture(scope="module")
def circo_root(tmp_path_factory):
    return build_circo(tmp_path_factory.mktemp("circo") / "CIRCO")


def random_scores(split, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random((len(split.queries), len(split.gallery.ids)), dtype=np.float32)


def test_cirr_write_validate_score_round_trip(cirr_root, tmp_path):
    split = load_split("cirr", cirr_root, "val")
    scores = random_scores(split)
    recall_path, subset_path = submission.write_cirr_submission(split, tmp_path, scores)
    text = recall_path.read_text()
    assert "\n" not in text.strip()  # compact, like json.dump defaults
    recall = json.loads(text)
    assert (
        list(recall)[:2] == ["version", "metric"]
        and recall["version"] == "rc2"
        and recall["metric"] == "recall"
    )
    for q in split.queries:
        assert len(recall[q.query_id]) == 50 and q.reference not in recall[q.query_id]
    subset = json.loads(subset_path.read_text())
    assert subset["metric"] == "recall_subset"
    assert all(len(subset[q.query_id]) == 3 for q in split.queries)
    reports = submission.validate_files(split, [recall_path, subset_path])
    assert all(r.ok for r in reports), [r.problems for r in reports]
    scored = submission.score_predictions(split, [recall_path, subset_path])
    direct = metrics.evaluate(split, scores)
    assert scored.metrics == pytest.approx(direct.metrics)
    # the recall file alone gives R@K only
    only_recall = submission.score_predictions(split, [recall_path])
    assert "Rs@1" not in only_recall.metrics and only_recall.metrics["R@5"] == direct.metrics["R@5"]


def test_cirr_test1_submission_validates(cirr_root, tmp_path):
    split = load_split("cirr", cirr_root, "test1")
    paths = submission.write_cirr_submission(split, tmp_path, random_scores(split, 1))
    assert [p.name for p in paths] == ["cirr_test1_recall.json", "cirr_test1_recall_subset.json"]
    assert all(r.ok for r in submission.validate_files(split, paths))
    with pytest.raises(CircotError, match="no public ground truth"):
        submission.score_predictions(split, paths)


def test_cirr_validation_problems(cirr_root, tmp_path):
    split = load_split("cirr", cirr_root, "test1")
    recall, subset = submission.cirr_submission(split, random_scores(split))
    q0, q1, q2 = (q.query_id for q in split.queries[:3])
    bad = dict(recall)
    del bad[q0]
    bad[q1] = [split.queries[1].reference, *bad[q1][:49]]
    bad[q2] = bad[q2][:49] + [bad[q2][0]]
    bad["99999"] = recall[q0]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad, indent=2))
    report = submission.validate_cirr_file(split, path)
    text = " | ".join(report.problems)
    assert f"query id '{q0}' is missing" in text
    assert "unknown query id '99999'" in text
    assert "must not be in the ranking" in text
    assert "appears twice" in text
    assert any("indented" in p for p in report.format_problems) and not report.ok
    bad_subset = dict(subset, version="rc1")
    bad_subset[q0] = [split.gallery.ids[-1], *subset[q0][:2]]
    path.write_text(json.dumps(bad_subset))
    report = submission.validate_cirr_file(split, path)
    assert any("'version' must be 'rc2'" in p for p in report.problems)
    assert any("not a member of its image set" in p for p in report.problems)


def test_cirr_size_limit_and_indentation_block_upload_not_scoring(cirr_root, tmp_path, monkeypatch):
    split = load_split("cirr", cirr_root, "val")
    paths = submission.write_cirr_submission(split, tmp_path, random_scores(split))
    expected = submission.score_predictions(split, paths).metrics
    monkeypatch.setattr(submission, "CIRR_MAX_BYTES", 100)
    report = submission.validate_cirr_file(split, paths[0])
    assert not report.ok and any("at most 5 MB" in p for p in report.format_problems)
    with pytest.raises(CircotError, match="at most 5 MB"):
        submission.raise_for_reports([report])
    paths[1].write_text(json.dumps(json.loads(paths[1].read_text()), indent=1))
    assert submission.score_predictions(split, paths).metrics == expected


def test_duplicate_json_key_is_reported(cirr_root, tmp_path):
    split = load_split("cirr", cirr_root, "val")
    recall, _ = submission.cirr_submission(split, random_scores(split))
    q0 = split.queries[0].query_id
    text = json.dumps(recall)
    text = text[:-1] + f', "{q0}": {json.dumps(recall[q0])}}}'
    path = tmp_path / "dup.json"
    path.write_text(text)
    report = submission.validate_cirr_file(split, path)
    assert report.problems == [f"key '{q0}' appears twice"]
    with pytest.raises(CircotError, match="appears twice"):
        submission.score_predictions(split, [path])


def test_circo_write_validate_score_round_trip(circo_root, tmp_path):
    split = load_split("circo", circo_root, "val")
    scores = random_scores(split, 2)
    path = submission.write_circo_submission(split, tmp_path / "circo_val.json", scores)
    data = json.loads(path.read_text())
    assert sorted(data, key=int) == [str(i) for i in range(5)]
    assert all(len(v) == 50 and len(set(v)) == 50 and isinstance(v[0], int) for v in data.values())
    assert submission.validate_files(split, [path])[0].ok
    scored = submission.score_predictions(split, [path])
    assert scored.metrics == pytest.approx(metrics.evaluate(split, scores).metrics)
    # digit strings are accepted as ids too (the official evaluator casts to int)
    path.write_text(json.dumps({k: [str(x) for x in v] for k, v in data.items()}))
    assert submission.validate_files(split, [path])[0].ok
    # a short list and a duplicate id are problems
    data["0"] = data["0"][:10]
    data["1"][1] = data["1"][0]
    path.write_text(json.dumps(data))
    problems = " | ".join(submission.validate_files(split, [path])[0].problems)
    assert "query '0': 10 image ids instead of 50" in problems and "query '1'" in problems


def test_circo_test_submission(circo_root, tmp_path):
    split = load_split("circo", circo_root, "test")
    path = submission.write_circo_submission(split, tmp_path / "circo_test.json", random_scores(split))
    report = submission.validate_circo_file(split, path)
    assert report.ok and report.n_queries == 4


def test_fashioniq_predictions_round_trip(tmp_path):
    root = build_fashioniq(tmp_path / "fiq", n_gallery=55, n_queries=4, splits=("val",))
    split = load_split("fashioniq", root, "val")
    rng = np.random.default_rng(3)
    scores = rng.random((len(split.queries), len(split.gallery.ids)), dtype=np.float32)
    path = submission.write_predictions(split, tmp_path / "fiq.json", scores)
    data = json.loads(path.read_text())
    assert set(data) == {"dress", "shirt", "toptee"} and set(data["dress"]) == {"0", "1", "2", "3"}
    assert all(len(v) == 50 for v in data["shirt"].values())
    scored = submission.score_predictions(split, [path])
    assert scored.metrics == pytest.approx(metrics.evaluate(split, scores).metrics)
    # one category only
    path.write_text(json.dumps({"shirt": data["shirt"]}))
    shirt_only = submission.score_predictions(split, [path])
    assert set(shirt_only.metrics) == {"shirt/R@10", "shirt/R@50", "avg/R@10", "avg/R@50", "Avg"}
    assert shirt_only.metrics["shirt/R@10"] == scored.metrics["shirt/R@10"]
    path.write_text(json.dumps({"skirt": {}}))
    with pytest.raises(CircotError, match="unknown category 'skirt'"):
        submission.score_predictions(split, [path])

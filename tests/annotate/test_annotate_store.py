"""The annotations JSONL: reading, torn-line repair, appending."""

from __future__ import annotations

import json

import pytest

from circot.annotate import read_annotations, rejects_path
from circot.annotate.store import JsonlAppender, repair_torn_tail
from circot.errors import DataError
from circot.prompts import CoT


def _record(qid: str) -> dict:
    return {
        "query_id": qid,
        "dataset": "cirr",
        "split": "val",
        "caption": f"caption {qid}",
        "reasoning": f"reasoning {qid}",
        "conclusion": f"conclusion {qid}",
        "teacher": "test",
        "prompt_version": "v",
        "timings": {},
    }


def test_read_annotations_returns_cots(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(_record(q)) + "\n" for q in ("1", "2")))
    cots = read_annotations(path)
    assert list(cots) == ["1", "2"]
    assert isinstance(cots["2"], CoT)
    assert cots["2"].conclusion == "conclusion 2"


def test_read_annotations_ignores_torn_tail_but_rejects_bad_middle_line(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(_record("1")) + "\n" + '{"query_id": "2", "capt')
    assert list(read_annotations(path)) == ["1"]
    path.write_text("not json\n" + json.dumps(_record("1")) + "\n")
    with pytest.raises(DataError, match="line 1"):
        read_annotations(path)


def test_read_annotations_names_missing_field(tmp_path):
    path = tmp_path / "a.jsonl"
    rec = _record("1")
    del rec["reasoning"]
    path.write_text(json.dumps(rec) + "\n")
    with pytest.raises(DataError, match="reasoning"):
        read_annotations(path)


def test_repair_truncates_exactly_the_torn_line(tmp_path):
    path = tmp_path / "a.jsonl"
    good = json.dumps(_record("1")) + "\n"
    path.write_text(good + '{"query_id": "2"')
    assert repair_torn_tail(path) == len('{"query_id": "2"')
    assert path.read_text() == good
    assert repair_torn_tail(path) == 0


def test_appender_repairs_then_appends(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps(_record("1")) + "\n" + '{"query_id": "2", "cap')
    with JsonlAppender(path) as app:
        assert app.repaired_bytes > 0
        app.write(_record("2"))
    assert list(read_annotations(path)) == ["1", "2"]
    assert path.read_text().count("\n") == 2


def test_rejects_path():
    assert rejects_path("out/cot.jsonl").name == "cot.rejects.jsonl"
    assert rejects_path("out/cot").name == "cot.rejects.jsonl"

"""The annotation run: records, quality control, rejects, resume, torn lines, stops."""

from __future__ import annotations

import json

import pytest

from circot.annotate import read_annotations, rejects_path
from circot.annotate.client import OpenAIChatClient, TeacherFatalError
from circot.annotate.fakeserver import FakeChatServer, Reply, default_answer, request_images, stage_of
from circot.annotate.pipeline import _OutputLock, annotate_split
from circot.annotate.prompts import ANNOTATION_PROMPT_VERSION
from circot.annotate.store import RECORD_KEYS, iter_jsonl
from circot.annotate.teachers import ChatTeacher
from circot.errors import CircotError


def _teacher(server: FakeChatServer, **kw) -> ChatTeacher:
    client = OpenAIChatClient(server.url, "fake", backoff_base=0.01, backoff_max=0.02, max_retries=2, seed=0)
    return ChatTeacher(client, "openai:fake", **kw)


def _lines(path) -> list[dict]:
    return [rec for _, rec in iter_jsonl(path)] if path.exists() else []


def _ids(path) -> list[str]:
    return [rec["query_id"] for rec in _lines(path)]


def test_records_have_the_contract_format_and_training_reads_them(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    with FakeChatServer() as server:
        report = annotate_split(tiny_split, _teacher(server), out, concurrency=4)
    assert report.written == len(tiny_split.queries) and report.rejected == 0
    records = _lines(out)
    assert sorted(r["query_id"] for r in records) == sorted(q.query_id for q in tiny_split.queries)
    for rec in records:
        assert tuple(rec) == RECORD_KEYS
        assert rec["teacher"] == "openai:fake" and rec["prompt_version"] == ANNOTATION_PROMPT_VERSION
        assert {"caption_s", "reasoning_s", "conclusion_s", "total_s"} <= set(rec["timings"])
    cots = read_annotations(out)
    query = tiny_split.queries[3]
    assert query.text in cots[query.query_id].conclusion  # the fake teacher echoes the edit
    # three stages; the conclusion stage alone shows two images (reference, then target)
    assert {stage_of(b) for b in server.bodies} == {"caption", "reasoning", "conclusion"}
    assert all(len(request_images(b)) == (2 if stage_of(b) == "conclusion" else 1) for b in server.bodies)
    assert report.teacher_stats["requests"] == 3 * len(tiny_split.queries)
    assert report.teacher_stats["prompt_tokens"] > 0 and report.records_per_s > 0
    assert not rejects_path(out).exists() or rejects_path(out).read_text() == ""


def test_malformed_answers_are_reasked_then_rejected_with_reason(tiny_split, tmp_path):
    qs = tiny_split.queries

    def responder(body, index):
        stage = stage_of(body)
        text = json.dumps(body)
        if qs[0].text in text and stage == "conclusion":  # leaks the target image every time
            return Reply(text="As shown in the second image, a red shirt with long sleeves.")
        if qs[1].text in text and stage == "reasoning":
            return Reply(text="<reasoning>keep the dog</reasoning> and change the floral pattern")
        if stage == "caption" and index == 0:
            return Reply(text="")  # an empty first answer: re-asked, the second answer is fine
        return None

    out = tmp_path / "cot.jsonl"
    sub = type(tiny_split)(tiny_split.dataset, tiny_split.split, tiny_split.root, qs[:5], tiny_split.gallery)
    with FakeChatServer(responder) as server:
        teacher = _teacher(server)
        report = annotate_split(sub, teacher, out, concurrency=1)
    rejects = {r["query_id"]: r for r in _lines(rejects_path(out))}
    assert set(rejects) == {qs[0].query_id, qs[1].query_id}
    assert "mentions the images" in rejects[qs[0].query_id]["reason"]
    assert "contains tags" in rejects[qs[1].query_id]["reason"]
    assert rejects[qs[0].query_id]["retryable"] is False
    assert rejects[qs[0].query_id]["conclusion"].startswith("As shown")  # what was rejected is kept
    assert set(_ids(out)) == {q.query_id for q in qs[2:5]}
    assert report.written + report.rejected == len(sub.queries)  # nothing dropped
    assert report.teacher_stats["stage_reasks"] >= 3  # empty caption, leaking conclusion, tagged reasoning


def test_conclusion_that_ignores_the_edit_is_rejected(tiny_split, tmp_path):
    caption = "A plain blue cotton shirt on a white background."

    def responder(body, index):
        stage = stage_of(body)
        if stage == "caption":
            return Reply(text=caption)
        if stage == "conclusion":
            return Reply(text=caption)  # repeats the caption: the edit is lost
        return Reply(text="Keep everything about the garment exactly the same as before.")

    out = tmp_path / "cot.jsonl"
    with FakeChatServer(responder) as server:
        report = annotate_split(tiny_split, _teacher(server), out, limit=3)
    assert report.rejected == 3 and report.written == 0
    reason = _lines(rejects_path(out))[0]["reason"]
    assert "repeats the caption" in reason and "no content word" in reason


def test_verify_rejects_conclusions_the_teacher_disowns(tiny_split, tmp_path):
    bad = tiny_split.queries[2]

    def responder(body, index):
        if stage_of(body) == "verify":
            if bad.text in json.dumps(body):
                return Reply(text="NO. The dress in the image is blue.")
            return Reply(text="Yes - it matches.")
        return None

    out = tmp_path / "cot.jsonl"
    with FakeChatServer(responder) as server:
        report = annotate_split(tiny_split, _teacher(server), out, limit=6, verify=True)
    assert server.stages["verify"] == 6
    # queries sharing the bad edit text (every 5th) are rejected by the verifier
    rejected = {r["query_id"]: r["reason"] for r in _lines(rejects_path(out))}
    assert bad.query_id in rejected and "verify" in rejected[bad.query_id]
    assert report.written + report.rejected == 6
    assert all("verify_s" in r["timings"] for r in _lines(out))


def test_request_failures_are_rejected_as_retryable_and_retried_next_run(tiny_split, tmp_path):
    bad = tiny_split.queries[4]
    out = tmp_path / "cot.jsonl"

    def flaky(body, index):
        return Reply(status=500, body="boom") if bad.text in json.dumps(body) else None

    with FakeChatServer(flaky) as server:
        report = annotate_split(tiny_split, _teacher(server), out, concurrency=3)
    failed = {r["query_id"] for r in _lines(rejects_path(out))}
    assert bad.query_id in failed and report.failed == len(failed)
    assert all(r["retryable"] for r in _lines(rejects_path(out)))
    assert report.teacher_stats["retries"]["500"] >= 2

    with FakeChatServer() as server:  # the endpoint recovered
        report = annotate_split(tiny_split, _teacher(server), out, concurrency=3)
    assert report.todo == len(failed) and report.written == len(failed)
    assert sorted(_ids(out)) == sorted(q.query_id for q in tiny_split.queries)
    assert _lines(rejects_path(out)) == []  # superseded rejects are compacted away


def test_quality_rejects_stay_rejected_unless_retried(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    with FakeChatServer(lambda b, i: Reply(text="") if stage_of(b) == "caption" else None) as server:
        annotate_split(tiny_split, _teacher(server), out, limit=4)
    assert len(_lines(rejects_path(out))) == 4
    with FakeChatServer() as server:
        report = annotate_split(tiny_split, _teacher(server), out, limit=4)
        assert report.todo == 0 and server.calls == 0
        report = annotate_split(tiny_split, _teacher(server), out, limit=2, retry_rejects=True)
        assert report.written == 2 and len(_lines(rejects_path(out))) == 2  # rejects out of scope are kept
        report = annotate_split(tiny_split, _teacher(server), out, limit=4, retry_rejects=True)
    assert report.written == 2 and len(_ids(out)) == 4 and _lines(rejects_path(out)) == []


def test_resume_does_only_missing_triplets(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    with FakeChatServer() as server:
        first = annotate_split(tiny_split, _teacher(server), out, limit=5)
        calls = server.calls
        second = annotate_split(tiny_split, _teacher(server), out)
    assert first.written == 5 and second.already_done == 5
    assert second.written == len(tiny_split.queries) - 5
    assert server.calls - calls == 3 * (len(tiny_split.queries) - 5)
    ids = _ids(out)
    assert len(ids) == len(set(ids)) == len(tiny_split.queries)


def test_torn_last_line_is_repaired(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    with FakeChatServer() as server:
        annotate_split(tiny_split, _teacher(server), out, limit=3)
        torn_id = tiny_split.queries[3].query_id
        with open(out, "a") as fh:  # a crash in the middle of writing the 4th record
            fh.write(
                json.dumps({"query_id": torn_id, "dataset": "cirr", "split": "val", "caption": "half"})[:40]
            )
        assert set(read_annotations(out)) == {q.query_id for q in tiny_split.queries[:3]}
        report = annotate_split(tiny_split, _teacher(server), out)
    assert report.repaired_bytes == 40 and report.already_done == 3
    ids = _ids(out)
    assert sorted(ids) == sorted(q.query_id for q in tiny_split.queries) and len(ids) == len(set(ids))
    assert out.read_text().endswith("\n")


def test_unauthorized_stops_the_run_without_writing(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    with FakeChatServer(api_key="right-key") as server, pytest.raises(TeacherFatalError, match="401"):
        annotate_split(tiny_split, _teacher(server), out, concurrency=4)
    assert server.calls <= 4  # one request per worker at most, then stop
    assert _lines(out) == [] and _lines(rejects_path(out)) == []


def test_many_failures_in_a_row_stop_the_run(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    with (
        FakeChatServer(lambda b, i: Reply(status=502, body="bad gateway")) as server,
        pytest.raises(CircotError, match="in a row failed"),
    ):
        annotate_split(tiny_split, _teacher(server), out, concurrency=1, max_consecutive_failures=3)
    assert len(_lines(rejects_path(out))) == 3


def test_one_writer_per_file_and_one_split_per_file(tiny_split, tmp_path):
    out = tmp_path / "cot.jsonl"
    lock = _OutputLock(out)
    try:
        with FakeChatServer() as server, pytest.raises(CircotError, match="another annotation run"):
            annotate_split(tiny_split, _teacher(server), out)
    finally:
        lock.release()
    with FakeChatServer() as server:
        annotate_split(tiny_split, _teacher(server), out, limit=1)
        other = type(tiny_split)("fashioniq", "val", tiny_split.root, tiny_split.queries, tiny_split.gallery)
        with pytest.raises(CircotError, match="belongs to cirr/val"):
            annotate_split(other, _teacher(server), out)


def test_missing_image_is_a_reject_not_a_crash(tiny_split, tmp_path):
    tiny_split.gallery.paths["img1"].unlink()
    out = tmp_path / "cot.jsonl"
    with FakeChatServer() as server:
        report = annotate_split(tiny_split, _teacher(server), out, limit=3)
    reasons = [r["reason"] for r in _lines(rejects_path(out))]
    assert report.written + report.rejected == 3 and reasons
    assert all("does not exist" in r for r in reasons)


def test_default_answers_pass_quality_control():
    body = {
        "messages": [
            {
                "role": "user",
                "content": "Write one or two sentences describing the image the user "
                'is looking for\nModification requested by the user: "is red"\n',
            }
        ]
    }
    assert "is red" in default_answer(body)


def test_a_flaky_endpoint_still_gives_every_triplet_once(tiny_split, tmp_path):
    def chaos(body, index):
        if index % 7 == 1:
            return Reply(status=429, body={"error": {"message": "rate"}}, headers={"Retry-After": "0.05"})
        if index % 11 == 2:
            return Reply(status=500, body="oops")
        if index % 13 == 3:
            return Reply(text="late", delay=1.0)  # beyond the client timeout
        if index % 17 == 4:
            return Reply(body="{not json")
        return None

    out = tmp_path / "cot.jsonl"
    with FakeChatServer(chaos) as server:
        client = OpenAIChatClient(
            server.url, "fake", timeout=0.3, backoff_base=0.01, backoff_max=0.05, seed=1
        )
        report = annotate_split(tiny_split, ChatTeacher(client, "openai:fake"), out, concurrency=4)
    assert report.written == len(tiny_split.queries) and report.rejected == 0
    assert set(report.teacher_stats["retries"]) == {"429", "500", "timeout", "malformed"}
    ids = _ids(out)
    assert sorted(ids) == sorted(q.query_id for q in tiny_split.queries) and len(ids) == len(set(ids))

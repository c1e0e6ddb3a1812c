"""An annotator killed with SIGKILL mid-run and restarted: every triplet ends up in the JSONL exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from annotate_fixtures import write_cirr

from circot.annotate import read_annotations, rejects_path
from circot.annotate.fakeserver import FakeChatServer
from circot.annotate.store import iter_jsonl, repair_torn_tail
from circot.data import load_split

N = 24


def _lines(path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_sigkill_mid_run_then_resume_gives_each_triplet_once(tmp_path, cli):
    root = write_cirr(tmp_path / "cirr", n=N)
    out = tmp_path / "cot.jsonl"
    with FakeChatServer(latency=0.03) as server:
        args = [
            "annotate", "--dataset", "cirr", "--root", str(root), "--split", "val", "--teacher", "openai",
            "--base-url", server.url, "--model", "fake", "--concurrency", "2", "--out", str(out), "--no-progress",
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "circot", "-q", *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while _lines(out) < 5 and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert proc.poll() is None, proc.stderr.read().decode()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        assert proc.returncode == -signal.SIGKILL
        # a request the killed process sent just before dying may still be counted by the server: wait until the
        # count settles before taking it as the baseline of the restarted run
        calls_before, settle_deadline = -1, time.monotonic() + 10
        while server.calls != calls_before and time.monotonic() < settle_deadline:
            calls_before = server.calls
            time.sleep(0.3)
        done_at_kill = len(read_annotations(out))
        assert 5 <= done_at_kill < N

        code, stdout, err = cli(*args, "--json")
        assert code == 0, err
    import json

    report = json.loads(stdout)
    assert report["already_done"] == done_at_kill
    assert report["todo"] == N - done_at_kill == report["written"]
    assert server.calls - calls_before == 3 * (N - done_at_kill)  # nothing done twice after the restart
    ids = [rec["query_id"] for _, rec in iter_jsonl(out)]
    expected = [q.query_id for q in load_split("cirr", root, "val").queries]
    assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
    assert repair_torn_tail(out) == 0
    assert not rejects_path(out).exists() or rejects_path(out).read_text() == ""

"""`circot annotate` on tiny fixtures in the official FashionIQ and CIRR layouts."""

from __future__ import annotations

import json

from annotate_fixtures import write_cirr, write_fashioniq

from circot.annotate import read_annotations
from circot.annotate.fakeserver import FakeChatServer
from circot.data import load_split


def test_cli_annotates_fashioniq_with_an_openai_endpoint(tmp_path, cli, monkeypatch):
    root = write_fashioniq(tmp_path / "fiq", n=4)
    out = tmp_path / "fiq.jsonl"
    monkeypatch.setenv("MY_TEACHER_KEY", "secret-value-42")
    with FakeChatServer(api_key="secret-value-42") as server:
        code, stdout, err = cli(
            "annotate", "--dataset", "fashioniq", "--root", root, "--split", "val", "--teacher", "openai",
            "--base-url", server.url, "--model", "qwen-vl", "--api-key-env", "MY_TEACHER_KEY",
            "--concurrency", "2", "--verify", "--out", out, "--json",
        )  # fmt: skip
    assert code == 0, err
    report = json.loads(stdout)
    assert report["written"] == 4 and report["teacher"] == "openai:qwen-vl"
    assert server.stages["verify"] == 4
    split = load_split("fashioniq", root, "val")
    cots = read_annotations(out)
    assert set(cots) == {q.query_id for q in split.queries}
    assert "secret-value-42" not in out.read_text() + stdout + err
    text = next(q.text for q in split.queries)
    assert all(text in c.conclusion for c in cots.values())


def test_cli_limit_then_resume_on_cirr(tmp_path, cli):
    root = write_cirr(tmp_path / "cirr", n=6)
    out = tmp_path / "cirr.jsonl"
    with FakeChatServer() as server:
        base = ["annotate", "--dataset", "cirr", "--root", root, "--split", "val", "--teacher", "openai",
                "--base-url", server.url, "--model", "m", "--out", out]  # fmt: skip
        code, stdout, err = cli(*base, "--limit", "2")
        assert code == 0, err
        assert "written 2" in stdout
        code, stdout, err = cli(*base)
        assert code == 0, err
        assert "already done 2" in stdout and "written 4" in stdout
    assert len(out.read_text().splitlines()) == 6
    assert server.stages["caption"] == 6


def test_cli_errors_are_one_line(tmp_path, cli):
    root = write_cirr(tmp_path / "cirr", n=2)
    out = tmp_path / "x.jsonl"
    common = ["--root", root, "--split", "val", "--out", out]
    code, _, err = cli("annotate", "--dataset", "cirr", *common, "--teacher", "openai", "--model", "m")
    assert code != 0 and "error: --teacher openai needs --base-url" in err
    code, _, err = cli("annotate", "--dataset", "cirr", *common, "--teacher", "shapes")
    assert code != 0 and "shapes world only" in err
    code, _, err = cli("annotate", "--dataset", "circo", *common, "--teacher", "openai")
    assert code != 0 and "dataset must be one of" in err
    with FakeChatServer(api_key="k") as server:
        code, _, err = cli("annotate", "--dataset", "cirr", *common, "--teacher", "openai", "--model", "m",
                           "--base-url", server.url, "--api-key-env", "CIRCOT_TEST_UNSET_KEY")  # fmt: skip
    assert code != 0 and err.startswith("error: teacher endpoint") and "401" in err
    assert len(err.strip().splitlines()) == 1

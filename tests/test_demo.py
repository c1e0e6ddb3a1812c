"""`circot demo` end to end on a tiny random model (and its fallback when no shipped model exists)."""

from __future__ import annotations

import json

from retrieval_fakes import tiny_model


def test_demo_runs_and_reuses_its_work(cli, tmp_path, monkeypatch):
    import circot.loading
    import circot.model
    from circot.data.shapes import corpus

    # no shipped model: the demo falls back to a random tiny model (made small here to keep the test quick)
    monkeypatch.setattr(circot.loading, "default_model_path", lambda: tmp_path / "no-model")
    small = tiny_model(corpus=list(corpus()))
    monkeypatch.setattr(circot.model.CIRCoT, "tiny", classmethod(lambda cls, **kw: small))

    code, out, err = cli("demo", "--workdir", tmp_path / "demo", "--queries", "3", "--k", "4")
    assert code == 0, err
    assert "WARNING" in out and "RANDOM" in out  # the fallback is obvious
    assert out.count("caption:") == 3 and out.count("conclusion:") == 3
    assert "results (target" in out
    report = tmp_path / "demo" / "report.html"
    assert f"report: {report}" in out
    page = report.read_text()
    assert "WARNING" in page and page.count("data:image/png;base64,") == 3 * (1 + 4)

    code, out, err = cli("demo", "--workdir", tmp_path / "demo", "--queries", "3", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["fallback_model"] and result["reused"] == {"world": True, "index": True}
    families = [q["family"] for q in result["queries"]]
    assert len(set(families)) == 3  # different edit families
    for q in result["queries"]:
        assert len(q["results"]) == 5 and set(q["cot"]) >= {"caption", "reasoning", "conclusion"}
        ranks = [r["id"] for r in q["results"]]
        assert (q["target_rank"] is None) == (not set(ranks) & set(q["targets"]))

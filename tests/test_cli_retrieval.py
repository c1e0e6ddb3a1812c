"""`circot index build | add | info` and `circot search` on tiny random models and generated images."""

from __future__ import annotations

import json

import pytest

from retrieval_fakes import tiny_model_dir, write_images


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def test_index_build_add_info_search(cli, tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("CIRCOT_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "g", 5, size=24)
    code, out, err = cli(
        "index",
        "build",
        "--model",
        model_dir,
        "--images",
        tmp_path / "g",
        "--out",
        tmp_path / "ix",
        "--batch-size",
        "2",
        "--json",
    )
    assert code == 0, err
    info = json.loads(out)
    assert info["count"] == 5 and info["dim"] == 32 and info["model"] == str(model_dir.resolve())

    write_images(tmp_path / "g", 2, start=5, size=24)
    code, out, err = cli("index", "add", "--index", tmp_path / "ix", "--images", tmp_path / "g", "--json")
    assert code == 0, err
    assert json.loads(out)["added"] == 2 and json.loads(out)["count"] == 7

    code, out, _ = cli("index", "info", "--index", tmp_path / "ix")
    assert code == 0 and "count: 7" in out

    # the model is found through the manifest; full mode prints the three parts of the reasoning
    code, out, err = cli(
        "search",
        "--index",
        tmp_path / "ix",
        "--image",
        tmp_path / "g" / "img-0001.png",
        "--text",
        "make the circle green",
        "--k",
        "3",
    )
    assert code == 0, err
    assert "caption" in out and "reasoning" in out and "conclusion" in out
    assert out.count(".png") == 3

    code, out, err = cli(
        "search",
        "--index",
        tmp_path / "ix",
        "--image",
        tmp_path / "g" / "img-0001.png",
        "--text",
        "make it red",
        "--k",
        "10",
        "--mode",
        "fast",
        "--json",
    )
    assert code == 0, err
    result = json.loads(out)
    assert result["cot"] is None and len(result["results"]) == 7
    scores = [r["score"] for r in result["results"]]
    assert scores == sorted(scores, reverse=True)

    given = [
        "--image",
        tmp_path / "g" / "img-0001.png",
        "--text",
        "make it red",
        "--conclusion",
        "a red circle",
    ]
    code, out, err = cli("search", "--index", tmp_path / "ix", *given, "--json")
    assert code == 0, err
    assert json.loads(out)["cot"]["conclusion"] == "a red circle" and json.loads(out)["cot_given"]

    # --fast-weight blends the fast embedding into full mode's; --cot-samples averages sampled CoTs into a generated
    # query's embedding (a given CoT embeds alone). The index stays the model's (the fingerprint ignores both).
    settings = [(given, "--fast-weight", ("0", "0.5"), "1.5"), (given[:4], "--cot-samples", ("0", "1"), "-1")]
    for query, option, values, bad in settings:
        scores = []
        for v in values:
            code, out, err = cli("search", "--index", tmp_path / "ix", *query, option, v, "--json")
            assert code == 0, err
            scores.append({r["id"]: r["score"] for r in json.loads(out)["results"]})
        assert scores[0] != scores[1], option
        code, _, err = cli("search", "--index", tmp_path / "ix", *query, option, bad)
        assert code != 0 and option in err and "Traceback" not in err
    # --cot-choice gallery shows, of the greedy CoT and its samples, the one that best matches a gallery image; the
    # ranking stays the same
    sampled = [*given[:4], "--cot-samples", "2"]
    outs = []
    for choice in ("greedy", "gallery"):
        code, out, err = cli("search", "--index", tmp_path / "ix", *sampled, "--cot-choice", choice, "--json")
        assert code == 0, err
        outs.append(json.loads(out))
    assert outs[0]["results"] == outs[1]["results"]
    code, _, err = cli("search", "--index", tmp_path / "ix", *sampled, "--cot-choice", "vote")
    assert code != 0 and "cot_choice must be one of" in err and "Traceback" not in err


def test_cli_errors_are_one_line(cli, tmp_path, model_dir):
    code, _, err = cli(
        "index", "build", "--model", model_dir, "--images", tmp_path / "nothing", "--out", tmp_path / "ix"
    )
    assert code != 0 and "error: images:" in err and "nothing" in err and "Traceback" not in err
    code, _, err = cli("search", "--index", tmp_path / "nope", "--image", "x.png", "--text", "t")
    assert code != 0 and "not an index folder" in err
    write_images(tmp_path / "g", 2, size=24)
    code, _, err = cli(
        "index",
        "build",
        "--model",
        model_dir,
        "--images",
        tmp_path / "g",
        "--out",
        tmp_path / "ix",
        "--factory",
        "Bogus7",
        "--no-cache",
    )
    assert code != 0 and "factory" in err

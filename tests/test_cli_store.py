"""`circot index build | add | remove | info` and `circot search` on both stores, chosen by --store."""

from __future__ import annotations

import json

import pytest

from retrieval_fakes import tiny_model_dir, write_images

pytest.importorskip("milvus_lite")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def search(cli, store, image, k=10):
    code, out, err = cli(
        "search", "--store", store, "--image", image, "--text", "make it red", "--k", k, "--mode", "fast", "--json"
    )  # fmt: skip
    assert code == 0, err
    return json.loads(out)["results"]


def test_index_commands_and_search_on_both_stores(cli, tmp_path, model_dir, monkeypatch):
    monkeypatch.setenv("CIRCOT_CACHE", str(tmp_path / "cache"))
    write_images(tmp_path / "g", 5, size=24)
    stores = {
        "faiss": str(tmp_path / "ix"),
        "milvus-lite": f"milvus-lite://{tmp_path / 'gallery.db'}?collection=g",
    }
    results = {}
    for kind, store in stores.items():
        code, out, err = cli(
            "index", "build", "--model", model_dir, "--images", tmp_path / "g", "--store", store, "--json"
        )  # fmt: skip
        assert code == 0, (kind, err)
        assert json.loads(out)["count"] == 5
        write_images(tmp_path / "more", 2, start=5, size=24)
        code, out, err = cli("index", "add", "--store", store, "--images", tmp_path / "more", "--json")
        assert code == 0, (kind, err)
        assert (json.loads(out)["added"], json.loads(out)["count"]) == (2, 7)
        code, out, err = cli("index", "add", "--store", store, "--images", tmp_path / "more", "--replace")
        assert code == 0, (kind, err)
        assert ": 7 images (2 added or replaced)" in out

        (tmp_path / "drop.txt").write_text("# ids to drop\nimg-0001.png\n\nnot-in-the-index.png\n")
        code, out, err = cli(
            "index", "remove", "--store", store, "--ids", "img-0002.png", "--ids-file", tmp_path / "drop.txt", "--json"
        )  # fmt: skip
        assert code == 0, (kind, err)
        info = json.loads(out)
        assert (info["removed"], info["not_found"], info["count"]) == (2, 1, 5)

        code, out, err = cli("index", "info", "--store", store, "--json")
        assert code == 0, (kind, err)
        manifest = json.loads(out)
        assert (
            manifest["count"] == 5 and manifest["dim"] == 32 and manifest["model"] == str(model_dir.resolve())
        )

        hits = search(cli, store, tmp_path / "g" / "img-0003.png")
        assert len(hits) == 5 and {h["id"] for h in hits}.isdisjoint({"img-0001.png", "img-0002.png"})
        assert all(h["path"].endswith(h["id"]) for h in hits)
        results[kind] = hits
    # the same gallery and model rank the same way in both stores
    assert [h["id"] for h in results["faiss"]] == [h["id"] for h in results["milvus-lite"]]
    for a, b in zip(results["faiss"], results["milvus-lite"], strict=True):
        assert a["score"] == pytest.approx(b["score"], abs=1e-4)


def test_store_errors_are_one_line(cli, tmp_path, model_dir):
    write_images(tmp_path / "g", 2, size=24)
    db = f"milvus-lite://{tmp_path / 'g.db'}"
    code, _, err = cli("index", "info", "--store", db)
    assert code != 0 and "no circot index named 'gallery'" in err and "Traceback" not in err
    code, _, err = cli("index", "remove", "--store", str(tmp_path / "ix"))
    assert code != 0 and "--ids" in err
    code, _, err = cli(
        "index", "build", "--model", model_dir, "--images", tmp_path / "g", "--store", db, "--factory", "HNSW32"
    )  # fmt: skip
    assert code != 0 and "do not apply to Milvus" in err and "Traceback" not in err
    code, _, err = cli("search", "--store", "milvus://127.0.0.1:1/g", "--image", "x.png", "--text", "t")
    assert code != 0 and "cannot reach the Milvus server" in err and "Traceback" not in err

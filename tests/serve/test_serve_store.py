"""``circot serve --store`` on a milvus-lite store answers as it does on the faiss index of the same gallery."""

from __future__ import annotations

import pytest

pytest.importorskip("milvus_lite")


def test_serve_a_milvus_lite_store(cli, client, tiny_model, gallery_index, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient
    from PIL import Image

    from circot.store import build_store

    store = f"milvus-lite://{tmp_path / 'gallery.db'}?collection=shapes"
    with build_store(store, gallery_index.dim, gallery_index.model_fingerprint) as milvus:
        milvus.add(gallery_index.vectors(), gallery_index.ids, gallery_index.paths)
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve() sets it process-wide
    code, _, err = cli("serve", "--store", store, "--model", model_dir)
    assert code == 0, err
    query = {"text": "make it red", "gallery_id": "blue-circle.png", "k": 4, "mode": "fast"}
    with TestClient(started["app"]) as served:
        assert served.get("/health").json()["index_matches_model"]
        listing = served.get("/api/gallery", params={"limit": 100}).json()
        assert sorted(item["id"] for item in listing["items"]) == sorted(gallery_index.ids)
        got = served.post("/api/search", data=query).json()["results"]
        image = served.get("/api/images/red-square.png")
        assert (
            image.status_code == 200 and image.content == gallery_index.path_of("red-square.png").read_bytes()
        )
    want = client.post("/api/search", data=query).json()["results"]
    assert [r["id"] for r in got] == [r["id"] for r in want] and len(got) == 4
    assert [r["score"] for r in got] == pytest.approx([r["score"] for r in want], abs=1e-4)
    started["app"].state.engine.index.close()  # frees the database for other processes

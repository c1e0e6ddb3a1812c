"""Uploads cost little memory (admitted first, decoded a few at a time, downscaled while decoded); odd aspect
ratios are answered in JSON; an optional API key guards the API."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from serve_helpers import draw, png_bytes

from circot.serve import ServeLimits
from circot.serve.uploads import decode_upload


def test_a_busy_server_refuses_before_decoding(tiny_model, gallery_index, monkeypatch):
    from fastapi.testclient import TestClient

    from circot.serve import create_app

    app = create_app(gallery_index, tiny_model, limits=ServeLimits(max_pending=1))
    opened = []
    real_open = Image.open

    def counting_open(fp, *args, **kwargs):
        opened.append(fp)
        return real_open(fp, *args, **kwargs)

    upload = {"image": ("ref.png", png_bytes(draw("circle", (200, 30, 30))), "image/png")}
    with TestClient(app) as client:
        engine = app.state.engine
        assert engine.try_admit()  # the only place is taken
        monkeypatch.setattr(Image, "open", counting_open)
        try:
            for path in ("/api/search", "/api/search/edited", "/api/search/stream"):
                data = {"text": "make it blue", "conclusion": "a blue circle"}
                response = client.post(path, data=data, files=upload)
                assert response.status_code == 503 and response.headers["retry-after"]
        finally:
            engine.release_admission()
        assert opened == []  # no upload was decoded for a request that could not be served
        monkeypatch.setattr(Image, "open", real_open)
        response = client.post("/api/search", data={"text": "make it blue", "mode": "fast"}, files=upload)
        assert response.status_code == 200, response.text


def test_large_uploads_are_downscaled_while_decoding():
    big = Image.new("RGB", (3000, 2000), (10, 200, 30))
    for fmt in ("PNG", "JPEG"):
        picture, size = decode_upload(png_bytes(big, fmt), ServeLimits(), target_pixels=112 * 112)
        assert size == (3000, 2000)
        assert 112 * 112 <= picture.width * picture.height <= 4 * 112 * 112, (fmt, picture.size)
        assert picture.mode == "RGB" and abs(picture.width / picture.height - 1.5) < 0.05
    small, size = decode_upload(
        png_bytes(draw("square", (0, 0, 255))), ServeLimits(), target_pixels=112 * 112
    )
    assert small.size == size == (96, 96)  # nothing to reduce


def test_exif_rotation_survives_the_downscale():
    image = Image.new("RGB", (1200, 600), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown upright as 600 × 1200
    buf = io.BytesIO()
    image.save(buf, format="JPEG", exif=exif)
    picture, _ = decode_upload(buf.getvalue(), ServeLimits(), target_pixels=100 * 100)
    assert picture.height > picture.width


def test_default_limits_bound_decoding_memory():
    limits = ServeLimits()
    # the uploads decoded at once, at the largest allowed size, 4 bytes a pixel, fit in about 1 GB
    assert limits.max_decoding * limits.max_pixels * 4 <= 1024**3
    with pytest.raises(Exception, match="max_decoding"):
        ServeLimits(max_decoding=0)


@pytest.mark.parametrize("size", [(3000, 10), (10, 3000), (3000, 1)])  # ratios over 200
def test_extreme_aspect_ratio_upload_is_answered_in_json(client, size):
    strip = Image.new("RGB", size, (200, 40, 40))
    files = {"image": ("strip.png", png_bytes(strip), "image/png")}
    response = client.post("/api/search", data={"text": "make it blue", "mode": "fast", "k": 3}, files=files)
    assert response.headers["content-type"].startswith("application/json")
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["results"]) == 3
    assert (body["query"]["reference"]["width"], body["query"]["reference"]["height"]) == size


def test_api_key_is_required_as_a_bearer_token(tiny_model, gallery_index):
    from fastapi.testclient import TestClient

    from circot.serve import create_app

    with TestClient(create_app(gallery_index, tiny_model)) as client:
        assert client.get("/health").json()["api_key_required"] is False
    app = create_app(gallery_index, tiny_model, api_key="s3cret-key")
    with TestClient(app) as client:
        health = client.get("/health")  # liveness stays open, and tells the page to ask for the key
        assert health.status_code == 200 and health.json()["api_key_required"] is True
        assert client.get("/").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-key"}):
            response = client.get("/api/gallery", headers=headers)
            assert response.status_code == 401 and "API key" in response.json()["detail"]
            assert response.headers["www-authenticate"] == "Bearer"
        ok = client.get("/api/gallery", headers={"Authorization": "Bearer s3cret-key"})
        assert ok.status_code == 200 and ok.json()["total"] == len(gallery_index.ids)
        image_id = gallery_index.ids[0]
        assert client.get(f"/api/images/{image_id}").status_code == 401


def test_serve_api_key_env(cli, tiny_model, gallery_index, tmp_path, monkeypatch):
    import uvicorn
    from fastapi.testclient import TestClient

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)  # serve() sets it process-wide
    model_dir = tiny_model.save_pretrained(tmp_path / "model")
    index_dir = gallery_index.save(tmp_path / "gallery.index")
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    monkeypatch.delenv("CIRCOT_TEST_KEY", raising=False)
    args = ["serve", "--index", index_dir, "--model", model_dir, "--api-key-env", "CIRCOT_TEST_KEY"]
    code, _, err = cli(*args)
    assert (
        code != 0
        and err.strip()
        == "error: --api-key-env: the environment variable 'CIRCOT_TEST_KEY' is not set or empty"
    )
    monkeypatch.setenv("CIRCOT_TEST_KEY", "k-123")
    code, _, err = cli(*args)
    assert code == 0, err
    assert started["host"] == "127.0.0.1"  # still loopback by default
    with TestClient(started["app"]) as client:
        assert client.get("/api/gallery").status_code == 401
        assert client.get("/api/gallery", headers={"Authorization": "Bearer k-123"}).status_code == 200


def test_an_unexpected_failure_is_answered_in_json(tiny_model, gallery_index, monkeypatch):
    from fastapi.testclient import TestClient

    from circot.serve import create_app

    app = create_app(gallery_index, tiny_model)

    def broken(*args, **kwargs):
        raise ValueError("something the processor did not expect")

    monkeypatch.setattr(app.state.engine, "search", broken)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post("/api/search", data={"text": "x", "gallery_id": gallery_index.ids[0]})
    assert response.status_code == 500 and response.headers["content-type"].startswith("application/json")
    assert "internal error" in response.json()["detail"]

"""Every bad input gets a 4xx with a one-line message; nothing reaches the file system but the id map."""

from __future__ import annotations

import io

import pytest
from PIL import Image
from serve_helpers import LIMITS, draw, png_bytes, png_claiming

from circot.serve import ServeLimits, UploadRejected, decode_image

SEARCH_ENDPOINTS = ("/api/search", "/api/search/stream", "/api/search/edited")
GALLERY_ID = "blue-square.png"


def post(client, endpoint, data=None, files=None):
    data = {"text": "make it red", **(data or {})}
    if endpoint.endswith("/edited"):
        data.setdefault("conclusion", "a red square")
    return client.post(endpoint, data=data, files=files)


def upload(content: bytes, name: str = "ref.png", kind: str = "image/png"):
    return {"image": (name, content, kind)}


def assert_error(response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and "Traceback" not in detail
    for word in words:
        assert word.lower() in detail.lower(), detail
    return detail


def noisy_png(side: int, seed: int = 0) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    return png_bytes(Image.fromarray(rng.integers(0, 255, (side, side, 3), dtype=np.uint8)))


# ---- uploads -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_upload_over_the_file_limit(client, endpoint):
    data = noisy_png(150)  # ~67 kB of noise: over the 60 kB file limit, under the body limit
    assert LIMITS["max_upload_bytes"] < len(data) < ServeLimits(**LIMITS).max_body_bytes
    assert_error(post(client, endpoint, files=upload(data)), 413, "larger than the limit", "MB")


def test_request_body_over_the_limit_is_refused_before_reading(client):
    data = b"\x00" * (ServeLimits(**LIMITS).max_body_bytes + 10)
    assert_error(post(client, "/api/search", files=upload(data)), 413, "request body")


def test_streamed_body_without_length_is_cut_off(client):
    boundary = "xyzboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\nmake it red\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    def body():
        yield head
        for _ in range(40):  # 40 × 8 kB: far over the limit, sent without a Content-Length
            yield b"\x00" * 8192
        yield f"\r\n--{boundary}--\r\n".encode()

    response = client.post(
        "/api/search", content=body(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_error(response, 413, "request body")


@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_decompression_bomb_header_is_refused(client, endpoint):
    bomb = png_claiming(100_000, 100_000)  # 10 gigapixels declared in a file of a few hundred bytes
    assert len(bomb) < 1000
    assert_error(post(client, endpoint, files=upload(bomb)), 413, "decompression bomb")


def test_bomb_in_pil_warning_range_is_refused(client):
    # over PIL's warning threshold (89 Mpx) but under its error threshold: the warning becomes a refusal
    bomb = png_claiming(10_000, 10_000)
    assert_error(post(client, "/api/search", files=upload(bomb)), 413, "decompression bomb")


def test_too_many_pixels(client):
    data = png_bytes(Image.new("RGB", (300, 300), (200, 10, 10)))  # small file, 90 000 pixels > 40 000
    assert len(data) < LIMITS["max_upload_bytes"]
    assert_error(post(client, "/api/search", files=upload(data)), 413, "300×300", "40,000 pixels")


@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_not_an_image(client, endpoint):
    assert_error(post(client, endpoint, files=upload(b"hello, I am text", "notes.png")), 415, "not an image")


def test_unsupported_image_format(client):
    buf = io.BytesIO()
    draw("circle", (1, 2, 3), size=32).save(buf, format="TIFF")
    assert_error(post(client, "/api/search", files=upload(buf.getvalue(), "a.tiff")), 415, "supported format")


@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_corrupt_image(client, endpoint):
    data = noisy_png(100)
    truncated = data[: len(data) // 2]
    assert_error(post(client, endpoint, files=upload(truncated)), 400, "corrupt")


def test_empty_upload(client):
    assert_error(post(client, "/api/search", files=upload(b"")), 400, "empty")


# ---- fields --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_text_too_long(client, endpoint):
    response = post(client, endpoint, data={"text": "x" * 121, "gallery_id": GALLERY_ID})
    assert_error(response, 422, "text", "120 characters")


@pytest.mark.parametrize("text", ["", "   "])
def test_text_empty(client, text):
    response = post(client, "/api/search", data={"text": text, "gallery_id": GALLERY_ID})
    assert_error(response, 422, "text")


@pytest.mark.parametrize("k", ["0", "-3", "21", "ten", "1.5"])
@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_bad_k(client, endpoint, k):
    assert_error(post(client, endpoint, data={"k": k, "gallery_id": GALLERY_ID}), 422, "k")


def test_bad_mode(client):
    assert_error(post(client, "/api/search", data={"mode": "slow", "gallery_id": GALLERY_ID}), 422, "mode")


@pytest.mark.parametrize("endpoint", SEARCH_ENDPOINTS)
def test_unknown_gallery_id(client, endpoint):
    assert_error(post(client, endpoint, data={"gallery_id": "purple-star.png"}), 404, "purple-star.png")


def test_both_or_neither_reference(client):
    data = png_bytes(draw("circle", (220, 50, 47)))
    assert_error(
        post(client, "/api/search", data={"gallery_id": GALLERY_ID}, files=upload(data)), 400, "not both"
    )
    assert_error(post(client, "/api/search"), 400, "reference image")


def test_edited_conclusion_checks(client):
    base = {"text": "make it red", "gallery_id": GALLERY_ID}
    assert_error(client.post("/api/search/edited", data={**base, "conclusion": "  "}), 422, "conclusion")
    assert_error(client.post("/api/search/edited", data={**base, "conclusion": "y" * 301}), 422, "conclusion")
    assert_error(client.post("/api/search/edited", data=base), 422, "conclusion")


# ---- file access only through the id map ---------------------------------------------------------------
@pytest.mark.parametrize(
    "attempt",
    [
        "../../../../etc/passwd",
        "..%2F..%2F..%2F..%2Fetc%2Fpasswd",
        "%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "%2Fetc%2Fpasswd",
        "..\\..\\windows\\win.ini",
        "red-circle.png/../../../etc/passwd",
        "red-circle.png%00.txt",
        "",
    ],
)
def test_path_traversal_is_not_found(client, attempt):
    response = client.get(f"/api/images/{attempt}")
    assert response.status_code == 404
    assert "root:" not in response.text


def test_absolute_gallery_path_is_not_an_id(client, gallery_index):
    real = str(gallery_index.path_of("red-circle.png"))  # a file the server does serve, but by id only
    assert client.get("/api/images/" + real.lstrip("/")).status_code == 404
    assert client.post("/api/search", data={"text": "x", "gallery_id": real}).status_code == 404


# ---- the decoder on its own ----------------------------------------------------------------------------
def test_decode_image_converts_modes():
    limits = ServeLimits(**LIMITS)
    for mode in ("RGBA", "L", "P", "1"):
        image = decode_image(png_bytes(Image.new(mode, (20, 10))), limits)
        assert image.mode == "RGB" and image.size == (20, 10)


def test_decode_image_errors_carry_status():
    limits = ServeLimits(**LIMITS)
    with pytest.raises(UploadRejected) as info:
        decode_image(b"GIF89a" + b"\x00" * 5, limits)
    assert info.value.status_code in (400, 415)


def test_limits_must_be_positive():
    from circot.errors import ConfigError

    with pytest.raises(ConfigError, match="max_k"):
        ServeLimits(max_k=0)

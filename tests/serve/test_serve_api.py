"""The web API on a tiny random model and a gallery of drawn shapes: happy paths, streaming, steering."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from PIL import Image
from serve_helpers import draw, png_bytes

from circot.prompts import CoT
from circot.search import search_query

GALLERY_ID = "red-circle.png"


def sse_events(text: str) -> list[tuple[str, dict]]:
    events = []
    for block in text.replace("\r\n", "\n").split("\n\n"):
        if not block.strip():
            continue
        name = next(line[6:].strip() for line in block.splitlines() if line.startswith("event:"))
        data = "\n".join(line[5:].lstrip() for line in block.splitlines() if line.startswith("data:"))
        events.append((name, json.loads(data)))
    return events


def expected(model, index, image, text, k, mode="full", cot=None):
    """What the library (``circot search``) answers for the same query: (cot, [(id, score)])."""
    result = search_query(model, index, image, text, k=k, mode=mode, cot=cot)
    return result.cot, [(h.id, h.score) for h in result.hits]


def hits(body) -> list[tuple[str, float]]:
    return [(r["id"], r["score"]) for r in body["results"]]


def assert_same_hits(got, want):
    assert [i for i, _ in got] == [i for i, _ in want]
    np.testing.assert_allclose([s for _, s in got], [s for _, s in want], rtol=0, atol=1e-5)


def test_health(client, tiny_model, gallery_index):
    body = client.get("/health").json()
    assert body["status"] == "ok"
    assert body["gallery_size"] == len(gallery_index.ids) == 12
    assert body["model_fingerprint"] == tiny_model.fingerprint
    assert body["index_matches_model"] is True
    assert body["limits"]["max_k"] == 20


def test_openapi_documents_every_endpoint(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    for path in (
        "/health",
        "/api/gallery",
        "/api/images/{gallery_id}",
        "/api/search",
        "/api/search/stream",
        "/api/search/edited",
    ):
        assert path in paths, path
    form_ref = paths["/api/search"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"]
    form = schema["components"]["schemas"][form_ref.rsplit("/", 1)[-1]]
    assert {"text", "mode", "k", "image", "gallery_id"} <= set(form["properties"])
    assert form["properties"]["text"]["maxLength"] == 120
    assert "SearchOut" in schema["components"]["schemas"]
    assert "text/event-stream" in paths["/api/search/stream"]["post"]["responses"]["200"]["content"]


def test_page_is_self_contained(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("/static/app.js", "/static/style.css"):
        response = client.get(asset)
        assert response.status_code == 200, asset
    # nothing is fetched from another origin (no CDN): every URL in the page and its files is local
    for text in (page.text, client.get("/static/app.js").text, client.get("/static/style.css").text):
        assert not re.search(r"(src|href)=[\"']?(https?:)?//", text)
        assert "https://" not in text and "http://" not in text


def test_gallery_listing_pages_and_filters(client, gallery_index):
    first = client.get("/api/gallery", params={"limit": 5}).json()
    assert first["total"] == 12 and len(first["items"]) == 5
    rest = client.get("/api/gallery", params={"offset": 5, "limit": 100}).json()
    assert [i["id"] for i in first["items"] + rest["items"]] == list(gallery_index.ids)
    circles = client.get("/api/gallery", params={"q": "CIRCLE"}).json()
    assert circles["total"] == 4 and all("circle" in i["id"] for i in circles["items"])
    assert client.get("/api/gallery", params={"limit": 0}).status_code == 422


def test_gallery_image_by_id(client, gallery_index):
    item = client.get("/api/gallery", params={"limit": 1}).json()["items"][0]
    response = client.get(item["url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "image/png"
    assert response.content == gallery_index.path_of(item["id"]).read_bytes()


def test_search_by_gallery_id_matches_the_library(client, tiny_model, gallery_index):
    text = "make the circle green"
    response = client.post("/api/search", data={"text": text, "gallery_id": GALLERY_ID, "k": 5})
    assert response.status_code == 200, response.text
    body = response.json()
    image = Image.open(gallery_index.path_of(GALLERY_ID)).convert("RGB")
    cot, want = expected(tiny_model, gallery_index, image, text, 5)
    assert_same_hits(hits(body), want)
    assert body["cot"]["raw"] == cot.raw
    assert set(body["cot"]) >= {"caption", "reasoning", "conclusion", "well_formed", "problems"}
    assert body["query"] == {
        "text": text,
        "mode": "full",
        "k": 5,
        "reference": {
            "kind": "gallery",
            "id": GALLERY_ID,
            "url": f"/api/images/{GALLERY_ID}",
            "width": 96,
            "height": 96,
        },
    }
    assert [r["rank"] for r in body["results"]] == [1, 2, 3, 4, 5]
    scores = [r["score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True)
    for result in body["results"]:
        assert client.get(result["url"]).status_code == 200


def test_search_by_upload_fast_matches_the_library(client, tiny_model, gallery_index):
    image = draw("square", (40, 100, 220), size=80, offset=3)
    response = client.post(
        "/api/search",
        data={"text": "make it yellow", "mode": "fast", "k": 20},
        files={"image": ("mine.png", png_bytes(image), "image/png")},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cot"] is None
    assert body["query"]["reference"] == {
        "kind": "upload",
        "id": None,
        "url": None,
        "width": 80,
        "height": 80,
    }
    # k larger than the gallery returns the whole gallery, ranked
    _, want = expected(tiny_model, gallery_index, image.convert("RGB"), "make it yellow", 12, mode="fast")
    assert_same_hits(hits(body), want)


def test_jpeg_upload_is_accepted(client):
    data = png_bytes(draw("triangle", (60, 170, 80)), fmt="JPEG")
    response = client.post(
        "/api/search",
        data={"text": "add a red circle", "mode": "fast"},
        files={"image": ("x.jpg", data, "image/jpeg")},
    )
    assert response.status_code == 200, response.text


def test_search_from_edited_reasoning(client, tiny_model, gallery_index):
    text = "make the circle green"
    edited = {
        "caption": "a red circle",
        "reasoning": "the circle turns green",
        "conclusion": "a green circle",
    }
    response = client.post(
        "/api/search/edited", data={"text": text, "gallery_id": GALLERY_ID, "k": 12, **edited}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["edited"] is True
    assert {k: body["cot"][k] for k in edited} == edited
    image = Image.open(gallery_index.path_of(GALLERY_ID)).convert("RGB")
    _, want = expected(tiny_model, gallery_index, image, text, 12, cot=CoT(**edited))
    assert_same_hits(hits(body), want)
    # the user steers: another conclusion gives another query embedding, so other scores
    other = client.post(
        "/api/search/edited",
        data={"text": text, "gallery_id": GALLERY_ID, "k": 12, "conclusion": "a yellow square"},
    )
    assert other.status_code == 200
    assert dict(hits(other.json())) != pytest.approx(dict(hits(body)), abs=1e-6)


def test_stream_sends_reasoning_then_results(client, tiny_model, gallery_index):
    text = "remove the small yellow triangle"
    response = client.post("/api/search/stream", data={"text": text, "gallery_id": GALLERY_ID, "k": 4})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "start" and names[-3:] == ["cot", "results", "done"]
    assert set(names[1:-3]) == {"token"} and len(names) > 4
    streamed = "".join(data["text"] for name, data in events if name == "token")
    cot = events[-3][1]
    assert cot["raw"] == streamed
    # the streamed text is what the model generates for this query
    image = Image.open(gallery_index.path_of(GALLERY_ID)).convert("RGB")
    assert streamed == "".join(tiny_model.stream_reasoning(image, text))
    # the results are the embedding at the <emb> that closed this reasoning, searched in the index: what the
    # library answers for the same query
    results = events[-2][1]
    assert results["cot"] == cot
    _, want = expected(tiny_model, gallery_index, image, text, 4)
    assert_same_hits(hits(results), want)
    # and they are what the non-streaming endpoint answers
    plain = client.post("/api/search", data={"text": text, "gallery_id": GALLERY_ID, "k": 4}).json()
    assert_same_hits(hits(results), hits(plain))
    assert {k: plain["cot"][k] for k in ("caption", "reasoning", "conclusion", "raw")} == {
        k: cot[k] for k in ("caption", "reasoning", "conclusion", "raw")
    }


def test_gallery_choice_shows_the_same_cot_streamed_or_not(client, tiny_model, gallery_index):
    """cot_choice gallery (with sampled CoTs): the stream writes the greedy CoT as it is decoded, then shows the
    CoT that search shows, which is a sample for some queries; the ranking is search's."""
    cfg = tiny_model.config
    cfg.cot_samples, cfg.sampling_temperature, cfg.cot_choice = 3, 1.0, "gallery"
    image = Image.open(gallery_index.path_of(GALLERY_ID)).convert("RGB")
    swapped = 0
    try:
        for text in ("remove the small yellow triangle", "make the circle green", "add a blue square"):
            form = {"text": text, "gallery_id": GALLERY_ID, "k": 4}
            events = sse_events(client.post("/api/search/stream", data=form).text)
            streamed = "".join(data["text"] for name, data in events if name == "token")
            cot, results = events[-3][1], events[-2][1]
            assert streamed == "".join(tiny_model.stream_reasoning(image, text))
            plain = client.post("/api/search", data=form).json()
            want_cot, want_hits = expected(tiny_model, gallery_index, image, text, 4)
            assert cot["raw"] == plain["cot"]["raw"] == want_cot.raw
            assert_same_hits(hits(results), want_hits)
            swapped += cot["raw"] != streamed
    finally:
        cfg.cot_samples, cfg.sampling_temperature, cfg.cot_choice = 0, 1.0, "greedy"
    assert swapped  # a sample was shown for some query: the choice was made


def test_stream_fast_mode_has_no_reasoning(client):
    response = client.post(
        "/api/search/stream", data={"text": "add a star", "gallery_id": GALLERY_ID, "mode": "fast", "k": 3}
    )
    assert response.status_code == 200
    events = sse_events(response.text)
    assert [name for name, _ in events] == ["start", "results", "done"]
    assert events[1][1]["cot"] is None and len(events[1][1]["results"]) == 3

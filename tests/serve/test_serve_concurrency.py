"""Concurrent requests give the sequential answers, and the model is never entered by two threads."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from serve_helpers import GuardedModel, SlowStream, draw, png_bytes

from circot.errors import CircotError
from circot.serve import ServeLimits, create_app

QUERIES = [
    ("/api/search", {"text": "make the circle green", "gallery_id": "red-circle.png", "k": 5}, None),
    ("/api/search", {"text": "remove the triangle", "gallery_id": "blue-triangle.png", "mode": "fast"}, None),
    ("/api/search", {"text": "add a blue square", "k": 3}, "upload"),
    (
        "/api/search/edited",
        {"text": "make it red", "gallery_id": "green-square.png", "conclusion": "a red square"},
        None,
    ),
    ("/api/search/stream", {"text": "move it to the right", "gallery_id": "yellow-circle.png", "k": 4}, None),
    ("/api/search", {"text": "make the circle green", "gallery_id": "red-circle.png", "k": 5}, None),
]


def run(client, endpoint, data, files):
    if files == "upload":
        files = {"image": ("u.png", png_bytes(draw("circle", (200, 120, 40), size=64)), "image/png")}
    response = client.post(endpoint, data=data, files=files)
    assert response.status_code == 200, response.text
    if endpoint.endswith("/stream"):
        return response.text
    body = response.json()
    body.pop("timings_ms")
    return body


@pytest.fixture(scope="module")
def guarded_client(tiny_model, gallery_index):
    model = GuardedModel(tiny_model)
    with TestClient(create_app(gallery_index, model)) as client:
        yield client, model


def strip_timings(stream_text: str) -> str:
    import re

    return re.sub(r'"timings_ms": \{[^}]*\}', "", stream_text)


def test_concurrent_requests_match_sequential(guarded_client):
    client, model = guarded_client
    sequential = [run(client, *q) for q in QUERIES]
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = [pool.submit(run, client, *q) for q in QUERIES * 2]
        concurrent = [f.result(timeout=120) for f in futures]
    for i, got in enumerate(concurrent):
        want = sequential[i % len(QUERIES)]
        if isinstance(want, str):
            assert strip_timings(got) == strip_timings(want)
        else:
            assert got == want
    assert model.calls >= 3 * len(QUERIES)
    assert model.max_active == 1, "the model was entered by two threads at once"


def test_busy_server_answers_503(tiny_model, gallery_index):
    model = GuardedModel(tiny_model, pause=0)
    model.gate = threading.Event()
    app = create_app(gallery_index, model, limits=ServeLimits(max_pending=1))
    data = {"text": "make it red", "gallery_id": "red-square.png", "mode": "fast"}
    with TestClient(app) as client, ThreadPoolExecutor(max_workers=1) as pool:
        first = pool.submit(client.post, "/api/search", data=data)
        assert model.entered.wait(timeout=30), "the first request never reached the model"
        second = client.post("/api/search", data=data)
        assert second.status_code == 503 and "busy" in second.json()["detail"]
        assert second.headers["retry-after"]
        model.gate.set()
        assert first.result(timeout=60).status_code == 200
        # the place is given back: the next request is served
        assert client.post("/api/search", data=data).status_code == 200
        streamed = client.post("/api/search/stream", data=data)
        assert streamed.status_code == 200 and "event: results" in streamed.text
        assert client.post("/api/search/stream", data=data).status_code == 200


def test_index_from_another_model_is_refused(tiny_model, gallery_index):
    class Other:
        fingerprint = "someone-else"
        embedding_dim = tiny_model.embedding_dim

    with pytest.raises(CircotError, match="rebuild the index"):
        create_app(gallery_index, Other())
    app = create_app(gallery_index, Other(), check_fingerprint=False)
    with TestClient(app) as client:
        assert client.get("/health").json()["index_matches_model"] is False


def test_client_leaving_a_stream_frees_the_model(tiny_model, gallery_index, serve_live):
    import httpx
    from PIL import Image

    image = Image.open(gallery_index.path_of("red-circle.png")).convert("RGB")
    full = len(list(tiny_model.stream_reasoning(image, "make the circle green")))
    assert full >= 4
    model = SlowStream(tiny_model, delay=0.25)  # the whole reasoning would take full × 0.25 s
    app = create_app(gallery_index, model)
    url = serve_live(app)
    data = {"text": "make the circle green", "gallery_id": "red-circle.png"}
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", url + "/api/search/stream", data=data) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("event: token"):
                    break  # the first piece of reasoning arrived: leave
        assert model.closed.wait(timeout=20), "the generation went on after the client left"
        assert model.pieces < full
        engine = app.state.engine
        deadline = time.monotonic() + 20
        while engine.model_lock.locked() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.model_lock.locked()
        again = client.post(url + "/api/search", data={**data, "mode": "fast"})
        assert again.status_code == 200

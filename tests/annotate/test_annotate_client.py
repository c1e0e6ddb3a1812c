"""The OpenAI-compatible client against a real HTTP server on loopback with scripted answers."""

from __future__ import annotations

import asyncio
import base64
import logging
import time

import pytest

from circot.annotate.client import (
    OpenAIChatClient,
    TeacherFatalError,
    TeacherRequestError,
    parse_retry_after,
)
from circot.annotate.fakeserver import FakeChatServer, Reply, request_images
from circot.annotate.prompts import caption_prompt


def _client(server: FakeChatServer, **kw) -> OpenAIChatClient:
    options = {"backoff_base": 0.01, "backoff_max": 0.05, "max_retries": 3, "timeout": 5.0, "seed": 0}
    options.update(kw)
    return OpenAIChatClient(server.url, "fake-model", **options)


def _chat(client: OpenAIChatClient, image) -> str:
    async def go():
        try:
            return (await client.chat(caption_prompt(image))).text
        finally:
            await client.aclose()

    return asyncio.run(go())


@pytest.fixture
def image(tmp_path):
    from PIL import Image

    path = tmp_path / "ref.png"
    Image.new("RGB", (8, 8), "red").save(path)
    return path


def test_images_travel_as_base64_data_urls(image):
    with FakeChatServer() as server:
        client = _client(server)
        text = _chat(client, image)
    assert text.startswith("A single item")
    (url,) = request_images(server.bodies[0])
    assert url.startswith("data:image/png;base64,")
    assert base64.b64decode(url.split(",", 1)[1]) == image.read_bytes()
    assert server.bodies[0]["model"] == "fake-model"
    assert client.stats.successes == 1 and client.stats.completion_tokens > 0


def test_429_with_retry_after_is_honoured(image):
    arrivals: list[float] = []

    def responder(body, index):
        arrivals.append(time.monotonic())
        if index < 2:
            return Reply(status=429, body={"error": {"message": "slow down"}}, headers={"Retry-After": "0.3"})
        return None

    with FakeChatServer(responder) as server:
        client = _client(server)
        assert _chat(client, image).startswith("A single item")
    assert server.statuses[429] == 2 and server.statuses[200] == 1
    assert client.stats.retries["429"] == 2
    # each retry waited at least the server's Retry-After (backoff alone would be <= 0.05 s)
    assert arrivals[1] - arrivals[0] >= 0.29 and arrivals[2] - arrivals[1] >= 0.29


def test_5xx_retried_then_gives_up(image):
    with FakeChatServer(
        lambda body, i: Reply(status=500 if i < 2 else 200, text="a fine caption here")
    ) as server:
        client = _client(server)
        assert _chat(client, image) == "a fine caption here"
    assert client.stats.retries["500"] == 2

    with FakeChatServer(lambda body, i: Reply(status=503, body="upstream down")) as server:
        client = _client(server, max_retries=2)
        with pytest.raises(TeacherRequestError, match="gave up after 3 attempts: HTTP 503") as info:
            _chat(client, image)
    assert info.value.retryable
    assert server.calls == 3


def test_slow_answer_times_out_and_is_retried(image):
    with FakeChatServer(
        lambda body, i: Reply(text="slow but fine answer", delay=2.0 if i == 0 else 0.0)
    ) as server:
        client = _client(server, timeout=0.3)
        assert _chat(client, image) == "slow but fine answer"
    assert client.stats.retries["timeout"] == 1


def test_malformed_bodies_are_retried(image):
    bad = ["this is not json", {"choices": []}, {"choices": [{"message": {"content": None}}]}]

    def responder(body, i):
        return Reply(body=bad[i]) if i < len(bad) else Reply(text="finally a caption")

    with FakeChatServer(responder) as server:
        client = _client(server, max_retries=5)
        assert _chat(client, image) == "finally a caption"
    assert client.stats.retries["malformed"] == 3


@pytest.mark.parametrize("status", [401, 403, 404])
def test_auth_and_route_errors_stop_at_once(image, status):
    with FakeChatServer(lambda body, i: Reply(status=status, body={"error": {"message": "nope"}})) as server:
        client = _client(server)
        with pytest.raises(TeacherFatalError, match=f"answered {status}"):
            _chat(client, image)
    assert server.calls == 1  # no retry


def test_other_4xx_fails_this_request_only(image):
    with FakeChatServer(
        lambda body, i: Reply(status=400, body={"error": {"message": "image too large"}})
    ) as server:
        client = _client(server)
        with pytest.raises(TeacherRequestError, match="image too large") as info:
            _chat(client, image)
    assert not info.value.retryable and server.calls == 1


def test_api_key_is_sent_but_never_logged(image, caplog):
    secret = "sk-test-very-secret-key-123"
    with FakeChatServer(api_key=secret) as server:
        caplog.set_level(logging.DEBUG)
        client = OpenAIChatClient(server.url, "m", api_key=secret)
        assert _chat(client, image).startswith("A single item")
        client = _client(server)  # no key: the server refuses
        with pytest.raises(TeacherFatalError) as info:
            _chat(client, image)
    assert "401" in str(info.value)
    assert secret not in caplog.text and secret not in str(info.value)


def test_parse_retry_after():
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after("0.5") == 0.5
    assert parse_retry_after(None) is None and parse_retry_after("soon") is None
    from email.utils import formatdate

    assert 5 < parse_retry_after(formatdate(time.time() + 10, usegmt=True)) <= 10
    assert parse_retry_after(formatdate(time.time() - 100, usegmt=True)) == 0.0


def test_base_url_must_be_http():
    from circot.errors import CircotError

    with pytest.raises(CircotError, match="base-url"):
        OpenAIChatClient("localhost:8000/v1", "m")

"""A served reasoner: CoTs from a chat-completions server on loopback, embedded by the local pooling pass.

The server, started by each test, answers with the shipped shapes model's own greedy CoT (as vLLM serving the
exported model would): it renders the request's messages with the model's chat template, checks that they give
the local prompt, decodes the image from its data URL, and stops at the request's stop string.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from circot import prompts
from circot.annotate.fakeserver import FakeChatServer, Reply, request_images
from circot.reasoner import (
    LocalReasoner,
    OpenAIReasoner,
    ReasonerError,
    ReasonerReplyError,
    make_reasoner,
    parse_reply,
)
from circot.search import embed_queries, load_model

FAST = {
    "backoff_base": 0.01,
    "backoff_max": 0.02,
    "max_retries": 2,
    "timeout": 120.0,
    "seed": 0,
}  # generous: a loaded CI machine answers slowly


@pytest.fixture(scope="module")
def model():
    import torch

    torch.set_num_threads(1)
    # a served reasoner hands back the greedy CoT alone, which embeds as given (no sampled CoTs averaged in)
    return load_model(None, "cpu", cot_samples=0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from circot.data import shapes

    root = shapes.generate(
        tmp_path_factory.mktemp("shapes"), seed=11, n_train=0, n_val=4, n_test=0, n_novel=0
    )
    return root, shapes.load(root, "val")


@pytest.fixture(scope="module")
def queries(world):
    _, split = world
    return [str(split.image_path(q.reference)) for q in split.queries[:4]], [
        q.text for q in split.queries[:4]
    ]


class ModelReplies:
    """A responder that answers chat completions with ``model``'s greedy CoT, like a served circot model."""

    def __init__(self, model):
        self.model = model
        self.lock = threading.Lock()
        self.mismatches: list[str] = []

    def __call__(self, body, index):
        messages = body["messages"]
        rendered = self.model.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        instruction = next(p["text"] for p in messages[-1]["content"] if p["type"] == "text")
        if rendered != prompts.render_prompt(instruction, 1, self.model.config.system_prompt):
            self.mismatches.append(rendered)
            return Reply(status=400, body={"error": {"message": "not the circot prompt"}})
        head, tail = prompts.QUERY_INSTRUCTION_FULL.split("{text}")
        text = instruction[len(head) : len(instruction) - len(tail)]
        (url,) = request_images(body)
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
        with self.lock:
            cot = self.model.generate_reasoning([image], [text], batch_size=1)[0]
        answer = cot.raw
        if body.get("skip_special_tokens", True) is not False:  # a server's default: special tokens dropped
            answer = prompts.strip_special_tokens(answer)
        for stop in body.get("stop") or []:
            if stop in answer:
                return Reply(text=answer[: answer.index(stop)], stop_reason=stop)
        if len(cot.token_ids or []) >= body.get("max_tokens", 10**9):
            return Reply(text=answer, finish_reason="length")
        return Reply(text=answer)


def _reasoner(server, **kw) -> OpenAIReasoner:
    return OpenAIReasoner(server.url, "circot", concurrency=4, **{**FAST, **kw})


def test_served_cots_embed_as_the_local_decode(model, queries):
    images, texts = queries
    local = embed_queries(model, images, texts, "full", batch_size=4)
    assert all(c.well_formed for c in local.cots)
    replies = ModelReplies(model)
    with FakeChatServer(replies) as server:
        reasoner = _reasoner(server)
        try:
            remote = embed_queries(model, images, texts, "full", batch_size=4, reasoner=reasoner)
            # a given CoT is not asked for: only the other three queries reach the server
            mixed = embed_queries(
                model, images, texts, "full", [local.cots[0], None, None, None], 4, reasoner
            )
        finally:
            reasoner.close()
    assert not replies.mismatches
    np.testing.assert_allclose(remote.embeddings, local.embeddings, atol=1e-4)
    np.testing.assert_allclose(mixed.embeddings, local.embeddings, atol=1e-4)
    for got, want in zip(remote.cots, local.cots, strict=True):
        assert (got.caption, got.reasoning, got.conclusion) == (want.caption, want.reasoning, want.conclusion)
        assert got.well_formed and got.token_ids is None
    assert remote.generated == [True] * 4 and mixed.generated == [False, True, True, True]
    assert server.calls == 4 + 3 and remote.timings["cot_s"] > 0
    body = server.bodies[0]
    assert body["model"] == "circot" and body["temperature"] == 0.0
    assert body["max_tokens"] == model.config.max_cot_tokens
    assert body["stop"] == ["<emb>"] and body["skip_special_tokens"] is False
    sent = {base64.b64decode(request_images(b)[0].split(",", 1)[1]) for b in server.bodies[:4]}
    assert sent == {Path(p).read_bytes() for p in images}


def test_an_in_memory_image_is_sent_losslessly(model, queries):
    """The web service's references are PIL images: sent as PNG, they reason and embed as their file does."""
    images, texts = queries
    picture = Image.open(images[1]).convert("RGB")
    with FakeChatServer(ModelReplies(model)) as server:
        reasoner = _reasoner(server)
        try:
            got = embed_queries(model, [picture], texts[1:2], "full", batch_size=1, reasoner=reasoner)
        finally:
            reasoner.close()
    want = embed_queries(model, [images[1]], texts[1:2], "full", batch_size=1)
    np.testing.assert_allclose(got.embeddings, want.embeddings, atol=1e-4)


def test_a_server_that_is_down_stops_with_one_clear_error_after_the_retries(model, queries):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now
    reasoner = OpenAIReasoner(f"http://127.0.0.1:{port}/v1", "circot", **FAST)
    try:
        with pytest.raises(ReasonerError, match=r"query 1 .*gave up after 3 attempts: connection failed"):
            embed_queries(model, *[q[:1] for q in queries], "full", batch_size=1, reasoner=reasoner)
    finally:
        reasoner.close()


def test_500s_are_retried_then_stop_and_401_stops_at_once(model, queries):
    images, texts = queries
    with FakeChatServer(
        lambda body, i: Reply(status=500, body={"error": {"message": "engine died"}})
    ) as server:
        reasoner = _reasoner(server)
        try:
            with pytest.raises(ReasonerError, match=r"gave up after 3 attempts: HTTP 500: engine died"):
                reasoner.reason(model, images[:1], texts[:1])
        finally:
            reasoner.close()
    assert server.calls == 3
    with FakeChatServer(api_key="right") as server:
        reasoner = OpenAIReasoner(server.url, "circot", "wrong", **FAST)
        try:
            with pytest.raises(ReasonerError, match=r"reasoner endpoint .* answered 401") as caught:
                reasoner.reason(model, images[:2], texts[:2])
        finally:
            reasoner.close()
    assert "wrong" not in str(caught.value)  # the key is never shown
    assert server.calls <= 2


def test_a_reply_without_conclusion_is_one_clear_error_naming_the_query(model, queries):
    images, texts = queries
    answers = {
        0: "<caption>a red circle</caption><reasoning>it turns blue</reasoning><conclusion>a blue circle"
    }

    def script(body, i):
        text = answers.get(i, "The image shows a circle.")
        return Reply(text=text, stop_reason="<emb>" if i == 0 else None)

    with FakeChatServer(script) as server:
        reasoner = OpenAIReasoner(server.url, "circot", concurrency=1, **FAST)
        try:
            with pytest.raises(ReasonerReplyError) as caught:
                reasoner.reason(model, images[:3], texts[:3])
        finally:
            reasoner.close()
    message = str(caught.value)
    assert message.startswith("2 of 3 replies")
    assert "query 2 (" in message and "query 3 (" in message and "query 1 (" not in message
    assert "missing <conclusion>" in message and "reply begins 'The image shows a circle.'" in message


def test_replies_with_special_tokens_dropped_get_a_hint(model, queries):
    """A server that keeps its default (special tokens out of the text) loses circot's tags."""
    images, texts = queries
    with FakeChatServer(
        lambda body, i: ModelReplies(model)({**body, "skip_special_tokens": True}, i)
    ) as server:
        reasoner = _reasoner(server)
        try:
            with pytest.raises(ReasonerReplyError, match="may drop special tokens"):
                reasoner.reason(model, images[:2], texts[:2])
        finally:
            reasoner.close()


def test_faulty_replies_with_a_conclusion_are_embedded_and_flagged_as_a_local_decode_is(model, queries):
    images, texts = queries
    script = {
        0: Reply(text="<reasoning>it turns blue</reasoning><conclusion>a blue circle</conclusion>"),
        1: Reply(
            text="<caption>a</caption><reasoning>b</reasoning><conclusion>a blue", finish_reason="length"
        ),
    }
    with FakeChatServer(lambda body, i: script[i]) as server:
        reasoner = OpenAIReasoner(server.url, "circot", concurrency=1, **FAST)
        try:
            q = embed_queries(model, images[:2], texts[:2], "full", batch_size=2, reasoner=reasoner)
        finally:
            reasoner.close()
    first, second = q.cots
    assert not first.well_formed and first.problems == ["missing <caption>"]
    assert not second.well_formed and "no <emb>" in second.problems and second.conclusion == "a blue"
    want = embed_queries(model, images[:2], texts[:2], "full", [first, second], 2)
    np.testing.assert_allclose(q.embeddings, want.embeddings, atol=1e-6)


def test_parse_reply_follows_the_local_parser(model, queries):
    images, texts = queries
    (cot,) = LocalReasoner().reason(model, images[:1], texts[:1])
    assert cot.raw.endswith("<emb>")
    body = cot.raw[: -len("<emb>")]
    for got in (parse_reply(cot.raw), parse_reply(body, "stop", "<emb>"), parse_reply(body, "stop")):
        assert got.to_dict() | {"raw": ""} == prompts.parse_cot(cot.raw, True).to_dict() | {"raw": ""}
    assert parse_reply(body, "length").problems == ["no <emb>"]
    assert parse_reply(body, "stop", 151645).problems == ["no <emb>"]  # ended its turn instead


def test_reasoner_options_are_checked(monkeypatch):
    from circot.errors import CircotError

    assert isinstance(make_reasoner(), LocalReasoner)
    with pytest.raises(CircotError, match="--base-url need --reasoner openai"):
        make_reasoner("local", base_url="http://x/v1")
    with pytest.raises(CircotError, match="needs --base-url"):
        make_reasoner("openai", model="m")
    with pytest.raises(CircotError, match="needs --reasoner-model"):
        make_reasoner("openai", base_url="http://x/v1")
    with pytest.raises(CircotError, match="must start with http"):
        make_reasoner("openai", base_url="x:8000", model="m")
    with pytest.raises(CircotError, match="one of local, openai"):
        make_reasoner("vllm")
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(CircotError, match="'NO_SUCH_KEY' is not set"):
        make_reasoner("openai", base_url="http://x/v1", model="m", api_key_env="NO_SUCH_KEY")


def test_cli_search_and_eval_take_a_served_reasoner(cli, model, world, tmp_path, monkeypatch):
    from circot.gallery import build_index

    root, split = world
    monkeypatch.setenv("CIRCOT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CIRCOT_REASONER_API_KEY", "sekret")
    gallery = [split.gallery.paths[i] for i in split.gallery.ids][:6]
    build_index(model, gallery, out=tmp_path / "ix", use_cache=False)
    query = split.queries[0]
    ref = split.image_path(query.reference)
    common = ["--reasoner", "openai", "--reasoner-model", "circot"]
    with FakeChatServer(ModelReplies(model), api_key="sekret") as server:
        code, out, err = cli(
            "search", "--index", tmp_path / "ix", "--image", ref, "--text", query.text, "--json",
            "--base-url", server.url, *common,
        )  # fmt: skip
        assert code == 0, err
        remote = json.loads(out)
        code, out, err = cli(
            "eval", "--dataset", "shapes", "--root", root, "--split", "val", "--limit", "2",
            "--json", tmp_path / "report.json", "--base-url", server.url, *common,
        )  # fmt: skip
        assert code == 0, err
        assert "reasoner openai" in out
    code, out, err = cli("search", "--index", tmp_path / "ix", "--image", ref, "--text", query.text, "--json")
    assert code == 0, err
    local = json.loads(out)
    assert remote["cot"]["conclusion"] == local["cot"]["conclusion"] and remote["cot"]["well_formed"]
    assert [h["id"] for h in remote["results"]] == [h["id"] for h in local["results"]]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["reasoner"].startswith("openai http://127.0.0.1")
    assert server.calls == 1 + 2
    code, _, err = cli(
        "search", "--index", tmp_path / "ix", "--image", ref, "--text", "x", "--base-url", "http://h/v1"
    )
    assert code == 2 and "need --reasoner openai" in err


def test_the_web_service_engine_takes_a_served_reasoner(model, world, tmp_path):
    """Search and streamed search with a served CoT give the local engine's reasoning and ranking; a failing
    server answers 502 over HTTP."""
    from fastapi.testclient import TestClient

    from circot.gallery import build_index
    from circot.index import GalleryIndex
    from circot.serve import create_app
    from circot.serve.engine import SearchEngine

    _, split = world
    gallery = [split.gallery.paths[i] for i in split.gallery.ids][:6]
    build_index(model, gallery, out=tmp_path / "ix", use_cache=False)
    index = GalleryIndex.load(tmp_path / "ix")
    query = split.queries[1]
    picture = Image.open(split.image_path(query.reference)).convert("RGB")
    want = SearchEngine(index, model).search(picture, query.text, "full", 3)
    with FakeChatServer(ModelReplies(model)) as server:
        reasoner = _reasoner(server)
        try:
            engine = SearchEngine(index, model, reasoner=reasoner)
            got = engine.search(picture, query.text, "full", 3)
            events: list = []
            streamed = engine.stream_search(
                picture, query.text, "full", 3, lambda e, d: events.append(e), threading.Event()
            )
        finally:
            reasoner.close()
    for outcome in (got, streamed):
        assert outcome.cot.conclusion == want.cot.conclusion
        assert [h.id for h in outcome.hits] == [h.id for h in want.hits]
        assert [h.score for h in outcome.hits] == pytest.approx([h.score for h in want.hits], abs=1e-4)
        assert outcome.timings_ms["reasoning"] > 0
    assert events == ["token", "cot"] and server.calls == 2

    with FakeChatServer(lambda body, i: Reply(status=503)) as server:
        reasoner = _reasoner(server)
        try:
            client = TestClient(create_app(index, model, reasoner=reasoner))
            buf = io.BytesIO()
            picture.save(buf, format="PNG")
            files = {"image": ("ref.png", buf.getvalue(), "image/png")}
            response = client.post("/api/search", data={"text": query.text, "mode": "full"}, files=files)
        finally:
            reasoner.close()
    assert response.status_code == 502 and "gave up after 3 attempts: HTTP 503" in response.json()["detail"]

"""A scripted OpenAI-compatible chat-completions server on loopback, for tests, benchmarks and dry runs.

It answers ``POST /v1/chat/completions`` from a thread, on ``127.0.0.1`` and an ephemeral port. By default it
writes plausible stage answers built from the prompt (so that quality control accepts them); a ``responder``
can script anything else per request: HTTP errors with ``Retry-After``, malformed bodies, slow answers.

    with FakeChatServer(latency=0.05) as server:
        client = OpenAIChatClient(server.url, "fake")
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from circot.annotate import prompts as P


@dataclass
class Reply:
    """A scripted answer: ``text`` becomes a chat completion (ended by ``finish_reason``, and ``stop_reason``
    when set, as vLLM reports the stop string that ended it); ``body`` (dict or raw string) overrides it."""

    text: str | None = None
    status: int = 200
    body: dict[str, Any] | str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    finish_reason: str = "stop"
    stop_reason: Any = None


def request_text(body: dict[str, Any]) -> str:
    """All text of the last user message of a chat-completions request body."""
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content", "")
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content if part.get("type") == "text")


def request_images(body: dict[str, Any]) -> list[str]:
    """The image URLs of a request body, in order."""
    urls = []
    for message in body.get("messages") or []:
        content = message.get("content")
        if isinstance(content, list):
            urls += [p["image_url"]["url"] for p in content if p.get("type") == "image_url"]
    return urls


def stage_of(body: dict[str, Any]) -> str:
    """Which annotation stage a request is: caption, reasoning, conclusion, verify (or unknown)."""
    text = request_text(body)
    if text.startswith(P.CAPTION[:40]):
        return "caption"
    if "Reason step by step" in text:
        return "reasoning"
    if "Write one or two sentences describing the image the user is looking for" in text:
        return "conclusion"
    if "Does this description match the image shown?" in text:
        return "verify"
    return "unknown"


def modification_of(body: dict[str, Any]) -> str:
    match = re.search(r'(?:modification|Modification requested by the user): "(.*?)"\n', request_text(body))
    return match.group(1) if match else ""


def default_answer(body: dict[str, Any]) -> str:
    """A plausible answer to an annotation prompt that passes quality control."""
    stage, text = stage_of(body), modification_of(body)
    if stage == "caption":
        return "A single item shown on a plain light background, photographed from the front."
    if stage == "reasoning":
        return (
            f"The user asks that the item {text}. Everything else about the reference should stay the same."
        )
    if stage == "conclusion":
        return f"An item that {text}, shown alone on a plain background from the front."
    if stage == "verify":
        return "YES. The description matches the image."
    return "I do not know this prompt."


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a client that went away (a timeout, a killed annotator) is normal here
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class FakeChatServer:
    """A threaded HTTP server speaking the chat-completions protocol on loopback.

    Args:
        responder: ``(body, call_index) -> Reply | None``; None falls back to :func:`default_answer`.
        latency: seconds every answer waits before it is sent (on top of ``Reply.delay``).
        api_key: when set, requests without ``Authorization: Bearer <api_key>`` get 401.
    """

    def __init__(
        self,
        responder: Callable[[dict[str, Any], int], Reply | None] | None = None,
        latency: float = 0.0,
        api_key: str | None = None,
    ) -> None:
        self.responder = responder
        self.latency = latency
        self.api_key = api_key
        self.calls = 0
        self.statuses: Counter = Counter()
        self.stages: Counter = Counter()
        self.bodies: list[dict[str, Any]] = []
        self.keep_bodies = True
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "server not started"
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeChatServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                # answers are written as headers then body: without this, Nagle + delayed ACK add ~40 ms
                self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:  # silence the default stderr log
                return

            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.rstrip("/") != "/stats":
                    self.send_error(404)
                    return
                data = json.dumps(server.stats()).encode("utf-8")
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw)
                except ValueError:
                    body = {}
                with server._lock:
                    index = server.calls
                    server.calls += 1
                    if server.keep_bodies:
                        server.bodies.append(body)
                    server.stages[stage_of(body)] += 1
                reply = None
                if self.path.rstrip("/") != "/v1/chat/completions":
                    reply = Reply(status=404, body={"error": {"message": f"no route {self.path}"}})
                elif server.api_key and self.headers.get("Authorization") != f"Bearer {server.api_key}":
                    reply = Reply(status=401, body={"error": {"message": "invalid api key"}})
                elif server.responder is not None:
                    reply = server.responder(body, index)
                if reply is None:
                    reply = Reply(text=default_answer(body))
                with server._lock:
                    server.statuses[reply.status] += 1
                delay = server.latency + reply.delay
                if delay > 0:
                    time.sleep(delay)
                if reply.body is not None:
                    payload = reply.body if isinstance(reply.body, str) else json.dumps(reply.body)
                else:
                    text = reply.text or ""
                    payload = json.dumps(
                        {
                            "id": f"chatcmpl-{index}",
                            "object": "chat.completion",
                            "created": int(time.time()),
                            "model": body.get("model", "fake"),
                            "choices": [
                                {
                                    "index": 0,
                                    "message": {"role": "assistant", "content": text},
                                    "finish_reason": reply.finish_reason,
                                    **(
                                        {}
                                        if reply.stop_reason is None
                                        else {"stop_reason": reply.stop_reason}
                                    ),
                                }
                            ],
                            "usage": {
                                "prompt_tokens": len(request_text(body).split())
                                + 64 * len(request_images(body)),
                                "completion_tokens": len(text.split()),
                                "total_tokens": 0,
                            },
                        }
                    )
                data = payload.encode("utf-8")
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    for key, value in reply.headers.items():
                        self.send_header(key, value)
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    self.close_connection = True

        self._httpd = _QuietServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stats(self) -> dict[str, Any]:
        """Counters so far: calls, HTTP statuses and annotation stages (also served at ``GET /stats``)."""
        with self._lock:
            return {"calls": self.calls, "statuses": dict(self.statuses), "stages": dict(self.stages)}

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeChatServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """Serve on loopback until stdin closes: ``python -m circot.annotate.fakeserver --latency 0.05``.

    Prints the base URL on the first line of stdout; ``GET /stats`` answers the counters.
    """
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="A scripted OpenAI-compatible chat server on loopback.")
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per answer")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    args = parser.parse_args(argv)
    with FakeChatServer(latency=args.latency, api_key=args.api_key) as server:
        server.keep_bodies = False
        sys.stdout.write(server.url + "\n")
        sys.stdout.flush()
        sys.stdin.read()  # until the parent closes our stdin (or dies)


if __name__ == "__main__":
    main()

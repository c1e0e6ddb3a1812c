"""An async client for OpenAI-compatible chat completions (vLLM, SGLang, Ollama, hosted APIs).

Images travel as base64 ``data:`` URLs. Transient failures (429, 5xx, timeouts, dropped connections, bodies
that are not a chat completion) are retried with exponential backoff and full jitter, honouring
``Retry-After``; a 429 pauses every request of the client, not only the one that got it. 401, 403 and 404 stop
the run at once with :class:`TeacherFatalError`. The API key is sent in a header and never logged.
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import io
import logging
import os
import random
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from circot.annotate.prompts import ImagePart, Message
from circot.errors import CircotError

logger = logging.getLogger(__name__)

_MIME = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
}
FATAL_STATUS = {401: "unauthorized", 403: "forbidden", 404: "not found"}


class TeacherFatalError(CircotError):
    """The endpoint refuses every request (bad key, no permission, wrong URL or model): stop the run."""


class TeacherRequestError(Exception):
    """One request failed for good (retries exhausted, or a 4xx about this request)."""

    def __init__(self, message: str, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class ChatResult:
    """One answer: its text, token usage, seconds, and why it ended (``finish_reason``: ``stop``, ``length``;
    ``stop_reason``: the stop string or token that ended it, where the server says, as vLLM does)."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None
    stop_reason: Any = None


@dataclass
class ClientStats:
    """Counters of one client: requests, retries by cause, tokens."""

    requests: int = 0
    successes: int = 0
    retries: Counter = field(default_factory=Counter)
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    request_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "successes": self.successes,
            "retries": dict(self.retries),
            "failures": self.failures,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "request_seconds": round(self.request_seconds, 3),
        }


def image_data_url(path: Path, max_side: int | None = None) -> str:
    """A ``data:`` URL of an image file; with ``max_side``, larger images are downscaled (JPEG/PNG re-encoded)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise TeacherRequestError(
            f"cannot read image {str(path)!r}: {exc.strerror}", retryable=False
        ) from None
    mime = _MIME.get(path.suffix.lower(), "image/png")
    if max_side:
        from PIL import Image

        with Image.open(io.BytesIO(raw)) as img:
            if max(img.size) > max_side:
                img.thumbnail((max_side, max_side))
                buf = io.BytesIO()
                fmt = "JPEG" if mime == "image/jpeg" else "PNG"
                img.convert("RGB").save(buf, format=fmt)
                raw, mime = buf.getvalue(), f"image/{fmt.lower()}"
    return f"data:{mime};base64,{base64.b64encode(raw).decode('ascii')}"


def pil_data_url(image: Any) -> str:
    """A lossless PNG ``data:`` URL of an in-memory PIL image."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIChatClient:
    """Chat completions against ``{base_url}/chat/completions``.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``.
        model: the model name the server expects.
        api_key: sent as ``Authorization: Bearer``; None for servers without authentication.
        timeout: seconds per request (connect + read).
        max_retries: retries of one request after its first try.
        backoff_base, backoff_max: exponential backoff ``base * 2**attempt`` capped at ``max``, full jitter.
        max_retry_after: the longest ``Retry-After`` honoured, seconds.
        max_tokens, temperature: generation settings sent with each request.
        max_image_side: downscale images whose longer side exceeds this (None: send the file as is).
        seed: seeds the jitter.
        extra_body: more fields sent with each request (e.g. ``stop``, or a server's own sampling options).
        role: what the endpoint is to the caller, as the errors name it (``teacher``, ``reasoner``).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        max_retry_after: float = 300.0,
        max_tokens: int = 300,
        temperature: float = 0.2,
        max_image_side: int | None = None,
        max_connections: int = 64,
        seed: int | None = None,
        extra_body: dict[str, Any] | None = None,
        role: str = "teacher",
    ) -> None:
        import httpx

        if not base_url.startswith(("http://", "https://")):
            raise CircotError(f"--base-url must start with http:// or https://, not {base_url!r}")
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.max_retry_after = max_retry_after
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_image_side = max_image_side
        self.extra_body = dict(extra_body or {})
        self.role = role
        self.stats = ClientStats()
        self._rng = random.Random(seed)
        self._paused_until = 0.0
        self._urls: OrderedDict[tuple[str, int, int], str] = OrderedDict()  # recent images' data URLs
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            # proxies from the environment apply to remote endpoints, never to a server on this machine
            trust_env=urlsplit(base_url).hostname not in ("127.0.0.1", "localhost", "::1"),
        )
        self._httpx = httpx

    async def aclose(self) -> None:
        await self._client.aclose()

    def render(self, messages: list[Message]) -> list[dict[str, Any]]:
        """Messages in the OpenAI format, images as base64 data URLs."""
        out = []
        for message in messages:
            if all(isinstance(p, str) for p in message.parts):
                out.append({"role": message.role, "content": "\n".join(message.parts)})  # type: ignore[arg-type]
                continue
            content = []
            for part in message.parts:
                if isinstance(part, ImagePart):
                    url = part.url or self._data_url(part.path)
                    content.append({"type": "image_url", "image_url": {"url": url}})
                else:
                    content.append({"type": "text", "text": part})
            out.append({"role": message.role, "content": content})
        return out

    def _data_url(self, path: Path) -> str:
        """The image's data URL, cached for the few most recent images (a reference is sent 2-3 times)."""
        try:
            st = os.stat(path)
        except OSError as exc:
            raise TeacherRequestError(
                f"cannot read image {str(path)!r}: {exc.strerror}", retryable=False
            ) from None
        key = (str(path), st.st_mtime_ns, st.st_size)
        url = self._urls.get(key)
        if url is None:
            url = image_data_url(path, self.max_image_side)
            self._urls[key] = url
            while len(self._urls) > 128:
                self._urls.popitem(last=False)
        else:
            self._urls.move_to_end(key)
        return url

    def _backoff(self, attempt: int) -> float:
        return self._rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))

    async def _wait_pause(self) -> None:
        delay = self._paused_until - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def chat(self, messages: list[Message], max_tokens: int | None = None) -> ChatResult:
        """One chat completion, retried on transient failures; returns the answer text and token usage."""
        body = {
            "model": self.model,
            "messages": self.render(messages),
            "max_tokens": max_tokens or self.max_tokens,
            "temperature": self.temperature,
            **self.extra_body,
        }
        httpx = self._httpx
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            await self._wait_pause()
            self.stats.requests += 1
            start = time.perf_counter()
            retry_after: float | None = None
            try:
                response = await self._client.post(self.url, json=body)
            except httpx.TimeoutException:
                cause, last = "timeout", "request timed out"
            except httpx.TransportError as exc:
                cause, last = "connection", f"connection failed ({type(exc).__name__})"
            else:
                elapsed = time.perf_counter() - start
                self.stats.request_seconds += elapsed
                status = response.status_code
                if status == 200:
                    result = self._parse(response)
                    if result is not None:
                        result.seconds = elapsed
                        self.stats.successes += 1
                        self.stats.prompt_tokens += result.prompt_tokens
                        self.stats.completion_tokens += result.completion_tokens
                        return result
                    cause, last = "malformed", "the response is not a chat completion"
                elif status in FATAL_STATUS:
                    self.stats.failures += 1
                    raise TeacherFatalError(
                        f"{self.role} endpoint {self.url} answered {status} ({FATAL_STATUS[status]}) for model "
                        f"{self.model!r}: {_error_text(response)}"
                    )
                elif status == 429 or status >= 500 or status == 408:
                    cause, last = str(status), f"HTTP {status}: {_error_text(response)}"
                    retry_after = parse_retry_after(response.headers.get("retry-after"))
                    if retry_after is not None:
                        retry_after = min(retry_after, self.max_retry_after)
                        if status == 429:
                            self._paused_until = max(self._paused_until, time.monotonic() + retry_after)
                else:  # another 4xx: this request is wrong, retrying will not help
                    self.stats.failures += 1
                    raise TeacherRequestError(f"HTTP {status}: {_error_text(response)}", retryable=False)
            if attempt == self.max_retries:
                break
            self.stats.retries[cause] += 1
            delay = self._backoff(attempt)
            if retry_after is not None:
                delay = max(delay, retry_after)
            logger.debug("retrying after %s in %.2fs (attempt %d)", last, delay, attempt + 1)
            await asyncio.sleep(delay)
        self.stats.failures += 1
        raise TeacherRequestError(f"gave up after {self.max_retries + 1} attempts: {last}")

    @staticmethod
    def _parse(response: Any) -> ChatResult | None:
        try:
            data = response.json()
            choice = data["choices"][0]
            text = choice["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            return None
        if not isinstance(text, str):
            return None
        usage = data.get("usage") or {}
        return ChatResult(
            text=text,
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            finish_reason=choice.get("finish_reason"),
            stop_reason=choice.get("stop_reason"),
        )


def _error_text(response: Any) -> str:
    try:
        data = response.json()
        message = (
            data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        )
        if message:
            return str(message)[:200]
    except (ValueError, AttributeError):
        pass
    return (response.text or response.reason_phrase or "").strip().replace("\n", " ")[:200]

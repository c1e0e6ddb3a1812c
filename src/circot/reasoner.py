"""Where a query's chain of thought comes from: the local model's own decode, or a served model.

A :class:`Reasoner` writes caption → reasoning → conclusion for ``(reference image, modification text)``
queries. :class:`LocalReasoner` is today's path: the loaded model decodes and embeds at the ``<emb>`` that
closes its reasoning, in one pass (:func:`circot.search.embed_queries` runs it as before).
:class:`OpenAIReasoner` asks a serving engine (vLLM, SGLang, any OpenAI-compatible chat-completions server holding the circot model)
for the CoT; :func:`circot.search.embed_queries` then embeds it by its given-CoT pass, one forward over
prompt + CoT + ``<emb>`` on the locally loaded model.

The served prompt is the local one: the system prompt of the loaded model's config and
:func:`circot.prompts.user_instruction`, after the image (the model's chat template renders them to the text
:func:`circot.prompts.render_prompt` writes). The reply is parsed by :func:`circot.prompts.parse_cot`, as a
local decode is. Requests go through the annotator's :class:`~circot.annotate.client.OpenAIChatClient`:
the same retries with backoff, ``Retry-After``, timeouts and stops on 401/403/404.

A reply is malformed when it has no conclusion (an empty or missing ``<conclusion>``): there is nothing to
embed, and :class:`ReasonerReplyError` names each such query, what was wrong and how the reply began. A reply
with a conclusion but other faults (a missing caption, text outside the tags, cut off at ``max_tokens``) is
embedded, flagged as a local decode is: ``well_formed`` False and its ``problems`` listed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from circot import prompts
from circot.errors import CircotError
from circot.prompts import CoT

logger = logging.getLogger(__name__)

REASONERS = ("local", "openai")
DEFAULT_API_KEY_ENV = "CIRCOT_REASONER_API_KEY"


class ReasonerError(CircotError):
    """The served reasoner could not answer (down, refusing, or out of retries)."""


class ReasonerReplyError(ReasonerError):
    """Replies of the served reasoner that cannot be embedded (no conclusion)."""


class LocalReasoner:
    """The loaded model reasons itself: one decode that also embeds (the default)."""

    name = "local"
    remote = False

    def reason(
        self, model: Any, images: Sequence[Any], texts: Sequence[str], batch_size: int = 16
    ) -> list[CoT]:
        """The parsed CoT of each query (no embedding)."""
        return list(model.generate_reasoning(list(images), list(texts), batch_size=batch_size))

    def describe(self) -> str:
        return "local"

    def close(self) -> None:
        return None


class OpenAIReasoner:
    """CoTs from an OpenAI-compatible chat-completions server that serves the circot model.

    Args:
        base_url: e.g. ``http://localhost:8000/v1``.
        model: the served model's name (vLLM: ``--served-model-name``, or the LoRA module's name).
        api_key: sent as a bearer token; never logged.
        concurrency: requests in flight at once (a batch of queries is sent together, up to this many).
        timeout, max_retries, backoff_base, backoff_max: as :class:`~circot.annotate.client.OpenAIChatClient`.

    Generation follows the loaded model's config: ``max_cot_tokens``, greedy unless ``do_sample``. Each
    request asks the server to stop at ``<emb>`` and to keep special tokens in its text
    (``skip_special_tokens: false``, which vLLM and SGLang honour): circot's tags are special tokens.
    """

    name = "openai"
    remote = True

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        *,
        concurrency: int = 16,
        timeout: float = 120.0,
        max_retries: int = 6,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        seed: int | None = None,
    ) -> None:
        if not isinstance(model, str) or not model.strip():
            raise CircotError("--reasoner-model: the served model's name is empty")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise CircotError(f"reasoner concurrency must be a positive integer, not {concurrency!r}")
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise CircotError(f"--base-url must start with http:// or https://, not {base_url!r}")
        try:
            import httpx  # noqa: F401
        except ImportError:
            raise CircotError("--reasoner openai needs httpx: pip install 'circot[reasoner]'") from None
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.concurrency = concurrency
        self._client_options = {
            "api_key": api_key,
            "timeout": timeout,
            "max_retries": max_retries,
            "backoff_base": backoff_base,
            "backoff_max": backoff_max,
            "max_connections": concurrency,
            "seed": seed,
        }
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._clients: dict[tuple[Any, ...], Any] = {}
        self._lock = threading.Lock()

    def describe(self) -> str:
        return f"openai {self.base_url} model {self.model!r}"

    def cache_tag(self, model: Any) -> str:
        """What the CoTs depend on besides the pooling model: the endpoint, its model and the settings."""
        settings = [self.base_url, self.model, *self._generation(model)[1:]]
        return hashlib.sha256(json.dumps(settings, default=str).encode()).hexdigest()[:12]

    # -- requests ----------------------------------------------------------------------------------------
    def _generation(self, model: Any) -> tuple[str | None, int, float, dict[str, Any]]:
        cfg = model.config
        extra: dict[str, Any] = {"stop": [prompts.EMB_TOKEN], "skip_special_tokens": False}
        temperature = 0.0
        if cfg.do_sample:
            temperature = float(cfg.sampling_temperature)
            extra["top_p"] = float(cfg.top_p)
        return cfg.system_prompt, int(cfg.max_cot_tokens), temperature, extra

    def _client(self, model: Any) -> Any:
        from circot.annotate.client import OpenAIChatClient

        system, max_tokens, temperature, extra = self._generation(model)
        key = (max_tokens, temperature, json.dumps(extra, sort_keys=True))
        client = self._clients.get(key)
        if client is None:
            client = OpenAIChatClient(
                self.base_url,
                self.model,
                max_tokens=max_tokens,
                temperature=temperature,
                extra_body=extra,
                role="reasoner",
                **self._client_options,
            )
            self._clients[key] = client
        return client

    def _loop_thread(self) -> asyncio.AbstractEventLoop:
        """This reasoner's event loop, on a daemon thread (callers may be sync code inside another loop)."""
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="circot-reasoner", daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            return self._loop

    def reason(
        self, model: Any, images: Sequence[Any], texts: Sequence[str], batch_size: int = 16
    ) -> list[CoT]:
        """The CoT of each query from the server, parsed as a local decode is (``batch_size`` is unused: the
        server batches; up to ``concurrency`` requests are in flight).

        Raises :class:`ReasonerError` when a request fails for good, :class:`ReasonerReplyError` when replies
        have no conclusion.
        """
        if len(images) != len(texts):
            raise CircotError(f"{len(images)} images but {len(texts)} texts")
        if not texts:
            return []
        system = model.config.system_prompt
        if system is None:
            raise CircotError(
                "this model's prompt has no system turn, which a chat template cannot express; "
                "use the local reasoner"
            )
        messages = [self._messages(system, image, text) for image, text in zip(images, texts, strict=True)]
        loop = self._loop_thread()
        future = asyncio.run_coroutine_threadsafe(self._ask_all(model, messages, texts), loop)
        return future.result()

    @staticmethod
    def _messages(system: str, image: Any, text: str) -> list[Any]:
        from circot.annotate.client import pil_data_url
        from circot.annotate.prompts import ImagePart, Message

        if isinstance(image, (str, Path)):
            if not Path(image).is_file():
                raise CircotError(f"{image}: image file not found")
            part = ImagePart(Path(image))
        else:
            try:
                part = ImagePart(Path("<memory>"), url=pil_data_url(image))
            except (AttributeError, OSError, ValueError) as exc:
                raise CircotError(f"cannot encode the reference image as PNG: {exc}") from None
        return [Message("system", [system]), Message("user", [part, prompts.user_instruction("full", text)])]

    async def _ask_all(self, model: Any, messages: list[list[Any]], texts: Sequence[str]) -> list[CoT]:
        from circot.annotate.client import TeacherFatalError, TeacherRequestError

        client = self._client(model)
        gate = asyncio.Semaphore(self.concurrency)

        async def one(i: int) -> Any:
            async with gate:
                try:
                    return await client.chat(messages[i])
                except TeacherFatalError as exc:
                    raise ReasonerError(str(exc)) from None
                except TeacherRequestError as exc:
                    where = (
                        f"reasoner {client.url} (model {self.model!r}), query {i + 1} ({_short(texts[i])})"
                    )
                    raise ReasonerError(f"{where}: {exc}") from None

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(one(i)) for i in range(len(messages))]
        except BaseExceptionGroup as group_error:  # the first failure; the other requests were cancelled
            first = group_error.exceptions[0]
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None
        return self._parse_all([t.result() for t in tasks], texts)

    def _parse_all(self, results: list[Any], texts: Sequence[str]) -> list[CoT]:
        cots, bad = [], []
        for i, result in enumerate(results):
            cot = parse_reply(result.text, result.finish_reason, result.stop_reason)
            if not cot.conclusion.strip():
                bad.append(
                    f"query {i + 1} ({_short(texts[i])}): {'; '.join(cot.problems) or 'empty conclusion'}"
                    f", reply begins {_short(result.text, 60)}"
                )
            cots.append(cot)
        if bad:
            hint = ""
            if all(not any(t in r.text for t in prompts.SPECIAL_TOKENS) for r in results):
                hint = (
                    "; no reply has any of circot's tags: the server may drop special tokens from its text, "
                    "or serve a model that is not a circot model"
                )
            shown = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise ReasonerReplyError(
                f"{len(bad)} of {len(results)} replies of the reasoner at {self.base_url} have no conclusion "
                f"to embed: {shown}{hint}"
            )
        return cots

    def close(self) -> None:
        """Close the HTTP connections and stop the event loop thread."""
        with self._lock:
            loop, thread, clients = self._loop, self._thread, list(self._clients.values())
            self._loop, self._thread, self._clients = None, None, {}
        if loop is None:
            return

        async def shut() -> None:
            for client in clients:
                await client.aclose()

        try:
            asyncio.run_coroutine_threadsafe(shut(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            loop.close()


def parse_reply(text: str, finish_reason: str | None = None, stop_reason: Any = None) -> CoT:
    """A served reasoner's answer as a :class:`CoT`, by the local path's rule
    (:func:`circot.prompts.parse_cot` with ``require_emb``): the answer is closed when it holds ``<emb>``, or stopped at the ``<emb>`` stop
    string (the server then leaves it out of the text). A server that does not say which stop ended it
    (``stop_reason``) is taken at its ``finish_reason``; one cut at ``max_tokens`` is not closed."""
    closed = prompts.EMB_TOKEN in text or stop_reason == prompts.EMB_TOKEN
    if not closed and finish_reason == "stop" and stop_reason is None:
        closed = True
    cot = prompts.parse_cot(
        text + ("" if prompts.EMB_TOKEN in text or not closed else prompts.EMB_TOKEN), True
    )
    cot.raw = text
    return cot


def _short(text: str, n: int = 40) -> str:
    text = " ".join(str(text).split())
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def make_reasoner(
    kind: str = "local",
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    concurrency: int = 16,
) -> LocalReasoner | OpenAIReasoner:
    """The reasoner that the ``--reasoner``, ``--base-url``, ``--reasoner-model`` and
    ``--reasoner-api-key-env`` options name; one clear error for a wrong combination. The API key is read from
    the environment variable (default ``CIRCOT_REASONER_API_KEY``; unset: no key)."""
    if kind not in REASONERS:
        raise CircotError(f"--reasoner must be one of {', '.join(REASONERS)}, not {kind!r}")
    if kind == "local":
        given = [f for f, v in (("--base-url", base_url), ("--reasoner-model", model)) if v is not None]
        if given:
            raise CircotError(f"{' and '.join(given)} need --reasoner openai")
        return LocalReasoner()
    if base_url is None:
        raise CircotError("--reasoner openai needs --base-url (e.g. http://localhost:8000/v1)")
    if model is None:
        raise CircotError("--reasoner openai needs --reasoner-model (the served model's name)")
    env = api_key_env or DEFAULT_API_KEY_ENV
    key = os.environ.get(env, "").strip() or None
    if api_key_env is not None and key is None:
        raise CircotError(
            f"--reasoner-api-key-env: the environment variable {api_key_env!r} is not set or empty"
        )
    return OpenAIReasoner(base_url, model, key, concurrency=concurrency)


__all__ = [
    "DEFAULT_API_KEY_ENV",
    "REASONERS",
    "LocalReasoner",
    "OpenAIReasoner",
    "ReasonerError",
    "ReasonerReplyError",
    "make_reasoner",
    "parse_reply",
]

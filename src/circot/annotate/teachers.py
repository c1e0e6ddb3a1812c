"""Teachers: who writes the caption, reasoning and conclusion of a triplet.

- :class:`ChatTeacher` runs the three stages (and the optional verification) as chat requests against a
  backend: :class:`~circot.annotate.client.OpenAIChatClient` (an OpenAI-compatible endpoint) or
  :class:`~circot.annotate.hf.HFChatBackend` (a local transformers Qwen2.5-VL, batched).
- :class:`ShapesTeacher` returns the gold CoT of the shapes world, instantly.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from circot.annotate import prompts as P
from circot.annotate.client import ChatResult, TeacherRequestError
from circot.annotate.quality import leak_problems, structure_problems
from circot.data.records import CIRQuery, CIRSplit
from circot.errors import CircotError

logger = logging.getLogger(__name__)


@dataclass
class Annotation:
    """A teacher's answer for one triplet: the three fields, per-stage seconds, and verification problems."""

    caption: str
    reasoning: str
    conclusion: str
    timings: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


class ChatBackend(Protocol):
    async def chat(self, messages: list[P.Message], max_tokens: int | None = None) -> ChatResult: ...

    async def aclose(self) -> None: ...


class Teacher(Protocol):
    name: str
    prompt_version: str

    async def annotate(self, query: CIRQuery, split: CIRSplit, verify: bool = False) -> Annotation: ...

    async def aclose(self) -> None: ...

    def stats(self) -> dict[str, Any]: ...


def _image(split: CIRSplit, image_id: str, role: str) -> Path:
    try:
        path = Path(split.image_path(image_id))
    except KeyError:
        raise TeacherRequestError(f"{role} image {image_id!r} is not in the split", retryable=False) from None
    if not path.is_file():
        raise TeacherRequestError(f"{role} image file {str(path)!r} does not exist", retryable=False)
    return path


class ChatTeacher:
    """The three-stage annotation over a chat backend.

    A stage answer that fails its own checks (empty, too long, tags inside, a conclusion that mentions the
    target image) is asked again, up to ``stage_attempts`` times in all; the last answer is kept and the
    pipeline's quality control decides.
    """

    prompt_version = P.ANNOTATION_PROMPT_VERSION

    def __init__(self, backend: Any, name: str, *, stage_attempts: int = 2, max_tokens: int = 300) -> None:
        self.backend = backend
        self.name = name
        self.stage_attempts = max(1, stage_attempts)
        self.max_tokens = max_tokens
        self.reasked = 0

    async def _stage(self, stage: str, messages: list[P.Message], timings: dict[str, float]) -> str:
        start = time.perf_counter()
        answer = ""
        for attempt in range(self.stage_attempts):
            if attempt:
                self.reasked += 1
            result = await self.backend.chat(messages, max_tokens=self.max_tokens)
            answer = P.clean_answer(result.text)
            bad = structure_problems(stage, answer)
            if stage == "conclusion":
                bad += leak_problems(answer)
            if not bad:
                break
        timings[f"{stage}_s"] = round(time.perf_counter() - start, 4)
        return answer

    async def annotate(self, query: CIRQuery, split: CIRSplit, verify: bool = False) -> Annotation:
        start = time.perf_counter()
        timings: dict[str, float] = {}
        reference = _image(split, query.reference, "reference")
        target = _image(split, query.targets[0], "target") if query.targets else None
        caption = await self._stage("caption", P.caption_prompt(reference), timings)
        reasoning = await self._stage(
            "reasoning", P.reasoning_prompt(reference, caption, query.text), timings
        )
        conclusion = await self._stage(
            "conclusion", P.conclusion_prompt(reference, target, caption, query.text, reasoning), timings
        )
        problems: list[str] = []
        if verify and target is not None and conclusion:
            t0 = time.perf_counter()
            result = await self.backend.chat(P.verify_prompt(target, conclusion), max_tokens=60)
            timings["verify_s"] = round(time.perf_counter() - t0, 4)
            ok, why = P.parse_verdict(result.text)
            if ok is None:
                problems.append(f"verify: unparseable verdict ({why[:80]!r})")
            elif not ok:
                problems.append(
                    f"verify: the teacher judged that the conclusion does not match the target ({why})"
                )
        timings["total_s"] = round(time.perf_counter() - start, 4)
        return Annotation(caption, reasoning, conclusion, timings, problems)

    async def aclose(self) -> None:
        await self.backend.aclose()

    def stats(self) -> dict[str, Any]:
        stats = self.backend.stats.to_dict() if hasattr(self.backend, "stats") else {}
        return {**stats, "stage_reasks": self.reasked}


class ShapesTeacher:
    """The shapes world's gold CoT, read from the scene graphs (no model, no images)."""

    name = "shapes:gold"
    prompt_version = "shapes-gold"

    def __init__(self) -> None:
        from circot.data.shapes import gold_cot

        self._gold_cot = gold_cot

    async def annotate(self, query: CIRQuery, split: CIRSplit, verify: bool = False) -> Annotation:
        start = time.perf_counter()
        try:
            cot = self._gold_cot(query)
        except (KeyError, TypeError, ValueError, CircotError) as exc:
            raise TeacherRequestError(f"no gold CoT for this query ({exc})", retryable=False) from None
        return Annotation(
            cot.caption, cot.reasoning, cot.conclusion, {"total_s": round(time.perf_counter() - start, 6)}
        )

    async def aclose(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {}


TEACHERS = ("openai", "hf", "shapes")


def build_teacher(
    kind: str,
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str = "OPENAI_API_KEY",
    timeout: float = 120.0,
    max_retries: int = 6,
    backoff_base: float = 1.0,
    max_tokens: int = 300,
    temperature: float = 0.2,
    max_image_side: int | None = None,
    batch_size: int = 8,
    device: str = "cpu",
    dtype: str | None = None,
) -> Any:
    """A teacher by name.

    ``openai``: an OpenAI-compatible endpoint at ``base_url`` serving ``model``; the key is read from the
    environment variable ``api_key_env`` (optional: local servers need none). Nothing touches the network
    unless ``base_url`` is given. ``hf``: a local transformers Qwen-VL at ``model`` (hub id or path).
    ``shapes``: the shapes world's gold CoT.
    """
    import os

    if kind == "openai":
        if not base_url:
            raise CircotError("--teacher openai needs --base-url (e.g. http://localhost:8000/v1)")
        if not model:
            raise CircotError("--teacher openai needs --model (the model name the server serves)")
        from circot.annotate.client import OpenAIChatClient

        api_key = os.environ.get(api_key_env) or None
        if api_key is None:
            logger.info("no API key in $%s: sending requests without authentication", api_key_env)
        client = OpenAIChatClient(
            base_url,
            model,
            api_key,
            timeout=timeout,
            max_retries=max_retries,
            backoff_base=backoff_base,
            max_tokens=max_tokens,
            temperature=temperature,
            max_image_side=max_image_side,
        )
        return ChatTeacher(client, f"openai:{model}", max_tokens=max_tokens)
    if kind == "hf":
        if not model:
            raise CircotError(
                "--teacher hf needs --model (a Qwen2-VL / Qwen2.5-VL Instruct hub id or folder)"
            )
        from circot.annotate.hf import HFChatBackend

        backend = HFChatBackend(
            model,
            batch_size=batch_size,
            max_new_tokens=max_tokens,
            device=device,
            dtype=dtype,
            max_image_side=max_image_side,
        )
        return ChatTeacher(backend, f"hf:{Path(str(model)).name or model}", max_tokens=max_tokens)
    if kind == "shapes":
        return ShapesTeacher()
    raise CircotError(f"unknown teacher {kind!r}; choose one of: {', '.join(TEACHERS)}")

"""A local transformers teacher: Qwen2-VL / Qwen2.5-VL Instruct (any hub id or path), batched.

:class:`HFChatBackend` takes the same :class:`~circot.annotate.prompts.Message` prompts as the HTTP client.
Requests from concurrent triplets queue up; a batcher takes up to ``batch_size`` of them at a time and runs
one greedy ``generate`` in a worker thread, so the event loop keeps feeding the queue meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from circot.annotate.client import ChatResult, ClientStats, TeacherRequestError
from circot.annotate.prompts import ImagePart, Message
from circot.errors import CircotError

logger = logging.getLogger(__name__)


def _image_only_processor_class() -> type:
    from transformers import ProcessorMixin, Qwen2VLProcessor

    class ImageOnlyQwenProcessor(Qwen2VLProcessor):
        """Qwen2-VL processor without the video processor (which needs torchvision)."""

        def __init__(
            self, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kw
        ):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kw)

    return ImageOnlyQwenProcessor


def load_processor(path: str | Path) -> Any:
    """The checkpoint's processor; without torchvision, an image-only Qwen2-VL processor built from its parts."""
    from transformers import AutoProcessor, AutoTokenizer, Qwen2VLImageProcessorPil

    try:
        return AutoProcessor.from_pretrained(path)
    except (ImportError, ValueError, OSError, AttributeError) as exc:
        logger.debug("AutoProcessor failed (%s); building an image-only processor", exc)
    tokenizer = AutoTokenizer.from_pretrained(path)
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return _image_only_processor_class()(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=_chat_template(path, tokenizer)
    )


def _chat_template(path: str | Path, tokenizer: Any) -> str | None:
    """The chat template: the tokenizer's, else the processor's file in a local checkpoint folder."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        import json

        return json.loads((folder / "chat_template.json").read_text(encoding="utf-8")).get("chat_template")
    return None


class HFChatBackend:
    """Greedy batched generation with a local Qwen-VL chat model.

    Args:
        model: a hub id / local path, or an already loaded ``*ForConditionalGeneration`` model.
        processor: the processor when ``model`` is an object (loaded from the path otherwise).
        batch_size: most requests per ``generate`` call.
        max_new_tokens: default generation length per request.
        device, dtype: where and how to load the model (e.g. "cuda", "bfloat16").
        max_image_side: downscale images whose longer side exceeds this before processing.
        gather_seconds: how long the batcher waits for more requests once one arrived.
    """

    def __init__(
        self,
        model: Any,
        processor: Any = None,
        *,
        batch_size: int = 8,
        max_new_tokens: int = 300,
        device: str = "cpu",
        dtype: str | None = None,
        max_image_side: int | None = None,
        gather_seconds: float = 0.01,
    ) -> None:
        import torch

        if isinstance(model, (str, Path)):
            from transformers import AutoModelForImageTextToText

            path = str(model)
            torch_dtype = getattr(torch, dtype) if dtype else None
            try:
                model = AutoModelForImageTextToText.from_pretrained(path, dtype=torch_dtype)
            except OSError as exc:
                raise CircotError(f"cannot load the hf teacher model {path!r}: {exc}") from None
            processor = processor or load_processor(path)
            model.to(device)
        elif processor is None:
            raise CircotError("HFChatBackend: a processor is needed when the model is given as an object")
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.batch_size = max(1, batch_size)
        self.max_new_tokens = max_new_tokens
        self.max_image_side = max_image_side
        self.gather_seconds = gather_seconds
        self.stats = ClientStats()
        self.batches = 0
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None

    def _load_images(self, messages: list[Message]) -> list[Any]:
        from PIL import Image

        images = []
        for message in messages:
            for part in message.parts:
                if isinstance(part, ImagePart):
                    try:
                        with Image.open(part.path) as img:
                            img = img.convert("RGB")
                    except OSError as exc:
                        raise TeacherRequestError(
                            f"cannot read image {str(part.path)!r}: {exc}", False
                        ) from None
                    if self.max_image_side and max(img.size) > self.max_image_side:
                        img.thumbnail((self.max_image_side, self.max_image_side))
                    images.append(img)
        return images

    @staticmethod
    def _hf_messages(messages: list[Message]) -> list[dict[str, Any]]:
        out = []
        for message in messages:
            content = [
                {"type": "image"} if isinstance(p, ImagePart) else {"type": "text", "text": p}
                for p in message.parts
            ]
            out.append({"role": message.role, "content": content})
        return out

    def _generate(self, batch: list[tuple[list[Message], int, list[Any]]]) -> list[ChatResult]:
        import torch

        texts = [
            self.processor.apply_chat_template(
                self._hf_messages(m), tokenize=False, add_generation_prompt=True
            )
            for m, _, _ in batch
        ]
        images = [img for _, _, imgs in batch for img in imgs]
        inputs = self.processor(text=texts, images=images or None, padding=True, return_tensors="pt")
        inputs = inputs.to(self.model.device)
        max_new = max(n for _, n, _ in batch)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                **inputs,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=self.processor.tokenizer.pad_token_id,
            )
        seconds = time.perf_counter() - start
        new = out[:, inputs["input_ids"].shape[1] :]
        pad = self.processor.tokenizer.pad_token_id
        results = []
        for row, (_, limit, _), mask in zip(new, batch, inputs["attention_mask"], strict=True):
            row = row[:limit]
            n_new = int((row != pad).sum()) if pad is not None else len(row)
            text = self.processor.tokenizer.decode(row, skip_special_tokens=True)
            results.append(ChatResult(text, int(mask.sum()), n_new, seconds))
        return results

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            first = await self._queue.get()
            batch = [first]
            deadline = time.monotonic() + self.gather_seconds
            while len(batch) < self.batch_size:
                try:
                    batch.append(self._queue.get_nowait())
                except asyncio.QueueEmpty:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    await asyncio.sleep(min(remaining, 0.002))
            requests = [(m, n, imgs) for m, n, imgs, _ in batch]
            futures = [f for *_, f in batch]
            self.stats.requests += len(batch)
            self.batches += 1
            try:
                results = await asyncio.to_thread(self._generate, requests)
            except Exception as exc:  # a failed batch fails its requests, not the run
                self.stats.failures += len(batch)
                for fut in futures:
                    if not fut.done():
                        fut.set_exception(TeacherRequestError(f"generation failed: {exc}", retryable=True))
                continue
            for fut, result in zip(futures, results, strict=True):
                self.stats.successes += 1
                self.stats.prompt_tokens += result.prompt_tokens
                self.stats.completion_tokens += result.completion_tokens
                self.stats.request_seconds += result.seconds
                if not fut.done():
                    fut.set_result(result)

    async def chat(self, messages: list[Message], max_tokens: int | None = None) -> ChatResult:
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._worker = asyncio.get_running_loop().create_task(self._run())
        images = await asyncio.to_thread(self._load_images, messages)
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self._queue.put((messages, max_tokens or self.max_new_tokens, images, future))
        return await future

    async def aclose(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
            self._queue = None

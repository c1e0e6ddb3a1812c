"""The FastAPI application: the JSON API, the streaming endpoint and the single page.

Build it with :func:`create_app` from an index and a model that are already loaded, so that tests can inject
a tiny random model and a tiny index::

    app = create_app(GalleryIndex.load("gallery.index"), CIRCoT.from_pretrained("shapes-tiny"))

Endpoints (all documented in ``/openapi.json``):

- ``GET /`` the page; ``GET /static/...`` its script and style.
- ``GET /health`` model, gallery size and limits.
- ``GET /api/gallery`` gallery ids (paged, filterable) for the reference picker.
- ``GET /api/images/{id}`` a gallery image, by id only.
- ``POST /api/search`` multipart form: ``image`` (file) or ``gallery_id``; ``text``; ``mode``; ``k``.
- ``POST /api/search/stream`` the same, answered as Server-Sent Events: ``start``, ``token`` (pieces of
  reasoning as generated), ``cot``, ``results``, ``done`` (or ``error``).
- ``POST /api/search/edited`` the same plus the user's ``caption`` / ``reasoning`` / ``conclusion``: embeds
  the query from that reasoning instead of generating one, so the user steers the retrieval.
"""

import asyncio
import hmac
import importlib.resources
import json
import logging
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import quote

from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from circot import __version__
from circot.errors import CircotError
from circot.prompts import CoT
from circot.reasoner import ReasonerError
from circot.serve.engine import Gallery, QueryModel, SearchEngine, SearchOutcome, ServerBusy
from circot.serve.schemas import (
    CoTOut,
    ErrorOut,
    GalleryItem,
    GalleryPage,
    HealthOut,
    QueryOut,
    ReferenceOut,
    ResultOut,
    SearchOut,
)
from circot.serve.uploads import ServeLimits, UploadRejected, check_upload_size, decode_upload

logger = logging.getLogger(__name__)

PAGE_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in {
        400: "corrupt image or bad combination of fields",
        404: "unknown gallery id",
        413: "upload or image too large",
        415: "not an image in a supported format",
        422: "invalid field (text too long, k out of range, unknown mode)",
        503: "too many searches waiting",
    }.items()
}


def static_dir() -> Path:
    """The folder of the page's files, shipped inside the package."""
    return Path(str(importlib.resources.files("circot.serve").joinpath("static")))


class _BodyLimit:
    """Answer 413 to a request whose body is larger than ``max_bytes`` (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        limit = self.max_bytes / (1024 * 1024)
        return JSONResponse({"detail": f"the request body is larger than the limit of {limit:.1f} MB"}, 413)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length header"}, 400)(scope, receive, send)
                return
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLarge(self.max_bytes)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await self._too_large()(scope, receive, send)


class _BodyTooLarge(HTTPException):
    """Raised from ``receive`` once a streamed body passes the limit; FastAPI answers it as a 413."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(
            413, f"the request body is larger than the limit of {max_bytes / (1024 * 1024):.1f} MB"
        )


class _ApiKey:
    """Require ``Authorization: Bearer <key>`` on every route but the page, its files and ``/health``."""

    OPEN_PATHS = ("/", "/health")

    def __init__(self, app: ASGIApp, key: str) -> None:
        self.app = app
        self.key = key.encode("utf-8")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or path in self.OPEN_PATHS or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = given.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
            await self.app(scope, receive, send)
            return
        detail = "a valid API key is required: send the header 'Authorization: Bearer <key>'"
        response = JSONResponse({"detail": detail}, 401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


class _SecurityHeaders:
    """Add no-sniff and referrer headers everywhere, and a strict CSP to the page and its files."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        page = path == "/" or path.startswith("/static/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                headers.append((b"referrer-policy", b"no-referrer"))
                if page:
                    headers.append((b"content-security-policy", PAGE_CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _cot_out(cot: CoT | None) -> CoTOut | None:
    if cot is None:
        return None
    return CoTOut(
        caption=cot.caption,
        reasoning=cot.reasoning,
        conclusion=cot.conclusion,
        well_formed=cot.well_formed,
        problems=list(cot.problems),
        raw=cot.raw,
    )


def model_max_pixels(model: Any) -> int | None:
    """The most pixels the model's image processor keeps (its ``max_pixels``), if it says."""
    processor = getattr(getattr(model, "images", None), "image_processor", None)
    size = getattr(processor, "size", None)
    value = size.get("longest_edge") if isinstance(size, dict) else getattr(size, "longest_edge", None)
    if value is None:
        value = getattr(getattr(model, "config", None), "max_pixels", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def create_app(
    index: Gallery,
    model: QueryModel,
    limits: ServeLimits | None = None,
    check_fingerprint: bool = True,
    api_key: str | None = None,
    reasoner: Any = None,
) -> FastAPI:
    """Build the web application around a loaded gallery index and model.

    Args:
        index: a :class:`circot.index.GalleryIndex` (or anything with ``search``, ``ids``, ``path_of``).
        model: a :class:`circot.model.CIRCoT` (or anything with ``encode_queries`` and ``stream_reasoning``).
        limits: request limits; defaults to :class:`ServeLimits`'s.
        check_fingerprint: refuse an index whose manifest names another model.
        api_key: when given, every route but ``/``, ``/static/...`` and ``/health`` requires the header
            ``Authorization: Bearer <api_key>`` (401 otherwise).
        reasoner: where full mode's CoTs come from (:mod:`circot.reasoner`); a served reasoner that fails
            answers 502.

    Raises:
        CircotError: when the index was built with another model and ``check_fingerprint`` is set.
    """
    limits = limits or ServeLimits()
    engine = SearchEngine(
        index, model, max_pending=limits.max_pending, check_fingerprint=check_fingerprint, reasoner=reasoner
    )
    app = FastAPI(
        title="circot",
        version=__version__,
        summary="Composed image retrieval with explicit chain-of-thought: reason, then embed.",
    )
    app.state.engine = engine
    app.state.limits = limits
    decode_slots = threading.BoundedSemaphore(limits.max_decoding)
    target_pixels = model_max_pixels(model)

    # ---- errors --------------------------------------------------------------------------------------
    @app.exception_handler(UploadRejected)
    async def _rejected(request: Request, exc: UploadRejected) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, exc.status_code)

    @app.exception_handler(ServerBusy)
    async def _busy(request: Request, exc: ServerBusy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 503, headers={"Retry-After": "2"})

    @app.exception_handler(ReasonerError)
    async def _reasoner_error(request: Request, exc: ReasonerError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 502)

    @app.exception_handler(CircotError)
    async def _circot_error(request: Request, exc: CircotError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, 400)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.error("request %s %s failed", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal error while answering; see the server log"}, 500)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "form")]
            parts.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts) or "invalid request"}, 422)

    # ---- helpers -------------------------------------------------------------------------------------
    def image_url(request: Request, gallery_id: str) -> str:
        return f"{request.scope.get('root_path', '')}/api/images/{quote(gallery_id, safe='')}"

    async def reference(
        request: Request, image: UploadFile | None, gallery_id: str | None
    ) -> tuple[Image.Image, ReferenceOut]:
        has_upload = image is not None and (image.filename or image.size)
        if has_upload and gallery_id:
            raise UploadRejected("give either an uploaded image or a gallery_id, not both", 400)
        if not has_upload and not gallery_id:
            raise UploadRejected(
                "give a reference image: upload one as 'image' or name one by 'gallery_id'", 400
            )
        if gallery_id:
            if len(gallery_id) > 1000:
                raise UploadRejected("gallery_id is longer than 1000 characters", 422)
            engine.resolve(gallery_id)
            picture = await run_in_threadpool(engine.gallery_image, gallery_id)
            ref = ReferenceOut(
                kind="gallery",
                id=gallery_id,
                url=image_url(request, gallery_id),
                width=picture.width,
                height=picture.height,
            )
            return picture, ref
        assert image is not None
        data = await image.read(limits.max_upload_bytes + 1)
        check_upload_size(len(data), limits)
        picture, (width, height) = await run_in_threadpool(decode_limited, data)
        return picture, ReferenceOut(kind="upload", width=width, height=height)

    def decode_limited(data: bytes) -> tuple[Image.Image, tuple[int, int]]:
        # At most ``max_decoding`` uploads are decoded at once, each downscaled to the model's input size.
        with decode_slots:
            return decode_upload(data, limits, target_pixels)

    def clean_text(text: str) -> str:
        text = text.strip()
        if not text:
            raise UploadRejected("text: the modification text is empty", 422)
        return text

    def answer(
        request: Request,
        text: str,
        mode: str,
        k: int,
        ref: ReferenceOut,
        outcome: SearchOutcome,
        edited: bool,
    ) -> SearchOut:
        return SearchOut(
            query=QueryOut(text=text, mode=mode, k=k, reference=ref),  # type: ignore[arg-type]
            cot=_cot_out(outcome.cot),
            edited=edited,
            results=[
                ResultOut(rank=h.rank, id=h.id, score=round(h.score, 6), url=image_url(request, h.id))
                for h in outcome.hits
            ],
            timings_ms=outcome.timings_ms,
        )

    # ---- form fields, shared by the search endpoints -------------------------------------------------
    TextField = Annotated[
        str,
        Form(max_length=limits.max_text_chars, description="the modification, e.g. 'make the circle red'"),
    ]
    ModeField = Annotated[
        Literal["full", "fast"],
        Form(description="full: write the reasoning, then embed; fast: embed directly"),
    ]
    KField = Annotated[int, Form(ge=1, le=limits.max_k, description="how many results")]
    ImageField = Annotated[
        UploadFile | None, File(description="the reference image (PNG, JPEG, WebP, GIF, BMP)")
    ]
    GalleryIdField = Annotated[str | None, Form(description="a gallery image id to use as the reference")]
    CotField = Annotated[str, Form(max_length=limits.max_cot_chars)]

    # ---- routes --------------------------------------------------------------------------------------
    @app.get("/health", response_model=HealthOut, tags=["service"])
    def health() -> HealthOut:
        """Liveness and what is being served."""
        return HealthOut(
            status="ok",
            version=__version__,
            model_fingerprint=getattr(model, "fingerprint", None),
            embedding_dim=getattr(model, "embedding_dim", None),
            gallery_size=len(engine.gallery_ids),
            index_matches_model=engine.fingerprint_matches,
            api_key_required=api_key is not None,
            limits={
                "max_upload_bytes": limits.max_upload_bytes,
                "max_pixels": limits.max_pixels,
                "max_text_chars": limits.max_text_chars,
                "max_cot_chars": limits.max_cot_chars,
                "max_k": limits.max_k,
            },
        )

    @app.get("/api/gallery", response_model=GalleryPage, tags=["gallery"])
    def gallery(
        request: Request,
        offset: Annotated[int, Query(ge=0)] = 0,
        limit: Annotated[int, Query(ge=1, le=500)] = 60,
        q: Annotated[str, Query(max_length=200, description="keep ids containing this text")] = "",
    ) -> GalleryPage:
        """Gallery image ids, for picking a reference image."""
        ids = engine.gallery_ids
        if q:
            needle = q.lower()
            ids = tuple(i for i in ids if needle in i.lower())
        items = [GalleryItem(id=i, url=image_url(request, i)) for i in ids[offset : offset + limit]]
        return GalleryPage(total=len(ids), offset=offset, items=items)

    @app.get(
        "/api/images/{gallery_id:path}",
        tags=["gallery"],
        response_class=FileResponse,
        responses={404: _ERRORS[404], 200: {"content": {"image/*": {}}, "description": "the image file"}},
    )
    def gallery_image(gallery_id: str) -> FileResponse:
        """A gallery image, by id. Only ids of the index are served; a request never names a file."""
        path = engine.gallery_path(gallery_id)
        return FileResponse(path, headers={"Cache-Control": "public, max-age=3600"})

    @app.post("/api/search", response_model=SearchOut, tags=["search"], responses=_ERRORS)
    async def search(
        request: Request,
        text: TextField,
        mode: ModeField = "full",
        k: KField = 10,
        image: ImageField = None,
        gallery_id: GalleryIdField = None,
    ) -> SearchOut:
        """Search by a reference image (uploaded or from the gallery) and a modification text."""
        text = clean_text(text)
        with engine.admitted():  # admit first, then decode: a refused request costs no decoding
            picture, ref = await reference(request, image, gallery_id)
            outcome = await run_in_threadpool(engine.search, picture, text, mode, k)
        return answer(request, text, mode, k, ref, outcome, edited=False)

    @app.post("/api/search/edited", response_model=SearchOut, tags=["search"], responses=_ERRORS)
    async def search_edited(
        request: Request,
        text: TextField,
        conclusion: CotField,
        caption: CotField = "",
        reasoning: CotField = "",
        k: KField = 10,
        image: ImageField = None,
        gallery_id: GalleryIdField = None,
    ) -> SearchOut:
        """Search again from a reasoning the user wrote or edited: the query is embedded from it."""
        text = clean_text(text)
        if not conclusion.strip():
            raise UploadRejected("conclusion: the edited conclusion is empty", 422)
        cot = CoT(caption=caption.strip(), reasoning=reasoning.strip(), conclusion=conclusion.strip())
        with engine.admitted():
            picture, ref = await reference(request, image, gallery_id)
            outcome = await run_in_threadpool(engine.search_from_cot, picture, text, cot, k)
        return answer(request, text, "full", k, ref, outcome, edited=True)

    @app.post(
        "/api/search/stream",
        tags=["search"],
        response_class=StreamingResponse,
        responses={
            **_ERRORS,
            200: {
                "content": {"text/event-stream": {}},
                "description": "Server-Sent Events: start, token*, cot, results, done (or error)",
            },
        },
    )
    async def search_stream(
        request: Request,
        text: TextField,
        mode: ModeField = "full",
        k: KField = 10,
        image: ImageField = None,
        gallery_id: GalleryIdField = None,
    ) -> StreamingResponse:
        """Search, streaming the reasoning as it is generated, then the results (Server-Sent Events).

        Event ``results`` carries the same JSON as ``POST /api/search`` answers.
        """
        text = clean_text(text)
        if not engine.try_admit():
            raise ServerBusy("the server is busy: too many searches are waiting; try again shortly")
        try:
            picture, ref = await reference(request, image, gallery_id)
        except BaseException:
            engine.release_admission()
            raise
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[str | None, Any]] = asyncio.Queue()
        cancel = threading.Event()

        def emit(event: str | None, data: Any) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, (event, data))
            except RuntimeError:  # the event loop is gone: nobody listens any more
                cancel.set()

        def work() -> None:
            try:
                outcome = engine.stream_search(picture, text, mode, k, emit, cancel)
                if outcome is not None:
                    emit("results", answer(request, text, mode, k, ref, outcome, edited=False))
            except CircotError as exc:
                emit("error", {"detail": str(exc)})
            except Exception:
                logger.exception("streamed search failed")
                emit("error", {"detail": "internal error while searching; see the server log"})
            finally:
                engine.release_admission()
                emit(None, None)

        async def stream() -> AsyncIterator[str]:
            worker = threading.Thread(target=work, name="circot-stream", daemon=True)
            try:
                yield _sse("start", {"text": text, "mode": mode, "k": k, "reference": ref.model_dump()})
                worker.start()
                while True:
                    event, data = await events.get()
                    if event is None:
                        break
                    if event == "token":
                        yield _sse("token", {"text": data})
                    elif event == "cot":
                        yield _sse("cot", _cot_out(data).model_dump())  # type: ignore[union-attr]
                    elif event == "results":
                        yield _sse("results", data.model_dump())
                    else:
                        yield _sse(event, data)
                yield _sse("done", {})
            finally:
                cancel.set()
                if not worker.is_alive() and worker.ident is None:  # never started: free its place
                    engine.release_admission()

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ---- the page ------------------------------------------------------------------------------------
    folder = static_dir()

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(folder / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=folder), name="static")

    if api_key is not None:
        if not api_key.strip():
            raise CircotError("the API key is empty")
        app.add_middleware(_ApiKey, key=api_key.strip())
    app.add_middleware(_SecurityHeaders)
    app.add_middleware(_BodyLimit, max_bytes=limits.max_body_bytes)
    return app

"""``conslu serve``: a ConSLU model behind an HTTP API with dynamic batching, and a page to try it.

* ``GET /health``: model, device, grammar size, uptime, requests and batches so far.
* ``POST /v1/parse``: the audio as the request body (any format :func:`conslu.audio.load_audio`
  reads) or as the multipart field ``file``; query parameters ``beam`` (1-16) and
  ``unconstrained`` (true/false). Answer: ``transcript``, ``logical_form``, ``valid``, ``tree``
  (nested JSON, :meth:`conslu.logical_form.Tree.to_dict`; null without a tree), ``seconds`` (the
  request), ``decode_seconds`` and ``batch_size`` (the decode it shared).
* ``GET /``: the page (``conslu/web/``): record or drop a file, see the transcript and the tree.

:class:`Batcher` is the one worker that decodes: requests wait in a queue; it takes the first, then
more until ``max_batch`` or ``max_wait_ms`` after the first, and decodes the requests of equal
options together with ``model.parse`` (the one decoding API) in a thread, so the event loop keeps
accepting requests. Bad input gets a 4xx ``{"error": "..."}`` naming the problem; an unexpected
failure a 500 ``{"error": ...}`` without a traceback; the service keeps answering either way.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Sequence

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from conslu.audio import AudioError, load_audio
from conslu.decoding import DecodingOptions
from conslu.logical_form import MalformedTreeError, parse_tree

__all__ = ["ServeOptions", "Batcher", "create_app"]

MAX_BEAM = 16


@dataclass(frozen=True)
class ServeOptions:
    """Limits and batching of the service."""

    max_batch: int = 8
    max_wait_ms: float = 10.0
    max_body_bytes: int = 10 * 2**20
    max_seconds: float = 30.0


class Batcher:
    """Dynamic batching: ``await submit(audio, options)`` -> the decode's dict for that audio.

    ``decode(audios, options) -> [dict, ...]`` runs in a worker thread, one call per group of
    requests with equal options in a batch.
    """

    def __init__(self, decode: Callable[[list[np.ndarray], DecodingOptions], Sequence[dict]], *,
                 max_batch: int = 8, max_wait_ms: float = 10.0) -> None:
        if max_batch < 1 or max_wait_ms < 0:
            raise ValueError(f"max_batch must be >= 1 and max_wait_ms >= 0, got {max_batch} and {max_wait_ms}")
        self.decode = decode
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.batches = 0
        self.items = 0

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass

    async def submit(self, audio: np.ndarray, options: DecodingOptions) -> dict:
        if self.queue is None:
            raise RuntimeError("Batcher.start() first")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put((audio, options, fut))
        return await fut

    async def _collect(self) -> list[tuple]:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.max_wait
        while len(batch) < self.max_batch:
            left = deadline - loop.time()
            if left <= 0:
                while len(batch) < self.max_batch and not self.queue.empty():  # what is there already
                    batch.append(self.queue.get_nowait())
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        while True:
            batch = await self._collect()
            groups: dict[DecodingOptions, list[tuple]] = {}
            for item in batch:
                groups.setdefault(item[1], []).append(item)
            for options, items in groups.items():
                items = [it for it in items if not it[2].done()]  # a client that went away
                if not items:
                    continue
                t0 = time.perf_counter()
                try:
                    results = await asyncio.to_thread(self.decode, [a for a, _, _ in items], options)
                except Exception as e:  # noqa: BLE001 - answered to each waiting request as a 500
                    for _, _, fut in items:
                        if not fut.done():
                            fut.set_exception(e)
                    continue
                seconds = time.perf_counter() - t0
                self.batches += 1
                self.items += len(items)
                for (_, _, fut), res in zip(items, results):
                    if not fut.done():
                        fut.set_result({**res, "decode_seconds": round(seconds, 4), "batch_size": len(items)})


class RequestError(Exception):
    """A bad request: answered with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _flag(name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on", ""):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise RequestError(400, f"query parameter {name} must be true or false, got {value!r}")


def decoding_options(query: Any, model: Any) -> DecodingOptions:
    """``DecodingOptions`` from the query (``beam``, ``unconstrained``), checked against the model."""
    unknown = sorted(set(query) - {"beam", "unconstrained"})
    if unknown:
        raise RequestError(400, f"unknown query parameter(s): {', '.join(unknown)} (known: beam, unconstrained)")
    beam_text = query.get("beam", "1")
    try:
        beam = int(beam_text)
    except ValueError:
        beam = 0
    if not 1 <= beam <= MAX_BEAM:
        raise RequestError(400, f"query parameter beam must be an integer from 1 to {MAX_BEAM}, got {beam_text!r}")
    options = DecodingOptions(beam_size=beam,
                              constrained=False if _flag("unconstrained", query.get("unconstrained", "0")) else None)
    try:
        model.check(options)
    except ValueError as e:
        raise RequestError(400, str(e)) from None
    return options


def read_audio(data: bytes, name: str, max_seconds: float) -> np.ndarray:
    """The audio in ``data`` (16 kHz mono float32); RequestError naming ``name`` and the problem."""
    if not data:
        raise RequestError(400, f"{name}: empty (send the audio as the request body or as the multipart field 'file')")
    fd, tmp = tempfile.mkstemp(prefix="conslu-serve-", suffix=os.path.splitext(name)[1][:8])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        try:
            return load_audio(tmp, max_seconds=max_seconds)
        except AudioError as e:
            raise RequestError(400, str(e).replace(tmp, name)) from None
    finally:
        os.unlink(tmp)


def tree_json(logical_form: str) -> dict | None:
    if not logical_form:
        return None
    try:
        return parse_tree(logical_form).to_dict()
    except MalformedTreeError:
        return None


def _web(name: str) -> str:
    return (resources.files("conslu") / "web" / name).read_text(encoding="utf-8")


def create_app(model: Any, *, name: str = "model", options: ServeOptions = ServeOptions()) -> Any:
    """The FastAPI application serving ``model`` (a :class:`conslu.model.ConSLU`, or anything with
    its ``parse``/``check``/``grammar``)."""
    batcher = Batcher(lambda audios, opts: model.parse(audios, opts), max_batch=options.max_batch,
                      max_wait_ms=options.max_wait_ms)
    started = time.time()
    counts = {"requests": 0, "errors": 0}

    @asynccontextmanager
    async def lifespan(app: Any):  # noqa: ANN202
        await batcher.start()
        try:
            yield
        finally:
            await batcher.stop()

    app = FastAPI(title="ConSLU", lifespan=lifespan, docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        counts["errors"] += 1
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(RequestError)
    async def _bad(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, str(exc))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, "invalid request: " + "; ".join(str(e.get("msg")) for e in exc.errors()))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    @app.get("/health")
    async def health() -> dict:
        grammar = getattr(model, "grammar", None)
        return {"status": "ok", "model": name, "device": str(getattr(model, "device", "cpu")),
                "grammar_labels": len(getattr(grammar, "labels", ()) or ()),
                "uptime_seconds": round(time.time() - started, 1), "requests": counts["requests"],
                "errors": counts["errors"], "batches": batcher.batches, "batched_requests": batcher.items,
                "max_batch": batcher.max_batch, "max_wait_ms": options.max_wait_ms}

    async def _body(request: Request) -> tuple[bytes, str]:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > options.max_body_bytes:
            raise RequestError(413, f"request body of {int(declared)} bytes is over the limit of {options.max_body_bytes}")
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > options.max_body_bytes:
                raise RequestError(413, f"request body is over the limit of {options.max_body_bytes} bytes")
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return bytes(data), "request body"
        return await _multipart(bytes(data), ctype)

    async def _multipart(data: bytes, ctype: str) -> tuple[bytes, str]:
        from starlette.datastructures import Headers, UploadFile
        from starlette.formparsers import MultiPartException, MultiPartParser

        async def stream():  # noqa: ANN202
            yield data

        try:
            form = await MultiPartParser(Headers({"content-type": ctype}), stream(),
                                         max_part_size=options.max_body_bytes).parse()
        except MultiPartException as e:
            raise RequestError(400, f"malformed multipart body: {e.message}") from None
        item = form.get("file")
        if not isinstance(item, UploadFile):
            fields = ", ".join(sorted(form.keys())) or "none"
            raise RequestError(400, f"multipart body has no file field 'file' (fields: {fields})")
        content = await item.read()
        return content, item.filename or "file"

    @app.post("/v1/parse")
    async def parse(request: Request) -> dict:
        t0 = time.perf_counter()
        counts["requests"] += 1
        opts = decoding_options(request.query_params, model)
        data, what = await _body(request)
        audio = await asyncio.to_thread(read_audio, data, what, options.max_seconds)
        res = await batcher.submit(audio, opts)
        lf = res.get("logical_form") or ""
        return {"transcript": res.get("transcript", ""), "logical_form": lf, "valid": bool(res.get("valid")),
                "tree": tree_json(lf), "seconds": round(time.perf_counter() - t0, 4),
                "decode_seconds": res["decode_seconds"], "batch_size": res["batch_size"],
                "audio_seconds": round(len(audio) / 16000.0, 3)}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        return HTMLResponse(_web("index.html"))

    @app.get("/app.js")
    async def script() -> Response:
        return Response(_web("app.js"), media_type="text/javascript")

    return app

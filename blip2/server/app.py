"""The HTTP app: caption, answer, match, embeddings, OpenAI-style chat completions, and a web page.

Bodies are JSON or multipart forms, parsed here rather than by FastAPI's models so that every
mistake gets one clear message in OpenAI's error shape. Model work goes through the batcher;
nothing in this file touches tensors.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import resource
import sys
import time
import uuid
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import Batcher
from .scheduler import ContinuousScheduler
from .engine import EmbedJob, Engine, GenerateJob, GenerateResult, GenerationSettings, MatchJob
from .limits import (
    ApiError, ImageData, Settings, bool_param, check_text, decode_base64, decode_image, float_param, image_digest,
    int_param, stops_param, text_param, texts_param,
)
from .telemetry import Telemetry, wants_prometheus

log = logging.getLogger("blip2.server")

# What the API key guards (the API's own description included); the page and /healthz stay open.
PROTECTED = ("/v1/", "/metrics", "/docs", "/openapi.json", "/redoc")


def create_app(engine: Engine, settings: Settings | None = None) -> FastAPI:
    """The FastAPI app serving `engine`; model work runs in the batcher's single model thread."""
    settings = settings or engine.settings
    settings.validate()
    def count(results):  # the telemetry is made below, with the app
        app.state.telemetry.generated(results)
        return results

    def run(key, payloads):
        return count(engine.run(key, payloads))

    if settings.batching == "continuous":  # the micro-batcher inside serves what cannot join (beam search, match, embed)
        batcher = ContinuousScheduler(engine, run, settings, on_results=count)
    else:
        batcher = Batcher(run, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                          settings.request_timeout_s, engine.batch_limit)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        publisher = asyncio.create_task(app.state.telemetry.publish_live_state())  # --workers N only
        yield
        # uvicorn has already let in-flight requests finish; this drains anything still queued.
        await batcher.stop()
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)

    app = FastAPI(title="blip2", version="0.1.0", lifespan=lifespan, redoc_url=None,
                  description="BLIP-2: caption images, answer questions about them, match and embed.")
    app.state.engine, app.state.batcher, app.state.settings = engine, batcher, settings
    app.state.counters = Counters()
    app.state.telemetry = Telemetry(batcher, engine, app.state.counters)
    app.add_middleware(Guard, settings=settings, counters=app.state.counters, telemetry=app.state.telemetry)
    _add_error_handlers(app)
    _add_routes(app, engine, batcher, settings)
    return app


# ---------------------------------------------------------------- the outer guard
class Counters:
    def __init__(self) -> None:
        self.started = time.time()
        self.requests = 0
        self.in_flight = 0
        self.by_status: dict[str, int] = {}


class Guard:
    """Pure ASGI middleware: API key, body-size limit, and request counters.

    It reads the whole body before the app sees it (at most max_body_bytes), so an oversized
    upload is refused without being parsed, and any exception that escapes the app still
    becomes a JSON 500 rather than a dropped connection.
    """

    def __init__(self, app, settings: Settings, counters: Counters, telemetry: Telemetry) -> None:
        self.app = app
        self.settings = settings
        self.counters = counters
        self.telemetry = telemetry

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        c = self.counters
        c.requests += 1
        c.in_flight += 1
        status = {"code": 0}
        started = time.monotonic()

        async def send_counted(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self._guarded(scope, receive, send_counted, status)
        finally:
            c.in_flight -= 1
            key = str(status["code"] or "none")
            c.by_status[key] = c.by_status.get(key, 0) + 1
            client = scope.get("client") or ("", 0)
            self.telemetry.request_done(scope.get("method", ""), scope.get("path", ""), status["code"],
                                        time.monotonic() - started, f"{client[0]}:{client[1]}")

    async def _guarded(self, scope, receive, send, status) -> None:
        path = scope.get("path", "")
        if self.settings.api_key and path.startswith(PROTECTED) and not self._authorized(scope):
            err = ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           headers={"WWW-Authenticate": "Bearer"})
            await _send_error(send, err)
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive, send)
            if body is None:
                return
            receive = _replay(body, receive)
        try:
            await self.app(scope, receive, send)
        except Exception:  # noqa: BLE001 - the server must survive anything one request does
            log.exception("unhandled error on %s", path)
            if not status["code"]:
                await _send_error(send, ApiError(500, "internal server error; the request was not completed"))

    def _authorized(self, scope) -> bool:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        given = headers.get("x-api-key") or ""
        auth = headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        return hmac.compare_digest(given.encode(), self.settings.api_key.encode())

    async def _read_body(self, scope, receive, send) -> bytes | None:
        """The request body, or None after answering 413 (or when the client left)."""
        limit = self.settings.max_body_bytes
        too_big = ApiError(413, f"the request body is larger than the limit of {limit} bytes")
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit() and int(value) > limit:
                await _send_error(send, too_big)
                return None
        chunks, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.settings.body_timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:  # a body sent slowly, or never: free the connection
                await _send_error(send, ApiError(408, f"the request body did not arrive within "
                                                      f"{self.settings.body_timeout_s:g} s",
                                                 headers={"Connection": "close"}))
                return None
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await _send_error(send, too_big)
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive):
    """A receive() that yields the already-read body once, then waits for the real disconnect."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _send_error(send, err: ApiError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        message = err.detail if isinstance(err.detail, str) else json.dumps(err.detail)
        if err.status_code == 404:
            message = f"no such endpoint: {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return _error_response(ApiError(err.status_code, message, headers=dict(err.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _error_response(ApiError(400, f"invalid request: {err.errors()}"))


# ---------------------------------------------------------------- reading requests
async def read_fields(request: Request, settings: Settings) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A JSON object or a multipart / urlencoded form -> (fields, uploaded files)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        raw = await request.body()
        try:
            # A large body (a base64 image) is parsed off the event loop, which must keep serving.
            data = json.loads(raw) if len(raw) < 65536 else await run_in_threadpool(json.loads, raw)
        except (UnicodeDecodeError, ValueError) as err:
            raise ApiError(400, f"the body is not valid JSON: {err}") from None
        if not isinstance(data, dict):
            raise ApiError(400, f"the JSON body must be an object, got {type(data).__name__}")
        return data, {}
    if ctype in ("multipart/form-data", "application/x-www-form-urlencoded"):
        try:
            form = await request.form(max_files=8, max_fields=64, max_part_size=settings.max_body_bytes)
        except Exception as err:  # noqa: BLE001 - the multipart parser's errors all mean "malformed form"
            raise ApiError(400, f"the form could not be parsed: {getattr(err, 'detail', err)}") from None
        fields: dict[str, Any] = {}
        files: dict[str, bytes] = {}
        for key in form.keys():
            values = form.getlist(key)
            uploads = [v for v in values if isinstance(v, UploadFile)]
            if uploads:
                files[key] = await uploads[0].read()
            else:
                fields[key] = values[0] if len(values) == 1 else list(values)
        return fields, files
    raise ApiError(415, f"unsupported content type {ctype or '(none)'!r}: send application/json or multipart/form-data")


async def read_image(engine: Engine, settings: Settings, fields: dict, files: dict, task: str,
                     name: str = "image") -> ImageData:
    """The request's image (an uploaded file, base64, or a data URL), decoded unless its features are cached."""
    if name in files:
        source = files[name]
    elif fields.get(name) is not None:
        source = fields[name]
    elif fields.get("image_url") is not None:
        url, name = fields["image_url"], "image_url"
        source = url.get("url") if isinstance(url, dict) else url
    else:
        raise ApiError(400, f"'{name}' is required: upload it as a multipart file field '{name}', "
                       "or send it in JSON as base64 or a data URL", name)
    return await load_image(engine, settings, source, task, name)


def _image_data(engine: Engine, settings: Settings, source: bytes | str, task: str, name: str) -> ImageData:
    data = source if isinstance(source, bytes) else decode_base64(source, name)
    sha = image_digest(data)
    features = engine.cache.get(engine.feature_kind(task), sha)  # the cache is thread-safe
    if features is not None:
        return ImageData(sha, features=features)  # a known image: no need to decode it again
    return ImageData(sha, image=decode_image(data, settings.max_image_pixels, name))


async def load_image(engine: Engine, settings: Settings, source: bytes | str, task: str, name: str) -> ImageData:
    """Uploaded bytes or base64 text -> ImageData; the work runs in a thread, off the event loop,
    in one trip there (each trip costs the event loop a wake-up and the model thread the GIL)."""
    return await run_in_threadpool(_image_data, engine, settings, source, task, name)


def generation_settings(fields: dict, settings: Settings, max_tokens_names=("max_new_tokens",)) -> GenerationSettings:
    """The generation options a request may set, each checked against the server's limits."""
    max_new = None
    for name in max_tokens_names:  # aliases (OpenAI's max_tokens...): the first one given counts
        value = int_param(fields, name, None, 1, settings.max_new_tokens)
        max_new = value if max_new is None else max_new
    temperature = float_param(fields, "temperature", None, 0.0, 5.0)
    do_sample = bool_param(fields, "do_sample", bool(temperature))  # OpenAI style: a temperature means sampling
    if do_sample and temperature == 0.0:
        raise ApiError(400, "'temperature' must be > 0 when sampling; use do_sample=false for greedy decoding",
                       "temperature")
    return GenerationSettings(
        max_new_tokens=max_new or settings.default_max_new_tokens,
        num_beams=int_param(fields, "num_beams", 1, 1, settings.max_num_beams),
        do_sample=do_sample,
        temperature=temperature or 1.0,
        top_p=float_param(fields, "top_p", 1.0, 1e-6, 1.0),
        top_k=int_param(fields, "top_k", 50, 0, 100_000),
        repetition_penalty=float_param(fields, "repetition_penalty", 1.0, 0.01, 10.0),
        length_penalty=float_param(fields, "length_penalty", 1.0, -10.0, 10.0),
        min_new_tokens=int_param(fields, "min_new_tokens", 0, 0, max_new or settings.default_max_new_tokens),
        seed=int_param(fields, "seed", None, 0, 2**63 - 1),
        stop=stops_param(fields),
    )


def _stream_param(fields: dict, gen: GenerationSettings) -> bool:
    """Whether to stream; a stream follows one sequence, so beam search cannot stream."""
    stream = bool_param(fields, "stream")
    if stream and gen.num_beams > 1:
        raise ApiError(400, "streaming follows one sequence: use num_beams=1 with stream=true, or stream=false "
                       "for beam search", "num_beams")
    return stream


def _require(ok: bool, what: str) -> None:
    if not ok:
        raise ApiError(501, f"this server's model cannot {what}; start it with a model that can")


# ---------------------------------------------------------------- streaming
_END = object()


class GenerationStream:
    """One streaming generation: pieces arrive from the model thread, the client reads them as events.

    Errors before the first piece (a full queue, a prompt too long) are raised from `start`, so
    they still get a proper 4xx/5xx status; later ones become an error event in the stream.
    """

    def __init__(self, batcher: Batcher, job: GenerateJob, telemetry: Telemetry | None = None) -> None:
        self.batcher = batcher
        self.job = job
        self.telemetry = telemetry
        self.pieces: asyncio.Queue = asyncio.Queue()
        self.task: asyncio.Task | None = None

    async def start(self) -> tuple[str, Any]:
        self.batcher.check_room()
        loop = asyncio.get_running_loop()
        self.job.on_text = lambda piece: loop.call_soon_threadsafe(self.pieces.put_nowait, piece)
        self.task = asyncio.create_task(self.batcher.submit(("stream", self.job.settings), self.job))
        started = time.monotonic()
        try:
            first = await self.next()
            if self.telemetry is not None:
                self.telemetry.first_token(time.monotonic() - started)
            return first
        except BaseException:
            self.close()
            raise

    async def next(self) -> tuple[str, Any]:
        """("piece", text) or ("done", GenerateResult); raises what the generation raised."""
        if self.pieces.empty() and not self.task.done():
            getter = asyncio.ensure_future(self.pieces.get())
            try:
                await asyncio.wait({getter, self.task}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                got = getter.done()
                if not got:
                    getter.cancel()  # also when the client left mid-wait: no task may outlive the stream
            if got:
                return "piece", getter.result()
        if not self.pieces.empty():
            return "piece", self.pieces.get_nowait()
        return "done", self.task.result()

    def close(self) -> None:
        """Stops the generation (the client left, or the stream ended) and forgets the task's outcome."""
        self.job.cancelled.set()
        if self.task is not None:
            if not self.task.done():
                self.task.cancel()
            self.task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def events(self, first: tuple[str, Any], render) -> AsyncIterator[str]:
        """Server-sent events: `render(kind, value)` gives each event's JSON (or None to skip)."""
        event = first
        try:
            while True:
                for data in render(*event):
                    yield f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"
                if event[0] == "done":
                    return
                try:
                    event = await self.next()
                except ApiError as err:
                    yield f"data: {json.dumps(err.body())}\n\n"
                    return
                except Exception as err:  # noqa: BLE001 - reported in the stream; the server goes on
                    log.exception("streaming generation failed")
                    yield f"data: {json.dumps(ApiError(500, f'generation failed: {err}').body())}\n\n"
                    return
        finally:
            self.close()


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---------------------------------------------------------------- chat completions
def chat_request(fields: dict, settings: Settings) -> tuple[str, str]:
    """OpenAI chat messages -> (the last image part's data URL, BLIP-2's chat-like prompt).

    User turns become "Question: ... Answer:", assistant and system turns their text, as in
    the BLIP-2 docs' chat example.
    """
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' is required: a non-empty list of {role, content} objects", "messages")
    image, parts = None, []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{n}] must be an object with role system, user or assistant", "messages")
        text, found = _message_content(message.get("content"), n, settings)
        image = found or image
        if message["role"] == "user" and text:
            parts.append(f"Question: {text} Answer:")
        elif message["role"] == "assistant" and text:
            parts.append(text)
        elif message["role"] == "system" and text:
            parts.append(text)
    if image is None:
        raise ApiError(400, "BLIP-2 needs an image: add a content part "
                       "{\"type\": \"image_url\", \"image_url\": {\"url\": \"data:image/png;base64,...\"}}", "messages")
    # A final user turn with only an image means "describe it": no question, no prompt.
    prompt = " ".join(parts)
    if len(prompt) > settings.max_prompt_chars:
        raise ApiError(400, f"the conversation is {len(prompt)} characters long; the limit is "
                       f"{settings.max_prompt_chars}", "messages")
    return image, prompt


def _message_content(content: Any, n: int, settings: Settings) -> tuple[str, Any]:
    if isinstance(content, str):
        return check_text(content, "messages", settings.max_prompt_chars).strip(), None
    if not isinstance(content, list):
        raise ApiError(400, f"messages[{n}].content must be a string or a list of parts", "messages")
    texts, image = [], None
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(check_text(part["text"], "messages", settings.max_prompt_chars).strip())
        elif kind == "image_url":
            url = part.get("image_url")
            image = url.get("url") if isinstance(url, dict) else url
            if not isinstance(image, str):
                raise ApiError(400, f"messages[{n}]: image_url must be {{\"url\": \"data:...\"}}", "messages")
        else:
            raise ApiError(400, f"messages[{n}]: content parts must be {{type: text}} or {{type: image_url}}",
                           "messages")
    return " ".join(t for t in texts if t), image


def chat_settings(fields: dict, settings: Settings) -> GenerationSettings:
    n = int_param(fields, "n", 1, 1, 1_000_000)
    if n != 1:
        raise ApiError(400, "'n' must be 1: this server returns one choice per request", "n")
    if fields.get("tools") or fields.get("functions"):
        raise ApiError(400, "tools and functions are not supported by BLIP-2", "tools")
    return generation_settings(fields, settings, ("max_completion_tokens", "max_tokens", "max_new_tokens"))


def _usage(result: GenerateResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


# ---------------------------------------------------------------- routes
def _add_routes(app: FastAPI, engine: Engine, batcher: Batcher, settings: Settings) -> None:
    counters: Counters = app.state.counters
    telemetry: Telemetry = app.state.telemetry

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        html = resources.files("blip2.server").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-store"})

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "model": engine.name, "auth_required": bool(settings.api_key),
                "captioning": engine.can_generate, "retrieval": engine.can_match,
                "queued": batcher.snapshot()["queued"], "pid": os.getpid()}  # pid: which --workers process

    @app.get("/metrics")
    async def metrics(request: Request):
        """JSON; Prometheus text with ?format=prometheus or an Accept header naming text/plain or openmetrics."""
        if wants_prometheus(request.url.query, request.headers.get("accept", "")):
            if telemetry.registry is None:
                raise ApiError(501, "Prometheus metrics need prometheus-client: pip install 'blip2[serve]'")
            body, content_type = telemetry.prometheus_text()
            return Response(body, media_type=content_type)
        return {
            "batcher": batcher.snapshot(),
            "cache": engine.cache.stats(),
            "requests": {"total": counters.requests, "in_flight": counters.in_flight,
                         "by_status": dict(sorted(counters.by_status.items()))},
            "peak_rss_mb": round(peak_rss_bytes() / 2**20, 1),
            "uptime_s": round(time.time() - counters.started, 1),
        }

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": engine.name, "object": "model", "created": int(counters.started),
                                            "owned_by": "blip2", **engine.describe()}]}

    async def submit_generation(gen: GenerationSettings, job: GenerateJob) -> GenerateResult:
        """A whole (not streamed) generation; its first token reaches the client with the last."""
        started = time.monotonic()
        result = await batcher.submit(engine.generate_key(gen), job)
        telemetry.first_token(time.monotonic() - started)
        return result

    async def run_generation(fields: dict, files: dict, prompt: str, gen: GenerationSettings, body):
        """Shared by caption and answer: `body(image, result)` is the JSON answer (or the stream's last event)."""
        stream = _stream_param(fields, gen)
        image = await read_image(engine, settings, fields, files, "generate")
        job = GenerateJob(image, prompt, gen)
        if not stream:
            return body(image, await submit_generation(gen, job))
        stream = GenerationStream(batcher, job, telemetry)
        first = await stream.start()

        def render(kind, value):
            return [{"delta": value}] if kind == "piece" else [{"done": True, **body(image, value)}]

        return sse_response(stream.events(first, render))

    def common(image: ImageData, result: GenerateResult) -> dict[str, Any]:
        return {"model": engine.name, "image_sha256": image.sha256, "cached": result.cached,
                "finish_reason": result.finish_reason, "usage": _usage(result)}

    @app.post("/v1/caption")
    async def caption(request: Request):
        """An image's caption; `prompt` (e.g. "a photo of") starts the caption. JSON or multipart; `stream` for SSE."""
        _require(engine.can_generate, "caption images")
        fields, files = await read_fields(request, settings)
        prompt = text_param(fields, "prompt", settings.max_prompt_chars) or engine.caption_prompt()
        gen = generation_settings(fields, settings)
        return await run_generation(fields, files, prompt, gen,
                                    lambda image, result: {"caption": result.text, **common(image, result)})

    @app.post("/v1/answer")
    async def answer(request: Request):
        """An answer to `question` about the image (VQA prompt "Question: ... Answer:"); `stream` for SSE."""
        _require(engine.can_generate, "answer questions")
        fields, files = await read_fields(request, settings)
        question = text_param(fields, "question", settings.max_prompt_chars, required=True).strip()
        template = text_param(fields, "prompt_template", settings.max_prompt_chars, default=engine.question_template())
        if template.count("{}") != 1:
            raise ApiError(400, "'prompt_template' must contain '{}' exactly once (where the question goes)",
                           "prompt_template")
        prompt = template.replace("{}", question)
        if len(prompt) > settings.max_prompt_chars:
            raise ApiError(400, f"the prompt is {len(prompt)} characters long; the limit is {settings.max_prompt_chars}",
                           "question")
        gen = generation_settings(fields, settings)
        return await run_generation(
            fields, files, prompt, gen,
            lambda image, result: {"answer": result.text, "question": question, **common(image, result)},
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        """OpenAI-compatible chat: image parts as data URLs; `stream: true` for server-sent events."""
        _require(engine.can_generate, "chat")
        fields, _ = await read_fields(request, settings)
        url, prompt = chat_request(fields, settings)
        prompt = prompt or engine.caption_prompt()  # an image alone: describe it
        gen = chat_settings(fields, settings)
        stream = _stream_param(fields, gen)
        image = await load_image(engine, settings, url, "generate", "image_url")
        job = GenerateJob(image, prompt, gen)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.name}
        if not stream:
            result = await submit_generation(gen, job)
            return {**meta, "object": "chat.completion", "usage": _usage(result),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                                 "finish_reason": result.finish_reason}]}
        stream = GenerationStream(batcher, job, telemetry)
        first = await stream.start()
        include_usage = isinstance(fields.get("stream_options"), dict) and bool(fields["stream_options"].get("include_usage"))

        def chunk(delta: dict, finish=None) -> dict:
            return {**meta, "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

        sent_role = False

        def render(kind, value):
            nonlocal sent_role
            out = []
            if not sent_role:
                sent_role = True
                out.append(chunk({"role": "assistant", "content": ""}))
            if kind == "piece":
                out.append(chunk({"content": value}))
            else:
                out.append(chunk({}, value.finish_reason))
                if include_usage:
                    out.append({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(value)})
                out.append("[DONE]")
            return out

        return sse_response(stream.events(first, render))

    @app.post("/v1/match")
    async def match(request: Request):
        """How well each text fits the image: the ITM match probability and the ITC similarity
        (`mode`: "both", the default, "itm" or "itc")."""
        _require(engine.can_match, "match images and texts (it has no retrieval heads)")
        fields, files = await read_fields(request, settings)
        texts = texts_param(fields, "texts" if "texts" in fields else "text", settings)
        mode = fields.get("mode") or "both"
        if mode not in ("both", "itm", "itc"):
            raise ApiError(400, f"'mode' must be 'both', 'itm' or 'itc', got {mode!r}", "mode")
        image = await read_image(engine, settings, fields, files, "match")
        scores = await batcher.submit(("match", mode), MatchJob(image, texts, mode))
        return {"model": engine.name, "mode": mode, "image_sha256": image.sha256,
                "scores": [{"text": t, **s} for t, s in zip(texts, scores)]}

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        """ITC embeddings (OpenAI's shape): `input` texts and/or an `image`, in that order."""
        _require(engine.can_match, "embed (it has no retrieval heads)")
        fields, files = await read_fields(request, settings)
        texts = [] if _missing_input(fields) else texts_param(fields, "input", settings)
        image = None
        if "image" in files or fields.get("image") is not None:
            image = await read_image(engine, settings, fields, files, "embed")
        if not texts and image is None:
            raise ApiError(400, "send 'input' (a text or a list of texts) and/or an 'image'", "input")
        results = await batcher.submit(("embed",), EmbedJob(texts, image))
        return {"object": "list", "model": engine.name,
                "data": [{"object": "embedding", "index": n, **r} for n, r in enumerate(results)]}


def _missing_input(fields: dict) -> bool:
    value = fields.get("input")
    return value is None or value == [] or value == ""


def peak_rss_bytes() -> int:
    """This process's peak resident memory (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024

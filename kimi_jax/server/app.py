"""The OpenAI-compatible HTTP API (Starlette): routes, authentication, limits, errors, SSE.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions,
POST /v1/completions, GET /metrics. Every failure is an OpenAI-shaped JSON error; an unexpected one
is logged here with its traceback and answered 500 without it, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from kimi_jax.server.errors import APIError, bad_request
from kimi_jax.server.metrics import Counters, prometheus_text
from kimi_jax.server.requests import parse_chat, parse_completion
from kimi_jax.server.responses import chat_deltas, chat_message, sse
from kimi_jax.server.service import Service

log = logging.getLogger("kimi_jax.serve")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


# ---- request plumbing ----------------------------------------------------------------------------

class _RequireKey:
    """ASGI middleware: with an API key set, every request needs `Authorization: Bearer KEY`."""

    def __init__(self, app, key: str):
        self.app = app
        self._key = key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if not header:
                error = APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                                 code="invalid_api_key")
            elif scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self._key):
                error = APIError(401, "incorrect API key", code="invalid_api_key")
            else:
                error = None
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the request body is larger than this server accepts ({limit} bytes)",
                       code="request_too_large")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise too_big
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON ({e})", code="invalid_json") from None


async def _client_left(request: Request) -> None:
    """Returns when the client disconnects (the request body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events whose generation is cancelled however the response ends: finished,
    client gone, or failed."""

    def __init__(self, chunks, run, counters: Counters):
        super().__init__(chunks, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._run, self._counters = run, counters

    async def __call__(self, scope, receive, send):
        self._counters.streams_active += 1
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._counters.streams_active -= 1
            if self._run.finish_reason is None:
                self._counters.requests_cancelled += 1
            self._run.cancel()


class Api:
    def __init__(self, service: Service):
        self.service = service
        self.counters = Counters()

    def _head(self, kind: str) -> dict:
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": self.service.settings.model_name}

    async def _parse(self, request: Request, parse):
        body = await _read_json(request, self.service.settings.max_body_bytes)
        return parse(body)

    async def _finish_or_cancel(self, request: Request, run, consume):
        """Run `consume()` to the end unless the client disconnects first (then cancel the run)."""
        work = asyncio.ensure_future(consume())
        left = asyncio.ensure_future(_client_left(request))
        done, _ = await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
        left.cancel()
        if work not in done:
            run.cancel()
            work.cancel()
            self.counters.requests_cancelled += 1
            return None
        return work.result()

    async def chat_completions(self, request: Request):
        req = await self._parse(request, parse_chat)
        run = self.service.chat(req)
        run.start()
        head = self._head("chat.completion")
        if req.sampling.stream:
            return _EventStream(self._chat_chunks(run, head, req.sampling.include_usage), run, self.counters)

        async def consume():
            async for _ in run.events():
                pass

        await self._finish_or_cancel(request, run, consume)
        if run.finish_reason is None:
            return PlainTextResponse("", status_code=499)  # nobody is listening any more
        self._log_warnings(head["id"], run.warnings)
        choice = {"index": 0, "message": chat_message(run.output.message()), "logprobs": None,
                  "finish_reason": run.finish_reason}
        return JSONResponse({**head, "object": "chat.completion", "choices": [choice], "usage": run.usage()})

    async def _chat_chunks(self, run, head: dict, include_usage: bool):
        def chunk(delta, finish_reason=None):
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            return sse({**head, "object": "chat.completion.chunk", "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        try:
            async for events in run.events():
                for delta in chat_deltas(events):
                    yield chunk(delta)
        except APIError as e:  # a later phase could not be queued; the status line is long gone
            yield sse(e.body())
            return
        if run.finish_reason is None:
            return
        self._log_warnings(head["id"], run.warnings)
        yield chunk({}, run.finish_reason)
        if include_usage:
            yield sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"

    # ---- completions --------------------------------------------------------------------------
    async def completions(self, request: Request):
        req = await self._parse(request, parse_completion)
        run = self.service.completion(req)
        run.start()
        head = self._head("text_completion")
        if req.sampling.stream:
            return _EventStream(self._text_chunks(run, head, req.sampling.include_usage), run, self.counters)

        async def consume():
            return "".join([text async for text in run.texts()])

        text = await self._finish_or_cancel(request, run, consume)
        if run.finish_reason is None:
            return PlainTextResponse("", status_code=499)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": run.finish_reason}
        return JSONResponse({**head, "object": "text_completion", "choices": [choice], "usage": run.usage()})

    async def _text_chunks(self, run, head: dict, include_usage: bool):
        def chunk(text, finish_reason=None):
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return sse({**head, "object": "text_completion", "choices": [choice]})

        async for text in run.texts():
            if text:
                yield chunk(text)
        if run.finish_reason is None:
            return
        yield chunk("", run.finish_reason)
        if include_usage:
            yield sse({**head, "object": "text_completion", "choices": [], "usage": run.usage()})
        yield "data: [DONE]\n\n"

    # ---- the rest -----------------------------------------------------------------------------
    def _model_card(self) -> dict:
        return {"id": self.service.settings.model_name, "object": "model", "created": self.counters.started,
                "owned_by": "kimi_jax", "max_model_len": self.service.max_len}

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request):
        self.service.check_model(request.path_params["model"])
        return JSONResponse(self._model_card())

    async def health(self, request: Request):
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request):
        values = {**self.service.engine.metrics(), **self.counters.as_dict()}
        wants_json = request.query_params.get("format") == "json" or "json" in request.headers.get("accept", "")
        if wants_json:
            return JSONResponse(values)
        return PlainTextResponse(prometheus_text(values), media_type="text/plain; version=0.0.4")

    def _log_warnings(self, request_id: str, warnings: list[str]):
        for warning in warnings:
            log.warning("%s: %s", request_id, warning)


def create_app(service: Service) -> Starlette:
    api = Api(service)

    async def on_api_error(request, exc: APIError):
        api.counters.count_error(exc.status)
        return error_response(exc)

    async def on_http_error(request, exc: HTTPException):
        api.counters.count_error(exc.status_code)
        message = {404: f"no such endpoint: {request.method} {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        return error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    async def on_bug(request, exc: Exception):
        api.counters.count_error(500)
        log.exception("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(APIError(500, "internal server error (logged on the server)"))

    routes = [
        Route("/health", api.health),
        Route("/metrics", api.metrics),
        Route("/v1/models", api.models),
        Route("/v1/models/{model:path}", api.model),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={APIError: on_api_error, HTTPException: on_http_error,
                                                       Exception: on_bug})
    if service.settings.api_key:
        app.add_middleware(_RequireKey, key=service.settings.api_key)
    app.state.api = api
    return app

"""`endor serve`: an OpenAI-compatible HTTP server (Starlette on uvicorn) in front of one Engine.

Routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true sends
server-sent events, ending with `data: [DONE]`), GET /health. Requests wait in one FIFO queue and
run one at a time on a single generation thread (the runtime streams one model through one set
of buffers); at most `max_queue` wait, beyond that 429. Anything refused is an OpenAI-style JSON
error with a 4xx status and the server keeps serving. One log line per request with its tokens/s.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from . import openai_api as api
from .engine import Engine, Request, Result

log = logging.getLogger("endor.serve")
MAX_BODY_BYTES = 4 * 2**20


def _error(e: api.APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Server:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="endor-generate")
        self.waiting = 0  # admitted requests not finished yet (queued or generating)
        self.created = int(time.time())

    # -- plumbing -------------------------------------------------------------------------
    async def body(self, request: HTTPRequest):
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise api.APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise api.APIError(400, f"the request body is not valid JSON ({e})") from None

    def admit(self) -> None:
        """Refuse when the queue is full (429). Callers count the request in `waiting` only
        where they also count it out: a stream does both inside its body generator, which
        never runs at all when the client leaves first."""
        if self.waiting >= self.max_queue:
            raise api.APIError(429, f"{self.waiting} requests are already waiting; retry later",
                               type="rate_limit_error", code="server_busy")

    def report(self, route: str, result: Result) -> None:
        log.info("%s: %d prompt + %d completion tokens in %.2f s, %.2f tokens/s decode, "
                 "first token after %.2f s (%s)", route, result.prompt_tokens,
                 result.completion_tokens, result.seconds, result.decode_tokens_per_s,
                 result.first_token_s or 0.0, result.finish_reason)

    async def run(self, route: str, req: Request) -> Result:
        loop = asyncio.get_running_loop()
        self.waiting += 1
        try:
            result = await loop.run_in_executor(self.worker, self.engine.generate, req)
        finally:
            self.waiting -= 1
        self.report(route, result)
        return result

    def stream(self, route: str, req: Request, first: list[dict], chunk,
               final) -> StreamingResponse:
        """SSE: `first` chunks, then chunk(text) per piece of text, then final(result) chunks."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_text(text: str) -> None:  # on the generation thread
            loop.call_soon_threadsafe(queue.put_nowait, text)

        async def events():
            self.waiting += 1
            future = loop.run_in_executor(self.worker, self.engine.generate, req, on_text,
                                          cancelled)
            future.add_done_callback(lambda f: queue.put_nowait(None))
            try:
                for c in first:
                    yield _sse(c)
                while (text := await queue.get()) is not None:
                    yield _sse(chunk(text))
                try:
                    result = future.result()
                except Exception as e:  # the model failed mid-stream: say so, then end
                    log.exception("%s failed", route)
                    yield _sse(api.APIError(500, f"generation failed: {e}",
                                            type="server_error").body())
                    return
                self.report(route, result)
                for c in final(result):
                    yield _sse(c)
                yield "data: [DONE]\n\n"
            finally:
                cancelled.set()  # finished, or the client went away: stop generating
                self.waiting -= 1

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    # -- routes ---------------------------------------------------------------------------
    async def models(self, request):
        return JSONResponse(api.models(self.engine.name, self.created))

    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.engine.name,
                             "waiting": self.waiting})

    async def completions(self, request):
        body = await self.body(request)
        req, stream = api.parse_completion(body, self.engine)
        self.admit()
        rid, name = api.new_id("cmpl"), self.engine.name
        if not stream:
            return JSONResponse(api.completion(rid, name, await self.run("completion", req)))
        include_usage = _include_usage(body)
        return self.stream(
            "completion", req, [], lambda text: api.completion_chunk(rid, name, text),
            lambda r: [api.completion_chunk(rid, name, "", r.finish_reason),
                       *self._usage_chunk(include_usage, rid, name, r, "text_completion")])

    async def chat_completions(self, request):
        body = await self.body(request)
        req, stream = api.parse_chat(body, self.engine)
        self.admit()
        rid, name = api.new_id("chatcmpl"), self.engine.name
        if not stream:
            return JSONResponse(api.chat(rid, name, await self.run("chat", req)))
        include_usage = _include_usage(body)
        return self.stream(
            "chat", req, [api.chat_chunk(rid, name, {"role": "assistant", "content": ""})],
            lambda text: api.chat_chunk(rid, name, {"content": text}),
            lambda r: [api.chat_chunk(rid, name, {}, r.finish_reason),
                       *self._usage_chunk(include_usage, rid, name, r, "chat.completion.chunk")])

    @staticmethod
    def _usage_chunk(include: bool, rid, name, result: Result, obj: str) -> list[dict]:
        if not include:
            return []
        return [{"id": rid, "object": obj, "created": int(time.time()), "model": name,
                 "choices": [], "usage": api.usage(result)}]


def _include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(engine: Engine, *, max_queue: int = 64) -> Starlette:
    server = _Server(engine, max_queue)

    async def refused(request, exc: api.APIError):
        return _error(exc)

    async def http_error(request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error(api.APIError(exc.status_code, f"{request.method} {request.url.path}: "
                                   f"{exc.detail}", code=code))

    async def crashed(request, exc: Exception):
        log.exception("%s %s failed", request.method, request.url.path)
        return JSONResponse(api.APIError(500, f"internal error: {exc}",
                                         type="server_error").body(), status_code=500)

    app = Starlette(
        routes=[Route("/v1/models", server.models, methods=["GET"]),
                Route("/v1/completions", server.completions, methods=["POST"]),
                Route("/v1/chat/completions", server.chat_completions, methods=["POST"]),
                Route("/health", server.health, methods=["GET"])],
        exception_handlers={api.APIError: refused, HTTPException: http_error,
                            Exception: crashed})
    app.state.endor = server
    return app


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 8000,
          max_queue: int = 64) -> None:
    """Serve until interrupted (Ctrl-C)."""
    import uvicorn

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s endor serve: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.info("serving %s on http://%s:%d/v1", engine.name, host, port)
    uvicorn.run(create_app(engine, max_queue=max_queue), host=host, port=port,
                log_level="warning")

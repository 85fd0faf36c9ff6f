"""An OpenAI-compatible HTTP server over the continuous-batching engine (FastAPI + uvicorn).

Endpoints: /v1/models, /v1/completions, /v1/chat/completions (streamed as server-sent events
ending with ``data: [DONE]``, or whole), /health, /metrics (Prometheus text). Errors use
OpenAI's body, ``{"error": {"message", "type", "param", "code"}}``, with the matching status.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from qwen3c.errors import RequestError, WorkerError
from qwen3c.runtime.chat import chat_prompt
from qwen3c.runtime.engine import Engine, RequestEvent
from qwen3c.runtime.engine import Request as EngineRequest
from qwen3c.runtime.sampling import SamplingParams

MAX_N = 8
MAX_LOGPROBS = 20


class _SamplingBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] = Field(default_factory=list)
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: dict[str, Any] | None = None

    def sampling(self, index: int) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature, top_k=self.top_k, top_p=self.top_p,
            min_p=self.min_p, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            seed=None if self.seed is None else self.seed + index)

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionBody(_SamplingBody):
    prompt: str | list[int]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool"]
    content: str


class ChatBody(_SamplingBody):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = (
            status, message, kind, param, code)

    def response(self) -> JSONResponse:
        return JSONResponse(status_code=self.status, content={"error": {
            "message": self.message, "type": self.kind, "param": self.param, "code": self.code}})


def serve(artifact: str, *, host: str = "127.0.0.1", port: int = 8000,
          api_key: str | None = None, model_name: str | None = None, max_batch_size: int = 8,
          kv_cache_tokens: int | None = None, threads: int | None = None,
          devices: str | None = None) -> None:
    """Load the artifact and serve it until interrupted."""
    import uvicorn

    from qwen3c.runtime.model import load

    model = load(artifact, max_batch_size=max_batch_size, kv_cache_tokens=kv_cache_tokens,
                 threads=threads, devices=devices)
    engine = Engine(model)
    engine.start()
    name = model_name or "qwen3c"
    try:
        uvicorn.run(create_app(engine, model_name=name, api_key=api_key), host=host,
                    port=port, log_level="warning")
    finally:
        engine.stop()
        model.close()


def create_app(engine: Engine, *, model_name: str, api_key: str | None = None,
               max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="qwen3c", docs_url=None, redoc_url=None)
    model = engine.model
    started = int(time.time())

    @app.middleware("http")
    async def guard(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return ApiError(413, f"request body over {max_body_bytes} bytes").response()
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return ApiError(401, "invalid API key", "authentication_error",
                                code="invalid_api_key").response()
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(_request: Request, err: RequestValidationError):
        first = err.errors()[0] if err.errors() else {}
        if first.get("type") == "json_invalid":
            return ApiError(400, "the request body is not valid JSON").response()
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return ApiError(400, f"invalid request: {first.get('msg', 'malformed body')}"
                        + (f" ({param})" if param else ""), param=param).response()

    @app.get("/health")
    async def health():
        if engine.failure is not None:
            return JSONResponse(status_code=503, content={"status": "failed",
                                                          "error": engine.failure})
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": model_name, "object": "model", "created": started, "owned_by": "qwen3c",
             "max_model_len": model.context_length}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(_prometheus(engine), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        _check_model(body.model, model_name)
        prompt_ids = _encode(model, body.prompt)
        return await _serve(engine, request, body, prompt_ids, chat=False,
                            max_tokens=body.max_tokens, logprobs=body.logprobs)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        _check_model(body.model, model_name)
        options = dict(body.chat_template_kwargs or {})
        if body.enable_thinking is not None:
            options["enable_thinking"] = body.enable_thinking
        try:
            text = chat_prompt(model.tokenizer, [m.model_dump() for m in body.messages],
                               **options)
        except RequestError as err:
            raise ApiError(400, str(err)) from None
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return await _serve(engine, request, body, _encode(model, text), chat=True,
                            max_tokens=body.max_completion_tokens or body.max_tokens,
                            logprobs=logprobs)

    return app


def _check_model(requested: str, served: str) -> None:
    if requested != served:
        raise ApiError(404, f"the model {requested!r} does not exist; this server has "
                       f"{served!r}", param="model", code="model_not_found")


def _encode(model, prompt: str | list[int]) -> list[int]:
    try:
        return model.checked_ids(model.encode(prompt))
    except RequestError as err:
        raise ApiError(400, str(err), param="prompt") from None


async def _serve(engine: Engine, request: Request, body: _SamplingBody, prompt_ids: list[int],
                 *, chat: bool, max_tokens: int | None, logprobs: int | None):
    room = engine.model.context_length - len(prompt_ids)
    if max_tokens is None:
        max_tokens = max(room, 1)
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens must be at least 1, got {max_tokens}",
                       param="max_tokens")
    if max_tokens > room + 1:
        raise ApiError(400, f"prompt ({len(prompt_ids)} tokens) plus max_tokens "
                       f"({max_tokens}) exceeds the context length "
                       f"{engine.model.context_length}", param="max_tokens")
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[int, RequestEvent]] = asyncio.Queue()
    submitted: list[EngineRequest] = []
    try:
        for index in range(body.n):
            engine_request = EngineRequest(
                prompt_ids, max_tokens, body.sampling(index), stop=body.stops(),
                stop_token_ids=body.stop_token_ids, logprobs=logprobs,
                on_event=functools.partial(_deliver, loop, queue, index))
            engine.submit(engine_request)
            submitted.append(engine_request)
    except RequestError as err:
        for r in submitted:
            engine.cancel(r.request_id)
        raise ApiError(400, str(err)) from None
    except WorkerError as err:
        raise ApiError(503, str(err), "server_error") from None
    response = _Response(engine.model, body, chat, len(prompt_ids))
    if body.stream:
        return StreamingResponse(_stream(engine, request, queue, submitted, response),
                                 media_type="text/event-stream")
    return await _collect(engine, request, queue, submitted, response)


def _deliver(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int,
             event: RequestEvent) -> None:
    """Hand an engine event (engine thread) to the request's handler (event loop)."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: the server is shutting down
        loop.call_soon_threadsafe(queue.put_nowait, (index, event))


class _Response:
    """Shapes engine events into OpenAI completion / chat.completion objects."""

    def __init__(self, model, body: _SamplingBody, chat: bool, prompt_tokens: int):
        self.model, self.body, self.chat = model, body, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created = int(time.time())
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = [0] * body.n

    def usage(self) -> dict[str, int]:
        completion = sum(self.completion_tokens)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def envelope(self, choices: list[dict[str, Any]], *, chunk: bool) -> dict[str, Any]:
        kind = "chat.completion" if self.chat else "text_completion"
        return {"id": self.id, "object": f"{kind}.chunk" if chunk and self.chat else kind,
                "created": self.created, "model": self.body.model, "choices": choices}

    def choice(self, index: int, text: str, event_logprobs: list, finish: str | None, *,
               chunk: bool) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": index, "finish_reason": finish,
                                  "logprobs": self.logprobs(event_logprobs)}
        if not self.chat:
            choice["text"] = text
        elif chunk:
            choice["delta"] = {"role": "assistant", "content": text}
        else:
            choice["message"] = {"role": "assistant", "content": text}
        return choice

    def logprobs(self, entries: list) -> dict[str, Any] | None:
        wanted = self.body.logprobs if self.chat else self.body.logprobs is not None
        if not wanted:
            return None
        token = self.model.tokenizer.token_text if self.model.tokenizer else str
        if self.chat:
            return {"content": [{
                "token": token(e.token), "logprob": e.logprob, "bytes": None,
                "top_logprobs": [{"token": token(t), "logprob": lp, "bytes": None}
                                 for t, lp in e.top]} for e in entries]}
        return {"tokens": [token(e.token) for e in entries],
                "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{token(t): lp for t, lp in e.top} for e in entries],
                "text_offset": []}


async def _next_event(request: Request, queue: asyncio.Queue) -> tuple[int, RequestEvent] | None:
    """The next engine event, or None once the client has gone away."""
    while True:
        try:
            return await asyncio.wait_for(queue.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                return None


async def _collect(engine: Engine, request: Request, queue: asyncio.Queue,
                   submitted: list[EngineRequest], response: _Response):
    texts = [""] * len(submitted)
    logprobs: list[list] = [[] for _ in submitted]
    finish: list[str | None] = [None] * len(submitted)
    while None in finish:
        item = await _next_event(request, queue)
        if item is None:
            for r in submitted:
                engine.cancel(r.request_id)
            return JSONResponse(status_code=499, content={})
        index, event = item
        if event.error:
            raise ApiError(500, event.error, "server_error")
        texts[index] += event.text
        logprobs[index] += event.logprobs
        finish[index] = event.finish_reason
        response.completion_tokens[index] = event.completion_tokens
    choices = [response.choice(i, texts[i], logprobs[i], finish[i], chunk=False)
               for i in range(len(submitted))]
    return {**response.envelope(choices, chunk=False), "usage": response.usage()}


async def _stream(engine: Engine, request: Request, queue: asyncio.Queue,
                  submitted: list[EngineRequest], response: _Response) -> AsyncIterator[str]:
    open_choices = set(range(len(submitted)))
    try:
        while open_choices:
            item = await _next_event(request, queue)
            if item is None:
                return
            index, event = item
            if event.error:
                yield _sse({"error": {"message": event.error, "type": "server_error",
                                      "param": None, "code": None}})
                return
            response.completion_tokens[index] = event.completion_tokens
            choice = response.choice(index, event.text, event.logprobs, event.finish_reason,
                                     chunk=True)
            yield _sse(response.envelope([choice], chunk=True))
            if event.finish_reason:
                open_choices.discard(index)
        if (response.body.stream_options or {}).get("include_usage"):
            yield _sse({**response.envelope([], chunk=True), "usage": response.usage()})
        yield "data: [DONE]\n\n"
    finally:
        if open_choices:  # the client went away (or the generator was closed): free pages
            for r in submitted:
                engine.cancel(r.request_id)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _prometheus(engine: Engine) -> str:
    c = engine.counters
    metrics = [
        ("qwen3c_requests_running", "gauge", "requests in the decode batch", engine.running),
        ("qwen3c_requests_waiting", "gauge", "requests queued for admission", engine.waiting),
        ("qwen3c_kv_pages_used", "gauge", "KV cache pages in use", engine.pages_used),
        ("qwen3c_kv_pages_total", "gauge", "KV cache pages", engine.total_pages),
        ("qwen3c_generation_tokens_per_second", "gauge",
         "generated tokens per second over the last 10 s", engine.tokens_per_second()),
        ("qwen3c_requests_finished_total", "counter", "finished requests",
         c.requests_finished),
        ("qwen3c_prompt_tokens_total", "counter", "prompt tokens received", c.prompt_tokens),
        ("qwen3c_prefilled_tokens_total", "counter", "prompt tokens computed",
         c.prefilled_tokens),
        ("qwen3c_prefix_reused_tokens_total", "counter", "prompt tokens served from cache",
         c.reused_prefix_tokens),
        ("qwen3c_generated_tokens_total", "counter", "generated tokens", c.generated_tokens),
    ]
    return "".join(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n{name} {value}\n"
                   for name, kind, help_, value in metrics)

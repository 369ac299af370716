"""OpenAI-compatible HTTP API over the same `Engine` the desktop app uses.

One model serves many clients from a single engine thread. Requests arrive in one FIFO queue;
when the model's family can be decoded in a batch (engine/batch.py: the llama family), the
thread decodes every request in flight together, one forward pass per token, new requests
joining between steps and finished ones leaving; otherwise (the desktop app's shared engine,
other families, a draft model) it serves them one at a time in arrival order. Either way each
reply equals the one the request gets alone. A client that goes away mid-stream cancels its
generation at once (within a token). The engine's prompt cache reuses a conversation's prefix
across its requests.

This module knows HTTP shapes; the queue and its engine thread are app/engine_queue.py, which
knows nothing of models or sampling beyond the engine's public API (`Engine.chat`,
`Engine.complete`, `Engine.render`, `Engine.cancel`, `Engine.loaded`, `Engine.prefix_cache`,
`SamplingParams`) and `engine.batch.BatchGenerator`.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.engine_queue import _DONE, BATCH_ENV, EngineQueue, _Job, max_batch_from_env
from engine.errors import ContextLengthError, LatentError
from engine.sampling import SamplingParams

# The queue and its engine thread live in app/engine_queue.py; importable from here as before.
__all__ = ["BATCH_ENV", "EngineQueue", "create_app", "max_batch_from_env", "serve"]

# ----------------------------------------------------------------------------- request bodies


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by chat and text completions, with OpenAI's ranges."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1)
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list):
            if len(v) > 4:
                raise ValueError("at most 4 stop sequences")
            if any(not s for s in v):
                raise ValueError("stop sequences must be non-empty")
        elif v == "":
            raise ValueError("stop sequences must be non-empty")
        return v

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=1_000_000)
    response_format: ResponseFormat | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    def n_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=5)

    def n_logprobs(self) -> int | None:
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list):
            if len(v) != 1:
                raise ValueError("exactly one prompt per request is supported")
        return v

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ----------------------------------------------------------------------------- errors


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )


def _error_body(
    message: str, type_: str, param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ----------------------------------------------------------------------------- the app


def _params(req: _Common, defaults: SamplingParams, max_tokens: int | None) -> SamplingParams:
    p = SamplingParams(**{**defaults.__dict__})
    if req.temperature is not None:
        p.temperature = req.temperature
    if req.top_p is not None:
        p.top_p = req.top_p
    if max_tokens is not None:
        p.max_tokens = max_tokens
    if req.seed is not None:
        p.seed = req.seed
    p.presence_penalty = req.presence_penalty
    p.frequency_penalty = req.frequency_penalty
    p.stop = req.stops()
    p.logprobs = req.n_logprobs()
    return p


def _chat_logprobs(events: list) -> dict:
    """OpenAI's chat `logprobs` object for the tokens behind `events`."""

    def entry(text: str, lp: float) -> dict:
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {
                **entry(ev.token_text, ev.logprob),
                "top_logprobs": [entry(t, v) for t, v in (ev.top_logprobs or [])],
            }
            for ev in events
        ]
    }


def _completion_logprobs(events: list, offset: int) -> dict:
    """The legacy completions `logprobs` object (tokens, token_logprobs, top_logprobs, offsets)."""
    tokens, lps, tops, offsets = [], [], [], []
    for ev in events:
        offsets.append(offset)
        offset += len(ev.token_text)
        tokens.append(ev.token_text)
        lps.append(ev.logprob)
        tops.append({t: v for t, v in (ev.top_logprobs or [])})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def _finish_reason(reason: str | None) -> str:
    # OpenAI knows "stop" and "length"; our "context" (the window filled) reads as "length".
    return "length" if reason in ("length", "context") else "stop"


def _usage(stats) -> dict:
    prompt = int(getattr(stats, "prompt_tokens", 0) or 0)
    completion = int(getattr(stats, "generated_tokens", 0) or 0)
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    cached = getattr(stats, "cached_tokens", None)
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": int(cached)}
    return usage


def create_app(
    engine, model_name: str, api_key: str | None = None, *, max_batch: int | None = None
) -> FastAPI:
    """The FastAPI application serving `engine` under the name `model_name`.

    `max_batch`: most requests decoded together (None: `LATENT_SERVE_BATCH`, default 8; 1 serves
    one at a time). `app.state.runner` is the `EngineQueue`.
    """
    app = FastAPI(title="Latent Studio local API", version="1.0")
    runner = EngineQueue(engine, max_batch)
    app.state.runner = runner
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError):
        return JSONResponse(
            _error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = (
            f"{loc}: {first.get('msg', 'invalid request')}"
            if loc
            else first.get("msg", "invalid request body")
        )
        return JSONResponse(
            _error_body(message, "invalid_request_error", loc or None), status_code=400
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(_error_body(str(exc.detail), type_), status_code=exc.status_code)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            if header != f"Bearer {api_key}":
                return JSONResponse(
                    _error_body(
                        "invalid or missing API key", "authentication_error", code="invalid_api_key"
                    ),
                    status_code=401,
                )
        return await call_next(request)

    def _check_model(requested: str | None) -> None:
        # Completion requests may name any model (tools send their own default name) and the
        # loaded model answers; only the model lookup endpoint checks the name.
        if requested and requested not in (model_name, "default"):
            raise APIError(
                404,
                f"model {requested!r} is not served here; use {model_name!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    async def _run(
        request: Request, kind: str, payload, params: SamplingParams
    ) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        job = _Job(kind, payload, params, loop, asyncio.Queue())
        runner.submit(job)
        try:
            while True:
                try:
                    item = await asyncio.wait_for(job.events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return
                    continue
                if item is _DONE:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            runner.cancel(job)  # no-op when it finished; frees the engine when the client left

    def _map_engine_error(e: Exception) -> APIError:
        if isinstance(e, ContextLengthError):
            return APIError(
                400, str(e), "invalid_request_error", "messages", "context_length_exceeded"
            )
        if isinstance(e, LatentError):
            return APIError(400, str(e), "invalid_request_error")
        return APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error")

    def _sse(obj: dict | str) -> bytes:
        data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)
        return f"data: {data}\n\n".encode()

    async def _respond(request: Request, req: _Common, kind: str, payload, params: SamplingParams):
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if kind == "chat" else "text_completion"
        now = int(time.time())
        events = _run(request, kind, payload, params)

        def choice(text: str, finish: str | None, delta: bool, scored=(), offset: int = 0) -> dict:
            # `scored`: the events (tokens) whose log-probabilities this choice reports.
            if kind == "chat":
                key = "delta" if delta else "message"
                body = (
                    {"role": "assistant", "content": text}
                    if not delta
                    else ({"content": text} if text else {})
                )
                lp = _chat_logprobs(scored) if params.logprobs is not None else None
                return {"index": 0, key: body, "finish_reason": finish, "logprobs": lp}
            lp = _completion_logprobs(scored, offset) if params.logprobs is not None else None
            return {"index": 0, "text": text, "finish_reason": finish, "logprobs": lp}

        def scored_of(ev) -> list:
            return [ev] if getattr(ev, "logprob", None) is not None else []

        # Pull the first event before answering, so that a prompt that cannot be served is an
        # HTTP error rather than a broken stream.
        try:
            first = await events.__anext__()
        except StopAsyncIteration:
            first = None
        except Exception as e:
            raise _map_engine_error(e) from None

        if not req.stream:
            parts, stats, scored = [], None, []
            ev = first
            try:
                while ev is not None:
                    parts.append(ev.text or "")
                    scored += scored_of(ev)
                    if ev.done:
                        stats = ev.stats
                    ev = await events.__anext__()
            except StopAsyncIteration:
                pass
            except Exception as e:
                raise _map_engine_error(e) from None
            text = "".join(parts)
            offset = 0
            if kind == "complete" and getattr(req, "echo", False):
                text = payload + text
                offset = len(payload)
            finish = _finish_reason(getattr(stats, "finish_reason", None))
            return JSONResponse(
                {
                    "id": rid,
                    "object": obj,
                    "created": now,
                    "model": model_name,
                    "choices": [choice(text, finish, delta=False, scored=scored, offset=offset)],
                    "usage": _usage(stats),
                    "system_fingerprint": "latent-studio",
                }
            )

        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        chunk_obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

        async def body() -> AsyncIterator[bytes]:
            base = {"id": rid, "object": chunk_obj, "created": now, "model": model_name}
            if kind == "chat":
                yield _sse(
                    {
                        **base,
                        "choices": [
                            {
                                "index": 0,
                                "delta": {"role": "assistant", "content": ""},
                                "finish_reason": None,
                                "logprobs": None,
                            }
                        ],
                    }
                )
            ev, stats, pending, offset = first, None, [], 0
            try:
                while ev is not None:
                    pending += scored_of(ev)
                    if ev.text:
                        # Tokens whose text was held back (partial UTF-8, a possible stop string)
                        # are reported with the chunk that finally carries their text.
                        c = choice(ev.text, None, delta=True, scored=pending, offset=offset)
                        yield _sse({**base, "choices": [c]})
                        offset += sum(len(e.token_text) for e in pending)
                        pending = []
                    if ev.done:
                        stats = ev.stats
                    try:
                        ev = await events.__anext__()
                    except StopAsyncIteration:
                        ev = None
            except Exception as e:
                err = _map_engine_error(e)
                yield _sse(_error_body(err.message, err.type, err.param, err.code))
                return
            finally:
                await events.aclose()
            finish = _finish_reason(getattr(stats, "finish_reason", None))
            yield _sse({**base, "choices": [choice("", finish, delta=True)]})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(stats)})
            yield _sse("[DONE]")

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @app.get("/v1/models")
    async def list_models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name,
                    "object": "model",
                    "created": created,
                    "owned_by": "latent-studio",
                }
            ],
        }

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        _check_model(model_id)  # strict here: a lookup of another name is a 404
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "latent-studio",
        }

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        if req.response_format is not None and req.response_format.type != "text":
            raise APIError(
                400,
                f"response_format {req.response_format.type!r} is not supported; use 'text'",
                "invalid_request_error",
                "response_format",
            )
        messages = [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in req.messages
        ]
        max_tokens = req.max_completion_tokens or req.max_tokens
        params = _params(req, engine.generation_defaults(), max_tokens)
        return await _respond(request, req, "chat", messages, params)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        params = _params(req, engine.generation_defaults(), req.max_tokens or 16)
        return await _respond(request, req, "complete", req.text(), params)

    return app


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")


def serve(
    engine,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    api_key: str | None = None,
    log=print,
) -> None:
    """Run the API until interrupted (blocking)."""
    import uvicorn

    if not is_loopback(host):
        log(
            f"warning: binding to {host} exposes the model to your network"
            + ("" if api_key else "; consider --api-key")
        )
    app = create_app(engine, model_name, api_key)
    log(f"serving {model_name} at http://{host}:{port}/v1")
    log(app.state.runner.describe())
    uvicorn.run(app, host=host, port=port, log_level="warning")


def iter_sse(lines: Iterator[str]) -> Iterator[dict]:
    """Parse `data:` lines of an SSE stream (used by tests and the bench)."""
    for line in lines:
        if line.startswith("data: "):
            data = line[6:].strip()
            if data == "[DONE]":
                return
            yield json.loads(data)

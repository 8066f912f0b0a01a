"""OpenAI-compatible HTTP server over generate.Engine (continuous batching).

    rwkvforge serve                                     # demo model on 127.0.0.1:8000
    rwkvforge serve --model models/merged/my.pth --serve-port 8080
    SERVE_API_KEY=secret ./scripts/serve.sh --serve-host 0.0.0.0
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model":"rwkv","messages":[{"role":"user","content":"Hi"}],"max_tokens":20}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`"stream": true` = server-sent events ending with `data: [DONE]`). Sampling fields:
temperature, top_p, top_k, max_tokens (capped by SERVE_MAX_TOKENS), stop, presence_penalty,
frequency_penalty, penalty_decay, seed; a chat request that leaves one out gets the chat
default that `rwkvforge infer` and the dashboard use (generate.CHAT_DEFAULTS, RWKV's chat
demo values), a completion the OpenAI default. Chat messages are encoded in the RWKV World
format ("User: ...\\n\\nAssistant:", generate.encode_chat_prompt) and a reply ends at its
blank line.

One engine thread decodes every running request together: new requests join at the next
step, finished ones leave, long prompts are prefilled in chunks between decode steps, and
a repeated system prompt / earlier turns come from the prefix-state cache. A client that
disconnects cancels its request. Binds SERVE_HOST (127.0.0.1 by default); SERVE_API_KEY
turns on `Authorization: Bearer` checks (401); more than SERVE_MAX_QUEUE waiting requests
get 429; bad fields get 400 / 422 naming the field. The `model` field of a request is not
checked (any name is served by the one loaded model, as in RWKV-Runner).

Layout: a request becomes prompt ids and SamplingParams in plain functions
(`completion_prompt`, `chat_prompt`, `chat_messages`, `sampling_params`); engine events become
response bodies in `Reply`, `collect` and `stream_events`; `create_app` only wires routes, so
every rule above is testable without a server.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkvforge import config as cfgmod
from rwkvforge.adapter import load_with_adapter
from rwkvforge.checkpoint import DTYPES
from rwkvforge.demo import resolve_base_model
from rwkvforge.generate import (
    CHAT_DEFAULTS,
    Engine,
    Event,
    Handle,
    LeadingSpaceStrip,
    QueueFull,
    SamplingParams,
    chat_params,
    encode_chat_prompt,
    resolve_device_dtype,
    set_fast_path,
)
from rwkvforge.runtime import keep_freed_memory
from rwkvforge.tokenizer import ChatFormatError, get_tokenizer

MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413)


# --------------------------------------------------------------------------------------
# request schemas (OpenAI fields + RWKV extras top_k / penalty_decay)
# --------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown OpenAI fields are ignored

    model: str = Field("", max_length=256)
    max_tokens: int | None = Field(None, ge=1, description="capped by SERVE_MAX_TOKENS")
    # the defaults below are a completion's; a chat request that does not send a field gets
    # generate.CHAT_DEFAULTS' value (see sampling_params)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False,
                               description=f"chat: {CHAT_DEFAULTS.temperature} when not sent")
    top_p: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False,
                         description=f"chat: {CHAT_DEFAULTS.top_p} when not sent")
    top_k: int = Field(0, ge=0, le=1 << 20, description="RWKV extra: 0 = off")
    presence_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description=f"chat: {CHAT_DEFAULTS.alpha_presence} when not sent")
    frequency_penalty: float = Field(
        0.0, ge=-2.0, le=2.0, allow_inf_nan=False,
        description=f"chat: {CHAT_DEFAULTS.alpha_frequency} when not sent")
    penalty_decay: float = Field(0.996, ge=0.0, le=1.0, allow_inf_nan=False,
                                 description="RWKV extra: occurrence decay per token")
    stop: Union[str, list[str], None] = Field(None, description="up to 4 strings")
    seed: int | None = Field(None, ge=0, le=(1 << 63) - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=1, description="only 1 is supported")
    user: str | None = Field(None, max_length=256)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI clients send unset optional fields as null: null takes the default."""
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items()
                    if v is not None or k not in fields or fields[k].default is None}
        return data


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]] = Field(
        ..., description="text or token ids (one prompt)")
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ChatContentPart]]


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None,
                 type_: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = \
            status, message, param, type_, code


def _error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# --------------------------------------------------------------------------------------
# the app
# --------------------------------------------------------------------------------------

_API_DOCS = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")


class _GuardMiddleware:
    """Pure ASGI (streams and disconnects pass straight through): refuses bodies over
    MAX_BODY_BYTES (413; a chunked body, which has no Content-Length, is read here up to the
    limit) and, with an API key, /v1/* and the OpenAPI pages without it (401)."""

    def __init__(self, app: Any, api_key: str = ""):
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        try:
            size = int(headers.get("content-length") or 0)
        except ValueError:
            size = 0
        if size > MAX_BODY_BYTES:
            resp = JSONResponse(_error_body(f"request body of {size} bytes is over the "
                                            f"{MAX_BODY_BYTES} byte limit",
                                            "invalid_request_error", None, None), 413)
            return await resp(scope, receive, send)
        path = scope.get("path", "")
        if self.api_key and (path.startswith("/v1/") or path in _API_DOCS):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "replace"), self.api_key):
                resp = JSONResponse(
                    _error_body("missing or wrong API key: send 'Authorization: Bearer "
                                "<SERVE_API_KEY>'", "authentication_error", None,
                                "invalid_api_key"), 401, headers={"WWW-Authenticate": "Bearer"})
                return await resp(scope, receive, send)
        if "content-length" not in headers and "transfer-encoding" in headers:
            # a chunked body has no size up front: read it here, up to the limit
            body = bytearray()
            while True:
                msg = await receive()
                if msg["type"] != "http.request":
                    return  # the client went away
                body += msg.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    resp = JSONResponse(_error_body(
                        f"request body is over the {MAX_BODY_BYTES} byte limit",
                        "invalid_request_error", None, None), 413)
                    return await resp(scope, receive, send)
                if not msg.get("more_body", False):
                    break
            receive = _replay(bytes(body), receive)
        return await self.app(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    """An ASGI receive that gives `body` once, then whatever the connection sends next
    (a disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed() -> dict:
        return pending.pop() if pending else await receive()

    return replayed


@dataclass
class ServeOptions:
    model_id: str = "rwkv7"
    api_key: str = ""
    max_tokens: int = 2048  # cap on a request's max_tokens
    max_prompt_tokens: int = 8192
    default_max_tokens: int = 256


# --------------------------------------------------------------------------------------
# request -> prompt ids and sampling parameters (plain functions: tests call them directly)
# --------------------------------------------------------------------------------------

# request field -> SamplingParams field
_SAMPLING_FIELDS = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                    "presence_penalty": "alpha_presence",
                    "frequency_penalty": "alpha_frequency", "penalty_decay": "alpha_decay"}


def sampling_params(req: _Sampling, opts: ServeOptions, *, chat: bool) -> SamplingParams:
    """The engine's SamplingParams for a request. A chat request's sampling fields that the
    client did not send take generate.CHAT_DEFAULTS and its reply also ends at CHAT_STOP
    (generate.chat_params); a completion takes the schema's defaults. max_tokens (a chat
    request's max_completion_tokens when sent) defaults to opts.default_max_tokens and may
    not pass opts.max_tokens; at most 4 stop strings of 1 to 256 characters. Raises
    APIError(400) naming the field."""
    field = "max_tokens"
    if chat and getattr(req, "max_completion_tokens", None) is not None:
        field = "max_completion_tokens"
    mt = getattr(req, field)
    if mt is None:
        mt = min(opts.default_max_tokens, opts.max_tokens)
    if mt > opts.max_tokens:
        raise APIError(400, f"{field}={mt} is over this server's limit "
                       f"{opts.max_tokens} (SERVE_MAX_TOKENS)", field)
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise APIError(400, f"stop has {len(stops)} strings; at most 4 are allowed", "stop")
    for s in stops:
        if not s or len(s) > 256:
            raise APIError(400, "each stop string must be 1 to 256 characters", "stop")
    fields = {ours: getattr(req, theirs) for theirs, ours in _SAMPLING_FIELDS.items()
              if not chat or theirs in req.model_fields_set}  # chat: unsent = CHAT_DEFAULTS
    if chat:
        return chat_params(stops, **fields, max_tokens=mt, seed=req.seed)
    return SamplingParams(**fields, max_tokens=mt, seed=req.seed, stop=tuple(stops))


def chat_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI chat messages -> the World format's {role, content} turns: "developer" is
    "system", content parts are joined by newlines, consecutive turns of one speaker are
    merged. Raises APIError(400) naming the client's own message index (before merging)
    when the order cannot be written as [system] user, assistant, ..., user."""
    msgs: list[dict[str, str]] = []
    seen_user = False
    for i, m in enumerate(messages):
        text = m.content if isinstance(m.content, str) else \
            "\n".join(part.text for part in m.content)
        role = "system" if m.role == "developer" else m.role
        if role == "system" and msgs and msgs[-1]["role"] != "system":
            raise APIError(400, f"messages[{i}]: a system message after the conversation "
                           "started; put system messages first", "messages")
        if role == "assistant" and not seen_user:
            raise APIError(400, f"messages[{i}]: an assistant message before any user "
                           "message", "messages")
        seen_user |= role == "user"
        if msgs and msgs[-1]["role"] == role:
            msgs[-1]["content"] += "\n" + text  # consecutive turns of one speaker
        else:
            msgs.append({"role": role, "content": text})
    if not seen_user:
        raise APIError(400, "messages: no user message (only system messages)", "messages")
    if msgs[-1]["role"] == "assistant":
        raise APIError(400, f"messages[{len(messages) - 1}]: the conversation ends "
                       "with an assistant message; end it with the user's turn (this "
                       "server writes the next assistant reply, it does not continue one)",
                       "messages")
    return msgs


def chat_prompt(body: ChatRequest, tokenizer: Any) -> tuple[list[int], list[int]]:
    """(prompt ids, turn ends = prefix-cache points) of a chat request, in the one chat
    encoding (generate.encode_chat_prompt); APIError(400) for what this server refuses."""
    if body.logprobs:
        raise APIError(400, "logprobs is not supported by this server", "logprobs")
    if body.tools:
        raise APIError(400, "tools are not supported by this server", "tools")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise APIError(400, "only response_format type 'text' is supported",
                       "response_format")
    try:
        return encode_chat_prompt(chat_messages(body.messages), tokenizer)
    except (ChatFormatError, ValueError) as e:
        raise APIError(400, str(e), "messages") from None


def completion_prompt(body: CompletionRequest, tokenizer: Any) -> list[int]:
    """Prompt ids of a completion request (text, or token ids; one prompt per request);
    APIError(400) for the fields this server does not support."""
    for name, bad in (("echo", body.echo), ("logprobs", body.logprobs is not None),
                      ("suffix", bool(body.suffix)), ("best_of", (body.best_of or 1) > 1)):
        if bad:
            raise APIError(400, f"{name} is not supported by this server", name)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise APIError(400, f"prompt holds {len(p)} prompts; send one per request",
                           "prompt")
        p = p[0]
    try:
        return tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
    except ValueError as e:  # e.g. a lone surrogate from a "\ud800" escape
        raise APIError(400, str(e), "prompt") from None


def check_prompt_len(ids: list[int], param: str, opts: ServeOptions) -> None:
    if len(ids) > opts.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at "
                       f"most {opts.max_prompt_tokens} (--max-prompt-tokens)", param)


# --------------------------------------------------------------------------------------
# engine events -> response bodies (one non-streaming, one server-sent-events builder)
# --------------------------------------------------------------------------------------

class Reply:
    """The response objects of one request: its id and creation time, and the chunk /
    final shapes of its endpoint (text completion or chat)."""

    def __init__(self, model_id: str, chat: bool):
        self.model_id, self.chat = model_id, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id}

    def chunk(self, text: str, reason: str | None, usage_only: bool = False,
              role: bool = False) -> dict:
        """A streamed piece (`role`: a chat stream's opening {"role": "assistant"})."""
        if not self.chat:
            return {**self._head("text_completion"), "choices": [] if usage_only else
                    [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
            ({"content": text} if text else {})
        return {**self._head("chat.completion.chunk"), "choices": [] if usage_only else
                [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

    def final(self, text: str, reason: str, usage: dict) -> dict:
        """The whole answer of a non-streaming request."""
        if not self.chat:
            return {**self.chunk(text, reason), "usage": usage}
        return {**self._head("chat.completion"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "logprobs": None, "finish_reason": reason}],
                "usage": usage}


def usage(h: Handle) -> dict:
    return {"prompt_tokens": h.prompt_tokens, "completion_tokens": h.completion_tokens,
            "total_tokens": h.prompt_tokens + h.completion_tokens}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def submit(engine: Engine, ids: list[int], params: SamplingParams,
           cache_at: list[int]) -> tuple[Handle, asyncio.Queue]:
    """Queue a request on the engine; its events arrive on the returned asyncio queue (of
    the running loop). QueueFull -> 429, a parameter the engine refuses -> 400."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def on_event(ev: Event) -> None:  # called on the engine thread
        loop.call_soon_threadsafe(q.put_nowait, ev)

    try:
        return engine.submit(ids, params, cache_at=cache_at, on_event=on_event), q
    except QueueFull as e:
        raise APIError(429, f"server busy: {e}; retry later", None,
                       "rate_limit_error", "queue_full") from None
    except ValueError as e:
        msg = str(e)
        param = msg.split()[2].split("=")[0] if msg.startswith("sampling parameter") \
            else "prompt"
        raise APIError(400, msg, param) from None


async def collect(request: Request, h: Handle, q: asyncio.Queue,
                  strip: LeadingSpaceStrip | None) -> tuple[str, str]:
    """Wait for the whole answer -> (text, finish reason); cancel it if the client goes
    away (499)."""
    parts: list[str] = []
    last_check = time.monotonic()
    try:
        while True:
            try:
                ev = await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                ev = None
            if time.monotonic() - last_check > 0.5:  # tokens may flow faster than that
                last_check = time.monotonic()
                if await request.is_disconnected():
                    h.cancel()
                    raise APIError(499, "client disconnected")
            if ev is None:
                continue
            parts.append(strip(ev.text) if strip else ev.text)
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", None,
                                   "server_error")
                return "".join(parts), ev.finish_reason
    finally:
        if not h.done.is_set():
            h.cancel()


async def stream_events(h: Handle, q: asyncio.Queue, reply: Reply, include_usage: bool,
                        strip: LeadingSpaceStrip | None) -> AsyncIterator[str]:
    """Server-sent events of one request: (a chat's role chunk,) text chunks, the finish
    reason, (usage,) `data: [DONE]`. Stops the request when the client goes away."""
    try:
        if reply.chat:
            yield sse(reply.chunk("", None, role=True))
        while True:
            ev: Event = await q.get()
            text = strip(ev.text) if strip else ev.text
            reason = ev.finish_reason
            if reason == "error":
                yield sse(_error_body(f"generation failed: {ev.error}", "server_error",
                                      None, None))
                break
            if text or reason is not None:
                yield sse(reply.chunk(text, reason if reason != "cancelled" else "stop"))
            if reason is not None:
                if include_usage:
                    yield sse({**reply.chunk("", None, usage_only=True), "usage": usage(h)})
                break
        yield "data: [DONE]\n\n"
    finally:  # client went away (or we finished): stop generating
        if not h.done.is_set():
            h.cancel()


async def respond(request: Request, engine: Engine, body: _Sampling, ids: list[int],
                  params: SamplingParams, cache_at: list[int], reply: Reply) -> Any:
    """Run one request on the engine and answer it, streamed or whole."""
    h, q = submit(engine, ids, params, cache_at)
    strip = LeadingSpaceStrip() if reply.chat else None
    if body.stream:
        inc = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(h, q, reply, inc, strip),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    text, reason = await collect(request, h, q, strip)
    return reply.final(text, reason, usage(h))


# --------------------------------------------------------------------------------------
# errors in the OpenAI shape
# --------------------------------------------------------------------------------------

async def _api_error(request: Request, e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(_error_body(e.message, e.type, e.param, e.code), e.status,
                        headers=headers)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(_error_body(
            f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')} "
            f"at character {first.get('loc', ('', '?'))[-1]})", "invalid_request_error",
            None, "invalid_json"), 400)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    ctype = request.headers.get("content-type", "")
    if not loc and "json" not in ctype:
        return JSONResponse(_error_body(
            f"the request body must be a JSON object sent with 'Content-Type: "
            f"application/json' (got {ctype or 'no Content-Type'})",
            "invalid_request_error", None, "invalid_content_type"), 400)
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}"
                    f": {er.get('msg', 'invalid')}" for er in errs[:5])
    return JSONResponse(_error_body(msg, "invalid_request_error", param, "invalid_value"),
                        422)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # 404 / 405 and friends in the OpenAI error shape, not FastAPI's {"detail": ...}
    msg = {404: f"no such endpoint: {request.method} {request.url.path}",
           405: f"{request.method} is not allowed on {request.url.path}"}.get(
               e.status_code, str(e.detail))
    return JSONResponse(_error_body(msg, "invalid_request_error", None,
                                    "not_found" if e.status_code == 404 else None),
                        e.status_code, headers=getattr(e, "headers", None))


# --------------------------------------------------------------------------------------
# the app: route wiring only
# --------------------------------------------------------------------------------------

def create_app(engine: Engine, tokenizer: Any, opts: ServeOptions,
               own_engine: bool = True) -> FastAPI:
    """The FastAPI app. The engine thread starts / stops with the app's lifespan when
    `own_engine` (tests may drive an engine they started themselves)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if own_engine:
            engine.start()
        try:
            yield
        finally:
            if own_engine:
                engine.stop()

    app = FastAPI(title="rwkvforge OpenAI-compatible server", lifespan=lifespan,
                  version="1")
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(_GuardMiddleware, api_key=opts.api_key)
    created = int(time.time())

    @app.get("/health")
    async def health() -> dict:
        ok = engine.error is None
        return {"status": "ok" if ok else "degraded", "model": opts.model_id,
                "running": engine.n_active, "waiting": engine.n_waiting,
                "last_error": None if ok else repr(engine.error)}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": opts.model_id, "object": "model",
                                            "created": created, "owned_by": "rwkvforge"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        ids = completion_prompt(body, tokenizer)
        check_prompt_len(ids, "prompt", opts)
        params = sampling_params(body, opts, chat=False)
        return await respond(request, engine, body, ids, params, [],
                             Reply(opts.model_id, chat=False))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        ids, ends = chat_prompt(body, tokenizer)
        check_prompt_len(ids, "messages", opts)
        params = sampling_params(body, opts, chat=True)
        return await respond(request, engine, body, ids, params, ends,
                             Reply(opts.model_id, chat=True))

    return app


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def port_unavailable(host: str, port: int) -> str | None:
    """Why `host:port` cannot be listened on right now (None: it can), found by binding it
    briefly the way uvicorn will (SO_REUSEADDR)."""
    import socket

    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                          type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
    except OSError as e:
        return e.strerror or str(e)
    return None


def build_parser() -> argparse.ArgumentParser:
    from rwkvforge import config as cfgmod

    ap = argparse.ArgumentParser(prog="rwkvforge serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    cfgmod.add_settings_flags(ap, only=["base_model", "device", "infer_fast", "serve_host",
                                        "serve_port",
                                        "serve_api_key", "serve_max_batch", "serve_max_queue",
                                        "serve_max_tokens"])
    ap.add_argument("--adapter", default="", help="LoRA adapter folder merged in memory")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="weights: auto = fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--model-id", default="", help="name shown by /v1/models "
                    "(default: the model file's name)")
    ap.add_argument("--max-prompt-tokens", type=int, default=8192)
    ap.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens fed per engine step: smaller = running streams "
                    "stall less, long prompts take longer")
    ap.add_argument("--log-level", default="info",
                    choices=("critical", "error", "warning", "info", "debug"))
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    for flag in ("max_prompt_tokens", "prefill_chunk"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    keep_freed_memory()  # inference: reuse freed activation memory (see runtime.py)
    try:
        res = cfgmod.resolve_from_args(args)
        s = res.settings
    except cfgmod.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        device, dtype = resolve_device_dtype(s.device, args.dtype)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    why = port_unavailable(s.serve_host, s.serve_port)  # before minutes of model loading
    if why:
        print(f"error: cannot listen on {s.serve_host}:{s.serve_port} ({why}): is another "
              "server running there? Pick another --serve-port.", file=sys.stderr)
        return 2
    try:
        path, is_demo = resolve_base_model(s.base_model, res.sources["BASE_MODEL"],
                                           say=lambda m: print(f"[rwkvforge] {m}",
                                                               file=sys.stderr))
        tok = get_tokenizer()
        model = load_with_adapter(path, args.adapter or None, DTYPES[dtype], device)
        set_fast_path(model, s.infer_fast, device)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if is_demo:
        print(f"[rwkvforge] serving the demo model {path} (random weights)", file=sys.stderr)
    if s.serve_host not in ("127.0.0.1", "localhost", "::1") and not s.serve_api_key:
        print(f"[rwkvforge] warning: listening on {s.serve_host} without SERVE_API_KEY: "
              "anyone on your network can use this model", file=sys.stderr)
    engine = Engine(model, tok, max_batch=s.serve_max_batch,
                    max_queue=s.serve_max_queue, prefill_chunk=args.prefill_chunk,
                    device=device)
    opts = ServeOptions(model_id=args.model_id or Path(path).stem, api_key=s.serve_api_key,
                        max_tokens=s.serve_max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        default_max_tokens=min(256, s.serve_max_tokens))
    app = create_app(engine, tok, opts)
    import uvicorn

    print(f"[rwkvforge] OpenAI-compatible API at http://{s.serve_host}:{s.serve_port}/v1 "
          f"(model id {opts.model_id!r}"
          + (f", adapter {args.adapter} merged in memory" if args.adapter else "") + ")",
          file=sys.stderr)
    uvicorn.run(app, host=s.serve_host, port=s.serve_port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

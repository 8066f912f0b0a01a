"""OpenAI-compatible HTTP server over generate.Engine (continuous batching).

    rwkvforge serve                                     # demo model on 127.0.0.1:8000
    rwkvforge serve --model models/merged/my.pth --serve-port 8080
    SERVE_API_KEY=secret ./scripts/serve.sh --serve-host 0.0.0.0
    curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model":"rwkv","messages":[{"role":"user","content":"Hi"}],"max_tokens":20}'

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/completions, POST
/v1/chat/completions (`"stream": true` = server-sent events ending with `data: [DONE]`).
Every parameter, honoured or refused, is in docs/api.md: sampling (temperature, top_p,
top_k, min_p, presence / frequency / repetition penalties with RWKV's decaying counts,
penalty_decay, logit_bias, seed, stop, max_tokens capped by SERVE_MAX_TOKENS), `n` (one
prefill shared by the choices), logprobs / top_logprobs, response_format json_object /
json_schema (constrained decoding, grammar.py), tools / tool_choice / role "tool" (the
format in docs/api.md#tools). A field this server does not honour is a 400 naming it. A chat
request that leaves a sampling field out gets the chat default that `rwkvforge infer` and
the dashboard use (generate.CHAT_DEFAULTS), a completion the OpenAI default. Chat messages
are encoded in the RWKV World format ("User: ...\\n\\nAssistant:",
generate.encode_chat_prompt) and a reply ends at its blank line. `--lora-modules name=PATH`
serves several adapters over one base model, chosen by `model` (adapter.MultiLora); `--state
PATH` starts every conversation from a tuned initial state (state_tuning.py), and
`--state-modules name=PATH` serves several, chosen by `model` like the adapters.

One engine thread decodes every running request together: new requests join at the next
step, finished ones leave, long prompts are prefilled in chunks between decode steps, and
a repeated system prompt / earlier turns come from the prefix-state cache. A client that
disconnects cancels its request. Binds SERVE_HOST (127.0.0.1 by default); SERVE_API_KEY
turns on `Authorization: Bearer` checks (401); more than SERVE_MAX_QUEUE waiting requests
get 429; bad fields get 400 / 422 naming the field. Without --lora-modules the `model` field
is not checked (any name is served by the one loaded model, as in RWKV-Runner).

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
import re
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from rwkvforge import config as cfgmod
from rwkvforge.adapter import MultiLora, load_with_adapter
from rwkvforge.state_tuning import load_state_into
from rwkvforge.checkpoint import DTYPES
from rwkvforge.demo import resolve_base_model
from rwkvforge.generate import (
    Engine, Event, Handle, LeadingSpaceStrip, QueueFull, resolve_device_dtype, set_fast_path)
from rwkvforge.grammar import new_constraint
from rwkvforge.runtime import keep_freed_memory
from rwkvforge.sampling import SamplingParams
from rwkvforge.tokenizer import get_tokenizer

from rwkvforge.api import (APIError, ChatPlan, ChatRequest, CompletionRequest, SamplingRequest,
                           ServeOptions, chat_plan, chat_prompt, check_prompt_len, choice_params,
                           completion_prompt, error_body, parse_tool_calls, pick_model,
                           sampling_params)

RETRY_AFTER_S = 1  # a 429 says when to try again (the queue drains in about a decode step)
LORA_NAME_RE = r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}"  # a served adapter's name
HEADER_TIMEOUT_S = 10  # a connection must send a whole request head within this
DRAIN_S = 30  # SIGTERM: open streams get this long to finish, then the server closes
MAX_BODY_BYTES = 8 << 20  # a request body larger than this is refused (413)


# ---- the app -------------------------------------------------------------------------------------

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
            resp = JSONResponse(error_body(f"request body of {size} bytes is over the "
                                            f"{MAX_BODY_BYTES} byte limit",
                                            "invalid_request_error", None, None), 413)
            return await resp(scope, receive, send)
        path = scope.get("path", "")
        if self.api_key and (path.startswith("/v1/") or path in _API_DOCS):
            scheme, _, token = headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                    token.strip().encode("utf-8", "replace"), self.api_key):
                resp = JSONResponse(
                    error_body("missing or wrong API key: send 'Authorization: Bearer "
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
                    resp = JSONResponse(error_body(
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


# ---- engine events -> response bodies (one non-streaming, one server-sent-events builder) --------

def _tok_text(tok: Any, t: int) -> tuple[str, list[int]]:
    b = tok.decode_bytes([t])
    return b.decode("utf-8", errors="replace"), list(b)


def chat_logprobs(tok: Any, entries: Sequence[tuple[int, float, list]]) -> dict:
    """Engine logprob entries -> a chat choice's `logprobs` object."""
    def one(t: int, lp: float) -> dict:
        text, b = _tok_text(tok, t)
        return {"token": text, "logprob": lp, "bytes": b}

    return {"content": [{**one(t, lp), "top_logprobs": [one(a, b) for a, b in top]}
                        for t, lp, top in entries], "refusal": None}


def completion_logprobs(tok: Any, entries: Sequence[tuple[int, float, list]],
                        offset: int = 0) -> dict:
    """Engine logprob entries -> a completion choice's `logprobs` object (text_offset
    counts characters from `offset`)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    for t, lp, top in entries:
        text, _ = _tok_text(tok, t)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append({_tok_text(tok, a)[0]: b for a, b in top})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


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
              role: bool = False, index: int = 0, logprobs: dict | None = None,
              tool_calls: list[dict] | None = None) -> dict:
        """A streamed piece (`role`: a chat stream's opening {"role": "assistant"})."""
        if not self.chat:
            return {**self._head("text_completion"), "choices": [] if usage_only else
                    [{"index": index, "text": text, "logprobs": logprobs,
                      "finish_reason": reason}]}
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else \
            ({"content": text} if text else {})
        if tool_calls:
            delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(tool_calls)]
        return {**self._head("chat.completion.chunk"), "choices": [] if usage_only else
                [{"index": index, "delta": delta, "logprobs": logprobs,
                  "finish_reason": reason}]}

    def choice(self, index: int, text: str | None, reason: str, logprobs: dict | None = None,
               tool_calls: list[dict] | None = None) -> dict:
        """One choice of a whole (non-streaming) answer."""
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs,
                    "finish_reason": reason}
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if tool_calls:
            msg["tool_calls"] = tool_calls
        return {"index": index, "message": msg, "logprobs": logprobs, "finish_reason": reason}

    def final(self, text: str, reason: str, usage: dict) -> dict:
        """The whole answer of a one-choice request without logprobs."""
        return self.whole([self.choice(0, text, reason)], usage)

    def whole(self, choices: list[dict], usage: dict) -> dict:
        return {**self._head("chat.completion" if self.chat else "text_completion"),
                "choices": choices, "usage": usage}


def usage(hs: Handle | Sequence[Handle]) -> dict:
    hs = [hs] if isinstance(hs, Handle) else list(hs)
    prompt, done = hs[0].prompt_tokens, sum(h.completion_tokens for h in hs)
    return {"prompt_tokens": prompt, "completion_tokens": done,
            "total_tokens": prompt + done}


def sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass
class Job:
    """A request on the engine: its prompt, the n choices' parameters and constraints."""

    ids: list[int]
    params: list[SamplingParams]
    cache_at: list[int]
    grammar: str | None = None
    adapter: int = 0


def submit(engine: Engine, job: Job, tokenizer: Any = None
           ) -> tuple[list[Handle], asyncio.Queue]:
    """Queue a request's choices on the engine; their (choice index, event) pairs arrive on
    the returned asyncio queue (of the running loop). QueueFull -> 429, a parameter the
    engine refuses -> 400."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def on_event(i: int) -> Any:
        def cb(ev: Event) -> None:  # called on the engine thread
            loop.call_soon_threadsafe(q.put_nowait, (i, ev))
        return cb

    constraints = None
    if job.grammar is not None:
        constraints = [new_constraint(job.grammar, tokenizer, engine.vocab_size)
                       for _ in job.params]
    try:
        hs = engine.submit_group(job.ids, job.params, cache_at=job.cache_at,
                                 on_events=[on_event(i) for i in range(len(job.params))],
                                 constraints=constraints, adapter=job.adapter)
        return hs, q
    except QueueFull as e:
        raise APIError(429, f"server busy: {e}; retry later", None,
                       "rate_limit_error", "queue_full") from None
    except ValueError as e:
        msg = str(e)
        param = msg.split()[2].split("=")[0] if msg.startswith("sampling parameter") \
            else "prompt"
        raise APIError(400, msg, param) from None


@dataclass
class Choice:
    """What one choice has produced so far."""

    text: str = ""
    reason: str | None = None
    logprobs: list = field(default_factory=list)


async def collect(request: Request, hs: Sequence[Handle], q: asyncio.Queue,
                  strip: bool) -> list[Choice]:
    """Wait for every choice's whole answer; cancel them if the client goes away (499)."""
    out = [Choice() for _ in hs]
    strips = [LeadingSpaceStrip() if strip else None for _ in hs]
    left = len(hs)
    last_check = time.monotonic()
    try:
        while left:
            try:
                i, ev = await asyncio.wait_for(q.get(), timeout=0.5)
            except asyncio.TimeoutError:
                i, ev = None, None
            if time.monotonic() - last_check > 0.5:  # tokens may flow faster than that
                last_check = time.monotonic()
                if await request.is_disconnected():
                    raise APIError(499, "client disconnected")
            if ev is None:
                continue
            c = out[i]
            c.text += strips[i](ev.text) if strips[i] else ev.text
            c.logprobs += ev.logprobs or []
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    raise APIError(500, f"generation failed: {ev.error}", None,
                                   "server_error")
                c.reason = ev.finish_reason
                left -= 1
        return out
    finally:
        for h in hs:
            if not h.done.is_set():
                h.cancel()


def _reason(c: Choice, calls: list) -> str:
    if calls:
        return "tool_calls"
    return "stop" if c.reason == "cancelled" else c.reason or "stop"


async def stream_events(hs: Sequence[Handle], q: asyncio.Queue, reply: Reply,
                        include_usage: bool, tok: Any, plan: ChatPlan | None,
                        want_logprobs: bool) -> AsyncIterator[str]:
    """Server-sent events of one request: (a chat's role chunk per choice,) text chunks
    (`index` = the choice), each choice's finish reason, (usage,) `data: [DONE]`. With
    tools the reply is held back and sent at its end (content and / or tool_calls in one
    chunk). Stops the request when the client goes away."""
    strips = [LeadingSpaceStrip() if reply.chat else None for _ in hs]
    held = [Choice() for _ in hs]
    tools = plan.tools if plan else ()
    try:
        if reply.chat:
            for i in range(len(hs)):
                yield sse(reply.chunk("", None, role=True, index=i))
        left = len(hs)
        while left:
            i, ev = await q.get()
            text = strips[i](ev.text) if strips[i] else ev.text
            reason = ev.finish_reason
            if reason == "error":
                yield sse(error_body(f"generation failed: {ev.error}", "server_error",
                                      None, None))
                yield "data: [DONE]\n\n"
                return
            lp = None
            if want_logprobs and ev.logprobs:
                lp = chat_logprobs(tok, ev.logprobs) if reply.chat else \
                    completion_logprobs(tok, ev.logprobs, len(held[i].text))
            if tools:
                held[i].text += text
                held[i].logprobs += ev.logprobs or []
                if reason is not None:
                    content, calls = parse_tool_calls(held[i].text, tools)
                    lp = chat_logprobs(tok, held[i].logprobs) if want_logprobs else None
                    yield sse(reply.chunk(content or "", _reason(Choice(reason=reason),
                                                                 calls),
                                          index=i, logprobs=lp, tool_calls=calls))
            elif text or reason is not None or lp:
                held[i].text += text
                yield sse(reply.chunk(text, None if reason is None else
                                      _reason(Choice(reason=reason), []), index=i,
                                      logprobs=lp))
            left -= reason is not None
        if include_usage:
            yield sse({**reply.chunk("", None, usage_only=True), "usage": usage(hs)})
        yield "data: [DONE]\n\n"
    finally:  # client went away (or we finished): stop generating
        for h in hs:
            if not h.done.is_set():
                h.cancel()


async def respond(request: Request, engine: Engine, body: SamplingRequest, job: Job,
                  reply: Reply, tok: Any, plan: ChatPlan | None = None) -> Any:
    """Run one request (its n choices) on the engine and answer it, streamed or whole."""
    hs, q = submit(engine, job, tok)
    want_lp = job.params[0].logprobs is not None
    if body.stream:
        inc = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_events(hs, q, reply, inc, tok, plan, want_lp),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
    got = await collect(request, hs, q, strip=reply.chat)
    choices = []
    for i, c in enumerate(got):
        lp = None
        if want_lp:
            lp = chat_logprobs(tok, c.logprobs) if reply.chat else \
                completion_logprobs(tok, c.logprobs)
        text: str | None = c.text
        calls: list[dict] = []
        if plan and plan.tools:
            text, calls = parse_tool_calls(c.text, plan.tools)
        choices.append(reply.choice(i, text, _reason(c, calls), lp, calls or None))
    return reply.whole(choices, usage(hs))


# ---- errors in the OpenAI shape ------------------------------------------------------------------

async def _api_error(request: Request, e: APIError) -> JSONResponse:  # noqa: ARG001 - FastAPI's handler signature
    headers = ({"WWW-Authenticate": "Bearer"} if e.status == 401 else
               {"Retry-After": str(RETRY_AFTER_S)} if e.status == 429 else None)
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), e.status,
                        headers=headers)


async def _validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
    errs = e.errors()
    first = errs[0] if errs else {}
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(
            f"the request body is not valid JSON ({first.get('ctx', {}).get('error', '')} "
            f"at character {first.get('loc', ('', '?'))[-1]})", "invalid_request_error",
            None, "invalid_json"), 400)
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    ctype = request.headers.get("content-type", "")
    if not loc and "json" not in ctype:
        return JSONResponse(error_body(
            f"the request body must be a JSON object sent with 'Content-Type: "
            f"application/json' (got {ctype or 'no Content-Type'})",
            "invalid_request_error", None, "invalid_content_type"), 400)
    msg = "; ".join(f"{'.'.join(str(x) for x in er.get('loc', ()) if x != 'body') or 'body'}"
                    f": {er.get('msg', 'invalid')}" for er in errs[:5])
    return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"),
                        422)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    # 404 / 405 and friends in the OpenAI error shape, not FastAPI's {"detail": ...}
    msg = {404: f"no such endpoint: {request.method} {request.url.path}",
           405: f"{request.method} is not allowed on {request.url.path}"}.get(
               e.status_code, str(e.detail))
    return JSONResponse(error_body(msg, "invalid_request_error", None,
                                    "not_found" if e.status_code == 404 else None),
                        e.status_code, headers=getattr(e, "headers", None))


# ---- the app: route wiring only ------------------------------------------------------------------

def create_app(engine: Engine, tokenizer: Any, opts: ServeOptions,
               own_engine: bool = True) -> FastAPI:
    """The FastAPI app. The engine thread starts / stops with the app's lifespan when
    `own_engine` (tests may drive an engine they started themselves)."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:  # noqa: ARG001 - FastAPI's lifespan signature
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

    def card(mid: str) -> dict:
        return {"id": mid, "object": "model", "created": created, "owned_by": "rwkvforge",
                "root": opts.model_id, "parent": None if mid == opts.model_id
                else opts.model_id}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(m) for m in [opts.model_id,
                                                             *opts.adapters]]}

    @app.get("/v1/models/{model_id:path}")
    async def model_card(model_id: str) -> dict:
        if model_id != opts.model_id and model_id not in opts.adapters:
            raise APIError(404, f"the model {model_id!r} does not exist on this server "
                           "(GET /v1/models lists them)", "model", code="model_not_found")
        return card(model_id)

    if opts.lora_updates is not None:
        add_lora_routes(app, engine, opts)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Any:
        adapter, mid = pick_model(body.model, opts)
        ids = completion_prompt(body, tokenizer)
        check_prompt_len(ids, "prompt", opts)
        params = sampling_params(body, opts, chat=False, vocab_size=engine.vocab_size)
        job = Job(ids, choice_params(params, body.n), [], adapter=adapter)
        return await respond(request, engine, body, job, Reply(mid, chat=False), tokenizer)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        adapter, mid = pick_model(body.model, opts)
        plan = chat_plan(body, tokenizer, engine.vocab_size)
        ids, ends = chat_prompt(body, tokenizer, plan)
        check_prompt_len(ids, "messages", opts)
        params = sampling_params(body, opts, chat=True, vocab_size=engine.vocab_size)
        job = Job(ids, choice_params(params, body.n), ends, plan.grammar, adapter)
        return await respond(request, engine, body, job, Reply(mid, chat=True), tokenizer,
                             plan)

    return app


# ---- adapters added / removed at run time (--allow-runtime-lora; vLLM's routes) -------------------
class LoadLora(BaseModel):
    lora_name: str = Field(pattern=f"^{LORA_NAME_RE}$", max_length=128)
    lora_path: str = Field(min_length=1, max_length=4096)


class UnloadLora(BaseModel):
    lora_name: str = Field(max_length=128)


def add_lora_routes(app: FastAPI, engine: Engine, opts: ServeOptions) -> None:
    """POST /v1/load_lora_adapter {"lora_name", "lora_path"} and POST
    /v1/unload_lora_adapter {"lora_name"} (vLLM's names and fields). The server only offers
    them with an API key (main refuses --allow-runtime-lora without one), so they are
    authenticated like every /v1 route. Loading reads the adapter off the event loop while
    the engine keeps decoding; the name becomes usable only once it is whole. Unloading
    first takes the name away (new requests get 404), then refuses with 409 while requests
    admitted before still run with it."""
    multi = opts.lora_updates

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLora) -> dict:
        if body.lora_name == opts.model_id or body.lora_name in opts.adapters:
            raise APIError(409, f"a model named {body.lora_name!r} is already served; "
                           "unload it first or pick another name", "lora_name")
        try:
            idx = await asyncio.to_thread(multi.add, body.lora_name, body.lora_path)
        except (ValueError, FileNotFoundError) as e:  # MergeError is a ValueError
            raise APIError(400, f"cannot serve {body.lora_path} as {body.lora_name!r}: {e}",
                           "lora_path") from None
        return {"object": "lora_adapter", "id": body.lora_name, "status": "loaded",
                "index": idx}

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLora) -> dict:
        idx = opts.adapters.get(body.lora_name)
        if idx is None:
            raise APIError(404, f"no adapter named {body.lora_name!r} is served "
                           "(GET /v1/models lists them)", "lora_name", code="model_not_found")
        del opts.adapters[body.lora_name]  # no new request can pick it from here on
        users = engine.adapter_users(idx)
        if users:
            opts.adapters[body.lora_name] = idx
            raise APIError(409, f"{users} request(s) still run with {body.lora_name!r}; "
                           "retry when they have finished", "lora_name")
        opts.adapters[body.lora_name] = idx  # remove() takes it out of that same dict
        multi.remove(body.lora_name)
        return {"object": "lora_adapter", "id": body.lora_name, "status": "unloaded"}


# ---- CLI -----------------------------------------------------------------------------------------

def parse_lora_modules(items: Sequence[str], flag: str = "--lora-modules"
                       ) -> dict[str, str] | str:
    """`--lora-modules name=PATH ...` (or `--state-modules`) -> {name: path}, or the error
    message."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            return f"{flag} takes NAME=PATH entries, got {item!r}"
        if not re.fullmatch(LORA_NAME_RE, name):
            return f"{flag}: {name!r} is not a usable model name (letters, digits, " \
                   "._:/-)"
        if name in out:
            return f"{flag}: {name!r} is given twice"
        out[name] = path
    return out


def attach_adapters(model: Any, loras: dict[str, str], states: dict[str, str] | None = None,
                    runtime: bool = False) -> MultiLora | None:
    """Put the adapters on the model (adapter.MultiLora: base weights once, A / B per
    adapter, applied per batch row) and the tuned initial states (`--state-modules`, each
    row starting from its own); its `names` maps name -> row index. None when there are
    none and none may be added at run time (`runtime`). ValueError for one that cannot be
    served this way."""
    if not loras and not states and not runtime:
        return None
    multi = MultiLora(model)
    for name, p in loras.items():
        multi.add(name, p)
    for name, p in (states or {}).items():
        if name in multi.names:
            raise ValueError(f"--state-modules: {name!r} is also a --lora-modules name; give "
                             "each tuning its own name")
        multi.add_state(name, p)
    return multi


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
    ap = argparse.ArgumentParser(prog="rwkvforge serve", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    cfgmod.add_settings_flags(ap, only=["base_model", "device", "infer_fast", "serve_host",
                                        "serve_port",
                                        "serve_api_key", "serve_max_batch", "serve_max_queue",
                                        "serve_max_tokens"])
    ap.add_argument("--adapter", default="", help="LoRA adapter folder merged in memory")
    ap.add_argument("--state", default="", metavar="PATH",
                    help="a tuned initial state (state tuning: a run folder, its state/ or a "
                    "state .pth) every conversation starts from")
    ap.add_argument("--state-modules", nargs="+", default=[], metavar="NAME=PATH",
                    help="tuned initial states (state tuning) served side by side, chosen per "
                    "request by `model` like --lora-modules (rwkvserve's spelling)")
    ap.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                    help="LoRA adapters served side by side over the one base model, chosen "
                    "per request by `model` (vLLM's spelling); requests for different "
                    "adapters share the decode batch")
    ap.add_argument("--allow-runtime-lora", action="store_true",
                    help="offer POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
                    "(vLLM's routes) to add and remove --lora-modules adapters while serving; "
                    "needs SERVE_API_KEY (the routes read files on this machine)")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="weights: auto = fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--model-id", default="", help="name shown by /v1/models "
                    "(default: the model file's name)")
    ap.add_argument("--max-prompt-tokens", type=int, default=8192)
    ap.add_argument("--prefill-chunk", type=int, default=256,
                    help="prompt tokens fed per engine step: smaller = running streams "
                    "stall less, long prompts take longer")
    ap.add_argument("--drain-seconds", type=float, default=DRAIN_S,
                    help="on SIGTERM / Ctrl-C: how long open streams may finish before the "
                    "server closes them (default %(default)s)")
    ap.add_argument("--header-timeout", type=float, default=HEADER_TIMEOUT_S,
                    help="seconds a client has to send a whole request head (request line "
                    "and headers); slower connections are closed (default %(default)s)")
    ap.add_argument("--log-level", default="info",
                    choices=("critical", "error", "warning", "info", "debug"))
    return ap


# ---- uvicorn: the one configuration main() and the tests run ------------------------------------
def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline for each request head: from the moment a
    connection opens (or its previous response ends) the client has `seconds` to send the
    request line and every header, however it drips them; otherwise the connection is
    closed. uvicorn itself never times out a half-sent head (its keep-alive timer stops at
    the first byte), so a few slow clients could hold every connection slot."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineH11(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(seconds, self._head_late)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_late(self) -> None:
            self._head_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()  # still no complete request head

        def connection_made(self, transport):  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # the head arrived (or h11 failed)
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self._arm()  # the next request on this keep-alive connection

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderDeadlineH11


def uvicorn_config(app: FastAPI, host: str, port: int, *, log_level: str = "info",
                   drain_seconds: float = DRAIN_S, header_timeout: float = HEADER_TIMEOUT_S,
                   **kw: Any):
    """SIGTERM / Ctrl-C: stop accepting, let open streams finish for up to `drain_seconds`,
    then close; an idle keep-alive connection is closed after 5 s; a request head must
    arrive within `header_timeout` (header_timeout_protocol)."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=drain_seconds, timeout_keep_alive=5,
                          http=header_timeout_protocol(header_timeout), **kw)


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if not args.header_timeout > 0:
        ap.error(f"--header-timeout must be > 0 seconds, got {args.header_timeout}")
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
    if args.allow_runtime_lora and not s.serve_api_key:
        print("error: --allow-runtime-lora needs SERVE_API_KEY: its routes load files from "
              "this machine, so only a client holding the key may call them", file=sys.stderr)
        return 2
    loras = parse_lora_modules(args.lora_modules)
    states = parse_lora_modules(args.state_modules, "--state-modules")
    for bad in (loras, states):
        if isinstance(bad, str):
            print(f"error: {bad}", file=sys.stderr)
            return 2
    if loras and args.adapter:
        print("error: --adapter (merged) and --lora-modules cannot be combined: serve the "
              "merged adapter as one more --lora-modules entry", file=sys.stderr)
        return 2
    try:
        path, is_demo = resolve_base_model(s.base_model, res.sources["BASE_MODEL"],
                                           say=lambda m: print(f"[rwkvforge] {m}",
                                                               file=sys.stderr),
                                           adapter=args.adapter or None)
        tok = get_tokenizer()
        model = load_with_adapter(path, args.adapter or None, DTYPES[dtype], device)
        load_state_into(model, args.state)  # before the engine: its init_state starts there
        set_fast_path(model, s.infer_fast, device)
        multi = attach_adapters(model, loras, states, runtime=args.allow_runtime_lora)
        adapters = multi.names if multi is not None else {}
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
                        adapters=adapters,
                        lora_updates=multi if args.allow_runtime_lora else None,
                        max_tokens=s.serve_max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        default_max_tokens=min(256, s.serve_max_tokens))
    app = create_app(engine, tok, opts)
    import uvicorn

    print(f"[rwkvforge] OpenAI-compatible API at http://{s.serve_host}:{s.serve_port}/v1 "
          f"(model id {opts.model_id!r}"
          + (f", adapter {args.adapter} merged in memory" if args.adapter else "")
          + (f", state {args.state}" if args.state else "")
          + (f", adapters / states {', '.join(adapters)}" if adapters else "") + ")",
          file=sys.stderr)
    uvicorn.Server(uvicorn_config(app, s.serve_host, s.serve_port, log_level=args.log_level,
                                  drain_seconds=args.drain_seconds,
                                  header_timeout=args.header_timeout)).run()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

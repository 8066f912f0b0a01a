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
serves several adapters over one base model, chosen by `model` (adapter.MultiLora).

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
from dataclasses import dataclass, field, replace
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
    # unknown fields are kept so that `refuse_unknown` can name them in a 400 (a field this
    # server does not honour is refused, never silently ignored)
    model_config = ConfigDict(extra="allow")

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
    min_p: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                         description="vLLM extra: drop tokens below min_p * the top one")
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, allow_inf_nan=False,
        description="vLLM extra: seen tokens' logits / rp (positive) or * rp (negative)")
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (as a string) -> bias in [-100, 100] added to its logit")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=128, description="choices, decoded together; at most the "
                   "server's SERVE_MAX_BATCH")
    user: str | None = Field(None, max_length=256, description="accepted, not used")

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
    echo: bool = Field(False, description="only false")
    logprobs: int | None = Field(None, ge=0, le=20,
                                 description="the chosen token's and this many top ones")
    suffix: str | None = Field(None, description="not supported (400 when sent)")
    best_of: int | None = Field(None, description="only 1")


class ChatContentPart(BaseModel):
    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    name: str = Field(..., min_length=1, max_length=256)
    arguments: str = Field(..., description="the arguments as a JSON object in a string")


class ToolCall(BaseModel):
    id: str = Field("", max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # named in a 400 by chat_messages when set
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[ChatContentPart], None] = None
    tool_calls: list[ToolCall] | None = None  # assistant
    tool_call_id: str | None = Field(None, max_length=256)  # tool
    name: str | None = Field(None, max_length=256)  # tool: the function's name


class FunctionDef(BaseModel):
    name: str = Field(..., min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDef(BaseModel):
    type: Literal["function"]
    function: FunctionDef


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(..., min_length=1, max_length=1024)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Union[Literal["none", "auto", "required"], dict[str, Any], None] = None
    parallel_tool_calls: bool | None = None
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
    # --lora-modules: served adapter name -> the engine's adapter index (1, 2, ...); with
    # any, `model` must be the base id or one of these names (404 otherwise)
    adapters: dict[str, int] = field(default_factory=dict)
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
                    "frequency_penalty": "alpha_frequency", "penalty_decay": "alpha_decay",
                    "min_p": "min_p", "repetition_penalty": "repetition_penalty"}

# OpenAI fields that name a feature this server does not have: refused with this reason
_NOT_SUPPORTED = {
    "functions": "the legacy 'functions' field is not supported; send 'tools' "
                 "(type 'function') instead",
    "function_call": "the legacy 'function_call' field is not supported; send "
                     "'tool_choice' instead",
    "audio": "audio output is not supported", "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "reasoning_effort is not supported",
    "web_search_options": "web search is not supported",
    "service_tier": "service_tier is not supported",
}


def refuse_unknown(body: BaseModel, where: str = "") -> None:
    """APIError(400) naming the first field of `body` this server does not know (a null
    one is taken as not sent): nothing a client sends is silently ignored."""
    for k, v in (body.model_extra or {}).items():
        if v is None or (k == "store" and v is False) or (k == "metadata" and not v):
            continue  # null / store=false / empty metadata: the defaults, nothing to do
        why = _NOT_SUPPORTED.get(k, f"{where}{k} is not supported by this server")
        raise APIError(400, why, f"{where}{k}", code="unsupported_parameter")


def logit_bias_pairs(bias: dict[str, float] | None, vocab_size: int
                     ) -> tuple[tuple[int, float], ...]:
    """OpenAI logit_bias ({"token id": bias}) -> (id, bias) pairs; APIError(400) for a key
    that is not a token id of this vocabulary or a bias outside [-100, 100]."""
    out = []
    for k, v in (bias or {}).items():
        try:
            t = int(k)
        except ValueError:
            raise APIError(400, f"logit_bias key {k!r} is not a token id", "logit_bias") \
                from None
        if not 0 <= t < vocab_size:
            raise APIError(400, f"logit_bias token {t} is outside the vocabulary "
                           f"[0, {vocab_size})", "logit_bias")
        if not (isinstance(v, (int, float)) and -100 <= v <= 100):
            raise APIError(400, f"logit_bias[{k}]={v!r}: biases must be in [-100, 100]",
                           "logit_bias")
        out.append((t, float(v)))
    if len(out) > 1024:
        raise APIError(400, f"logit_bias has {len(out)} entries; at most 1024", "logit_bias")
    return tuple(out)


def sampling_params(req: _Sampling, opts: ServeOptions, *, chat: bool,
                    vocab_size: int = 65536) -> SamplingParams:
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
    fields["logit_bias"] = logit_bias_pairs(req.logit_bias, vocab_size)
    if chat:
        if getattr(req, "top_logprobs", None) is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        fields["logprobs"] = (req.top_logprobs or 0) if req.logprobs else None
    else:
        fields["logprobs"] = req.logprobs
    if chat:
        return chat_params(stops, **fields, max_tokens=mt, seed=req.seed)
    return SamplingParams(**fields, max_tokens=mt, seed=req.seed, stop=tuple(stops))


def choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """The n choices' parameters: with a seed, choice i samples with seed + i (distinct,
    reproducible choices); without one each draws a fresh seed."""
    if params.seed is None:
        return [replace(params) for _ in range(n)]
    return [replace(params, seed=(params.seed + i) % (1 << 63)) for i in range(n)]


# ---- tools: the prompt format and the reply parser --------------------------------------
# rwkvforge's tool-call format (see docs/serve.md "Tools"): the tool list goes into the
# system turn, a call is one line `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
# in the assistant turn and a tool result is a user-side turn wrapped in
# <tool_response>...</tool_response>. Modelled on the Hermes / Qwen tags inside RWKV's World
# roles; NOT checked against BlinkDL's own G1 template (not reachable when this was built).

TOOL_CALL_RE = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


def tools_system_text(tools: Sequence[ToolDef]) -> str:
    lines = "\n".join(json.dumps(t.model_dump(exclude_none=True), ensure_ascii=False)
                      for t in tools)
    return ("# Tools\nYou may call one or more of these functions. Each is described by a "
            f"JSON object:\n<tools>\n{lines}\n</tools>\nTo call a function, reply with one "
            "line per call: <tool_call>{\"name\": <function name>, \"arguments\": "
            "<arguments as a JSON object>}</tool_call>")


def tool_call_text(tc: ToolCall) -> str:
    try:
        args = json.loads(tc.function.arguments or "{}")
    except ValueError:
        raise APIError(400, f"tool call {tc.function.name}: arguments is not JSON",
                       "messages") from None
    return "<tool_call>" + json.dumps({"name": tc.function.name, "arguments": args},
                                      ensure_ascii=False) + "</tool_call>"


def parse_tool_calls(text: str, tools: Sequence[ToolDef]) -> tuple[str | None, list[dict]]:
    """A reply -> (content outside the calls or None, OpenAI tool_calls). A block whose
    JSON does not parse or names no known tool stays in the content as text."""
    names = {t.function.name for t in tools}
    calls: list[dict] = []
    rest: list[str] = []
    pos = 0
    for m in TOOL_CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not (isinstance(obj, dict) and obj.get("name") in names):
            continue
        args = obj.get("arguments", {})
        rest.append(text[pos:m.start()])
        pos = m.end()
        calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": json.dumps(args, ensure_ascii=False)}})
    rest.append(text[pos:])
    content = "".join(rest).strip()
    return (content or None) if calls else text, calls


def chat_messages(messages: Sequence[ChatMessage],
                  tools: Sequence[ToolDef] = ()) -> list[dict[str, str]]:
    """OpenAI chat messages -> the World format's {role, content} turns: "developer" is
    "system", content parts are joined by newlines, an assistant's tool_calls become
    <tool_call> lines, a "tool" message a user-side <tool_response> turn, `tools` (when
    sent) are described at the end of the system turn, consecutive turns of one speaker
    are merged. Raises APIError(400) naming the client's own message index (before
    merging) when the order cannot be written as [system] user, assistant, ..., user."""
    msgs: list[dict[str, str]] = []
    seen_user = False
    for i, m in enumerate(messages):
        refuse_unknown(m, f"messages[{i}].")
        if m.name is not None and m.role != "tool":
            raise APIError(400, f"messages[{i}].name is only used on tool messages",
                           f"messages[{i}].name")
        if m.tool_calls and m.role != "assistant":
            raise APIError(400, f"messages[{i}]: only assistant messages have tool_calls",
                           f"messages[{i}].tool_calls")
        if m.content is None and not m.tool_calls:
            raise APIError(400, f"messages[{i}]: content is missing", "messages")
        text = "" if m.content is None else m.content if isinstance(m.content, str) else \
            "\n".join(part.text for part in m.content)
        role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
        if m.role == "tool":
            text = f"<tool_response>\n{text}\n</tool_response>"
        if m.tool_calls:
            text = "\n".join([text] * bool(text.strip()) +
                             [tool_call_text(tc) for tc in m.tool_calls])
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
    if tools:
        if msgs[0]["role"] == "system":
            msgs[0]["content"] += "\n" + tools_system_text(tools)
        else:
            msgs.insert(0, {"role": "system", "content": tools_system_text(tools)})
    return msgs


@dataclass
class ChatPlan:
    """What a chat request asks beyond sampling: the grammar its reply must follow (None:
    free text) and the tools whose calls are parsed back out of the reply."""

    grammar: str | None = None
    tools: tuple[ToolDef, ...] = ()
    json_mode: bool = False


def chat_plan(body: ChatRequest, tokenizer: Any, vocab_size: int) -> ChatPlan:
    """response_format / tools / tool_choice -> ChatPlan; APIError(400) naming the field
    for what cannot be honoured."""
    from rwkvforge import grammar as gm

    tools = tuple(body.tools or ())
    choice = body.tool_choice
    if choice is not None and not tools:
        raise APIError(400, "tool_choice needs tools", "tool_choice")
    if body.parallel_tool_calls is not None and not tools:
        raise APIError(400, "parallel_tool_calls needs tools", "parallel_tool_calls")
    parallel = body.parallel_tool_calls is not False
    rf = body.response_format or {"type": "text"}
    kind = rf.get("type")
    plan = ChatPlan()
    try:
        if kind == "json_object" or kind == "json_schema":
            if tools and choice != "none":
                raise APIError(400, "response_format json_object / json_schema cannot be "
                               "combined with tools (send tool_choice 'none')",
                               "response_format")
            schema = None
            if kind == "json_schema":
                js = rf.get("json_schema")
                if not isinstance(js, dict) or not isinstance(js.get("schema"), dict):
                    raise APIError(400, "response_format.json_schema.schema must be a JSON "
                                   "schema object", "response_format.json_schema")
                schema = js["schema"]
            plan = ChatPlan(gm.compile_grammar(gm.json_grammar(schema), tokenizer,
                                               vocab_size), json_mode=True)
        elif kind != "text":
            raise APIError(400, f"response_format type {kind!r} is not supported: use "
                           "text, json_object or json_schema", "response_format")
        if tools and choice != "none":
            name = None
            if isinstance(choice, dict):
                name = (choice.get("function") or {}).get("name")
                if choice.get("type") != "function" or not isinstance(name, str):
                    raise APIError(400, "tool_choice must be none, auto, required or "
                                   "{\"type\": \"function\", \"function\": {\"name\": ...}}",
                                   "tool_choice")
                if name not in {t.function.name for t in tools}:
                    raise APIError(400, f"tool_choice names {name!r}, which is not in tools",
                                   "tool_choice")
            g = None
            if choice == "required" or name is not None:
                g = gm.compile_grammar(gm.tool_call_grammar(
                    [t.model_dump(exclude_none=True) for t in tools], name,
                    parallel and name is None), tokenizer, vocab_size)
            plan = ChatPlan(g, tools)
    except gm.GrammarError as e:
        param = "tools" if tools and choice != "none" else "response_format"
        raise APIError(400, f"cannot constrain the reply: {e}", param) from None
    if plan.grammar is not None and body.stop:
        raise APIError(400, "stop cannot be combined with a constrained reply (JSON mode, "
                       "a schema or a forced tool call): a stop string could cut it",
                       "stop")
    return plan


def chat_prompt(body: ChatRequest, tokenizer: Any,
                plan: ChatPlan | None = None) -> tuple[list[int], list[int]]:
    """(prompt ids, turn ends = prefix-cache points) of a chat request, in the one chat
    encoding (generate.encode_chat_prompt); APIError(400) for what this server refuses."""
    refuse_unknown(body)
    try:
        return encode_chat_prompt(chat_messages(body.messages, plan.tools if plan else ()),
                                  tokenizer)
    except (ChatFormatError, ValueError) as e:
        raise APIError(400, str(e), "messages") from None


def completion_prompt(body: CompletionRequest, tokenizer: Any) -> list[int]:
    """Prompt ids of a completion request (text, or token ids; one prompt per request);
    APIError(400) for the fields this server does not support."""
    refuse_unknown(body)
    for name, bad in (("echo", body.echo), ("suffix", bool(body.suffix)),
                      ("best_of", (body.best_of or 1) > 1)):
        if bad:
            raise APIError(400, f"{name} is not supported by this server", name)
    p = body.prompt
    if isinstance(p, list) and p and isinstance(p[0], (str, list)):
        if len(p) != 1:
            raise APIError(400, f"prompt holds {len(p)} prompts; send one per request "
                           "(n gives several choices of one prompt)", "prompt")
        p = p[0]
    try:
        return tokenizer.encode(p) if isinstance(p, str) else [int(t) for t in p]
    except ValueError as e:  # e.g. a lone surrogate from a "\ud800" escape
        raise APIError(400, str(e), "prompt") from None


def pick_model(model: str, opts: ServeOptions) -> tuple[int, str]:
    """The request's `model` -> (adapter index, the id to answer with). Without
    --lora-modules any name is served by the one model (as RWKV-Runner does); with them,
    a name that is neither the base id nor an adapter is a 404 naming it."""
    if model in opts.adapters:
        return opts.adapters[model], model
    if opts.adapters and model != opts.model_id:
        raise APIError(404, f"the model {model!r} does not exist on this server: use "
                       f"{', '.join([opts.model_id, *opts.adapters])}", "model",
                       code="model_not_found")
    return 0, opts.model_id


def check_prompt_len(ids: list[int], param: str, opts: ServeOptions) -> None:
    if len(ids) > opts.max_prompt_tokens:
        raise APIError(400, f"the prompt is {len(ids)} tokens; this server accepts at "
                       f"most {opts.max_prompt_tokens} (--max-prompt-tokens)", param)


# --------------------------------------------------------------------------------------
# engine events -> response bodies (one non-streaming, one server-sent-events builder)
# --------------------------------------------------------------------------------------

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
        from rwkvforge.grammar import new_constraint

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
                yield sse(_error_body(f"generation failed: {ev.error}", "server_error",
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


async def respond(request: Request, engine: Engine, body: _Sampling, job: Job,
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


# --------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------

def parse_lora_modules(items: Sequence[str]) -> dict[str, str] | str:
    """`--lora-modules name=PATH ...` -> {name: path}, or the error message."""
    out: dict[str, str] = {}
    for item in items:
        name, eq, path = item.partition("=")
        if not eq or not name or not path:
            return f"--lora-modules takes NAME=PATH entries, got {item!r}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}", name):
            return f"--lora-modules: {name!r} is not a usable model name (letters, digits, " \
                   "._:/-)"
        if name in out:
            return f"--lora-modules: {name!r} is given twice"
        out[name] = path
    return out


def attach_adapters(model: Any, loras: dict[str, str]) -> dict[str, int]:
    """Put the adapters on the model (adapter.MultiLora: base weights once, A / B per
    adapter, applied per batch row); {name: row index}. ValueError for one that cannot
    be served this way."""
    if not loras:
        return {}
    from rwkvforge.adapter import MultiLora

    multi = MultiLora(model)
    return {name: multi.add(name, p) for name, p in loras.items()}


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
    ap.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                    help="LoRA adapters served side by side over the one base model, chosen "
                    "per request by `model` (vLLM's spelling); requests for different "
                    "adapters share the decode batch")
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
    loras = parse_lora_modules(args.lora_modules)
    if isinstance(loras, str):
        print(f"error: {loras}", file=sys.stderr)
        return 2
    if loras and args.adapter:
        print("error: --adapter (merged) and --lora-modules cannot be combined: serve the "
              "merged adapter as one more --lora-modules entry", file=sys.stderr)
        return 2
    try:
        path, is_demo = resolve_base_model(s.base_model, res.sources["BASE_MODEL"],
                                           say=lambda m: print(f"[rwkvforge] {m}",
                                                               file=sys.stderr))
        tok = get_tokenizer()
        model = load_with_adapter(path, args.adapter or None, DTYPES[dtype], device)
        set_fast_path(model, s.infer_fast, device)
        adapters = attach_adapters(model, loras)
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
                        max_tokens=s.serve_max_tokens, max_prompt_tokens=args.max_prompt_tokens,
                        default_max_tokens=min(256, s.serve_max_tokens))
    app = create_app(engine, tok, opts)
    import uvicorn

    print(f"[rwkvforge] OpenAI-compatible API at http://{s.serve_host}:{s.serve_port}/v1 "
          f"(model id {opts.model_id!r}"
          + (f", adapter {args.adapter} merged in memory" if args.adapter else "")
          + (f", adapters {', '.join(adapters)}" if adapters else "") + ")",
          file=sys.stderr)
    uvicorn.run(app, host=s.serve_host, port=s.serve_port, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

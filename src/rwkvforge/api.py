"""The OpenAI API as this server speaks it: the request schemas (OpenAI fields plus RWKV's
top_k / penalty_decay), the refusal of any field the server does not honour, and the mapping
of a request onto the engine: sampling parameters, the chat prompt (messages, tools in the
prompt, the tool-call reply format), the completion prompt. Plain functions: tests call them
without an app. `serve.py` wires them to routes. The full parameter table: docs/api.md.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Sequence, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

from rwkvforge import grammar as gm
from rwkvforge.generate import CHAT_DEFAULTS, chat_params, encode_chat_prompt
from rwkvforge.sampling import SamplingParams
from rwkvforge.tokenizer import ChatFormatError


# ---- request schemas (OpenAI fields + RWKV extras top_k / penalty_decay) -------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
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


class CompletionRequest(SamplingRequest):
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


class ChatRequest(SamplingRequest):
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


def error_body(message: str, type_: str, param: str | None, code: str | None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


@dataclass
class ServeOptions:
    model_id: str = "rwkv7"
    # --lora-modules: served adapter name -> the engine's adapter index (1, 2, ...); with
    # any, `model` must be the base id or one of these names (404 otherwise)
    adapters: dict[str, int] = field(default_factory=dict)
    # --allow-runtime-lora: the adapter.MultiLora behind `adapters` (whose `names` is that
    # same dict), for the load / unload routes; None = the routes are off
    lora_updates: Any = None
    api_key: str = ""
    max_tokens: int = 2048  # cap on a request's max_tokens
    max_prompt_tokens: int = 8192
    default_max_tokens: int = 256


# ---- request -> prompt ids and sampling parameters (plain functions: tests call them directly) ----

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


def sampling_params(req: SamplingRequest, opts: ServeOptions, *, chat: bool,
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


# ---- tools: the prompt format and the reply parser -----------------------------------------------
# The tool-call format of BlinkDL's RWKV-7 G1 models (RWKV-LM, RWKV-v7/RWKV7-G1x-templates.txt:
# "lots of function call formats were trained"; this is the one its tool-use samples show),
# inside the World roles every rwkvforge chat uses (see docs/api.md "Tools"):
# - each tool is a section of the system turn: "### `name`", "**Description:** ...",
#   "**Parameters:**" and its JSON schema in a ```json block;
# - a call is "**Tool Call:**" and a ```json block holding {"name": ..., "arguments": {...}};
# - a tool's result is a user-side turn "### Tool Output" and its text in a ``` block.
# Replies are also searched for Hermes-style <tool_call>{...}</tool_call> blocks, the format
# rwkvforge used before (a model tuned on it keeps working).

TOOL_CALL_RES = (
    re.compile(r"\*\*Tool Call:\*\*[ \t]*\n```(?:json)?[ \t]*\n(\{.*?\})\s*\n```", re.S),
    re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S))


def tools_system_text(tools: Sequence[ToolDef]) -> str:
    sections = []
    for t in tools:
        fn = t.function
        params = fn.parameters if fn.parameters is not None else {
            "type": "object", "properties": {}}
        sections.append("\n".join(
            [f"### `{fn.name}`"]
            + ([f"**Description:** {fn.description}"] if fn.description else [])
            + ["**Parameters:**", "```json", json.dumps(params, ensure_ascii=False, indent=2),
               "```"]))
    return "\n".join(sections)


def tool_call_text(tc: ToolCall) -> str:
    try:
        args = json.loads(tc.function.arguments or "{}")
    except ValueError:
        raise APIError(400, f"tool call {tc.function.name}: arguments is not JSON",
                       "messages") from None
    return (gm.TOOL_CALL_HEAD + json.dumps({"name": tc.function.name, "arguments": args},
                                        ensure_ascii=False, indent=2) + gm.TOOL_CALL_TAIL)


def tool_output_text(content: str) -> str:
    """A tool's result as the G1 samples show it: a ```json block when it is JSON."""
    try:
        json.loads(content)
        fence = "```json"
    except ValueError:
        fence = "```"
    return f"### Tool Output\n{fence}\n{content}\n```"


def parse_tool_calls(text: str, tools: Sequence[ToolDef]) -> tuple[str | None, list[dict]]:
    """A reply -> (content outside the calls or None, OpenAI tool_calls). A block whose
    JSON does not parse or names no known tool stays in the content as text."""
    names = {t.function.name for t in tools}
    calls: list[dict] = []
    rest: list[str] = []
    pos = 0
    found = sorted((m for r in TOOL_CALL_RES for m in r.finditer(text)),
                   key=lambda m: m.start())
    for m in found:
        if m.start() < pos:  # inside a block already taken
            continue
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
    G1 "**Tool Call:**" blocks, a "tool" message a user-side "### Tool Output" turn, `tools` (when
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
            text = tool_output_text(text)
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

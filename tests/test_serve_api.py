"""The OpenAI API surface beyond plain chat / completions, with the official `openai` client
against a live uvicorn server on 127.0.0.1 (tiny random model): `n` (one shared prefill,
distinct reproducible choices), `logit_bias`, `min_p`, `repetition_penalty`, `logprobs` /
`top_logprobs` checked against a direct forward pass, `GET /v1/models/{id}`,
`response_format` json_object / json_schema over 20 random schemas (every reply parses and
validates), tools (a forced call, its parse, the `role: tool` round trip), and several
LoRA adapters behind one server (each request gets the tokens of a server started with
only its adapter).

    .venv/bin/python -m pytest tests/test_serve_api.py -q
"""

from __future__ import annotations

import json
import random

import httpx
import jsonschema
import openai
import pytest
import torch
from test_serve import LiveServer

from rwkvforge.generate import Engine, chat_params, encode_chat_prompt
from rwkvforge.sampling import SamplingParams
from rwkvforge.api import ChatMessage, ToolDef, chat_messages, parse_tool_calls
from rwkvforge.tokenizer import token_table


@pytest.fixture(scope="module")
def srv(parts):
    model, tok = parts
    with LiveServer(model, tok, max_tokens=2048, max_prompt_tokens=400) as s:
        yield s


def _direct(parts, ids, params: SamplingParams) -> tuple[str, list[int]]:
    model, tok = parts
    h = Engine(model, tok).generate(ids, params)
    return h.result(), list(h.req.generated)


_ID_OF = {b: i for i, b in enumerate(token_table()) if b}


# ----------------------------------------------------------------------------- models
def test_model_card_and_unknown_model(srv):
    c = srv.client()
    m = c.models.retrieve("tiny-test")
    assert m.id == "tiny-test" and m.object == "model"
    with pytest.raises(openai.NotFoundError) as e:
        c.models.retrieve("no-such-model")
    assert "no-such-model" in str(e.value)


# ----------------------------------------------------------------------------- n
def test_n_gives_distinct_reproducible_choices_from_one_prefill(srv, parts):
    _, tok = parts
    c = srv.client()
    msgs = [{"role": "user", "content": "Tell me about n choices, please (n=3 test)."}]
    ids, _ = encode_chat_prompt(msgs, tok)
    before = srv.engine.stats["prefill_tokens"]
    r = c.chat.completions.create(model="x", messages=msgs, n=3, seed=11, max_tokens=12,
                                  temperature=1.0, top_p=1.0)
    # the prompt was prefilled once, not three times
    assert srv.engine.stats["prefill_tokens"] - before == len(ids)
    texts = [ch.message.content for ch in r.choices]
    assert [ch.index for ch in r.choices] == [0, 1, 2]
    assert len(set(texts)) == 3, texts
    # choice i samples with seed + i: the engine run directly gives the same text
    for i, t in enumerate(texts):
        want, gen = _direct(parts, ids, chat_params(temperature=1.0, top_p=1.0, max_tokens=12,
                                                    seed=11 + i))
        assert t == want.lstrip()
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == sum(
        len(_direct(parts, ids, chat_params(temperature=1.0, top_p=1.0, max_tokens=12,
                                            seed=11 + i))[1]) for i in range(3))
    again = c.chat.completions.create(model="x", messages=msgs, n=3, seed=11, max_tokens=12,
                                      temperature=1.0, top_p=1.0)
    assert [ch.message.content for ch in again.choices] == texts
    # streamed: chunks carry their choice's index; joined per index they are the same texts
    got = {0: "", 1: "", 2: ""}
    reasons = {}
    for ch in c.chat.completions.create(model="x", messages=msgs, n=3, seed=11,
                                        max_tokens=12, temperature=1.0, top_p=1.0,
                                        stream=True):
        for cc in ch.choices:
            got[cc.index] += cc.delta.content or ""
            if cc.finish_reason:
                reasons[cc.index] = cc.finish_reason
    assert [got[i] for i in range(3)] == texts and set(reasons) == {0, 1, 2}


# ----------------------------------------------------------------------------- bias / cuts
def test_logit_bias_changes_the_greedy_output(srv, parts):
    _, tok = parts
    c = srv.client()
    ids = tok.encode("The weather today is")
    want, gen = _direct(parts, ids, SamplingParams(temperature=0, max_tokens=5))
    r = c.completions.create(model="x", prompt="The weather today is", max_tokens=5,
                             temperature=0)
    assert r.choices[0].text == want
    banned = c.completions.create(model="x", prompt="The weather today is", max_tokens=5,
                                  temperature=0, logit_bias={str(gen[0]): -100})
    assert banned.choices[0].text != want
    assert not banned.choices[0].text.startswith(tok.decode([gen[0]]))
    forced = c.completions.create(model="x", prompt="The weather today is", max_tokens=3,
                                  temperature=0, logit_bias={"33": 100})
    assert forced.choices[0].text == tok.decode([33] * 3)


def test_min_p_one_keeps_only_the_top_token(srv):
    c = srv.client()
    greedy = c.completions.create(model="x", prompt="Once", max_tokens=8, temperature=0)
    for seed in (1, 2):
        r = c.completions.create(model="x", prompt="Once", max_tokens=8, temperature=1.5,
                                 seed=seed, extra_body={"min_p": 1.0})
        assert r.choices[0].text == greedy.choices[0].text
    free = {c.completions.create(model="x", prompt="Once", max_tokens=8, temperature=1.5,
                                 seed=s).choices[0].text for s in (1, 2)}
    assert greedy.choices[0].text not in free or len(free) > 1


def test_repetition_penalty_is_honoured(srv, parts):
    """A +8 bias makes greedy decoding repeat one token; repetition_penalty=3 divides the
    (positive) logit of a token already generated by 3, so it is taken only once."""
    _, tok = parts
    c = srv.client()
    prompt = "The weather today is"
    ids = tok.encode(prompt)
    bias = ((34, 8.0),)
    _, g0 = _direct(parts, ids, SamplingParams(temperature=0, max_tokens=16, logit_bias=bias))
    want, g1 = _direct(parts, ids, SamplingParams(temperature=0, max_tokens=16,
                                                  logit_bias=bias, repetition_penalty=3.0))
    assert g0 == [34] * 16 and g1.count(34) == 1
    r = c.completions.create(model="x", prompt=prompt, max_tokens=16, temperature=0,
                             logit_bias={"34": 8.0}, extra_body={"repetition_penalty": 3.0})
    assert r.choices[0].text == want


# ----------------------------------------------------------------------------- logprobs
def _forward_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor([ids]))
    return torch.log_softmax(logits[0].float(), dim=-1)  # (T,V)


def test_logprobs_match_a_direct_forward_pass(srv, parts):
    model, tok = parts
    c = srv.client()
    prompt = "The quick brown fox"
    ids = tok.encode(prompt)
    r = c.completions.create(model="x", prompt=prompt, max_tokens=6, temperature=0,
                             logprobs=3)
    lp = r.choices[0].logprobs
    _, gen = _direct(parts, ids, SamplingParams(temperature=0, max_tokens=6))
    ref = _forward_logprobs(model, ids + gen)
    assert len(lp.tokens) == len(gen) and "".join(lp.tokens) == r.choices[0].text
    for j, t in enumerate(gen):
        row = ref[len(ids) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[t]), abs=1e-4)
        top = torch.topk(row, 3)
        assert list(lp.top_logprobs[j].values()) == pytest.approx(top.values.tolist(),
                                                                  abs=1e-4)
        assert list(lp.top_logprobs[j]) == [tok.decode([i]) for i in top.indices.tolist()]
    # chat: logprobs + top_logprobs, tokens identified exactly by their bytes; sampled
    msgs = [{"role": "user", "content": "Hello there"}]
    cids, _ = encode_chat_prompt(msgs, tok)
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=8, temperature=1.0,
                                  seed=3, logprobs=True, top_logprobs=4)
    content = r.choices[0].logprobs.content
    gen = [_ID_OF[bytes(e.bytes)] for e in content]
    assert len(gen) == r.usage.completion_tokens
    ref = _forward_logprobs(model, cids + gen)
    for j, e in enumerate(content):
        row = ref[len(cids) - 1 + j]
        assert e.logprob == pytest.approx(float(row[gen[j]]), abs=1e-4)
        top = torch.topk(row, 4)
        assert [_ID_OF[bytes(x.bytes)] for x in e.top_logprobs] == top.indices.tolist()
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(top.values.tolist(),
                                                                    abs=1e-4)
    # streamed, the same entries arrive spread over the chunks
    streamed = []
    for ch in c.chat.completions.create(model="x", messages=msgs, max_tokens=8,
                                        temperature=1.0, seed=3, logprobs=True,
                                        top_logprobs=4, stream=True):
        if ch.choices and ch.choices[0].logprobs:
            streamed += ch.choices[0].logprobs.content
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # without logprobs the field stays null
    r = c.chat.completions.create(model="x", messages=msgs, max_tokens=2)
    assert r.choices[0].logprobs is None


# ----------------------------------------------------------------------------- JSON
def _random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A random JSON schema whose every instance is finite (bounded strings, arrays,
    numbers), so a random-weight model must still close it within max_tokens."""
    kinds = ["string", "integer", "number", "boolean", "enum", "null"]
    if depth < 2:
        kinds += ["object", "array"] * 2
    kind = rng.choice(kinds)
    if kind == "string":
        s = {"type": "string", "maxLength": rng.randint(1, 12)}
        if rng.random() < 0.3:
            s["minLength"] = 1
        return s
    if kind == "integer":
        lo = rng.randint(-1000, 1000)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 5000)}
    if kind == "number":
        return {"type": "number", "minimum": -10, "maximum": 10}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "null":
        return {"type": "null"}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", 1, 2.5, True, None, "x y"],
                                   rng.randint(1, 4))}
    if kind == "array":
        return {"type": "array", "items": _random_schema(rng, depth + 1),
                "maxItems": rng.randint(1, 3)}
    names = rng.sample(["id", "name", "tags", "score", "ok", "when", "meta", "kind"],
                       rng.randint(1, 4))
    props = {n: _random_schema(rng, depth + 1) for n in names}
    return {"type": "object", "properties": props,
            "required": [n for n in names if rng.random() < 0.7],
            "additionalProperties": False}


def test_json_schema_replies_validate_every_time(srv):
    c = srv.client()
    rng = random.Random(1234)
    for i in range(20):
        schema = _random_schema(rng)
        if schema.get("type") != "object":
            schema = {"type": "object", "properties": {"value": schema},
                      "required": ["value"], "additionalProperties": False}
        r = c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": f"Give me JSON number {i}."}],
            max_tokens=400, temperature=1.0, seed=i,
            response_format={"type": "json_schema",
                             "json_schema": {"name": f"s{i}", "schema": schema}})
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (schema, text)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode_and_bad_schemas(srv):
    c = srv.client()
    r = c.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "JSON please"}], max_tokens=300,
        temperature=0, response_format={"type": "json_object"},
        logit_bias={str(_ID_OF[b"}"]): 5})  # towards "}" so the random model closes the object
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    # a schema llguidance cannot compile is a 400 naming response_format, not a 500
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(
            model="x", messages=[{"role": "user", "content": "x"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "strin"}}})
    assert e.value.body["param"] == "response_format"


# ----------------------------------------------------------------------------- tools
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}


def test_tool_call_round_trip(srv):
    c = srv.client()
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the weather in Paris?"}]
    r = c.chat.completions.create(model="x", messages=msgs, tools=[WEATHER, TIME],
                                  tool_choice={"type": "function",
                                               "function": {"name": "get_weather"}},
                                  max_tokens=200, temperature=1.0, seed=5)
    ch = r.choices[0]
    assert ch.finish_reason == "tool_calls", ch
    (call,) = ch.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    jsonschema.validate(json.loads(call.function.arguments),
                        WEATHER["function"]["parameters"])
    # tool_choice "required": at least one call to any listed tool
    r2 = c.chat.completions.create(model="x", messages=msgs, tools=[WEATHER, TIME],
                                   tool_choice="required", max_tokens=300, seed=6)
    assert r2.choices[0].finish_reason == "tool_calls"
    assert {tc.function.name for tc in r2.choices[0].message.tool_calls} <= {"get_weather",
                                                                             "get_time"}
    # the round trip: the assistant's tool_calls message as the client got it, the
    # tool's result, then a plain answer
    follow = msgs + [ch.message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'}]
    r3 = c.chat.completions.create(model="x", messages=follow, tools=[WEATHER, TIME],
                                   max_tokens=10, temperature=0, tool_choice="none")
    assert r3.choices[0].finish_reason in ("stop", "length")
    assert r3.choices[0].message.tool_calls is None
    assert isinstance(r3.choices[0].message.content, str)
    # streamed: the call arrives as a tool_calls delta with the finish reason
    chunks = list(c.chat.completions.create(
        model="x", messages=msgs, tools=[WEATHER], tool_choice="required", max_tokens=200,
        seed=5, temperature=1.0, stream=True))
    deltas = [tc for chk in chunks for cc in chk.choices for tc in (cc.delta.tool_calls or [])]
    assert deltas and {d.function.name for d in deltas} == {"get_weather"}
    assert [d.index for d in deltas] == list(range(len(deltas)))
    for d in deltas:
        jsonschema.validate(json.loads(d.function.arguments), WEATHER["function"]["parameters"])
    # parallel_tool_calls=false: exactly one call
    r4 = c.chat.completions.create(model="x", messages=msgs, tools=[WEATHER, TIME],
                                   tool_choice="required", parallel_tool_calls=False,
                                   max_tokens=300, seed=6)
    assert len(r4.choices[0].message.tool_calls) == 1
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_prompt_rendering_and_reply_parsing():
    tools = [ToolDef(**WEATHER)]
    msgs = [ChatMessage(role="user", content="Weather?"),
            ChatMessage(role="assistant", content=None, tool_calls=[
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather",
                              "arguments": '{"city": "Oslo", "unit": "celsius"}'}}]),
            ChatMessage(role="tool", tool_call_id="call_1", content="-3 C"),
            ChatMessage(role="user", content="Thanks")]
    turns = chat_messages(msgs, tools)
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    # the G1 template's tool section, call block and tool output (RWKV7-G1x-templates.txt)
    system = turns[0]["content"]
    assert system.startswith("### `get_weather`\n**Description:** Current weather in a city\n"
                             "**Parameters:**\n```json\n{\n")
    assert json.loads(system.split("```json\n")[1].split("\n```")[0]) == \
        WEATHER["function"]["parameters"]
    call = turns[2]["content"]
    assert call.startswith("**Tool Call:**\n```json\n{\n  \"name\": \"get_weather\",")
    assert call.endswith("\n```")
    assert json.loads(call[len("**Tool Call:**\n```json\n"):-4]) == {
        "name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}
    assert turns[3]["content"] == "### Tool Output\n```\n-3 C\n```\nThanks"
    json_out = chat_messages(msgs[:2] + [ChatMessage(role="tool", tool_call_id="call_1",
                                                     content='{"t": -3}')], tools)
    assert json_out[-1]["content"] == '### Tool Output\n```json\n{"t": -3}\n```'
    # what the server writes for a call is what it parses back
    (back,) = parse_tool_calls(call, tools)[1]
    assert json.loads(back["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    content, calls = parse_tool_calls(
        'Let me check.\n**Tool Call:**\n```json\n{"name": "get_weather", "arguments": '
        '{"city": "Rome"}}\n```\n**Tool Call:**\n```json\n{"name": "nope", "arguments": {}}'
        '\n```\n<tool_call>{"name": "get_weather", "arguments": {"city": "Bern"}}</tool_call>',
        tools)
    # the G1 block and the older Hermes-style tag both parse; an unknown tool stays text
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Rome"},
                                                                         {"city": "Bern"}]
    assert content.startswith("Let me check.") and "nope" in content and "Bern" not in content
    assert parse_tool_calls("plain text", tools) == ("plain text", [])


def test_refused_fields_are_named(srv):
    r = httpx.post(srv.base + "/v1/chat/completions", json={
        "model": "x", "messages": [{"role": "user", "content": "x"}],
        "functions": [{"name": "f", "parameters": {}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "functions"
    assert "tools" in r.json()["error"]["message"]
    # null for a field this server does not know is taken as not sent
    r = httpx.post(srv.base + "/v1/chat/completions", json={
        "model": "x", "messages": [{"role": "user", "content": "x", "refusal": None}],
        "functions": None, "max_tokens": 1})
    assert r.status_code == 200, r.text

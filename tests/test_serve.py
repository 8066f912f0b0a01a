"""Tests for rwkvforge.serve: the official `openai` client against a live uvicorn server on
127.0.0.1 (a free port, served from a thread) with a tiny random model — completions and
chat, streaming and not, compared token for token with the engine run directly; the
request -> SamplingParams / message rules and response shapes without an app; API key
(401), bounded queue (429), validation (400 / 422 naming the field), client disconnect,
a schemathesis fuzz run (no 500s) and a bounded load test (slow).

    /tmp/v1/bin/python -m pytest tests/test_serve.py -q            # + -m slow for the load test
"""

from __future__ import annotations

import gc
import json
import socket
import threading
import os
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from rwkvforge.generate import CHAT_DEFAULTS, CHAT_STOP, Engine, chat_params, encode_chat_prompt
from rwkvforge.sampling import SamplingParams
from rwkvforge.api import (APIError, ChatMessage, ChatRequest, CompletionRequest, ServeOptions,
                           chat_messages, sampling_params)
from rwkvforge.serve import Reply, create_app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving create_app(...) on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, model, tok, *, max_batch=8, max_queue=64, header_timeout=None,
                 **opts):
        import uvicorn

        from rwkvforge.serve import HEADER_TIMEOUT_S, uvicorn_config

        self.engine = Engine(model, tok, max_batch=max_batch, max_queue=max_queue,
                             prefill_chunk=32)
        self.opts = ServeOptions(model_id="tiny-test", **opts)
        app = create_app(self.engine, tok, self.opts)
        self.port = _free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cfg = uvicorn_config(app, "127.0.0.1", self.port, log_level="warning", lifespan="on",
                             header_timeout=header_timeout or HEADER_TIMEOUT_S)
        self.server = uvicorn.Server(cfg)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        t0 = time.time()
        while not self.server.started:
            if time.time() - t0 > 30 or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def client(self, key: str = "none", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0,
                             timeout=60, **kw)


@pytest.fixture(scope="module")
def srv(parts):
    model, tok = parts
    with LiveServer(model, tok, max_tokens=2048, max_prompt_tokens=200) as s:
        yield s


def _direct(parts, ids, **kw) -> tuple[str, int]:
    """The same request run on a fresh engine in-process: what the server must return."""
    model, tok = parts
    h = Engine(model, tok).generate(ids, SamplingParams(**kw))
    return h.result(), h.completion_tokens


# ----------------------------------------------------------------------------- no app
def _raises(fn, *a, **kw) -> APIError:
    with pytest.raises(APIError) as e:
        fn(*a, **kw)
    return e.value


def test_request_to_sampling_params():
    opts = ServeOptions(max_tokens=100, default_max_tokens=256)
    body = CompletionRequest(prompt="hi", temperature=0.5, top_p=0.9, top_k=7, seed=3,
                             presence_penalty=0.1, frequency_penalty=0.2, penalty_decay=0.9,
                             stop="END")
    p = sampling_params(body, opts, chat=False)
    assert (p.temperature, p.top_p, p.top_k, p.seed) == (0.5, 0.9, 7, 3)
    assert (p.alpha_presence, p.alpha_frequency, p.alpha_decay) == (0.1, 0.2, 0.9)
    assert p.stop == ("END",)
    assert p.max_tokens == 100  # the default, capped by the server's limit
    e = _raises(sampling_params, CompletionRequest(prompt="x", max_tokens=101), opts,
                chat=False)
    assert (e.status, e.param) == (400, "max_tokens") and "SERVE_MAX_TOKENS" in e.message
    for stop in (["a"] * 5, [""], ["x" * 257]):
        assert _raises(sampling_params, CompletionRequest(prompt="x", stop=stop), opts,
                       chat=False).param == "stop"
    chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                       max_completion_tokens=9, stop=["END"])
    p = sampling_params(chat, opts, chat=True)
    assert p.max_tokens == 9  # max_completion_tokens wins over the older max_tokens
    assert p.stop == ("END",) + CHAT_STOP  # a chat reply also ends at its blank line
    chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=500)
    assert _raises(sampling_params, chat, opts, chat=True).param == "max_completion_tokens"
    # chat: a field the client leaves out takes CHAT_DEFAULTS, one it sends (0 too) wins;
    # a completion keeps the OpenAI defaults
    chat = ChatRequest(messages=[{"role": "user", "content": "hi"}], presence_penalty=0.0,
                       top_p=None)  # null = not sent
    p = sampling_params(chat, opts, chat=True)
    assert (p.alpha_presence, p.alpha_frequency) == (0.0, CHAT_DEFAULTS.alpha_frequency)
    assert (p.top_p, p.temperature) == (CHAT_DEFAULTS.top_p, CHAT_DEFAULTS.temperature)
    p = sampling_params(CompletionRequest(prompt="hi"), opts, chat=False)
    assert (p.top_p, p.temperature, p.alpha_presence, p.alpha_frequency, p.stop) == \
        (1.0, 1.0, 0.0, 0.0, ())


def _msgs(*pairs) -> list[ChatMessage]:
    return [ChatMessage(role=r, content=c) for r, c in pairs]


def test_chat_message_normalisation():
    msgs = _msgs(("developer", "Be brief."), ("system", "Use English."),
                 ("user", [{"type": "text", "text": "part one"},
                           {"type": "text", "text": "part two"}]),
                 ("user", "again"), ("assistant", "ok"), ("user", "bye"))
    assert chat_messages(msgs) == [
        {"role": "system", "content": "Be brief.\nUse English."},
        {"role": "user", "content": "part one\npart two\nagain"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "bye"}]
    # errors name the client's own index, counted before merging
    e = _raises(chat_messages, _msgs(("user", "a"), ("user", "b"), ("system", "s")))
    assert e.message.startswith("messages[2]: a system message after") and e.param == "messages"
    e = _raises(chat_messages, _msgs(("system", "s"), ("assistant", "a")))
    assert e.message.startswith("messages[1]: an assistant message before any user")
    e = _raises(chat_messages, _msgs(("user", "a"), ("assistant", "b"), ("assistant", "c")))
    assert e.message.startswith("messages[2]: the conversation ends with an assistant")
    assert _raises(chat_messages, _msgs(("system", "s"))).message.startswith(
        "messages: no user message")


def test_reply_shapes():
    c, t = Reply("m", chat=True), Reply("m", chat=False)
    assert c.id.startswith("chatcmpl-") and t.id.startswith("cmpl-") and c.id != Reply("m", True).id
    assert c.chunk("", None, role=True)["choices"][0]["delta"] == {"role": "assistant",
                                                                   "content": ""}
    assert c.chunk("", "stop")["choices"][0]["delta"] == {}
    assert c.chunk("hi", None)["choices"][0]["delta"] == {"content": "hi"}
    assert t.chunk("hi", None)["choices"][0]["text"] == "hi"
    assert c.chunk("x", None, usage_only=True)["choices"] == []
    u = {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    whole = c.final("hello", "length", u)
    assert whole["object"] == "chat.completion" and whole["usage"] == u
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hello"}
    assert t.final("hello", "stop", u)["object"] == "text_completion"


# ----------------------------------------------------------------------------- basics
def test_health_and_models(srv):
    r = httpx.get(srv.base + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    ids = [m.id for m in srv.client().models.list()]
    assert ids == ["tiny-test"]


def test_completion_matches_engine_stream_and_not(srv, parts):
    _, tok = parts
    c = srv.client()
    want, n = _direct(parts, tok.encode("Hello world"), temperature=0, max_tokens=6, top_p=1.0)
    r = c.completions.create(model="tiny-test", prompt="Hello world", max_tokens=6,
                             temperature=0)
    assert r.choices[0].text == want
    assert r.choices[0].finish_reason == ("length" if n == 6 else "stop")
    assert r.usage.prompt_tokens == len(tok.encode("Hello world"))
    assert r.usage.completion_tokens == n and r.usage.total_tokens == n + r.usage.prompt_tokens
    chunks = list(c.completions.create(model="x", prompt="Hello world", max_tokens=6,
                                       temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    # token-id prompts are accepted too
    r2 = c.completions.create(model="x", prompt=tok.encode("Hello world"), max_tokens=6,
                              temperature=0)
    assert r2.choices[0].text == want


def test_chat_matches_engine_stream_and_not(srv, parts):
    _, tok = parts
    c = srv.client()
    msgs = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say something."}]
    ids, _ = encode_chat_prompt(msgs, tok)
    # unsent sampling fields take the chat defaults (penalties on), as in infer / dashboard
    want, n = _direct(parts, ids, **vars(chat_params(temperature=0, max_tokens=8)))
    r = c.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=8,
                                  temperature=0)
    m = r.choices[0].message
    assert m.role == "assistant" and m.content == want.lstrip()
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == n
    assert r.choices[0].finish_reason in ("stop", "length")
    chunks = list(c.chat.completions.create(model="tiny-test", messages=msgs, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == m.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finals[-1] == r.choices[0].finish_reason and finals.count(None) == len(finals) - 1
    assert chunks[-1].usage.completion_tokens == n


def test_seed_stop_and_sampling_fields(srv, parts):
    c = srv.client()
    kw = dict(model="x", prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9,
              presence_penalty=0.5, frequency_penalty=0.5)
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    greedy = c.completions.create(model="x", prompt="Count", max_tokens=12,
                                  temperature=0).choices[0].text
    assert len(greedy) >= 4
    stop = greedy[2:4]
    r = c.completions.create(model="x", prompt="Count", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == greedy[: greedy.find(stop)]


# ----------------------------------------------------------------------------- safety
def test_api_key_required_when_set(parts):
    model, tok = parts
    with LiveServer(model, tok, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError):
            s.client("wrong").models.list()
        r = httpx.post(s.base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.base + "/health").status_code == 200
        assert httpx.get(s.base + "/openapi.json").status_code == 401  # the API's map too
        assert httpx.get(s.base + "/openapi.json",
                         headers={"Authorization": "Bearer s3cret"}).status_code == 200
        out = s.client("s3cret").completions.create(model="x", prompt="hi", max_tokens=2)
        assert out.usage.completion_tokens <= 2


def test_queue_full_answers_429(parts):
    model, tok = parts
    with LiveServer(model, tok, max_batch=1, max_queue=1) as s:
        def one(i: int) -> int:
            body = {"model": "x", "prompt": f"request {i}", "max_tokens": 400,
                    "temperature": 0, "stream": True}
            with httpx.stream("POST", s.base + "/v1/completions", json=body, timeout=60) as r:
                if r.status_code == 200:
                    for line in r.iter_lines():
                        if line.startswith("data: ") and '"finish_reason": null' in line:
                            break  # got going: enough to hold a slot, then disconnect
                else:
                    r.read()
                    assert r.json()["error"]["code"] == "queue_full"
                    assert r.headers["retry-after"] == "1"  # when to try again
                return r.status_code

        with ThreadPoolExecutor(6) as ex:
            codes = list(ex.map(one, range(6)))
        assert 200 in codes and 429 in codes, codes
        assert set(codes) <= {200, 429}
        with pytest.raises(openai.RateLimitError):
            # hold the only slot and the only queue place, then ask once more
            blockers = [s.engine.submit([1, 2, 3], SamplingParams(max_tokens=2000))]
            t0 = time.time()
            while s.engine.n_waiting and time.time() - t0 < 10:  # wait until it runs
                time.sleep(0.02)
            blockers.append(s.engine.submit([1, 2, 3], SamplingParams(max_tokens=2000)))
            try:
                s.client().completions.create(model="x", prompt="hi", max_tokens=1)
            finally:
                for h in blockers:
                    h.cancel()


@pytest.mark.parametrize("path,body,status,param", [
    ("/v1/completions", {"prompt": "hi", "temperature": 5}, 422, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": -0.1}, 422, "top_p"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 999999}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 3}, 422, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "seed": -1}, 422, "seed"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, 400, "n"),  # over max_batch (8)
    ("/v1/completions", {"prompt": "hi", "n": 0}, 422, "n"),
    ("/v1/completions", {"prompt": "hi", "min_p": 1.5}, 422, "min_p"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 422, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"70000": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "best_of": 2}, 400, "best_of"),
    ("/v1/completions", {"prompt": "hi", "mirostat_tau": 5}, 400, "mirostat_tau"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "reasoning_effort": "low"}, 400, "reasoning_effort"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "store": True}, 400, "store"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "mood": "ok"}]},
     400, "messages[0].mood"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": "bo"}]},
     400, "messages[0].name"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "logprobs": True, "top_logprobs": 21}, 422, "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "yaml"}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema"}}, 400,
     "response_format.json_schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_object"}, "stop": ["}"]},
     400, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tool_choice": "auto"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function", "function": {"name": "g"}}},
     400, "tool_choice"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": [70000]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "word " * 400}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 422, "logprobs"),
    ("/v1/completions", {"max_tokens": 3}, 422, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 422, "temperature"),
    ("/v1/chat/completions", {"messages": []}, 422, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 422,
     "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "  "}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x"}]}, 400,
     "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_completion_tokens": 10**6}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "max_tokens": 10**6}, 400, "max_tokens"),
])
def test_validation_names_the_field(srv, path, body, status, param):
    r = httpx.post(srv.base + path, json={"model": "x", **body})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and param.split(".")[0] in err["message"] + err["param"]


@pytest.mark.parametrize("messages, where", [
    ([{"role": "system", "content": "be nice"}], "messages: no user message"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
     "messages[1]: the conversation ends with an assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"role": "assistant", "content": "c"}, {"role": "assistant", "content": "d"}],
     "messages[3]: the conversation ends with an assistant message"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
     "messages[1]: a system message after the conversation started"),
    ([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
     "messages[1]: an assistant message before any user message"),
])
def test_chat_order_errors_name_the_clients_message(srv, messages, where):
    r = httpx.post(srv.base + "/v1/chat/completions",
                   json={"model": "x", "messages": messages, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(where), r.text


def test_null_fields_take_their_defaults(srv):
    """OpenAI clients send unset optional fields as null."""
    nulls = {k: None for k in ("temperature", "top_p", "top_k", "n", "presence_penalty",
                               "frequency_penalty", "penalty_decay", "stream", "seed", "stop",
                               "user", "stream_options", "max_tokens")}
    r = httpx.post(srv.base + "/v1/chat/completions", json={
        "model": "x", "messages": [{"role": "system", "content": "s"},
                                   {"role": "system", "content": "t"},
                                   {"role": "user", "content": "hi"}], **nulls,
        "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2
    r = httpx.post(srv.base + "/v1/completions", json={"model": "x", "prompt": "hi", **nulls,
                                                        "echo": None, "max_tokens": 1})
    assert r.status_code == 200, r.text


def test_chunked_body_over_the_limit_is_413(srv):
    from rwkvforge.serve import MAX_BODY_BYTES

    def chunks():
        yield b'{"model": "x", "prompt": "'
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 1):
            yield b"a" * (1 << 20)
        yield b'", "max_tokens": 1}'

    r = httpx.post(srv.base + "/v1/completions", content=chunks(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and "byte limit" in r.json()["error"]["message"]

    def small():  # a chunked body under the limit is served as before
        yield b'{"model": "x", "prompt": "hi", '
        yield b'"max_tokens": 1}'

    r = httpx.post(srv.base + "/v1/completions", content=small(),
                   headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text


def test_engine_refuses_a_zero_prefill_chunk(parts):
    model, tok = parts
    with pytest.raises(ValueError, match="prefill_chunk must be >= 1"):
        Engine(model, tok, prefill_chunk=0)


def test_unknown_paths_and_bodies_get_openai_error_objects(srv):
    r = httpx.get(srv.base + "/v1/nothing")
    assert r.status_code == 404 and "no such endpoint: GET /v1/nothing" in r.json()[
        "error"]["message"]
    r = httpx.get(srv.base + "/v1/completions")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(srv.base + "/v1/completions", content=b"prompt=hi",
                   headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 400 and "Content-Type: application/json" in r.json()["error"][
        "message"]


def test_malformed_json_is_400(srv):
    r = httpx.post(srv.base + "/v1/completions", content=b'{"prompt": "hi",',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_client_disconnect_cancels_generation(srv):
    body = {"model": "x", "prompt": "go on forever", "max_tokens": 2048, "temperature": 1.0}
    with httpx.stream("POST", srv.base + "/v1/completions", json={**body, "stream": True},
                      timeout=30) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 4:
                break
    t0 = time.time()
    while httpx.get(srv.base + "/health").json()["running"] and time.time() - t0 < 10:
        time.sleep(0.1)
    health = httpx.get(srv.base + "/health").json()
    assert health["running"] == 0 and health["waiting"] == 0
    # non-streaming: a client that times out also frees its slot
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.base + "/v1/completions", json=body, timeout=1.0)
    t0 = time.time()
    while httpx.get(srv.base + "/health").json()["running"] and time.time() - t0 < 10:
        time.sleep(0.1)
    assert httpx.get(srv.base + "/health").json()["running"] == 0


# ----------------------------------------------------------------------------- fuzz
def test_fuzz_openapi_no_server_errors(srv):
    """schemathesis generates requests from the server's own OpenAPI document (valid and
    invalid); none may produce a 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(srv.base + "/openapi.json")
    ops = [r.ok() for r in schema.get_all_operations()]
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions"}
    seen: list[int] = []
    for op in ops:
        if op.method.upper() != "POST":
            continue

        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def run(case) -> None:
            if isinstance(case.body, dict):  # keep generations short: this is about input
                case.body["max_tokens"] = 2
                case.body.pop("max_completion_tokens", None)
                case.body["stream"] = False
            resp = case.call(base_url=srv.base, timeout=30)
            seen.append(resp.status_code)
            assert resp.status_code < 500, (case.body, resp.text)

        run()
    assert any(c == 200 for c in seen) and any(c in (400, 422) for c in seen)


def test_fuzz_raw_bodies_no_server_errors(srv):
    """Hypothesis: arbitrary JSON values in every field of a chat request."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    leaf = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                     st.text(max_size=20))
    json_val = st.recursive(leaf, lambda c: st.one_of(st.lists(c, max_size=3),
                                                      st.dictionaries(st.text(max_size=8), c,
                                                                      max_size=3)), max_leaves=8)
    fields = st.fixed_dictionaries({}, optional={
        "messages": st.one_of(json_val, st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "assistant", "system", "x"]),
             "content": json_val}), max_size=3)),
        "temperature": json_val, "top_p": json_val, "stop": json_val, "seed": json_val,
        "presence_penalty": json_val, "stream": st.just(False), "prompt": json_val})

    with httpx.Client(base_url=srv.base, timeout=30) as cl:
        @settings(max_examples=60, deadline=None, database=None)
        @given(body=fields, path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
        def run(body, path) -> None:
            body["max_tokens"] = 2
            r = cl.post(path, content=json.dumps(body, allow_nan=True),
                        headers={"content-type": "application/json"})
            assert r.status_code < 500, (body, r.text)

        run()


# ----------------------------------------------------------------------------- load
@pytest.mark.slow
def test_load_32_streaming_clients_complete_and_memory_flat(parts):
    import psutil

    model, tok = parts
    proc = psutil.Process()
    with LiveServer(model, tok, max_batch=16, max_queue=64) as s:
        def client_loop(i: int, until: float) -> tuple[int, int]:
            done = bad = 0
            with httpx.Client(base_url=s.base, timeout=120) as cl:
                while time.time() < until:
                    body = {"model": "x", "prompt": f"client {i} says", "max_tokens": 8,
                            "temperature": 1.0, "seed": i, "stream": True}
                    with cl.stream("POST", "/v1/completions", json=body) as r:
                        lines = [ln for ln in r.iter_lines() if ln.startswith("data: ")]
                    finish = [json.loads(ln[6:])["choices"][0]["finish_reason"]
                              for ln in lines[:-1]]
                    ok = (r.status_code == 200 and lines and lines[-1] == "data: [DONE]"
                          and finish and finish[-1] in ("stop", "length"))
                    done += ok
                    bad += not ok
            return done, bad

        def burst(seconds: float) -> list[tuple[int, int]]:
            until = time.time() + seconds
            with ThreadPoolExecutor(32) as ex:
                return list(ex.map(lambda i: client_loop(i, until), range(32)))

        burst(3)  # warm-up: allocator pools, caches
        gc.collect()
        rss0 = proc.memory_info().rss
        res = burst(12)
        gc.collect()
        time.sleep(0.5)
        rss1 = proc.memory_info().rss
        assert sum(b for _, b in res) == 0
        assert all(d >= 1 for d, _ in res)  # every client got complete streams
        health = httpx.get(s.base + "/health").json()
        assert health["running"] == 0 and health["waiting"] == 0
        assert rss1 - rss0 < 64 * 2**20, f"RSS grew {(rss1 - rss0) / 2**20:.1f} MiB"
        assert s.engine.stats["decode_tokens"] > 0


def test_a_busy_port_is_found_before_the_model_loads():
    from rwkvforge.serve import port_unavailable

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert "in use" in port_unavailable("127.0.0.1", port)
    assert port_unavailable("127.0.0.1", _free_port()) is None


def test_half_sent_request_heads_time_out(parts):
    """A client that opens a connection and drips a request head (or sends nothing) is
    disconnected after --header-timeout; a prompt client on the same server is served, and a
    keep-alive connection gets a fresh deadline for its next request."""
    model, tok = parts
    with LiveServer(model, tok, header_timeout=1.0) as s:
        def closed_after(payloads: list[bytes], gap: float) -> float:
            with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
                t0 = time.time()
                try:
                    for p in payloads:
                        c.sendall(p)
                        time.sleep(gap)
                    while c.recv(4096):  # until the server closes it
                        pass
                except (ConnectionResetError, BrokenPipeError):
                    pass
                return time.time() - t0

        # dripping one header line every 0.3 s never completes the head: closed at ~1 s
        drip = [b"GET /health HTTP/1.1\r\n"] + [b"X-Slow: %d\r\n" % i for i in range(20)]
        took = closed_after(drip, 0.3)
        assert 0.8 < took < 4, took
        assert 0.8 < closed_after([], 0) < 4  # nothing sent at all
        # a whole request is answered, and the same connection may send a second one
        with socket.create_connection(("127.0.0.1", s.port), timeout=10) as c:
            for _ in range(2):
                c.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while not got.endswith(b"}"):  # the whole JSON answer (maybe 2 segments)
                    chunk = c.recv(4096)
                    assert chunk, got
                    got += chunk
                assert got.startswith(b"HTTP/1.1 200") and b'"status":"ok"' in got
        assert httpx.get(s.base + "/health").status_code == 200


@pytest.mark.slow
def test_sigterm_drains_open_streams_for_a_bounded_time(tiny_model_path):
    """A real `rwkvforge serve` process: SIGTERM stops it while a long stream is open; the
    stream may run on for --drain-seconds, then the server closes it and exits (it used to wait
    for every stream, however long)."""
    import signal
    import subprocess
    import sys

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RWKVFORGE_", "SERVE_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.Popen([sys.executable, "-m", "rwkvforge.serve", "--base-model",
                             str(tiny_model_path), "--serve-port", str(port),
                             "--drain-seconds", "2", "--serve-max-tokens", "200000",
                             "--log-level", "warning"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while True:  # wait for the model to load
            try:
                if httpx.get(base + "/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.time() < deadline
            time.sleep(0.5)
        body = {"model": "x", "prompt": "long", "max_tokens": 200000, "temperature": 1.0,
                "stream": True}
        chunks, t_term = 0, None
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        chunks += 1
                    if chunks == 3 and t_term is None:
                        proc.send_signal(signal.SIGTERM)
                        t_term = time.time()
        except httpx.HTTPError:
            pass  # the server closed the stream after the drain time: expected
        proc.wait(timeout=60)
        assert t_term is not None and chunks > 3  # the stream kept going after SIGTERM ...
        assert time.time() - t_term < 30  # ... for a bounded time, then the server exited
    finally:
        if proc.poll() is None:
            proc.kill()

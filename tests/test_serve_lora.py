"""Several LoRA adapters behind one server (`rwkvforge serve --lora-modules a=PATH b=PATH`):
the openai client against live servers on 127.0.0.1 with the tiny random model and two
random adapters. Each request, chosen by `model`, gets the tokens a server started with
only its adapter gives (and the merged model gives), also when requests for different
adapters decode in one batch; the base weights are held once; bad names are 404s.

    .venv/bin/python -m pytest tests/test_serve_lora.py -q
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from test_serve import LiveServer

from rwkvforge.adapter import (
    Adapter,
    LoraFactor,
    MultiLora,
    RowLoraLinear,
    load_with_adapter,
    save_peft_adapter,
)
from rwkvforge.checkpoint import load_model
from rwkvforge.generate import Engine
from rwkvforge.sampling import SamplingParams
from rwkvforge.serve import attach_adapters, parse_lora_modules
from rwkvforge.tokenizer import get_tokenizer

PROMPTS = ["The weather today is", "Once upon a time", "def main():", "Q: why? A:"]


def _random_adapter(model, seed: int, targets=("att.key", "att.value", "ffn.key")) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    factors = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.startswith("blocks.") and \
                any(name.endswith(t) for t in targets):
            out_f, in_f = mod.weight.shape
            factors[name + ".weight"] = LoraFactor(torch.randn(4, in_f, generator=g) * 0.3,
                                                   torch.randn(out_f, 4, generator=g) * 0.3,
                                                   scale=2.0)
    return Adapter(source=f"random-{seed}", kind="peft", factors=factors)


@pytest.fixture(scope="module")
def adapters(tiny_model_path, tmp_path_factory):
    base = load_model(tiny_model_path)
    root = tmp_path_factory.mktemp("adapters")
    return {name: str(save_peft_adapter(_random_adapter(base, seed), root / name))
            for name, seed in (("alpha", 1), ("beta", 2))}


def _server(tiny_model_path, loras: dict[str, str]) -> LiveServer:
    model = load_model(tiny_model_path)
    s = LiveServer(model, get_tokenizer(), max_batch=8)
    multi = attach_adapters(model, loras)
    s.opts.adapters = multi.names if multi is not None else {}
    return s


def _greedy(c: openai.OpenAI, model: str, prompt: str) -> str:
    return c.completions.create(model=model, prompt=prompt, max_tokens=10,
                                temperature=0).choices[0].text


def test_each_request_gets_its_adapters_tokens(tiny_model_path, adapters):
    tok = get_tokenizer()
    want: dict[str, dict[str, str]] = {}
    for name in adapters:  # servers with only that adapter
        with _server(tiny_model_path, {name: adapters[name]}) as s:
            want[name] = {p: _greedy(s.client(), name, p) for p in PROMPTS}
        merged = Engine(load_with_adapter(tiny_model_path, adapters[name]), tok)
        for p in PROMPTS:  # and the adapter merged into the weights gives the same tokens
            assert merged.generate_text(p, SamplingParams(temperature=0, max_tokens=10)) \
                == want[name][p]
    with _server(tiny_model_path, {}) as s:
        want["tiny-test"] = {p: _greedy(s.client(), "tiny-test", p) for p in PROMPTS}
    assert want["alpha"] != want["beta"] != want["tiny-test"]  # the adapters do something

    with _server(tiny_model_path, adapters) as s:
        c = s.client()
        assert [m.id for m in c.models.list()] == ["tiny-test", "alpha", "beta"]
        assert c.models.retrieve("beta").parent == "tiny-test"
        jobs = [(m, p) for p in PROMPTS for m in ("alpha", "beta", "tiny-test")] * 2
        with ThreadPoolExecutor(8) as ex:  # different adapters in one decode batch
            got = list(ex.map(lambda mp: _greedy(c, *mp), jobs))
        for (m, p), text in zip(jobs, got):
            assert text == want[m][p], (m, p)
        r = c.completions.create(model="beta", prompt=PROMPTS[0], max_tokens=2)
        assert r.model == "beta"
        with pytest.raises(openai.NotFoundError) as e:
            c.completions.create(model="gamma", prompt="hi", max_tokens=1)
        assert "gamma" in str(e.value) and "alpha" in str(e.value)


def test_adapters_load_and_unload_while_serving(tiny_model_path, adapters):
    """--allow-runtime-lora: POST /v1/load_lora_adapter adds an adapter to a running server
    (listed, served with the same tokens as when given at start, while other requests keep
    decoding); /v1/unload_lora_adapter takes it away (404 afterwards); bad input is a 400 /
    404 / 409 naming the field; without the API key the routes answer 401."""
    model = load_model(tiny_model_path)
    multi = attach_adapters(model, {"alpha": adapters["alpha"]}, runtime=True)
    with _server(tiny_model_path, {"beta": adapters["beta"]}) as ref:
        want_beta = {p: _greedy(ref.client(), "beta", p) for p in PROMPTS}
    with LiveServer(model, get_tokenizer(), max_batch=8, api_key="k",
                    adapters=multi.names, lora_updates=multi) as s:
        c = s.client("k")
        auth = {"Authorization": "Bearer k"}
        with ThreadPoolExecutor(4) as ex:  # alpha keeps decoding while beta is loaded
            busy = [ex.submit(_greedy, c, "alpha", p) for p in PROMPTS * 2]
            r = httpx.post(s.base + "/v1/load_lora_adapter", headers=auth,
                           json={"lora_name": "beta", "lora_path": adapters["beta"]})
            assert r.status_code == 200, r.text
            alpha = [f.result() for f in busy]
        assert len(set(alpha)) >= 1 and [m.id for m in c.models.list()] == [
            "tiny-test", "alpha", "beta"]
        assert {p: _greedy(c, "beta", p) for p in PROMPTS} == want_beta
        bad = [({"lora_name": "beta", "lora_path": adapters["beta"]}, 409, "lora_name"),
               ({"lora_name": "gamma", "lora_path": "/nonexistent/x"}, 400, "lora_path"),
               ({"lora_name": "no spaces", "lora_path": adapters["beta"]}, 422, "lora_name")]
        for body, code, param in bad:
            r = httpx.post(s.base + "/v1/load_lora_adapter", headers=auth, json=body)
            assert r.status_code == code, r.text
            if param:
                assert r.json()["error"]["param"] == param
        assert httpx.post(s.base + "/v1/load_lora_adapter", json={
            "lora_name": "x", "lora_path": adapters["beta"]}).status_code == 401
        r = httpx.post(s.base + "/v1/unload_lora_adapter", headers=auth,
                       json={"lora_name": "beta"})
        assert r.status_code == 200, r.text
        assert [m.id for m in c.models.list()] == ["tiny-test", "alpha"]
        with pytest.raises(openai.NotFoundError):
            c.completions.create(model="beta", prompt="hi", max_tokens=1)
        assert httpx.post(s.base + "/v1/unload_lora_adapter", headers=auth,
                          json={"lora_name": "beta"}).status_code == 404
        assert not any(2 in w.factors for w in multi.wrapped.values())
        # loaded again: a fresh row index, same tokens
        r = httpx.post(s.base + "/v1/load_lora_adapter", headers=auth,
                       json={"lora_name": "beta", "lora_path": adapters["beta"]})
        assert r.json()["index"] == 3
        assert {p: _greedy(c, "beta", p) for p in PROMPTS} == want_beta


def test_an_adapter_in_use_is_not_unloaded(tiny_model_path, adapters):
    model = load_model(tiny_model_path)
    multi = attach_adapters(model, {"alpha": adapters["alpha"]}, runtime=True)
    with LiveServer(model, get_tokenizer(), max_batch=8, adapters=multi.names,
                    lora_updates=multi, max_tokens=100000) as s:
        # a stream that cannot end by itself soon: the end-of-text token is banned
        with httpx.stream("POST", s.base + "/v1/completions", json={
                "model": "alpha", "prompt": "long", "max_tokens": 100000, "stream": True,
                "temperature": 1.0, "logit_bias": {"0": -100}}, timeout=60) as stream:
            lines = stream.iter_lines()  # (kept: a dropped iterator closes the stream)
            assert '"choices"' in next(lines)
            r = httpx.post(s.base + "/v1/unload_lora_adapter", json={"lora_name": "alpha"})
            assert r.status_code == 409 and "still run" in r.json()["error"]["message"]
        assert "alpha" in multi.names  # the refused unload left it served


def test_runtime_lora_needs_an_api_key(tiny_model_path, capsys, monkeypatch):
    from test_serve import _free_port

    from rwkvforge.serve import main

    monkeypatch.delenv("SERVE_API_KEY", raising=False)
    assert main(["--base-model", str(tiny_model_path), "--allow-runtime-lora",
                 "--serve-port", str(_free_port())]) == 2
    assert "--allow-runtime-lora needs SERVE_API_KEY" in capsys.readouterr().err


def test_base_weights_are_held_once(tiny_model_path, adapters):
    model = load_model(tiny_model_path)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    multi = MultiLora(model)
    for name, path in adapters.items():
        multi.add(name, path)
    wrapped = [m for m in model.modules() if isinstance(m, RowLoraLinear)]
    assert wrapped and all(set(w.factors) == {1, 2} for w in wrapped)
    after = {n.replace(".base.", "."): p.data_ptr() for n, p in model.named_parameters()}
    assert after == before  # every base tensor is the same storage, none copied


def test_lora_modules_flag_parsing():
    assert parse_lora_modules(["a=/x", "b-2=/y/z"]) == {"a": "/x", "b-2": "/y/z"}
    for bad in (["a"], ["=x"], ["a="], ["a=1", "a=2"], ["bad name=x"]):
        assert isinstance(parse_lora_modules(bad), str), bad

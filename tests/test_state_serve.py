"""Tuned states behind one server (`rwkvforge serve --state-modules name=PATH`, next to
`--lora-modules`): the openai client against live servers on 127.0.0.1 with the tiny random
model. Two adapters and one state served at once give each request, chosen by `model`, the
tokens a server started with only that tuning gives (the state: `serve --state`), also when
they decode in one batch; the state's prefix cache stays apart from the base model's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from test_serve import LiveServer
from test_serve_lora import PROMPTS, _greedy, _random_adapter

from rwkvforge import state_tuning as ST
from rwkvforge.adapter import save_peft_adapter
from rwkvforge.checkpoint import load_model
from rwkvforge.serve import attach_adapters, parse_lora_modules
from rwkvforge.tokenizer import get_tokenizer


@pytest.fixture(scope="module")
def tunings(tiny_model_path, tmp_path_factory):
    """({adapter name: folder}, {state name: folder})."""
    base = load_model(tiny_model_path)
    root = tmp_path_factory.mktemp("tunings")
    loras = {name: str(save_peft_adapter(_random_adapter(base, seed), root / name))
             for name, seed in (("alpha", 1), ("beta", 2))}
    (root / "st").mkdir()
    g = torch.Generator().manual_seed(4)
    ST.save_state(root / "st", torch.randn(2, 2, 64, 64, generator=g) * 0.5, {})
    return loras, {"skill": str(root / "st")}


def _server(tiny_model_path, loras, states, state: str | None = None) -> LiveServer:
    model = load_model(tiny_model_path)
    ST.load_state_into(model, state)  # serve --state
    s = LiveServer(model, get_tokenizer(), max_batch=8)
    multi = attach_adapters(model, loras, states)
    s.opts.adapters = multi.names if multi is not None else {}
    return s


def test_two_adapters_and_a_state_match_their_solo_servers(tiny_model_path, tunings):
    loras, states = tunings
    want: dict[str, dict[str, str]] = {}
    for name, path in loras.items():
        with _server(tiny_model_path, {name: path}, {}) as s:
            want[name] = {p: _greedy(s.client(), name, p) for p in PROMPTS}
    with _server(tiny_model_path, {}, {}, state=states["skill"]) as s:
        want["skill"] = {p: _greedy(s.client(), "tiny-test", p) for p in PROMPTS}
    with _server(tiny_model_path, {}, {}) as s:
        want["tiny-test"] = {p: _greedy(s.client(), "tiny-test", p) for p in PROMPTS}
    assert want["skill"] != want["tiny-test"]  # the state does something

    with _server(tiny_model_path, loras, states) as s:
        c = s.client()
        assert [m.id for m in c.models.list()] == ["tiny-test", "alpha", "beta", "skill"]
        jobs = [(m, p) for p in PROMPTS for m in ("alpha", "skill", "beta", "tiny-test")] * 2
        with ThreadPoolExecutor(8) as ex:  # every tuning in one decode batch
            got = list(ex.map(lambda mp: _greedy(c, *mp), jobs))
        for (m, p), text in zip(jobs, got):
            assert text == want[m][p], (m, p)


def test_state_module_refusals(tiny_model_path, tunings, tmp_path):
    loras, states = tunings
    assert "--state-modules takes NAME=PATH" in parse_lora_modules(["x"], "--state-modules")
    model = load_model(tiny_model_path)
    with pytest.raises(ValueError, match="also a --lora-modules name"):
        attach_adapters(model, loras, {"alpha": states["skill"]})
    torch.save({"blocks.0.att.time_state": torch.zeros(2, 64, 64)}, tmp_path / "one.pth")
    with pytest.raises(ST.StateError, match="does not fit this model"):
        attach_adapters(load_model(tiny_model_path), {}, {"bad": str(tmp_path / "one.pth")})

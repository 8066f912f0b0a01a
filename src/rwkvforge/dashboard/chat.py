"""The Chat page's engine: load a base / merged .pth (optionally + a run's adapter) into the
built-in generator (rwkvforge.generate.Engine) and answer one prompt.

Adapters are merged into the base weights in memory, in fp32, by rwkvforge.adapter (the merge
`rwkvforge merge` verifies and writes); the dashboard never writes a file.
The prompt is encoded and sampled as `rwkvforge infer` and `rwkvforge serve` do it
(generate.encode_chat_prompt, generate.CHAT_DEFAULTS, the reply ends at its turn's end), so
an answer here is the answer a user gets there.

    python -c "from rwkvforge.dashboard.chat import *; \
e = load_engine(Path('models/base/rwkv7-tiny-demo.pth')); print(answer(e, ChatRequest('', 'Hi')))"
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from rwkvforge import config as cfgmod
from rwkvforge.adapter import load_with_adapter
from rwkvforge.generate import (CHAT_DEFAULTS, Engine, chat_params, chat_turn, encode_chat_prompt,
                               set_fast_path)
from rwkvforge.sampling import SamplingParams
from rwkvforge.state_tuning import load_state_into


@dataclass
class ChatRequest:
    """What the page asks; the other sampling values (top_k, penalties) are CHAT_DEFAULTS'."""

    system: str
    prompt: str
    max_tokens: int = 48
    temperature: float = CHAT_DEFAULTS.temperature
    top_p: float = CHAT_DEFAULTS.top_p
    seed: int = 42


@dataclass
class ChatAnswer:
    text: str
    n_tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0


def _workspace_fast() -> str:
    """INFER_FAST as the workspace's configs and environment set it (its default if they
    cannot be read: the page still answers)."""
    try:
        return cfgmod.resolve().settings.infer_fast
    except cfgmod.ConfigError:
        return cfgmod.Settings().infer_fast


def load_engine(model_path: Path, adapter_dir: Path | None = None,
                state: Path | None = None, fast: str | None = None) -> Engine:
    """An inline (no background thread) engine over the model at `model_path` (+ a PEFT-layout
    adapter folder, merged in memory in fp32; + a tuned initial state, state_tuning.py), on
    the CPU fast path `fast` (default: the workspace's INFER_FAST, as infer / serve). An
    incomplete adapter folder raises adapter.read_adapter's MergeError (which file is
    missing, what to pass instead), a bad state state_tuning.StateError."""
    from rwkvforge.tokenizer import get_tokenizer

    model = load_with_adapter(model_path, adapter_dir)
    load_state_into(model, state)
    model.eval()
    set_fast_path(model, fast if fast is not None else _workspace_fast(), "cpu")
    return Engine(model, get_tokenizer(), max_batch=2, cache_prompts=False)


def sampling(req: ChatRequest) -> SamplingParams:
    """The page's request -> SamplingParams: generate.chat_params (the chat defaults of infer
    and serve, the reply ends at its turn's end) with the page's own values."""
    return chat_params(temperature=req.temperature, top_p=req.top_p,
                       max_tokens=req.max_tokens, seed=req.seed)


def answer(engine: Engine, req: ChatRequest) -> ChatAnswer:
    """Generate one reply; the same seed gives the same sampling noise for base and tuned,
    so differences come from the weights."""
    import torch

    ids, _ = encode_chat_prompt(chat_turn(req.prompt, req.system), engine.tok)
    t0 = time.perf_counter()
    with torch.inference_mode():
        h = engine.generate(ids, sampling(req))
    text = h.result()
    return ChatAnswer(text=text.strip(), n_tokens=h.completion_tokens,
                      seconds=time.perf_counter() - t0)

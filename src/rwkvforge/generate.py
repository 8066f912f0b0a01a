"""Batched, stateful sampling for RWKV-7 with the `rwkv` pip package's PIPELINE semantics.

Purpose: everything between "a model and a tokenizer" and "text coming out", shared by the
inference CLI (`rwkvforge infer`), the OpenAI server (`rwkvforge serve`) and evaluation:

* `SamplingParams`: temperature, top_p, top_k, presence / frequency penalties with decay
  (PIPELINE_ARGS alpha_presence / alpha_frequency / alpha_decay), banned tokens, stop tokens,
  stop strings, max tokens, seed.
* `filter_probs_ref` / `sample_ref` / `PenaltyStateRef`: slow, obviously-correct one-row
  versions of the PIPELINE rules; `filter_probs_batch` / `sample_batch` / `apply_penalties`:
  the batched fast path. tests/test_generate.py holds them together.
* `sample_step` / `count_token`: one sampling step (bans, penalties, cut, draw; then the
  occurrence update), the one used by the engine and by infer.LoopRunner.
* `CHAT_DEFAULTS` / `chat_params` / `encode_chat_prompt` / `CHAT_STOP`: the one chat encoding
  (turn by turn, as training encodes it), the one end-of-reply rule and the one set of chat
  sampling defaults, for infer, serve and the dashboard.
* `TextStream`: bytes -> text (partial UTF-8 held back) with stop strings matched on the
  decoded text, across token boundaries, holding back text that could start a stop string.
* `PrefixCache`: LRU of (token prefix -> RNN state + last logits) so a shared system prompt
  is prefilled once.
* `Engine`: continuous batching (requests join the decode batch at the next step, finished
  ones leave), chunked prefill (a long prompt is fed `prefill_chunk` tokens per step, so
  running streams keep decoding), cancellation, a bounded queue; runs inline or in a
  background thread.

Example (what `rwkvforge infer` does):

    from rwkvforge.checkpoint import load_model
    from rwkvforge.tokenizer import get_tokenizer
    from rwkvforge.generate import Engine
    from rwkvforge.sampling import SamplingParams
    eng = Engine(load_model("models/base/rwkv7-tiny-demo.pth"), get_tokenizer())
    print(eng.generate_text("The capital of France is", SamplingParams(max_tokens=20)))


Deviations from PIPELINE, on purpose: top_p >= 1 means "no nucleus cut" (PIPELINE's
float32 cumsum can stay below 1.0 and silently turn top_p=1 into greedy); temperature 0 is
argmax; top_k keeps every token tied with the k-th probability; `seed` gives every request
its own torch.Generator, so its samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import codecs
import inspect
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from rwkvforge.model import graphs
from rwkvforge.sampling import (SamplingParams, count_token, request_generator, sample_step,
                                token_logprobs)
from rwkvforge.tokenizer import chat_segments


# ---- inference setup: device, dtype, fast path ---------------------------------------------------
FAST_PATHS = {"none": None, "int8": torch.int8, "bf16": torch.bfloat16}


def resolve_device_dtype(device: str, dtype: str) -> tuple[str, str]:
    """DEVICE (auto/cpu/cuda) and --dtype (auto/fp32/bf16/fp16) -> concrete names:
    auto = CUDA with fp16 when present, else CPU with fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("DEVICE=cuda but torch sees no CUDA GPU; use DEVICE=cpu or auto")
    if dtype == "auto":
        dtype = "fp16" if device == "cuda" else "fp32"
    return device, dtype


def set_fast_path(model: Any, fast: str, device: str) -> None:
    """INFER_FAST -> the model's `infer_dtype` (see RWKV7.infer_dtype): CPU kernels only;
    on CUDA the weights' own dtype (fp16 / bf16) is already the fast path. On CPU the model
    also takes its decode layout (RWKV7.use_decode_layout: same values, faster decode)."""
    if fast not in FAST_PATHS:
        raise ValueError(f"unknown INFER_FAST {fast!r}: use none, int8 or bf16")
    if fast != "none" and device != "cpu":
        print(f"[rwkvforge] INFER_FAST={fast} is a CPU path; on {device} it is not used",
              file=sys.stderr)
        fast = "none"
    model.infer_dtype = FAST_PATHS[fast]
    if device == "cpu" and hasattr(model, "use_decode_layout"):
        model.use_decode_layout()  # (in, out) matrices: faster one-row fp32 matmuls

# ---- Text: incremental UTF-8 + stop strings ------------------------------------------------------

class TextStream:
    """Turns token bytes into text safe to show now.

    `feed(b)` returns (text, stopped). Incomplete UTF-8 sequences wait for their next
    bytes; text that could be the beginning of a stop string is held back until it is
    known not to be one. When a stop string appears (also across token boundaries) the
    text before it is returned, `stopped` is True and the rest is dropped. `finish()`
    returns whatever is held back at the end of generation."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = [s for s in stops if s]
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False
        self.text = ""  # everything emitted so far

    def _emit(self, s: str) -> str:
        self.text += s
        return s

    def feed_text(self, new: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        buf = self._held + new
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return self._emit(buf[: min(hits)]), True
        hold = 0
        for s in self.stops:  # longest suffix of buf that is a proper prefix of a stop
            for k in range(min(len(s) - 1, len(buf)), hold, -1):
                if buf.endswith(s[:k]):
                    hold = k
                    break
        self._held = buf[len(buf) - hold:] if hold else ""
        return self._emit(buf[: len(buf) - hold]), False

    def feed(self, data: bytes) -> tuple[str, bool]:
        return self.feed_text(self._dec.decode(data, final=False))

    def finish(self) -> str:
        """End of generation: flush partial UTF-8 (as U+FFFD) and held-back text."""
        if self.stopped:
            return ""
        tail, stopped = self.feed_text(self._dec.decode(b"", final=True))
        if stopped:
            return tail
        rest, self._held = self._held, ""
        return tail + self._emit(rest)


# ---- RNN state helpers (any nesting of lists / tuples of tensors with batch on dim 0) ------------

def state_map(fn: Callable[..., torch.Tensor], *states: Any) -> Any:
    s0 = states[0]
    if isinstance(s0, torch.Tensor):
        return fn(*states)
    return type(s0)(state_map(fn, *parts) for parts in zip(*states))


def state_clone(state: Any) -> Any:
    return state_map(lambda t: t.clone(), state)


def state_cat(states: Sequence[Any]) -> Any:
    return state_map(lambda *ts: torch.cat(ts, dim=0), *states)


def state_select(state: Any, idx: torch.Tensor | list[int]) -> Any:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return state_map(lambda t: t.index_select(0, idx.to(t.device)), state)


def state_nbytes(state: Any) -> int:
    total = 0

    def acc(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    state_map(acc, state)
    return total


# ---- Prefix-state cache --------------------------------------------------------------------------

class PrefixCache:
    """LRU map from a token prefix to (state after it, logits of its last token).

    `lookup(tokens)` returns the longest cached prefix of `tokens` (copies, so callers may
    update them in place). Bounded by `max_bytes` of state + logits."""

    def __init__(self, max_bytes: int = 256 << 20, max_entries: int = 256):
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._d: OrderedDict[tuple[int, ...], tuple[Any, torch.Tensor, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._d)

    def put(self, tokens: Sequence[int], state: Any, logits: torch.Tensor,
            adapter: int = 0) -> None:
        key = (adapter,) + tuple(tokens)  # states of different adapters never mix
        if len(key) < 2:
            return
        st, lg = state_clone(state), logits.detach().clone()
        nb = state_nbytes(st) + lg.numel() * lg.element_size()
        if nb > self.max_bytes:
            return
        with self._lock:
            if key in self._d:
                self._bytes -= self._d.pop(key)[2]
            self._d[key] = (st, lg, nb)
            self._bytes += nb
            while self._d and (self._bytes > self.max_bytes or len(self._d) > self.max_entries):
                _, (_, _, b) = self._d.popitem(last=False)
                self._bytes -= b

    def lookup(self, tokens: Sequence[int], adapter: int = 0
               ) -> tuple[int, Any, torch.Tensor | None]:
        """-> (n, state, logits): the longest cached prefix tokens[:n] (n=0: none) computed
        with `adapter`."""
        key = (adapter,) + tuple(tokens)
        best: tuple[int, ...] | None = None
        with self._lock:
            for k in self._d:
                if len(k) <= len(key) and (best is None or len(k) > len(best)) \
                        and key[: len(k)] == k:
                    best = k
            if best is None:
                self.misses += 1
                return 0, None, None
            self._d.move_to_end(best)
            st, lg, _ = self._d[best]
            self.hits += 1
        return len(best) - 1, state_clone(st), lg.clone()


# ---- Chat prompts (World format) -----------------------------------------------------------------

# A World-format assistant turn ends with a blank line ("\n\n" never occurs inside a turn:
# tokenizer.clean_turn collapses it), so generation of a chat reply stops there.
CHAT_STOP = ("\n\n",)


@dataclass(frozen=True)
class ChatDefaults:
    """How a chat reply samples when the user sets nothing: one set for `rwkvforge infer`,
    the server's /v1/chat/completions and the dashboard's Chat page, so one model answers
    alike in all three. The values are RWKV's own chat demo for World models (ChatRWKV
    API_DEMO_CHAT.py): a narrow nucleus keeps a small model on topic, the penalties keep it
    from repeating itself."""

    temperature: float = 1.0
    top_p: float = 0.3
    top_k: int = 0
    alpha_presence: float = 0.5
    alpha_frequency: float = 0.5
    alpha_decay: float = 0.996


CHAT_DEFAULTS = ChatDefaults()


def chat_params(stop: Sequence[str] = (), **fields: Any) -> SamplingParams:
    """SamplingParams of a chat reply: CHAT_DEFAULTS, overridden by `fields`; the reply
    ends at `stop` and at CHAT_STOP (the end of the assistant's turn)."""
    return SamplingParams(**{**asdict(CHAT_DEFAULTS), **fields},
                          stop=tuple(stop) + CHAT_STOP)


def chat_turn(prompt: str, system: str = "") -> list[dict[str, str]]:
    """The messages of a one-turn chat: the system message (when not blank), the user's."""
    return ([{"role": "system", "content": system}] if system.strip() else []) + \
        [{"role": "user", "content": prompt}]


def encode_chat_prompt(messages: list[dict[str, str]], tokenizer: Any
                       ) -> tuple[list[int], list[int]]:
    """Token ids of `messages` + the "Assistant:" generation prompt, encoded turn by turn
    exactly as training encodes them (tokenizer.chat_segments), and the token offsets
    where turns end — cache points: the state after a shared system prompt or an earlier
    turn is computed once and reused by later requests."""
    # chat_segments wants a conversation ending with an assistant reply: add a dummy one
    # and drop its segment; the text is then exactly render_chat(messages).
    segs = chat_segments(list(messages) + [{"role": "assistant", "content": "x"}])[:-1]
    ids: list[int] = []
    ends: list[int] = []
    for text, _ in segs:
        ids += tokenizer.encode(text)
        ends.append(len(ids))
    return ids, ends


class LeadingSpaceStrip:
    """A chat reply starts after "Assistant:" with a space; drop leading whitespace of a
    streamed reply (what RWKV chat front-ends show)."""

    def __init__(self) -> None:
        self.started = False

    def __call__(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        return text


# ---- Requests and the engine ---------------------------------------------------------------------

class QueueFull(RuntimeError):
    """The engine's waiting queue is at its bound; try again later (HTTP 429)."""


@dataclass
class Event:
    """One streamed piece of a request: new text, and on the last event the reason."""

    text: str
    n_tokens: int  # completion tokens so far
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # what went wrong, when finish_reason == "error"
    # params.logprobs set: one (token, logprob, [(token, logprob) top]) per token generated
    # since the previous event (a token's text may arrive in a later event than it)
    logprobs: list[tuple[int, float, list[tuple[int, float]]]] | None = None


class Constraint:
    """What a grammar (serve's response_format / tool calls) gives the engine: the tokens
    allowed next, and is the text complete. The engine calls `allowed(V)` before each
    sample of a constrained stream, `advance(token)` after it; a stream whose constraint
    is `done()` finishes with "stop"."""

    def allowed(self, vocab_size: int) -> torch.Tensor:  # (V,) bool
        raise NotImplementedError

    def advance(self, token: int) -> bool:  # False: the token broke the grammar
        raise NotImplementedError

    def done(self) -> bool:
        raise NotImplementedError


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    cache_at: tuple[int, ...] = ()  # prompt lengths whose state should be cached
    on_event: Callable[[Event], None] | None = None
    id: int = 0
    # --- engine-owned progress ---
    fed: int = 0  # prompt tokens consumed by prefill
    state: Any = None
    logits: torch.Tensor | None = None
    generated: list[int] = field(default_factory=list)
    text: TextStream | None = None
    gen: torch.Generator | None = None
    cancelled: bool = False
    finish_reason: str | None = None
    cached_tokens: int = 0  # prompt tokens served from the prefix cache
    t_submit: float = 0.0
    t_first: float | None = None
    constraint: Constraint | None = None
    # n > 1: the other choices of one prompt; they wait in the leader and take a copy of
    # its state when its prefill ends (one prefill for all of them)
    followers: list[tuple["Request", "Handle"]] = field(default_factory=list)
    pending_lp: list = field(default_factory=list)  # logprobs not yet sent in an Event
    adapter: int = 0  # serve --lora-modules: which adapter this row uses (0 = base)


class Handle:
    """What `Engine.submit` returns: iterate it for `Event`s, or `result()` for the text."""

    def __init__(self, req: Request):
        self.req = req
        self._q: queue.Queue[Event] = queue.Queue()
        self.done = threading.Event()

    def _push(self, ev: Event) -> None:
        self._q.put(ev)
        if self.req.on_event is not None:
            self.req.on_event(ev)
        if ev.finish_reason is not None:
            self.done.set()

    def cancel(self) -> None:
        self.req.cancelled = True

    @property
    def prompt_tokens(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.req.generated)

    @property
    def finish_reason(self) -> str | None:
        return self.req.finish_reason

    def __iter__(self) -> Iterator[Event]:
        while True:
            ev = self._q.get()
            yield ev
            if ev.finish_reason is not None:
                return

    def result(self, timeout: float | None = None) -> str:
        if not self.done.wait(timeout):
            raise TimeoutError("generation did not finish in time")
        return self.req.text.text if self.req.text else ""


class Engine:
    """Continuous-batching generator over one model.

    model: `forward_hidden(idx (1,T), state) -> (hidden (1,T,C), state)`, `head`,
    `step(idx (B,), state) -> (logits (B,V), state)`, `init_state(B)`.
    tokenizer: `.decode_bytes(ids) -> bytes`, `.encode(str)`.

    Each `step()`: admit waiting requests (up to `max_batch` in flight), feed at most
    `prefill_chunk` prompt tokens (oldest prefilling request first), then decode one token
    for every stream that has finished prefill. Streams that finish leave the batch at
    once; a sampled stop token / stop string / max_tokens ends a stream."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 16,
                 prefill_chunk: int = 256, max_queue: int = 64,
                 cache: PrefixCache | None = None, device: str | torch.device = "cpu",
                 cache_prompts: bool = True):
        for name, v in (("max_batch", max_batch), ("prefill_chunk", prefill_chunk),
                        ("max_queue", max_queue)):
            if v < 1:  # 0 would leave every request waiting forever
                raise ValueError(f"Engine: {name} must be >= 1, got {v}")
        self.model = model
        self.tok = tokenizer
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.max_queue = max_queue
        self.cache = cache if cache is not None else PrefixCache()
        self.cache_prompts = cache_prompts
        self.device = torch.device(device)
        self.vocab_size = int(model.head.weight.shape[0])
        self._waiting: deque[tuple[Request, Handle]] = deque()
        self._prefilling: list[tuple[Request, Handle]] = []
        self._decoding: list[tuple[Request, Handle]] = []
        self._dec_state: Any = None  # batched state of the decoding streams, row i = i-th
        # the engine owns _dec_state (built by state_cat / state_select, cached copies are
        # clones), so a model that can update it in place may (RWKV7.step's `inplace`)
        self._step_kw = {"inplace": True} if "inplace" in inspect.signature(
            model.step).parameters else {}
        # on CUDA, the decode step replayed from a CUDA graph per batch size (model/graphs.py);
        # not with per-row adapters, which switch in Python at every step
        self._graphed = graphs.GraphedStep(model) if self.device.type == "cuda" \
            and graphs.enabled() and not hasattr(model, "rows_adapters") else None
        self._occ: torch.Tensor | None = None  # (B,V) decayed occurrence counts
        self._seen: torch.Tensor | None = None  # (B,V) bool
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._next_id = 0
        self.error: BaseException | None = None
        self.stats = {"steps": 0, "decode_tokens": 0, "prefill_tokens": 0}

    # ---- public API ------------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], params: SamplingParams, *,
               cache_at: Sequence[int] = (), on_event: Callable[[Event], None] | None = None,
               constraint: Constraint | None = None, adapter: int = 0) -> Handle:
        """Queue a request; raises QueueFull when `max_queue` requests already wait."""
        return self.submit_group(prompt_ids, [params], cache_at=cache_at,
                                 on_events=[on_event], constraints=[constraint],
                                 adapter=adapter)[0]

    def submit_group(self, prompt_ids: Sequence[int], params: Sequence[SamplingParams], *,
                     cache_at: Sequence[int] = (),
                     on_events: Sequence[Callable[[Event], None] | None] | None = None,
                     constraints: Sequence[Constraint | None] | None = None,
                     adapter: int = 0) -> list[Handle]:
        """Queue len(params) streams of one prompt (OpenAI `n`): the prompt is prefilled
        once and each stream starts from a copy of its state; they join the batch together
        (so n may not pass max_batch). One handle per stream; QueueFull as `submit`."""
        n = len(params)
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"sampling parameter n={n}: must be 1 to max_batch "
                             f"({self.max_batch})")
        for p in params:
            p.validate(self.vocab_size)
        on_events = list(on_events or [None] * n)
        constraints = list(constraints or [None] * n)
        ids = [int(t) for t in prompt_ids] or [0]  # an empty prompt starts a new document
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token {bad[0]} outside the vocabulary "
                             f"[0, {self.vocab_size})")
        cache = tuple(sorted(set(c for c in cache_at if 0 < c <= len(ids))))
        with self._cv:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests already waiting "
                                f"(max_queue={self.max_queue})")
            pairs = []
            for p, cb, c in zip(params, on_events, constraints):
                self._next_id += 1
                req = Request(ids, p, cache, cb, id=self._next_id,
                              t_submit=time.perf_counter(), constraint=c, adapter=adapter)
                pairs.append((req, Handle(req)))
            pairs[0][0].followers = pairs[1:]
            self._waiting.append(pairs[0])
            self._cv.notify_all()
        return [h for _, h in pairs]

    @property
    def n_waiting(self) -> int:
        return len(self._waiting)

    @property
    def n_active(self) -> int:
        return len(self._prefilling) + len(self._decoding) + \
            sum(len(r.followers) for r, _ in self._prefilling)

    def idle(self) -> bool:
        return not (self._waiting or self._prefilling or self._decoding)

    def adapter_users(self, adapter: int) -> int:
        """Requests waiting or running with `adapter` (serve's unload route needs 0)."""
        with self._cv:
            return sum(r.adapter == adapter
                       for r, _ in (*self._waiting, *self._prefilling, *self._decoding))

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 on_text: Callable[[str], None] | None = None,
                 cache_at: Sequence[int] = ()) -> Handle:
        """Run one request to completion (inline when no background thread runs)."""
        cb = (lambda ev: ev.text and on_text(ev.text)) if on_text else None
        h = self.submit(prompt_ids, params, on_event=cb, cache_at=cache_at)
        if self._thread is None:
            while not h.done.is_set():
                self.step()
        else:
            h.done.wait()
        return h

    def generate_text(self, prompt: str, params: SamplingParams | None = None) -> str:
        return self.generate(self.tok.encode(prompt), params or SamplingParams()).result()

    def run_until_idle(self) -> None:
        while not self.idle():
            self.step()

    def start(self) -> "Engine":
        """Run `step()` in a daemon thread until `stop()`."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._loop, name="rwkvforge-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ---- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cv:
                    while not self._stop and self.idle():
                        self._cv.wait(0.5)
                    if self._stop:
                        break
                try:
                    self.step()
                except BaseException as e:  # noqa: BLE001 - keep serving; fail only the requests in flight
                    self.error = e
                    self._fail_all(f"{type(e).__name__}: {e}")

    def _fail_all(self, msg: str) -> None:
        for req, h in self._prefilling + self._decoding:
            for r, hh in [(req, h)] + req.followers:
                self._finish(r, hh, "error", extra=msg)
        self._prefilling, self._decoding = [], []
        self._dec_state, self._occ, self._seen = None, None, None

    @torch.inference_mode()
    def step(self) -> None:
        self.stats["steps"] += 1
        self._admit()
        self._drop_cancelled()
        if self._prefilling:
            self._prefill()
        if self._decoding:
            self._decode()

    def _admit(self) -> None:
        with self._cv:
            while self._waiting and (self.n_active + 1 + len(self._waiting[0][0].followers)
                                     <= self.max_batch):
                req, h = self._waiting.popleft()
                group = [(req, h)] + req.followers
                if all(r.cancelled for r, _ in group):
                    for r, hh in group:
                        self._finish(r, hh, "cancelled")
                    continue
                for r, _ in group:
                    self._start(r)
                n, st, lg = self.cache.lookup(req.prompt_ids, req.adapter)
                if n:
                    req.fed, req.state, req.logits, req.cached_tokens = n, st, lg, n
                self._prefilling.append((req, h))

    def _start(self, req: Request) -> None:
        p = req.params
        req.gen = request_generator(p.seed)
        req.text = TextStream(p.stop)

    def _drop_cancelled(self) -> None:
        keep = []
        for req, h in self._prefilling:
            if all(r.cancelled for r, _ in [(req, h)] + req.followers):
                for r, hh in [(req, h)] + req.followers:
                    self._finish(r, hh, "cancelled")
            else:
                keep.append((req, h))  # a cancelled leader still prefills for its followers
        self._prefilling = keep
        if any(r.cancelled for r, _ in self._decoding):
            self._leave([i for i, (r, _) in enumerate(self._decoding) if r.cancelled],
                        "cancelled")

    # ---- prefill ---------------------------------------------------------------------------------
    def _prefill(self) -> None:
        """Feed up to `prefill_chunk` prompt tokens in this step, oldest request first (a
        long prompt takes several steps; several short ones share one step)."""
        budget = self.prefill_chunk
        while self._prefilling and budget > 0:
            req, h = self._prefilling[0]
            budget -= self._prefill_piece(req, budget)
            if req.fed < len(req.prompt_ids):
                return
            self._prefilling.pop(0)
            for f, _ in req.followers:  # n > 1: the other choices start from this state
                f.fed, f.cached_tokens = req.fed, req.cached_tokens
                f.state, f.logits = state_clone(req.state), req.logits.clone()
            group, req.followers = [(req, h)] + req.followers, []
            for r, rh in group:
                if r.cancelled:
                    self._finish(r, rh, "cancelled")
                else:
                    self._join(r, rh)

    def _prefill_piece(self, req: Request, budget: int) -> int:
        ids = req.prompt_ids
        end = min(len(ids), req.fed + budget)
        for c in req.cache_at:  # stop the chunk at a cache point so its state can be saved
            if req.fed < c < end:
                end = c
                break
        n = end - req.fed
        if n > 0:
            x = torch.tensor([ids[req.fed:end]], dtype=torch.long, device=self.device)
            with self._rows([req.adapter]):  # (a state module's row starts from its state)
                if req.state is None:
                    req.state = self.model.init_state(1, device=self.device)
                hidden, req.state = self.model.forward_hidden(x, req.state)  # (1,T,C)
                req.logits = self.model.head(hidden[:, -1]).float()[0]  # (V,)
            self.stats["prefill_tokens"] += n
            req.fed = end
            if end in req.cache_at or (self.cache_prompts and end == len(ids)):
                self.cache.put(ids[:end], req.state, req.logits, req.adapter)
        return n

    # ---- decode ----------------------------------------------------------------------------------
    def _join(self, req: Request, h: Handle) -> None:
        """Prefill finished: sample the first token from the prompt's logits and add the
        stream to the decode batch (or finish it right away)."""
        V = self.vocab_size
        occ = torch.zeros(1, V)
        seen = torch.zeros(1, V, dtype=torch.bool)
        if req.params.max_tokens == 0:
            self._finish(req, h, "length")
            return
        tok = self._sample([req], req.logits[None], occ, seen)[0]
        if self._emit(req, h, tok, occ[0], seen[0]):
            return
        self._decoding.append((req, h))
        self._dec_state = req.state if self._dec_state is None else \
            state_cat([self._dec_state, req.state])
        self._occ = occ if self._occ is None else torch.cat([self._occ, occ])
        self._seen = seen if self._seen is None else torch.cat([self._seen, seen])
        req.state, req.logits = None, None

    def _decode(self) -> None:
        reqs = [r for r, _ in self._decoding]
        idx = torch.tensor([r.generated[-1] for r in reqs], dtype=torch.long,
                           device=self.device)
        with self._rows([r.adapter for r in reqs]):
            logits, self._dec_state = self._graphed.step(idx, self._dec_state) \
                if self._graphed is not None else \
                self.model.step(idx, self._dec_state, **self._step_kw)  # (B,V)
        toks = self._sample(reqs, logits, self._occ, self._seen)
        self.stats["decode_tokens"] += len(reqs)
        done = [i for i, ((r, h), t) in enumerate(zip(self._decoding, toks))
                if self._emit(r, h, t, self._occ[i], self._seen[i])]
        if done:
            self._leave(done, None)

    def _leave(self, rows: list[int], reason: str | None) -> None:
        """Remove finished / cancelled rows from the decode batch."""
        if reason is not None:
            for i in rows:
                r, h = self._decoding[i]
                self._finish(r, h, reason)
        keep = [i for i in range(len(self._decoding)) if i not in set(rows)]
        self._decoding = [self._decoding[i] for i in keep]
        if keep:
            self._dec_state = state_select(self._dec_state, keep)
            self._occ, self._seen = self._occ[keep], self._seen[keep]
        else:
            self._dec_state, self._occ, self._seen = None, None, None

    def _rows(self, adapters: list[int]) -> Any:
        """Context in which the model runs each batch row with its own adapter (see
        serve.MultiLora); a no-op for a model without `rows_adapters`."""
        ctx = getattr(self.model, "rows_adapters", None)
        return ctx(adapters) if ctx is not None else _NullCtx()

    def _sample(self, reqs: list[Request], logits: torch.Tensor, occ: torch.Tensor,
                seen: torch.Tensor) -> list[int]:
        V = logits.shape[-1]
        allowed = None
        if any(r.constraint is not None for r in reqs):
            allowed = torch.ones(len(reqs), V, dtype=torch.bool)
            for i, r in enumerate(reqs):
                if r.constraint is not None:
                    allowed[i] = r.constraint.allowed(V)
        toks = sample_step(logits, [r.params for r in reqs], [r.gen for r in reqs], occ,
                           seen, allowed)
        want = [i for i, r in enumerate(reqs) if r.params.logprobs is not None]
        if want:
            k = max(reqs[i].params.logprobs or 0 for i in want)
            got = token_logprobs(logits[want], [toks[i] for i in want], k)
            for i, (lp, top) in zip(want, got):
                reqs[i].pending_lp.append((toks[i], lp, top[: reqs[i].params.logprobs]))
        return toks

    def _emit(self, req: Request, h: Handle, tok: int, occ: torch.Tensor,
              seen: torch.Tensor) -> bool:
        """Record a sampled token; returns True when the request is finished."""
        p = req.params
        if req.t_first is None:
            req.t_first = time.perf_counter()
        if tok in p.token_stop:
            req.pending_lp.clear()  # the end-of-text token is not part of the reply
            self._finish(req, h, "stop")
            return True
        req.generated.append(tok)
        count_token(p, tok, occ, seen, self.tok)
        if req.constraint is not None and not req.constraint.advance(tok):
            self._finish(req, h, "error", extra=f"token {tok} broke the grammar")
            return True
        text, stopped = req.text.feed(self.tok.decode_bytes([tok]))
        if stopped or (req.constraint is not None and req.constraint.done()):
            if text:
                h._push(self._event(req, text))
            self._finish(req, h, "stop")
            return True
        if len(req.generated) >= p.max_tokens:
            if text:
                h._push(self._event(req, text))
            self._finish(req, h, "length")
            return True
        if text:
            h._push(self._event(req, text))
        return False

    @staticmethod
    def _event(req: Request, text: str, reason: str | None = None,
               error: str | None = None) -> Event:
        lp = None
        if req.params.logprobs is not None:
            lp, req.pending_lp = req.pending_lp, []
        return Event(text, len(req.generated), reason, error=error, logprobs=lp)

    def _finish(self, req: Request, h: Handle, reason: str, extra: str = "") -> None:
        if req.finish_reason is not None:
            return
        tail = req.text.finish() if (req.text is not None and reason != "cancelled") else ""
        req.finish_reason = reason
        req.state, req.logits = None, None
        h._push(self._event(req, tail, reason, error=extra or None))


class _NullCtx:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None

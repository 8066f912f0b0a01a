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
    from rwkvforge.generate import Engine, SamplingParams
    eng = Engine(load_model("models/base/rwkv7-tiny-demo.pth"), get_tokenizer())
    print(eng.generate_text("The capital of France is", SamplingParams(max_tokens=20)))


Deviations from PIPELINE, on purpose: top_p >= 1 means "no nucleus cut" (PIPELINE's
float32 cumsum can stay below 1.0 and silently turn top_p=1 into greedy); temperature 0 is
argmax; top_k keeps every token tied with the k-th probability; `seed` gives every request
its own torch.Generator, so its samples do not depend on what else is in the batch.
"""

from __future__ import annotations

import codecs
import math
import queue
import sys
import threading
import time
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from rwkvforge.tokenizer import chat_segments


# ---- inference setup: device, dtype, fast path ----------------------------------------------
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
    on CUDA the weights' own dtype (fp16 / bf16) is already the fast path."""
    if fast not in FAST_PATHS:
        raise ValueError(f"unknown INFER_FAST {fast!r}: use none, int8 or bf16")
    if fast != "none" and device != "cpu":
        print(f"[rwkvforge] INFER_FAST={fast} is a CPU path; on {device} it is not used",
              file=sys.stderr)
        fast = "none"
    model.infer_dtype = FAST_PATHS[fast]

# A token's text that matches one of these gets occurrence weight 0 (presence penalty only,
# no frequency growth): PIPELINE's `ttt in ' \t0123456789'` rule (a substring test).
_NO_FREQ_TEXT = " \t0123456789"
# Candidates examined by the fast top-p path before falling back to a full sort.
_TOPP_CANDIDATES = 512


# --------------------------------------------------------------------------------------
# Sampling parameters
# --------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    """How one request samples. Defaults follow the rwkv PIPELINE_ARGS except the
    penalties, which default to 0 like the OpenAI API."""

    temperature: float = 1.0  # 0 = greedy; applied after the top-p / top-k cut (PIPELINE)
    top_p: float = 0.85  # nucleus; >= 1 keeps every token
    top_k: int = 0  # 0 = off
    alpha_presence: float = 0.0  # subtracted once a token has appeared
    alpha_frequency: float = 0.0  # subtracted per (decayed) occurrence
    alpha_decay: float = 0.996  # occurrences decay by this per generated token
    token_ban: tuple[int, ...] = ()  # never sampled
    token_stop: tuple[int, ...] = (0,)  # end generation when sampled (not emitted)
    stop: tuple[str, ...] = ()  # end generation when the decoded text contains one
    max_tokens: int = 128
    seed: int | None = None  # None: a fresh random seed
    min_p: float = 0.0  # drop tokens below min_p * the top probability (before temperature)
    # seen tokens: positive logits / rp, negative * rp (HF / vLLM rule), over this reply only
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token, bias) added to the logits
    logprobs: int | None = None  # report the chosen token's log-prob and this many top ones

    @property
    def logit_bias_dict(self) -> dict[int, float]:
        return dict(self.logit_bias)

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the field when a value is out of range."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"sampling parameter {name}={getattr(self, name)!r}: {why}")

        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            bad("temperature", "must be a finite number >= 0")
        if not (math.isfinite(self.top_p) and 0 <= self.top_p <= 1):
            bad("top_p", "must be in [0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = off)")
        for name in ("alpha_presence", "alpha_frequency"):
            if not math.isfinite(getattr(self, name)):
                bad(name, "must be finite")
        if not (0 <= self.alpha_decay <= 1):
            bad("alpha_decay", "must be in [0, 1]")
        if self.max_tokens < 0:
            bad("max_tokens", "must be >= 0")
        if not (math.isfinite(self.min_p) and 0 <= self.min_p <= 1):
            bad("min_p", "must be in [0, 1]")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            bad("logprobs", "must be in [0, 20]")
        for _, b in self.logit_bias:
            if not (math.isfinite(b) and -100 <= b <= 100):
                bad("logit_bias", "biases must be in [-100, 100]")
        if vocab_size is not None:
            for name in ("token_ban", "token_stop"):
                for t in getattr(self, name):
                    if not 0 <= t < vocab_size:
                        bad(name, f"token {t} outside the vocabulary [0, {vocab_size})")
            for t, _ in self.logit_bias:
                if not 0 <= t < vocab_size:
                    bad("logit_bias", f"token {t} outside the vocabulary [0, {vocab_size})")
        if any(s == "" for s in self.stop):
            bad("stop", "stop strings must be non-empty")
        return self

    @property
    def uses_penalties(self) -> bool:
        return self.alpha_presence != 0 or self.alpha_frequency != 0 or \
            self.repetition_penalty != 1


def token_occurrence_weights(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """(V,) float: the occurrence weight PIPELINE adds when token t is generated — 0 for
    tokens whose text is a substring of ' \\t0123456789' (spaces, digits), else 1."""
    w = torch.ones(vocab_size, dtype=torch.float32)
    for t in range(vocab_size):
        try:
            text = tokenizer.decode([t])
        except Exception:  # ids with no text in a smaller test vocab
            continue
        if text in _NO_FREQ_TEXT:
            w[t] = 0.0
    return w


# --------------------------------------------------------------------------------------
# Reference sampler: one row, written for clarity (tests compare the fast path to it)
# --------------------------------------------------------------------------------------

def filter_probs_ref(logits: torch.Tensor, temperature: float, top_p: float,
                     top_k: int, min_p: float = 0.0) -> torch.Tensor:
    """The PIPELINE sampling distribution for one row of logits (V,), as float32 probs
    summing to 1: softmax, nucleus cut at top_p, top_k cut, min_p cut (tokens below
    min_p * the top probability), then probs ** (1/T)."""
    probs = torch.softmax(logits.float(), dim=-1)  # (V,)
    if temperature == 0:  # greedy
        out = torch.zeros_like(probs)
        out[int(torch.argmax(probs))] = 1.0
        return out
    if top_p < 1:
        desc = torch.sort(probs, descending=True).values
        cum = torch.cumsum(desc, dim=0)
        reached = (cum >= top_p).nonzero()
        first = int(reached[0]) if len(reached) else len(desc) - 1
        cutoff = desc[first]
        probs = torch.where(probs < cutoff, torch.zeros_like(probs), probs)
    if 0 < top_k < probs.numel():
        kth = torch.sort(probs, descending=True).values[top_k - 1]
        probs = torch.where(probs < kth, torch.zeros_like(probs), probs)
    if min_p > 0:
        probs = torch.where(probs < min_p * probs.max(), torch.zeros_like(probs), probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return probs / probs.sum()


def pick_ref(probs: torch.Tensor, u: float) -> int:
    """Inverse-CDF draw: the first token whose cumulative probability exceeds u * total."""
    cum = torch.cumsum(probs, dim=0)
    idx = int(torch.searchsorted(cum, torch.tensor([u * float(cum[-1])]), right=True)[0])
    idx = min(idx, probs.numel() - 1)
    while probs[idx] == 0 and idx > 0:  # u*total landed exactly on a trailing zero run
        idx -= 1
    return idx


def sample_ref(logits: torch.Tensor, params: SamplingParams, u: float) -> int:
    if params.temperature == 0:
        return int(torch.argmax(logits))
    return pick_ref(filter_probs_ref(logits, params.temperature, params.top_p,
                                     params.top_k, params.min_p), u)


class PenaltyStateRef:
    """PIPELINE's `occurrence` dict for one stream, verbatim in spirit: penalise every
    token seen (presence + count * frequency), decay the counts each generated token."""

    def __init__(self, params: SamplingParams, weights: torch.Tensor):
        self.p = params
        self.weights = weights
        self.occurrence: dict[int, float] = {}

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone().float()
        for t, b in self.p.logit_bias:
            logits[t] += b
        for t in self.p.token_ban:
            logits[t] = -float("inf")
        rp = self.p.repetition_penalty
        for t, n in self.occurrence.items():
            if rp != 1:
                logits[t] = logits[t] / rp if logits[t] > 0 else logits[t] * rp
            logits[t] -= self.p.alpha_presence + n * self.p.alpha_frequency
        return logits

    def update(self, token: int) -> None:
        for t in self.occurrence:
            self.occurrence[t] *= self.p.alpha_decay
        self.occurrence[token] = self.occurrence.get(token, 0.0) + float(self.weights[token])


# --------------------------------------------------------------------------------------
# Fast path: a batch of rows, each with its own parameters
# --------------------------------------------------------------------------------------

def filter_probs_batch(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       top_k: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Batched `filter_probs_ref`: logits (B,V), temperature / top_p (B,) float,
    top_k (B,) long -> probs (B,V) float32, each row normalised.

    The nucleus cutoff is found among the top `_TOPP_CANDIDATES` probabilities (a partial
    sort); only rows whose nucleus is wider than that fall back to a full sort. The values
    and their order are those of the full sort, so the cutoff is the same number."""
    B, V = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (B,V)
    greedy = temperature == 0  # (B,)
    cut = torch.zeros(B, dtype=probs.dtype)
    need_p = (top_p < 1) & ~greedy
    need_k = (top_k > 0) & (top_k < V) & ~greedy
    if bool(need_p.any()) or bool(need_k.any()):
        kmax = int(top_k[need_k].max()) if bool(need_k.any()) else 0
        K = min(V, max(_TOPP_CANDIDATES, kmax))
        vals = torch.topk(probs, K, dim=-1, sorted=True).values  # (B,K) descending
        if bool(need_p.any()):
            cum = torch.cumsum(vals, dim=-1)  # (B,K) non-decreasing
            # first position where the running mass reaches top_p (K = not within the top K)
            first = torch.searchsorted(cum, top_p[:, None].to(cum.dtype))[:, 0]  # (B,)
            cut_p = vals.gather(1, first.clamp(max=K - 1)[:, None])[:, 0]
            wide = need_p & (first >= K)
            if bool(wide.any()):  # nucleus wider than K: one batched full sort of those rows
                rows = torch.nonzero(wide).flatten()
                desc = torch.sort(probs[rows], dim=-1, descending=True).values  # (R,V)
                c = torch.cumsum(desc, dim=-1)
                f = torch.searchsorted(c, top_p[rows][:, None].to(c.dtype))[:, 0]
                cut_p[rows] = desc.gather(1, f.clamp(max=V - 1)[:, None])[:, 0]
            cut = torch.where(need_p, cut_p, cut)
        if bool(need_k.any()):
            kidx = (top_k.clamp(1, K) - 1)[:, None]
            cut_k = vals.gather(1, kidx)[:, 0]
            cut = torch.where(need_k, torch.maximum(cut, cut_k), cut)
        probs = torch.where(probs < cut[:, None], torch.zeros_like(probs), probs)
    if min_p is not None and bool((min_p > 0).any()):
        floor = min_p.to(probs.dtype) * probs.max(dim=-1).values  # (B,)
        probs = torch.where(probs < floor[:, None], torch.zeros_like(probs), probs)
    temp = torch.where(greedy, torch.ones_like(temperature), temperature).float()
    if bool((temp != 1).any()):
        probs = probs ** (1.0 / temp)[:, None]
    probs = probs / probs.sum(dim=-1, keepdim=True)
    if bool(greedy.any()):
        onehot = torch.zeros_like(probs)
        onehot.scatter_(1, probs.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(greedy[:, None], onehot, probs)
    return probs


def sample_batch(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                 top_k: torch.Tensor, u: torch.Tensor,
                 min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits (B,V) -> tokens (B,) long, one uniform draw u (B,) per row (inverse CDF,
    the same rule as `pick_ref`). Greedy rows take the argmax of the raw logits."""
    greedy = temperature == 0
    if bool(greedy.all()):
        return logits.argmax(dim=-1)
    probs = filter_probs_batch(logits, temperature, top_p, top_k, min_p)  # (B,V)
    cum = torch.cumsum(probs, dim=-1)  # (B,V)
    target = (u.to(cum.dtype) * cum[:, -1])[:, None]
    idx = torch.searchsorted(cum, target, right=True)[:, 0].clamp_(max=probs.shape[1] - 1)
    # a draw that lands on the exact end of the mass may point at a zero-probability tail
    zero = probs.gather(1, idx[:, None])[:, 0] == 0
    for b in torch.nonzero(zero).flatten().tolist():
        nz = torch.nonzero(probs[b, : int(idx[b]) + 1]).flatten()
        idx[b] = nz[-1] if len(nz) else probs[b].argmax()
    return torch.where(greedy, logits.argmax(dim=-1), idx)


def apply_penalties(logits: torch.Tensor, occurrence: torch.Tensor, seen: torch.Tensor,
                    alpha_presence: torch.Tensor, alpha_frequency: torch.Tensor,
                    ban: torch.Tensor | None, repetition: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """Batched `PenaltyStateRef.apply`: logits (B,V); occurrence (B,V) float decayed
    counts; seen (B,V) bool; alphas (B,); ban (B,V) bool or None; repetition (B,) or None;
    bias (B,V) float (logit_bias) or None. Returns new logits."""
    out = logits.float()
    if bias is not None:
        out = out + bias
    if repetition is not None and bool((repetition != 1).any()):
        rp = repetition[:, None].to(out.dtype)
        out = torch.where(seen, torch.where(out > 0, out / rp, out * rp), out)
    pen = seen.float() * alpha_presence[:, None] + occurrence * alpha_frequency[:, None]
    out = out - pen
    if ban is not None:
        out = out.masked_fill(ban, -float("inf"))
    return out


# --------------------------------------------------------------------------------------
# One sampling step: the engine's batch and infer.LoopRunner's single stream both use it
# --------------------------------------------------------------------------------------

_WEIGHTS_CACHE: dict[tuple[int, int], torch.Tensor] = {}  # (id(tokenizer), V) -> weights


def occurrence_weights(tokenizer: Any, vocab_size: int) -> torch.Tensor:
    """`token_occurrence_weights`, built once per (tokenizer, vocabulary size): building
    them decodes every token."""
    key = (id(tokenizer), vocab_size)
    if key not in _WEIGHTS_CACHE:
        _WEIGHTS_CACHE[key] = token_occurrence_weights(tokenizer, vocab_size)
    return _WEIGHTS_CACHE[key]


def request_generator(seed: int | None) -> torch.Generator:
    """One request's own random stream (`seed`; None: a fresh random seed), so its draws
    do not depend on what else is being sampled."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    return torch.Generator().manual_seed(seed)


def sample_step(logits: torch.Tensor, params: Sequence[SamplingParams],
                gens: Sequence[torch.Generator], occ: torch.Tensor,
                seen: torch.Tensor, allowed: torch.Tensor | None = None) -> list[int]:
    """The next token of each stream: logits (B,V) (any device), row i sampled with
    params[i] (logit_bias, bans, then repetition / presence / frequency penalties from its
    decayed counts occ (B,V) / seen (B,V) bool, then `sample_batch`) and one uniform draw
    from gens[i]. `allowed` (B,V) bool: the tokens a grammar allows next (constrained
    rows; all True elsewhere); when bias / bans leave a row nothing the grammar allows, the
    grammar wins (that row samples from the allowed tokens' raw logits). Sampling runs on
    the CPU, where occ / seen and the generators live."""
    logits = logits.float().cpu()
    raw = logits
    ban = None
    if any(p.token_ban for p in params):
        ban = torch.zeros(logits.shape, dtype=torch.bool)
        for i, p in enumerate(params):
            if p.token_ban:
                ban[i, list(p.token_ban)] = True
    bias = None
    if any(p.logit_bias for p in params):
        bias = torch.zeros(logits.shape, dtype=torch.float32)
        for i, p in enumerate(params):
            if p.logit_bias:
                ids, vals = zip(*p.logit_bias)
                bias[i, list(ids)] = torch.tensor(vals, dtype=torch.float32)
    if ban is not None or bias is not None or any(p.uses_penalties for p in params):
        rep = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32)
        logits = apply_penalties(
            logits, occ, seen, torch.tensor([p.alpha_presence for p in params]),
            torch.tensor([p.alpha_frequency for p in params]), ban,
            rep if bool((rep != 1).any()) else None, bias)
    if allowed is not None:
        logits = logits.masked_fill(~allowed, -float("inf"))
        empty = torch.isneginf(logits).all(dim=-1)
        if bool(empty.any()):  # the grammar wins over bias / bans / penalties
            logits[empty] = raw[empty].masked_fill(~allowed[empty], -float("inf"))
    temp = torch.tensor([p.temperature for p in params], dtype=torch.float32)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long)
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32)
    u = torch.cat([torch.rand(1, generator=g) for g in gens])
    return sample_batch(logits, temp, top_p, top_k, u,
                        min_p if bool((min_p > 0).any()) else None).tolist()


def token_logprobs(logits: torch.Tensor, tokens: Sequence[int], k: int
                   ) -> list[tuple[float, list[tuple[int, float]]]]:
    """The model's own log-probabilities (log-softmax of the raw logits (B,V), before
    bias, penalties, cuts, temperature and grammar): per row, the chosen token's and the
    top `k` (token, logprob) pairs, most likely first."""
    lp = torch.log_softmax(logits.float().cpu(), dim=-1)
    chosen = lp.gather(1, torch.tensor(list(tokens), dtype=torch.long)[:, None])[:, 0]
    out: list[tuple[float, list[tuple[int, float]]]] = []
    if k > 0:
        vals, idx = torch.topk(lp, k, dim=-1)
        for b in range(lp.shape[0]):
            out.append((float(chosen[b]), list(zip(idx[b].tolist(), vals[b].tolist()))))
    else:
        out = [(float(c), []) for c in chosen.tolist()]
    return out


def count_token(params: SamplingParams, tok: int, occ: torch.Tensor, seen: torch.Tensor,
                tokenizer: Any) -> None:
    """Record generated token `tok` in one stream's occ (V,) / seen (V,), in place.
    PIPELINE order: decay the old counts, then count the new token."""
    if params.uses_penalties:
        occ.mul_(params.alpha_decay)
        occ[tok] += occurrence_weights(tokenizer, occ.shape[-1])[tok]
        seen[tok] = True


# --------------------------------------------------------------------------------------
# Text: incremental UTF-8 + stop strings
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# RNN state helpers (any nesting of lists / tuples of tensors with batch on dim 0)
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Prefix-state cache
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Chat prompts (World format)
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# Requests and the engine
# --------------------------------------------------------------------------------------

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
        self._occ: torch.Tensor | None = None  # (B,V) decayed occurrence counts
        self._seen: torch.Tensor | None = None  # (B,V) bool
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._next_id = 0
        self.error: BaseException | None = None
        self.stats = {"steps": 0, "decode_tokens": 0, "prefill_tokens": 0}

    # ---- public API -------------------------------------------------------------------
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

    # ---- the loop -----------------------------------------------------------------------
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
                except BaseException as e:  # keep serving; fail only the requests in flight
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

    # ---- prefill ------------------------------------------------------------------------
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
            if req.state is None:
                req.state = self.model.init_state(1, device=self.device)
            x = torch.tensor([ids[req.fed:end]], dtype=torch.long, device=self.device)
            with self._rows([req.adapter]):
                hidden, req.state = self.model.forward_hidden(x, req.state)  # (1,T,C)
                req.logits = self.model.head(hidden[:, -1]).float()[0]  # (V,)
            self.stats["prefill_tokens"] += n
            req.fed = end
            if end in req.cache_at or (self.cache_prompts and end == len(ids)):
                self.cache.put(ids[:end], req.state, req.logits, req.adapter)
        return n

    # ---- decode -------------------------------------------------------------------------
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
            logits, self._dec_state = self.model.step(idx, self._dec_state)  # (B,V)
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

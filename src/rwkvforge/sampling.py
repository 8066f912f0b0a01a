"""Sampling for RWKV-7 with the `rwkv` pip package's PIPELINE semantics: the request's
parameters, a slow obviously-correct reference sampler beside the fast batched one (tests hold
them together), the decaying presence / frequency penalties, and the one sampling step that
`generate.Engine` and `infer`'s loop runner share.

    from rwkvforge.sampling import SamplingParams, sample_step
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from rwkvforge.model import decode

# A token's text that matches one of these gets occurrence weight 0 (presence penalty only,
# no frequency growth): PIPELINE's `ttt in ' \t0123456789'` rule (a substring test).
_NO_FREQ_TEXT = " \t0123456789"
# Candidates examined by the torch top-p path (no C compiler) before it falls back to a full sort.
_TOPP_CANDIDATES = 512


# ---- Sampling parameters -------------------------------------------------------------------------

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
        except Exception:  # noqa: BLE001 - ids with no text in a smaller test vocab
            continue
        if text in _NO_FREQ_TEXT:
            w[t] = 0.0
    return w


# ---- Reference sampler: one row, written for clarity (tests compare the fast path to it) ---------

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


# ---- Fast path: a batch of rows, each with its own parameters ------------------------------------

def _topp_cutoff(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The nucleus cutoff of each row of probs (B,V) fp32 for top_p (B,): the probability
    where the descending running sum first reaches top_p (keep probs >= it), the value
    `filter_probs_ref` finds with a full sort. The C kernel (csrc/decode_cpu.c,
    rf_topp_cutoff) finds it by a radix select over the fp32 bits with the same exact sums,
    ~50x faster than the sort on a flat 65536-token distribution; rows it leaves (a cut below
    2^-29, no C compiler) take `_topp_cutoff_torch`."""
    B, V = probs.shape
    tp = top_p.to(torch.float32).contiguous()
    lib = decode.library() if probs.device.type == "cpu" else None
    if lib is None:
        return _topp_cutoff_torch(probs, tp)
    probs = probs.contiguous()
    cut = torch.empty(B, dtype=torch.float32)
    if lib.rf_topp_cutoff(B, V, probs.data_ptr(), tp.data_ptr(), cut.data_ptr(),
                          torch.get_num_threads()):
        return _topp_cutoff_torch(probs, tp)
    left = cut < 0
    if bool(left.any()):
        rows = torch.nonzero(left).flatten()
        cut[rows] = _topp_cutoff_torch(probs[rows], tp[rows])
    return cut


def _topp_cutoff_torch(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`_topp_cutoff` in torch ops: the cutoff among the top `_TOPP_CANDIDATES`
    probabilities (a partial sort, same values and order as the full sort), a full sort
    for rows whose nucleus is wider than that."""
    V = probs.shape[1]
    K = min(V, _TOPP_CANDIDATES)
    vals = torch.topk(probs, K, dim=-1, sorted=True).values  # (B,K) descending
    cum = torch.cumsum(vals, dim=-1)  # (B,K) non-decreasing
    # first position where the running mass reaches top_p (K = not within the top K)
    first = torch.searchsorted(cum, top_p[:, None].to(cum.dtype))[:, 0]  # (B,)
    cut = vals.gather(1, first.clamp(max=K - 1)[:, None])[:, 0]
    wide = first >= K
    if bool(wide.any()):  # nucleus wider than K: one batched full sort of those rows
        rows = torch.nonzero(wide).flatten()
        desc = torch.sort(probs[rows], dim=-1, descending=True).values  # (R,V)
        c = torch.cumsum(desc, dim=-1)
        f = torch.searchsorted(c, top_p[rows][:, None].to(c.dtype))[:, 0]
        cut[rows] = desc.gather(1, f.clamp(max=V - 1)[:, None])[:, 0]
    return cut


def filter_probs_batch(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       top_k: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """Batched `filter_probs_ref`: logits (B,V), temperature / top_p (B,) float,
    top_k (B,) long -> probs (B,V) float32, each row normalised.

    The nucleus cutoff is the same number as the reference's full sort gives, found
    without one (`_topp_cutoff`); the top_k cutoff is the k-th of a partial sort."""
    B, V = logits.shape
    probs = torch.softmax(logits.float(), dim=-1)  # (B,V)
    greedy = temperature == 0  # (B,)
    cut = torch.zeros(B, dtype=probs.dtype)
    need_p = (top_p < 1) & ~greedy
    need_k = (top_k > 0) & (top_k < V) & ~greedy
    if bool(need_p.any()) or bool(need_k.any()):
        if bool(need_p.any()):
            cut = torch.where(need_p, _topp_cutoff(probs, top_p), cut)
        if bool(need_k.any()):
            K = int(top_k[need_k].max())
            vals = torch.topk(probs, K, dim=-1, sorted=True).values  # (B,K) descending
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
    return torch.where(greedy, logits.argmax(dim=-1), idx) if bool(greedy.any()) else idx


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


# ---- One sampling step: the engine's batch and infer.LoopRunner's single stream both use it ------

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

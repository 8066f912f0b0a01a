"""Tests for rwkvforge.generate: the fast batched sampler against the one-row reference
(and against the rwkv package's PIPELINE.sample_logits), penalties against PIPELINE's
occurrence dict, the shared sampling step against the one-row reference, the one set of
chat defaults (infer, serve and the dashboard resolve the same values), the RNN state
helpers, stop strings across token boundaries and partial UTF-8, the prefix cache, and the
engine (continuous batching, chunked prefill, cancellation, seeds) on a tiny model.

    /tmp/v1/bin/python -m pytest tests/test_generate.py -q
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rwkvforge.generate import (
    CHAT_DEFAULTS, CHAT_STOP, Engine, PrefixCache, QueueFull, TextStream, chat_params, state_cat,
    state_clone, state_select)
from rwkvforge.model import decode
from rwkvforge.sampling import (
    PenaltyStateRef, SamplingParams, apply_penalties, count_token, filter_probs_batch,
    filter_probs_ref, pick_ref, sample_batch, sample_ref, sample_step)

V = 1000


def _rand_logits(B: int, V: int = V, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, V, generator=g) * scale


# ----------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("scale", [0.5, 3.0, 8.0])
def test_fast_filter_matches_reference(scale):
    B = 12
    logits = _rand_logits(B, scale=scale, seed=int(scale * 10))
    temp = torch.tensor([1.0, 0.7, 1.5, 0.0, 1.0, 0.3, 2.0, 1.0, 1.0, 0.9, 1.0, 1.2])
    top_p = torch.tensor([0.85, 0.5, 1.0, 0.85, 0.0, 0.99, 0.3, 1.0, 0.95, 0.999, 0.6, 1.0])
    top_k = torch.tensor([0, 0, 5, 0, 0, 40, 0, 1, 3, 0, 700, 0])
    fast = filter_probs_batch(logits, temp, top_p, top_k)
    for b in range(B):
        ref = filter_probs_ref(logits[b], float(temp[b]), float(top_p[b]), int(top_k[b]))
        torch.testing.assert_close(fast[b], ref, rtol=1e-5, atol=1e-7)
        assert (fast[b] > 0).sum() == (ref > 0).sum()


def test_wide_nucleus_falls_back_to_full_sort():
    # nearly flat logits: the top-0.99 nucleus is far wider than the partial-sort window
    logits = _rand_logits(2, V=8192, scale=0.01)
    temp, top_p, top_k = torch.ones(2), torch.tensor([0.99, 0.5]), torch.zeros(2, dtype=torch.long)
    fast = filter_probs_batch(logits, temp, top_p, top_k)
    for b in range(2):
        ref = filter_probs_ref(logits[b], 1.0, float(top_p[b]), 0)
        torch.testing.assert_close(fast[b], ref)
    assert (fast[0] > 0).sum() > 4000


def _sorted_cutoff(probs: torch.Tensor, top_p: float) -> float:
    """filter_probs_ref's nucleus cutoff, by its full sort."""
    desc = torch.sort(probs, descending=True).values
    reached = (torch.cumsum(desc, 0) >= top_p).nonzero()
    return float(desc[int(reached[0]) if len(reached) else len(desc) - 1])


@pytest.mark.parametrize("scale,ties", [(0.01, False), (0.5, False), (3.0, False), (20.0, False),
                                        (1.0, True), (4.0, True)])
def test_topp_cutoff_without_sort_is_the_sorted_cutoff(scale, ties):
    """The radix-select cutoff (C) is the very value the full sort gives, on a World-sized
    vocabulary, flat to peaked, and with large groups of tied probabilities (rounded logits:
    a few distinct values), for nuclei from one token to nearly all of them."""
    from rwkvforge import sampling

    logits = torch.randn(4, 65536, generator=torch.Generator().manual_seed(int(scale * 7))) * scale
    if ties:
        logits = logits.round()
    probs = torch.softmax(logits, dim=-1)
    lib = decode.library()
    for tp in (0.0, 1e-6, 0.3, 0.85, 0.95, 0.999, 0.99999):
        top_p = torch.full((4,), tp)
        got = sampling._topp_cutoff(probs, top_p)
        want = [_sorted_cutoff(probs[b], tp) for b in range(4)]
        assert got.tolist() == want, (scale, ties, tp)
        assert sampling._topp_cutoff_torch(probs, top_p).tolist() == want
        if lib is not None and tp <= 0.95:  # the kernel itself answered (no sort fallback)
            raw = torch.empty(4)
            assert lib.rf_topp_cutoff(4, 65536, probs.data_ptr(), top_p.data_ptr(),
                                      raw.data_ptr(), 2) == 0
            assert raw.tolist() == want


def test_topp_cutoff_in_the_tiny_tail_sorts_that_row():
    """A cut among probabilities below 2^-29 (where the kernel's exact sums end) is found by
    the sort for that row only; the other rows keep the kernel's answer."""
    from rwkvforge import sampling

    logits = torch.randn(2, 4096, generator=torch.Generator().manual_seed(5))
    logits[0, 0] = 22.0  # one token holds all but ~2e-6 of the mass, spread ~5e-10 a token
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([1.0 - 2 ** -24, 0.85])
    got = sampling._topp_cutoff(probs, top_p)
    assert got.tolist() == [_sorted_cutoff(probs[b], float(top_p[b])) for b in range(2)]
    lib = decode.library()
    if lib is not None:
        raw = torch.empty(2)
        lib.rf_topp_cutoff(2, 4096, probs.data_ptr(), top_p.data_ptr(), raw.data_ptr(), 1)
        assert raw[0] == -1 and raw[1] == got[1]


def test_sample_batch_matches_reference_tokens():
    B = 16
    logits = _rand_logits(B, seed=3)
    rng = random.Random(0)
    params = [SamplingParams(temperature=rng.choice([0.0, 0.5, 1.0, 1.3]),
                             top_p=rng.choice([0.3, 0.85, 1.0]), top_k=rng.choice([0, 2, 50]))
              for _ in range(B)]
    for trial in range(5):
        u = torch.rand(B, generator=torch.Generator().manual_seed(trial))
        fast = sample_batch(logits, torch.tensor([p.temperature for p in params]),
                            torch.tensor([p.top_p for p in params]),
                            torch.tensor([p.top_k for p in params]), u)
        ref = [sample_ref(logits[b], params[b], float(u[b])) for b in range(B)]
        assert fast.tolist() == ref


def test_reference_matches_rwkv_pipeline_distribution(monkeypatch):
    """filter_probs_ref is the distribution the rwkv package's PIPELINE samples from."""
    from rwkv.utils import PIPELINE

    captured = {}

    def fake_choice(a, p):
        captured["p"] = np.asarray(p, dtype=np.float64)
        return 0

    monkeypatch.setattr(np.random, "choice", fake_choice)
    logits = _rand_logits(1, seed=7)[0]
    for temperature, top_p, top_k in [(1.0, 0.85, 0), (0.7, 0.5, 0), (1.4, 0.95, 20),
                                      (1.0, 0.99, 3), (0.5, 0.2, 0)]:
        PIPELINE.sample_logits(None, logits.clone(), temperature=temperature, top_p=top_p,
                               top_k=top_k)
        ref = filter_probs_ref(logits, temperature, top_p, top_k).double().numpy()
        np.testing.assert_allclose(ref, captured["p"], rtol=1e-4, atol=1e-7)


def test_temperature_zero_is_greedy_and_seeded_draws_repeat():
    logits = _rand_logits(4, seed=11)
    u = torch.rand(4)
    t = sample_batch(logits, torch.zeros(4), torch.full((4,), 0.9), torch.zeros(4, dtype=torch.long), u)
    assert t.tolist() == logits.argmax(-1).tolist()
    # inverse-CDF draws: u=0 gives the first kept token, u->1 the last kept token
    probs = filter_probs_ref(logits[0], 1.0, 0.5, 0)
    kept = torch.nonzero(probs).flatten()
    assert pick_ref(probs, 0.0) == int(kept[0])
    assert pick_ref(probs, 0.999999) == int(kept[-1])


def test_sampling_frequencies_follow_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros(4)
    for _ in range(n):
        t = sample_batch(logits, torch.ones(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                         torch.rand(1, generator=g))
        counts[int(t)] += 1
    freq = counts / n
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.03)


# ----------------------------------------------------------------------------- penalties
def test_penalties_match_pipeline_occurrence_dict():
    weights = torch.ones(V)
    weights[[5, 6]] = 0.0  # "space / digit" tokens: presence only
    B = 3
    ps = [SamplingParams(alpha_presence=0.4, alpha_frequency=0.3, alpha_decay=0.9,
                         token_ban=(1, 2)),
          SamplingParams(alpha_presence=0.0, alpha_frequency=1.0, alpha_decay=1.0),
          SamplingParams(alpha_presence=2.0, alpha_frequency=0.0, alpha_decay=0.5)]
    refs = [PenaltyStateRef(p, weights) for p in ps]
    occ = torch.zeros(B, V)
    seen = torch.zeros(B, V, dtype=torch.bool)
    ban = torch.zeros(B, V, dtype=torch.bool)
    ban[0, [1, 2]] = True
    rng = random.Random(1)
    for step in range(30):
        logits = _rand_logits(B, seed=100 + step)
        fast = apply_penalties(logits, occ, seen, torch.tensor([p.alpha_presence for p in ps]),
                               torch.tensor([p.alpha_frequency for p in ps]), ban)
        for b in range(B):
            torch.testing.assert_close(fast[b], refs[b].apply(logits[b]))
            tok = rng.choice([3, 4, 5, 6, 7, rng.randrange(V)])
            refs[b].update(tok)
            occ[b].mul_(ps[b].alpha_decay)
            occ[b, tok] += weights[tok]
            seen[b, tok] = True
    assert torch.isinf(fast[0, 1]) and fast[0, 1] < 0


# ----------------------------------------------------------------------------- text
def _stream_pieces(pieces: list[bytes], stops: list[str]) -> tuple[str, bool, list[str]]:
    ts = TextStream(stops)
    out = []
    stopped = False
    for p in pieces:
        t, stopped = ts.feed(p)
        out.append(t)
        if stopped:
            break
    out.append(ts.finish())
    return "".join(out), stopped, out


def _expected(pieces: list[bytes], stops: list[str]) -> tuple[str, bool]:
    """Spec: after each piece, look at all complete characters so far; at the first piece
    after which some stop string occurs, cut before the earliest-starting one (so of two
    overlapping stops, the one completed first in the stream wins, as in vLLM)."""
    data = b""
    for p in pieces:
        data += p
        text = data.decode("utf-8", errors="ignore")  # an incomplete tail is not text yet
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return data.decode("utf-8"), False


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="ab\nUs:é中😀", max_size=40),
       stops=st.lists(st.text(alphabet="ab\nUs:é中", min_size=1, max_size=5), max_size=3),
       cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_stop_strings_across_any_byte_split(text, stops, cuts):
    data = text.encode("utf-8")
    idx = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    pieces = [data[a:b] for a, b in zip(idx, idx[1:])]
    got, stopped, chunks = _stream_pieces(pieces, stops)
    want, want_stop = _expected(pieces, stops)
    assert got == want and stopped == want_stop
    # nothing emitted before the end ever contains a stop or a broken character
    assert all("\ufffd" not in c for c in chunks)


def test_stream_holds_back_possible_stop_prefix():
    ts = TextStream(["\n\nUser:"])
    assert ts.feed(b"Hello\n") == ("Hello", False)  # "\n" might start the stop
    assert ts.feed(b"\nUs") == ("", False)
    assert ts.feed(b"ually") == ("\n\nUsually", False)
    assert ts.feed(b" yes\n\nUser: hi") == (" yes", True)
    assert ts.text == "Hello\n\nUsually yes"


def test_partial_utf8_waits_and_bad_bytes_are_replaced():
    ts = TextStream()
    euro = "€".encode()
    assert ts.feed(euro[:1]) == ("", False)
    assert ts.feed(euro[1:2]) == ("", False)
    assert ts.feed(euro[2:] + b"x") == ("€x", False)
    assert ts.feed(b"\xe2\x82") == ("", False)
    assert ts.finish() == "\ufffd"


# ----------------------------------------------------------------------------- cache
def test_prefix_cache_longest_prefix_lru_and_copies():
    c = PrefixCache(max_bytes=10_000)
    s = [(torch.zeros(1, 4), torch.ones(1, 2, 2))]
    c.put([1, 2], s, torch.zeros(3))
    c.put([1, 2, 3, 4], [(torch.ones(1, 4), torch.ones(1, 2, 2))], torch.ones(3))
    n, st_, lg = c.lookup([1, 2, 3, 4, 5])
    assert n == 4 and float(st_[0][0].sum()) == 4
    st_[0][0].add_(100)  # the caller's copy; the cache must not change
    assert float(c.lookup([1, 2, 3, 4])[1][0][0].sum()) == 4
    assert c.lookup([1, 3])[0] == 0
    assert c.lookup([1, 2, 9])[0] == 2
    # byte bound evicts the least recently used
    big = PrefixCache(max_bytes=2 * (4 * 4 + 8 * 4 + 3 * 4))
    for i in range(3):
        big.put([i], s, torch.zeros(3))
    assert len(big) == 2 and big.lookup([0])[0] == 0 and big.lookup([2])[0] == 1


# ----------------------------------------------------------------------------- one step
class _DigitTokenizer:
    """Token 5 decodes to " " and 6 to "7" (occurrence weight 0, as spaces and digits);
    every other id to a letter (weight 1)."""

    def decode(self, ids):
        return {5: " ", 6: "7"}.get(ids[0], "a")


_DIGIT_TOK = _DigitTokenizer()  # module-level: occurrence weights are cached by its id


def test_sample_step_and_count_token_follow_the_reference_step():
    """The shared step (bans, penalties, cut, draw; then the occurrence update) picks the
    same token as the one-row reference fed the same uniform draws, step after step."""
    ps = [SamplingParams(temperature=1.0, top_p=0.5, alpha_presence=0.4, alpha_frequency=0.3,
                         alpha_decay=0.9, token_ban=(1, 2), seed=1),
          SamplingParams(temperature=0.7, top_p=1.0, top_k=5, alpha_frequency=1.0, seed=2),
          SamplingParams(temperature=0.0, top_p=0.3, alpha_presence=2.0, seed=3),
          SamplingParams(temperature=1.3, top_p=0.9, seed=4)]
    B = len(ps)
    weights = torch.ones(V)
    weights[[5, 6]] = 0.0
    refs = [PenaltyStateRef(p, weights) for p in ps]
    gens = [torch.Generator().manual_seed(p.seed) for p in ps]
    twins = [torch.Generator().manual_seed(p.seed) for p in ps]
    occ, seen = torch.zeros(B, V), torch.zeros(B, V, dtype=torch.bool)
    for step in range(25):
        logits = _rand_logits(B, seed=200 + step, scale=2.0)
        logits[:, 5] += 6.0  # make the weight-0 tokens likely, so they get sampled too
        toks = sample_step(logits, ps, gens, occ, seen)
        for b in range(B):
            u = float(torch.rand(1, generator=twins[b]))
            assert toks[b] == sample_ref(refs[b].apply(logits[b]), ps[b], u), (step, b)
            assert toks[b] not in ps[b].token_ban
            refs[b].update(toks[b])
            count_token(ps[b], toks[b], occ[b], seen[b], _DIGIT_TOK)
    for b in range(B):
        want = torch.zeros(V)
        for t, n in refs[b].occurrence.items():
            want[t] = n if ps[b].uses_penalties else 0.0
        torch.testing.assert_close(occ[b], want)


def test_sample_step_min_p_repetition_and_bias_follow_the_reference_step():
    """min_p, repetition_penalty and logit_bias in the shared step pick the tokens the
    one-row reference picks (bias, bans, repetition on seen tokens, presence / frequency,
    then top-p / top-k / min-p cuts, then temperature)."""
    ps = [SamplingParams(temperature=1.0, top_p=1.0, min_p=0.2, seed=1),
          SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.8,
                         alpha_presence=0.2, seed=2),
          SamplingParams(temperature=0.0, top_p=1.0, repetition_penalty=0.5,
                         logit_bias=((3, 2.5), (7, -100.0)), seed=3),
          SamplingParams(temperature=1.2, top_p=1.0, min_p=0.05, logit_bias=((9, 4.0),),
                         repetition_penalty=2.5, seed=4)]
    B = len(ps)
    weights = torch.ones(V)
    refs = [PenaltyStateRef(p, weights) for p in ps]
    gens = [torch.Generator().manual_seed(p.seed) for p in ps]
    twins = [torch.Generator().manual_seed(p.seed) for p in ps]
    occ, seen = torch.zeros(B, V), torch.zeros(B, V, dtype=torch.bool)
    picked = [set() for _ in ps]
    for step in range(30):
        logits = _rand_logits(B, seed=500 + step, scale=2.0)
        toks = sample_step(logits, ps, gens, occ, seen)
        for b in range(B):
            u = float(torch.rand(1, generator=twins[b]))
            assert toks[b] == sample_ref(refs[b].apply(logits[b]), ps[b], u), (step, b)
            refs[b].update(toks[b])
            count_token(ps[b], toks[b], occ[b], seen[b], _DIGIT_TOK)
            picked[b].add(toks[b])
    assert 7 not in picked[2]  # a -100 bias is a ban in practice
    # min_p = 1 keeps only the most likely token: sampling at any temperature is greedy
    logits = _rand_logits(3, seed=9, scale=2.0)
    one = [SamplingParams(temperature=1.5, top_p=1.0, min_p=1.0, seed=i) for i in range(3)]
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    assert sample_step(logits, one, g, torch.zeros(3, V), torch.zeros(3, V, dtype=bool)) \
        == logits.argmax(-1).tolist()


def test_sample_step_cuts_follow_top_p_top_k_and_temperature():
    logits = torch.tensor([[4.0, 3.0, 2.5, 2.0, 0.0, -1.0]])
    order = logits[0].argsort(descending=True).tolist()
    occ, seen = torch.zeros(1, 6), torch.zeros(1, 6, dtype=torch.bool)

    def draws(**kw) -> set[int]:
        p = SamplingParams(**kw)
        g = torch.Generator().manual_seed(0)
        return {sample_step(logits, [p], [g], occ, seen)[0] for _ in range(300)}

    assert draws(temperature=1.0, top_p=1.0) == set(range(6))  # no cut: every token
    assert draws(temperature=1.0, top_p=1.0, top_k=1) == {order[0]}
    assert draws(temperature=1.0, top_p=1.0, top_k=3) == set(order[:3])
    assert draws(temperature=1.0, top_p=0.01) == {order[0]}
    assert draws(temperature=0.0, top_p=1.0) == {order[0]}  # greedy, whatever the draw
    assert draws(temperature=1.0, top_p=1.0, token_ban=(order[0],)) == set(order[1:])
    # a low temperature sharpens: the top token is drawn more often than at T=1
    def top_share(t: float) -> float:
        g = torch.Generator().manual_seed(1)
        p = SamplingParams(temperature=t, top_p=1.0)
        return sum(sample_step(logits, [p], [g], occ, seen)[0] == order[0]
                   for _ in range(400)) / 400
    assert top_share(0.3) > top_share(1.0) + 0.2


# ----------------------------------------------------------------------------- chat defaults
def test_infer_serve_and_dashboard_resolve_the_same_chat_defaults():
    """One set of chat sampling defaults: what `rwkvforge infer` does without flags, what
    /v1/chat/completions does with no sampling fields and what the dashboard's Chat page
    starts with are the same values and the same end-of-reply rule."""
    from rwkvforge import api as oa
    from rwkvforge import infer
    from rwkvforge.dashboard import chat as dash

    keys = [f.name for f in dataclasses.fields(CHAT_DEFAULTS)] + ["stop"]
    want = {**dataclasses.asdict(CHAT_DEFAULTS), "stop": CHAT_STOP}

    def pick(p: SamplingParams) -> dict:
        return {k: getattr(p, k) for k in keys}

    cli = infer.sampling_params(infer.build_parser().parse_args([]), chat=True, seed=None)
    api = oa.sampling_params(oa.ChatRequest(messages=[{"role": "user", "content": "hi"}]),
                             oa.ServeOptions(), chat=True)
    page = dash.sampling(dash.ChatRequest("", "hi"))
    assert pick(cli) == pick(api) == pick(page) == want
    # RWKV's chat demo values for World models (ChatRWKV API_DEMO_CHAT.py)
    assert (CHAT_DEFAULTS.temperature, CHAT_DEFAULTS.top_p) == (1.0, 0.3)
    assert (CHAT_DEFAULTS.alpha_presence, CHAT_DEFAULTS.alpha_frequency) == (0.5, 0.5)
    p = chat_params(("END",), top_p=0.9, max_tokens=7)  # a value given wins over the default
    assert (p.top_p, p.temperature, p.max_tokens, p.stop) == (0.9, 1.0, 7, ("END",) + CHAT_STOP)


# ----------------------------------------------------------------------------- state helpers
def test_state_select_cat_round_trip_and_clone_is_a_copy(tiny_model):
    """On a real RWKV-7 state (list of per-layer tuples): picking rows and joining them
    back reorders the batch exactly; a clone shares no storage with its source."""
    toks = [1, 50, 300, 7000, 12, 65535, 0, 5, 99, 1000, 33, 4242, 11, 12, 13]
    with torch.no_grad():
        _, state = tiny_model(torch.tensor([toks[:5], toks[5:10], toks[10:15]]))
    joined = state_cat([state_select(state, [i]) for i in (2, 0, 1)])
    assert isinstance(joined, list) and all(isinstance(layer, tuple) for layer in joined)
    for layer, orig in zip(joined, state):
        for x, y in zip(layer, orig):
            assert x.shape == y.shape
            assert torch.equal(x[0], y[2]) and torch.equal(x[1], y[0]) and torch.equal(x[2], y[1])
    copy = state_clone(state)
    copy[0][1].add_(1.0)
    assert not torch.equal(copy[0][1], state[0][1])


# ----------------------------------------------------------------------------- engine
@pytest.fixture(scope="module")
def engine_parts(tiny_model_path):
    from rwkvforge.checkpoint import load_model
    from rwkvforge.tokenizer import get_tokenizer

    return load_model(tiny_model_path), get_tokenizer()


def _ref_greedy(model, ids, n):
    """Greedy decoding with one full forward per token: the obviously-correct loop."""
    ids = list(ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([ids]))
            t = int(logits[0, -1].argmax())
            out.append(t)
            ids.append(t)
    return out


def test_engine_greedy_matches_full_forward(engine_parts):
    model, tok = engine_parts
    eng = Engine(model, tok, prefill_chunk=3)  # chunked prefill across 3-token pieces
    ids = tok.encode("The quick brown fox jumps")
    h = eng.generate(ids, SamplingParams(temperature=0, max_tokens=6, token_stop=()))
    assert h.req.generated == _ref_greedy(model, ids, 6)
    assert h.finish_reason == "length" and h.completion_tokens == 6


def test_continuous_batching_matches_single_stream(engine_parts):
    """Streams that join late, leave early and prefill in chunks get the same tokens as
    when each runs alone (no leak between batch rows)."""
    model, tok = engine_parts
    prompts = ["Hello there", "A much longer prompt that needs several prefill chunks to go",
               "x", "Numbers: 1 2 3"]
    lens = [5, 8, 2, 7]
    solo = []
    for p, n in zip(prompts, lens):
        e = Engine(model, tok, cache_prompts=False)
        solo.append(e.generate(tok.encode(p), SamplingParams(temperature=0, max_tokens=n,
                                                               token_stop=())).req.generated)
    eng = Engine(model, tok, max_batch=3, prefill_chunk=4, cache_prompts=False)
    hs = [eng.submit(tok.encode(prompts[0]), SamplingParams(temperature=0, max_tokens=lens[0],
                                                            token_stop=()))]
    eng.step()
    eng.step()
    for p, n in zip(prompts[1:], lens[1:]):
        hs.append(eng.submit(tok.encode(p), SamplingParams(temperature=0, max_tokens=n,
                                                           token_stop=())))
        eng.step()
    eng.run_until_idle()
    for h, want in zip(hs, solo):
        got = h.req.generated
        assert len(got) == len(want)
        # batched matmuls may round differently; greedy paths must agree almost everywhere
        assert sum(a == b for a, b in zip(got, want)) >= len(want) - 1


def test_seed_reproducible_and_batch_independent(engine_parts):
    model, tok = engine_parts
    ids = tok.encode("Once upon a time")
    p = SamplingParams(temperature=1.0, top_p=1.0, max_tokens=8, seed=1234, token_stop=())
    a = Engine(model, tok).generate(ids, p).req.generated
    b = Engine(model, tok).generate(ids, p).req.generated
    assert a == b
    c = Engine(model, tok).generate(ids, SamplingParams(**{**p.__dict__, "seed": 99})).req.generated
    assert c != a


def test_prefix_cache_skips_prefill(engine_parts):
    model, tok = engine_parts
    eng = Engine(model, tok)
    system = tok.encode("System: You are a helpful assistant.\n\n")
    q1 = system + tok.encode("User: hi\n\nAssistant:")
    q2 = system + tok.encode("User: what is two plus two?\n\nAssistant:")
    p = SamplingParams(temperature=0, max_tokens=3, token_stop=())
    eng.generate(q1, p, cache_at=[len(system)])
    before = eng.stats["prefill_tokens"]
    h = eng.submit(q2, p, cache_at=[len(system)])
    eng.run_until_idle()
    assert h.req.cached_tokens == len(system)
    assert eng.stats["prefill_tokens"] - before == len(q2) - len(system)
    fresh = Engine(model, tok, cache_prompts=False).generate(q2, p).req.generated
    assert h.req.generated == fresh


def test_stop_string_ends_generation_and_is_cut(engine_parts):
    model, tok = engine_parts
    eng = Engine(model, tok)
    ids = tok.encode("Count:")
    free = eng.generate(ids, SamplingParams(temperature=0, max_tokens=12, token_stop=()))
    text = free.result()
    assert len(text) >= 4
    stop = text[2:4]
    h = Engine(model, tok).generate(ids, SamplingParams(temperature=0, max_tokens=12,
                                                         token_stop=(), stop=(stop,)))
    assert h.finish_reason == "stop"
    assert h.result() == text[: text.find(stop)]


def test_cancel_queue_bound_and_background_thread(engine_parts):
    model, tok = engine_parts
    eng = Engine(model, tok, max_batch=1, max_queue=1)
    p = SamplingParams(temperature=0, max_tokens=50, token_stop=())
    h1 = eng.submit([1, 2, 3], p)
    eng.step()  # h1 admitted; the queue is empty again
    h2 = eng.submit([4, 5], p)
    with pytest.raises(QueueFull):
        eng.submit([6], p)
    h1.cancel()
    eng.step()
    assert h1.finish_reason == "cancelled"
    eng.start()
    try:
        assert h2.done.wait(30)
        assert h2.finish_reason == "length" and h2.completion_tokens == 50
        events = list(h2)
        assert events[-1].finish_reason == "length"
        assert "".join(e.text for e in events) == h2.result()
    finally:
        eng.stop()


def test_penalties_and_bans_in_engine(engine_parts):
    model, tok = engine_parts
    ids = tok.encode("la la la")
    greedy = Engine(model, tok).generate(ids, SamplingParams(temperature=0, max_tokens=10,
                                                              token_stop=())).req.generated
    banned = Engine(model, tok).generate(
        ids, SamplingParams(temperature=0, max_tokens=10, token_stop=(),
                            token_ban=tuple(set(greedy)))).req.generated
    assert not set(banned) & set(greedy)
    rep = Engine(model, tok).generate(
        ids, SamplingParams(temperature=0, max_tokens=10, token_stop=(), alpha_presence=100.0,
                            alpha_decay=1.0)).req.generated
    assert len(set(rep)) == len(rep)  # a huge presence penalty forbids any repeat


def test_validation_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5).validate()
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan")).validate()
    with pytest.raises(ValueError, match="token_ban"):
        SamplingParams(token_ban=(70000,)).validate(65536)

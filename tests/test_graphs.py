"""model/graphs.py: the decode step replayed from a graph per batch size.

No GPU here, so torch.cuda's capture is replaced by what a replay does: the recorded body
run again on the same static buffers (graphs.ReplayApi). What these tests hold is the bookkeeping
a real graph depends on: inputs copied into the static buffers (the state only when it is
not the one the last replay returned), one capture per batch size, outputs in the graph's
buffers, the engine's batch joining and leaving, and the fall-back when capture fails.
bench/gpu_acceptance.py measures the real one where a GPU is lent."""

from __future__ import annotations

import torch

from rwkvforge.generate import Engine
from rwkvforge.model.graphs import GraphedStep, ReplayApi
from rwkvforge.sampling import SamplingParams
from rwkvforge.tokenizer import get_tokenizer


class CountingApi(ReplayApi):
    """graphs.ReplayApi (torch.cuda's capture on CPU) counting its captures, or failing them."""

    def __init__(self, fail: bool = False):
        self.captures, self.fail = 0, fail

    def capture(self, body, warmup):
        if self.fail:
            warmup()
            raise RuntimeError("operation not permitted when stream is capturing")
        self.captures += 1
        return super().capture(body, warmup)


def _clone(state):
    return [tuple(t.clone() for t in layer) for layer in state]


def test_graphed_step_is_the_step_across_batch_sizes(tiny_model):
    V = tiny_model.config.vocab_size
    api = CountingApi()
    gs = GraphedStep(tiny_model, api=api)
    with torch.no_grad():
        state = tiny_model.init_state(2)
        ref_state = _clone(state)
        for t in range(4):  # the engine's loop: the returned state fed back
            idx = torch.tensor([t + 1, 3 * t + 7]) % V
            logits, state = gs.step(idx, state)
            ref, ref_state = tiny_model.step(idx, ref_state)
            assert torch.equal(logits, ref)
            assert all(torch.equal(a, b) for a, b in zip(
                [x for la in state for x in la], [x for la in ref_state for x in la]))
        first_buffers = state
        logits, state = gs.step(torch.tensor([5, 6]), state)
        assert state is first_buffers  # the graph's own buffers, updated in place
        # a third stream joins (a new state object: copied in, a second graph)
        joined = [tuple(torch.cat([a, b]) for a, b in zip(la, lb))
                  for la, lb in zip(state, tiny_model.init_state(1))]
        ref_state = _clone(joined)
        idx = torch.tensor([9, 10, 11])
        logits, state = gs.step(idx, joined)
        ref, ref_state = tiny_model.step(idx, ref_state)
        assert torch.equal(logits, ref) and logits.shape == (3, V)
        # back to two streams: the first graph replays from a state it did not return
        left = [tuple(t[1:] for t in layer) for layer in state]
        ref2 = _clone(left)
        logits, state = gs.step(torch.tensor([12, 13]), left)
        ref, _ = tiny_model.step(torch.tensor([12, 13]), ref2)
        assert torch.equal(logits, ref)
    assert api.captures == 2 and sorted(gs.graphs) == [2, 3]


def test_failed_capture_falls_back_to_the_step_once(tiny_model, capsys):
    gs = GraphedStep(tiny_model, api=CountingApi(fail=True))
    with torch.no_grad():
        state = tiny_model.init_state(1)
        for t in (1, 2, 3):
            logits, state2 = gs.step(torch.tensor([t]), state)
            ref, _ = tiny_model.step(torch.tensor([t]), _clone(state))
            assert torch.equal(logits, ref)
            state = state2
    assert gs.failed and "stream is capturing" in gs.failed and not gs.graphs
    assert capsys.readouterr().err.count("CUDA graph capture failed") == 1


def test_engine_with_a_graphed_step_generates_the_same_tokens(tiny_model):
    """generate.Engine with its decode through GraphedStep (what it does on CUDA): requests
    of different lengths, one submitted after another has finished, so the batch shrinks
    and grows back to a size whose graph exists (its buffers then take the new batch's
    state): the same tokens as the eager engine."""
    tok = get_tokenizer()
    outs = {}
    for graphed in (False, True):
        eng = Engine(tiny_model, tok, cache_prompts=False)
        if graphed:
            eng._graphed = GraphedStep(tiny_model, api=ReplayApi())
        p = lambda n, s: SamplingParams(temperature=1.0, top_p=0.9, max_tokens=n,  # noqa: E731
                                        token_stop=(), seed=s)
        hs = [eng.submit([1, 2, 3], p(14, 0)), eng.submit([7, 8], p(4, 1))]
        while not hs[1].done.is_set():
            eng.step()
        hs.append(eng.submit([40, 41, 42, 43], p(6, 2)))  # back to two streams
        eng.run_until_idle()
        outs[graphed] = [h.req.generated for h in hs]
        if graphed:
            assert sorted(eng._graphed.graphs) == [1, 2]
    assert outs[True] == outs[False] and [len(g) for g in outs[True]] == [14, 4, 6]

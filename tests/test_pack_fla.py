"""Packed rows through fla (the CUDA kernel) on the CPU under Triton's interpreter: `wkv_fla`
with a reset mask runs fla's variable-length form (`cu_seqlens`), checked against `wkv_ref`
with the same mask (y, final states, all gradients, the given state included), and shown to
differ without the mask.

This file is also the child process (`python tests/test_pack_fla.py` prints one JSON line):
the interpreter must be switched on before triton is imported (see tests/fla_interpreter.py,
whose loader and helpers it uses). Skips, saying why, where fla / triton are not installed.
"""

from __future__ import annotations

import json
import sys

import fla_interpreter
import pytest

# Two rows of 40 tokens: row 0 keeps the given state for its first document, row 1 drops it;
# documents start mid-chunk and on a 16-step edge; fla sees five sequences in all
DOCS = ([11, 16, 13], [3, 13, 24])
T_ROW = 40


def _child() -> int:
    import fla_interpreter as fi

    try:
        fn = fi.load()
    except fi.Unavailable as e:
        print(json.dumps({"skip": str(e)}))
        return 0
    import inspect

    import torch

    from rwkvforge.model import wkv as W

    calls = []

    def spy(**kw):  # what wkv_fla passes to fla
        calls.append({"cu_seqlens": None if kw.get("cu_seqlens") is None
                      else kw["cu_seqlens"].tolist(),
                      "batch": int(kw["r"].shape[0]), "lower_bound": kw.get("lower_bound")})
        return fn(**kw)

    spy.__signature__ = inspect.signature(fn)  # wkv_fla reads it (does fla take lower_bound?)
    W._fla_fn = spy
    reset = torch.zeros(2, T_ROW, dtype=torch.bool)
    for b, lens in enumerate(DOCS):
        t = 0
        for n in lens:
            reset[b, t] = t > 0 or b == 1
            t += n
    xs = fi._inputs(2, T_ROW, 2, 64, seed=7)
    out = {}
    want = fi._fwd_bwd(lambda *a: W.wkv_ref(*a, reset=reset), xs)
    for bound in (True, False):
        calls.clear()
        got = fi._fwd_bwd(lambda *a, b=bound: W.wkv_fla(*a, bound=b, reset=reset), xs)
        out[f"bound={bound}"] = {"diff": fi._diff(got, want), "calls": list(calls)}
    no_reset = fi._fwd_bwd(lambda *a: W.wkv_fla(*a), xs)
    out["without_reset_y_rel"] = fi._diff(no_reset, want)["y"]["rel"]
    print(json.dumps(out))
    return 0


@pytest.fixture(scope="module")
def measured():
    return fla_interpreter.measure(__file__)


@pytest.mark.slow  # the interpreter: ~1-2.5 min on 2 busy cores
@pytest.mark.parametrize("bound", [True, False], ids=["lower_bound", "no_bound"])
def test_fla_varlen_matches_reference_with_resets(measured, bound):
    case = measured[f"bound={bound}"]
    (call,) = case["calls"]
    # one flat row cut at both row starts and at the four resets after t=0
    assert call["batch"] == 1 and call["cu_seqlens"] == [0, 11, 27, 40, 43, 56, 80]
    assert (call["lower_bound"] is not None) == bound
    # the tolerance of tests/test_wkv_fla.py's fp32 case (fla's 64-step chunks: up to 3e-5
    # measured there); a document leaking into the next is >= 1e-2 (below)
    for name, d in case["diff"].items():
        assert d["rel"] < 1e-4, (name, d)
    assert case["diff"]["dstate0"]["ref_max"] > 0  # row 0's state does reach its first document


@pytest.mark.slow
def test_fla_without_the_reset_is_another_computation(measured):
    assert measured["without_reset_y_rel"] > 1e-2


if __name__ == "__main__":
    sys.exit(_child())

"""RWKV7 module: parity with the `rwkv` pip package, state handling, layout, training paths."""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

from rwkvforge.checkpoint import load_model, save_pth
from rwkvforge.demo import make_random_model_sd
from rwkvforge.generate import state_select
from rwkvforge.model import RWKV7, RWKV7Config

TOKS = [1, 50, 300, 7000, 12, 65535, 0, 5, 99, 1000, 33, 4242, 11, 12, 13, 65000, 2, 3, 9, 10]


def _rwkv_pip():
    """The rwkv package's RWKV-7 class (env flags are read at import, so set them first)."""
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_JIT_ON"] = "0"
    os.environ.setdefault("RWKV_CUDA_ON", "0")
    mod = sys.modules.get("rwkv.model")
    if mod is None:
        mod = importlib.import_module("rwkv.model")
    elif not hasattr(mod, "RWKV_x070"):
        mod = importlib.reload(mod)
    return mod.RWKV


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(ours, rwkv pip) on one random 3-layer checkpoint with non-default shapes."""
    sd = make_random_model_sd(3, 128, seed=7, dim_ffn=320)
    path = save_pth(sd, tmp_path_factory.mktemp("parity") / "m.pth")
    ref = _rwkv_pip()(str(path)[: -len(".pth")], strategy="cpu fp32")
    return load_model(path), ref


def _check_state(ours, theirs, row=0, tol=2e-5):
    for i, (att_shift, wkv_state, ffn_shift) in enumerate(ours):
        torch.testing.assert_close(att_shift[row], theirs[3 * i], atol=tol, rtol=tol)
        torch.testing.assert_close(wkv_state[row], theirs[3 * i + 1], atol=tol, rtol=tol)
        torch.testing.assert_close(ffn_shift[row], theirs[3 * i + 2], atol=tol, rtol=tol)


def test_sequence_logits_and_state_match_rwkv_pip(pair):
    ours, ref = pair
    ref_logits, ref_state = ref.forward(TOKS, None, full_output=True)
    with torch.no_grad():
        logits, state = ours(torch.tensor([TOKS]))
    assert logits.shape == (1, len(TOKS), 65536)
    assert ref_logits.std() > 0.3  # the random model is not degenerate
    torch.testing.assert_close(logits[0], ref_logits, atol=2e-5, rtol=1e-5)
    _check_state(state, ref_state)


def test_token_by_token_decode_matches_rwkv_pip(pair):
    ours, ref = pair
    ref_state, state = None, ours.init_state(1)
    for t in TOKS[:12]:
        ref_logits, ref_state = ref.forward([t], ref_state)
        logits, state = ours.step(torch.tensor([t]), state)
        torch.testing.assert_close(logits[0], ref_logits, atol=2e-5, rtol=1e-5)
    _check_state(state, ref_state)


def test_prefill_then_step_continues_the_state(pair):
    ours, ref = pair
    ref_logits, _ = ref.forward(TOKS, None, full_output=True)
    with torch.no_grad():
        last, state = ours(torch.tensor([TOKS[:12]]), last_only=True)
        torch.testing.assert_close(last[0], ref_logits[11], atol=2e-5, rtol=1e-5)
        more, state = ours(torch.tensor([TOKS[12:15]]), state)  # chunk boundary inside a call
        torch.testing.assert_close(more[0], ref_logits[12:15], atol=2e-5, rtol=1e-5)
    for i, t in enumerate(TOKS[15:], start=15):
        logits, state = ours.step(torch.tensor([t]), state)
        torch.testing.assert_close(logits[0], ref_logits[i], atol=2e-5, rtol=1e-5)


def test_batch_rows_are_independent(tiny_model):
    seqs = torch.tensor([TOKS[:8], TOKS[8:16], TOKS[4:12]])
    with torch.no_grad():
        batched, bstate = tiny_model(seqs)
        for i in range(3):
            single, sstate = tiny_model(seqs[i : i + 1])
            torch.testing.assert_close(batched[i], single[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(bstate[1][1][i], sstate[1][1][0], atol=1e-6, rtol=1e-5)
    # step on a batch equals step row by row
    s = state_select(bstate, [2, 0])
    logits, _ = tiny_model.step(torch.tensor([5, 6]), s)
    for j, row in enumerate([2, 0]):
        one, _ = tiny_model.step(torch.tensor([5 + j]), state_select(bstate, [row]))
        torch.testing.assert_close(logits[j], one[0], atol=1e-5, rtol=1e-5)


def test_step_does_not_modify_its_input_state(tiny_model):
    state = tiny_model.init_state(2)
    _, state = tiny_model.step(torch.tensor([1, 2]), state)
    before = [tuple(t.clone() for t in layer) for layer in state]
    tiny_model.step(torch.tensor([3, 4]), state)
    for a, b in zip(before, state):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_init_state_shapes_and_dtype(tiny_model):
    shapes = [tuple(t.shape) for t in tiny_model.init_state(4)[0]]
    assert shapes == [(4, 128), (4, 2, 64, 64), (4, 128)]
    assert all(t.dtype == torch.float32 for t in tiny_model.init_state(1)[0])


def test_state_dict_keys_are_blinkdl_layout(tiny_model):
    want = set(make_random_model_sd(2, 128))
    assert set(tiny_model.state_dict()) == want
    assert "blocks.0.att.v0" not in want and "blocks.1.att.v0" in want
    for name in ("receptance", "key", "value", "output"):
        assert isinstance(getattr(tiny_model.blocks[1].att, name), torch.nn.Linear)
    assert isinstance(tiny_model.blocks[0].ffn.key, torch.nn.Linear)
    assert isinstance(tiny_model.head, torch.nn.Linear) and isinstance(tiny_model.emb, torch.nn.Embedding)


def test_forward_hidden_plus_head_equals_forward(tiny_model):
    idx = torch.tensor([TOKS[:9]])
    with torch.no_grad():
        logits, _ = tiny_model(idx)
        h, _ = tiny_model.forward_hidden(idx)
    assert h.shape == (1, 9, 128)
    torch.testing.assert_close(tiny_model.head(h), logits)


def test_wkv_impls_agree_inside_the_model(tiny_model):
    idx = torch.tensor([TOKS * 3])  # 60 tokens: several chunks
    with torch.no_grad():
        tiny_model.wkv_impl = "ref"
        a, sa = tiny_model(idx)
        tiny_model.wkv_impl = "chunked"
        b, sb = tiny_model(idx)
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(sa[1][1], sb[1][1], atol=1e-5, rtol=1e-5)
    tiny_model.wkv_impl = "bogus"
    with pytest.raises(ValueError, match="wkv_impl"):
        tiny_model(idx)


def test_gradient_checkpointing_gives_same_gradients(tiny_model):
    idx = torch.tensor([TOKS[:16]])
    tiny_model.train()
    grads = []
    for cp in (False, True):
        tiny_model.zero_grad()
        tiny_model.gradient_checkpointing = cp
        logits, _ = tiny_model(idx)
        torch.nn.functional.cross_entropy(logits[0, :-1], idx[0, 1:]).backward()
        grads.append({n: p.grad.clone() for n, p in tiny_model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    assert grads[0]["blocks.0.att.w1"].abs().sum() > 0  # gradient reaches the decay LoRA
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-4)


def test_bf16_weights_track_fp32(tiny_model_path):
    m32 = load_model(tiny_model_path)
    m16 = load_model(tiny_model_path, dtype=torch.bfloat16)
    assert m16.head.weight.dtype == torch.bfloat16
    idx = torch.tensor([TOKS[:10]])
    with torch.no_grad():
        a, _ = m32(idx)
        b, sb = m16(idx)
        c, _ = m16.step(idx[:, 0], m16.init_state(1))
    assert b.dtype == torch.float32 and sb[0][1].dtype == torch.float32
    assert (a - b).abs().max() < 0.1 * a.abs().max()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.99
    torch.testing.assert_close(c[0], b[0, 0], atol=0.05, rtol=0.05)


def test_config_suggested_shapes_match_rwkv7_g1_0p1b():
    cfg = RWKV7Config.suggested(12, 768)
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate, cfg.dim_ffn, cfg.n_head) == (64, 64, 32, 128, 3072, 12)
    with torch.device("meta"):
        m = RWKV7(cfg)
    assert sum(p.numel() for p in m.parameters()) == cfg.n_params()


def test_model_code_does_no_io():
    import inspect

    import rwkvforge.model.rwkv7 as r
    import rwkvforge.model.wkv as w

    for mod in (r, w):
        src = inspect.getsource(mod)
        for bad in ("print(", "os.environ", "open(", "torch.load", "torch.save"):
            assert bad not in src, f"{mod.__name__} uses {bad}"


@pytest.mark.parametrize("mode", [torch.bfloat16, torch.int8])
def test_low_precision_inference_modes_track_exact_and_follow_weight_changes(tiny_model, mode):
    idx = torch.tensor([TOKS[:12]] * 2)
    with torch.no_grad():
        exact, s_exact = tiny_model(idx)
        e_step, _ = tiny_model.step(idx[:, 0], tiny_model.init_state(2))
        tiny_model.infer_dtype = mode
        fast, s_fast = tiny_model(idx)  # 24 rows: bf16 GEMMs
        f_step, _ = tiny_model.step(idx[:, 0], tiny_model.init_state(2))  # 2 rows: int8 in int8 mode
    assert s_fast[0][1].dtype == torch.float32
    assert not torch.equal(fast, exact)  # the knob really changes the arithmetic
    for a, b in ((fast, exact), (f_step, e_step)):
        err = (a - b).abs().max() / b.abs().max()
        assert err < 0.05, err
        assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.999
    # weights edited in place (e.g. a LoRA merge): the cached copies must follow
    with torch.no_grad():
        tiny_model.head.weight.mul_(2.0)
        doubled, _ = tiny_model.step(idx[:, 0], tiny_model.init_state(2))
        tiny_model.blocks[1].att.x_r.zero_()
        shifted, _ = tiny_model.step(idx[:, 0], tiny_model.init_state(2))
        tiny_model.infer_dtype = None
        ref_shifted, _ = tiny_model.step(idx[:, 0], tiny_model.init_state(2))
    torch.testing.assert_close(doubled, 2 * f_step, atol=0.05 * f_step.abs().max().item(), rtol=0.02)
    assert (shifted - ref_shifted).abs().max() < 0.05 * ref_shifted.abs().max()
    # training never uses the cached copies
    tiny_model.infer_dtype = mode
    tiny_model.train()
    logits, _ = tiny_model(idx)
    logits.sum().backward()
    assert tiny_model.head.weight.grad is not None


@pytest.mark.parametrize("mode", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("batch", [1, 9])
def test_fast_decode_tracks_exact_over_many_steps(tiny_model, mode, batch):
    """Teacher-forced multi-step decode: the fast path (int8 GEMV / bf16 GEMMs + the fused
    WKV state update) stays within 5% (max abs logit error relative to the max |logit|) of
    the exact fp32 path at every step, state errors do not blow up, and the state stays fp32."""
    g = torch.Generator().manual_seed(3)
    toks = torch.randint(0, tiny_model.config.vocab_size, (24, batch), generator=g)
    outs = {}
    for m in (None, mode):
        tiny_model.infer_dtype = m
        state, rows = tiny_model.init_state(batch), []
        with torch.no_grad():
            for t in toks:
                logits, state = tiny_model.step(t, state)
                rows.append(logits)
        assert state[0][1].dtype == torch.float32
        outs[m] = torch.stack(rows)
    tiny_model.infer_dtype = None
    exact, fast = outs[None], outs[mode]
    assert not torch.equal(fast, exact)
    err = ((fast - exact).abs().amax(dim=(1, 2)) / exact.abs().amax(dim=(1, 2)))
    assert err.max() < 0.05, err
    assert err[-4:].max() < 4 * err[:4].max() + 0.01, err  # no drift over the steps


def test_fused_inference_form_matches_the_training_form(tiny_model):
    """No-grad calls take TimeMix's fused form (stacked mixes, addmm, lerp); it must compute
    what the autograd form computes, up to fp32 rounding, for logits and every state."""
    from rwkvforge.model.rwkv7 import TimeMix

    idx = torch.tensor([TOKS[:12]] * 2)
    assert TimeMix.fused_inference
    with torch.no_grad():
        fused, s_fused = tiny_model(idx)
    plain, s_plain = tiny_model(idx)  # grad enabled: the training form
    torch.testing.assert_close(fused, plain.detach(), rtol=1e-5, atol=1e-5)
    for a, b in zip(s_fused, s_plain):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y.detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("T", [1, 7])
def test_token_shift_compiled_form_matches_the_cat(T):
    """Under torch.compile the token shift is roll + where (no masked loads in inductor's
    kernels); values and gradients (of x and of the carried-in shift) equal the eager cat's,
    in bf16 and fp32."""
    from rwkvforge.model.rwkv7 import token_shift

    torch._dynamo.reset()
    compiled = torch.compile(token_shift, backend="inductor", fullgraph=True)
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(T)
        x0, s0 = torch.randn(2, T, 16, dtype=dtype), torch.randn(2, 16)
        g = torch.randn(2, T, 16, dtype=dtype)
        got, want = [], []
        for fn, out in ((compiled, got), (token_shift, want)):
            x, s = x0.clone().requires_grad_(), s0.clone().requires_grad_()
            y = fn(x, s)
            (y.float() * g.float()).sum().backward()
            out += [y.detach(), x.grad, s.grad]
        assert torch.equal(want[0][:, 0], s0.to(dtype)) and torch.equal(want[0][:, 1:], x0[:, :-1])
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
    torch._dynamo.reset()


@pytest.mark.slow
def test_token_shift_bench_runs_and_restores_the_model_code(capsys):
    """bench/token_shift_bench.py (the source of token_shift's figures) times both compiled
    forms and leaves rwkv7.token_shift as it found it."""
    import importlib.util
    from pathlib import Path

    from rwkvforge.model import rwkv7

    before = rwkv7.token_shift
    path = Path(__file__).resolve().parents[1] / "bench" / "token_shift_bench.py"
    spec = importlib.util.spec_from_file_location("token_shift_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    torch._dynamo.reset()
    try:
        assert bench.main(["--reps", "2", "--ctx-len", "16", "--n-embd", "128",
                           "--profile"]) == 0
    finally:
        torch._dynamo.reset()
        torch._inductor.config.cpp.enable_kernel_profile = False
    out = capsys.readouterr().out
    assert "roll + where  min" in out and "cat           min" in out
    assert "x as fast as cat (medians)" in out
    assert out.count(" kernels; slowest ") == 2  # --profile: both forms' fused kernels
    assert rwkv7.token_shift is before

"""The decode step's kernels (model/decode.py, csrc/decode_cpu.c) against the torch products
they replace, the sparse channel-mix inside RWKV7.step against the dense one, and the
accuracy gate of the bf16 decode mode (docs/inference.md states it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkvforge.model import decode

needs_kernel = pytest.mark.skipif(not decode.available(), reason="no C compiler: decode_cpu "
                                  "not built (the torch ops run instead)")
EPS32 = torch.finfo(torch.float32).eps


def _bound(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """fp32 summation error bound of a @ w per output: K * eps * sum_k |a_k w_k| (w (K,N))."""
    return a.shape[1] * EPS32 * (a.double().abs() @ w.double().abs())


@needs_kernel
@pytest.mark.parametrize("B,N,K", [(1, 70, 48), (3, 33, 256), (16, 64, 128)])
def test_gemv_bf16_is_the_fp32_product_of_the_bf16_weight(B, N, K):
    g = torch.Generator().manual_seed(B * N)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g).bfloat16()
    with torch.no_grad():
        y = decode.gemv_bf16(x, w)
    ref = x.double() @ w.double().t()  # bf16 -> fp32/64 widening is exact
    assert y.shape == (B, N) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= _bound(x, w.t().float()) + 1e-30).all()


@needs_kernel
def test_gemv_bf16_declines_what_it_does_not_take():
    w = torch.randn(8, 40).bfloat16()  # K not a multiple of 16
    with torch.no_grad():
        assert decode.gemv_bf16(torch.randn(1, 40), w) is None
        assert decode.gemv_bf16(torch.randn(17, 48), torch.randn(8, 48).bfloat16()) is None
        assert decode.gemv_bf16(torch.randn(1, 48), torch.randn(8, 48)) is None  # fp32 weight
    x = torch.randn(1, 48, requires_grad=True)
    assert decode.gemv_bf16(x, torch.randn(8, 48).bfloat16()) is None  # autograd: torch ops


@needs_kernel
@pytest.mark.parametrize("B,N,K", [(1, 48, 64), (4, 96, 34), (7, 32, 256), (8, 64, 128),
                                   (16, 80, 96), (13, 16, 2)])
def test_packed_bf16_product_is_the_product_of_the_bf16_weight(B, N, K):
    """gemm_bf16p over pack_bf16's layout: with fp32 activations, the fp32 product of the
    bf16 weight (within fp32 summation error); with bf16 activations (8+ rows, AVX512-BF16),
    the product of both rounded to bf16, as torch's bf16 GEMM computes it."""
    g = torch.Generator().manual_seed(B * N + K)
    x = torch.randn(B, K, generator=g)
    w = torch.randn(N, K, generator=g)
    wb = w.bfloat16()
    p = decode.pack_bf16(w)
    assert p.shape == (N // 16, K // 2, 16, 2)
    with torch.no_grad():
        y = decode.gemm_bf16p(x, p)
        y_dp = decode.gemm_bf16p(x, p, bf16_rows=True)
    ref = x.double() @ wb.double().t()
    assert y.shape == (B, N) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= _bound(x, wb.t().float()) + 1e-30).all()
    xr = x.bfloat16() if decode.dp_available() else x
    ref_dp = xr.double() @ wb.double().t()
    assert ((y_dp.double() - ref_dp).abs() <= _bound(xr.float(), wb.t().float()) + 1e-30).all()
    if decode.dp_available():  # the bf16 activations are used (not silently fp32)
        assert not torch.equal(y_dp, y)


@needs_kernel
@pytest.mark.parametrize("dp", [True, False])
def test_packed_bf16_product_over_many_blocks_and_both_threads(dp, monkeypatch):
    """A shape the software prefetch runs across blocks, thread slices and past the end of the
    packed weight (37 blocks, K/2 odd, 2 threads): still the bound; `dp` False forces the
    fp32-activation form a CPU without AVX512-BF16 takes for 8+ rows."""
    if not dp:
        monkeypatch.setattr(decode, "dp_available", lambda: False)
    g = torch.Generator().manual_seed(37)
    B, N, K = 16, 16 * 37, 770
    x = torch.randn(B, K, generator=g)
    wb = torch.randn(N, K, generator=g).bfloat16()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            y = decode.gemm_bf16p(x, decode.pack_bf16(wb), bf16_rows=True)
    finally:
        torch.set_num_threads(threads)
    xr = x.bfloat16().float() if decode.dp_available() else x
    ref = xr.double() @ wb.double().t()
    assert ((y.double() - ref).abs() <= _bound(xr, wb.t().float()) + 1e-30).all()


@needs_kernel
@pytest.mark.parametrize("B,dp", [(3, True), (9, True), (9, False)])
def test_step_low_rank_products_are_the_bf16_products(tiny_model, B, dp, monkeypatch):
    """RWKV7._mm (step's w/a/v/g low-rank products) in bf16 mode: x @ bf16(w) + bias within
    fp32 summation error (activations bf16 from 8 rows where the CPU has AVX512-BF16; `dp`
    False forces the fp32-activation form); the exact mode keeps the fp32 torch product."""
    if not dp:
        monkeypatch.setattr(decode, "dp_available", lambda: False)
    att = tiny_model.blocks[1].att
    g = torch.Generator().manual_seed(B)
    x = torch.randn(B, att.w1.shape[0], generator=g)
    bias = torch.randn(att.w1.shape[1], generator=g)
    with torch.no_grad():
        tiny_model.infer_dtype = None
        exact = tiny_model._mm(x, att.w1, bias)
        tiny_model.infer_dtype = torch.bfloat16
        try:
            y = tiny_model._mm(x, att.w1, bias)
        finally:
            tiny_model.infer_dtype = None
    assert torch.equal(exact, torch.addmm(bias, x, att.w1))
    wb = att.w1.detach().bfloat16().float()
    xr = x.bfloat16().float() if B > 7 and decode.dp_available() else x
    ref = xr.double() @ wb.double() + bias.double()
    assert ((y.double() - ref).abs() <= _bound(xr, wb) + 1e-6 * bias.abs().max()).all()
    assert not torch.equal(y, exact)  # the bf16 weight is really used


@needs_kernel
@pytest.mark.parametrize("B", [1, 5, 16])
def test_packed_product_extras_are_the_torch_ops_around_it(B):
    """gemm_bf16p's element-wise extras against the same product with torch ops around it:
    x * xmul and relu(x)^2 first, + bias, tanh / sigmoid, + resid after. The adds and the
    input work round as torch's (equal); the activations within 1e-6 of torch's."""
    g = torch.Generator().manual_seed(B)
    N, K = 48, 96
    p = decode.pack_bf16(torch.randn(N, K, generator=g))
    x, xmul = torch.randn(B, K, generator=g), torch.randn(B, K, generator=g)
    bias, resid = torch.randn(N, generator=g), torch.randn(B, N, generator=g)
    with torch.no_grad():
        plain = lambda t: decode.gemm_bf16p(t, p, B > 7)  # noqa: E731
        assert torch.equal(decode.gemm_bf16p(x, p, B > 7, xmul=xmul), plain(x * xmul))
        assert torch.equal(decode.gemm_bf16p(x, p, B > 7, relu2=True),
                           plain(torch.relu(x).square()))
        assert torch.equal(decode.gemm_bf16p(x, p, B > 7, bias=bias, resid=resid),
                           resid + (plain(x) + bias))
        for act, fn in (("tanh", torch.tanh), ("sigmoid", torch.sigmoid)):
            for scale in (1.0, 30.0):  # saturated lanes too
                y = decode.gemm_bf16p(x * scale, p, B > 7, bias=bias, act=act)
                torch.testing.assert_close(y, fn(plain(x * scale) + bias), atol=1e-6, rtol=0)
        # an extra it cannot take (wrong dtype / shape): None, the caller does it in torch
        assert decode.gemm_bf16p(x, p, B > 7, bias=bias.double()) is None
        assert decode.gemm_bf16p(x, p, B > 7, resid=resid[:, :8]) is None


@needs_kernel
def test_ln_mix_is_layer_norm_and_the_token_shift_mix(tiny_model):
    """decode.ln_mix: ln(x) and ln(x) + (shift - ln(x)) * maa[m] as torch's layer_norm and
    addcmul, for the six time-mix vectors (M,1,C) and the channel-mix one (C,)."""
    blk = tiny_model.blocks[1]
    C = tiny_model.config.n_embd
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        blk.ln1.weight.copy_(torch.randn(C, generator=g))
        blk.ln1.bias.copy_(torch.randn(C, generator=g))
        x, shift = torch.randn(3, C, generator=g) * 4 + 1, torch.randn(3, C, generator=g)
        for maa in (torch.rand(6, 1, C, generator=g), torch.rand(C, generator=g)):
            ln, mix = decode.ln_mix(x, shift, blk.ln1, maa)
            ref = blk.ln1(x)
            torch.testing.assert_close(ln, ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mix.view(-1, 3, C), torch.addcmul(ref, shift - ref, maa)
                                       .view(-1, 3, C), atol=1e-5, rtol=1e-5)
        assert decode.ln_mix(x.double(), shift, blk.ln1, maa) is None


@needs_kernel
def test_bf16_step_with_its_c_extras_equals_it_with_torch_ops(tiny_model, monkeypatch):
    """RWKV7.step in bf16 mode, 1 and 9 streams: with ln_mix and the products' extras in C
    vs the same step with torch doing that work, to fp32 rounding."""
    from rwkvforge.model.rwkv7 import _epilogue, _prologue

    V = tiny_model.config.vocab_size
    outs = {}
    tiny_model.infer_dtype = torch.bfloat16
    try:
        for fused in (True, False):
            if not fused:  # the plain product with rwkv7's torch forms of the extras
                real = decode.gemm_bf16p
                monkeypatch.setattr(decode, "ln_mix", lambda *a: None)
                monkeypatch.setattr(decode, "gemm_bf16p", lambda x, p, bf16_rows=False, **epi:
                                    _epilogue(real(_prologue(x, **epi), p, bf16_rows), **epi))
            with torch.no_grad():
                for B in (1, 9):
                    state = tiny_model.init_state(B)
                    for t in (1, 50, 300, 7000):
                        logits, state = tiny_model.step(
                            (torch.arange(B) * 7 + t) % V, state)
                    outs[fused, B] = logits
    finally:
        tiny_model.infer_dtype = None
    for B in (1, 9):
        ref = outs[False, B]
        torch.testing.assert_close(outs[True, B], ref, atol=1e-5 * ref.abs().max().item(), rtol=0)


@needs_kernel
@pytest.mark.parametrize("sparse", [False, True])
def test_bf16_step_layer_in_c_equals_the_step_in_pieces(tiny_model, monkeypatch, sparse):
    """RWKV7.step in bf16 mode with each layer in one C call (decode.layer_step, one OpenMP
    team for the layer) vs the same step in pieces (fused_layer off: the products, WKV and
    ln_mix called one by one from Python): logits and every state the same, for 1, 3 (fp32
    activations), 9 and 16 streams (bf16 activations), the channel-mix dense and, with
    `sparse`, through its picked rows (density limit lifted so the random model takes it).
    (Bit-identical on the machines this was built on; the bound catches a wrong buffer or a
    missing barrier, which move the logits by 10-60%.)"""
    if sparse:
        monkeypatch.setattr(decode, "SPARSE_MAX_DENSITY", 1.0)
    V = tiny_model.config.vocab_size
    ran = []
    real = decode.layer_step
    monkeypatch.setattr(decode, "layer_step", lambda f, s: ran.append(real(f, s)) or ran[-1])
    tiny_model.infer_dtype = torch.bfloat16
    try:
        for B in (1, 3, 9, 16):
            outs = {}
            for fused in (True, False):
                tiny_model.fused_layer = fused
                with torch.no_grad():
                    state = tiny_model.init_state(B)
                    for t in (1, 50, 300, 7000, 5):
                        logits, state = tiny_model.step((torch.arange(B) * 7 + t) % V, state,
                                                        inplace=fused)
                outs[fused] = logits, state
            (lc, sc), (lp, sp) = outs[True], outs[False]
            torch.testing.assert_close(lc, lp, atol=1e-5 * lp.abs().max().item(), rtol=0)
            for a, b in zip(sc, sp):
                for x, y in zip(a, b):
                    torch.testing.assert_close(x, y, atol=1e-5 * y.abs().max().item(), rtol=0)
    finally:
        tiny_model.infer_dtype, tiny_model.fused_layer = None, True
    n_layer = tiny_model.config.n_layer
    assert len(ran) == 4 * 5 * n_layer and None not in ran  # every layer ran in C
    if sparse:  # B <= SPARSE_MAX_ROWS took the picked rows (fewer than all, random model)
        assert any(r < tiny_model.blocks[0].ffn.key.weight.shape[0] for r in ran)


@needs_kernel
def test_bf16_step_layer_in_c_follows_weight_changes(tiny_model):
    """The C layer's cached arguments follow in-place changes of a layer's weights and of its
    small parameters (a LoRA merge, a tuned mixing vector): after the change the step equals
    the step in pieces on the changed model."""
    V = tiny_model.config.vocab_size
    idx = torch.tensor([5, 300 % V])
    tiny_model.infer_dtype = torch.bfloat16
    try:
        with torch.no_grad():
            before, _ = tiny_model.step(idx, tiny_model.init_state(2))  # builds the cache
            att = tiny_model.blocks[1].att
            att.receptance.weight.mul_(1.5)
            att.x_r.add_(0.25)
            outs = {}
            for fused in (True, False):
                tiny_model.fused_layer = fused
                outs[fused], _ = tiny_model.step(idx, tiny_model.init_state(2))
    finally:
        tiny_model.infer_dtype, tiny_model.fused_layer = None, True
    assert not torch.allclose(outs[True], before)  # the change moved the logits
    torch.testing.assert_close(outs[True], outs[False], atol=1e-5 * outs[False].abs().max().item(),
                               rtol=0)


def test_fp16_weights_prefill_in_bf16_mode(tiny_model_path):
    """An fp16 model in the bf16 mode (infer --dtype fp16 on CPU): a prompt of 8+ tokens
    takes the bf16 GEMMs; their kept bf16 results met fp16 activations, promoted the
    residual to fp32, and the next LayerNorm refused it. Now it prefills, near fp32."""
    from rwkvforge.checkpoint import load_model

    m16 = load_model(tiny_model_path, dtype=torch.float16)
    m32 = load_model(tiny_model_path)
    m16.infer_dtype = torch.bfloat16
    ids = torch.arange(1, 13)[None] * 37 % m32.config.vocab_size
    with torch.no_grad():
        h16, _ = m16.forward_hidden(ids, m16.init_state(1))
        h32, _ = m32.forward_hidden(ids, m32.init_state(1))
    assert h16.dtype == torch.float16
    assert (h16.float() - h32).abs().max() <= 0.05 * h32.abs().max()


@needs_kernel
def test_packed_bf16_declines_what_it_does_not_take():
    assert decode.pack_bf16(torch.randn(24, 32)) is None  # N not a multiple of 16
    assert decode.pack_bf16(torch.randn(32, 33)) is None  # K odd
    p = decode.pack_bf16(torch.randn(32, 48))
    with torch.no_grad():
        assert decode.gemm_bf16p(torch.randn(17, 48), p) is None  # more rows than MAX_ROWS
        assert decode.gemm_bf16p(torch.randn(2, 64), p) is None  # K mismatch
    assert decode.gemm_bf16p(torch.randn(1, 48, requires_grad=True), p) is None  # autograd


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 5, 16])
def test_sparse_channel_mix_equals_the_dense_product(dtype, B):
    g = torch.Generator().manual_seed(B)
    F_, C = 320, 112  # C: a 64-column tile and a 48-column rest
    k = torch.randn(B, F_, generator=g)
    k[:, : F_ // 3] = -k[:, : F_ // 3].abs()  # a third of the channels are off in every row
    w = (torch.randn(C, F_, generator=g) / 20).to(dtype)  # value.weight (out, in)
    wt = w.t().contiguous()
    a = torch.relu(k).square()
    ref = a.double() @ wt.double()
    with torch.no_grad():
        kk = k.clone()
        y = decode.ffn_sparse(kk, wt)
        dense = F.linear(a, w.float())
    assert torch.equal(kk, a)  # the activation is left in k, as documented
    bound = _bound(a, wt.float()) + 1e-30
    assert ((y.double() - ref).abs() <= bound).all()
    assert ((dense.double() - ref).abs() <= bound).all()  # the same bound holds the dense one
    torch.testing.assert_close(decode.torch_ffn_sparse(k, wt), y, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # no channel on: nothing read, zeros out
        assert torch.equal(decode.ffn_sparse(-k.abs(), wt), torch.zeros(B, C))


@needs_kernel
def test_sparse_channel_mix_hands_a_dense_activation_to_the_dense_product():
    """Past max_density the kernel reads nothing and `dense` gets relu(k)^2; below it the
    rows are read sparsely and `dense` is not called."""
    g = torch.Generator().manual_seed(7)
    F_, C = 256, 64
    wt = torch.randn(F_, C, generator=g).bfloat16()
    calls = []

    def dense(a):
        calls.append(a.clone())
        return a @ wt.float()

    for on, want_calls in ((0.9, 1), (0.1, 0)):
        k = torch.randn(1, F_, generator=g).abs() + 0.1
        k[:, int(F_ * on):] = -1.0  # channels on: the first `on` fraction
        a = torch.relu(k).square()
        calls.clear()
        decode.STATS.clear()
        with torch.no_grad():
            y = decode.ffn_sparse(k.clone(), wt, 0.4, dense)
        assert len(calls) == want_calls
        if want_calls:
            assert torch.equal(calls[0], a)
        assert decode.STATS["read"] == (F_ if want_calls else int(F_ * on))
        torch.testing.assert_close(y, a @ wt.float(), atol=1e-4, rtol=1e-5)


def test_step_with_the_sparse_channel_mix_equals_the_dense_step(tiny_model):
    """Exact mode: the sparse channel-mix changes only the fp32 summation order."""
    V = tiny_model.config.vocab_size
    ids = [t % V for t in (1, 50, 300, 7000, 12, 65535, 0, 5)]
    outs = {}
    with torch.no_grad():
        for sparse in (False, True):
            tiny_model.sparse_ffn = sparse
            state = tiny_model.init_state(2)
            for t in ids:
                logits, state = tiny_model.step(torch.tensor([t, (t * 7 + 3) % V]), state)
            outs[sparse] = (logits, state)
    (d, ds), (s, ss) = outs[False], outs[True]
    scale = d.abs().max().item()
    torch.testing.assert_close(s, d, atol=1e-5 * scale, rtol=0)
    for a, b in zip(ss, ds):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5 * max(1.0, y.abs().max().item()), rtol=0)


@needs_kernel
def test_fused_wkv_step_equals_the_torch_ops(tiny_model):
    """decode.wkv_step against RWKV7._time_mix_tail (the exact mode's torch ops) on one
    layer's constants, with a non-trivial state, for 1 and 3 streams."""
    from rwkvforge.model.rwkv7 import LN_X_EPS

    blk = tiny_model.blocks[1]
    att = blk.att
    with torch.no_grad():  # non-trivial per-channel constants
        for p in (att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    c = tiny_model._step_consts(blk, torch.float32)
    H, N = att.n_head, att.head_size
    for B in (1, 3):
        g = torch.Generator().manual_seed(B)
        S = torch.randn(B, H, N, N, generator=g) * 0.3
        w, k, v, r = (torch.randn(B, H * N, generator=g) for _ in range(4))
        w[0, :8] = torch.tensor([-200.0, -90.0, -30.0, -5.0, 5.0, 30.0, 90.0, 200.0])
        w[-1, -4:] = 0.0  # the kernel's own exp: its clamped range ends, sigmoid 0.5
        a = torch.rand(B, H * N, generator=g)
        before = S.clone()
        with torch.no_grad():
            y, S2 = decode.wkv_step(S, w, k, a, v, r, c, LN_X_EPS)
            ry, rS2 = tiny_model._time_mix_tail(S, w, k, a, v, r, c, att)
        assert torch.equal(S, before)  # the input state is not modified
        torch.testing.assert_close(S2, rS2.view(B, H, N, N), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, ry, atol=1e-4, rtol=1e-4)  # after a GroupNorm: ~1e-6 x 1/std


def test_fused_step_equals_the_torch_step(tiny_model):
    V = tiny_model.config.vocab_size
    outs = {}
    with torch.no_grad():
        for fused in (False, True):
            tiny_model.fused_step = fused
            state = tiny_model.init_state(2)
            for t in (1, 50, 300, 7000, 12):
                logits, state = tiny_model.step(torch.tensor([t % V, (3 * t) % V]), state)
            outs[fused] = (logits, state)
    (d, ds), (s, ss) = outs[False], outs[True]
    torch.testing.assert_close(s, d, atol=1e-5 * d.abs().max().item(), rtol=0)
    for a, b in zip(ss, ds):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, atol=1e-5 * max(1.0, y.abs().max().item()), rtol=0)


@pytest.mark.parametrize("mode", [None, torch.bfloat16])
def test_step_inplace_is_the_same_step_on_the_same_memory(tiny_model, mode):
    """step(inplace=True) (generate.Engine's decode) returns the same logits and state as a
    step into fresh tensors; where the C kernel runs, its WKV states are the input's memory
    (updated there), and without `inplace` the input state is left untouched."""
    V = tiny_model.config.vocab_size
    tiny_model.infer_dtype = mode
    try:
        with torch.no_grad():
            state = tiny_model.init_state(3)
            for t in (1, 50, 300):
                _, state = tiny_model.step(torch.tensor([t, 2 * t, 3 * t]) % V, state)
            frozen = [tuple(x.clone() for x in layer) for layer in state]
            idx = torch.tensor([7000, 12, 9]) % V
            ref, ref_state = tiny_model.step(idx, state)
            assert all(torch.equal(x, y) for a, b in zip(state, frozen) for x, y in zip(a, b))
            got, got_state = tiny_model.step(idx, state, inplace=True)
    finally:
        tiny_model.infer_dtype = None
    assert torch.equal(got, ref)
    assert all(torch.equal(x, y) for a, b in zip(got_state, ref_state) for x, y in zip(a, b))
    if decode.available():  # the kernel ran: the new WKV state is the old one's memory
        assert all(n[1].data_ptr() == o[1].data_ptr() for n, o in zip(got_state, state))
        assert not torch.equal(state[0][1], frozen[0][1])  # ... updated there


def test_decode_layout_keeps_values_outputs_and_saved_files(tiny_model, tmp_path):
    """use_decode_layout (what set_fast_path does on CPU) changes memory layout only: the
    same state dict, the same step and forward (fp32 rounding), a .pth saved from it equal to
    one saved before, and the weights still train."""
    from rwkvforge.checkpoint import load_model, save_pth
    from rwkvforge.generate import set_fast_path

    V = tiny_model.config.vocab_size
    ids = torch.tensor([[1, 50 % V, 300 % V, 7000 % V]])
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    with torch.no_grad():
        f0, _ = tiny_model(ids)
        s0, _ = tiny_model.step(ids[:, 0], tiny_model.init_state(1))
    set_fast_path(tiny_model, "none", "cpu")
    assert not tiny_model.head.weight.is_contiguous()  # (in, out) storage, (out, in) view
    after = tiny_model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with torch.no_grad():
        f1, _ = tiny_model(ids)
        s1, _ = tiny_model.step(ids[:, 0], tiny_model.init_state(1))
    torch.testing.assert_close(f1, f0, atol=1e-5 * f0.abs().max().item(), rtol=0)
    torch.testing.assert_close(s1, s0, atol=1e-5 * s0.abs().max().item(), rtol=0)
    path = save_pth(tiny_model.state_dict(), tmp_path / "m.pth")
    again = load_model(path).state_dict()
    assert all(torch.equal(again[k], before[k]) for k in before)
    tiny_model.train()
    loss = tiny_model(ids)[0].square().mean()
    loss.backward()
    assert tiny_model.head.weight.grad is not None and tiny_model.head.weight.grad.shape == \
        tiny_model.head.weight.shape


# The bf16 decode mode's gate (docs/inference.md, "Accuracy"): against the exact fp32 step
# over a greedy generation, teacher-forced: max logit error <= 2% of the max |logit|, mean
# <= 1% of the mean |logit|, greedy token the same at >= 95% of the steps.
BF16_GATE = {"max_err": 0.02, "mean_err": 0.01, "agree": 0.95}


@pytest.mark.slow
def test_bf16_decode_mode_passes_its_accuracy_gate(tiny_model):
    V = tiny_model.config.vocab_size
    rep = decode.fast_path_accuracy(tiny_model, torch.bfloat16, [1, 50 % V, 300 % V, 7000 % V], 64)
    assert rep["max_err"] > 0  # the mode really reads bf16 weights
    assert rep["max_err"] <= BF16_GATE["max_err"], rep
    assert rep["mean_err"] <= BF16_GATE["mean_err"], rep
    assert rep["agree"] >= BF16_GATE["agree"], rep

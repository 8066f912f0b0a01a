"""The decode step's native kernels (csrc/decode_cpu.c) and their torch forms.

Decoding reads every weight once per token, so its speed is bandwidth / bytes read, plus
whatever else a step spends per call. Here:

- `layer_step(Layer, scratch)`: a whole bf16-mode layer of `RWKV7.step` in one C call (one
  OpenMP team for its products, element-wise work, WKV step and channel mix); `RWKV7._step_layer`
  fills the `Layer` struct. The pieces below are what it is made of, and what the step uses
  where it does not apply.
- `gemm_bf16p(x, packed, ...)`: the packed bf16 product for up to 16 rows, each weight line
  read once for all rows, with the element-wise work around a product in the same call;
  `ln_mix`: LayerNorm + the token-shift mixes; `wkv_step`: the WKV step with its per-element
  work.

- `gemv_bf16(x, w)`: x (B,K) fp32 @ w (N,K) bf16 ^T -> (B,N) fp32, fp32 accumulation; half
  the bytes of the fp32 weight at the bandwidth torch's fp32 GEMV reaches (torch's own bf16
  one-row matmul runs at about half of it on CPU, which loses the saving).
- `ffn_sparse(k, wt)`: relu(k)^2 @ wt for the channel-mix value weight kept transposed
  (wt (F,C): row j = input channel j), reading only the rows of channels where relu(k) is
  non-zero in some row. Exact (zeros add nothing); fp32 summation order only.

Each returns None where the kernel is unavailable or does not apply (CUDA, grad, > 16 rows,
odd widths); the caller then uses the torch op. `torch_ffn_sparse` is the torch form of the
sparse product (the oracle of the tests, and the CPU path where no C compiler exists).
"""

from __future__ import annotations

import ctypes
import functools
from typing import Callable

import torch

from rwkvforge import native

MAX_ROWS = 16  # rows (streams) per call; more rows are GEMMs, where the dense matmul wins
# the sparse channel-mix reads a value row when its channel is on in ANY stream: with more
# streams the union covers nearly every row (random model: ~50% at 1 row, ~94% at 4, all at
# 16) and the dense GEMM, which reuses each row across streams in registers, is faster
SPARSE_MAX_ROWS = 4
# above this fraction of channels on, RWKV7.step's channel-mix takes the dense packed product
# (measured on the 0.1B shape, one stream: equal speed at ~50%, the sparse read 6x faster at 12%)
SPARSE_MAX_DENSITY = 0.4
# ffn_sparse's running count: "rows" of the value weight there are, "read" of them (the bench
# reports the fraction; clear() it to start a count)
STATS: dict[str, int] = {}


class Layer(ctypes.Structure):
    """csrc/decode_cpu.c's rf_layer: one bf16-mode decode layer's sizes, weights and buffers
    (RWKV7._step_layer fills it; `layer_step` runs it)."""
    _fields_ = ([(n, ctypes.c_int64) for n in (
        "B", "C", "H", "N", "F", "dw", "da", "dv", "dg", "layer0", "bf16rows", "nthreads",
        "sparse_max", "sparse_nnz")]
        + [("ln_eps", ctypes.c_float), ("lnx_eps", ctypes.c_float)]
        + [(n, ctypes.c_void_p) for n in (
            "ln1w", "ln1b", "ln2w", "ln2b", "maa", "ffn_xk", "w0", "a0", "v0", "k_k", "k_a",
            "r_k", "lnxw", "lnxb", "Wr", "Wk", "Wv", "Wo", "Wkey", "Wval", "w1", "w2", "a1",
            "a2", "v1", "v2", "g1", "g2", "WvalT", "x", "att_shift", "ffn_shift",
            "att_shift_out", "ffn_shift_out", "S", "v_first", "work", "xp", "nz")]
        + [("ffn_read", ctypes.c_int64)])


def layer_struct(fields: dict) -> Layer:
    """A Layer from `fields` (its field names: ints, floats, tensors -> their data pointers,
    None -> NULL). The caller keeps the tensors alive while the struct is in use."""
    L = Layer()
    for name, v in fields.items():
        setattr(L, name, v.data_ptr() if isinstance(v, torch.Tensor) else v)
    return L


def layer_step(L: Layer, scratch: dict) -> int | None:
    """Run one decode layer in C (rf_decode_layer) from a filled Layer; `scratch` is the
    caller's cache of work buffers (kept between calls, grown to the largest layer / batch
    seen). -> value rows the channel-mix read, or None where the kernel does not apply (no C
    compiler, shapes it does not take: nothing has been written then)."""
    lib = library()
    if lib is None:
        return None
    B, C, F = L.B, L.C, L.F
    n = lib.rf_decode_layer_work(B, C, F, L.dw, L.da, L.dv, L.dg)
    nxp = 6 * B * max(C, F) // 2
    if "work" not in scratch or scratch["work"].numel() < n or scratch["xp"].numel() < nxp \
            or scratch["nz"].numel() < F:
        scratch.update(work=torch.empty(n), xp=torch.empty(nxp, dtype=torch.int32),
                       nz=torch.empty(F, dtype=torch.int32))
    L.work, L.xp, L.nz = (scratch[k].data_ptr() for k in ("work", "xp", "nz"))
    if lib.rf_decode_layer(ctypes.byref(L)):
        return None
    STATS["rows"] = STATS.get("rows", 0) + F
    STATS["read"] = STATS.get("read", 0) + L.ffn_read
    return L.ffn_read


@functools.lru_cache(maxsize=None)
def library() -> ctypes.CDLL | None:
    """csrc/decode_cpu.c built and loaded, every entry point declared (the decode products
    here, the sampler's top-p cut in sampling.py), or None without a C compiler."""
    lib = native.load("decode_cpu")
    if lib is not None:
        i64, p = ctypes.c_int64, ctypes.c_void_p
        lib.rf_gemv_bf16.argtypes = [i64, i64, i64, p, p, p, i64]
        lib.rf_gemv_bf16.restype = ctypes.c_int32
        lib.rf_gemm_bf16p.argtypes = [i64, i64, i64, p, p, i64, p, i64, p, i64, p, i64, p]
        lib.rf_gemm_bf16p.restype = ctypes.c_int32
        lib.rf_ln_mix.argtypes = [i64, i64, p, p, p, p, ctypes.c_float, p, i64, p, p]
        lib.rf_ln_mix.restype = ctypes.c_int32
        lib.rf_gemm_bf16p_dp.argtypes = []
        lib.rf_gemm_bf16p_dp.restype = ctypes.c_int32
        lib.rf_ffn_sparse.argtypes = [i64, i64, i64, i64, p, p, p, p, i64, i64]
        lib.rf_ffn_sparse.restype = ctypes.c_int64
        lib.rf_wkv_step.argtypes = [i64, i64, i64] + [p] * 12 + [ctypes.c_float, p, i64]
        lib.rf_wkv_step.restype = ctypes.c_int32
        lib.rf_decode_layer.argtypes = [ctypes.POINTER(Layer)]
        lib.rf_decode_layer.restype = ctypes.c_int32
        lib.rf_decode_layer_work.argtypes = [i64] * 7
        lib.rf_decode_layer_work.restype = i64
        lib.rf_topp_cutoff.argtypes = [i64, i64, p, p, p, i64]
        lib.rf_topp_cutoff.restype = ctypes.c_int32
    return lib


def available() -> bool:
    return library() is not None


def _applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == torch.float32
            and x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.shape[1] % 16 == 0
            and w.is_contiguous() and not torch.is_grad_enabled())


def gemv_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor | None:
    """x (B,K) fp32 @ w (N,K) bf16 ^T -> (B,N) fp32, or None (see the module doc)."""
    if w.dtype != torch.bfloat16 or not _applies(x, w) or w.shape[1] != x.shape[1]:
        return None
    lib = library()
    if lib is None:
        return None
    x = x.contiguous()
    B, K = x.shape
    y = torch.empty(B, w.shape[0])
    if lib.rf_gemv_bf16(B, w.shape[0], K, w.data_ptr(), x.data_ptr(), y.data_ptr(),
                        torch.get_num_threads()):
        return None
    return y


def pack_bf16(w: torch.Tensor) -> torch.Tensor | None:
    """w (N,K) -> the packed bf16 layout of `gemm_bf16p`, (N/16, K/2, 16, 2): block nb holds
    rows nb*16.. nb*16+15, its line kp their k = 2kp and 2kp+1 side by side. None where
    N % 16 or K % 2 (the caller keeps its other path)."""
    N, K = w.shape
    if N % 16 or K % 2:
        return None
    return w.detach().to(torch.bfloat16).view(N // 16, 16, K // 2, 2).transpose(1, 2).contiguous()


ACTS = {None: 0, "tanh": 1, "sigmoid": 2}  # gemm_bf16p's output activations


def _f32(t: torch.Tensor | None, n: int) -> int | None:
    """data_ptr of an optional fp32 contiguous CPU tensor of n elements; -1 if unusable."""
    if t is None:
        return None
    if t.dtype is not torch.float32 or not t.is_contiguous() or t.numel() != n or not t.is_cpu:
        return -1
    return t.data_ptr()


def gemm_bf16p(x: torch.Tensor, p: torch.Tensor, bf16_rows: bool = False, *,
               xmul: torch.Tensor | None = None, relu2: bool = False,
               bias: torch.Tensor | None = None, act: str | None = None,
               resid: torch.Tensor | None = None) -> torch.Tensor | None:
    """x (B,K) fp32 @ W^T -> (B,N) fp32 for W packed by `pack_bf16` (p), B <= MAX_ROWS:
    each weight line read once for all rows, exact bf16 widening, fp32 accumulation.
    `bf16_rows`: the activations rounded to bf16 first, as torch's bf16 GEMM does (AVX512-BF16
    dot products, twice the multiply-adds per instruction: what 8+ rows need), where the CPU
    has them (`dp_available`), else fp32 activations. In the same call, the element-wise
    work around the product (a torch op each otherwise, several microseconds apiece at decode
    sizes): the input times `xmul` (B,K) and/or `relu2` (relu(.)^2) first; the output plus
    `bias` (N,), then `act` ("tanh" / "sigmoid", within ~1e-7 of torch's), then plus `resid`
    (B,N). None where the kernel does not apply (the caller does the same with torch ops)."""
    # (called ~20 times per layer and step: the checks are ordered and written for speed)
    if torch.is_grad_enabled() or x.dtype is not torch.float32 or p.dtype is not torch.bfloat16 \
            or x.dim() != 2 or p.dim() != 4 or not (x.is_cpu and p.is_cpu):
        return None
    B, K = x.shape
    if not 1 <= B <= MAX_ROWS or K != 2 * p.shape[1] or not p.is_contiguous():
        return None
    lib = library()
    if lib is None:
        return None
    N = p.shape[0] * 16
    extra = (_f32(xmul, B * K), _f32(bias, N), _f32(resid, B * N))
    if -1 in extra:
        return None
    x = x.contiguous()  # the kernel rounds it to bf16 itself where bf16_rows and the CPU has it
    y = torch.empty(B, N)
    if lib.rf_gemm_bf16p(B, N, K, p.data_ptr(), x.data_ptr(), int(bf16_rows and dp_available()),
                         y.data_ptr(), torch.get_num_threads(), extra[0], int(relu2), extra[1],
                         ACTS[act], extra[2]):
        return None
    return y


def ln_mix(x: torch.Tensor, shift: torch.Tensor, ln: torch.nn.LayerNorm, maa: torch.Tensor
           ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A decode step's token-shift input in one call: (ln(x) (B,C), mix (M,B,C)) with
    mix[m] = ln(x) + (shift - ln(x)) * maa[m], maa (M,1,C) or (C,) (M = 1); x, shift (B,C)
    fp32. The same as torch's layer_norm + addcmul up to fp32 rounding order. None where the
    kernel does not apply."""
    if torch.is_grad_enabled() or x.dim() != 2 or not (x.is_cpu and shift.is_cpu) \
            or x.dtype is not torch.float32 or shift.dtype is not torch.float32 \
            or ln.weight is None or ln.bias is None or ln.weight.dtype is not torch.float32:
        return None
    B, C = x.shape
    M = maa.numel() // C
    lib = library()
    if lib is None or C % 16 or shift.shape != x.shape or maa.numel() != M * C \
            or maa.dtype is not torch.float32 or ln.normalized_shape != (C,):
        return None
    x, shift, maa = x.contiguous(), shift.contiguous(), maa.contiguous()
    out, mix = torch.empty(B, C), torch.empty(M, B, C)
    if lib.rf_ln_mix(B, C, x.data_ptr(), shift.data_ptr(), ln.weight.data_ptr(),
                     ln.bias.data_ptr(), ln.eps, maa.data_ptr(), M, out.data_ptr(),
                     mix.data_ptr()):
        return None
    return out, mix


@functools.lru_cache(maxsize=None)
def dp_available() -> bool:
    """The CPU has AVX512-BF16 dot products (gemm_bf16p's bf16-activation form)."""
    lib = library()
    return lib is not None and bool(lib.rf_gemm_bf16p_dp())


def ffn_sparse(k: torch.Tensor, wt: torch.Tensor, max_density: float = 1.0,
               dense: Callable[[torch.Tensor], torch.Tensor] | None = None
               ) -> torch.Tensor | None:
    """relu(k)^2 (B,F) @ wt (F,C) -> (B,C) fp32, reading only rows of non-zero channels;
    wt fp32 or bf16. `k` (fp32, contiguous) is overwritten with relu(k)^2. Where more than
    `max_density` of the channels are on and `dense` is given, returns dense(relu(k)^2)
    instead (picked rows stream at about half the rate of a dense pass). None where the
    kernel does not apply (k is then untouched)."""
    if wt.dtype not in (torch.float32, torch.bfloat16) or not _applies(k, wt) \
            or not k.is_contiguous() or wt.shape[0] != k.shape[1] or wt.shape[1] % 16:
        return None
    lib = library()
    if lib is None:
        return None
    B, F = k.shape
    C = wt.shape[1]
    y = torch.empty(B, C)
    nz = torch.empty(F, dtype=torch.int32)
    max_nnz = int(F * max_density) if dense is not None else F
    read = lib.rf_ffn_sparse(B, F, C, int(wt.dtype == torch.bfloat16), wt.data_ptr(),
                             k.data_ptr(), nz.data_ptr(), y.data_ptr(), max_nnz,
                             torch.get_num_threads())
    if read == -2 and dense is not None:  # k holds relu(k)^2 now
        read, y = F, dense(k)
    if read < 0:
        return None
    STATS["rows"] = STATS.get("rows", 0) + F
    STATS["read"] = STATS.get("read", 0) + read
    return y


def wkv_step(S: torch.Tensor, w: torch.Tensor, k: torch.Tensor, a: torch.Tensor,
             v: torch.Tensor, r: torch.Tensor, c: dict, eps: float, inplace: bool = False
             ) -> tuple | None:
    """The time-mix of one decode step from the projections on: S (B,H,N,N) fp32 state; w the
    decay before its sigmoid, k the key, a the in-context rate (after its sigmoid), v, r, all
    (B,C) fp32; c the layer's `RWKV7._step_consts`, eps ln_x's. -> (y (B,C) after ln_x plus the bonus,
    the new state (B,H,N,N)), or None where the kernel does not apply. S is not modified,
    unless `inplace`: the new state is then S itself, updated (half the memory traffic of
    writing a fresh tensor: at 16 streams the 0.1B shape's states are 37 MB, read and written
    every step)."""
    if not (S.device.type == "cpu" and S.dtype == torch.float32 and not torch.is_grad_enabled()
            and S.is_contiguous() and S.shape[-1] % 16 == 0 and S.shape[-1] <= 256):
        return None
    lib = library()
    if lib is None:
        return None
    B, H, N, _ = S.shape
    ins = [t.float().contiguous() for t in (w, k, a, v, r)]
    if any(t.shape != (B, H * N) for t in ins):
        return None
    consts = [c[n].float().contiguous() for n in ("k_k", "k_a", "r_k", "lnx_w", "lnx_b")]
    S2 = S if inplace else torch.empty_like(S)
    y = torch.empty(B, H * N)
    if lib.rf_wkv_step(B, H, N, S.data_ptr(), S2.data_ptr(), *(t.data_ptr() for t in ins),
                       *(t.data_ptr() for t in consts), eps, y.data_ptr(),
                       torch.get_num_threads()):
        return None
    return y, S2


def torch_ffn_sparse(k: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """The same product with torch ops: the rows of wt for channels non-zero in some row."""
    a = torch.relu(k.float()).square()  # (B,F)
    nz = (a != 0).any(0).nonzero().squeeze(1)
    return a.index_select(1, nz) @ wt.index_select(0, nz).float()


# ---- accuracy gate of a fast decode mode -----------------------------------------------------

@torch.no_grad()
def fast_path_accuracy(model, mode: torch.dtype, prompt: list[int], n: int) -> dict:
    """How far `model.step` with `infer_dtype = mode` is from the exact fp32 step.

    The exact path decodes greedily `n` tokens after `prompt`; the fast path is fed the same
    tokens (teacher forcing, so one early flip does not make every later comparison
    meaningless). Returns max_err (max |logit diff| / max |exact logit|, over all steps),
    mean_err (mean |logit diff| / mean |exact logit|), agree (fraction of the `n` steps whose
    greedy token is the same), and free_run (greedy tokens the fast path generates on its
    own before its first difference from the exact sequence)."""
    saved = model.infer_dtype
    try:
        exact, fast, toks = [], [], []
        for m, out in ((None, exact), (mode, fast)):
            model.infer_dtype = m
            state = model.init_state(1)
            for t in prompt[:-1]:
                _, state = model.step(torch.tensor([t]), state)
            tok = prompt[-1]
            for i in range(n):
                logits, state = model.step(torch.tensor([tok]), state)
                out.append(logits[0])
                if m is None:
                    toks.append(int(logits[0].argmax()))
                tok = toks[i]
        model.infer_dtype = mode  # free-running greedy of the fast path
        state, tok, free_run = model.init_state(1), prompt[-1], 0
        for t in prompt[:-1]:
            _, state = model.step(torch.tensor([t]), state)
        for i in range(n):
            logits, state = model.step(torch.tensor([tok]), state)
            tok = int(logits[0].argmax())
            if tok != toks[i]:
                break
            free_run += 1
    finally:
        model.infer_dtype = saved
    e, f = torch.stack(exact), torch.stack(fast)  # (n,V)
    diff = (f - e).abs()
    return {"max_err": float(diff.max() / e.abs().max()),
            "mean_err": float(diff.mean() / e.abs().mean()),
            "agree": float((f.argmax(-1) == e.argmax(-1)).float().mean()),
            "free_run": free_run, "n": n}


__all__ = ["ACTS", "MAX_ROWS", "SPARSE_MAX_DENSITY", "SPARSE_MAX_ROWS", "STATS", "available", "fast_path_accuracy",
           "dp_available", "ffn_sparse", "Layer", "gemm_bf16p", "gemv_bf16", "layer_step", "layer_struct", "library", "ln_mix", "pack_bf16", "torch_ffn_sparse", "wkv_step"]

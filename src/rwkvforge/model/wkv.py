"""WKV-7 kernels: the RWKV-7 state recurrence, three ways.

State convention (the same as the `rwkv` pip package): per head, `S` is an (N, N) matrix whose
rows index the value dimension and whose columns index the key dimension. One step is

    S_t = S_{t-1} @ (diag(w_t) + a_t b_t^T) + v_t k_t^T        y_t = S_t @ r_t

with w_t = exp(log_w_t) in (0, 1). In RWKV-7, a = -kk and b = kk * iclr, and
log_w = -exp(-0.5) * sigmoid(.), so log_w lies in (-0.6066, 0): that bound is what keeps the
chunked form below stable in fp32.

- `wkv_ref`: one step at a time in fp32. Obviously correct, slow; the yardstick.
- `wkv_chunked`: the same maths with matmuls over chunks of `chunk_size` steps (a WY-style
  triangular solve inside each chunk, a short loop across chunks). Plain torch, so autograd
  gives the backward pass; used on CUDA without fla, and on CPU when no C compiler works.
- `wkv_native`: the step-by-step recurrence in C (rwkvforge/csrc/wkv_cpu.c, built on first use
  by rwkvforge/native.py), with its own backward (state checkpoints every NATIVE_CKPT steps,
  recomputed in reverse), registered as torch custom ops so torch.compile traces through it.
  On 2 CPU cores at T=512, 12 heads, bf16 inputs: forward + backward 13-15 ms per layer vs
  43-48 ms for `wkv_chunked` (medians and minima of two runs of bench/wkv_bench.py; the VM's
  speed varies), and 2.3x (bf16) / 3.7x (fp32) fewer bytes kept for backward (memory.py).
  `auto` picks it on CPU when it builds, else `wkv_chunked`.
- `wkv_fla`: flash-linear-attention's Triton kernels (package `fla-core`, installed with a
  matching triton by scripts/bootstrap.sh on CUDA), imported only when asked for on a CUDA
  tensor (the CPU path never imports triton). `auto` picks it on CUDA when it imports; an
  explicit `fla` that cannot import is an error naming the import error, never a fallback.
  It also runs on CPU tensors under Triton's interpreter (how CI tests it:
  tests/fla_interpreter.py). fla is told RWKV-7's decay bound (`LOG_W_MIN`) when it takes
  `lower_bound`: that licenses its 64-step chunks instead of 16.

All functions take r, log_w, k, v, a, b as (B, T, H, N) and state as (B, H, N, N) fp32 (or
None for zeros), and return (y (B, T, H, N) fp32, new state (B, H, N, N) fp32).

Packed rows (PACK=1, data/loader.py): `reset` (B, T) bool, or None, marks the tokens that start
a document. Before such a step every kernel takes the state as zero (the state carried in, or
the previous document's, is dropped), and no gradient flows back across it, so each document of
a packed row computes what it would alone: `wkv_ref` zeroes S; `wkv_chunked` keeps only the
pairs of steps in the same document (masks on its in-chunk matrices, the chunk-start state and
the end-of-chunk sums); the C kernel zeroes its state in forward and, in backward, takes the
step's previous state as zero and stops the state gradient there; `wkv_fla` runs fla's
variable-length form (`cu_seqlens`: every document its own sequence). With `reset=None` every
kernel runs exactly the code it ran before (bit-identical results).

State tuning over packed rows: `reset_state` (H, N, N), shared by the batch (the layer's tuned
`time_state`), or None (zero), is the state a document starts from at a reset, and its gradient
is the sum over every restart: `wkv_ref` puts it in at the reset; `wkv_chunked` adds the terms
that read it (see there); the C kernel copies it in, and in backward completes the reset step's
gradient of its previous state (G diag(w) + dsa a^T) into the gradient of `reset_state`; fla
gets it as the initial state of every sequence that starts at a reset (autograd sums them).
Without a reset mask it is unused. tests/test_pack_state.py holds every kernel to the examples
run alone through `wkv_ref`.
"""

from __future__ import annotations

import ctypes
import functools
import inspect
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from rwkvforge import native

WKV_IMPLS = ("auto", "ref", "chunked", "native", "fla")
NATIVE_CKPT = 16  # steps between the states wkv_native keeps for backward
NATIVE_HEAD_SIZE = 64  # the C kernel's head size (all RWKV-7 models); others use chunked
DEFAULT_CHUNK = 32  # exp(+-0.6066 * 32) ~ 2.6e8: far from fp32 limits, and matmuls stay big enough

# RWKV-7's decay bound: log w = -0.606531 * sigmoid(.) (model/rwkv7.py's DECAY_SCALE), so
# every log_w the model passes is >= this. fla's `lower_bound` takes it (see wkv_fla).
LOG_W_MIN = -0.606531

_fla_fn = None  # cached fla entry point (None = not tried, False = unavailable)
_fla_error = ""  # why it is unavailable: the import error, for doctor / train / wkv_fla


def _zeros_state(r: torch.Tensor) -> torch.Tensor:
    B, _, H, N = r.shape
    return torch.zeros(B, H, N, N, dtype=torch.float32, device=r.device)


def _check_reset(reset, r):
    """`reset` as (B, T) bool on r's device, or None; a clear error for any other shape."""
    if reset is None:
        return None
    if tuple(reset.shape) != tuple(r.shape[:2]):
        raise ValueError(f"wkv: reset mask has shape {tuple(reset.shape)}, expected (B, T) = "
                         f"{tuple(r.shape[:2])} (one flag per token: it starts a document)")
    return reset.to(device=r.device, dtype=torch.bool)


def _check_reset_state(reset_state, reset, r):
    """`reset_state` as (H, N, N) fp32, or None (zero; also when there is no reset to use it);
    a clear error for any other shape."""
    if reset_state is None or reset is None:
        return None
    H, N = r.shape[2:]
    if tuple(reset_state.shape) != (H, N, N):
        raise ValueError(f"wkv: reset_state has shape {tuple(reset_state.shape)}, expected "
                         f"(H, N, N) = {(H, N, N)} (the state every document starts from, "
                         f"shared by the batch: e.g. blocks.i.att.time_state)")
    return reset_state.float()


def wkv_ref(r, log_w, k, v, a, b, state=None, reset=None, reset_state=None):
    """Sequential fp32 reference. Inputs (B,T,H,N); state (B,H,N,N) rows=value, cols=key;
    reset (B,T) bool or None: the state is `reset_state` (H,N,N), or zero when that is None,
    before a step whose flag is set."""
    B, T, H, N = r.shape
    S = _zeros_state(r) if state is None else state.float()
    r, k, v, a, b = (x.float() for x in (r, k, v, a, b))
    w = torch.exp(log_w.float())
    reset = _check_reset(reset, r)
    s_doc = _check_reset_state(reset_state, reset, r)
    s_doc = 0.0 if s_doc is None else s_doc  # (H,N,N) broadcasts over the batch
    ys = []
    for t in range(T):
        if reset is not None:  # a document starts at t: it sees no earlier state
            S = torch.where(reset[:, t, None, None, None], s_doc, S)
        # (B,H,N,N) * (B,H,1,N): decay acts on the key (column) dimension
        sa = S @ a[:, t, :, :, None]  # (B,H,N,1)
        S = S * w[:, t, :, None, :] + sa @ b[:, t, :, None, :] + v[:, t, :, :, None] @ k[:, t, :, None, :]
        ys.append((S @ r[:, t, :, :, None]).squeeze(-1))  # (B,H,N)
    y = torch.stack(ys, dim=1) if ys else r.new_zeros(B, 0, H, N)
    return y, S


def wkv_chunked(r, log_w, k, v, a, b, state=None, chunk_size: int = DEFAULT_CHUNK, reset=None,
                reset_state=None):
    """Chunked matmul form of `wkv_ref` (same results up to fp32 rounding; differentiable).

    Inside a chunk of L steps, with g_t = sum_{s<=t} log_w_s (per key channel) and
    u_t = S_{t-1} a_t, unrolling the recurrence gives (all vectors over the key dim)

        u_t = S_0 (a_t e^{g_{t-1}}) + sum_{s<t} [u_s (b_s e^{-g_s}) + v_s (k_s e^{-g_s})] . (a_t e^{g_{t-1}})
        y_t = S_0 (r_t e^{g_t})     + sum_{s<=t}[u_s (b_s e^{-g_s}) + v_s (k_s e^{-g_s})] . (r_t e^{g_t})
        S_L = S_0 diag(e^{g_L}) + sum_s (u_s b_s^T + v_s k_s^T) diag(e^{g_L - g_s})

    The first line is a unit lower-triangular system in U (solved once per chunk, for all
    chunks at once); the loop across chunks is then three small matmuls per chunk.

    With `reset` (B,T), doc(t) = the number of resets in the chunk up to t: a term from step s
    to step t stays only when doc(s) == doc(t), the S_0 terms only where doc(t) == 0 and the
    terms of S_L only from steps with doc(s) == doc(L-1) (S_0's only when no reset is in the
    chunk). The decay factors between steps of one document are unchanged.

    With `reset_state` s (H,N,N) as well, a document that starts at step p of the chunk reads s
    where the first document reads S_0, with the decay counted from p: its steps add
    s (a_t e^{g_{t-1} - g_{p-1}}) to u_t and s (r_t e^{g_t - g_{p-1}}) to y_t, and when it is
    the chunk's last document S_L gains s diag(e^{g_L - g_{p-1}}). s is not carried from chunk
    to chunk, so its terms are computed for all chunks at once (one more triangular solve).
    """
    B, T, H, N = r.shape
    L = int(chunk_size)
    S = _zeros_state(r) if state is None else state.float()
    reset = _check_reset(reset, r)
    s_doc = _check_reset_state(reset_state, reset, r)
    if T == 0:
        return r.new_zeros(B, 0, H, N, dtype=torch.float32), S
    pad = (-T) % L
    nc = (T + pad) // L
    BH = B * H
    # (B,T,H,N) -> chunk-major (nc, B*H, L, N) fp32, so every per-chunk slice in the loop
    # below is contiguous; padded steps have w=1 and zero inputs, so they leave S alone
    xs = [x.float() for x in (r, log_w, k, v, a, b)]
    if pad:
        xs = [F.pad(x, (0, 0, 0, 0, 0, pad)) for x in xs]
    r_, lw, k_, v_, a_, b_ = (
        x.view(B, nc, L, H, N).permute(1, 0, 3, 2, 4).reshape(nc, BH, L, N) for x in xs
    )

    g = torch.cumsum(lw, dim=2)  # inclusive log decay from chunk start, (nc,BH,L,N), <= 0
    g_last = g[:, :, -1:, :]  # (nc,BH,1,N)
    r_t = r_ * torch.exp(g)
    a_t = a_ * torch.exp(g - lw)  # exclusive decay (up to t-1)
    inv = torch.exp(-g)
    b_h = b_ * inv
    k_h = k_ * inv
    e_end = torch.exp(g_last - g)  # decay from s to chunk end, <= 1
    b_end = b_ * e_end
    k_end = k_ * e_end
    decay_end = torch.exp(g_last).transpose(2, 3).contiguous()  # (nc,BH,N,1)

    strict = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(-1)
    incl = torch.ones(L, L, dtype=torch.bool, device=r.device).tril(0)
    b_hT = b_h.transpose(-1, -2).contiguous()  # each transposed once, used twice
    k_hT = k_h.transpose(-1, -2).contiguous()
    m_ab = (a_t @ b_hT).masked_fill_(~strict, 0.0)  # (nc,BH,L,L)
    m_ak = (a_t @ k_hT).masked_fill_(~strict, 0.0)
    m_rb = (r_t @ b_hT).masked_fill_(~incl, 0.0)
    m_rk = (r_t @ k_hT).masked_fill_(~incl, 0.0)

    r_0 = r_t  # what reads S_0 in y
    if reset is not None:
        m_ab, m_ak, m_rb, m_rk, a_t, r_0, b_end, k_end, decay_end = _reset_masks(
            reset, pad, nc, H, L, m_ab, m_ak, m_rb, m_rk, a_t, r_t, b_end, k_end, decay_end)

    eye = torch.eye(L, dtype=torch.float32, device=r.device)
    lhs = eye - m_ab
    # U = W_a S_0^T + U_v   with  W_a = (I - M_ab)^-1 A~,  U_v = (I - M_ab)^-1 M_ak V
    # (two solves, not one on a concatenated right-hand side: no cat, no split copies)
    w_a = torch.linalg.solve_triangular(lhs, a_t, upper=False, unitriangular=True)
    u_v = torch.linalg.solve_triangular(lhs, m_ak @ v_, upper=False, unitriangular=True)
    y_v = m_rk @ v_  # state-independent part of y, (nc,BH,L,N)
    d_doc = []  # per chunk: the decay of reset_state to the chunk end, (BH,N,1) (or none)
    if s_doc is not None:
        a_doc, r_doc, dd = _doc_start_factors(reset, pad, nc, H, L, g, lw, a_, r_)
        sT = s_doc.transpose(-1, -2)  # (H,Nk,Nv), broadcast over chunks and batch rows
        w_doc = torch.linalg.solve_triangular(lhs, a_doc, upper=False, unitriangular=True)
        u_v = u_v + (w_doc.view(nc, B, H, L, N) @ sT).view(nc, BH, L, N)
        y_v = y_v + (r_doc.view(nc, B, H, L, N) @ sT).view(nc, BH, L, N)
        sT_bh = sT.expand(B, H, N, N).reshape(BH, N, N)
        d_doc = dd.unbind(0)
    b_endT, k_endT = b_end.transpose(2, 3), k_end.transpose(2, 3)  # (nc,BH,N,L) views

    # the loop carries St = S^T (B*H, Nk, Nv): every product below is a plain bmm
    # Per-chunk views via unbind, not x[c]: the backward of unbind is ONE stack, while
    # each x[c] would backpropagate a zero-filled full-size gradient (O(nc^2) traffic).
    St = S.transpose(-1, -2).reshape(BH, N, N)
    ys = []
    for c, (w_ac, u_vc, r_tc, y_vc, m_rbc, be_c, ke_c, v_c, d_c) in enumerate(zip(
            *(x.unbind(0) for x in (w_a, u_v, r_0, y_v, m_rb, b_endT, k_endT, v_, decay_end)))):
        u = torch.baddbmm(u_vc, w_ac, St)  # (BH,L,Nv)
        ys.append(torch.baddbmm(torch.baddbmm(y_vc, r_tc, St), m_rbc, u))
        St = torch.baddbmm(torch.baddbmm(St * d_c, be_c, u), ke_c, v_c)
        if d_doc:  # the chunk's last document started from reset_state inside the chunk
            St = torch.addcmul(St, d_doc[c], sT_bh)
    y = torch.stack(ys).view(nc, B, H, L, N).permute(1, 0, 3, 2, 4).reshape(B, nc * L, H, N)[:, :T]
    return y, St.view(B, H, N, N).transpose(-1, -2).contiguous()


def _reset_masks(reset, pad, nc, H, L, m_ab, m_ak, m_rb, m_rk, a_t, r_t, b_end, k_end,
                 decay_end):
    """wkv_chunked's chunk-major tensors with the terms that cross a document start dropped
    (see its docstring); reset (B,T) bool."""
    B = reset.shape[0]
    rs = F.pad(reset, (0, pad)).view(B, nc, L).transpose(0, 1)  # (nc,B,L); padded steps: no reset
    doc = torch.cumsum(rs, dim=2, dtype=torch.int32)  # doc(t) inside each chunk
    doc = doc.unsqueeze(2).expand(nc, B, H, L).reshape(nc, B * H, L)  # (nc,BH,L)
    same = doc.unsqueeze(-1) == doc.unsqueeze(-2)  # (nc,BH,L,L): steps s, t in one document
    first = (doc == 0).unsqueeze(-1).float()  # (nc,BH,L,1): still in S_0's document
    last = (doc == doc[:, :, -1:]).unsqueeze(-1).float()  # in the chunk's last document
    whole = (doc[:, :, -1] == 0).float().view(nc, B * H, 1, 1)  # no reset in the chunk
    return (m_ab * same, m_ak * same, m_rb * same, m_rk * same, a_t * first, r_t * first,
            b_end * last, k_end * last, decay_end * whole)


def _doc_start_factors(reset, pad, nc, H, L, g, lw, a_, r_):
    """wkv_chunked's factors of reset_state (see its docstring), chunk-major: what reads it
    into u and y, (nc,BH,L,N) each (zero in a chunk's first document, which reads S_0), and
    its decay to the chunk end, (nc,BH,N,1) (zero unless the chunk's last document starts in
    it). g (nc,BH,L,N) is the inclusive log decay, lw the step's own."""
    B = reset.shape[0]
    rs = F.pad(reset, (0, pad)).view(B, nc, L).transpose(0, 1)  # (nc,B,L)
    pos = torch.arange(L, device=reset.device, dtype=torch.int64)
    start = torch.cummax(rs * pos, dim=2).values  # the step its document started at
    start = start.unsqueeze(2).expand(nc, B, H, L).reshape(nc, B * H, L)
    in_doc = torch.cumsum(rs, dim=2) > 0  # (nc,B,L): past a reset of this chunk
    in_doc = in_doc.unsqueeze(2).expand(nc, B, H, L).reshape(nc, B * H, L, 1).float()
    g_ex = g - lw  # exclusive log decay (up to t-1)
    g_start = torch.gather(g_ex, 2, start.unsqueeze(-1).expand_as(g))  # g_{p-1}, (nc,BH,L,N)
    a_doc = a_ * torch.exp(g_ex - g_start) * in_doc  # exponents <= 0: no overflow
    r_doc = r_ * torch.exp(g - g_start) * in_doc
    d_end = torch.exp(g[:, :, -1:] - g_start[:, :, -1:]) * in_doc[:, :, -1:]  # (nc,BH,1,N)
    return a_doc, r_doc, d_end.transpose(2, 3).contiguous()


@functools.lru_cache(maxsize=None)
def _native_lib():
    lib = native.load("wkv_cpu")
    if lib is not None:
        i64, p = ctypes.c_int64, ctypes.c_void_p
        # (..., reset, s0, bh0, bh1) and (..., reset, s0, ds0, bh0, bh1)
        lib.rf_wkv_forward.argtypes = [i64] * 5 + [p] * 11 + [i64, i64]
        lib.rf_wkv_forward.restype = ctypes.c_int32
        lib.rf_wkv_backward.argtypes = [i64] * 5 + [p] * 18 + [i64, i64]
        lib.rf_wkv_backward.restype = ctypes.c_int32
        # the same with (..., BH, threads) in place of (..., bh0, bh1)
        lib.rf_wkv_forward_par.argtypes = lib.rf_wkv_forward.argtypes
        lib.rf_wkv_backward_par.argtypes = lib.rf_wkv_backward.argtypes
        lib.rf_wkv_forward_par.restype = lib.rf_wkv_backward_par.restype = ctypes.c_int32
        lib.rf_wkv_openmp.restype = ctypes.c_int32
        lib.openmp = bool(lib.rf_wkv_openmp())
    return lib


def native_available() -> bool:
    return _native_lib() is not None


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(n: int) -> ThreadPoolExecutor:
    """n worker threads for this process (a forked child gets its own: the parent's threads
    do not exist there)."""
    key = (os.getpid(), n)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(max_workers=n, thread_name_prefix="rwkvforge-wkv")
    return _POOLS[key]


def _over_heads(name: str, BH: int, *args) -> int:
    """Kernel `name` (rf_wkv_forward / rf_wkv_backward) over the B*H (batch, head) pairs,
    split across torch's thread count; the lowest return code. An OpenMP build splits them
    itself on torch's own OpenMP threads (see csrc/wkv_cpu.c); otherwise a thread pool of
    ours runs the ranges (ctypes drops the GIL during the call)."""
    lib = _native_lib()
    n = max(1, min(torch.get_num_threads(), BH))
    if lib.openmp or n == 1:
        return getattr(lib, name + "_par")(*args, BH, n)
    fn = getattr(lib, name)
    jobs = [_pool(n).submit(fn, *args, BH * i // n, BH * (i + 1) // n) for i in range(n)]
    return min(j.result() for j in jobs)


def _kernel_inputs(xs: list) -> tuple:
    """r, k, v, a, b as the C kernel reads them: all bf16 as they are (it widens them per
    step: no fp32 copies under bf16 autocast), else fp32; contiguous. Plus the bf16 flag."""
    bf16 = all(x.dtype == torch.bfloat16 for x in xs)
    return (*(x.contiguous() if bf16 else x.float().contiguous() for x in xs), int(bf16))


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _flags(reset: torch.Tensor | None) -> torch.Tensor | None:
    """A reset mask as the C kernel reads it: (B, T) uint8, contiguous."""
    return None if reset is None else reset.to(torch.uint8).contiguous()


# The C kernel as two torch custom ops (forward; backward) with the forward's autograd
# registered: torch.compile traces through them (they are opaque calls inside the block's
# graph, no graph break), so the code around them (exp(log_w), the fp32 -> bf16 casts of the
# gradients, the group norm after) fuses with the rest of the block. Eager calls take the same
# ops.
@torch.library.custom_op("rwkvforge::wkv7_native", mutates_args=())
def _wkv7_native(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 a: torch.Tensor, b: torch.Tensor, s0: torch.Tensor | None,
                 keep: bool, reset: torch.Tensor | None = None,
                 reset_state: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (B,T,H,N) fp32, final state (B,H,N,N) fp32, and the state checkpoints backward
    needs (B*H, ceil(T/NATIVE_CKPT), N, N) when `keep`, else an empty tensor. w = exp(log_w)
    fp32; r, k, v, a, b all bf16 (read as they are) or else taken as fp32; reset (B,T) uint8
    or None (document starts); reset_state (H,N,N) fp32 or None (zero): what they start
    from."""
    B, T, H, N = r.shape
    r, k, v, a, b, bf16 = _kernel_inputs([r, k, v, a, b])
    w = w.float().contiguous()
    S = _zeros_state(r) if s0 is None else s0.float().clone().contiguous()
    y = torch.empty(B, T, H, N)
    ckpt = torch.empty(B * H, -(-T // NATIVE_CKPT), N, N) if keep else torch.empty(0)
    flags = _flags(reset)  # (held here while the kernel reads it)
    s_doc = _doc_state(reset_state, flags)
    rc = _over_heads("rf_wkv_forward", B * H, T, H, N, NATIVE_CKPT, bf16, *map(_ptr, (
        r, w, k, v, a, b, S, y, ckpt if keep else None, flags, s_doc)))
    if rc:
        raise MemoryError("wkv native forward: out of memory for its state buffer")
    return y, S, ckpt


def _doc_state(reset_state: torch.Tensor | None, flags) -> torch.Tensor | None:
    """reset_state as the C kernel reads it: (H, N, N) fp32 contiguous (None without resets)."""
    return None if reset_state is None or flags is None else reset_state.float().contiguous()


@_wkv7_native.register_fake
def _(r, w, k, v, a, b, s0, keep, reset=None, reset_state=None):  # noqa: ARG001 - a fake (meta) kernel: only the shapes matter
    B, T, H, N = r.shape
    f32 = torch.float32
    return (r.new_empty(B, T, H, N, dtype=f32), r.new_empty(B, H, N, N, dtype=f32),
            r.new_empty((B * H, -(-T // NATIVE_CKPT), N, N) if keep else (0,), dtype=f32))


@torch.library.custom_op("rwkvforge::wkv7_native_backward", mutates_args=())
def _wkv7_native_backward(r: torch.Tensor, w: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          a: torch.Tensor, b: torch.Tensor, ckpt: torch.Tensor,
                          dy: torch.Tensor | None, dS: torch.Tensor | None,
                          reset: torch.Tensor | None = None,
                          reset_state: torch.Tensor | None = None,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                     torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (fp32) of r, w, k, v, a, b, the initial state and reset_state (summed over
    every document start; an empty tensor when there is none), given those of y and of the
    final state (None: zero)."""
    B, T, H, N = r.shape
    r, k, v, a, b, bf16 = _kernel_inputs([r, k, v, a, b])
    w = w.float().contiguous()
    dy = torch.zeros(B, T, H, N) if dy is None else dy.float().contiguous()
    G = torch.zeros(B, H, N, N) if dS is None else dS.float().clone().contiguous()
    grads = [torch.empty(B, T, H, N) for _ in range(6)]  # the kernel writes them all
    flags = _flags(reset)
    s_doc = _doc_state(reset_state, flags)
    # per (b, h) pair: each thread writes its own, summed over the batch rows below
    g_doc = None if s_doc is None else torch.empty(B, H, N, N)
    rc = _over_heads("rf_wkv_backward", B * H, T, H, N, NATIVE_CKPT, bf16, *map(_ptr, (
        r, w, k, v, a, b, ckpt, dy, G, *grads, flags, s_doc, g_doc)))
    if rc:
        raise MemoryError("wkv native backward: out of memory for its state buffer")
    dr, dw, dk, dv, da, db = grads
    return dr, dw, dk, dv, da, db, G, (torch.empty(0) if g_doc is None else g_doc.sum(0))


@_wkv7_native_backward.register_fake
def _(r, w, k, v, a, b, ckpt, dy, dS, reset=None, reset_state=None):  # noqa: ARG001 - a fake (meta) kernel: only the shapes matter
    B, T, H, N = r.shape
    f32 = torch.float32
    return (*(r.new_empty(B, T, H, N, dtype=f32) for _ in range(6)),
            r.new_empty(B, H, N, N, dtype=f32),
            r.new_empty((0,) if reset is None or reset_state is None else (H, N, N), dtype=f32))


def _wkv7_setup_context(ctx, inputs, output):
    r, w, k, v, a, b, s0, keep, reset, reset_state = inputs
    # the inputs as given, the checkpoints
    ctx.save_for_backward(r, w, k, v, a, b, output[2], reset, reset_state)
    ctx.has_s0 = s0 is not None


def _wkv7_backward(ctx, dy, dS, _dckpt):
    r, w, k, v, a, b, ckpt, reset, reset_state = ctx.saved_tensors
    dr, dw, dk, dv, da, db, g0, g_doc = _wkv7_native_backward(r, w, k, v, a, b, ckpt, dy, dS,
                                                               reset, reset_state)
    # fp32 gradients; autograd casts them to the inputs' dtypes (bf16 under autocast)
    return (dr, dw, dk, dv, da, db, (g0 if ctx.has_s0 else None), None, None,
            (g_doc if reset_state is not None and reset is not None else None))


_wkv7_native.register_autograd(_wkv7_backward, setup_context=_wkv7_setup_context)


def wkv_native(r, log_w, k, v, a, b, state=None, reset=None, reset_state=None):
    """The recurrence in C on CPU, with its own backward (see the module doc)."""
    if not torch.compiler.is_compiling():  # (checked before tracing; see wkv())
        if not native_available():
            raise RuntimeError(f"wkv_impl='native' is unavailable: C kernel "
                               f"{native.problem('wkv_cpu')}; use wkv_impl='chunked'")
        if r.device.type != "cpu":
            raise RuntimeError("wkv_impl='native' runs on CPU tensors only; on CUDA use "
                               "'fla' or 'chunked'")
    if r.shape[-1] != NATIVE_HEAD_SIZE:  # the C kernel is written for RWKV-7's heads
        return wkv_chunked(r, log_w, k, v, a, b, state, reset=reset, reset_state=reset_state)
    if r.shape[1] == 0:
        return r.new_zeros(r.shape, dtype=torch.float32), (
            _zeros_state(r) if state is None else state.float())
    if reset is not None:
        reset_state = _check_reset_state(reset_state, reset, r)
        reset = _check_reset(reset, r).to(torch.uint8)
    else:
        reset_state = None
    keep = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (r, log_w, k, v, a, b, state, reset_state))
    y, S, _ = _wkv7_native(r, torch.exp(log_w.float()), k, v, a, b, state, keep, reset,
                           reset_state)
    return y, S


def _load_fla():
    global _fla_fn, _fla_error
    if _fla_fn is None:
        try:  # imported lazily, on CUDA only: fla pulls in triton
            from fla.ops.rwkv7 import chunk_rwkv7  # type: ignore

            _fla_fn = chunk_rwkv7
        except Exception as e:  # noqa: BLE001 - any import failure means "not available"
            _fla_fn = False
            _fla_error = f"{type(e).__name__}: {e}".strip()
    return _fla_fn


def fla_problem() -> str | None:
    """Why fla's kernels cannot be used in this environment (None when they import)."""
    if _load_fla():
        return None
    if "No module named 'fla'" in _fla_error:
        return ("flash-linear-attention (fla-core) is not installed; ./scripts/bootstrap.sh "
                "installs the fla-core + triton pair that matches torch on a CUDA machine")
    return f"fla-core does not import ({_fla_error}); re-run ./scripts/bootstrap.sh"


def _fla_device_ok(device_type: str) -> bool:
    """fla's Triton kernels run on CUDA, or on the CPU when triton interprets them (tests)."""
    if device_type == "cuda":
        return True
    triton = sys.modules.get("triton")
    return bool(triton is not None and triton.knobs.runtime.interpret)


def fla_available(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" and bool(_load_fla())


@functools.lru_cache(maxsize=None)
def _takes_lower_bound(fn) -> bool:
    return "lower_bound" in inspect.signature(fn).parameters  # fla-core >= 0.6.0


def wkv_fla(r, log_w, k, v, a, b, state=None, bound: bool = True, reset=None,
            reset_state=None):
    """flash-linear-attention's chunk_rwkv7 (CUDA). fla keeps state as (B,H,K,V): transposed.

    `bound`: pass RWKV-7's decay bound as fla's `lower_bound` when the installed fla takes it
    (every log_w must then be >= LOG_W_MIN; the model's always are). False: fla's unbounded
    16-step path (kept for the test that holds the two equal). `reset`: the rows become one
    flat stream of documents, fla's variable-length form (`cu_seqlens`, see `_fla_varlen`),
    each started from `reset_state` (H,N,N) or zero."""
    fn = _load_fla()
    if not fn:
        raise RuntimeError(f"wkv_impl='fla' is unavailable: {fla_problem()}; "
                           f"set WKV_IMPL=auto or chunked to train without it")
    if not _fla_device_ok(r.device.type):
        raise RuntimeError(f"wkv_impl='fla' runs on CUDA tensors (got {r.device.type}); "
                           f"use wkv_impl='auto'")
    dt = r.dtype if r.dtype in (torch.bfloat16, torch.float16) else torch.float32
    s0 = None if state is None else state.float().transpose(-1, -2).contiguous()
    extra = {}
    if bound and _takes_lower_bound(fn):
        # the bound cast the way log_w is (fp32 -> dt): rounding keeps order, so every
        # log_w >= LOG_W_MIN stays >= it after the cast (bf16: -0.60546875)
        extra["lower_bound"] = float(torch.tensor(LOG_W_MIN).to(dt))
    xs = [x.to(dt) for x in (r, log_w, k, v, a, b)]
    reset = _check_reset(reset, r)
    if reset is not None:
        s_doc = _check_reset_state(reset_state, reset, r)
        return _fla_varlen(fn, xs, s0, reset, extra,
                           None if s_doc is None else s_doc.transpose(-1, -2))
    out = fn(  # w is log-decay in fla's API; state (B,H,K,V)
        r=xs[0], w=xs[1], k=xs[2], v=xs[3], a=xs[4], b=xs[5],
        scale=1.0, initial_state=s0, output_final_state=True, **extra,
    )
    y, s1 = out[0], out[1]  # some fla versions return extra items
    return y.float(), s1.float().transpose(-1, -2)


def _fla_varlen(fn, xs: list, s0, reset: torch.Tensor, extra: dict, s_doc=None):
    """chunk_rwkv7 over packed rows: the B rows laid end to end as one (1, B*T) stream cut at
    every row start and every reset into sequences (`cu_seqlens`), each started from `s_doc`
    (H,K,V) (None: zero) except a row's first when it has no reset at t=0 (that one starts
    from the row's state s0, fla's (B,H,K,V) layout). fla takes one initial state per
    sequence: s_doc is expanded to every sequence, and autograd sums their gradients.
    Returns y (B,T,H,N) fp32 and each row's final state (that of the sequence holding its last
    token) in our (B,H,N,N) layout."""
    B, T, H, N = xs[0].shape
    starts = reset.clone()
    starts[:, 0] = True  # a new row is a new sequence for fla
    pos = starts.reshape(-1).nonzero().squeeze(1)  # (n_seq,) first token of each sequence
    cu = torch.cat([pos, pos.new_tensor([B * T])])
    seq_of_row = torch.cumsum(starts.reshape(-1), 0)[::T] - 1  # (B,) the row's first sequence
    last_of_row = torch.cumsum(starts.reshape(-1), 0)[T - 1::T] - 1  # (B,) its last sequence
    init = None
    if s_doc is not None:
        init = s_doc.unsqueeze(0).expand(len(pos), H, N, N).clone()
    if s0 is not None:
        init = s0.new_zeros(len(pos), H, N, N) if init is None else init
        carry = ~reset[:, 0]  # rows whose first sequence continues the given state
        init[seq_of_row[carry]] = s0[carry]
    flat = [x.reshape(1, B * T, H, N) for x in xs]
    out = fn(r=flat[0], w=flat[1], k=flat[2], v=flat[3], a=flat[4], b=flat[5], scale=1.0,
             initial_state=init, output_final_state=True, cu_seqlens=cu,
             cu_seqlens_cpu=cu.cpu(), **extra)
    y, s1 = out[0], out[1]
    return y.view(B, T, H, N).float(), s1[last_of_row].float().transpose(-1, -2)


def resolve_impl(impl: str, device: torch.device | str) -> str:
    if impl not in WKV_IMPLS:
        raise ValueError(f"unknown wkv_impl {impl!r}; expected one of {', '.join(WKV_IMPLS)}")
    if impl == "auto":
        if torch.device(device).type == "cpu":
            return "native" if native_available() else "chunked"
        return "fla" if fla_available(device) else "chunked"
    return impl


def describe_impl(impl: str, device: torch.device | str) -> tuple[str, str]:
    """(the kernel `impl` runs on `device`, why): what train prints as it starts and the
    healthcheck reports. An explicit `fla` that cannot run there raises RuntimeError (never a
    silent fallback)."""
    dev = torch.device(device).type
    name = resolve_impl(impl, dev)
    if impl != "auto":
        if name == "fla" and (not _load_fla() or not _fla_device_ok(dev)):
            raise RuntimeError(f"WKV_IMPL=fla cannot run: "
                               f"{fla_problem() or f'no CUDA device ({dev})'}; "
                               f"set WKV_IMPL=auto to use the fastest kernel that works")
        return name, f"WKV_IMPL={impl}"
    if dev == "cuda":
        return name, ("flash-linear-attention's Triton kernels" if name == "fla" else
                      f"fla unavailable: {fla_problem()}: the chunked torch kernel is slower "
                      f"and keeps more memory")
    if name == "native":
        return name, "the C kernel (CPU)"
    return name, f"C kernel {native.problem('wkv_cpu')}"


@torch.compiler.assume_constant_result
def _resolve_const(impl: str, device_type: str) -> str:
    """resolve_impl, evaluated once when torch.compile traces (it may build or import)."""
    return resolve_impl(impl, device_type)


def wkv(r, log_w, k, v, a, b, state=None, impl: str = "auto", chunk_size: int = DEFAULT_CHUNK,
        reset=None, reset_state=None):
    """Dispatch to one of the kernels above (see module docstring for shapes). Under
    torch.compile the native kernel is traced as a custom op inside the caller's graph; the
    other forms stay one opaque call each (the torch loops of ref / chunked, fla's triton)."""
    name = _resolve_const(impl, r.device.type)
    if name == "native" and r.device.type == "cpu":
        with torch.autocast("cpu", enabled=False):  # (the kernel is fp32 inside anyway)
            return wkv_native(r, log_w, k, v, a, b, state, reset, reset_state)
    return _wkv_opaque(r, log_w, k, v, a, b, state, name, chunk_size, reset, reset_state)


@torch.compiler.disable  # one opaque call for torch.compile
def _wkv_opaque(r, log_w, k, v, a, b, state, name: str, chunk_size: int, reset=None,
                reset_state=None):
    if name == "fla":
        return wkv_fla(r, log_w, k, v, a, b, state, reset=reset, reset_state=reset_state)
    # fp32 as documented, even inside a bf16 autocast region: autocast would run every
    # matmul of the recurrence in bf16 (0.6% error on y, bf16 state) and cast their inputs
    # on every call, which made the chunked form slower than fp32 (76 vs 64 ms per layer,
    # forward + backward at T=512)
    with torch.autocast(r.device.type, enabled=False):
        if name == "ref":
            return wkv_ref(r, log_w, k, v, a, b, state, reset, reset_state)
        if name == "native":
            return wkv_native(r, log_w, k, v, a, b, state, reset, reset_state)
        return wkv_chunked(r, log_w, k, v, a, b, state, chunk_size=chunk_size, reset=reset,
                           reset_state=reset_state)

"""The training loss and its numerics: the chunked vocabulary head + cross-entropy, sequence
log-probs and the preference (DPO / SimPO) losses, the module DeepSpeed wraps, and the
validation passes.

    from rwkvforge.loss import LossModule, chunked_head_loss, evaluate_loss

The vocabulary projection + cross-entropy run in HEAD_CHUNK-token pieces, only on tokens
whose loss mask is non-zero, with the gradient computed in the same pass: the (T, 65536)
logits tensor never exists (at ctx 4096 it alone would be 1 GiB in fp32).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import sys
import threading
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from rwkvforge import native
from rwkvforge.model.rwkv7 import TimeMix
from rwkvforge.peft import unwrap

_SCRATCH: dict[tuple, torch.Tensor] = {}


def _scratch(name: str, rows: int, cols: int, dtype: torch.dtype, device: torch.device
             ) -> torch.Tensor:
    """A (rows, cols) work tensor, kept and reused on CPU. There a fresh (chunk, vocab)
    tensor is a new mmap, page-faulted on first touch on every step: the faults cost 2-3x
    the pass that fills it (a 512 x 65536 bf16 -> fp32 copy: 54 ms fresh, 12 ms reused).
    CUDA's caching allocator already reuses memory, so there it is a plain empty()."""
    if device.type != "cpu":
        return torch.empty(rows, cols, dtype=dtype, device=device)
    key = (threading.get_ident(), name, cols, dtype)  # never shared between threads
    buf = _SCRATCH.get(key)
    if buf is None or buf.shape[0] < rows:
        buf = _SCRATCH[key] = torch.empty(rows, cols, dtype=dtype)
    return buf[:rows]


def _softmax_bf16_(x: torch.Tensor) -> torch.Tensor | None:
    """In place: the rows of bf16 logits x (n, V) on CPU become their softmax (bf16), and the
    fp32 logsumexp of each row is returned. None (x untouched) where the C kernel
    (csrc/softmax_cpu.c) is unavailable or does not apply; the caller then does the softmax
    with torch ops on an fp32 copy."""
    if x.device.type != "cpu" or not x.is_contiguous() or x.shape[1] % 32:
        return None
    lib = _softmax_lib()
    if lib is None:
        return None
    n = x.shape[0]
    mx, sm = torch.empty(n), torch.empty(n)
    if lib.rf_softmax_bf16(n, x.shape[1], x.data_ptr(), mx.data_ptr(), sm.data_ptr(),
                           torch.get_num_threads()):
        raise MemoryError("head softmax: out of memory for its row buffer")
    return mx.add_(sm.log_())


@functools.lru_cache(maxsize=None)
def _softmax_lib():
    lib = native.load("softmax_cpu")
    if lib is not None:
        i64, p = ctypes.c_int64, ctypes.c_void_p
        lib.rf_softmax_bf16.argtypes = [i64, i64, p, p, p, i64]
        lib.rf_softmax_bf16.restype = ctypes.c_int32
    return lib


class _ChunkedHeadCE(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T, t_i) with the gradient computed chunk by chunk in forward.

    h (N,C), W (V,C), t (N,) long, w (N,) fp32. Only (chunk, V) logits exist at a time;
    backward just scales the stored d/dh (and d/dW when W is trainable)."""

    @staticmethod
    def forward(ctx, h, weight, targets, w, chunk: int, dtype: torch.dtype):
        need_h = ctx.needs_input_grad[0]
        need_w = ctx.needs_input_grad[1]
        N, C = h.shape
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.zeros(N, C, dtype=torch.float32, device=h.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        V = weight.shape[0]
        dev = h.device
        with torch.autocast(dev.type, enabled=False):
            Wc = weight.detach().to(dtype)
            for s in range(0, N, chunk):
                hc = h[s:s + chunk].detach().to(dtype)  # (n,C)
                tc = targets[s:s + chunk]
                wc = w[s:s + chunk]
                n = hc.shape[0]
                if dtype == torch.float32:
                    logits = torch.mm(hc, Wc.t(), out=_scratch("x32", n, V, dtype, dev))
                else:  # the matmul in `dtype`, the softmax in fp32
                    low = torch.mm(hc, Wc.t(), out=_scratch("x16", n, V, dtype, dev))
                # the target logits, before P overwrites them
                tl = (logits if dtype == torch.float32 else low).gather(
                    1, tc.unsqueeze(1)).squeeze(1).float()
                # d/dlogits = diag(wc) (P - onehot), P written once in the matmul dtype; the
                # one-hot and the row weights act on the (n, C) products, not on (n, V)
                lse = _softmax_bf16_(low) if dtype == torch.bfloat16 else None
                if lse is not None:  # C kernel: P over the bf16 logits, two passes per row
                    p = low
                else:  # torch: in place on one fp32 (n, V) buffer
                    if dtype != torch.float32:
                        logits = _scratch("x32", n, V, torch.float32, dev).copy_(low)
                    m = logits.amax(dim=-1)
                    e = logits.sub_(m.unsqueeze(1)).exp_()  # exp(x - max)
                    z = e.sum(dim=-1)
                    lse = m + z.log()
                    p = e.div_(z.unsqueeze(1))
                    if dtype != torch.float32:
                        p = _scratch("x16", n, V, dtype, dev).copy_(p)
                    del logits, e
                total += ((lse - tl) * wc).sum()  # logsumexp - target logit
                if need_h or need_w:
                    if need_h:
                        grad_h[s:s + chunk] = ((p @ Wc).float()
                                               - Wc[tc].float()).mul_(wc.unsqueeze(1))
                    if need_w:
                        hw = hc * wc.unsqueeze(1).to(dtype)
                        gw = (p.t() @ hw).float()
                        gw.index_add_(0, tc, hw.float(), alpha=-1.0)
                        grad_w += gw
                del p
        ctx.h_dtype = h.dtype
        ctx.w_dtype = weight.dtype
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (need_h, need_w)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        need_h, need_w = ctx.has
        gh = saved.pop(0).mul(grad_out).to(ctx.h_dtype) if need_h else None
        gw = saved.pop(0).mul(grad_out).to(ctx.w_dtype) if need_w else None
        return gh, gw, None, None, None, None


def chunked_head_loss(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                      weights: torch.Tensor, chunk: int = 1024,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum over tokens of weights * cross-entropy(head(hidden), targets), as a 0-d fp32 tensor.

    hidden (B,T,C), targets (B,T) long, weights (B,T) float (loss mask / normaliser). Tokens
    with weight 0 are skipped entirely. Equals `(F.cross_entropy(head(hidden).flatten(0,1),
    targets.flatten(), reduction="none") * weights.flatten()).sum()`."""
    C = hidden.shape[-1]
    h = hidden.reshape(-1, C)
    t = targets.reshape(-1)
    w = weights.reshape(-1).float()
    keep = w.nonzero().squeeze(1)
    if keep.numel() == 0:
        return (h.sum() * 0.0).float()
    if keep.numel() != w.numel():
        h, t, w = h.index_select(0, keep), t.index_select(0, keep), w.index_select(0, keep)
    return _ChunkedHeadCE.apply(h, head.weight, t, w, int(chunk), dtype)


def sequence_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                   mask: torch.Tensor, chunk: int = 1024,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B,) fp32: each row's sum over its masked tokens of log p(target), with autograd.
    One chunked head pass per row, so the full (T, 65536) logits never exist."""
    return -torch.stack([chunked_head_loss(hidden[b:b + 1], head, targets[b:b + 1],
                                           mask[b:b + 1], chunk, dtype)
                         for b in range(hidden.shape[0])])


def segment_logps(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor,
                  mask: torch.Tensor, segment: torch.Tensor, n: int, chunk: int = 1024,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n,) fp32: for s = 0 .. n-1, the sum of log p(target) over the masked tokens whose
    `segment` (B,T) is s (a packed row's answers, -1 on padding), with autograd. One chunked
    head pass per segment over its own tokens only: the same head work as sequence_logps on
    the answers' unpacked rows."""
    return -torch.stack([chunked_head_loss(hidden, head, targets, mask * (segment == s),
                                           chunk, dtype) for s in range(n)])


def dpo_losses(policy: torch.Tensor, reference: torch.Tensor | None, beta: float,
               kind: str = "sigmoid", gamma: float = 0.0,
               lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference losses per pair; policy / reference: (B, 2) sequence log-probs of (chosen,
    rejected). Returns (losses, reward margins m).
    - sigmoid, DPO (Rafailov et al. 2023): m = beta * ((pi_c - ref_c) - (pi_r - ref_r)),
      loss -log sigmoid(m).
    - simpo, SimPO (Meng et al. 2024), no reference: m = beta * (pi_c / n_c - pi_r / n_r)
      with n the answers' token counts (`lengths`, (B, 2)), loss -log sigmoid(m - gamma)."""
    if kind == "simpo":
        avg = policy / lengths.to(policy.dtype).clamp_min(1.0)
        margin = beta * (avg[:, 0] - avg[:, 1])
        return -F.logsigmoid(margin - gamma), margin
    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return -F.logsigmoid(margin), margin


class LossModule(nn.Module):
    """Wraps the (peft) model so one call = hidden states + chunked head loss; this is the
    module DeepSpeed wraps.

    DPO: `forward(x, y, w, ref, pair_scale, ftx_scale)` takes the B chosen rows then the B
    rejected rows of B pairs (w = their loss masks) and `ref` (B, 2), the pairs' reference
    log-probs (unused by SimPO), and returns pair_scale * sum of the pairs' DPO losses +
    ftx_scale * the chosen rows' summed cross-entropy. Packed (PACK=1): the rows hold whole
    pairs and `segments` (rows, T) numbers their answers, 2j / 2j + 1 for pair j's chosen /
    rejected (data/loader.py pack_pairs), with `reset` at each answer's start. `last_stats`
    then holds (sum of DPO losses, pairs with a positive margin, sum of margins, pairs),
    detached."""

    def __init__(self, model: nn.Module, head_chunk: int, compute_dtype: torch.dtype,
                 dpo_beta: float = 0.1, dpo_loss: str = "sigmoid", simpo_gamma: float = 0.5):
        super().__init__()
        self.model = model
        self.head_chunk = head_chunk
        self.compute_dtype = compute_dtype
        self.dpo_beta, self.dpo_loss, self.simpo_gamma = dpo_beta, dpo_loss, simpo_gamma
        self.last_stats: torch.Tensor | None = None
        if compute_dtype != torch.float32:
            # bf16 / fp16 training runs under autocast, which casts the adapters' fp32 weights
            # and their bf16 input itself. peft's plain-Linear LoRA would first cast the bf16
            # input up to fp32 for autocast to cast it back down: two full-size copies per
            # adapter and two more in backward, for the same bf16 matmul. (peft's bitsandbytes
            # layers already skip that cast under autocast.)
            from peft.tuners.tuners_utils import BaseTunerLayer

            for mod in model.modules():
                if isinstance(mod, BaseTunerLayer):
                    mod.cast_input_dtype_enabled = False

    def inner(self) -> nn.Module:
        return unwrap(self.model)

    def forward(self, input_ids, targets, weights, ref=None, pair_scale: float = 1.0,
                ftx_scale: float = 0.0, reset=None, segments=None):
        m = self.inner()  # reset: the document starts of packed rows (PACK=1), or None
        hidden, _ = m.forward_hidden(input_ids, reset=reset) if reset is not None else \
            m.forward_hidden(input_ids)
        if ref is None:
            return chunked_head_loss(hidden, m.head, targets, weights, self.head_chunk,
                                     self.compute_dtype)
        B = ref.shape[0]
        if segments is None:  # rows: B chosen, then B rejected
            logp = sequence_logps(hidden, m.head, targets, weights, self.head_chunk,
                                  self.compute_dtype)
            n = weights.sum(1)  # trained tokens per answer (SimPO's length normalisation)
        else:  # packed: segment 2j / 2j + 1 -> entries j / B + j, the unpacked order
            logp = segment_logps(hidden, m.head, targets, weights, segments, 2 * B,
                                 self.head_chunk, self.compute_dtype)
            n = torch.zeros(2 * B, dtype=torch.float32, device=weights.device).index_add_(
                0, segments.clamp_min(0).flatten(),
                (weights.float() * (segments >= 0)).flatten())
            logp, n = (torch.cat([v[0::2], v[1::2]]) for v in (logp, n))
        losses, margin = dpo_losses(torch.stack([logp[:B], logp[B:]], 1), ref.float(),
                                    self.dpo_beta, self.dpo_loss, self.simpo_gamma,
                                    torch.stack([n[:B], n[B:]], 1))
        loss = losses.sum() * pair_scale
        if ftx_scale:
            loss = loss - logp[:B].sum() * ftx_scale
        self.last_stats = torch.stack([losses.detach().sum(), (margin > 0).sum().float(),
                                       margin.detach().sum(),
                                       torch.tensor(float(B), device=margin.device)]).cpu()
        return loss


def autocast_ctx(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """The model (peft or not) in eval mode for the block, then back to its mode."""
    m = unwrap(model)
    was = m.training
    m.eval()
    bnb = sys.modules.get("bitsandbytes")
    if bnb is not None:
        for mod in m.modules():
            # bitsandbytes repacks a 4-bit CPU weight for its inference kernel the first time
            # it runs in eval mode, and that kernel has no backward: training after an eval
            # would silently drop the gradient through the frozen base. Keep those layers in
            # train mode (they have no dropout: the outputs are the same).
            if isinstance(mod, bnb.nn.Linear4bit):
                mod.training = True
    try:
        yield m
    finally:
        m.train(was)


@contextlib.contextmanager
def training_numerics(model: nn.Module):
    """No-grad forwards inside the block take the training forward's code path: the model's
    fused inference form of the time mix (model/rwkv7.py) computes the same maths in another
    precision (bf16 mixing coefficients), so DPO's reference log-probs taken with it would
    differ from the policy's at step 1 (a margin before any update)."""
    mods = [m for m in unwrap(model).modules() if isinstance(m, TimeMix)]
    for m in mods:
        m.fused_inference = False
    try:
        yield
    finally:
        for m in mods:
            del m.fused_inference  # back to the class default


@torch.no_grad()
def evaluate_loss(model: nn.Module, batches: list[dict], head_chunk: int = 1024,
                  precision: str = "fp32", device: torch.device | str = "cpu",
                  loss_fn: Callable | None = None) -> float:
    """Mean cross-entropy over all masked tokens of `batches` (nats/token); nan if none.
    `loss_fn(input_ids, targets, weights) -> summed loss` replaces the direct call (the
    DeepSpeed engine, which gathers ZeRO-3 shards)."""
    device = torch.device(device)
    dtype = compute_dtype(precision)
    total, count = 0.0, 0.0
    with eval_mode(model) as m:
        for b in batches:
            x = b["input_ids"].to(device)
            mask = b["loss_mask"].to(device).float()
            y = b["targets"].to(device)
            with autocast_ctx(device, precision):
                if loss_fn is not None:
                    total += float(loss_fn(x, y, mask))
                else:
                    hidden, _ = m.forward_hidden(x)
                    total += float(chunked_head_loss(hidden, m.head, y, mask, head_chunk,
                                                     dtype))
            count += float(mask.sum())
    return total / count if count else float("nan")


def pair_rows(batch: dict, a: int = 0, b: int | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chosen rows a:b then the rejected rows a:b of a DPO batch: (x, y, mask)."""
    return tuple(torch.cat([batch[f"chosen_{k}"][a:b], batch[f"rejected_{k}"][a:b]])
                 for k in ("input_ids", "targets", "loss_mask"))  # type: ignore[return-value]


def packed_pair_inputs(batch: dict, device: torch.device, world: int, dpo_ftx: float,
                       ref: torch.Tensor) -> Callable[[int, int], tuple]:
    """train.micro_inputs for a packed DPO batch (data/loader.py pack_pairs): the loss
    module's arguments for rows a:b, which hold pairs row_pairs[a]:row_pairs[b] whole. Each
    pair's loss is divided by the global batch's pair count and DPO_FTX's chosen-answer
    cross-entropy by its chosen tokens, as unpacked; x world undoes DeepSpeed's average."""
    seg, off = batch["segment"], batch["row_pairs"]
    pair_scale = world / batch["pair_index"].numel()
    chosen = float((batch["loss_mask"] * ((seg >= 0) & (seg % 2 == 0))).sum())
    ftx = dpo_ftx * world / max(chosen, 1.0)

    def rows(a: int, b: int) -> tuple:
        p0, p1 = int(off[a]), int(off[b])
        x, y, w, rs, s = (batch[k][a:b].to(device, non_blocking=True) for k in
                          ("input_ids", "targets", "loss_mask", "reset", "segment"))
        s = torch.where(s >= 0, s - 2 * p0, s)  # numbered from this micro-batch's first pair
        return x, y, w, ref[batch["pair_index"][p0:p1]].to(device), pair_scale, ftx, rs, s
    return rows


def reference_logps(model: nn.Module, batches, n_pairs: int, head_chunk: int = 1024,
                    precision: str = "fp32", device: torch.device | str = "cpu",
                    compiled: bool = False) -> torch.Tensor:
    """(n_pairs, 2) float64 sequence log-probs of (chosen, rejected) under `model` as it is
    now, for the pairs the DPO `batches` hold (by their pair_index; the others stay nan).

    By the code path the policy's log-probs will take: no-grad forwards in eval mode with the
    training numerics (what evaluate_dpo runs), or with `compiled` the compiled training
    forward itself (COMPILE=1 blocks run compiled only with gradients on, and inductor's
    fused kernels round differently from eager ops): a forward with autograd on, in the
    model's own (train) mode, whose graph is dropped."""
    device = torch.device(device)
    dtype = compute_dtype(precision)
    out = torch.full((n_pairs, 2), float("nan"), dtype=torch.float64)
    ctx = (contextlib.nullcontext(unwrap(model)) if compiled else eval_mode(model))
    with ctx as m, training_numerics(m), torch.set_grad_enabled(compiled):
        for batch in batches:
            x, y, w = (t.to(device) for t in pair_rows(batch))
            with autocast_ctx(device, precision):
                hidden, _ = m.forward_hidden(x)
                logp = sequence_logps(hidden, m.head, y, w, head_chunk, dtype).detach()
            del hidden
            B = batch["pair_index"].numel()
            out[batch["pair_index"]] = torch.stack([logp[:B], logp[B:]], 1).double().cpu()
    return out


@torch.no_grad()
def evaluate_dpo(loss_module: LossModule, batches: list[dict], reference: torch.Tensor,
                 precision: str = "fp32", device: torch.device | str = "cpu"
                 ) -> tuple[float, float]:
    """(mean DPO loss, share of pairs whose chosen answer gets the higher reward) over the
    DPO `batches`; the reference log-probs are indexed by each batch's pair_index."""
    device = torch.device(device)
    stats = torch.zeros(4, dtype=torch.float64)
    with eval_mode(loss_module.model), training_numerics(loss_module.model):
        for batch in batches:
            x, y, w = (t.to(device) for t in pair_rows(batch))
            ref = reference[batch["pair_index"]].to(device)
            with autocast_ctx(device, precision):
                loss_module(x, y, w, ref)
            stats += loss_module.last_stats.double()
    n = float(stats[3])
    return (float(stats[0]) / n, float(stats[1]) / n) if n else (float("nan"), float("nan"))


def compute_dtype(precision: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)

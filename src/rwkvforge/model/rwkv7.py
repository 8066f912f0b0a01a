"""The RWKV-7 ("x070") language model in plain PyTorch.

Parameter names and shapes are exactly those of BlinkDL's `.pth` files, so
a BlinkDL state dict loads with `RWKV7(cfg).load_state_dict(sd)` and `model.state_dict()` saves a file
every RWKV runtime loads. Shapes come from `RWKV7Config` (inferred from a checkpoint by
`rwkvforge.checkpoint.infer_config`). Model code does no I/O.

Three entry points share one set of weights:
- `forward(idx, state)` / `forward_hidden(idx, state)`: a whole (B, T) sequence (training,
  prefill); the WKV recurrence runs in its chunked matmul form (see `model/wkv.py`).
- `step(idx, state)`: one token per stream for decoding, (B,) -> (B, V).
State is a list with one `(att_shift (B,C), wkv (B,H,N,N), ffn_shift (B,C))` tuple per layer,
all fp32 whatever the weight dtype; it carries across calls, so prefill-then-step equals one
long forward. Batch-row helpers for it (select / cat / clone) are in generate.py, beside the
engine that uses them: one copy.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import rwkvforge.model.decode as decode
from rwkvforge.model.wkv import DEFAULT_CHUNK, WKV_IMPLS, wkv

# log(decay) = -exp(-0.5) * sigmoid(z): decay per step lies in (exp(-0.6065), 1). The literal
# matches the reference implementations (rwkv pip, RWKV-LM) digit for digit.
DECAY_SCALE = 0.606531
LN_X_EPS = 64e-5  # GroupNorm eps of att.ln_x in RWKV-7 (not the 1e-5 default)

State = list  # list[tuple[Tensor, Tensor, Tensor]], one tuple per layer


def _suggested_lora_dim(n_embd: int, factor: float) -> int:
    # RWKV-7's own sizing rule for the low-rank decay/iclr/value/gate projections
    return max(32, int(round(factor * math.sqrt(n_embd) / 32) * 32))


@dataclass
class RWKV7Config:
    """Shape of an RWKV-7 model. Read it from a checkpoint (`checkpoint.infer_config`)."""

    vocab_size: int = 65536
    n_layer: int = 12
    n_embd: int = 768
    head_size: int = 64
    dim_ffn: int = 3072
    d_decay: int = 64  # rank of w1/w2 (decay)
    d_aaa: int = 64  # rank of a1/a2 (in-context learning rate)
    d_mv: int = 32  # rank of v1/v2 (value residual)
    d_gate: int = 128  # rank of g1/g2 (output gate)

    @property
    def n_head(self) -> int:
        return self.n_embd // self.head_size

    @classmethod
    def suggested(cls, n_layer: int, n_embd: int, vocab_size: int = 65536, head_size: int = 64) -> "RWKV7Config":
        """The shapes BlinkDL's training code picks for a given depth and width."""
        return cls(
            vocab_size=vocab_size,
            n_layer=n_layer,
            n_embd=n_embd,
            head_size=head_size,
            dim_ffn=4 * n_embd,
            d_decay=_suggested_lora_dim(n_embd, 2.5),
            d_aaa=_suggested_lora_dim(n_embd, 2.5),
            d_mv=_suggested_lora_dim(n_embd, 1.7),
            d_gate=_suggested_lora_dim(n_embd, 5.0),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    def n_params(self) -> int:
        C, F_ = self.n_embd, self.dim_ffn
        att = 4 * C * C + 2 * C * (self.d_decay + self.d_aaa + self.d_gate) + 13 * C
        att_v = 2 * C * self.d_mv + C
        ffn = 2 * C * F_ + C
        per = att + ffn + 4 * C
        return 2 * self.vocab_size * C + self.n_layer * per + (self.n_layer - 1) * att_v + 4 * C


def _call(x, module, keep=False):  # noqa: ARG001 - checkpoint()'s keyword, unused by the plain call
    return module(x)


def token_shift(x: torch.Tensor, shift: torch.Tensor, reset: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The previous token's x for every position: (B,T,C), with `shift` (B,C) before the first.
    `reset` (B,T) bool: a token that starts a document (packed rows) has zeros before it, as
    the first token of a fresh state does.

    Eager: a `cat`. Traced by torch.compile: `roll` + `where`, the same values. Inductor's CPU
    code turns the cat's boundary (and, in backward, the read of the next row) into masked
    vector loads behind a per-vector branch, which slowed the fused kernels that combine the
    shift's backward with the layer-norm backward. bench/token_shift_bench.py --profile (one
    compiled 0.1B-width LoRA block, ctx 512, three runs): inductor's kernels took 5.9-7.6 ms
    per forward + backward against 8.5-11.8 ms with the cat; the whole block 0.91-1.08x the
    cat's time, within this VM's noise. Eager, roll + where costs ~3x the cat, so it is not
    used there."""
    if torch.compiler.is_compiling():
        first = torch.arange(x.shape[1], device=x.device).view(1, -1, 1) == 0
        prev = torch.where(first, shift.to(x.dtype).unsqueeze(1), torch.roll(x, 1, dims=1))
    else:
        prev = torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
    if reset is not None:
        prev = prev.masked_fill(reset.unsqueeze(-1), 0.0)
    return prev


def _vec(C: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(1, 1, C))


class TimeMix(nn.Module):
    """RWKV-7 attention replacement ("time mixing") of one layer."""

    fused_inference = True  # no-grad calls take the fused form (a switch for tests/benches)

    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        C, H, N = cfg.n_embd, cfg.n_head, cfg.head_size
        self.layer_id = layer_id
        self.n_head, self.head_size = H, N
        self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g = (_vec(C) for _ in range(6))
        self.w0 = _vec(C)
        self.w1 = nn.Parameter(torch.zeros(C, cfg.d_decay))
        self.w2 = nn.Parameter(torch.zeros(cfg.d_decay, C))
        self.a0 = _vec(C)
        self.a1 = nn.Parameter(torch.zeros(C, cfg.d_aaa))
        self.a2 = nn.Parameter(torch.zeros(cfg.d_aaa, C))
        if layer_id > 0:  # layer 0 defines v_first; real checkpoints have no v0/v1/v2 there
            self.v0 = _vec(C)
            self.v1 = nn.Parameter(torch.zeros(C, cfg.d_mv))
            self.v2 = nn.Parameter(torch.zeros(cfg.d_mv, C))
        self.g1 = nn.Parameter(torch.zeros(C, cfg.d_gate))
        self.g2 = nn.Parameter(torch.zeros(cfg.d_gate, C))
        self.k_k = _vec(C)
        self.k_a = _vec(C)
        self.r_k = nn.Parameter(torch.zeros(H, N))
        self.receptance = nn.Linear(C, C, bias=False)
        self.key = nn.Linear(C, C, bias=False)
        self.value = nn.Linear(C, C, bias=False)
        self.output = nn.Linear(C, C, bias=False)
        self.ln_x = nn.GroupNorm(H, C, eps=LN_X_EPS)

    def forward(self, x, shift, S, v_first, wkv_impl: str, chunk: int, lin=_call, reset=None):
        """x (B,T,C) after ln1; shift (B,C) = previous token's x; S (B,H,N,N) fp32.
        `lin(x, module)` applies one of the big Linears (lets inference swap in bf16 copies).
        `reset` (B,T) bool or None: tokens that start a document (shift and state restart:
        the WKV state from this layer's `time_state` when it has one, else from zero)."""
        B, T, C = x.shape
        H, N = self.n_head, self.head_size
        xx = token_shift(x, shift, reset) - x  # (B,T,C)
        if self.fused_inference and not torch.is_grad_enabled():
            # inference (prefill): the same maths in fewer passes over (B,T,C) tensors. Not
            # used with autograd: one stacked (6,B,T,C) mix would keep all six alive for
            # backward where the separate ones keep only those the matmuls need.
            maa = torch.stack([self.x_r, self.x_w, self.x_k, self.x_v, self.x_a, self.x_g])
            xr, xw, xk, xv, xa, xg = torch.addcmul(x, xx, maa.view(6, 1, 1, C).to(x.dtype)).unbind(0)
            r = lin(xr, self.receptance)
            w = torch.addmm(self.w0.view(1, C), torch.tanh(xw.reshape(-1, C) @ self.w1),
                            self.w2).view(B, T, C)
            k = lin(xk, self.key)
            v = lin(xv, self.value)
            if self.layer_id == 0:
                v_first = v
            else:
                v = torch.lerp(v, v_first.to(v.dtype), torch.sigmoid(torch.addmm(
                    self.v0.view(1, C), xv.reshape(-1, C) @ self.v1, self.v2)).view(B, T, C).to(v.dtype))
            a = torch.sigmoid(torch.addmm(self.a0.view(1, C), xa.reshape(-1, C) @ self.a1,
                                          self.a2)).view(B, T, C)
        else:
            xr, xw, xk = x + xx * self.x_r, x + xx * self.x_w, x + xx * self.x_k
            xv, xa, xg = x + xx * self.x_v, x + xx * self.x_a, x + xx * self.x_g

            r = lin(xr, self.receptance)
            w = self.w0 + torch.tanh(xw @ self.w1) @ self.w2
            k = lin(xk, self.key)
            v = lin(xv, self.value)
            if self.layer_id == 0:
                v_first = v
            else:
                v = v + (v_first - v) * torch.sigmoid(self.v0 + (xv @ self.v1) @ self.v2)
            a = torch.sigmoid(self.a0 + (xa @ self.a1) @ self.a2)  # in-context learning rate
        g = torch.sigmoid(xg @ self.g1) @ self.g2

        kk = F.normalize((k * self.k_k).view(B, T, H, N), dim=-1, p=2.0)  # (B,T,H,N)
        k = k * (1 + (a - 1) * self.k_a)
        log_w = -DECAY_SCALE * torch.sigmoid(w.float())  # (B,T,C) fp32, in (-0.61, 0)
        a4 = a.view(B, T, H, N)
        impl = "ref" if T == 1 else wkv_impl  # one step: the loop is the cheapest form
        # a document of a packed row starts where a row would: from the (tuned) initial state
        s_doc = None if reset is None else getattr(self, "time_state", None)  # (H,N,N) or None
        y, S = wkv(
            r.view(B, T, H, N), log_w.view(B, T, H, N), k.view(B, T, H, N), v.view(B, T, H, N),
            -kk, kk * a4, S, impl=impl, chunk_size=chunk, reset=reset, reset_state=s_doc,
        )  # y (B,T,H,N) fp32
        y = F.group_norm(y.reshape(B * T, C), H, self.ln_x.weight.float(), self.ln_x.bias.float(), LN_X_EPS)
        y = y.view(B, T, H, N).to(x.dtype)
        bonus = (r.view(B, T, H, N) * k.view(B, T, H, N) * self.r_k).sum(-1, keepdim=True)
        y = (y + bonus * v.view(B, T, H, N)).view(B, T, C)
        return lin(y * g, self.output, True), x[:, -1].float(), S, v_first


class ChannelMix(nn.Module):
    """RWKV-7 feed-forward ("channel mixing"): squared-ReLU MLP with a token shift."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        self.x_k = _vec(cfg.n_embd)
        self.key = nn.Linear(cfg.n_embd, cfg.dim_ffn, bias=False)
        self.value = nn.Linear(cfg.dim_ffn, cfg.n_embd, bias=False)

    def forward(self, x, shift, lin=_call, reset=None):
        k = torch.addcmul(x, token_shift(x, shift, reset) - x, self.x_k)
        k = lin(k, self.key, True)
        k = torch.relu(k).square() if torch.is_grad_enabled() else k.relu_().square_()
        return lin(k, self.value, True), x[:, -1].float()


class Block(nn.Module):
    def __init__(self, cfg: RWKV7Config, layer_id: int):
        super().__init__()
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(cfg.n_embd)
        self.ln1 = nn.LayerNorm(cfg.n_embd)
        self.ln2 = nn.LayerNorm(cfg.n_embd)
        self.att = TimeMix(cfg, layer_id)
        self.ffn = ChannelMix(cfg)

    def forward(self, x, v_first, att_shift, S, ffn_shift, wkv_impl: str, chunk: int, lin=_call,
                reset=None):
        dx, att_shift, S, v_first = self.att(self.ln1(x), att_shift, S, v_first, wkv_impl, chunk,
                                             lin, reset)
        x = x + dx
        dx, ffn_shift = self.ffn(self.ln2(x), ffn_shift, lin, reset)
        return x + dx, v_first, att_shift, S, ffn_shift


class RWKV7(nn.Module):
    """RWKV-7 language model. Build from a checkpoint with `checkpoint.load_model(path)`."""

    def __init__(self, cfg: RWKV7Config):
        super().__init__()
        if cfg.n_embd % cfg.head_size:
            raise ValueError(f"n_embd {cfg.n_embd} is not a multiple of head_size {cfg.head_size}")
        self.config = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layer)])
        self.ln_out = nn.LayerNorm(cfg.n_embd)
        self.head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.gradient_checkpointing = False  # recompute each block in backward: ~30% slower, far less memory
        self.wkv_impl = "auto"  # auto | ref | chunked | fla (see model/wkv.py)
        self.wkv_chunk = DEFAULT_CHUNK
        # Inference speed knob (no_grad calls only; training never sees it):
        #   None           every matmul in the weights' own dtype: exact (parity tests use this)
        #   torch.bfloat16 the big Linears and the head run on cached bf16 copies: calls with
        #                  > 16 rows (prefill) as bf16 GEMMs (~2-4x faster on CPUs with AMX /
        #                  AVX512-BF16), up to 16 rows (decode) through model/decode.gemm_bf16p
        #                  over a packed copy (half the bytes of fp32, read once for all rows;
        #                  fp32 activations up to 7 rows, bf16 ones from 8 as the GEMMs);
        #                  +50% weight memory (+100% with both copies in use); ~0.5% of the
        #                  max |logit| error (the gate: docs/inference.md)
        #   torch.int8     as bf16 above 64 rows; up to 64 rows (decode, single or batched)
        #                  the big Linears and the head use cached per-output-channel int8
        #                  weights through fbgemm's dynamic W8A8 kernel
        #                  (quantized::linear_dynamic, activations quantised per call): the
        #                  head GEMV ~9x and 768x3072 ~3x faster than fp32 here. Without fbgemm
        #                  (non-x86 builds): weight-only aten._weight_int8pack_mm for < 8 rows,
        #                  torch._int_mm with per-row activation scales for 8..64 rows.
        #                  ~1.6e-2 (1 stream) / ~1.8e-2 (16 streams) max logit error relative to
        #                  the max |logit| on the 0.1B-shaped random model
        # `sparse_ffn` (below, every mode but int8): step's channel-mix reads only the value
        # rows of channels that are non-zero after ReLU^2, from the (in, out) matrix: a view
        # after use_decode_layout, else a copy (+1/3 of the layers' matrix memory). Exact.
        # State, norms and the WKV recurrence stay fp32 in every mode; with a fast mode set,
        # `step` updates the WKV state with fewer passes (`_wkv_step_fused`; fp32 rounding only).
        self.infer_dtype: torch.dtype | None = None
        self._lowp: dict[tuple, tuple] = {}  # (id(weight), kind) -> (weight, version, copies)
        self._consts: dict[int, tuple] = {}  # layer -> (param versions, small tensors for step)
        self._layer_scratch: dict = {}  # thread -> decode.layer_step's work buffers

    # ---- state -----------------------------------------------------------------------------------
    def add_initial_state(self, wkv: torch.Tensor | None = None) -> None:
        """Give every layer an initial WKV state, the parameter `blocks.{i}.att.time_state`
        (H,N,N) fp32 (RWKV-PEFT's name and layout: rows = value, cols = key, as `wkv.py`):
        `init_state`, and so `forward` without a state, starts from it instead of zeros.
        `wkv` (L,H,N,N): its values (None: zeros, i.e. the plain model). State tuning trains
        it (state_tuning.py); inference loads a tuned one."""
        cfg = self.config
        shape = (cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size)
        if wkv is not None and tuple(wkv.shape) != shape:
            raise ValueError(f"initial state of shape {tuple(wkv.shape)}; this model takes "
                             f"{shape} (layers, heads, head size, head size)")
        dev = self.emb.weight.device
        for i, block in enumerate(self.blocks):
            init = torch.zeros(shape[1:]) if wkv is None else wkv[i].detach().float().clone()
            block.att.time_state = nn.Parameter(init.to(dev), requires_grad=False)

    def initial_wkv(self) -> torch.Tensor | None:
        """The layers' initial WKV states stacked, (L,H,N,N) (None: the model has none)."""
        states = [getattr(b.att, "time_state", None) for b in self.blocks]
        return None if states[0] is None else torch.stack(states)

    def init_state(self, batch_size: int, device=None) -> State:
        """Zeros, except the WKV state of a model with `add_initial_state`: its (trainable)
        initial state, one copy per row (the graph to it kept: state tuning's gradient)."""
        cfg = self.config
        device = device if device is not None else self.emb.weight.device
        B, C, H, N = batch_size, cfg.n_embd, cfg.n_head, cfg.head_size
        out = []
        for block in self.blocks:
            s0 = getattr(block.att, "time_state", None)
            S = (torch.zeros(B, H, N, N, dtype=torch.float32, device=device) if s0 is None
                 else s0.float().to(device).unsqueeze(0).repeat(B, 1, 1, 1))  # (B,H,N,N)
            out.append((torch.zeros(B, C, dtype=torch.float32, device=device), S,
                        torch.zeros(B, C, dtype=torch.float32, device=device)))
        return out

    # ---- sequence --------------------------------------------------------------------------------
    def forward_hidden(self, idx: torch.Tensor, state: State | None = None,
                       reset: torch.Tensor | None = None):
        """idx (B,T) long -> (hidden (B,T,C) after ln_out, new state). `reset` (B,T) bool:
        the tokens that start a document in a packed row; each restarts from a zero token
        shift and the WKV state a row starts from (`init_state`: zero, or the layer's
        `time_state`, whose gradient then sums every restart), so every document computes
        what it would alone (see model/wkv.py). v_first is per token, so it needs nothing."""
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(f"wkv_impl={self.wkv_impl!r}; expected one of {', '.join(WKV_IMPLS)}")
        B, T = idx.shape
        if state is None:
            state = self.init_state(B, idx.device)
        if reset is not None:
            if tuple(reset.shape) != (B, T):
                raise ValueError(f"reset mask has shape {tuple(reset.shape)}, expected the "
                                 f"tokens' (B, T) = {(B, T)}")
            reset = reset.to(device=idx.device, dtype=torch.bool)
        x = self.emb(idx)  # (B,T,C)
        ln0 = self.blocks[0].ln0
        if x.dtype == torch.float32 and ln0.weight.dtype != torch.float32:
            x = x.to(ln0.weight.dtype)  # a trained fp32 emb into frozen bf16 weights
        x = ln0(x)
        v_first = x  # placeholder; layer 0 replaces it with its own v
        use_cp = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        new_state = []
        for block, (att_shift, S, ffn_shift) in zip(self.blocks, state):
            args = (x, v_first, att_shift, S, ffn_shift, self.wkv_impl, self.wkv_chunk, self._lin)
            kw = {} if reset is None else {"reset": reset}
            if use_cp:
                x, v_first, att_shift, S, ffn_shift = checkpoint(block, *args, use_reentrant=False,
                                                                 **kw)
            else:
                x, v_first, att_shift, S, ffn_shift = block(*args, **kw)
            new_state.append((att_shift, S, ffn_shift))
        return self.ln_out(x), new_state

    def forward(self, idx: torch.Tensor, state: State | None = None, *, last_only: bool = False,
                reset: torch.Tensor | None = None):
        """idx (B,T) long -> (logits (B,T,V) fp32, new state). `last_only`: logits (B,V) of
        the final position only (prefill: skips T-1 rows of the vocabulary projection).
        `reset`: document starts of packed rows (see forward_hidden)."""
        h, state = self.forward_hidden(idx, state, reset)
        if last_only:
            h = h[:, -1]
        return self._lin(h, self.head).float(), state

    # ---- fast matmuls ----------------------------------------------------------------------------
    def _step_consts(self, block: Block, dtype: torch.dtype) -> dict:
        """Per-layer small tensors reshaped for `step` (flat (C,) vectors, the six mixing
        vectors stacked), cached and rebuilt whenever a parameter of the layer changes."""
        att, ffn = block.att, block.ffn
        # (the parameter dicts read directly: nn.Module.__getattr__, ~0.5 us a name, was a
        # tenth of a one-stream step's Python time across this and _step_layer)
        ap, lx = att._parameters, att._modules["ln_x"]._parameters
        srcs = tuple(ap[n] for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "k_k",
                                     "k_a", "r_k")) + (lx["weight"], lx["bias"],
                                                       ffn._parameters["x_k"]) \
            + ((ap["v0"],) if att.layer_id else ())
        key = (dtype, tuple((id(p), p._version) for p in srcs))
        hit = self._consts.get(block.layer_id)
        if hit is not None and hit[0] == key:
            return hit[1]
        with torch.no_grad():
            H, N = att.n_head, att.head_size
            flat = lambda p: p.detach().reshape(-1).to(dtype)  # noqa: E731
            c = {
                "maa": torch.stack([flat(p) for p in srcs[:6]]).unsqueeze(1),  # (6,1,C)
                "w0": flat(att.w0), "a0": flat(att.a0), "k_k": flat(att.k_k), "k_a": flat(att.k_a),
                "r_k": att.r_k.detach().float().view(1, H, N),
                "lnx_w": att.ln_x.weight.detach().float(), "lnx_b": att.ln_x.bias.detach().float(),
                "ffn_x_k": flat(ffn.x_k),
            }
            if att.layer_id:
                c["v0"] = flat(att.v0)
        self._consts[block.layer_id] = (key, c)
        return c

    def _lin(self, x: torch.Tensor, mod: nn.Module, keep: bool = False, **epi) -> torch.Tensor:
        """mod(x) as `_lin_plain`, with `step`'s element-wise work around it (`epi`: xmul,
        relu2, act, resid, see decode.gemm_bf16p): fused into the packed bf16 product where
        that runs (bf16 mode, decode rows), else the same torch ops around `_lin_plain`."""
        if not epi:
            return self._lin_plain(x, mod, keep)
        if self.infer_dtype is torch.bfloat16 and x.dim() == 2 and x.shape[0] <= decode.MAX_ROWS \
                and type(mod) is nn.Linear and mod.weight.dtype is not torch.bfloat16 \
                and not torch.is_grad_enabled():
            packed = self._lowp_weight(mod.weight, "bf16p")[0]
            y = None if packed is None else decode.gemm_bf16p(x, packed, x.shape[0] > 7, **epi)
            if y is not None:
                return y
        return _epilogue(self._lin_plain(_prologue(x, **epi), mod), **epi)

    def _lin_plain(self, x: torch.Tensor, mod: nn.Module, keep: bool = False) -> torch.Tensor:
        """mod(x), on a cached low-precision weight copy when `infer_dtype` allows it.
        `keep`: the caller takes a bf16 result as it is (it only adds it to an fp32 tensor,
        or feeds it to another Linear), saving a full-size conversion pass."""
        mode = self.infer_dtype
        if mode is torch.bfloat16 and x.dim() == 2 and x.shape[0] <= decode.MAX_ROWS \
                and type(mod) is nn.Linear and not torch.is_grad_enabled():
            # step's case first, without reshapes (a Python-bound ~8 us call ~100 times a step)
            w = mod.weight
            packed = None if w.dtype is torch.bfloat16 else self._lowp_weight(w, "bf16p")[0]
            y = None if packed is None else decode.gemm_bf16p(x, packed, x.shape[0] > 7)
            if y is not None:
                return y
        if mode is None or type(mod) is not nn.Linear or torch.is_grad_enabled():
            return mod(x)
        w = mod.weight
        rows = x.numel() // x.shape[-1]
        if mode == torch.int8 and 8 <= rows <= 64 and self._lowp_weight(w, "fbgemm")[0] is None:
            # batched decode without fbgemm: int8 x int8 GEMM, activations quantised per row
            q, _, scale = self._lowp_weight(w, "int8")
            shape = x.shape
            xs = x.reshape(rows, shape[-1]).float()
            sx = xs.abs().amax(dim=1, keepdim=True).clamp_min_(1e-12).div_(127.0)  # per row
            xq = torch.round(xs / sx).to(torch.int8)
            y = torch._int_mm(xq, q.t()).float().mul_(sx).mul_(scale)
            return y.view(*shape[:-1], -1).to(x.dtype)
        if mode == torch.bfloat16 and rows <= decode.MAX_ROWS and w.dtype != torch.bfloat16:
            # decode: the packed bf16 copy, read once for all rows (model/decode.gemm_bf16p);
            # activations fp32 up to 7 rows, bf16 (as the GEMM below) from 8
            packed = self._lowp_weight(w, "bf16p")[0]
            shape = x.shape
            y = None if packed is None else decode.gemm_bf16p(
                x.reshape(-1, shape[-1]), packed, bf16_rows=rows > 7)
            if y is not None:
                return y.view(*shape[:-1], -1)
        if rows > (64 if mode == torch.int8 else 7):  # many rows: bf16 GEMM (AMX / AVX512-BF16)
            if w.dtype == torch.bfloat16:
                return mod(x)
            y = F.linear(x.to(torch.bfloat16), self._lowp_weight(w, "bf16")[0])
            # (kept as bf16 only beside fp32 activations: bf16 + fp16 promotes to fp32, and an
            # fp16 model's next LayerNorm then refused the fp32 input)
            return y if keep and x.dtype is torch.float32 else y.to(x.dtype)
        if mode == torch.bfloat16 and w.dtype != torch.bfloat16:  # decode (<= 7 rows)
            shape = x.shape
            y = decode.gemv_bf16(x.reshape(-1, shape[-1]), self._lowp_weight(w, "bf16")[0])
            return mod(x) if y is None else y.view(*shape[:-1], -1)
        if mode == torch.int8:  # decode (<= 64 rows): int8 GEMV / small GEMM
            shape = x.shape
            x2 = x.reshape(-1, shape[-1])
            packed = self._lowp_weight(w, "fbgemm")[0]
            if packed is not None:  # fbgemm's dynamic W8A8 GEMV: ~4x _weight_int8pack_mm
                y = torch.ops.quantized.linear_dynamic(x2.float(), packed, False)
            else:  # weight-only int8 on bf16 activations
                q, scale, _ = self._lowp_weight(w, "int8")
                y = torch._weight_int8pack_mm(x2.to(torch.bfloat16), q, scale)
            return y.view(*shape[:-1], -1).to(x.dtype)
        return mod(x)

    def _mm(self, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
            act: str | None = None) -> torch.Tensor:
        """`step`'s act(x (B,in) @ w (in,out) (+ bias)), the time-mix's low-rank projections
        (act None, "tanh" or "sigmoid"): in bf16 mode with up to decode.MAX_ROWS rows, the
        packed bf16 product with its bias and activation in the same call (as `_lin`'s
        Linears: at 16 streams these fp32 products took ~10% of the step), else torch."""
        if self.infer_dtype == torch.bfloat16 and x.dim() == 2 and x.shape[0] <= decode.MAX_ROWS \
                and w.dtype != torch.bfloat16 and not torch.is_grad_enabled():
            packed = self._lowp_weight(w, "bf16pT")[0]
            y = None if packed is None else decode.gemm_bf16p(
                x, packed, bf16_rows=x.shape[0] > 7, bias=bias, act=act)
            if y is not None:
                return y
        return _epilogue(x @ w if bias is None else torch.addmm(bias, x, w), act=act)

    def _lowp_weight(self, w: torch.Tensor, kind: str) -> tuple:
        key = (id(w), kind)
        hit = self._lowp.get(key)
        if hit is None or hit[0] is not w or hit[1] != w._version:
            if kind in ("fp32T", "bf16T"):  # transposed (in, out): rows = input channels
                # (a view, no copy, of an fp32 weight in use_decode_layout's layout)
                data = (w.detach().t().to(torch.float32 if kind == "fp32T" else torch.bfloat16)
                        .contiguous(),)
                hit = (w, w._version, data)
                self._lowp[key] = hit
                return hit[2]
            wd = w.detach().contiguous()  # (out, in) rows, whatever layout the weight has
            if kind == "bf16":
                data = (wd.to(torch.bfloat16),)
            elif kind == "bf16p":  # decode's packed layout (None: a shape it does not take)
                data = (decode.pack_bf16(wd),)
            elif kind == "bf16pT":  # the same for an (in, out) matrix used as x @ w
                data = (decode.pack_bf16(wd.t()),)
            elif kind == "fbgemm":
                data = (_fbgemm_pack(wd.float()),)
            else:  # symmetric per-output-channel int8; scale in bf16 as the kernel expects
                wf = wd.float()
                scale = (wf.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
                q = torch.round(wf / scale[:, None]).clamp_(-127, 127).to(torch.int8)
                data = (q, scale.to(torch.bfloat16), scale)
            hit = (w, w._version, data)
            self._lowp[key] = hit
        return hit[2]

    @torch.no_grad()
    def use_decode_layout(self) -> None:
        """Store the big matrices (time-mix r/k/v/o, channel-mix key/value, head) as (in, out)
        in memory, each weight becoming a transposed view of that storage: same values, same
        shapes, no extra memory. A one-row fp32 matmul (decode) over that layout reads the
        weight ~1.5x faster on CPU than over BlinkDL's (out, in) (one stream through the
        matrix instead of one dot product per row), prefill GEMMs take either, and the exact
        mode's sparse channel-mix reads the value matrix in place (no transposed copy). For
        inference processes (generate.set_fast_path calls it on CPU); `state_dict()` then
        holds non-contiguous tensors, which `checkpoint.save_pth` makes contiguous."""
        mods = [self.head] + [m for b in self.blocks for m in (
            b.att.receptance, b.att.key, b.att.value, b.att.output, b.ffn.key, b.ffn.value)]
        for mod in mods:
            w = mod.weight
            if type(mod) is nn.Linear and w.device.type == "cpu" and w.is_contiguous() \
                    and w.dtype == torch.float32:
                w.data = w.data.t().contiguous().t()
        self._lowp.clear()

    def train(self, mode: bool = True):
        self._lowp.clear()  # weights are about to change: drop low-precision copies
        self._consts.clear()
        return super().train(mode)

    # ---- decode ----------------------------------------------------------------------------------
    sparse_ffn = True  # step's channel-mix reads only value rows of non-zero channels (exact)
    fused_step = True  # step's time-mix per-element work + WKV in one C call (decode.wkv_step)
    fused_layer = True  # bf16 mode: each layer of step in one C call (decode.layer_step)

    def _step_layer(self, block: Block, c: dict, x: torch.Tensor, att_shift: torch.Tensor,
                    S: torch.Tensor, ffn_shift: torch.Tensor, v_first: torch.Tensor,
                    inplace: bool) -> tuple | None:
        """`step`'s layer in one C call (decode.layer_step) in bf16 mode on CPU, the same
        maths as the torch-op path below it in `step` (fp32 rounding order only): x (B,C) is
        updated in place. -> (v_first, (xa_, S', xf)) or None where it does not apply
        (adapters' wrapped Linears, bf16 weights, shapes the kernel does not take)."""
        att, ffn = block.att, block.ffn
        B, C = x.shape
        am, fm = att._modules, ffn._modules  # (direct: see _step_consts)
        lins = (am["receptance"], am["key"], am["value"], am["output"], fm["key"], fm["value"])
        ws = [m._parameters.get("weight") for m in lins]
        if not (self.fused_layer and self.infer_dtype is torch.bfloat16 and x.is_cpu
                and x.dtype is torch.float32 and B <= decode.MAX_ROWS and x.is_contiguous()
                and decode.available() and all(type(m) is nn.Linear and m.bias is None
                                               for m in lins)
                and all(w.dtype is torch.float32 for w in ws)):
            return None
        if not all(t.dtype is torch.float32 and t.is_contiguous() and t.shape == x.shape
                   for t in (att_shift, ffn_shift)) or S.dtype is not torch.float32 \
                or not S.is_contiguous():
            return None
        first = att.layer_id == 0
        sparse = self.sparse_ffn and B <= decode.SPARSE_MAX_ROWS
        ap, lowp = att._parameters, self._lowp_weight
        weights = tuple(lowp(w, "bf16p")[0] for w in ws) + tuple(
            None if first and n[0] == "v" else lowp(ap[n], "bf16pT")[0]
            for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")) + (
            lowp(ws[5], "bf16T")[0] if sparse else None,)
        # (work buffers and structs per calling thread: two threads may decode with one
        # model; a few MB each, dropped when threads come and go)
        if len(self._layer_scratch) > 8:
            self._layer_scratch.clear()
        scratch = self._layer_scratch.setdefault(threading.get_ident(), {})
        key = (B, id(c), tuple(map(id, weights)), torch.get_num_threads(),
               decode.SPARSE_MAX_DENSITY, decode.dp_available())
        hit = scratch.get(att.layer_id)
        if hit is None or hit[0] != key:  # the layer's constant fields, checked once
            hit = self._layer_struct(block, c, B, weights, sparse)
            if hit is None:
                return None
            hit = scratch[att.layer_id] = (key, *hit)
        L = hit[1]
        S2 = S if inplace else S.clone()
        xa_, xf = torch.empty(B, C), torch.empty(B, C)
        if first:
            v_first = torch.empty(B, C)
        L.x, L.att_shift, L.ffn_shift, L.att_shift_out, L.ffn_shift_out, L.S, L.v_first = (
            t.data_ptr() for t in (x, att_shift, ffn_shift, xa_, xf, S2, v_first))
        if decode.layer_step(L, scratch) is None:
            return None
        return v_first, (xa_, S2, xf)

    def _layer_struct(self, block: Block, c: dict, B: int, weights: tuple, sparse: bool
                      ) -> tuple | None:
        """decode.Layer of `_step_layer` with its constant fields (weights: the six packed
        Linears, the eight packed low-rank matrices, the value rows for the sparse
        channel-mix) -> (struct, what it points to), or None (shapes, dtypes)."""
        att, ffn = block.att, block.ffn
        first = att.layer_id == 0
        if any(w is None for w in weights[:6] + weights[6:10] + weights[12:14]) \
                or (not first and None in weights[10:12]) or block.ln1.eps != block.ln2.eps:
            return None
        F = ffn.key.weight.shape[0]
        f = dict(B=B, C=self.config.n_embd, H=att.n_head, N=att.head_size, F=F,
                 dw=att.w1.shape[1], da=att.a1.shape[1], dv=0 if first else att.v1.shape[1],
                 dg=att.g1.shape[1], layer0=int(first),
                 bf16rows=int(B > 7 and decode.dp_available()),
                 nthreads=torch.get_num_threads(), sparse_max=decode.SPARSE_MAX_ROWS if sparse
                 else 0, sparse_nnz=int(F * decode.SPARSE_MAX_DENSITY), ln_eps=block.ln1.eps,
                 lnx_eps=LN_X_EPS, ln1w=block.ln1.weight, ln1b=block.ln1.bias,
                 ln2w=block.ln2.weight, ln2b=block.ln2.bias, maa=c["maa"], ffn_xk=c["ffn_x_k"],
                 w0=c["w0"], a0=c["a0"], v0=None if first else c["v0"], k_k=c["k_k"],
                 k_a=c["k_a"], r_k=c["r_k"], lnxw=c["lnx_w"], lnxb=c["lnx_b"])
        if any(t.dtype is not torch.float32 or not t.is_contiguous() or not t.is_cpu
               for t in f.values() if isinstance(t, torch.Tensor)):
            return None  # every fp32 operand as the kernel reads it
        f.update(zip(("Wr", "Wk", "Wv", "Wo", "Wkey", "Wval", "w1", "w2", "a1", "a2", "v1",
                      "v2", "g1", "g2", "WvalT"), weights))
        # (kept with the struct: its tensors, and `c`, whose id is part of the cache key)
        return decode.layer_struct(f), [c] + [t for t in f.values() if isinstance(t, torch.Tensor)]

    def _ffn_value(self, k: torch.Tensor, value: nn.Linear, resid: torch.Tensor) -> torch.Tensor:
        """resid + relu(k)^2 @ value.weight^T for `step`, k (B,F) the key output (overwritten).

        With `sparse_ffn` and at most decode.SPARSE_MAX_ROWS rows, the C kernel reads only the
        rows of a transposed copy of the weight (fp32 exact mode, bf16 with infer_dtype bf16) for
        channels that are non-zero after ReLU^2: exact, in fewer bytes (~half in a random
        model, most in a trained one); in bf16 mode only below decode.SPARSE_MAX_DENSITY (above
        it the dense packed product is faster). int8 mode keeps its int8 GEMV."""
        mode, w = self.infer_dtype, value.weight
        if self.sparse_ffn and mode is not torch.int8 and k.dtype == torch.float32 \
                and k.device.type == "cpu" and type(value) is nn.Linear \
                and k.shape[0] <= decode.SPARSE_MAX_ROWS:
            kind = "bf16T" if mode == torch.bfloat16 or w.dtype == torch.bfloat16 else "fp32T"
            if w.dtype in (torch.float32, torch.bfloat16) and decode.available():
                # bf16: past SPARSE_MAX_DENSITY the dense packed product is faster (measured
                # there; the exact mode's fp32 rows are read sparsely at any density)
                dense = (lambda act: self._lin(act, value)) if mode == torch.bfloat16 else None
                y = decode.ffn_sparse(k, self._lowp_weight(w, kind)[0],
                                      decode.SPARSE_MAX_DENSITY, dense)
                if y is not None:
                    return resid + y
        return self._lin(k, value, relu2=True, resid=resid)

    @torch.no_grad()
    def step(self, idx: torch.Tensor, state: State, inplace: bool = False):
        """One decoding step: idx (B,) long, state -> (logits (B,V) fp32, new state).

        Same maths as `forward` with T=1, written on (B,C) tensors to keep per-token
        overhead low. The input state is not modified, unless `inplace`: then the WKV states
        may be updated in place (the new state may share them), which saves a write of the
        whole state per step where the C kernel runs (decode.wkv_step). For a caller that
        owns the state and drops the old one (generate.Engine's decode batch).
        """
        x = self.blocks[0].ln0(self.emb(idx))  # (B,C)
        B, C = x.shape
        lin = self._lin
        # step's element-wise work in C calls (decode.ln_mix, gemm_bf16p's extras) in bf16
        # mode; the exact mode keeps torch's ops
        fused = self.infer_dtype is torch.bfloat16 and x.device.type == "cpu"
        v_first = x
        new_state = []
        for block, (att_shift, S, ffn_shift) in zip(self.blocks, state):
            att, ffn = block.att, block.ffn
            c = self._step_consts(block, x.dtype)
            got = self._step_layer(block, c, x, att_shift, S, ffn_shift, v_first, inplace) \
                if fused else None
            if got is not None:  # x updated in place
                v_first, layer_state = got
                new_state.append(layer_state)
                continue
            H, N = att.n_head, att.head_size
            # ln1 and the six token-shift interpolations (6,B,C): one C call in bf16 mode
            got = decode.ln_mix(x, att_shift, block.ln1, c["maa"]) if fused else None
            if got is None:
                xa_ = block.ln1(x)
                got = xa_, torch.addcmul(xa_, att_shift.to(xa_.dtype) - xa_, c["maa"])
            xa_, (xr, xw, xk, xv, xa, xg) = got[0], got[1].unbind(0)
            r = lin(xr, att.receptance)
            mm = self._mm
            w = mm(mm(xw, att.w1, act="tanh"), att.w2, c["w0"])
            k = lin(xk, att.key)
            v = lin(xv, att.value)
            if att.layer_id == 0:
                v_first = v
            else:
                v = torch.lerp(v, v_first, mm(mm(xv, att.v1), att.v2, c["v0"], act="sigmoid"))
            a = mm(mm(xa, att.a1), att.a2, c["a0"], act="sigmoid")
            g = mm(mm(xg, att.g1, act="sigmoid"), att.g2)
            got = decode.wkv_step(S, w, k, a, v, r, c, LN_X_EPS, inplace) if self.fused_step \
                else None
            # the per-element work and the WKV step in one C call, else torch ops
            y, S2 = got if got is not None else self._time_mix_tail(S, w, k, a, v, r, c, att)
            x = lin(y.to(x.dtype), att.output, xmul=g, resid=x)  # x + output(y * g)

            got = decode.ln_mix(x, ffn_shift, block.ln2, c["ffn_x_k"]) if fused else None
            if got is None:
                xf = block.ln2(x)
                got = xf, torch.addcmul(xf, ffn_shift.to(xf.dtype) - xf, c["ffn_x_k"])
            xf, kx = got[0], got[1].view(-1, C)
            x = self._ffn_value(lin(kx, ffn.key), ffn.value, resid=x)
            new_state.append((xa_.float(), S2.view(B, H, N, N), xf.float()))
        return lin(self.ln_out(x), self.head).float(), new_state

    def _time_mix_tail(self, S, w, k, a, v, r, c, att):
        """`step`'s time-mix from the projections to ln_x + bonus, in torch ops (the form
        decode.wkv_step fuses; used where its kernel does not apply). -> (y (B,C), S')."""
        B, C = k.shape
        H, N = att.n_head, att.head_size
        kk = F.normalize((k * c["k_k"]).view(B * H, N, 1), dim=1, p=2.0).float()
        k = k * (1 + (a - 1) * c["k_a"])
        w = torch.exp(torch.sigmoid(w.float()) * -DECAY_SCALE).view(B * H, 1, N)
        r4, k4, v4 = (t.float().view(B * H, N, 1) for t in (r, k, v))
        # S <- S diag(w) + (S @ -kk) (kk*a)^T + v k^T ; y = S r      (B*H,N,N) fp32
        if self.infer_dtype is None:  # exact: the reference order of operations
            S2 = S.view(B * H, N, N)
            sa = torch.bmm(S2, kk).neg_()
            S2 = torch.baddbmm(S2 * w, sa, (kk * a.float().view(B * H, N, 1)).transpose(1, 2))
            S2 = torch.baddbmm(S2, v4, k4.transpose(1, 2))
            y = torch.bmm(S2, r4).view(B, C)
        else:
            kka = kk * a.float().view(B * H, N, 1)
            S2, y = _wkv_step_fused(S.view(B * H, N, N), w, kk, kka, k4, v4, r4)
            y = y.view(B, C)
        y = F.group_norm(y, H, c["lnx_w"], c["lnx_b"], LN_X_EPS).view(B, H, N)
        bonus = (r4 * k4).view(B, H, N).mul_(c["r_k"]).sum(-1, keepdim=True)  # (B,H,1)
        y = torch.addcmul(y, bonus, v4.view(B, H, N)).view(B, C)
        return y, S2


def _prologue(x: torch.Tensor, xmul: torch.Tensor | None = None, relu2: bool = False,
              **_) -> torch.Tensor:
    """The torch form of decode.gemm_bf16p's input work: x * xmul, then relu(.)^2."""
    if xmul is not None:
        x = x * xmul
    return torch.relu(x).square_() if relu2 else x


def _epilogue(y: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None,
              resid: torch.Tensor | None = None, **_) -> torch.Tensor:
    """The torch form of decode.gemm_bf16p's output work: + bias, act, + resid."""
    if bias is not None:
        y = y + bias
    if act is not None:
        y = torch.tanh(y) if act == "tanh" else torch.sigmoid(y)
    return y if resid is None else resid + y


def _fbgemm_pack(w: torch.Tensor):
    """`w` (N,K) fp32 as fbgemm's prepacked per-output-channel symmetric int8 weight for
    `quantized::linear_dynamic` (activations quantised per call, 8 bits, int32 accumulate),
    or None where that engine is missing (non-x86 builds, a torch that dropped it): the
    caller then falls back to weight-only int8."""
    import warnings

    if "x86" not in torch.backends.quantized.supported_engines and \
            "fbgemm" not in torch.backends.quantized.supported_engines:
        return None
    try:
        scale = (w.abs().amax(dim=1) / 127.0).clamp_min(1e-12).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated, still shipped
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long),
                                            0, torch.qint8)
            return torch.ops.quantized.linear_prepack(qw, None)
    except (RuntimeError, AttributeError, NotImplementedError):
        return None


def _wkv_step_fused(S, w, kk, b, k, v, r):
    """One WKV step with fewer passes over the (B*H,N,N) fp32 state (it dominates memory
    traffic in batched decode): S' = S diag(w) + [-S kk, v] [b, k]^T and y = S' r computed
    as S (w*r) + [-S kk, v] ([b, k]^T r), so S is read once for both mat-vecs, S' written
    once and updated in place. w (BH,1,N); kk, b, k, v, r (BH,N,1). Same maths as the
    exact path, only the fp32 rounding order differs."""
    # (S X)^T = X^T S^T: the 2-row-by-N product is ~2.5x faster in the CPU bmm than S @ X
    # with its 2-column right-hand side
    mT = torch.bmm(torch.cat([kk.transpose(1, 2), w * r.transpose(1, 2)], dim=1),
                   S.transpose(1, 2))  # (BH,2,N)
    m = mT.transpose(1, 2)  # (BH,N,2)
    U = torch.cat([m[:, :, :1].neg(), v], dim=2)  # (BH,N,2)
    Vt = torch.cat([b, k], dim=2).transpose(1, 2)  # (BH,2,N)
    S2 = torch.mul(S, w).baddbmm_(U, Vt)
    y = torch.baddbmm(m[:, :, 1:], U, torch.bmm(Vt, r))  # (BH,N,1)
    return S2, y


__all__ = [
    "RWKV7",
    "RWKV7Config",
    "State",
]

"""Memory planner: predict the peak memory of a LoRA / QLoRA run before it starts, and pick
a configuration that fits the card.

    rwkvforge plan --model 1.5b --profile qlora-nf4 --ctx-len 1024 --vram 12GiB
    rwkvforge plan --model models/base/rwkv7-g1-2.9b.pth --ctx-len 4096 --vram 16GB --json
    rwkvforge plan --size 13.3b --num-nodes 2 --num-gpus 8 --vram 80GiB   # ZeRO-2 / 3 per GPU
    python -m rwkvforge.memory --model 0.4b --micro-bsz 4 --vram 12000MiB

`--model` is a size name (0.1b, 0.4b, 1.5b, 2.9b, 7.2b), a BlinkDL `.pth` (its shape is
read from the file) or a model config name under configs/model/. The output is the
predicted peak broken down by component, the largest micro-batch and context that fit
`--vram`, and for every model size which profile (lora-bf16 / qlora-int8 / qlora-nf4) fits.

API (pure Python: nothing here runs torch; `cfg` is any object with RWKV7Config's fields):

    estimate(cfg, settings, ctx_len=None, micro_bsz=None, device="cuda") -> Breakdown
        settings: a config.Settings, a Workload, or a mapping of Settings field names.
        Breakdown.allocated = what torch.cuda.max_memory_allocated() should report;
        Breakdown.total     = allocated + CUDA context + allocator slack (what must fit).
    plan(cfg, settings, vram_bytes, device="cuda") -> Plan      (recommendation)
    fit_table(settings, vram_bytes, ...) -> list of rows         (size x profile)
    preflight(settings, cfg, vram_bytes, force=False, device="cuda") -> Breakdown
        Raises MemoryPlanError (a ValueError) naming the shortfall and what to change when
        the run is predicted not to fit; with force=True it returns the breakdown instead
        (the caller should log `breakdown.warning(vram_bytes)`). vram_bytes=None: no check.
    parse_vram("12GiB") -> bytes;  budget_bytes(settings, device) -> bytes | None

How the numbers are made (see docs/memory.md for the derivation and the calibration):
- weights: block Linears named by LORA_TARGETS are stored by bitsandbytes when QUANT is set
  (nf4: 0.5 byte/param + one fp32 absmax per 64 weights, double quantisation off as in
  peft.py; int8: 1 byte/param + one fp32 scale per output row); everything else (emb, head,
  norms, the small decay/gate projections, non-targeted Linears) stays in the compute dtype.
- trainable tensors (adapters, TRAIN_PARTS) are fp32 (peft.py upcasts them): 4 bytes param,
  4 bytes gradient, AdamW 8 bytes (two fp32 moments) or AdamW8bit 2 bytes (two uint8 moments;
  tensors under 4096 elements stay fp32, as bitsandbytes does).
- activations: bytes saved for backward per token per layer, counted on the real block with
  torch.autograd.graph.saved_tensors_hooks (tests/test_memory.py re-counts them, so a model
  change that invalidates the constants fails a test).
- head + cross-entropy: the training loop runs `head` over HEAD_CHUNK tokens at a time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import torch

from rwkvforge import config as cfgmod
from rwkvforge import paths
from rwkvforge.checkpoint import infer_config, load_state_dict
from rwkvforge.config import LORA_TARGETS, OPTIMIZERS, QUANTS, TRAIN_TYPES
from rwkvforge.model.rwkv7 import RWKV7Config
from rwkvforge import native

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

PROFILES = {  # the profile presets compared in the fit table: only the base-weight storage differs
    "lora-bf16": {"quant": "none"},
    "qlora-int8": {"quant": "int8"},
    "qlora-nf4": {"quant": "nf4"},
}
# rwkv7-g1 shapes (n_layer, n_embd); everything else follows BlinkDL's formulas below
SIZES = {"0.1b": (12, 768), "0.4b": (24, 1024), "1.5b": (24, 2048), "2.9b": (32, 2560),
         "7.2b": (32, 4096), "13.3b": (61, 4096)}
VOCAB = 65536

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
NF4_BLOCK = 64  # bitsandbytes Params4bit blocksize; one fp32 absmax per block (no double quant)
ADAM8_MIN_NUMEL = 4096  # bitsandbytes keeps 32-bit state for smaller tensors

# --- activation constants: bytes saved for backward per token per layer, in units of n_embd,
# for the training path of train.py (frozen weights in the compute dtype, fp32 adapters,
# autocast for bf16/fp16). Counted with torch.autograd.graph.saved_tensors_hooks on
# model/rwkv7.py's forward_hidden (slope between T=128 and T=256, C=256 and 512 agree to 0.1%;
# parameters excluded), adapters on all six block Linears: fewer targets save less, so these
# are upper bounds for a subset. tests/test_memory.py re-counts them.
ACT_BLOCK = {"fp32": 109.1, "bf16": 20.6, "fp16": 20.6}  # norms, mixes, projections, FFN, LoRA inputs
ACT_WKV_CHUNKED = {"fp32": 88.2, "bf16": 135.2, "fp16": 135.2}  # model/wkv.py wkv_chunked (fp32 inside,
# autocast off: with bf16 inputs it also keeps their fp32 copies)
# model/wkv.py wkv_native (CPU): its inputs as given, exp(log_w) in fp32 and one fp32 state per
# NATIVE_CKPT=16 steps (16 B per channel); it recomputes the rest in backward
ACT_WKV_NATIVE = {"fp32": 24.0, "bf16": 59.0, "fp16": 59.0}
# fla's chunk_rwkv7 keeps its six bf16 inputs (the log-decay among them) and recomputes the
# rest in backward: 6*2 = 12 bytes per channel, plus its initial state per sequence. Measured
# (fla-core 0.6.0, under Triton's interpreter, which keeps what a GPU run keeps):
# tests/test_wkv_fla.py holds this constant to it.
ACT_WKV_FLA = 12.0
# PACK=1 (document resets): wkv_chunked also keeps its same-document masks, 0.75 B per channel
# (measured: saved-tensor bytes per token and channel, T=512 minus T=256, fp32 and bf16); the
# C kernel and fla keep only the (B, T) mask itself (1 B per token)
ACT_WKV_PACK_CHUNKED = 0.75
ACT_LORA_RANK = {"fp32": 4, "bf16": 2, "fp16": 2}  # per target per token per rank: lora_A output
ACT_CP_BOUNDARY = {"fp32": 8.0, "bf16": 4.0, "fp16": 4.0}  # GRAD_CP: saved per layer (x, v_first)
# outside the blocks: embedding + ln0 + ln_out outputs (compute dtype) and the chunked head's
# fp32 d(loss)/d(hidden), per token, in units of C
ACT_OUTSIDE_CB = 3
ACT_OUTSIDE_FP32 = 2

# --- fixed costs
CUDA_CONTEXT = 512 * MiB  # CUDA context + cuBLAS workspace; see docs/memory.md "Overhead"
ALLOCATOR_SLACK = 0.10  # caching allocator: reserved exceeds allocated by ~5-15% (fragmentation)
# CPU: buffers the math libraries allocate on a process's first matmuls and keep (measured on
# an AMD EPYC with avx512-bf16, torch 2.13: 23.7 MiB for bf16, 42-45 MiB for fp32 matmuls)
CPU_MATH_RUNTIME = {"bf16": 24 * MiB, "fp16": 24 * MiB, "fp32": 44 * MiB}


class MemoryPlanError(ValueError):
    """A run predicted not to fit, with the breakdown and what to change."""

    def __init__(self, message: str, breakdown: "Breakdown | None" = None):
        super().__init__(message)
        self.breakdown = breakdown


# ---- shapes --------------------------------------------------------------------------------------
def blinkdl_lora_dims(n_embd: int) -> dict[str, int]:
    """Ranks of RWKV-7's small decay / in-context-rate / value / gate projections as BlinkDL's
    RWKV-v7/train_temp/src/model.py suggests them: max(32, round(f(C) / 32) * 32)."""
    def r32(x: float) -> int:
        return max(32, int(round(x / 32) * 32))

    C = n_embd
    return {"d_decay": r32(1.8 * C ** 0.5), "d_aaa": r32(1.8 * C ** 0.5),
            "d_mv": r32(1.3 * C ** 0.5), "d_gate": r32(0.6 * C ** 0.8)}


def size_config(name: str):
    """RWKV7Config for a size name ('1.5b', 'rwkv7-1.5b', 'rwkv7-g1-1.5B' ...)."""
    key = normalize_size(name)
    if key is None:
        raise MemoryPlanError(f"unknown model size {name!r}; known: {', '.join(SIZES)} (or "
                              "give a .pth path).")
    L, C = SIZES[key]
    return RWKV7Config(vocab_size=VOCAB, n_layer=L, n_embd=C, head_size=64, dim_ffn=4 * C,
                       **blinkdl_lora_dims(C))


def normalize_size(name: str) -> str | None:
    m = re.fullmatch(r"(?:rwkv-?7-?)?(?:g1[a-z]?-)?(\d+(?:\.\d+)?)b", name.strip().lower())
    return m.group(1) + "b" if m and m.group(1) + "b" in SIZES else None


# ---- workload ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """The settings that decide memory (a subset of config.Settings)."""

    quant: str = "none"
    precision: str = "bf16"
    lora_r: int = 32
    lora_targets: tuple[str, ...] = LORA_TARGETS
    train_parts: tuple[str, ...] = ()
    use_dora: bool = False
    optimizer: str = "adamw"
    grad_cp: bool = False
    head_chunk: int = 1024
    wkv_impl: str = "auto"
    ctx_len: int = 512
    micro_bsz: int = 1
    data_type: str = "sft"  # dpo: a micro-batch of MICRO_BSZ pairs runs 2 x MICRO_BSZ rows
    train_type: str = "lora"  # state / lora+state: + an (H, N, N) fp32 initial state per layer
    pack: bool = False  # PACK=1: every row is CTX_LEN tokens of whole examples + reset mask

    @classmethod
    def from_any(cls, settings: Any, **overrides) -> "Workload":
        if isinstance(settings, Workload):
            base = dataclasses.asdict(settings)
        else:
            get = settings.get if isinstance(settings, Mapping) else (
                lambda k, d=None: getattr(settings, k, d))
            base = {}
            for f in dataclasses.fields(cls):
                v = get(f.name, None)
                if v is None:
                    continue
                if f.name in ("lora_targets", "train_parts") and isinstance(v, str):
                    v = tuple(x.strip() for x in v.split(",") if x.strip())
                base[f.name] = tuple(v) if isinstance(v, list) else v
        base.update({k: v for k, v in overrides.items() if v is not None})
        w = cls(**base)
        w.check()
        return w

    def check(self) -> None:
        if self.quant not in QUANTS:
            raise MemoryPlanError(f"QUANT={self.quant!r}: expected one of {', '.join(QUANTS)}.")
        if self.precision not in DTYPE_BYTES:
            raise MemoryPlanError(f"PRECISION={self.precision!r}: expected fp32, bf16 or fp16.")
        if self.optimizer not in OPTIMIZERS:
            raise MemoryPlanError(f"OPTIMIZER={self.optimizer!r}: expected one of "
                                  f"{', '.join(OPTIMIZERS)}.")
        bad = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if bad:
            raise MemoryPlanError(f"LORA_TARGETS: unknown {bad}; choose from "
                                  + ", ".join(LORA_TARGETS) + ".")
        if self.train_type not in TRAIN_TYPES:
            raise MemoryPlanError(f"TRAIN_TYPE={self.train_type!r}: expected one of "
                                  f"{', '.join(TRAIN_TYPES)}.")
        if self.ctx_len < 1 or self.micro_bsz < 1 or self.lora_r < 1 or self.head_chunk < 1:
            raise MemoryPlanError("CTX_LEN, MICRO_BSZ, LORA_R and HEAD_CHUNK must be >= 1.")


# ---- breakdown -----------------------------------------------------------------------------------
@dataclass
class Breakdown:
    """Predicted peak memory, by component (bytes)."""

    items: dict[str, int]  # allocated components, in display order
    overhead: dict[str, int]  # outside torch's allocator stats (context, slack)
    notes: dict[str, str] = field(default_factory=dict)
    workload: Workload | None = None
    device: str = "cuda"

    @property
    def allocated(self) -> int:
        """Comparable to torch.cuda.max_memory_allocated() (CPU: peak RSS growth)."""
        return sum(self.items.values())

    @property
    def total(self) -> int:
        """What the card must hold: allocated + context + allocator slack."""
        return self.allocated + sum(self.overhead.values())

    def fits(self, vram_bytes: int | None) -> bool:
        return vram_bytes is None or self.total <= vram_bytes

    def to_dict(self) -> dict:
        return {"device": self.device, "items": dict(self.items), "overhead": dict(self.overhead),
                "allocated": self.allocated, "total": self.total, "notes": dict(self.notes),
                "workload": dataclasses.asdict(self.workload) if self.workload else None}

    def table(self) -> str:
        rows = [(LABELS.get(k, k), v, self.notes.get(k, "")) for k, v in self.items.items()]
        rows.append(("= allocated peak (torch max_memory_allocated)", self.allocated, ""))
        rows += [(LABELS.get(k, k), v, self.notes.get(k, "")) for k, v in self.overhead.items()]
        rows.append(("= total (must fit in VRAM)", self.total, ""))
        w = max(len(r[0]) for r in rows)
        return "\n".join(f"{a:<{w}}  {fmt_bytes(b):>10}  {c}".rstrip() for a, b, c in rows)

    def warning(self, vram_bytes: int) -> str:
        return (f"predicted peak {fmt_bytes(self.total)} exceeds the budget "
                f"{fmt_bytes(vram_bytes)}; continuing because of --force (expect CUDA out of "
                "memory).")


LABELS = {
    "base_weights": "base weights",
    "adapter": "trainable params (fp32)",
    "gradients": "gradients (fp32)",
    "optimizer": "optimizer state",
    "activations": "activations",
    "head_ce": "head + cross-entropy chunk",
    "wkv_state": "WKV state",
    "transient": "dequant / DoRA workspace",
    "runtime": "math-library buffers",
    "zero_master": "ZeRO fp32 partition copy",
    "zero_gathered": "ZeRO-3 gathered layer",
    "zero_bucket": "ZeRO gradient reduce bucket",
    "cuda_context": "CUDA context (+cuBLAS)",
    "allocator_slack": "allocator slack",
}


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{n / KiB:.1f} KiB"


def _linear_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(in, out) of each block Linear per target name."""
    C, F = cfg.n_embd, cfg.dim_ffn
    return {"att.receptance": (C, C), "att.key": (C, C), "att.value": (C, C),
            "att.output": (C, C), "ffn.key": (C, F), "ffn.value": (F, C)}


def _small_params_per_layer(cfg) -> dict[str, int]:
    """Non-Linear parameters of one block by TRAIN_PARTS group (layer > 0)."""
    C = cfg.n_embd
    # mixes, w0/a0/v0, lora pairs, k_k/k_a, r_k, ffn.x_k (the count DeepSpeed's estimator makes
    # of the real module: tests/test_memory.py)
    time = (6 * C + 3 * C + 2 * C * (cfg.d_decay + cfg.d_aaa + cfg.d_gate) + 2 * C * cfg.d_mv
            + 2 * C + cfg.n_head * cfg.head_size + C)
    ln = 2 * 2 * C + 2 * C  # ln1, ln2, att.ln_x (weight + bias)
    return {"time": time, "ln": ln}


def estimate(cfg, settings: Any, ctx_len: int | None = None, micro_bsz: int | None = None,
             device: str = "cuda") -> Breakdown:
    """Predicted peak memory of one training step (forward + backward + optimizer step)."""
    w = Workload.from_any(settings, ctx_len=ctx_len, micro_bsz=micro_bsz)
    if device not in ("cuda", "cpu"):
        raise MemoryPlanError(f"device={device!r}: expected cuda or cpu.")
    L, C, V = cfg.n_layer, cfg.n_embd, cfg.vocab_size
    H, N = cfg.n_embd // cfg.head_size, cfg.head_size
    B, T = w.micro_bsz * (2 if w.data_type == "dpo" else 1), w.ctx_len
    cb = DTYPE_BYTES[w.precision]
    shapes = _linear_shapes(cfg)
    small = _small_params_per_layer(cfg)
    targets = [t for t in LORA_TARGETS if t in w.lora_targets]
    parts = set(w.train_parts)
    notes: dict[str, str] = {}

    # ---- base weights ----------------------------------------------------------------------------
    lin_params = {t: i * o for t, (i, o) in shapes.items()}
    q_params = sum(lin_params[t] for t in targets) * L if w.quant != "none" else 0
    q_rows = sum(shapes[t][1] for t in targets) * L if w.quant != "none" else 0
    v_layer0 = 2 * C * cfg.d_mv + C  # layer 0 has no value-residual v0/v1/v2
    total_params = (2 * V * C + L * (sum(lin_params.values()) + small["time"] + small["ln"])
                    - v_layer0 + 2 * C + 2 * C)  # + ln0, ln_out
    if w.quant == "nf4":
        q_bytes = q_params // 2 + 4 * math.ceil(q_params / NF4_BLOCK)
        qnote = f"{q_params / 1e6:.0f}M params in NF4 (0.5 B + fp32 absmax/{NF4_BLOCK})"
    elif w.quant == "int8":
        q_bytes = q_params + 4 * q_rows
        qnote = f"{q_params / 1e6:.0f}M params in int8 (+ fp32 row scales)"
    else:
        q_bytes, qnote = 0, ""
    # trainable base tensors (TRAIN_PARTS) are upcast to fp32 and counted under "adapter"
    part_params = {"emb": V * C, "head": V * C, "time": L * small["time"] - v_layer0,
                   "ln": L * small["ln"] + 4 * C}
    trained_base = sum(part_params[p] for p in parts if p in part_params)
    dense = total_params - q_params - trained_base
    items: dict[str, int] = {"base_weights": q_bytes + dense * cb}
    notes["base_weights"] = (f"{total_params / 1e9:.2f}B params; " + (qnote + "; rest " if qnote
                             else "") + f"{w.precision}")

    # ---- adapter, gradients, optimizer -----------------------------------------------------------
    r = w.lora_r
    lora_tensors = []  # element counts of every trainable tensor
    kinds = w.train_type.split("+")
    for t in targets if "lora" in kinds else ():
        i, o = shapes[t]
        lora_tensors += [r * i, r * o] * L
        if w.use_dora:
            lora_tensors += [o] * L
    states = [H * N * N] * L if "state" in kinds else []  # state tuning: S0 per layer
    trainable = lora_tensors + [part_params[p] for p in parts if p in part_params] + states
    n_train = sum(trainable)
    items["adapter"] = 4 * n_train
    what = ([f"LoRA r={r} on {len(targets)} Linears x {L} layers"] if lora_tensors else []) + (
        [",".join(sorted(parts))] if parts else []) + (
        [f"initial state {H}x{N}x{N} x {L} layers"] if states else [])
    notes["adapter"] = f"{n_train / 1e6:.2f}M params ({' + '.join(what)})"
    items["gradients"] = 4 * n_train
    if w.optimizer == "adamw":
        items["optimizer"] = 8 * n_train
        notes["optimizer"] = "AdamW: two fp32 moments, 8 B/param"
    else:
        items["optimizer"] = sum(2 * n if n >= ADAM8_MIN_NUMEL else 8 * n for n in trainable)
        notes["optimizer"] = "AdamW8bit: two uint8 moments, 2 B/param"

    # ---- activations -----------------------------------------------------------------------------
    impl = w.wkv_impl
    if impl == "auto":  # what model/wkv.py picks: fla on CUDA, the C kernel on CPU
        if device == "cuda":
            impl = "fla" if _fla_installed() else "chunked"
        else:
            impl = "native" if native.available("wkv_cpu") else "chunked"
    wkv_c = (ACT_WKV_FLA if impl == "fla" else ACT_WKV_NATIVE[w.precision]
             if impl == "native" else ACT_WKV_CHUNKED[w.precision])
    if w.pack and impl == "chunked":
        wkv_c += ACT_WKV_PACK_CHUNKED
    per_tok_layer = ((ACT_BLOCK[w.precision] + wkv_c) * C
                     + ACT_LORA_RANK[w.precision] * r * len(targets))
    if w.use_dora:
        per_tok_layer += 4 * sum(shapes[t][0] for t in targets)  # DoRA's second pass over x
    if w.grad_cp:
        act = B * T * (L * ACT_CP_BOUNDARY[w.precision] * C + per_tok_layer)
        notes["activations"] = (f"GRAD_CP: {ACT_CP_BOUNDARY[w.precision]:.0f}*C B/token/layer "
                                f"+ one block recomputed ({per_tok_layer / C:.0f}*C B/token)")
    else:
        act = B * T * L * per_tok_layer
        notes["activations"] = f"{per_tok_layer / C:.0f}*C B/token/layer ({impl} WKV)"
    act += B * T * C * (ACT_OUTSIDE_CB * cb + ACT_OUTSIDE_FP32 * 4)
    items["activations"] = int(act)
    if w.data_type == "dpo":
        notes["activations"] += f"; DPO: {w.micro_bsz} pairs = {B} sequences"
    elif w.pack and w.data_type == "sft":  # every step reaches this peak (PACK=0: the longest)
        items["activations"] += B * T  # the reset mask (bool)
        notes["activations"] += "; PACK=1: every row is CTX_LEN tokens"

    # ---- head + cross-entropy, one chunk at a time (train.py computes its gradient in the --------
    # forward): fp32 logits + fp32 softmax/gradient + the gradient in the compute dtype, and
    # logsumexp's fp32 temporary; a trainable head is also cast to the compute dtype
    hc = min(w.head_chunk, T if w.data_type == "dpo" else B * T)  # DPO: one row at a time
    per = 12 + (cb if cb != 4 else 0)
    if device == "cpu":
        # measured (bench/memory_bench.py, peak RSS at HEAD_CHUNK 64 vs 256 on the demo
        # shape): train.py's chunk loss works in place on reused scratch buffers, so a chunk
        # costs one fp32 logits buffer (4 B per entry) in fp32, that plus a copy in the compute
        # dtype (6 B) in bf16 / fp16, and only the bf16 logits (2 B) when the C softmax runs on
        # them in place. CUDA keeps the older, larger figure above until it is measured on a GPU.
        per = 4 if cb == 4 else cb + 4
        if w.precision == "bf16" and V % 32 == 0:
            if native.available("softmax_cpu"):
                per = cb
    items["head_ce"] = hc * V * per + (V * C * cb if "head" in parts and cb != 4 else 0)
    notes["head_ce"] = f"{hc} tokens x {V} vocab x {per} B"

    # ---- WKV state: returned per layer (att_shift, S, ffn_shift), fp32 ---------------------------
    items["wkv_state"] = L * B * (H * N * N + 2 * C) * 4

    # ---- transient: a dequantised copy of the largest quantised Linear (forward and backward -----
    # each make one), DoRA's full-size B@A and norm
    biggest = max((lin_params[t] for t in targets), default=0)
    tr = 0
    if w.quant != "none":
        tr += 2 * biggest * cb
    if w.use_dora:
        tr += 3 * biggest * 4
    items["transient"] = tr

    if device == "cpu":
        # the math libraries' own buffers, allocated by the first matmuls of the process and
        # kept (oneDNN / BLAS packing and thread scratch): measured as the RSS growth of the
        # first (128 x C) @ (C x 65536) matmul, the same for C = 256 and 768
        items["runtime"] = CPU_MATH_RUNTIME[w.precision]
        notes["runtime"] = "math-library buffers of the first matmuls (CPU, once per process)"
    overhead: dict[str, int] = {}
    if device == "cuda":
        overhead["cuda_context"] = CUDA_CONTEXT
        dynamic = items["activations"] + items["head_ce"] + items["transient"]
        overhead["allocator_slack"] = int(ALLOCATOR_SLACK * dynamic)
    return Breakdown(items=items, overhead=overhead, notes=notes, workload=w, device=device)


def _fla_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("fla") is not None


# ---- several GPUs and nodes: ZeRO sharding -------------------------------------------------------
ZERO_GATHER_BYTES = 4  # DeepSpeed's estimator: 4 B per parameter of the largest layer, gathered
# the ZeRO options `plan` compares: (DEEPSPEED_STAGE, DEEPSPEED_OFFLOAD)
ZERO_OPTIONS = ((2, False), (2, True), (3, False), (3, True))
MODEL_STATES = ("base_weights", "adapter", "gradients", "optimizer", "zero_master",
                "zero_gathered")


def param_counts(cfg) -> tuple[int, int]:
    """(all parameters, the largest module's own parameters), counted as DeepSpeed's
    estimator counts a live model (deepspeed.runtime.zero.stage3.model_to_params): the
    embedding / head (V x C) is the largest module of every RWKV-7 shape here."""
    C, F, V, L = cfg.n_embd, cfg.dim_ffn, cfg.vocab_size, cfg.n_layer
    small = _small_params_per_layer(cfg)
    lin = sum(i * o for i, o in _linear_shapes(cfg).values())
    total = 2 * V * C + L * (lin + small["time"] + small["ln"]) - (2 * C * cfg.d_mv + C) + 4 * C
    att_own = small["time"] - C  # the att module's own parameters (ffn.x_k is ffn's)
    return total, max(V * C, C * F, att_own)


def zero_estimate(cfg, settings: Any, stage: int, offload: bool, nodes: int = 1,
                  gpus: int = 1, device: str = "cuda") -> tuple[Breakdown, int]:
    """(per-GPU breakdown of one rank, bytes each node keeps in CPU RAM for offload) of a
    DeepSpeed run over W = nodes x gpus ranks (data parallel: activations as one process).
    ZeRO-1/2 shard the optimiser states and their fp32 partition copy (ZeRO-2 the gradients
    too) over W; ZeRO-3 also the parameters, frozen base weights included, and holds the
    layer it computes gathered (DeepSpeed's allowance: 4 B per parameter of the largest
    layer). OFFLOAD moves the optimiser states and partition copy (ZeRO-3: the parameters
    too) to CPU RAM. Gradients pass through a reduce bucket of the trainable size
    (distributed.ds_config sets it)."""
    if stage not in (1, 2, 3):
        raise MemoryPlanError(f"DEEPSPEED_STAGE={stage}: ZeRO sharding is stage 1, 2 or 3.")
    if nodes < 1 or gpus < 1:
        raise MemoryPlanError(f"--num-nodes {nodes} --num-gpus {gpus}: both must be >= 1.")
    bd = estimate(cfg, settings, device=device)
    W = nodes * gpus
    items, notes = dict(bd.items), dict(bd.notes)
    n_train = items["adapter"] // 4
    shard = (lambda b: 0) if offload else (lambda b: -(-b // W))
    cpu = 0
    if offload:  # cpu: the offloaded bytes of all W ranks together
        cpu += items["optimizer"] + 4 * n_train
    items["optimizer"] = shard(items["optimizer"])
    items["zero_master"] = shard(4 * n_train)
    if stage >= 2:
        if offload:
            cpu += 4 * n_train
        items["gradients"] = shard(items["gradients"])
    items["zero_bucket"] = 4 * n_train if stage >= 2 else 0
    if stage == 3:
        if offload:
            cpu += items["base_weights"] + items["adapter"]
        items["base_weights"] = shard(items["base_weights"])
        items["adapter"] = shard(items["adapter"])
        items["zero_gathered"] = ZERO_GATHER_BYTES * param_counts(cfg)[1]
        notes["zero_gathered"] = "DeepSpeed's allowance: 4 B x the largest layer's parameters"
    where = "in CPU RAM" if offload else f"/ {W} ranks"
    notes["optimizer"] = f"{notes.get('optimizer', '')}; {where}"
    if stage == 3:
        notes["base_weights"] = f"{notes['base_weights']}; {where}"
    cpu_node = cpu * gpus // W  # each node holds its own ranks' shards of what is offloaded
    bd = Breakdown(items=items, overhead=bd.overhead, notes=notes, workload=bd.workload,
                   device=device)
    if device == "cuda":
        dynamic = items["activations"] + items["head_ce"] + items["transient"]
        bd.overhead["allocator_slack"] = int(ALLOCATOR_SLACK * dynamic)
    return bd, cpu_node


def model_states(bd: Breakdown) -> int:
    """The model states of a breakdown (parameters, gradients, optimiser states and ZeRO's
    copies and gathered layer): what DeepSpeed's memory estimators count."""
    return sum(bd.items.get(k, 0) for k in MODEL_STATES)


def cluster_table(cfg, settings: Any, vram_bytes: int | None, nodes: int, gpus: int,
                  device: str = "cuda", max_nodes: int = 1024) -> list[dict]:
    """Per ZeRO option: the per-GPU total on `nodes` x `gpus`, the CPU RAM a node keeps for
    offload, and the smallest cluster on which the run fits `vram_bytes`: min_gpus GPUs of
    one node, or min_nodes whole nodes of `gpus` GPUs (None: not on any cluster up to
    max_nodes nodes)."""
    w = Workload.from_any(settings)
    rows = []
    for stage, off in ZERO_OPTIONS:
        row: dict[str, Any] = {"stage": stage, "offload": off}
        if stage == 3 and w.quant != "none":
            row["refused"] = "ZeRO-3 cannot shard 4-/8-bit base weights (train refuses it)"
            rows.append(row)
            continue
        bd, cpu = zero_estimate(cfg, w, stage, off, nodes, gpus, device)
        row.update(total=bd.total, model_states=model_states(bd), cpu_per_node=cpu,
                   fits=bd.fits(vram_bytes), min_nodes=None, min_gpus=None)
        if vram_bytes is not None:
            def ok(ranks: int, stage=stage, off=off) -> bool:
                return zero_estimate(cfg, w, stage, off, 1, ranks, device)[0].total <= vram_bytes
            if ok(max_nodes * gpus):
                lo, hi = 1, max_nodes * gpus  # the per-GPU total falls as ranks are added
                while lo < hi:
                    mid = (lo + hi) // 2
                    lo, hi = (lo, mid) if ok(mid) else (mid + 1, hi)
                # whole nodes of `gpus` GPUs, or part of one node
                row["min_nodes"], row["min_gpus"] = ((1, lo) if lo <= gpus
                                                     else (-(-lo // gpus), gpus))
        rows.append(row)
    return rows


def format_cluster_table(rows: list[dict], vram_bytes: int | None, nodes: int,
                         gpus: int) -> str:
    lines = [f"{'ZeRO':<16} {f'per GPU on {nodes}x{gpus}':>18} {'model states':>13} "
             f"{'CPU RAM/node':>13}  smallest cluster (up to {gpus} GPU(s) per node)"]
    for r in rows:
        name = f"ZeRO-{r['stage']}" + (" + offload" if r["offload"] else "")
        if "refused" in r:
            lines.append(f"{name:<16} {r['refused']}")
            continue
        mark = "" if vram_bytes is None else (" ok" if r["fits"] else " --")
        small = ("(give --vram)" if vram_bytes is None else "none up to 1024 nodes: the "
                 "unsharded part alone exceeds the budget" if r["min_nodes"] is None
                 else f"{r['min_nodes']} node(s) x {r['min_gpus']} GPU(s)")
        lines.append(f"{name:<16} {fmt_bytes(r['total']) + mark:>18} "
                     f"{fmt_bytes(r['model_states']):>13} {fmt_bytes(r['cpu_per_node']):>13}  "
                     f"{small}")
    return "\n".join(lines)


# ---- planning ------------------------------------------------------------------------------------
@dataclass
class Plan:
    breakdown: Breakdown
    vram: int | None
    max_micro_bsz: int  # at the requested ctx_len (0: not even 1 fits)
    max_ctx_len: int  # at the requested micro_bsz (0: not even 128 fits)
    suggestions: list[str]

    def to_dict(self) -> dict:
        return {"vram": self.vram, "fits": self.breakdown.fits(self.vram),
                "max_micro_bsz": self.max_micro_bsz, "max_ctx_len": self.max_ctx_len,
                "suggestions": list(self.suggestions), "breakdown": self.breakdown.to_dict()}


CTX_STEP = 128


def _largest(ok, lo: int, hi: int) -> int:
    """Largest x in [lo, hi] with ok(x) (ok monotone decreasing); lo-1 when none."""
    if not ok(lo):
        return lo - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def plan(cfg, settings: Any, vram_bytes: int | None, device: str = "cuda",
         ctx_len: int | None = None, micro_bsz: int | None = None,
         max_micro_bsz: int = 256, max_ctx_len: int = 1 << 17) -> Plan:
    """The breakdown for the requested run, plus the largest micro-batch (at this context) and
    the largest context (multiple of 128, at this micro-batch) predicted to fit, and what to
    change when it does not fit."""
    w = Workload.from_any(settings, ctx_len=ctx_len, micro_bsz=micro_bsz)
    bd = estimate(cfg, w, device=device)
    if vram_bytes is None:
        return Plan(bd, None, w.micro_bsz, w.ctx_len, [])

    def fits(**kw) -> bool:
        return estimate(cfg, dataclasses.replace(w, **kw), device=device).total <= vram_bytes

    mb = max(0, _largest(lambda b: fits(micro_bsz=b), 1, max_micro_bsz))
    steps = _largest(lambda s: fits(ctx_len=s * CTX_STEP), 1, max_ctx_len // CTX_STEP)
    ctx = max(0, steps * CTX_STEP)
    return Plan(bd, vram_bytes, mb, ctx, suggestions(cfg, w, vram_bytes, device))


def suggestions(cfg, w: Workload, vram_bytes: int, device: str = "cuda") -> list[str]:
    """Changes that bring the run under the budget, each checked with `estimate`, cheapest
    (least effect on speed and quality) first. Empty when it already fits."""
    cur = estimate(cfg, w, device=device).total
    if cur <= vram_bytes:
        return []
    tries: list[tuple[str, dict]] = []
    if not w.grad_cp:
        tries.append(("GRAD_CP=1 (recompute activations: ~30% slower)", {"grad_cp": True}))
    if w.head_chunk > 256:
        tries.append((f"HEAD_CHUNK=256 (now {w.head_chunk})", {"head_chunk": 256}))
    if w.optimizer == "adamw":
        tries.append(("OPTIMIZER=adamw8bit", {"optimizer": "adamw8bit"}))
    for q, prof in (("int8", "qlora-int8"), ("nf4", "qlora-nf4")):
        if w.quant == "none" or (w.quant == "int8" and q == "nf4"):
            tries.append((f"--profile {prof} (QUANT={q})", {"quant": q}))
    out, acc = [], {}
    for text, change in tries:
        alone = estimate(cfg, dataclasses.replace(w, **change), device=device).total
        acc.update(change)
        combined = estimate(cfg, dataclasses.replace(w, **acc), device=device).total
        out.append(f"{text}: {fmt_bytes(alone)} alone, {fmt_bytes(combined)} with the above")
        if combined <= vram_bytes:
            break
    w = dataclasses.replace(w, **acc)  # sizes below assume the changes above
    ok_mb = _largest(lambda b: estimate(cfg, dataclasses.replace(w, micro_bsz=b),
                                        device=device).total <= vram_bytes, 1, w.micro_bsz)
    if 1 <= ok_mb < w.micro_bsz:
        out.append(f"MICRO_BSZ={ok_mb} with GRAD_ACCUM x{math.ceil(w.micro_bsz / ok_mb)} "
                   "(same effective batch)")
    ok_ctx = _largest(lambda s: estimate(cfg, dataclasses.replace(w, ctx_len=s * CTX_STEP),
                                         device=device).total <= vram_bytes,
                      1, max(1, w.ctx_len // CTX_STEP))
    if ok_ctx >= 1 and ok_ctx * CTX_STEP < w.ctx_len:
        out.append(f"CTX_LEN={ok_ctx * CTX_STEP}")
    return out


def fit_table(settings: Any, vram_bytes: int | None, sizes: Iterable[str] = tuple(SIZES),
              profiles: Iterable[str] = tuple(PROFILES), device: str = "cuda",
              ctx_len: int | None = None, micro_bsz: int | None = None) -> list[dict]:
    """For each model size and profile preset: predicted total and whether it fits."""
    rows = []
    for s in sizes:
        cfg = size_config(s)
        row: dict[str, Any] = {"size": s, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd}
        for p in profiles:
            w = Workload.from_any(settings, ctx_len=ctx_len, micro_bsz=micro_bsz, **PROFILES[p])
            bd = estimate(cfg, w, device=device)
            row[p] = {"total": bd.total, "allocated": bd.allocated, "fits": bd.fits(vram_bytes)}
        rows.append(row)
    return rows


def format_fit_table(rows: list[dict], vram_bytes: int | None) -> str:
    profs = [k for k in rows[0] if k in PROFILES] if rows else []
    head = f"{'size':<6} {'shape':<10} " + " ".join(f"{p:>16}" for p in profs)
    lines = [head]
    for r in rows:
        cells = []
        for p in profs:
            c = r[p]
            mark = "" if vram_bytes is None else (" ok" if c["fits"] else " --")
            cells.append(f"{fmt_bytes(c['total']) + mark:>16}")
        lines.append(f"{r['size']:<6} {'L%d C%d' % (r['n_layer'], r['n_embd']):<10} "
                     + " ".join(cells))
    return "\n".join(lines)


# RWKV-PEFT README (JL-er/RWKV-PEFT), RWKV-7 LoRA on an RTX 4090: deepspeed_stage_1,
# ctx_len 1024, micro_bsz 1, lora_r 64, bf16; "GB" as printed there (no 7.2B row published)
RWKV_PEFT_PUBLISHED = {"0.1b": (2.7, 2.5, 2.4), "0.4b": (3.4, 2.9, 2.7),
                       "1.5b": (5.6, 4.6, 3.9), "2.9b": (8.8, 6.7, 5.7)}


def published_comparison(settings: Any, device: str = "cuda") -> str:
    """Markdown table: predicted total (GiB) per size x profile beside RWKV-PEFT's numbers."""
    profs = ("lora-bf16", "qlora-int8", "qlora-nf4")
    lines = ["| model | " + " | ".join(f"{p} predicted / RWKV-PEFT" for p in profs) + " |",
             "|---|" + "---|" * len(profs)]
    for row in fit_table(settings, None, profiles=profs, device=device):
        pub = RWKV_PEFT_PUBLISHED.get(row["size"])
        cells = []
        for i, p in enumerate(profs):
            theirs = f"{pub[i]:.1f}" if pub else "n/a"
            cells.append(f"{row[p]['total'] / GiB:.2f} / {theirs}")
        lines.append(f"| {row['size'].upper()} (L{row['n_layer']} C{row['n_embd']}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---- budget / preflight --------------------------------------------------------------------------
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": KiB, "mib": MiB, "gib": GiB, "tib": 1 << 40,
          "k": KiB, "m": MiB, "g": GiB, "t": 1 << 40}


def parse_vram(text: str | int) -> int:
    """'12GiB' / '12GB' / '12000MiB' / '11.5 G' -> bytes. GB/MB are decimal (10^9), GiB/MiB
    and the bare letters G/M binary (2^30), as nvidia-smi's MiB. A bare number is an error."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or not m.group(2):
        raise MemoryPlanError(f"VRAM={text!r}: expected a number with a unit, e.g. 12GiB, 12GB "
                              "or 12000MiB.")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise MemoryPlanError(f"VRAM={text!r}: unknown unit {m.group(2)!r}; use GiB, GB, MiB "
                              "or MB.")
    val = float(m.group(1)) * _UNITS[unit]
    if val <= 0:
        raise MemoryPlanError(f"VRAM={text!r}: must be positive.")
    return int(val)


def detect_budget(device: str = "cuda") -> int | None:
    """Total memory of the first CUDA device, or physical RAM on CPU (None if unknown)."""
    if device == "cuda":
        try:
            import torch

            if torch.cuda.is_available():
                return int(torch.cuda.get_device_properties(0).total_memory)
        except Exception:  # noqa: BLE001 - no torch / no driver: no budget
            return None
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def budget_bytes(settings: Any, device: str = "cuda") -> int | None:
    """VRAM setting parsed, else the detected device memory."""
    v = getattr(settings, "vram", "") if not isinstance(settings, Mapping) else settings.get("vram", "")
    return parse_vram(v) if v else detect_budget(device)


def preflight(settings: Any, cfg, vram_bytes: int | None, force: bool = False,
              device: str = "cuda") -> Breakdown:
    """Check a run against the budget before it starts. Returns the breakdown when it fits
    (or force=True); raises MemoryPlanError with the shortfall and suggestions otherwise."""
    w = Workload.from_any(settings)
    bd = estimate(cfg, w, device=device)
    if bd.fits(vram_bytes) or force:
        return bd
    sug = suggestions(cfg, w, vram_bytes, device)
    what = "VRAM" if device == "cuda" else "RAM"
    msg = (f"predicted peak memory {fmt_bytes(bd.total)} exceeds the {what} budget "
           f"{fmt_bytes(vram_bytes)} (model L{cfg.n_layer} C{cfg.n_embd}, QUANT={w.quant}, "
           f"CTX_LEN={w.ctx_len}, MICRO_BSZ={w.micro_bsz}, GRAD_CP={int(w.grad_cp)}).\n"
           + bd.table() + "\nTo fit, try:\n" + "\n".join(f"  - {s}" for s in sug)
           + "\nRun `rwkvforge plan` to explore; pass --force to start anyway, or set VRAM= "
           "if the detected budget is wrong.")
    raise MemoryPlanError(msg, bd)


def preflight_model(settings: Any, model_path, device: str, force: bool,
                    say: Callable[[str], None] = print) -> None:
    """`train`'s pre-flight: refuse a run the planner predicts will not fit (MemoryPlanError
    with the shortfall and suggestions), before any weights are loaded; `force` (--force)
    starts it anyway with a warning. The shape comes from the .pth, memory-mapped."""
    sd = load_state_dict(model_path)  # CheckpointError if the file is bad
    cfg = infer_config(sd)
    del sd
    budget = budget_bytes(settings, device)
    bd = preflight(settings, cfg, budget, force=force, device=device)
    if budget and not bd.fits(budget):
        say(f"warning: --force: {bd.warning(budget)}")


# ---- CLI -----------------------------------------------------------------------------------------
def _check_model_flag(model: str | None) -> None:
    """`--model` names a configs/model/*.env layer, as for every command; a size given there
    is a mistake with a one-flag fix (a file: config.check_model_layer)."""
    if not model or (paths.workspace_root() / "configs" / "model" / f"{model}.env").is_file() \
            or model.endswith(".env"):
        return
    if normalize_size(model):
        raise MemoryPlanError(f"--model {model}: --model names a configs/model/*.env layer; "
                              f"for a model size use --size {normalize_size(model)}.")


def _cfg_from_pth(path: str):
    return infer_config(load_state_dict(path))


# ---- disk ----------------------------------------------------------------------------------------
def run_disk_bytes(n_trainable: int, total_steps: int, save_every: int, keep: int,
                   optimizer: str = "adamw") -> tuple[int, int, int]:
    """(bytes per checkpoint, checkpoints kept, bytes of the whole run) on disk. A checkpoint
    holds the adapter (fp32) and trainer_state.pt (the trainable weights again and the
    optimiser's two moments: fp32, or ~1 byte each for adamw8bit); the run adds the final
    adapter and ~1 MB of logs. total_steps 0 (unknown): one checkpoint is counted."""
    moments = 8 if optimizer == "adamw" else 2
    per = (4 + 4 + moments) * n_trainable + (64 << 10)
    made = -(-total_steps // save_every) if save_every and total_steps else 1
    kept = min(made, keep) if keep else made
    return per, kept, kept * per + 4 * n_trainable + (1 << 20)


def final_outputs(train_type: str) -> str:
    """What a run of TRAIN_TYPE writes at its end, as a disk estimate names it."""
    return {"state": "the final state",
            "lora+state": "the final adapter and state"}.get(train_type, "the final adapter")


def disk_line(breakdown: Breakdown, s: Any) -> str:
    """`rwkvforge plan`'s disk estimate of a run with these settings."""
    n_train = breakdown.items.get("adapter", 0) // 4
    per, kept, total = run_disk_bytes(n_train, s.max_steps, s.save_every,
                                      s.keep_checkpoints, s.optimizer)
    steps = (f"MAX_STEPS={s.max_steps}, SAVE_EVERY={s.save_every}" if s.max_steps else
             "MAX_STEPS=0 (the count of checkpoints depends on the data; one counted)")
    return (f"disk: about {fmt_bytes(total)} per run: {kept} checkpoint(s) of ~{fmt_bytes(per)} "
            f"({steps}, KEEP_CHECKPOINTS={s.keep_checkpoints or 'all'}) + "
            f"{final_outputs(s.train_type)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rwkvforge plan",
        description="Predict peak training memory, the largest micro-batch / context that fit, "
                    "and which profile fits each model size.")
    ap.add_argument("--size", help="plan for a model size instead of a .pth: "
                    + ", ".join(SIZES) + " (BlinkDL's shape formulas)")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    ap.add_argument("--compare-published", action="store_true",
                    help="print the Markdown table of predicted totals per size x profile "
                         "beside RWKV-PEFT's published measurements (docs/memory.md)")
    cfgmod.add_settings_flags(ap)
    args = ap.parse_args(argv)
    if args.compare_published:
        try:
            s = cfgmod.resolve_from_args(args).settings
            print(published_comparison(s, "cpu" if s.device == "cpu" else "cuda"))
        except (MemoryPlanError, cfgmod.ConfigError) as e:
            print(f"rwkvforge plan: {e}", file=sys.stderr)
            return 2
        return 0
    try:
        _check_model_flag(args.model)
        res = cfgmod.resolve_from_args(args)
        s = res.settings
        if args.size:
            if not normalize_size(args.size):
                raise MemoryPlanError(f"--size {args.size}: expected one of "
                                      + ", ".join(SIZES) + ".")
            cfg = size_config(args.size)
            desc = f"rwkv7 {normalize_size(args.size)} (BlinkDL shape formulas)"
        else:
            p = str(paths.resolve(s.base_model, res.sources.get("BASE_MODEL", "cli"))
                    if s.base_model else paths.demo_model_path())
            normalized = normalize_size(s.model_name.replace("rwkv7-", ""))
            if os.path.isfile(p):
                cfg, desc = _cfg_from_pth(p), p
            elif normalized:
                cfg, desc = size_config(normalized), f"{s.model_name} (file {p} absent: shape from formulas)"
            else:
                raise MemoryPlanError(f"model file {p} not found; give --size <size> "
                                      "(0.1b ... 7.2b) or --base-model X.pth.")
        # auto: the card when torch sees one, else this CPU's memory (not a card it lacks)
        device = ("cuda" if s.device == "cuda" or (s.device == "auto" and torch.cuda.is_available())
                  else "cpu")
        vram = budget_bytes(s, device)
        pl = plan(cfg, s, vram, device=device)
        rows = fit_table(s, vram, device=device)
        multi = s.num_nodes > 1 or s.num_gpus > 1 or s.deepspeed_stage > 0
        cluster = (cluster_table(cfg, s, vram, s.num_nodes, s.num_gpus, device) if multi
                   else None)
    except (MemoryPlanError, cfgmod.ConfigError, ValueError) as e:
        print(f"rwkvforge plan: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"model": desc, "config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else vars(cfg),
                          "profile": s.profile, "plan": pl.to_dict(), "fit_table": rows,
                          "disk": disk_line(pl.breakdown, s),
                          "fit_table_settings": {"ctx_len": s.ctx_len, "micro_bsz": s.micro_bsz},
                          "cluster": None if cluster is None else {
                              "num_nodes": s.num_nodes, "num_gpus": s.num_gpus,
                              "zero": cluster}},
                         indent=2))
        return 0
    w = pl.breakdown.workload
    print(f"model: {desc}  (L{cfg.n_layer} C{cfg.n_embd}, vocab {cfg.vocab_size})")
    print(f"run:   profile {s.profile}, QUANT={w.quant}, PRECISION={w.precision}, LORA_R={w.lora_r}, "
          f"CTX_LEN={w.ctx_len}, MICRO_BSZ={w.micro_bsz}, GRAD_CP={int(w.grad_cp)}, "
          f"OPTIMIZER={w.optimizer}, HEAD_CHUNK={w.head_chunk}, device {device}\n")
    if device == "cpu" and s.device == "auto":
        # a CPU run's peak differs from a card's (no CUDA context, other head / WKV buffers)
        print("no GPU on this machine: planned for a CPU run. To plan for a GPU you will train "
              "on, add --device cuda (and --vram with its memory).\n")
    print(pl.breakdown.table())
    print()
    print(disk_line(pl.breakdown, s))
    if vram is None:
        print("no budget: give --vram (e.g. --vram 12GiB) to get a recommendation.")
    else:
        verdict = "fits" if pl.breakdown.fits(vram) else "does NOT fit"
        print(f"budget {fmt_bytes(vram)}: {verdict} "
              f"({100 * pl.breakdown.total / vram:.0f}% of the budget).")
        print(f"largest MICRO_BSZ at CTX_LEN={w.ctx_len}: {pl.max_micro_bsz or 'none (even 1 does not fit)'}")
        print(f"largest CTX_LEN at MICRO_BSZ={w.micro_bsz}: {pl.max_ctx_len or 'none'}")
        for line in pl.suggestions:
            print(f"  - {line}")
    print(f"\nper model size at CTX_LEN={w.ctx_len}, MICRO_BSZ={w.micro_bsz} (total predicted"
          + ("" if vram is None else f"; ok = fits {fmt_bytes(vram)}") + "):")
    print(format_fit_table(rows, vram))
    if cluster is not None:
        print(f"\nDeepSpeed over {s.num_nodes} node(s) x {s.num_gpus} GPU(s) = "
              f"{s.num_nodes * s.num_gpus} ranks, per GPU (data parallel: each rank runs "
              f"MICRO_BSZ={w.micro_bsz} x CTX_LEN={w.ctx_len}; the model states are sharded):")
        print(format_cluster_table(cluster, vram, s.num_nodes, s.num_gpus))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

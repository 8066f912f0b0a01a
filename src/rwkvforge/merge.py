"""Merge a LoRA / DoRA adapter into its full-precision RWKV-7 base, and prove the result.

    rwkvforge merge --adapter runs/<run>/adapter                       # base read from the run
    rwkvforge merge --base models/base/X.pth --adapter runs/<run>/adapter --dtype fp16
    rwkvforge merge --base X.pth --adapter out/rwkv-0.pth --alpha 32     # an RWKV-PEFT .pth
    rwkvforge merge ... --safetensors --export-adapter out/peft-adapter  # extra exports
    ./scripts/merge_lora.sh --adapter runs/<run>/adapter

Inputs: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as written
by `rwkvforge train`, by peft, or by RWKV-PEFT's peft-layout exports) or an RWKV-PEFT LoRA
checkpoint (`.pth` with `blocks.N.att.receptance.lora_A` / `.lora_B` keys; RWKV-PEFT does not
store alpha, so `--alpha` is required for it). Whole tensors in the adapter that are not LoRA
factors (RWKV-PEFT `--train_parts`, rwkvforge TRAIN_PARTS) replace the base tensors.

The merge, for every adapted Linear W (out, in), in fp32, rounded once to the output dtype:
    LoRA:  W' = W + s B A                 s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA:  W' = m * V / ||V||_row         V = W + s B A, m = the trained magnitude vector
A QLoRA-trained adapter is merged into the full-precision base read from the `.pth`, never into
re-quantised weights (merging into dequantised NF4 weights bakes the quantisation error in).

Verification (every merge; a failed check leaves no output file, only <out>.verify-failed.json):
1. logits: on a fixed probe batch the merged model (its weights rounded to the output dtype,
   run in fp32) is compared with the unmerged base + adapter, run by the `peft` library in
   fp32. Tolerance, per output dtype:
     fp32       FP32_TOL * max(1, max|ref logit|): only summation order differs;
     bf16/fp16  the fp32 tolerance + ROUNDING_FACTOR x the largest logit change caused by
                a simulated rounding (uniform +-1/2 ulp of that dtype, ROUNDING_DRAWS draws) of
                exactly the tensors the merge rounds, on the same probe: the budget is
                measured from the rounding, not widened until the check passes (a scale
                error of 1.5x fails it in bf16).
2. runtime: the merged file is loaded and run by the `rwkv` pip package (RWKV_V7_ON=1, strategy
   "cpu fp32") in a subprocess (so its env vars stay out of this process); its logits must
   match ours for the same file within RUNTIME_TOL * max(1, max|logit|).
The result (numbers, tolerances, sha256 of the output) is written to <out>.verify.json next
to it (one per merged model).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

# ----------------------------------------------------------------------------- constants
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PEFT_PREFIX = "base_model.model."
_STRIP_PREFIXES = ("base_model.model.", "_forward_module.", "module.", "model.")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

# fp32 logit tolerance, relative to the logit scale. Merged vs unmerged fp32 differ only in
# summation order (x (W + sBA)^T vs x W^T + s (x A^T) B^T): measured ~1e-6 relative on the test
# models; 1e-4 leaves 100x head-room and still fails any real merge error (a wrong scale, a
# missing module or a transposed factor moves logits by >= 1e-2 relative).
FP32_TOL = 1e-4
# bf16/fp16: real rounding and the simulated one (see simulated_rounding) have the same error
# distribution, so their logit effects are of the same size; but the max over all logits of one
# draw is a noisy statistic. Measured on the test models (16 adapters x fp32/bf16 base x
# bf16/fp16 output), actual / one-draw simulated: median ~0.95, max 3.6 (a large adapter, logit
# effect 5). So: the max over ROUNDING_DRAWS draws, times 3.
ROUNDING_DRAWS = 3
ROUNDING_FACTOR = 3.0
# ours vs the rwkv pip package on the same file, both fp32: different kernels and summation
# order over a whole forward pass (measured ~1e-6 relative).
RUNTIME_TOL = 1e-3
PROBE_SHAPE = (2, 24)  # (B, T) fixed probe batch
PROBE_SEED = 20240607


class MergeError(ValueError):
    """Bad input or a failed check: what was wrong, where, and what to do."""


class NonFiniteError(MergeError):
    """Merged weights with NaN / Inf (a diverged adapter, or an fp16 overflow)."""


class VerificationError(MergeError):
    """The merged model does not behave like base + adapter (no output was written)."""


# ----------------------------------------------------------------------------- adapter model
@dataclass
class LoraFactor:
    """The adapter on one Linear: W (out, in) += scale * B (out, r) @ A (r, in)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float
    magnitude: torch.Tensor | None = None  # DoRA: (out,)

    @property
    def r(self) -> int:
        return int(self.A.shape[0])


@dataclass
class Adapter:
    """An adapter read from disk, keyed by BlinkDL weight names (blocks.N.att.key.weight)."""

    source: str
    kind: str  # "peft" (folder) | "rwkv-peft" (.pth)
    factors: dict[str, LoraFactor]
    replacements: dict[str, torch.Tensor] = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # adapter_config.json (peft) or what we know
    notes: list[str] = field(default_factory=list)

    @property
    def use_dora(self) -> bool:
        return any(f.magnitude is not None for f in self.factors.values())

    def summary(self) -> dict:
        ranks = sorted({f.r for f in self.factors.values()})
        scales = sorted({round(f.scale, 8) for f in self.factors.values()})
        targets = sorted({re.sub(r"^blocks\.\d+\.", "", k[: -len(".weight")]) for k in self.factors})
        return {"source": self.source, "kind": self.kind, "modules": len(self.factors),
                "targets": targets, "ranks": ranks, "scales": scales, "dora": self.use_dora,
                "use_rslora": bool(self.config.get("use_rslora", False)),
                "replaced_tensors": sorted(self.replacements)}


def _normalise_key(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for p in _STRIP_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def _split_lora_key(key: str) -> tuple[str, str] | None:
    """'blocks.0.att.key.lora_A.weight' (peft), '... .lora_A.default.weight' (in-memory),
    '... .lora_A' (RWKV-PEFT), '... .lora_magnitude_vector' -> (module, 'A'|'B'|'M')."""
    if ".lora_" not in key:
        return None
    mod, rest = key.split(".lora_", 1)
    part = rest.split(".", 1)[0]
    kind = {"A": "A", "B": "B", "magnitude_vector": "M"}.get(part)
    if kind is None:
        raise MergeError(
            f"adapter tensor {key!r}: lora_{part} is not supported (only lora_A / lora_B / "
            f"lora_magnitude_vector on Linear layers: LoRA and DoRA).")
    return mod, kind


def _pattern_value(patterns: dict, module: str, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches module names ending in it."""
    for pat, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return val
    return default


def lora_scale(alpha: float, r: int, use_rslora: bool = False) -> float:
    """peft's scaling: alpha / r, or alpha / sqrt(r) for rank-stabilised LoRA."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means "not readable weights"
        why = (str(e).splitlines() or [""])[0]
        raise MergeError(f"{path}: cannot be read as adapter weights ({path.stat().st_size} "
                         f"bytes; {type(e).__name__}: {why}). The file may be truncated (an "
                         "interrupted copy) or not an adapter at all; copy or train it "
                         "again.") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise MergeError(f"{path}: not a dict of tensors; expected LoRA weights.")
    return obj


def _collect(tensors: dict[str, torch.Tensor], source: str):
    parts: dict[str, dict[str, torch.Tensor]] = {}
    other: dict[str, torch.Tensor] = {}
    for raw, t in tensors.items():
        key = _normalise_key(raw)
        if ".init_lora_" in key or key.startswith("init_lora_"):
            raise MergeError(
                f"{source}: {raw} is a PiSSA initialisation tensor (RWKV-PEFT init_pissa.pth), "
                f"not a trained adapter. Pass the trained checkpoint (rwkv-N.pth) instead; "
                f"PiSSA checkpoints from RWKV-PEFT are not supported (see --help).")
        split = _split_lora_key(key)
        if split is None:
            other[key] = t
            continue
        mod, kind = split
        slot = parts.setdefault(mod, {})
        if kind in slot:
            raise MergeError(f"{source}: two tensors for {mod}.lora_{kind} (several adapters "
                             f"in one file?); export a single adapter.")
        slot[kind] = t
    for mod, slot in parts.items():
        if "A" not in slot or "B" not in slot:
            have = ", ".join(f"lora_{k}" for k in slot)
            raise MergeError(f"{source}: {mod} has only {have}; lora_A and lora_B are both "
                             f"needed (truncated or hand-edited adapter file?).")
    return parts, other


def load_adapter(path: str | os.PathLike, alpha: float | None = None, rank: int | None = None,
                 ) -> Adapter:
    """Read a PEFT adapter folder or an RWKV-PEFT LoRA `.pth` (see module docstring).

    alpha / rank: for RWKV-PEFT files (which store neither) alpha is required and rank, when
    given, must equal the factors' rank; for PEFT folders they must agree with the config.
    """
    path = Path(path)
    if not path.exists():
        raise MergeError(f"{path}: adapter not found. Pass a PEFT folder (runs/<run>/adapter) "
                         f"or an RWKV-PEFT LoRA checkpoint (.pth).")
    if path.is_dir():
        return _load_peft_folder(path, alpha, rank)
    if path.name == ADAPTER_CONFIG or path.name in ADAPTER_WEIGHTS:
        return _load_peft_folder(path.parent, alpha, rank)
    return _load_rwkv_peft_file(path, alpha, rank)


def _load_peft_folder(folder: Path, alpha, rank) -> Adapter:
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise MergeError(f"{folder}: no {ADAPTER_CONFIG}; not a PEFT adapter folder. For a "
                         f"training run pass runs/<run>/adapter (written when training ends).")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg}).") from e
    wpath = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if wpath is None:
        raise MergeError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} next to {ADAPTER_CONFIG}.")
    return adapter_from_peft(cfg, _read_tensors(wpath), alpha, rank, str(folder),
                             str(cfg_path), str(wpath))


def adapter_from_peft(cfg: dict, tensors: dict[str, torch.Tensor], alpha=None, rank=None,
                      source: str = "adapter", cfg_name: str = ADAPTER_CONFIG,
                      weights_name: str = "adapter weights") -> Adapter:
    """An Adapter from a PEFT LoraConfig dict and its tensors (the contents of a PEFT folder,
    e.g. straight from `peft.export_adapter`). `cfg_name` / `weights_name` name them in
    errors."""
    cfg_path, wpath, src = cfg_name, weights_name, source
    ptype = str(cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise MergeError(f"{cfg_path}: peft_type={ptype}; only LORA adapters (LoRA, rsLoRA, "
                         f"DoRA) can be merged here.")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq"):
        raise MergeError(
            f"{cfg_path}: init_lora_weights={init!r}: this adapter was trained on a *modified* "
            f"base (W minus its initial A0/B0), so merging it into the original base would be "
            f"wrong. Export it converted to a plain LoRA (peft: save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=<initial adapter>); rwkvforge train does "
            f"this for PEFT_INIT=pissa) and merge that.")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        raise MergeError(f"{cfg_path}: bias={cfg.get('bias')!r} lora_bias={cfg.get('lora_bias')}: "
                         f"RWKV-7 Linears have no bias; only bias='none' adapters are supported.")
    if cfg.get("layer_replication"):
        raise MergeError(f"{cfg_path}: layer_replication is not supported.")
    r_cfg = int(cfg.get("r", 0))
    a_cfg = float(cfg.get("lora_alpha", r_cfg))
    if alpha is not None and float(alpha) != a_cfg and not cfg.get("alpha_pattern"):
        raise MergeError(f"--alpha {alpha} disagrees with {cfg_path} (lora_alpha={a_cfg}); a "
                         f"wrong alpha silently scales the adapter. Drop --alpha.")
    if rank is not None and int(rank) != r_cfg and not cfg.get("rank_pattern"):
        raise MergeError(f"--rank {rank} disagrees with {cfg_path} (r={r_cfg}). Drop --rank.")
    rslora = bool(cfg.get("use_rslora", False))
    parts, other = _collect(tensors, f"{wpath}")
    if not parts:
        raise MergeError(f"{wpath}: no lora_A / lora_B tensors found.")
    factors = {}
    for mod, slot in parts.items():
        r_mod = int(_pattern_value(cfg.get("rank_pattern"), mod, r_cfg))
        a_mod = float(_pattern_value(cfg.get("alpha_pattern"), mod, a_cfg))
        A, B = slot["A"].float(), slot["B"].float()
        if A.shape[0] != r_mod or B.shape[1] != r_mod:
            raise MergeError(f"{wpath}: {mod}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                             f"have rank {A.shape[0]}/{B.shape[1]} but {ADAPTER_CONFIG} says "
                             f"r={r_mod}: config and weights do not belong together.")
        mag = slot.get("M")
        factors[mod + ".weight"] = LoraFactor(A, B, lora_scale(a_mod, r_mod, rslora),
                                              None if mag is None else mag.float())
    notes = []
    if cfg.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out=true in the config is ignored for nn.Linear targets "
                     "(peft does the same), so the factors are used as W += s B A.")
    return Adapter(src, "peft", factors, {k: v.float() for k, v in other.items()}, cfg, notes)


def _load_rwkv_peft_file(path: Path, alpha, rank) -> Adapter:
    tensors = _read_tensors(path)
    parts, other = _collect(tensors, str(path))
    if not parts:
        keys = ", ".join(sorted(tensors)[:4])
        raise MergeError(f"{path}: no LoRA tensors (keys like blocks.0.att.receptance.lora_A); "
                         f"found {len(tensors)} keys ({keys} ...). Is this a full model? "
                         f"Pass it as --base, not --adapter.")
    ranks = {int(s["A"].shape[0]) for s in parts.values()}
    if len(ranks) != 1:
        raise MergeError(f"{path}: LoRA factors with different ranks {sorted(ranks)}; RWKV-PEFT "
                         f"uses one lora_r for all modules.")
    r = ranks.pop()
    if rank is not None and int(rank) != r:
        raise MergeError(f"--rank {rank} but the lora_A tensors in {path} have rank {r}.")
    if alpha is None:
        raise MergeError(
            f"{path}: RWKV-PEFT checkpoints do not store lora_alpha, and the merge scale is "
            f"alpha / r (r = {r} from the file). Pass --alpha with the lora_alpha of the "
            f"training run (its lora_config / --lora_alpha); guessing it scales the adapter wrongly.")
    factors = {}
    for mod, slot in parts.items():
        A, B = slot["A"].float(), slot["B"].float()
        if B.shape[1] != A.shape[0]:
            raise MergeError(f"{path}: {mod}: lora_B {tuple(B.shape)} does not fit lora_A "
                             f"{tuple(A.shape)} (B is (out, r), A is (r, in)).")
        mag = slot.get("M")
        factors[mod + ".weight"] = LoraFactor(A, B, lora_scale(alpha, r), None if mag is None else mag.float())
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": float(alpha), "use_rslora": False,
           "source_format": "rwkv-peft"}
    return Adapter(str(path), "rwkv-peft", factors, {k: v.float() for k, v in other.items()}, cfg)


# ----------------------------------------------------------------------------- checks
def check_adapter_matches_base(adapter: Adapter, base_sd: dict[str, torch.Tensor]) -> None:
    """Every adapted module and replaced tensor exists in the base with the right shape."""
    problems = []
    n_layer = 1 + max((int(m.group(1)) for k in base_sd if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    for key, f in adapter.factors.items():
        W = base_sd.get(key)
        if W is None:
            why = "no such weight in the base"
            if (m := re.match(r"blocks\.(\d+)\.", key)) and int(m.group(1)) >= n_layer:
                why = f"the base has only {n_layer} layers"
            problems.append(f"{key[: -len('.weight')]}: {why} (adapter for another model or "
                            f"other targets)")
            continue
        if W.dim() != 2:
            problems.append(f"{key}: base tensor is {tuple(W.shape)}, not a matrix")
            continue
        out_f, in_f = W.shape
        if tuple(f.A.shape) != (f.r, in_f) or tuple(f.B.shape) != (out_f, f.r):
            problems.append(f"{key[: -len('.weight')]}: adapter lora_B {tuple(f.B.shape)} @ lora_A "
                            f"{tuple(f.A.shape)} does not fit base weight {tuple(W.shape)} (out, in)")
        if f.magnitude is not None and tuple(f.magnitude.shape) != (out_f,):
            problems.append(f"{key}: DoRA magnitude {tuple(f.magnitude.shape)} != ({out_f},)")
    for key, t in adapter.replacements.items():
        W = base_sd.get(key)
        if W is None:
            problems.append(f"{key}: adapter holds a whole tensor the base does not have")
        elif tuple(W.shape) != tuple(t.shape):
            problems.append(f"{key}: adapter tensor {tuple(t.shape)} != base {tuple(W.shape)}")
    if problems:
        more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
        raise MergeError(f"adapter {adapter.source} does not match the base model:\n  "
                         + "\n  ".join(problems[:8]) + more
                         + "\nUse the base the adapter was trained on (runs/<run>/config.json "
                           "-> model.path).")


def check_finite(sd: dict[str, torch.Tensor], what: str, dtype_name: str = "") -> None:
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        hint = (" fp16 holds values up to 65504 only: try --dtype bf16." if dtype_name == "fp16"
                else " The adapter has diverged (NaN/Inf or huge values); use an earlier "
                     "checkpoint or a lower learning rate.")
        raise NonFiniteError(f"{what}: non-finite values (NaN/Inf) in {len(bad)} tensor(s): "
                             f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}.{hint} "
                             f"Refusing to write it.")


# ----------------------------------------------------------------------------- merge maths
def merge_reference(W: torch.Tensor, f: LoraFactor) -> torch.Tensor:
    """Slow, obviously-correct merge in float64: W + s * sum_k outer(B[:, k], A[k]), then for
    DoRA every row rescaled to its trained magnitude. Returns float64. For tests."""
    out = W.double().clone()
    for k in range(f.r):
        out += f.scale * torch.outer(f.B[:, k].double(), f.A[k].double())
    if f.magnitude is not None:
        for i in range(out.shape[0]):
            out[i] = out[i] * (f.magnitude[i].double() / torch.sqrt((out[i] ** 2).sum()))
    return out


def merge_fast(W: torch.Tensor, f: LoraFactor) -> torch.Tensor:
    """The merge used for real: one fp32 addmm (+ a row rescale for DoRA). Returns fp32;
    the caller rounds once to the output dtype (never add in bf16: that rounds twice)."""
    out = torch.addmm(W.float(), f.B.float(), f.A.float(), alpha=f.scale)  # (out, in)
    if f.magnitude is not None:
        out.mul_((f.magnitude.float() / out.norm(p=2, dim=1)).unsqueeze(1))  # (out, 1)
    return out


def apply_replacements(base_sd: dict[str, torch.Tensor], adapter: Adapter) -> dict[str, torch.Tensor]:
    sd = dict(base_sd)
    sd.update(adapter.replacements)
    return sd


def merge_state_dict(base_sd: dict[str, torch.Tensor], adapter: Adapter, dtype: torch.dtype,
                     dtype_name: str = "", fast: bool = True) -> dict[str, torch.Tensor]:
    """A new BlinkDL state dict: replacements applied, adapters merged in fp32, every float
    tensor rounded once to `dtype`. Refuses non-finite results (NonFiniteError)."""
    check_adapter_matches_base(adapter, base_sd)
    check_finite({k: f.B for k, f in adapter.factors.items()}
                 | {k + ".A": f.A for k, f in adapter.factors.items()}, f"adapter {adapter.source}")
    src = apply_replacements(base_sd, adapter)
    out = {}
    for k, v in src.items():
        if k in adapter.factors:
            m = merge_fast(v, adapter.factors[k]) if fast else merge_reference(v, adapter.factors[k])
            check_finite({k: m}, "merged weights", dtype_name)
            out[k] = m.to(dtype)
        else:
            out[k] = v.to(dtype) if v.is_floating_point() else v
    check_finite(out, f"merged model in {dtype_name or dtype}", dtype_name)
    return out


# ----------------------------------------------------------------------------- export
def adapter_to_peft(adapter: Adapter) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, tensors) in PEFT layout for any loaded adapter (e.g. an RWKV-PEFT
    .pth): loads with `peft.PeftModel.from_pretrained` on an RWKV7 and in rwkvforge."""
    from peft import LoraConfig

    mods = sorted(k[: -len(".weight")] for k in adapter.factors)
    ranks = {m: adapter.factors[m + ".weight"].r for m in mods}
    r = max(set(ranks.values()), key=list(ranks.values()).count)
    rslora = bool(adapter.config.get("use_rslora", False))
    # store alpha so that peft's scale equals ours exactly, per module when ranks differ
    alphas = {m: adapter.factors[m + ".weight"].scale * (math.sqrt(ranks[m]) if rslora else ranks[m])
              for m in mods}
    alpha = alphas[mods[0]]
    targets = sorted({re.sub(r"^blocks\.\d+\.", "", m) for m in mods})
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, bias="none",
        use_dora=adapter.use_dora,
        target_modules=rf"blocks\.\d+\.({'|'.join(re.escape(t) for t in targets)})",
        rank_pattern={re.escape(m): ranks[m] for m in mods if ranks[m] != r},
        alpha_pattern={re.escape(m): alphas[m] for m in mods if abs(alphas[m] - alpha) > 1e-9 * abs(alpha)},
    ).to_dict()
    cfg["peft_type"] = "LORA"
    cfg["task_type"] = None
    for k in ("target_modules",):
        if isinstance(cfg[k], set):
            cfg[k] = sorted(cfg[k])
    # modules the regex would also match but that have no factors (e.g. a layer RWKV-PEFT
    # skipped) would get fresh zero adapters in peft: harmless (B = 0)
    tensors: dict[str, torch.Tensor] = {}
    for m in mods:
        f = adapter.factors[m + ".weight"]
        tensors[f"{PEFT_PREFIX}{m}.lora_A.weight"] = f.A.contiguous()
        tensors[f"{PEFT_PREFIX}{m}.lora_B.weight"] = f.B.contiguous()
        if f.magnitude is not None:
            tensors[f"{PEFT_PREFIX}{m}.lora_magnitude_vector"] = f.magnitude.contiguous()
    for k, v in adapter.replacements.items():
        tensors[PEFT_PREFIX + k] = v.contiguous()
    return json.loads(json.dumps(cfg, default=sorted)), tensors


def save_peft_adapter(adapter: Adapter, folder: str | os.PathLike) -> Path:
    """Write `adapter` as a PEFT folder (adapter_config.json + adapter_model.safetensors),
    atomically."""
    from safetensors.torch import save_file

    from rwkvforge.checkpoint import atomic_dir

    cfg, tensors = adapter_to_peft(adapter)
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        save_file({k: v.float().contiguous() for k, v in tensors.items()},
                  str(tmp / ADAPTER_WEIGHTS[0]), metadata={"format": "pt"})
    return folder


def save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """The merged model as safetensors (same BlinkDL keys and dtype as the .pth), atomically."""
    from safetensors.torch import save_file

    from rwkvforge.checkpoint import atomic_output

    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    return path


# ----------------------------------------------------------------------------- verification
def probe_batch(vocab_size: int, shape=PROBE_SHAPE, seed: int = PROBE_SEED) -> torch.Tensor:
    """The fixed probe: token ids drawn from a seeded generator (never token 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, shape, generator=g)


@torch.no_grad()
def model_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of an RWKV7 built from `sd`, computed in fp32."""
    from rwkvforge.checkpoint import model_from_state_dict

    model = model_from_state_dict(sd, dtype=torch.float32)
    model.wkv_impl = "ref" if idx.shape[1] <= 64 else "auto"
    return model(idx)[0].float()


@torch.no_grad()
def unmerged_logits(base_sd: dict[str, torch.Tensor], adapter: Adapter, idx: torch.Tensor,
                    adapter_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Base (fp32, replacements applied) + adapter run *unmerged* by the peft library.

    `adapter_dir`: the PEFT folder to load (the user's own when the adapter is one, so the
    reference does not go through our reader); else the adapter is exported to a temp folder.
    """
    import warnings

    from peft import PeftModel

    from rwkvforge.checkpoint import model_from_state_dict

    model = model_from_state_dict(apply_replacements(base_sd, adapter), dtype=torch.float32)
    model.wkv_impl = "ref" if idx.shape[1] <= 64 else "auto"
    with contextlib.ExitStack() as stack:
        if adapter_dir is None:
            adapter_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rwkvforge-peft-"))
            save_peft_adapter(adapter, Path(adapter_dir) / "adapter")
            adapter_dir = Path(adapter_dir) / "adapter"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # whole-tensor replacements are not peft modules
            pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        pm.eval()
        n_wrapped = sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A.default"))
        if n_wrapped < len(adapter.factors):
            raise VerificationError(f"peft wrapped {n_wrapped} modules but the adapter has "
                                    f"{len(adapter.factors)}: its target_modules do not cover "
                                    f"all of its tensors.")
        return pm.base_model.model(idx)[0].float()


def _ulp_note(dtype_name: str) -> str:
    return {"fp32": "summation order only", "bf16": "8-bit mantissa", "fp16": "11-bit mantissa"}[dtype_name]


_RWKV_PIP_SCRIPT = "rwkv-pip-probe"


def _rwkv_pip_probe_main(argv: list[str]) -> int:
    """Subprocess side of the runtime check (env RWKV_V7_ON=1 set by the parent):
    <model.pth> <probe.pt> <out.pt> -> logits of every probe row, (B, T, V) fp32."""
    model_path, probe_path, out_path = argv
    import contextlib as _cl
    import io

    with _cl.redirect_stdout(io.StringIO()):  # the package prints banners
        from rwkv.model import RWKV

        assert model_path.endswith(".pth")
        m = RWKV(model=model_path[: -len(".pth")], strategy="cpu fp32")
    idx = torch.load(probe_path, weights_only=True)
    rows = []
    with torch.no_grad():
        for row in idx.tolist():
            out, _ = m.forward(row, None, full_output=True)
            rows.append(out.float().reshape(len(row), -1))
    torch.save(torch.stack(rows), out_path)
    return 0


def run_rwkv_pip(model_path: Path, idx: torch.Tensor, timeout: float = 900) -> torch.Tensor:
    """Load and run `model_path` in the `rwkv` pip package in a subprocess; returns logits."""
    with tempfile.TemporaryDirectory(prefix="rwkvforge-rwkvpip-") as td:
        probe, out = Path(td) / "probe.pt", Path(td) / "logits.pt"
        torch.save(idx.clone(), probe)
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
        cmd = [sys.executable, "-m", "rwkvforge.merge", f"--{_RWKV_PIP_SCRIPT}",
               str(model_path), str(probe), str(out)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise VerificationError(f"the rwkv pip package did not finish loading/running "
                                    f"{model_path.name} within {timeout:.0f} s.") from e
        if p.returncode != 0 or not out.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
            raise VerificationError(
                "the merged file does not load/run in the rwkv pip package (RWKV_V7_ON=1, "
                "strategy 'cpu fp32'):\n    " + "\n    ".join(tail)
                + "\nIs the rwkv package installed (pip install rwkv==0.8.32)?")
        return torch.load(out, weights_only=True)


_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (float64; subnormal range included)."""
    e = torch.floor(torch.log2(x.abs().double().clamp_min(torch.finfo(dtype).tiny)))
    return torch.pow(2.0, e - _MANTISSA_BITS[dtype])


def _merged_for_budget(W: torch.Tensor, f: LoraFactor) -> torch.Tensor:
    """W + s B A (DoRA-rescaled) in fp32, written apart from `merge_fast` on purpose: the
    rounding budget must not move when the merge under test is wrong."""
    w = W.float() + f.scale * (f.B.float() @ f.A.float())
    if f.magnitude is not None:
        w = w * (f.magnitude.float() / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
    return w


def simulated_rounding(sd: dict[str, torch.Tensor], adapter: Adapter, dtype: torch.dtype,
                       seed: int = PROBE_SEED + 1) -> dict[str, torch.Tensor]:
    """The merged model in fp32 with the error that rounding to `dtype` makes, simulated:
    uniform noise of +-1/2 ulp (at each merged value) on exactly the tensors the merge rounds:
    the adapted matrices, and any tensor not already representable in `dtype` (e.g. an fp32
    base). Its logit effect is the rounding budget of the check; the noise is random, not the
    rounding under test, and it is not zero for a bf16 base (whose untouched tensors are exact
    in bf16 but whose merged matrices are not). `sd`: the base with replacements applied."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        f = adapter.factors.get(k)
        w = _merged_for_budget(v, f) if f is not None else v.float()
        if f is not None or not torch.equal(v.to(dtype).to(v.dtype), v):
            u = torch.rand(w.shape, generator=g, dtype=torch.float64) - 0.5
            w = (w.double() + u * ulp(w, dtype)).float()
        out[k] = w
    return out


def verify_merge(base_sd, adapter: Adapter, merged_sd, dtype_name: str,
                 adapter_dir=None, idx: torch.Tensor | None = None) -> dict:
    """Logit check of merged vs base + adapter (see module docstring). Returns the numbers;
    `passed` False when the difference exceeds the tolerance."""
    vocab = int(base_sd["emb.weight"].shape[0])
    idx = probe_batch(vocab) if idx is None else idx
    ref = unmerged_logits(base_sd, adapter, idx, adapter_dir)
    base_fp32 = apply_replacements(base_sd, adapter)
    base_logits = model_logits(base_fp32, idx)
    merged = model_logits(merged_sd, idx)
    scale = max(1.0, float(ref.abs().max()))
    tol_fp32 = FP32_TOL * scale
    rounding = 0.0
    if dtype_name != "fp32":
        # effect of the noise alone: noisy vs clean version of the same (independent) weights
        clean = model_logits({k: (_merged_for_budget(v, adapter.factors[k]) if k in adapter.factors
                                  else v) for k, v in base_fp32.items()}, idx)
        for d in range(ROUNDING_DRAWS):
            noisy = simulated_rounding(base_fp32, adapter, DTYPES[dtype_name], seed=PROBE_SEED + 1 + d)
            rounding = max(rounding, float((model_logits(noisy, idx) - clean).abs().max()))
            del noisy
    tol = tol_fp32 + ROUNDING_FACTOR * rounding
    diff = float((merged - ref).abs().max())
    effect = float((ref - base_logits).abs().max())
    finite = bool(torch.isfinite(merged).all() and torch.isfinite(ref).all())
    res = {
        "probe": {"shape": list(idx.shape), "seed": PROBE_SEED},
        "reference": "base (fp32) + adapter, unmerged, run by peft " + _peft_version(),
        "max_abs_logit": scale,
        "max_abs_diff": diff,
        "tolerance": tol,
        "tolerance_rule": (f"{FP32_TOL:g} x max(1, max|ref logit|)"
                           + ("" if dtype_name == "fp32" else
                              f" + {ROUNDING_FACTOR:g} x simulated-rounding effect "
                              f"({rounding:.4g}, {dtype_name}: {_ulp_note(dtype_name)})")),
        "rounding_effect": rounding,
        "adapter_effect_max_abs": effect,
        "passed": finite and diff <= tol,
        "finite": finite,
    }
    if effect == 0.0:
        res["warning"] = "the adapter does not change the logits at all (B = 0: untrained?)"
    elif dtype_name != "fp32" and effect < rounding:
        res["warning"] = (f"the adapter's effect on the logits ({effect:.3g}) is below the "
                          f"{dtype_name} rounding effect ({rounding:.3g}): much of it is lost "
                          f"in {dtype_name}; consider --dtype fp32.")
    return res


def _peft_version() -> str:
    try:
        import peft

        return peft.__version__
    except Exception:  # noqa: BLE001
        return "?"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- the stage
@dataclass
class MergeResult:
    output: Path | None
    report: dict
    report_path: Path


def _run_dir_of(adapter_path: Path) -> Path | None:
    """runs/<run> when the adapter is runs/<run>/adapter or runs/<run>/checkpoints/step-N."""
    p = adapter_path.resolve()
    for cand in (p.parent, p.parent.parent, p.parent.parent.parent):
        if (cand / "config.json").is_file() and ((cand / "adapter").exists() or (cand / "checkpoints").exists()):
            return cand
    return None


def _run_config(run_dir: Path | None) -> dict:
    if run_dir is None:
        return {}
    try:
        return json.loads((run_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def default_output(adapter_path: Path, dtype_name: str, run_dir: Path | None) -> Path:
    if run_dir is not None:  # runs/<run>/adapter, or a checkpoint: <run>-step-N-<dtype>
        ck = adapter_path.resolve()
        tag = f"-{ck.name}" if ck.parent.name == "checkpoints" else ""
        return run_dir / "merged" / f"{run_dir.name}{tag}-{dtype_name}.pth"
    from rwkvforge import paths

    stem = adapter_path.stem if adapter_path.is_file() else adapter_path.name
    if stem == "adapter":
        stem = adapter_path.parent.name
    return paths.workspace_root() / "models" / "merged" / f"{stem}-{dtype_name}.pth"


ADAPTER_FOLDER_FILES = {ADAPTER_CONFIG, *ADAPTER_WEIGHTS, "README.md"}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _check_outputs(out: Path, base: Path, adapter_path: Path,
                   export_adapter: str | os.PathLike | None) -> None:
    """Refuse outputs that would destroy an input or a folder that is not an adapter's."""
    inputs = [base, adapter_path] + ([adapter_path / n for n in ADAPTER_WEIGHTS]
                                     if adapter_path.is_dir() else [])
    if any(_same_file(out, p) for p in inputs):
        raise MergeError(f"--out {out} is an input of this merge (the base or the adapter): "
                         "pick another output file.")
    if export_adapter is None:
        return
    exp = Path(export_adapter)
    if _same_file(exp, adapter_path) or _same_file(exp, base):
        raise MergeError(f"--export-adapter {exp} is an input of this merge: pick a new folder.")
    if exp.exists() and not exp.is_dir():
        raise MergeError(f"--export-adapter {exp} is a file: give a folder (new, or an "
                         "adapter folder to replace).")
    if exp.is_dir():
        other = sorted(p.name for p in exp.iterdir() if p.name not in ADAPTER_FOLDER_FILES)
        if other:
            raise MergeError(f"--export-adapter {exp} holds other files ({', '.join(other[:5])}"
                             f"{', ...' if len(other) > 5 else ''}); the export replaces the "
                             "whole folder: pick a new or empty folder.")


def merge(base: str | os.PathLike, adapter_path: str | os.PathLike, out: str | os.PathLike | None = None,
          dtype_name: str = "bf16", alpha: float | None = None, rank: int | None = None,
          safetensors: bool = False, export_adapter: str | os.PathLike | None = None,
          runtime_check: bool = True, log=print) -> MergeResult:
    """The whole stage: validate inputs, merge, verify, then (only if verified) write."""
    from rwkvforge.checkpoint import CheckpointError, load_state_dict

    t0 = time.time()
    if dtype_name not in DTYPES:
        raise MergeError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}.")
    adapter_path = Path(adapter_path)
    base = Path(base)
    if not base.is_file():
        raise MergeError(f"{base}: base model not found (pass --base with the .pth the adapter "
                         f"was trained on).")
    adapter = load_adapter(adapter_path, alpha=alpha, rank=rank)
    try:
        base_sd = load_state_dict(base)
    except CheckpointError as e:
        raise MergeError(f"base model: {e}") from e
    check_adapter_matches_base(adapter, base_sd)
    run_dir = _run_dir_of(adapter_path)
    out = Path(out) if out else default_output(adapter_path, dtype_name, run_dir)
    if out.suffix != ".pth":
        raise MergeError(f"--out {out}: must end in .pth (RWKV runtimes load .pth files).")
    _check_outputs(out, base, adapter_path, export_adapter)
    report_path = out.with_suffix(".verify.json")  # one per merged model
    failed_path = out.with_suffix(".verify-failed.json")
    run_cfg = _run_config(run_dir)
    settings = run_cfg.get("settings", {})
    trained_on = (run_cfg.get("model") or {}).get("path")
    if trained_on and Path(trained_on).is_file() and not _same_file(Path(trained_on), base):
        log(f"[merge] warning: the run trained this adapter on {trained_on}, not {base}; "
            "the shapes match, but merging into another base gives another model")
    info = adapter.summary()
    log(f"[merge] base {base} ({base_sd['emb.weight'].dtype}), adapter {adapter.source} "
        f"({adapter.kind}: {info['modules']} modules, r={info['ranks']}, scale={info['scales']}"
        f"{', DoRA' if info['dora'] else ''}{', rsLoRA' if info['use_rslora'] else ''}"
        f"{f', {len(adapter.replacements)} whole tensors' if adapter.replacements else ''})")
    if settings.get("quant", "none") != "none":
        log(f"[merge] trained with QUANT={settings['quant']}: merging into the full-precision base "
            f"weights from {base}, not into re-quantised ones")

    merged = merge_state_dict(base_sd, adapter, DTYPES[dtype_name], dtype_name)
    log(f"[merge] merged in fp32, rounded once to {dtype_name}; verifying logits ...")
    adapter_dir = adapter.source if adapter.kind == "peft" else None
    report = {
        "output": out.name,
        "base": str(base),
        "base_dtype": str(base_sd["emb.weight"].dtype).replace("torch.", ""),
        "adapter": info,
        "adapter_notes": adapter.notes,
        "dtype": dtype_name,
        "merge_precision": "fp32 (rounded once to the output dtype)",
        "trained_quant": settings.get("quant", "unknown" if run_dir is None else "none"),
        "merged_into": "full-precision base weights read from the .pth (never re-quantised)",
        "versions": {"torch": torch.__version__, "peft": _peft_version()},
    }
    checks = {}
    report["checks"] = checks
    tmp_out = out.parent / f".{out.stem}.verifying-{os.getpid()}.pth"
    try:
        checks["logits"] = verify_merge(base_sd, adapter, merged, dtype_name, adapter_dir)
        c = checks["logits"]
        log(f"[merge] logits: max|merged - (base + adapter)| = {c['max_abs_diff']:.3g} "
            f"(tolerance {c['tolerance']:.3g}; adapter effect {c['adapter_effect_max_abs']:.3g})")
        if not c["passed"]:
            raise VerificationError(
                f"merged model differs from base + adapter by {c['max_abs_diff']:.4g} on the probe "
                f"batch (tolerance {c['tolerance']:.4g}, {c['tolerance_rule']}). Not written.")
        from rwkvforge.checkpoint import save_pth

        out.parent.mkdir(parents=True, exist_ok=True)
        save_pth(merged, tmp_out)
        if runtime_check:
            idx = probe_batch(int(base_sd["emb.weight"].shape[0]))
            ours = model_logits(merged, idx)
            del base_sd
            theirs = run_rwkv_pip(tmp_out, idx)
            rscale = max(1.0, float(ours.abs().max()))
            rdiff = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else float("inf")
            checks["rwkv_pip"] = {
                "package": f"rwkv {_pkg_version('rwkv')}", "env": "RWKV_V7_ON=1",
                "strategy": "cpu fp32", "max_abs_diff_vs_ours": rdiff,
                "tolerance": RUNTIME_TOL * rscale,
                "tolerance_rule": f"{RUNTIME_TOL:g} x max(1, max|logit|)",
                "passed": bool(torch.isfinite(theirs).all()) and rdiff <= RUNTIME_TOL * rscale,
            }
            log(f"[merge] rwkv pip package: loads and runs; max|rwkv - ours| = {rdiff:.3g}")
            if not checks["rwkv_pip"]["passed"]:
                raise VerificationError(
                    f"the rwkv pip package's logits for the merged file differ from ours by "
                    f"{rdiff:.4g} (tolerance {RUNTIME_TOL * rscale:.4g}). Not written.")
        else:
            checks["rwkv_pip"] = {"skipped": True}
        report["passed"] = True
        report["sha256"] = _sha256(tmp_out)
        report["seconds"] = round(time.time() - t0, 2)
        os.replace(tmp_out, out)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            tmp_out.unlink()
        if isinstance(e, MergeError):
            report["passed"] = False
            report["error"] = str(e)
            from rwkvforge.checkpoint import atomic_write_bytes

            atomic_write_bytes(failed_path, (json.dumps(report, indent=2) + "\n").encode())
        raise
    extras = {}
    if safetensors:
        st = save_safetensors(merged, out.with_suffix(".safetensors"),
                              {"format": "pt", "source": "rwkvforge merge", "sha256_pth": report["sha256"]})
        extras["safetensors"] = st.name
    if export_adapter:
        extras["peft_adapter"] = str(save_peft_adapter(adapter, export_adapter))
    report["exports"] = extras
    from rwkvforge.checkpoint import atomic_write_bytes

    atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode())
    with contextlib.suppress(FileNotFoundError):
        failed_path.unlink()
    return MergeResult(out, report, report_path)


def _pkg_version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == f"--{_RWKV_PIP_SCRIPT}":
        return _rwkv_pip_probe_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="rwkvforge merge", description=__doc__.split("\n\n")[0],
        epilog="Writes <out>.pth (+ .safetensors) and <out>.verify.json next to it, only if verified. "
               "PiSSA adapters: merge the converted export rwkvforge train writes (a plain LoRA).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, default=None,
                    help="base model .pth (default: the run's model, from runs/<run>/config.json)")
    ap.add_argument("--adapter", type=Path, required=True,
                    help="runs/<run>/adapter, a PEFT adapter folder, or an RWKV-PEFT LoRA .pth")
    ap.add_argument("--out", type=Path, default=None,
                    help="output .pth (default: runs/<run>/merged/<run>-<dtype>.pth, or "
                         "models/merged/<adapter>-<dtype>.pth)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                    help="output dtype: bf16 (default; what BlinkDL ships), fp16, fp32 (exact)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="lora_alpha (required for RWKV-PEFT .pth files, which do not store it)")
    ap.add_argument("--rank", type=int, default=None, help="lora_r, checked against the file")
    ap.add_argument("--safetensors", action="store_true",
                    help="also write the merged model as <out>.safetensors")
    ap.add_argument("--export-adapter", type=Path, default=None, metavar="DIR",
                    help="also write the adapter in PEFT layout to DIR, a new folder or an adapter folder to replace (e.g. for RWKV-PEFT files)")
    args = ap.parse_args(argv)

    if not args.adapter.exists():
        print(f"error: --adapter {args.adapter}: not found (give runs/<run>/adapter, a "
              "checkpoint folder, a PEFT adapter folder or an RWKV-PEFT .pth).",
              file=sys.stderr)
        return 2
    if ((args.adapter / "config.json").is_file() and not (args.adapter / ADAPTER_CONFIG).exists()
            and (args.adapter / "adapter" / ADAPTER_CONFIG).is_file()):
        args.adapter = args.adapter / "adapter"  # a run folder: its final adapter
        print(f"[merge] using the run's final adapter {args.adapter}", file=sys.stderr)
    base = args.base
    if base is None:
        cfg = _run_config(_run_dir_of(args.adapter))
        mp = (cfg.get("model") or {}).get("path")
        if not mp:
            print("error: --base is required (the adapter is not inside a run folder with "
                  "config.json naming its model).", file=sys.stderr)
            return 2
        base = Path(mp)
    try:
        res = merge(base, args.adapter, args.out, args.dtype, args.alpha, args.rank,
                    args.safetensors, args.export_adapter,
                    log=lambda m: print(m, file=sys.stderr))
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged model: {res.output}")
    print(f"verification: {res.report_path}")
    for k, v in res.report.get("exports", {}).items():
        print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

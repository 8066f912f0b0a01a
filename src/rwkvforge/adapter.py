"""The adapter format and its maths: the one owner of how a LoRA / DoRA adapter is stored,
read, checked, merged into a BlinkDL state dict, and loaded with its base as a model.

    from rwkvforge.adapter import load_with_adapter, read_adapter
    model = load_with_adapter("models/base/X.pth", "runs/<run>/adapter")   # fp32, in memory
    adapter = read_adapter("out/rwkv-0.pth", alpha=32)                    # an RWKV-PEFT file

Formats read: a PEFT adapter folder (`adapter_config.json` + `adapter_model.safetensors`, as
written by `rwkvforge train`, by peft, or by RWKV-PEFT's peft-layout exports), a run folder
(its final `adapter/`), or an RWKV-PEFT LoRA checkpoint (`.pth` with
`blocks.N.att.receptance.lora_A` / `.lora_B` keys; RWKV-PEFT does not store alpha, so it must
be given). Whole tensors that are not LoRA factors (TRAIN_PARTS, RWKV-PEFT `--train_parts`)
replace the base tensors. Written: the PEFT layout only (`save_adapter`), so peft's own
`PeftModel.from_pretrained` reads it.

The merge, for every adapted Linear W (out, in), in fp32, rounded once to the output dtype:
    LoRA:  W' = W + s B A                 s = alpha / r   (rsLoRA: alpha / sqrt(r))
    DoRA:  W' = m * V / ||V||_row         V = W + s B A, m = the trained magnitude vector
Rule: add in fp32 and round once (adding in bf16 rounds twice), and never write non-finite
weights (a diverged adapter or an fp16 overflow would silently break every later stage).
`rwkvforge merge` (merge.py) verifies this merge against peft and writes the result.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save

from rwkvforge import runs
from rwkvforge.checkpoint import (
    atomic_dir,
    atomic_write_bytes,
    compact_cpu,
    file_sha256,
    load_model,
    load_state_dict,
    model_from_state_dict,
)
from rwkvforge.model.rwkv7 import RWKV7

PEFT_PREFIX = "base_model.model."
_STRIP_PREFIXES = ("base_model.model.", "_forward_module.", "module.", "model.")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # [0] is what we write
_META_KEY = "rwkvforge"  # safetensors header entry holding the run's JSON metadata
# beside the adapter weights: their sha256 in `sha256sum` format (`sha256sum -c SHA256SUMS` in
# the folder checks it too); read_adapter verifies it when the file is there. The config is
# not listed: it is JSON that people edit by hand, and it is validated when read.
CHECKSUMS = "SHA256SUMS"


class MergeError(ValueError):
    """Bad input or a failed check: what was wrong, where, and what to do."""


class NonFiniteError(MergeError):
    """Merged weights with NaN / Inf (a diverged adapter, or an fp16 overflow)."""


# ---- adapter model -------------------------------------------------------------------------------
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
    metadata: dict = field(default_factory=dict)  # what `save_adapter` stored (train: step, ...)

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


def _read_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, the rwkvforge metadata of a safetensors file, else {})."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            return tensors, json.loads(header[_META_KEY]) if _META_KEY in header else {}
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
    return obj, {}


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


def resolve_adapter_path(path: str | os.PathLike) -> Path:
    """`path`, or the final adapter of the run folder `path` (a folder with the run's
    config.json instead of an adapter_config.json)."""
    path = Path(path)
    if path.is_dir() and not (path / ADAPTER_CONFIG).exists():
        final = runs.final_adapter(path)
        if final is not None and (final / ADAPTER_CONFIG).is_file():
            return final
    return path


def read_adapter(path: str | os.PathLike, alpha: float | None = None, rank: int | None = None,
                 ) -> Adapter:
    """Read a PEFT adapter folder, a run folder's final adapter or an RWKV-PEFT LoRA `.pth`
    (see module docstring).

    alpha / rank: for RWKV-PEFT files (which store neither) alpha is required and rank, when
    given, must equal the factors' rank; for PEFT folders they must agree with the config.
    """
    path = resolve_adapter_path(path)
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
        peft_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise MergeError(f"{cfg_path}:{e.lineno}: invalid JSON ({e.msg}).") from e
    wpath = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if wpath is None:
        raise MergeError(f"{folder}: no {' or '.join(ADAPTER_WEIGHTS)} next to {ADAPTER_CONFIG}.")
    tensors, meta = _read_tensors(wpath)  # (unreadable bytes: that error says more)
    verify_checksums(folder)
    ad = adapter_from_peft(peft_cfg, tensors, alpha, rank, str(folder), str(cfg_path), str(wpath))
    ad.metadata = meta
    return ad


def adapter_from_peft(peft_cfg: dict, tensors: dict[str, torch.Tensor], alpha=None, rank=None,
                      source: str = "adapter", cfg_name: str = ADAPTER_CONFIG,
                      weights_name: str = "adapter weights") -> Adapter:
    """An Adapter from a PEFT LoraConfig dict and its tensors (the contents of a PEFT folder,
    e.g. straight from `peft.export_adapter`). `cfg_name` / `weights_name` name them in
    errors."""
    cfg_path, wpath, src = cfg_name, weights_name, source
    ptype = str(peft_cfg.get("peft_type", "LORA")).upper()
    if ptype != "LORA":
        raise MergeError(f"{cfg_path}: peft_type={ptype}; only LORA adapters (LoRA, rsLoRA, "
                         f"DoRA) can be merged here.")
    init = peft_cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().split("_")[0] in ("pissa", "olora", "corda", "loftq"):
        raise MergeError(
            f"{cfg_path}: init_lora_weights={init!r}: this adapter was trained on a *modified* "
            f"base (W minus its initial A0/B0), so merging it into the original base would be "
            f"wrong. Export it converted to a plain LoRA (peft: save_pretrained(..., "
            f"path_initial_model_for_weight_conversion=<initial adapter>); rwkvforge train does "
            f"this for PEFT_INIT=pissa) and merge that.")
    if peft_cfg.get("bias", "none") != "none" or peft_cfg.get("lora_bias"):
        raise MergeError(f"{cfg_path}: bias={peft_cfg.get('bias')!r} lora_bias={peft_cfg.get('lora_bias')}: "
                         f"RWKV-7 Linears have no bias; only bias='none' adapters are supported.")
    if peft_cfg.get("layer_replication"):
        raise MergeError(f"{cfg_path}: layer_replication is not supported.")
    r_cfg = int(peft_cfg.get("r", 0))
    a_cfg = float(peft_cfg.get("lora_alpha", r_cfg))
    if alpha is not None and float(alpha) != a_cfg and not peft_cfg.get("alpha_pattern"):
        raise MergeError(f"--alpha {alpha} disagrees with {cfg_path} (lora_alpha={a_cfg}); a "
                         f"wrong alpha silently scales the adapter. Drop --alpha.")
    if rank is not None and int(rank) != r_cfg and not peft_cfg.get("rank_pattern"):
        raise MergeError(f"--rank {rank} disagrees with {cfg_path} (r={r_cfg}). Drop --rank.")
    rslora = bool(peft_cfg.get("use_rslora", False))
    parts, other = _collect(tensors, f"{wpath}")
    if not parts:
        raise MergeError(f"{wpath}: no lora_A / lora_B tensors found.")
    factors = {}
    for mod, slot in parts.items():
        r_mod = int(_pattern_value(peft_cfg.get("rank_pattern"), mod, r_cfg))
        a_mod = float(_pattern_value(peft_cfg.get("alpha_pattern"), mod, a_cfg))
        A, B = slot["A"].float(), slot["B"].float()
        if A.shape[0] != r_mod or B.shape[1] != r_mod:
            raise MergeError(f"{wpath}: {mod}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} "
                             f"have rank {A.shape[0]}/{B.shape[1]} but {ADAPTER_CONFIG} says "
                             f"r={r_mod}: config and weights do not belong together.")
        mag = slot.get("M")
        factors[mod + ".weight"] = LoraFactor(A, B, lora_scale(a_mod, r_mod, rslora),
                                              None if mag is None else mag.float())
    notes = []
    if peft_cfg.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out=true in the config is ignored for nn.Linear targets "
                     "(peft does the same), so the factors are used as W += s B A.")
    return Adapter(src, "peft", factors, {k: v.float() for k, v in other.items()}, peft_cfg, notes)


def _load_rwkv_peft_file(path: Path, alpha, rank) -> Adapter:
    tensors, _ = _read_tensors(path)
    parts, other = _collect(tensors, str(path))
    if not parts:
        keys = ", ".join(sorted(tensors)[:4])
        raise MergeError(f"{path}: no LoRA tensors (keys like blocks.0.att.receptance.lora_A); "
                         f"found {len(tensors)} keys ({keys} ...). Is this a full model? "
                         f"Pass it as --base-model, not --adapter.")
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
    peft_cfg = {"peft_type": "LORA", "r": r, "lora_alpha": float(alpha), "use_rslora": False,
           "source_format": "rwkv-peft"}
    return Adapter(str(path), "rwkv-peft", factors, {k: v.float() for k, v in other.items()}, peft_cfg)


# ---- checks --------------------------------------------------------------------------------------
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


# ---- merge maths ---------------------------------------------------------------------------------
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


# ---- export --------------------------------------------------------------------------------------
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
    peft_cfg = LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0, bias="none",
        use_dora=adapter.use_dora,
        target_modules=target_regex(targets),
        rank_pattern={re.escape(m): ranks[m] for m in mods if ranks[m] != r},
        alpha_pattern={re.escape(m): alphas[m] for m in mods if abs(alphas[m] - alpha) > 1e-9 * abs(alpha)},
    )
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
    return peft_config_dict(peft_cfg), tensors


def target_regex(targets) -> str:
    """peft `target_modules` as one full-match regex over module names (blocks.N.<target>)."""
    alts = "|".join(re.escape(t) for t in targets)
    return rf"blocks\.\d+\.({alts})"


def peft_config_dict(lora_config) -> dict:
    """A peft LoraConfig as the JSON object of adapter_config.json (sets as sorted lists)."""
    peft_cfg = lora_config.to_dict()
    peft_cfg["peft_type"] = "LORA"
    peft_cfg["task_type"] = None
    return json.loads(json.dumps(peft_cfg, default=sorted))


def save_adapter(folder: str | os.PathLike, adapter_config: dict, tensors: dict[str, torch.Tensor],
                 metadata: dict | None = None) -> Path:
    """Write an adapter in PEFT layout into `folder` (each file atomically). `metadata`
    (JSON-able) is stored in the safetensors header under "rwkvforge"."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}
    if metadata:
        meta[_META_KEY] = json.dumps(metadata, sort_keys=True, default=str)
    blob = st_save({k: compact_cpu(v) for k, v in tensors.items()}, metadata=meta)
    atomic_write_bytes(folder / ADAPTER_WEIGHTS[0], blob)
    peft_cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in adapter_config.items()}
    atomic_write_bytes(folder / ADAPTER_CONFIG,
                       (json.dumps(peft_cfg, indent=2, sort_keys=True, default=str) + "\n").encode())
    name = ADAPTER_WEIGHTS[0]
    atomic_write_bytes(folder / CHECKSUMS, f"{file_sha256(folder / name)}  {name}\n".encode())
    return folder


def verify_checksums(folder: str | os.PathLike) -> int:
    """Check the files `folder/SHA256SUMS` lists (written by save_adapter); returns how many
    were checked (0: no SHA256SUMS, e.g. an adapter from peft itself). MergeError naming the
    file on a mismatch or a missing file."""
    folder = Path(folder)
    sums = folder / CHECKSUMS
    if not sums.is_file():
        return 0
    n = 0
    for lineno, line in enumerate(sums.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, name = line.partition("  ")
        name = name.lstrip("*")
        if not sep or len(digest) != 64 or not name or "/" in name or name.startswith("."):
            raise MergeError(f"{sums}:{lineno}: not a `sha256sum` line ({line[:80]!r}); "
                             f"delete {CHECKSUMS} to load the adapter unchecked.")
        f = folder / name
        if not f.is_file():
            raise MergeError(f"{f}: missing ({CHECKSUMS} lists it); the adapter folder is "
                             "incomplete: copy it again, or re-export it from the run's last "
                             "checkpoint (rwkvforge train --resume).")
        got = file_sha256(f)
        if got != digest.lower():
            raise MergeError(f"{f}: checksum mismatch (sha256 {got[:12]}..., {CHECKSUMS} says "
                             f"{digest[:12]}...): the file was changed or damaged after it "
                             "was written. Copy the adapter again, or re-export it from the "
                             f"run's last checkpoint (if you changed it on purpose, delete "
                             f"{CHECKSUMS}).")
        n += 1
    return n


def save_peft_adapter(adapter: Adapter, folder: str | os.PathLike) -> Path:
    """Write `adapter` (from any format) as a PEFT folder; the folder appears whole or not at
    all."""
    folder = Path(folder)
    with atomic_dir(folder) as tmp:
        save_adapter(tmp, *adapter_to_peft(adapter))
    return folder


# ---- base + adapter ------------------------------------------------------------------------------
def load_with_adapter(base: str | os.PathLike | dict[str, torch.Tensor],
                      adapter: str | os.PathLike | None = None,
                      dtype: torch.dtype = torch.float32, device: str = "cpu") -> RWKV7:
    """The model `base` (a .pth path or a state dict) + `adapter` (a PEFT folder, a run
    folder or an RWKV-PEFT file; None or "" = none), merged in memory in fp32 as `rwkvforge
    merge --dtype fp32` would write it, then cast to `dtype` on `device`. Nothing is written.
    The adapter is read first, so a bad adapter fails before a large base is loaded."""
    if not adapter:
        if isinstance(base, dict):
            return model_from_state_dict(base, dtype=dtype, device=device)
        return load_model(base, dtype=dtype, device=device)
    ad = read_adapter(adapter)
    sd = base if isinstance(base, dict) else load_state_dict(base)
    merged = merge_state_dict(sd, ad, torch.float32, "fp32")
    where = "state dict" if isinstance(base, dict) else str(base)
    return model_from_state_dict(merged, dtype=dtype, device=device, source=f"{where} + {adapter}")


# ---- many adapters -------------------------------------------------------------------------------
class RowLoraLinear(torch.nn.Module):
    """A base Linear shared by several adapters, each batch row with its own: y = x W^T
    (the base weight, held once) + scale_a * (x A_a^T) B_a^T for the rows of adapter a
    (row adapter 0 = none). Which adapter each row uses is set by `MultiLora.rows`."""

    def __init__(self, base: torch.nn.Linear, owner: "MultiLora"):
        super().__init__()
        self.base = base
        self.owner = owner.ref
        self.factors: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        rows = self.owner.rows
        if not rows or not self.factors:
            return y
        for a in set(rows):
            f = self.factors.get(a)
            if f is None:
                continue
            A, B, s = f
            if len(rows) == 1 or all(r == a for r in rows):
                y = y + s * ((x.to(A.dtype) @ A.T) @ B.T).to(y.dtype)
            else:
                idx = torch.tensor([i for i, r in enumerate(rows) if r == a],
                                   device=x.device)
                d = s * ((x.index_select(0, idx).to(A.dtype) @ A.T) @ B.T)
                y = y.index_add(0, idx, d.to(y.dtype))
        return y


class _RowsRef:
    rows: list[int] | None = None


class MultiLora:
    """Several LoRA adapters over one base model (`rwkvforge serve --lora-modules`): the
    adapted Linears become `RowLoraLinear`s around the base weights (not copied), each
    adapter adds only its A / B factors, and `model.rows_adapters(rows)` (which the engine
    enters around every forward) says which adapter each batch row uses. Tuned initial
    states (`--state-modules`, `add_state`) share the index space: a row with a state's index
    starts from that state (`model.init_state`, which the engine calls inside the rows
    context)."""

    def __init__(self, model: RWKV7):
        self.model = model
        self.ref = _RowsRef()
        self.names: dict[str, int] = {}
        self.wrapped: dict[str, RowLoraLinear] = {}
        self._last = 0  # row indices are never reused (the prefix cache keys states by them)
        self.states: dict[int, torch.Tensor] = {}  # index -> initial WKV states (L,H,N,N)
        self._model_init_state = model.init_state
        model.rows_adapters = self.rows  # the engine's hook (generate.Engine._rows)
        model.init_state = self.init_state

    def rows(self, adapters: list[int]) -> "_RowsCtx":
        return _RowsCtx(self.ref, adapters)

    def init_state(self, batch_size: int, device=None):
        """The model's initial state, each row whose index is a state module's starting from
        that state's WKV matrices."""
        state = self._model_init_state(batch_size, device)
        for b, idx in enumerate((self.ref.rows or [])[:batch_size]):
            wkv = self.states.get(idx)
            if wkv is not None:
                for i, (_, S, _) in enumerate(state):
                    S[b] = wkv[i].to(S.device)
        return state

    def add_state(self, name: str, path: str | os.PathLike) -> int:
        """Serve the tuned initial state at `path` (state tuning: a run folder, its state/ or
        a state .pth) as `name`; returns its row index. StateError (a ValueError) for a
        state that does not fit the model."""
        from rwkvforge.state_tuning import read_state

        if name in self.names:
            raise ValueError(f"a model named {name!r} is already served")
        wkv = read_state(path, self.model.config)
        idx = self._last + 1
        self.states[idx] = wkv
        self._last = idx
        self.names[name] = idx
        return idx

    def add(self, name: str, path: str | os.PathLike) -> int:
        """Read the adapter at `path` and serve it as `name`; returns its row index (1, 2,
        ...). Refuses (ValueError) an adapter this path cannot apply per row: DoRA
        magnitudes or fully trained tensors (train_parts) — serve those merged (--adapter).
        Everything is checked before anything is installed, and `name` is registered last:
        a running engine never sees half an adapter (serve's load route calls this while it
        decodes)."""
        if name in self.names:
            raise ValueError(f"an adapter named {name!r} is already served")
        ad = read_adapter(path)
        if ad.use_dora:
            raise ValueError(f"adapter {name} ({path}) is DoRA: per-row serving supports "
                             "plain LoRA; serve it merged with --adapter")
        if ad.replacements:
            raise ValueError(f"adapter {name} ({path}) also replaces full tensors "
                             f"({', '.join(sorted(ad.replacements)[:3])}...): serve it "
                             "merged with --adapter")
        modules = dict(self.model.named_modules())
        todo = []
        for key, f in ad.factors.items():
            mname = key[: -len(".weight")] if key.endswith(".weight") else key
            mod = self.wrapped.get(mname) or modules.get(mname)
            lin = mod.base if isinstance(mod, RowLoraLinear) else mod
            if not isinstance(lin, torch.nn.Linear):
                raise ValueError(f"adapter {name} ({path}): {key} is not a Linear of the base "
                                 "model")
            out_f, in_f = lin.weight.shape
            if tuple(f.A.shape) != (f.r, in_f) or tuple(f.B.shape) != (out_f, f.r):
                raise ValueError(f"adapter {name} ({path}): {key} has A {tuple(f.A.shape)} / "
                                 f"B {tuple(f.B.shape)}, the base Linear is "
                                 f"({out_f}, {in_f})")
            todo.append((mname, lin, f))
        idx = self._last + 1
        for mname, lin, f in todo:
            if mname not in self.wrapped:
                w = RowLoraLinear(lin, self)
                parent, _, child = mname.rpartition(".")
                setattr(self.model.get_submodule(parent) if parent else self.model, child, w)
                self.wrapped[mname] = w
            dt = torch.float32 if lin.weight.dtype == torch.float32 else lin.weight.dtype
            self.wrapped[mname].factors[idx] = (f.A.to(lin.weight.device, dt),
                                                f.B.to(lin.weight.device, dt), float(f.scale))
        self._last = idx
        self.names[name] = idx
        return idx

    def remove(self, name: str) -> int:
        """Stop serving `name` (KeyError if it is not served); returns its row index. Its
        factors leave every Linear (the wrappers stay). The caller makes sure no request
        still runs with it (serve's unload route)."""
        idx = self.names.pop(name)
        for w in self.wrapped.values():
            w.factors.pop(idx, None)
        self.states.pop(idx, None)
        return idx


class _RowsCtx:
    def __init__(self, ref: _RowsRef, rows: list[int]):
        self.ref, self.new = ref, list(rows)

    def __enter__(self) -> None:
        self.old, self.ref.rows = self.ref.rows, self.new

    def __exit__(self, *exc: object) -> None:
        self.ref.rows = self.old

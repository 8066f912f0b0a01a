"""Adapters for RWKV-7: LoRA / PiSSA / DoRA (via `peft`) and QLoRA base weights (via
`bitsandbytes`), plus the export format and a reference merge.

    from rwkvforge.peft import AdapterSpec, apply_adapter
    spec = AdapterSpec.from_settings(settings)          # LORA_R, LORA_TARGETS, QUANT, ...
    model = apply_adapter(base_model, spec)             # a peft.PeftModel around RWKV7
    config, tensors = export_adapter(model, spec)       # PEFT layout, for adapter.save_adapter

What gets trained:
- adapters on the block Linears named by LORA_TARGETS (`att.receptance`, `att.key`,
  `att.value`, `att.output`, `ffn.key`, `ffn.value`, in every block);
- TRAIN_PARTS, fully: `ln` (all layer norms and att.ln_x), `time` (the token-shift mixes and
  the small decay / in-context-rate / value / gate projections), `emb`, `head`.
Everything else is frozen.

QLoRA: with QUANT=nf4 / int8 the targeted Linears are replaced by bitsandbytes `Linear4bit`
(NF4, double quantisation off) / `Linear8bitLt` before peft wraps them, and the model is
flagged `is_loaded_in_4bit` / `is_loaded_in_8bit`, so peft uses its bitsandbytes LoRA
layers. Non-targeted weights (emb, head, small projections) stay in the compute dtype.

PiSSA initialises A, B from the top singular vectors of W and trains on the residual
W - B A. The exported adapter is converted to a plain LoRA of rank 2r (A' = [A; A0],
B' = [B, -B0], alpha' = 2 alpha) that applies to the *original* base weights, so merge,
inference and other tools need not know PiSSA was used. With QUANT, PiSSA runs on the
float weights first and the residual is quantised afterwards (quantising W before the SVD
would bake the quantisation error into the residual).

Export layout (PEFT): `adapter_config.json` (a LoraConfig) + `adapter_model.safetensors`
with keys `base_model.model.blocks.N.<target>.lora_A.weight` / `.lora_B.weight`
(/ `.lora_magnitude_vector` for DoRA) and, for TRAIN_PARTS, whole replacement tensors under
`base_model.model.<BlinkDL key>`. `rwkvforge.adapter` owns that layout: it writes it
(`save_adapter`), reads it (`read_adapter`; `adapter_from_peft` for the in-memory pair
`export_adapter` returns) and merges it into a BlinkDL state dict.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Iterable

import torch
import torch.nn as nn

from rwkvforge.adapter import PEFT_PREFIX, peft_config_dict, target_regex
from rwkvforge.config import LORA_TARGETS, QUANTS, TRAIN_PARTS

ADAPTER_NAME = "default"

# BlinkDL parameter names belonging to each TRAIN_PARTS entry.
_TIME_NAMES = {"x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "w1", "w2", "a0", "a1", "a2",
               "v0", "v1", "v2", "g1", "g2", "k_k", "k_a", "r_k"}
_PART_PATTERNS = {
    "ln": re.compile(r"^(blocks\.\d+\.(ln0|ln1|ln2|att\.ln_x)|ln_out)\.(weight|bias)$"),
    "time": re.compile(r"^blocks\.\d+\.(att\.(" + "|".join(sorted(_TIME_NAMES)) + r")|ffn\.x_k)$"),
    "emb": re.compile(r"^emb\.weight$"),
    "head": re.compile(r"^head\.weight$"),
}


class AdapterError(ValueError):
    """A wrong adapter setting or file; the message says which and what to do."""


def _split_list(text: str | Iterable[str]) -> tuple[str, ...]:
    items = text.split(",") if isinstance(text, str) else list(text)
    return tuple(x.strip() for x in items if x and x.strip())


def parse_targets(text: str | Iterable[str]) -> tuple[str, ...]:
    """'att.key,ffn.value' -> ('att.key', 'ffn.value'), checked against LORA_TARGETS."""
    out = _split_list(text)
    if not out:
        raise AdapterError("LORA_TARGETS is empty: name at least one of "
                           + ", ".join(LORA_TARGETS) + ".")
    return _known(out, LORA_TARGETS, "LORA_TARGETS", "target")


def parse_train_parts(text: str | Iterable[str]) -> tuple[str, ...]:
    return _known(_split_list(text), TRAIN_PARTS, "TRAIN_PARTS", "part")


def _known(items: tuple[str, ...], allowed, key: str, what: str) -> tuple[str, ...]:
    """`items` without repeats; an unknown one is an AdapterError with the closest name."""
    for t in items:
        if t not in allowed:
            close = difflib.get_close_matches(t, allowed, n=1)
            hint = f" Did you mean {close[0]}?" if close else ""
            raise AdapterError(f"{key}: unknown {what} {t!r}.{hint} Choose from "
                               + ", ".join(allowed) + ".")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class AdapterSpec:
    """Everything that decides the adapter's shape and the base weights' storage."""

    r: int = 32
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS
    train_parts: tuple[str, ...] = ()
    init: str = "default"  # default (B = 0) | pissa
    use_dora: bool = False
    quant: str = "none"  # none | nf4 | int8

    def __post_init__(self) -> None:
        if self.init not in ("default", "pissa"):
            raise AdapterError(f"PEFT_INIT={self.init!r}: expected default or pissa.")
        if self.quant not in QUANTS:
            raise AdapterError(f"QUANT={self.quant!r}: expected one of {', '.join(QUANTS)}.")
        if self.init == "pissa" and self.use_dora:
            raise AdapterError("PEFT_INIT=pissa with USE_DORA=1 is not supported: the DoRA "
                               "magnitude would be relative to the PiSSA residual, so the "
                               "adapter could not be exported for the original base. Pick one.")
        if self.r < 1:
            raise AdapterError(f"LORA_R={self.r}: must be >= 1.")

    @classmethod
    def from_settings(cls, s) -> "AdapterSpec":
        return cls(r=int(s.lora_r), alpha=float(s.lora_alpha), dropout=float(s.lora_dropout),
                   targets=parse_targets(s.lora_targets),
                   train_parts=parse_train_parts(s.train_parts), init=s.peft_init,
                   use_dora=bool(s.use_dora), quant=s.quant)

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def metadata(self, base_model, model_cfg, **extra) -> dict:
        """What the adapter file records of how it was made (its safetensors header)."""
        return {"base_model": str(base_model), "model": model_cfg.to_dict(), "quant": self.quant,
                "peft_init": self.init, "use_dora": self.use_dora,
                "train_parts": list(self.train_parts), "targets": list(self.targets), **extra}


def target_module_names(model: nn.Module, targets: Iterable[str]) -> list[str]:
    """Names of the Linears an adapter goes on, e.g. 'blocks.3.att.key'."""
    pat = re.compile(target_regex(targets))
    return [n for n, _ in model.named_modules() if pat.fullmatch(n)]


def train_part_of(name: str, parts: Iterable[str]) -> str | None:
    """Which TRAIN_PARTS entry a BlinkDL parameter name belongs to (None: not trained)."""
    for p in parts:
        if _PART_PATTERNS[p].match(name):
            return p
    return None


def _set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def quantized_linear(lin: nn.Linear, quant: str, compute_dtype: torch.dtype) -> nn.Module:
    """A bitsandbytes copy of `lin` (weights quantised on the current device)."""
    import bitsandbytes as bnb

    w = lin.weight.data.detach().to(torch.float32 if lin.weight.device.type == "cpu"
                                    else torch.float16)
    dev = lin.weight.device
    if quant == "nf4":
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False,
                              compute_dtype=compute_dtype, quant_type="nf4",
                              compress_statistics=False, device="meta")
        q.weight = bnb.nn.Params4bit(w.cpu() if dev.type == "meta" else w,
                                     requires_grad=False, quant_type="nf4",
                                     compress_statistics=False)
    elif quant == "int8":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=False,
                                has_fp16_weights=False, threshold=6.0, device="meta")
        q.weight = bnb.nn.Int8Params(w, requires_grad=False, has_fp16_weights=False)
    else:
        raise AdapterError(f"QUANT={quant!r}: expected nf4 or int8.")
    return q.to(dev)  # the move is what quantises (bitsandbytes convention)


def quantize_linears(model: nn.Module, names: Iterable[str], quant: str,
                     compute_dtype: torch.dtype) -> None:
    """Replace the Linears `names` by 4-bit / 8-bit bitsandbytes layers, in place."""
    for n in names:
        lin = model.get_submodule(n)
        if not isinstance(lin, nn.Linear):
            raise AdapterError(f"{n} is {type(lin).__name__}, not nn.Linear: cannot quantise.")
        _set_module(model, n, quantized_linear(lin, quant, compute_dtype))
        del lin


def lora_config(spec: AdapterSpec, *, init_override=None):
    from peft import LoraConfig

    return LoraConfig(
        r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
        target_modules=target_regex(spec.targets), bias="none", use_dora=spec.use_dora,
        init_lora_weights=(init_override if init_override is not None else
                           ("pissa" if spec.init == "pissa" else True)),
    )


def apply_adapter(model: nn.Module, spec: AdapterSpec,
                  compute_dtype: torch.dtype = torch.float32):
    """Wrap `model` (an RWKV7 with float weights) with adapters per `spec`; returns a
    peft.PeftModel whose trainable parameters are the adapters + TRAIN_PARTS (fp32).

    The base model is modified in place (its Linears are wrapped, and quantised for QLoRA).
    The PeftModel still exposes `forward_hidden`, `head`, `gradient_checkpointing` through
    attribute forwarding; use `unwrap(peft_model)` for the RWKV7 itself.
    """
    from peft import get_peft_model

    names = target_module_names(model, spec.targets)
    if not names:
        raise AdapterError(f"no module matches LORA_TARGETS={','.join(spec.targets)} in "
                           f"{type(model).__name__}: is this an RWKV-7 model?")
    for p in model.parameters():
        p.requires_grad_(False)

    if spec.quant != "none" and spec.init == "pissa":
        # SVD on the float weights, then quantise the residual that stays frozen
        peft_model = get_peft_model(model, lora_config(spec))
        for n in names:
            layer = peft_model.base_model.model.get_submodule(n)
            layer.base_layer = quantized_linear(layer.base_layer, spec.quant, compute_dtype)
    else:
        if spec.quant != "none":
            quantize_linears(model, names, spec.quant, compute_dtype)
            model.is_loaded_in_4bit = spec.quant == "nf4"
            model.is_loaded_in_8bit = spec.quant == "int8"
        peft_model = get_peft_model(model, lora_config(spec))

    base = unwrap(peft_model)
    for n, p in base.named_parameters():
        if "lora_" in n:
            p.data = p.data.float()  # adapters train in fp32 whatever the base dtype
            p.requires_grad_(True)
        elif train_part_of(_blink_name(n), spec.train_parts):
            p.data = p.data.float()
            p.requires_grad_(True)
        else:
            p.requires_grad_(False)
    if spec.init == "pissa":
        # A0, B0: needed to export a PiSSA adapter as a LoRA on the original weights
        peft_model._rwkvforge_pissa_init = {
            k: v.detach().clone() for k, v in lora_tensors(peft_model).items()}
    return peft_model


def unwrap(peft_model) -> nn.Module:
    """The RWKV7 inside a PeftModel (or the module itself)."""
    inner = getattr(peft_model, "base_model", None)
    return getattr(inner, "model", peft_model) if inner is not None else peft_model


def _blink_name(name: str) -> str:
    """Module-tree parameter name -> BlinkDL key (drops peft's `base_layer.` hop)."""
    return name.replace(".base_layer.", ".")


def trainable_state(peft_model) -> dict[str, torch.Tensor]:
    """Every trainable tensor by its module-tree name (raw, for resume): adapters (PiSSA
    un-converted) + TRAIN_PARTS."""
    return {n: p.detach().clone() for n, p in unwrap(peft_model).named_parameters()
            if p.requires_grad}


def load_trainable_state(peft_model, tensors: dict[str, torch.Tensor]) -> None:
    """Inverse of `trainable_state`; every trainable tensor must be present, same shape."""
    params = {n: p for n, p in unwrap(peft_model).named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(tensors))
    extra = sorted(set(tensors) - set(params))
    if missing or extra:
        raise AdapterError(
            "checkpoint does not match this adapter setup: "
            + (f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} " if missing else "")
            + (f"unexpected {extra[:3]}{'...' if len(extra) > 3 else ''} " if extra else "")
            + "(were LORA_R / LORA_TARGETS / TRAIN_PARTS / USE_DORA changed since the run "
            "started?)")
    with torch.no_grad():
        for n, p in params.items():
            t = tensors[n]
            if tuple(t.shape) != tuple(p.shape):
                raise AdapterError(f"checkpoint tensor {n} has shape {tuple(t.shape)}, the "
                                   f"model expects {tuple(p.shape)}.")
            p.copy_(t.to(p.dtype))


def lora_tensors(peft_model) -> dict[str, torch.Tensor]:
    """The adapter tensors in PEFT file layout (`base_model.model....lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().float().contiguous().clone()
            for k, v in get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME).items()}


def export_adapter(peft_model, spec: AdapterSpec) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config dict, tensors) in PEFT layout, applying to the ORIGINAL base weights
    (PiSSA converted to a rank-2r LoRA), TRAIN_PARTS included as whole tensors."""
    peft_cfg = lora_config(spec, init_override=True)
    tensors = lora_tensors(peft_model)
    if spec.init == "pissa":
        init = getattr(peft_model, "_rwkvforge_pissa_init", None)
        if init is None:
            raise AdapterError("PiSSA model without its initial A0/B0: build it with "
                               "apply_adapter().")
        tensors = _pissa_to_lora(tensors, init)
        peft_cfg = lora_config(AdapterSpec(**{**spec.__dict__, "r": 2 * spec.r,
                                         "alpha": 2 * spec.alpha, "init": "default"}),
                          init_override=True)
    base = unwrap(peft_model)
    for n, p in base.named_parameters():
        # the tuned initial states (TRAIN_TYPE=lora+state) are no weights: state_tuning.py
        if p.requires_grad and "lora_" not in n and not n.endswith(".time_state"):
            tensors[PEFT_PREFIX + _blink_name(n)] = p.detach().float().contiguous().clone()
    return peft_config_dict(peft_cfg), tensors


def _pissa_to_lora(cur: dict[str, torch.Tensor], init: dict[str, torch.Tensor]
                   ) -> dict[str, torch.Tensor]:
    # delta = s (B A - B0 A0) = s' [B, -B0] [A; A0] with s' = 2 alpha / 2 r = s
    out = {}
    for k, v in cur.items():
        if k.endswith("lora_A.weight"):
            out[k] = torch.cat([v, init[k]], dim=0)
        elif k.endswith("lora_B.weight"):
            out[k] = torch.cat([v, -init[k]], dim=1)
        else:
            out[k] = v
    return out


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; bitsandbytes 4-bit weights counted unpacked."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


__all__ = [
    "LORA_TARGETS", "TRAIN_PARTS", "QUANTS", "PEFT_PREFIX", "AdapterError", "AdapterSpec",
    "parse_targets", "parse_train_parts", "target_regex", "target_module_names",
    "train_part_of", "quantized_linear", "quantize_linears", "lora_config", "apply_adapter",
    "unwrap", "trainable_state", "load_trainable_state", "lora_tensors", "export_adapter",
    "count_parameters",
]

"""State tuning (TRAIN_TYPE=state / lora+state): a trainable initial WKV state per layer.

RWKV-PEFT's state tuning: every weight stays frozen and the initial WKV state of each layer,
(H, N, N) per layer, is trained, so a "skill" is a small file a runtime loads before the
conversation starts. Here it is the parameter `blocks.{i}.att.time_state` the model gets from
`RWKV7.add_initial_state` (RWKV-PEFT's name): `init_state`, and so every forward without an
explicit state, starts from it; every WKV kernel returns the initial state's gradient
(model/wkv.py; tests/test_state_grad.py holds each against the sequential reference). With
PACK=1 every example of a packed row restarts from it (the kernels' `reset_state`), and its
gradient sums every example's (tests/test_pack_state.py).

    TRAIN_TYPE=state ./scripts/train_state.sh                 # configs/profile/state.env
    rwkvforge train --train-type lora+state                   # LoRA and the state together
    rwkvforge infer --state runs/<run> --prompt "..."         # a run folder: its state/
    rwkvforge eval --run runs/<run>                           # base vs base + state

A run writes runs/<run>/state/ (checkpoints: checkpoints/step-N/state/):
  state.pth           {"blocks.{i}.att.time_state": (H, N, N) fp32}, exactly n_layer keys: the
                      file RWKV-PEFT saves and RWKV-Runner loads (RWKV-Runner
                      backend-python/utils/rwkv.py `load_rwkv_state`: it requires exactly
                      n_layer entries of (H, N, ...) and, for RWKV-7, uses each tensor as the
                      rwkv pip state without a transpose). Rows index the value dimension,
                      columns the key: the rwkv pip package's and model/wkv.py's layout.
  rwkv_pip_state.pt   a list of 3 * n_layer tensors, what rwkv pip's `RWKV.forward(tokens,
                      state)` takes for RWKV-7 (RWKV_V7_ON=1): per layer the token-shift
                      vector of time mixing (C,) zeros, the WKV state (H, N, N) fp32, the
                      token-shift vector of channel mixing (C,) zeros. Load with
                      torch.load(..., weights_only=True); pass a deep copy per conversation.
  state.st            the same state as ai00's converter writes state.pth (web-rwkv
                      assets/scripts/convert_safetensors.py: fp16, last two dimensions
                      transposed), for ai00's [[state]] list (= `rwkvforge export --format
                      ai00 --state .../state.pth`'s <out>.state.st).
  state.json          what the state was trained on (base model, step, run, shape).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from rwkvforge import runs
from rwkvforge.adapter import ADAPTER_CONFIG, resolve_adapter_path, save_adapter
from rwkvforge.checkpoint import atomic_dir, atomic_output
from rwkvforge.config import TRAIN_TYPES
from rwkvforge.peft import (AdapterSpec, apply_adapter, export_adapter, quantize_linears,
                            target_module_names)

STATE_DIR = "state"
STATE_PTH = "state.pth"
RWKV_PIP_STATE = "rwkv_pip_state.pt"
AI00_STATE = "state.st"
STATE_JSON = "state.json"
STATE_KEY = "blocks.{}.att.time_state"


class StateError(ValueError):
    """A wrong state setting or file; the message says which and what to do."""


def trains_state(train_type: str) -> bool:
    return "state" in train_type.split("+")


def trains_lora(train_type: str) -> bool:
    return "lora" in train_type.split("+")


# ---- training ------------------------------------------------------------------------------------
def check_settings(s) -> None:
    """Settings a state-tuning run cannot take (checked before DeepSpeed's launcher starts)."""
    if s.train_type not in TRAIN_TYPES:
        raise StateError(f"TRAIN_TYPE={s.train_type!r}: expected one of "
                         f"{', '.join(TRAIN_TYPES)}.")
    if not trains_state(s.train_type):
        return
    if s.train_type == "state" and s.train_parts.strip():
        raise StateError(f"TRAIN_TYPE=state trains only the initial state, but TRAIN_PARTS="
                         f"{s.train_parts} trains weights: use TRAIN_TYPE=lora+state, or "
                         "empty TRAIN_PARTS.")
    if s.deepspeed_stage == 3:
        # ZeRO-3 gathers a module's parameters when that module runs; the state is read
        # before the first block runs, so it would be an empty shard there
        raise StateError(f"TRAIN_TYPE={s.train_type} runs in one process or under "
                         "DEEPSPEED_STAGE=2 (the whole state is a few MB; ZeRO-3 would "
                         "shard it away from where it is read); set DEEPSPEED_STAGE=2.")


def apply_training(base: nn.Module, spec: AdapterSpec, train_type: str,
                   compute_dtype: torch.dtype = torch.float32) -> nn.Module:
    """`base` (an RWKV7, float weights) made ready to train per TRAIN_TYPE: lora = peft's
    adapters (peft.apply_adapter); state = every weight frozen (the targeted Linears
    quantised under QUANT, as for QLoRA) and a zero initial state per layer trainable in
    fp32; lora+state = both. Returns the peft model (lora) or `base` itself (state)."""
    if train_type not in TRAIN_TYPES:
        raise StateError(f"TRAIN_TYPE={train_type!r}: expected one of {', '.join(TRAIN_TYPES)}.")
    if trains_state(train_type):
        base.add_initial_state()
    if trains_lora(train_type):
        model = apply_adapter(base, spec, compute_dtype=compute_dtype)
    else:
        for p in base.parameters():
            p.requires_grad_(False)
        if spec.quant != "none":
            quantize_linears(base, target_module_names(base, spec.targets), spec.quant,
                             compute_dtype)
        model = base
    inner = _inner(model)
    for block in inner.blocks if trains_state(train_type) else ():
        block.att.time_state.data = block.att.time_state.data.float()
        block.att.time_state.requires_grad_(True)
    return model


def _inner(model: nn.Module) -> nn.Module:
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if base is not None else model


def optimizer_groups(model: nn.Module, s) -> list[dict]:
    """AdamW parameter groups: LoRA matrices (WEIGHT_DECAY), other trainables (no decay), and
    the initial states at STATE_LR (0: LR) without decay. Empty groups are left out. The
    schedule scales every group's rate by the same factor (so the state's final rate is
    STATE_LR x LR_FINAL / LR)."""
    decay, no_decay, state = [], [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (state if n.endswith(".time_state") else decay if ("lora_" in n and p.ndim == 2)
             else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": no_decay, "weight_decay": 0.0},
              {"params": state, "weight_decay": 0.0, "lr": s.state_lr or s.lr}]
    return [g for g in groups if g["params"]]


@dataclass
class Tuning:
    """What a run has trained, as it is now: the adapter (PEFT config, tensors, metadata; None
    for TRAIN_TYPE=state) and the initial states (L,H,N,N) fp32 (None for lora)."""

    adapter: tuple | None
    state: torch.Tensor | None
    metadata: dict

    def save(self, folder: Path) -> None:
        """Into a checkpoint folder being written: the adapter files, and state/."""
        if self.adapter is not None:
            save_adapter(folder, *self.adapter)
        if self.state is not None:
            (folder / STATE_DIR).mkdir()
            save_state(folder / STATE_DIR, self.state, self.metadata)

    def save_final(self, run_dir: Path) -> None:
        """runs/<run>/adapter/ and / or runs/<run>/state/, each written whole and renamed."""
        if self.adapter is not None:
            with atomic_dir(run_dir / "adapter") as d:
                save_adapter(d, *self.adapter)
        if self.state is not None:
            with atomic_dir(run_dir / STATE_DIR) as d:
                save_state(d, self.state, self.metadata)


def export_tuning(model: nn.Module, spec: AdapterSpec, train_type: str, metadata: dict,
                  base_path: str) -> Tuning:
    adapter = None
    if trains_lora(train_type):
        peft_cfg, tensors = export_adapter(model, spec)
        peft_cfg["base_model_name_or_path"] = base_path
        adapter = (peft_cfg, tensors, metadata)
    wkv = _inner(model).initial_wkv() if trains_state(train_type) else None
    return Tuning(adapter, None if wkv is None else wkv.detach().float().cpu().clone(),
                  {**metadata, "train_type": train_type})


def finished(run_dir: Path, train_type: str) -> bool:
    """Whether a run's final outputs are all there."""
    return ((not trains_lora(train_type) or (run_dir / "adapter" / ADAPTER_CONFIG).is_file())
            and (not trains_state(train_type) or (run_dir / STATE_DIR / STATE_PTH).is_file()))


def done_lines(lines: list[str], run_dir: Path, train_type: str) -> list[str]:
    """runs.final_lines, naming the state (and, for TRAIN_TYPE=state, not an adapter)."""
    if not trains_state(train_type):
        return lines
    where = run_dir / STATE_DIR
    if train_type == "state":
        first = lines[0].replace(f"adapter {run_dir / 'adapter'}", f"state {where}")
        rest = lines[1].split("Next:")[0]
        return [first, rest + f"Next: rwkvforge eval --run {run_dir}  (base vs base + state), "
                f"rwkvforge infer --state {run_dir}"]
    return [lines[0] + f", state {where}", *lines[1:]]


def run_state_note(adapter_path: str | os.PathLike, without: str) -> str | None:
    """What to say when an adapter (or its run folder) comes from a run that also tuned an
    initial state (TRAIN_TYPE=lora+state) and the command does not use it: `without` says
    what the user gets instead. None when the run has no state."""
    run_dir = runs.run_of(resolve_adapter_path(adapter_path))
    if run_dir is None or not (run_dir / STATE_DIR / STATE_PTH).is_file():
        return None
    return (f"note: this run also tuned an initial state ({run_dir / STATE_DIR}); {without}. "
            f"Use them together: --state {run_dir} with infer / serve (eval --run finds it by "
            "itself; export --format ai00 takes --state too), see docs/state-tuning.md")


# ---- files ---------------------------------------------------------------------------------------
def state_dict_of(wkv: torch.Tensor) -> dict[str, torch.Tensor]:
    """(L,H,N,N) -> {"blocks.{i}.att.time_state": (H,N,N) fp32} (RWKV-PEFT / RWKV-Runner)."""
    return {STATE_KEY.format(i): wkv[i].float().contiguous().clone() for i in range(len(wkv))}


def rwkv_pip_state(wkv: torch.Tensor, n_embd: int) -> list[torch.Tensor]:
    """(L,H,N,N) -> the list rwkv pip's RWKV-7 `forward(tokens, state)` takes: per layer
    [time-mix shift (C,), WKV state (H,N,N) fp32, channel-mix shift (C,)]."""
    out = []
    for i in range(len(wkv)):
        out += [torch.zeros(n_embd), wkv[i].float().contiguous().clone(), torch.zeros(n_embd)]
    return out


def ai00_state_dict(wkv: torch.Tensor) -> dict[str, torch.Tensor]:
    """state.pth as ai00's converter writes it: fp16, last two dimensions transposed."""
    return {k: v.half().transpose(-2, -1).contiguous() for k, v in state_dict_of(wkv).items()}


def save_state(folder: Path, wkv: torch.Tensor, metadata: dict) -> None:
    """The four files of a state folder (module docstring), each to a temp name + rename."""
    from safetensors.torch import save_file

    folder = Path(folder)
    L, H, N, _ = wkv.shape
    if not torch.isfinite(wkv).all():
        raise StateError(f"the tuned state has NaN / Inf values (diverged training): not "
                         f"written to {folder}. Lower STATE_LR / LR and train again.")
    with atomic_output(folder / STATE_PTH) as tmp:
        torch.save(state_dict_of(wkv), tmp)
    with atomic_output(folder / RWKV_PIP_STATE) as tmp:
        torch.save(rwkv_pip_state(wkv, H * N), tmp)
    with atomic_output(folder / AI00_STATE) as tmp:
        save_file(ai00_state_dict(wkv), str(tmp), metadata={"format": "pt"})
    meta = {**metadata, "n_layer": L, "n_head": H, "head_size": N,
            "files": {STATE_PTH: "RWKV-PEFT / RWKV-Runner (blocks.N.att.time_state)",
                      RWKV_PIP_STATE: "rwkv pip RWKV.forward(tokens, state)",
                      AI00_STATE: "ai00 [[state]] (converter layout)"}}
    with atomic_output(folder / STATE_JSON) as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")


def resolve_state_path(path: str | os.PathLike) -> Path:
    """A run folder -> its state/state.pth; a state folder -> its state.pth; else `path`."""
    p = Path(path).expanduser()
    for cand in (p / STATE_DIR / STATE_PTH, p / STATE_PTH):
        if p.is_dir() and cand.is_file():
            return cand
    if p.is_dir():
        raise StateError(f"--state {path}: no {STATE_DIR}/{STATE_PTH} or {STATE_PTH} in this "
                         "folder. Pass a state-tuning run (runs/<run>, trained with "
                         "TRAIN_TYPE=state or lora+state), its state/ folder or a state .pth.")
    if not p.is_file():
        raise StateError(f"--state {path}: no such file or folder.")
    return p


def read_state(path: str | os.PathLike, cfg=None) -> torch.Tensor:
    """The initial states (L,H,N,N) fp32 of a state file (RWKV-PEFT .pth, keys
    blocks.{i}.att.time_state, optional model./base_model.model. prefixes; or our rwkv pip
    list), a state folder or a run folder; checked against `cfg` (an RWKV7Config) when given."""
    p = resolve_state_path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means "not a state file"
        raise StateError(f"--state {p}: cannot be read as a state .pth ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0]}); pass runs/<run>/state/"
                         f"{STATE_PTH} or an RWKV-PEFT state checkpoint.") from None
    if isinstance(obj, list) and len(obj) % 3 == 0 and all(torch.is_tensor(t) for t in obj):
        states = obj[1::3]  # rwkv pip layout
    elif isinstance(obj, dict):
        found = {}
        for k, v in obj.items():
            if isinstance(k, str) and k.endswith(".att.time_state") and torch.is_tensor(v):
                i = k.split(".att.time_state")[0].rsplit("blocks.", 1)[-1]
                if i.isdigit():
                    found[int(i)] = v
        if not found or sorted(found) != list(range(len(found))):
            keys = ", ".join(sorted(map(str, obj))[:4])
            raise StateError(f"--state {p}: expected blocks.0..N.att.time_state tensors (a "
                             f"state-tuning output), found {len(obj)} keys ({keys} ...).")
        states = [found[i] for i in range(len(found))]
    else:
        raise StateError(f"--state {p}: a {type(obj).__name__}, not a state file.")
    shapes = {tuple(t.shape) for t in states}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise StateError(f"--state {p}: per-layer states of shapes {sorted(shapes)}; expected "
                         "one (heads, head size, head size) shape for every layer.")
    wkv = torch.stack([t.float() for t in states])
    if cfg is not None:
        want = (cfg.n_layer, cfg.n_head, cfg.head_size, cfg.head_size)
        if tuple(wkv.shape) != want:
            raise StateError(f"--state {p}: {tuple(wkv.shape)} (layers, heads, N, N) does not "
                             f"fit this model, which takes {want}: the state was tuned on "
                             "another base model.")
    if not torch.isfinite(wkv).all():
        raise StateError(f"--state {p}: holds NaN / Inf values (a diverged run).")
    return wkv


def load_state_into(model: nn.Module, path: str | os.PathLike | None) -> Path | None:
    """Give `model` (an RWKV7) the initial state at `path` (None / "": nothing); returns the
    resolved state file."""
    if not path:
        return None
    p = resolve_state_path(path)
    model.add_initial_state(read_state(p, model.config))
    return p


__all__ = [
    "STATE_DIR", "STATE_PTH", "RWKV_PIP_STATE", "AI00_STATE", "STATE_JSON", "StateError",
    "Tuning", "trains_state", "trains_lora", "check_settings", "apply_training",
    "optimizer_groups", "export_tuning", "finished", "done_lines", "state_dict_of",
    "rwkv_pip_state", "ai00_state_dict", "save_state", "resolve_state_path", "read_state",
    "load_state_into",
]

"""The Hugging Face RWKV-7 layout (fla-hub `RWKV7ForCausalLM`): BlinkDL state dict <-> HF
folder, both ways.

    from rwkvforge.hf import write_hf_folder, load_hf_folder, is_hf_folder
    write_hf_folder(sd, "out/my-model-hf", torch.bfloat16)
    sd = load_hf_folder("out/my-model-hf")         # back to BlinkDL names and shapes

The names are those of flash-linear-attention's `fla.models.rwkv7` and of the `rwkv7-hf`
package (its `converter.translate_name`, rwkv7-hf 0.9.0), which llama.cpp's converter, the
vLLM / SGLang RWKV forks and transformers-based tools read:

    emb.weight                  model.embeddings.weight
    blocks.0.ln0 / ln1 / ln2    model.layers.i.pre_norm / attn_norm / ffn_norm
    att.x_r .. x_g              model.layers.i.attn.x_r .. x_g          (1,1,C)
    att.w0 / a0 / v0            model.layers.i.attn.{w,a,v}_lora.lora.2.bias   (C,)
    att.w1 / a1 / v1 / g1       model.layers.i.attn.{w,a,v,g}_lora.lora.0.weight   transposed
    att.w2 / a2 / v2 / g2       model.layers.i.attn.{w,a,v,g}_lora.lora.2.weight   transposed
    att.k_k / k_a               model.layers.i.attn.k_k / k_a           (C,)
    att.r_k                     model.layers.i.attn.r_k                 (H,N)
    att.receptance/key/value/output  model.layers.i.attn.{r,k,v,o}_proj.weight
    att.ln_x                    model.layers.i.attn.g_norm
    ffn.x_k                     model.layers.i.ffn.x_k                  (C,)
    ffn.key / ffn.value         model.layers.i.ffn.key / value
    ln_out / head               model.norm / lm_head
Layer 0 has no v_lora (it defines v_first). The group norm eps of HF is head_dim x norm_eps
(64e-5 for the usual head size 64, as BlinkDL's).

Import (`load_hf_folder`) reads config.json (model_type "rwkv7" / RWKV7ForCausalLM) and
model.safetensors (or the shards of model.safetensors.index.json), maps every tensor back and
checks it like a .pth (rwkvforge.checkpoint.validate_state_dict / conform_state_dict): names
or shapes that do not fit raise CheckpointError with the tensor and the fix.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from rwkvforge.checkpoint import (
    CheckpointError,
    atomic_dir,
    conform_state_dict,
    infer_config,
    validate_state_dict,
)

HF_ARCHITECTURES = ("RWKV7ForCausalLM", "Rwkv7ForCausalLM")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
         "ln_x": "g_norm"}
_LN = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
_LORA_SLOT = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}


def hf_name(name: str) -> tuple[str | None, bool]:
    """(HF name, transposed) of a BlinkDL tensor name; (None, False) for layer 0's unused
    v0/v1/v2."""
    top = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
           "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}
    if name in top:
        return top[name], False
    m = re.fullmatch(r"blocks\.(\d+)\.(att|ffn|ln0|ln1|ln2)\.(.+)", name)
    if not m:
        raise CheckpointError(f"tensor {name!r} has no place in the HF RWKV-7 layout.")
    i, part, rest = m.groups()
    if part in _LN:
        return f"model.layers.{i}.{_LN[part]}.{rest}", False
    if part == "ffn":
        return f"model.layers.{i}.ffn.{rest}", False
    lm = re.fullmatch(r"([wvag])([012])", rest)
    if lm:
        if i == "0" and lm.group(1) == "v":
            return None, False
        return f"model.layers.{i}.attn.{lm.group(1)}_lora.{_LORA_SLOT[lm.group(2)]}", lm.group(2) != "0"
    head, _, tail = rest.partition(".")
    if head in _PROJ:
        return f"model.layers.{i}.attn.{_PROJ[head]}.{tail}", False
    return f"model.layers.{i}.attn.{rest}", False


def _hf_shape(name: str, t: torch.Tensor) -> torch.Tensor:
    """The shapes the HF modules hold: 1-D for k_k / k_a / ffn.x_k / LoRA biases."""
    if name.endswith((".attn.k_k", ".attn.k_a", ".ffn.x_k", ".lora.2.bias")):
        return t.reshape(-1)
    return t


def to_hf_state_dict(sd: dict[str, torch.Tensor], dtype: torch.dtype | None = None
                     ) -> dict[str, torch.Tensor]:
    """The BlinkDL state dict in HF names and shapes (`dtype`: cast, or keep each tensor's)."""
    out = {}
    for k, v in sd.items():
        name, transposed = hf_name(k)
        if name is None:
            continue
        t = v.detach()
        t = t.t() if transposed else t
        t = _hf_shape(name, t)
        out[name] = (t.to(dtype) if dtype is not None else t).contiguous().clone()
    return out


def blinkdl_name(name: str) -> tuple[str, bool]:
    """(BlinkDL name, transposed) of an HF tensor name; CheckpointError when unknown."""
    top = {"model.embeddings.weight": "emb.weight", "model.norm.weight": "ln_out.weight",
           "model.norm.bias": "ln_out.bias", "lm_head.weight": "head.weight"}
    if name in top:
        return top[name], False
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", name)
    if not m:
        raise CheckpointError(f"HF tensor {name!r} is not part of an RWKV-7 model.")
    i, part, rest = m.groups()
    inv_ln = {v: k for k, v in _LN.items()}
    if part in inv_ln:
        return f"blocks.{i}.{inv_ln[part]}.{rest}", False
    if part == "ffn":
        return f"blocks.{i}.ffn.{rest}", False
    if part != "attn":
        raise CheckpointError(f"HF tensor {name!r} is not part of an RWKV-7 model.")
    lm = re.fullmatch(r"([wvag])_lora\.(lora\.2\.bias|lora\.0\.weight|lora\.2\.weight)", rest)
    if lm:
        slot = {v: k for k, v in _LORA_SLOT.items()}[lm.group(2)]
        return f"blocks.{i}.att.{lm.group(1)}{slot}", slot != "0"
    head, _, tail = rest.partition(".")
    inv_proj = {v: k for k, v in _PROJ.items()}
    if head in inv_proj:
        return f"blocks.{i}.att.{inv_proj[head]}.{tail}", False
    return f"blocks.{i}.att.{rest}", False


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], source: str = "HF folder"
                       ) -> dict[str, torch.Tensor]:
    """HF names and shapes back to a validated BlinkDL state dict (vectors as (1,1,C))."""
    sd = {}
    for k, v in hf_sd.items():
        name, transposed = blinkdl_name(k)
        sd[name] = v.t().contiguous() if transposed else v
    sd = validate_state_dict(sd, source=source)
    return conform_state_dict(sd, infer_config(sd), source=source)


def hf_config(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict:
    """config.json of the HF folder: the fla-hub / rwkv7-hf RWKV7Config fields."""
    cfg = infer_config(sd)
    return {
        "architectures": ["RWKV7ForCausalLM"],
        "model_type": "rwkv7",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.n_embd,
        "num_hidden_layers": cfg.n_layer,
        "num_heads": cfg.n_head,
        "head_dim": cfg.head_size,
        "attention_hidden_size": cfg.n_embd,
        "intermediate_size": cfg.dim_ffn,
        "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
        "value_dim": [cfg.n_embd] * cfg.n_layer,
        "decay_low_rank_dim": cfg.d_decay,
        "a_low_rank_dim": cfg.d_aaa,
        "v_low_rank_dim": cfg.d_mv,
        "gate_low_rank_dim": cfg.d_gate,
        "norm_eps": 1e-5,
        "norm_bias": True,
        "norm_first": True,
        "hidden_act": "sqrelu",
        "fuse_norm": False,
        "tie_word_embeddings": False,
        "use_cache": True,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "torch_dtype": str(dtype).replace("torch.", ""),
    }


def write_hf_folder(sd: dict[str, torch.Tensor], out: str | os.PathLike, dtype: torch.dtype,
                    metadata: dict[str, str] | None = None) -> Path:
    """Write the HF folder atomically (built under <out>.tmp, renamed): config.json,
    generation_config.json, model.safetensors, the World vocabulary and tokenizer_config.json
    (with the World chat template)."""
    from safetensors.torch import save_file

    from rwkvforge.gguf_file import CHAT_TEMPLATE
    from rwkvforge.tokenizer import VOCAB_NAME, vocab_path

    out = Path(out)
    with atomic_dir(out) as d:
        (d / "config.json").write_text(json.dumps(hf_config(sd, dtype), indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 0, "eos_token_id": [0, 261], "pad_token_id": 0}, indent=2) + "\n")
        save_file(to_hf_state_dict(sd, dtype), str(d / WEIGHTS),
                  metadata={"format": "pt", **(metadata or {})})
        shutil.copyfile(vocab_path(), d / f"{VOCAB_NAME}.txt")
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "RWKV7Tokenizer", "model_vocab_size": int(sd["emb.weight"].shape[0]),
            "pad_token": "<|padding|>", "eos_token": "<|endoftext|>", "errors": "replace",
            "chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(
            {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>"}, indent=2) + "\n")
    return out


# ------------------------------------------------------------------------------------ import
def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_hf_folder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An HF RWKV-7 folder as a validated BlinkDL state dict (tensors in the file's dtype)."""
    from safetensors.torch import load_file

    p = Path(path)
    try:
        cfg = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}/config.json: cannot be read ({e}).") from e
    arch = cfg.get("architectures") or []
    if cfg.get("model_type") != "rwkv7" and not set(arch) & set(HF_ARCHITECTURES):
        raise CheckpointError(
            f"{p}: config.json says model_type={cfg.get('model_type')!r}, architectures={arch}: "
            "not an RWKV-7 model in the HF layout (fla-hub RWKV7ForCausalLM). rwkvforge imports "
            "only RWKV-7; give a BlinkDL .pth or an fla-hub rwkv7 folder.")
    if (p / INDEX).is_file():
        shards = sorted(set(json.loads((p / INDEX).read_text())["weight_map"].values()))
        files = [p / s for s in shards]
    elif (p / WEIGHTS).is_file():
        files = [p / WEIGHTS]
    else:
        found = sorted(x.name for x in p.iterdir())[:8]
        raise CheckpointError(f"{p}: no {WEIGHTS} (or {INDEX}) in the folder (found: "
                              f"{', '.join(found) or 'nothing'}). Only safetensors weights are "
                              "read; convert .bin shards with transformers' save_pretrained.")
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard named in {INDEX} is missing; download it again.")
        try:
            hf_sd.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot be read as safetensors ({e}); the file may be "
                                  "truncated: download it again.") from e
    sd = from_hf_state_dict(hf_sd, source=str(p))
    mine = infer_config(sd)
    for key, want in (("hidden_size", mine.n_embd), ("num_hidden_layers", mine.n_layer),
                      ("vocab_size", mine.vocab_size)):
        if key in cfg and int(cfg[key]) != want:
            raise CheckpointError(f"{p}: config.json {key}={cfg[key]} but the weights have {want}; "
                                  "the folder mixes two models.")
    return sd

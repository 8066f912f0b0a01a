"""The Hugging Face RWKV-7 layout (fla-hub `RWKV7ForCausalLM`): BlinkDL state dict <-> HF
folder, both ways.

    from rwkvforge.hf import write_hf_folder            # the reader: checkpoint.load_state_dict
    write_hf_folder(sd, "out/my-model-hf", torch.bfloat16)
    sd = checkpoint.load_state_dict("out/my-model-hf")   # back to BlinkDL names and shapes

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

Import (`checkpoint.load_hf_folder`, which every model load goes through) reads config.json (model_type "rwkv7" / RWKV7ForCausalLM) and
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

from rwkvforge.checkpoint import (HF_LN, HF_LORA_SLOT, HF_PROJ, HF_TOP, HF_WEIGHTS,
                                  CheckpointError, atomic_dir, infer_config)
from rwkvforge.gguf_file import CHAT_TEMPLATE
from rwkvforge.tokenizer import VOCAB_NAME, vocab_path

def hf_name(name: str) -> tuple[str | None, bool]:
    """(HF name, transposed) of a BlinkDL tensor name; (None, False) for layer 0's unused
    v0/v1/v2."""
    if name in HF_TOP:
        return HF_TOP[name], False
    m = re.fullmatch(r"blocks\.(\d+)\.(att|ffn|ln0|ln1|ln2)\.(.+)", name)
    if not m:
        raise CheckpointError(f"tensor {name!r} has no place in the HF RWKV-7 layout.")
    i, part, rest = m.groups()
    if part in HF_LN:
        return f"model.layers.{i}.{HF_LN[part]}.{rest}", False
    if part == "ffn":
        return f"model.layers.{i}.ffn.{rest}", False
    lm = re.fullmatch(r"([wvag])([012])", rest)
    if lm:
        if i == "0" and lm.group(1) == "v":
            return None, False
        return f"model.layers.{i}.attn.{lm.group(1)}_lora.{HF_LORA_SLOT[lm.group(2)]}", lm.group(2) != "0"
    head, _, tail = rest.partition(".")
    if head in HF_PROJ:
        return f"model.layers.{i}.attn.{HF_PROJ[head]}.{tail}", False
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

    out = Path(out)
    with atomic_dir(out) as d:
        (d / "config.json").write_text(json.dumps(hf_config(sd, dtype), indent=2) + "\n")
        (d / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 0, "eos_token_id": [0, 261], "pad_token_id": 0}, indent=2) + "\n")
        save_file(to_hf_state_dict(sd, dtype), str(d / HF_WEIGHTS),
                  metadata={"format": "pt", **(metadata or {})})
        shutil.copyfile(vocab_path(), d / f"{VOCAB_NAME}.txt")
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "RWKV7Tokenizer", "model_vocab_size": int(sd["emb.weight"].shape[0]),
            "pad_token": "<|padding|>", "eos_token": "<|endoftext|>", "errors": "replace",
            "chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False) + "\n")
        (d / "special_tokens_map.json").write_text(json.dumps(
            {"pad_token": "<|padding|>", "eos_token": "<|endoftext|>"}, indent=2) + "\n")
    return out



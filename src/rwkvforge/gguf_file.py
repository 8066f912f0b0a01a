"""RWKV-7 as GGUF, the file llama.cpp, Ollama and LM Studio load, and the llama.cpp runtime
that checks it.

    from rwkvforge.gguf_file import write_gguf, read_gguf_state_dict
    write_gguf(sd, "out/model-f16.gguf", "f16")          # sd: a BlinkDL state dict

Tensor names, shapes and dtypes follow llama.cpp's own converter for RWKV-7
(`conversion/rwkv.py` `Rwkv7Model` and `conversion/base.py` `prepare_tensors`,
`_set_vocab_rwkv_world` in the llama.cpp bundled with llama-cpp-python 0.3.36) and the `gguf`
package's `MODEL_ARCH.RWKV7` tensor list (gguf 0.19.0); llama.cpp's loader
(`src/models/rwkv7.cpp`) states the shapes it expects:

    BlinkDL .pth                  GGUF                              change
    emb.weight                    token_embd.weight
    blocks.0.ln0.{weight,bias}    token_embd_norm.{weight,bias}
    blocks.i.ln1 / ln2            blk.i.attn_norm / attn_norm_2
    att.x_r,x_w,x_k,x_v,x_a,x_g   blk.i.time_mix_lerp_fused.weight  stacked (6,1,1,C)
    att.w0 / a0 / v0              blk.i.time_mix_{w0,a0,v0}.weight  squeezed to (C,)
    att.w1,w2 a1,a2 v1,v2 g1,g2   blk.i.time_mix_{..}.weight        transposed (x @ W in BlinkDL,
                                                                     W^T x in ggml_mul_mat)
    att.k_k / k_a                 blk.i.time_mix_{k_k,k_a}.weight   (C,)
    att.r_k (H,N)                 blk.i.time_mix_r_k.weight          flattened (C,)
    att.receptance/key/value/output  blk.i.time_mix_{receptance,key,value,output}.weight
    att.ln_x.{weight,bias}        blk.i.time_mix_ln.{weight,bias}
    ffn.x_k                       blk.i.channel_mix_lerp_k.weight   (C,)
    ffn.key / ffn.value           blk.i.channel_mix_{key,value}.weight
    ln_out.{weight,bias}          output_norm.{weight,bias}
    head.weight                   output.weight
  Layer 0 has no v0/v1/v2 in BlinkDL files; llama.cpp requires them (unused): like the
  converter, a0/a1/a2 are written in their place.

Dtypes (the converter's rules): 1-D tensors, norms, time_mix_w1/w2 and the fused lerp stay F32;
every other matrix takes the file type (F16, BF16 or Q8_0; a Q8_0 matrix whose rows are not a
multiple of 32 falls back to F16).
Metadata: general.architecture rwkv7, context 1048576 (RWKV has no context limit), embedding /
block / feed-forward sizes, layer-norm eps, wkv head size, the four LoRA ranks, head_count 0
(required, unused), tokenizer.ggml.model "rwkv" with the World vocabulary as llama.cpp's
converter writes it (id 0 "<s>" CONTROL, ids 1.. the escaped token text, unused ids
"[PAD<i>]" UNUSED), bos = eos = 0, eot = 261 ("\\n\\n", the end of a World turn) and a World
chat template that llama.cpp recognises as its built-in "rwkv-world".

The runtime: llama-cpp-python, built from source once into its own venv under the user's cache
(`llama_cpp_venv()`, made by scripts/llama_cpp_venv.sh); `run_llama_cpp` runs a prompt and a
greedy continuation there in a subprocess (that venv has no torch and no rwkvforge).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from rwkvforge.tokenizer import token_table
from rwkvforge.checkpoint import CheckpointError, atomic_output, infer_config

GGUF_TYPES = ("f16", "bf16", "q8_0", "f32")
LLAMA_CPP_VERSION = "0.3.36"
CONTEXT_LENGTH = 1048576
EOT_ID = 261  # "\n\n": the end of a World chat turn
LERP_ORDER = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")  # time_mix_lerp_fused rows
_LORA = ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2")
_F32_FORCED = ("time_mix_w1.weight", "time_mix_w2.weight", "time_mix_lerp_fused.weight")

# A World chat template. It contains the exact line llama.cpp's chat code looks for to pick its
# built-in "rwkv-world" format (src/llama-chat.cpp), so llama.cpp, llama-cpp-python and LM
# Studio format chats the way RWKV World / G1 models were trained (rwkvforge.tokenizer).
CHAT_TEMPLATE = (
    "{%- if not add_generation_prompt is defined -%}{%- set add_generation_prompt = true -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}"
    "{{- 'System: ' + message['content']|trim + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}\n"
    "        {{- 'User: ' + message['content']|trim + '\\n\\n' -}}\n"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none -%}"
    "{{- 'Assistant: ' + message['content']|trim + '\\n\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


class GGUFError(CheckpointError):
    """A model that cannot be written as, or read from, GGUF (the message says why)."""


# ---- names ---------------------------------------------------------------------------------------
def gguf_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The BlinkDL state dict as llama.cpp's RWKV-7 tensors (fp32, GGUF names and shapes in
    numpy / PyTorch order; ggml's ne order is the reverse)."""
    cfg = infer_config(sd)
    C = cfg.n_embd
    out: dict[str, torch.Tensor] = {}

    def f(k: str) -> torch.Tensor:
        return sd[k].detach().float()

    out["token_embd.weight"] = f("emb.weight")
    out["token_embd_norm.weight"] = f("blocks.0.ln0.weight").reshape(C)
    out["token_embd_norm.bias"] = f("blocks.0.ln0.bias").reshape(C)
    for i in range(cfg.n_layer):
        b, a, p = f"blocks.{i}.", f"blocks.{i}.att.", f"blk.{i}."
        out[p + "attn_norm.weight"] = f(b + "ln1.weight")
        out[p + "attn_norm.bias"] = f(b + "ln1.bias")
        out[p + "attn_norm_2.weight"] = f(b + "ln2.weight")
        out[p + "attn_norm_2.bias"] = f(b + "ln2.bias")
        out[p + "time_mix_lerp_fused.weight"] = torch.stack(
            [f(a + n).reshape(C) for n in LERP_ORDER]).reshape(len(LERP_ORDER), 1, 1, C)
        src = {n: n for n in ("w0", "a0", "v0", *_LORA)}
        if i == 0:  # llama.cpp loads (and ignores) v0/v1/v2 on layer 0: a0/a1/a2 stand in
            src.update(v0="a0", v1="a1", v2="a2")
        for n, s in src.items():
            t = f(a + s)
            out[p + f"time_mix_{n}.weight"] = t.reshape(C) if n.endswith("0") else t.t().contiguous()
        out[p + "time_mix_k_k.weight"] = f(a + "k_k").reshape(C)
        out[p + "time_mix_k_a.weight"] = f(a + "k_a").reshape(C)
        out[p + "time_mix_r_k.weight"] = f(a + "r_k").reshape(C)
        for n in ("receptance", "key", "value", "output"):
            out[p + f"time_mix_{n}.weight"] = f(a + f"{n}.weight")
        out[p + "time_mix_ln.weight"] = f(a + "ln_x.weight")
        out[p + "time_mix_ln.bias"] = f(a + "ln_x.bias")
        out[p + "channel_mix_lerp_k.weight"] = f(b + "ffn.x_k").reshape(C)
        out[p + "channel_mix_key.weight"] = f(b + "ffn.key.weight")
        out[p + "channel_mix_value.weight"] = f(b + "ffn.value.weight")
    out["output_norm.weight"] = f("ln_out.weight")
    out["output_norm.bias"] = f("ln_out.bias")
    out["output.weight"] = f("head.weight")
    return out


def state_dict_from_gguf_tensors(t: dict[str, torch.Tensor], head_size: int) -> dict[str, torch.Tensor]:
    """The inverse of `gguf_tensors` (fp32 BlinkDL state dict; layer 0's stand-in v0/v1/v2
    dropped). Used to check a written file and to run our model on exactly its weights."""
    C = t["token_embd.weight"].shape[1]
    n_layer = 1 + max(int(m.group(1)) for k in t if (m := re.match(r"blk\.(\d+)\.", k)))
    sd = {"emb.weight": t["token_embd.weight"],
          "blocks.0.ln0.weight": t["token_embd_norm.weight"],
          "blocks.0.ln0.bias": t["token_embd_norm.bias"]}
    for i in range(n_layer):
        b, a, p = f"blocks.{i}.", f"blocks.{i}.att.", f"blk.{i}."
        sd[b + "ln1.weight"], sd[b + "ln1.bias"] = t[p + "attn_norm.weight"], t[p + "attn_norm.bias"]
        sd[b + "ln2.weight"], sd[b + "ln2.bias"] = t[p + "attn_norm_2.weight"], t[p + "attn_norm_2.bias"]
        fused = t[p + "time_mix_lerp_fused.weight"].reshape(len(LERP_ORDER), C)
        for j, n in enumerate(LERP_ORDER):
            sd[a + n] = fused[j].reshape(1, 1, C)
        for n in ("w0", "a0", "v0", *_LORA):
            if i == 0 and n[0] == "v":
                continue
            x = t[p + f"time_mix_{n}.weight"]
            sd[a + n] = x.reshape(1, 1, C) if n.endswith("0") else x.t().contiguous()
        sd[a + "k_k"] = t[p + "time_mix_k_k.weight"].reshape(1, 1, C)
        sd[a + "k_a"] = t[p + "time_mix_k_a.weight"].reshape(1, 1, C)
        sd[a + "r_k"] = t[p + "time_mix_r_k.weight"].reshape(-1, head_size)
        for n in ("receptance", "key", "value", "output"):
            sd[a + f"{n}.weight"] = t[p + f"time_mix_{n}.weight"]
        sd[a + "ln_x.weight"], sd[a + "ln_x.bias"] = t[p + "time_mix_ln.weight"], t[p + "time_mix_ln.bias"]
        sd[b + "ffn.x_k"] = t[p + "channel_mix_lerp_k.weight"].reshape(1, 1, C)
        sd[b + "ffn.key.weight"] = t[p + "channel_mix_key.weight"]
        sd[b + "ffn.value.weight"] = t[p + "channel_mix_value.weight"]
    sd["ln_out.weight"], sd["ln_out.bias"] = t["output_norm.weight"], t["output_norm.bias"]
    sd["head.weight"] = t["output.weight"]
    return sd


def blinkdl_to_gguf_name(key: str) -> str:
    """The GGUF tensor a BlinkDL tensor is stored in (the fused lerp for att.x_*)."""
    top = {"emb.weight": "token_embd.weight", "ln_out.weight": "output_norm.weight",
           "ln_out.bias": "output_norm.bias", "head.weight": "output.weight",
           "blocks.0.ln0.weight": "token_embd_norm.weight", "blocks.0.ln0.bias": "token_embd_norm.bias"}
    if key in top:
        return top[key]
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if not m:
        raise GGUFError(f"{key}: not an RWKV-7 tensor name")
    i, rest = m.groups()
    table = {"ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
             "ln2.weight": "attn_norm_2.weight", "ln2.bias": "attn_norm_2.bias",
             "att.ln_x.weight": "time_mix_ln.weight", "att.ln_x.bias": "time_mix_ln.bias",
             "ffn.x_k": "channel_mix_lerp_k.weight", "ffn.key.weight": "channel_mix_key.weight",
             "ffn.value.weight": "channel_mix_value.weight"}
    if rest in table:
        return f"blk.{i}.{table[rest]}"
    if rest in {f"att.{n}" for n in LERP_ORDER}:
        return f"blk.{i}.time_mix_lerp_fused.weight"
    n = rest.removeprefix("att.").removesuffix(".weight")
    return f"blk.{i}.time_mix_{n}.weight"


def tensor_qtype(name: str, shape: tuple[int, ...], file_type: str):
    """The GGML type llama.cpp's converter gives tensor `name` in a file of `file_type`."""
    import gguf

    Q = gguf.GGMLQuantizationType
    if len(shape) <= 1 or name.endswith("_norm.weight") or name.endswith(_F32_FORCED) \
            or not name.endswith(".weight") or file_type == "f32":
        return Q.F32
    if file_type == "q8_0" and shape[-1] % 32:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[file_type]


# ---- vocab ---------------------------------------------------------------------------------------
def world_vocab(vocab_size: int) -> tuple[list[bytes], list[int]]:
    """The World vocabulary as llama.cpp's converter lists it (`_set_vocab_rwkv_world`):
    id 0 "<s>" (CONTROL), ids 1.. the token bytes escaped the way Python's repr() writes them
    (llama.cpp un-escapes them when it builds its trie), unused ids "[PAD<i>]" (UNUSED)."""
    import gguf

    table = token_table()
    if vocab_size < len([t for t in table if t]) + 1:
        raise GGUFError(f"the model's vocabulary has {vocab_size} rows; the World tokenizer "
                        f"needs {len(table)}: this is not a World-vocabulary model.")
    tokens, types = [b"<s>"], [int(gguf.TokenType.CONTROL)]
    for i in range(1, vocab_size):
        tok = table[i] if i < len(table) else b""
        if tok:
            tokens.append(repr(tok)[2:-1].encode("utf-8"))
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[PAD{i}]".encode())
            types.append(int(gguf.TokenType.UNUSED))
    return tokens, types


# ---- write ---------------------------------------------------------------------------------------
def write_gguf(sd: dict[str, torch.Tensor], path: str | os.PathLike, file_type: str = "f16",
               name: str = "rwkvforge model", progress: bool = False) -> dict:
    """Write `sd` (BlinkDL RWKV-7) as an RWKV-7 GGUF of `file_type`, atomically. Returns a
    summary: tensor count, qtypes used, bytes."""
    import gguf

    if file_type not in GGUF_TYPES:
        raise GGUFError(f"GGUF type {file_type!r}: choose one of {', '.join(GGUF_TYPES)}.")
    cfg = infer_config(sd)
    tensors = gguf_tensors(sd)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[file_type]
    tokens, types = world_vocab(cfg.vocab_size)
    used: dict[str, int] = {}
    path = Path(path)
    with atomic_output(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.RWKV7])
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(name)
        w.add_context_length(CONTEXT_LENGTH)
        w.add_embedding_length(cfg.n_embd)
        w.add_block_count(cfg.n_layer)
        w.add_layer_norm_eps(1e-5)
        w.add_wkv_head_size(cfg.head_size)
        w.add_decay_lora_rank(cfg.d_decay)
        w.add_iclr_lora_rank(cfg.d_aaa)
        w.add_value_residual_mix_lora_rank(cfg.d_mv)
        w.add_gate_lora_rank(cfg.d_gate)
        w.add_feed_forward_length(cfg.dim_ffn)
        w.add_file_type(ftype)
        w.add_head_count(0)  # required by llama.cpp, unused
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_tokenizer_model("rwkv")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_bos_token_id(0)
        w.add_eos_token_id(0)
        w.add_eot_token_id(EOT_ID)
        w.add_chat_template(CHAT_TEMPLATE)
        for k, v in tensors.items():
            data = v.numpy().astype(np.float32)
            q = tensor_qtype(k, data.shape, file_type)
            data = gguf.quants.quantize(data, q)
            used[q.name] = used.get(q.name, 0) + 1
            w.add_tensor(k, data, raw_dtype=q)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file(progress=progress)
        w.close()
    return {"tensors": len(tensors), "qtypes": used, "bytes": path.stat().st_size}


# ---- read ----------------------------------------------------------------------------------------
def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(metadata, tensors dequantised to fp32 in numpy order, tensor -> GGML type name)."""
    import gguf

    try:
        r = gguf.GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - anything here means "not a readable GGUF"
        raise GGUFError(f"{path}: cannot be read as GGUF ({type(e).__name__}: {e}).") from e
    meta = {}
    for k, fld in r.fields.items():
        if k.startswith("tokenizer.ggml.tokens") or k.startswith("tokenizer.ggml.token_type"):
            meta[k] = len(fld.data)
            continue
        try:
            meta[k] = fld.contents()
        except Exception:  # noqa: BLE001
            meta[k] = None
    tensors, qtypes = {}, {}
    for t in r.tensors:
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        arr = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        tensors[t.name] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
        qtypes[t.name] = t.tensor_type.name
    return meta, tensors, qtypes


def read_gguf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An RWKV-7 GGUF's weights (dequantised, fp32) as a BlinkDL state dict."""
    meta, tensors, _ = read_gguf(path)
    if meta.get("general.architecture") != "rwkv7":
        raise GGUFError(f"{path}: general.architecture is {meta.get('general.architecture')!r}, "
                        "not rwkv7.")
    return state_dict_from_gguf_tensors(tensors, int(meta["rwkv7.wkv.head_size"]))


# ---- runtime -------------------------------------------------------------------------------------
def cache_dir() -> Path:
    """The user's cache folder for rwkvforge (XDG_CACHE_HOME or ~/.cache)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rwkvforge"


def llama_cpp_venv() -> Path:
    """Where scripts/llama_cpp_venv.sh builds llama-cpp-python (RWKVFORGE_LLAMA_CPP_VENV overrides)."""
    env = os.environ.get("RWKVFORGE_LLAMA_CPP_VENV")
    return Path(env) if env else cache_dir() / f"llama-cpp-{LLAMA_CPP_VERSION}-venv"


def llama_cpp_python() -> Path | None:
    """The python of the llama-cpp-python venv, or None when it is not built (or broken)."""
    py = llama_cpp_venv() / "bin" / "python"
    if not py.is_file() or not (llama_cpp_venv() / ".complete").is_file():
        return None
    return py


_RUNNER = r'''
import json, sys
import numpy as np
from llama_cpp import Llama, __version__
args = json.loads(sys.argv[1])
llm = Llama(model_path=args["model"], n_ctx=args["n_ctx"], logits_all=True, verbose=False,
            n_threads=args["threads"], n_batch=args["n_ctx"], seed=0)
tok = llm.tokenize(args["prompt"].encode("utf-8"), add_bos=False, special=False)
ids = list(args["ids"])
llm.reset()
llm.eval(ids)
prompt_logits = np.array(llm.scores[: len(ids)], dtype=np.float32)
gen, gen_logits = [], []
last = prompt_logits[-1]
for _ in range(args["n_new"]):
    t = int(np.argmax(last))
    gen.append(t)
    gen_logits.append(last.copy())
    llm.eval([t])
    last = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
np.save(args["out"] + "/prompt_logits.npy", prompt_logits)
np.save(args["out"] + "/gen_logits.npy", np.array(gen_logits, dtype=np.float32))
meta = llm.metadata
json.dump({"version": __version__, "prompt_tokens": tok, "greedy": gen,
           "arch": meta.get("general.architecture"), "tokenizer": meta.get("tokenizer.ggml.model"),
           "n_vocab": llm.n_vocab(), "eot": meta.get("tokenizer.ggml.eot_token_id")},
          open(args["out"] + "/result.json", "w"))
'''


class RuntimeMissing(RuntimeError):
    """The llama.cpp runtime venv is not built (the message says how to build it)."""


def run_llama_cpp(model: str | os.PathLike, prompt: str, ids: list[int], n_new: int,
                  timeout: float = 600) -> dict:
    """Run `model` in llama.cpp (llama-cpp-python, in its own venv): llama.cpp's tokenization
    of `prompt`, the logits of `ids` (one row per position) and a greedy continuation of
    `n_new` tokens (with the logits each one was picked from)."""
    py = llama_cpp_python()
    if py is None:
        raise RuntimeMissing(
            f"llama-cpp-python {LLAMA_CPP_VERSION} is not built at {llama_cpp_venv()}: run "
            "./scripts/llama_cpp_venv.sh (needs cmake and a C++ compiler; ~6 min on 2 cores).")
    with tempfile.TemporaryDirectory(prefix="rwkvforge-llama-") as d:
        args = {"model": str(Path(model).resolve()), "prompt": prompt, "ids": [int(i) for i in ids],
                "n_new": int(n_new), "n_ctx": max(64, len(ids) + n_new + 8), "out": d,
                "threads": max(1, min(4, os.cpu_count() or 1))}
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        p = subprocess.run([str(py), "-c", _RUNNER, json.dumps(args)], capture_output=True,
                           text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            raise RuntimeError(f"llama.cpp could not run {model} (exit {p.returncode}):\n"
                               f"{p.stderr[-3000:]}")
        res = json.loads(Path(d, "result.json").read_text())
        res["prompt_logits"] = torch.from_numpy(np.load(Path(d, "prompt_logits.npy")))
        res["gen_logits"] = torch.from_numpy(np.load(Path(d, "gen_logits.npy")))
    return res


def _main_selftest() -> int:  # pragma: no cover - debugging aid
    print(llama_cpp_venv(), llama_cpp_python())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main_selftest())

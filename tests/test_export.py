"""The export stage: GGUF (names / types / metadata against the gguf package's RWKV-7 constants,
and, slow, llama.cpp itself: greedy equality in f16, a logit tolerance in q8_0), the Hugging
Face layout (round trip to the same tensors, an HF folder as BASE_MODEL, and the rwkv7-hf
package's pure-PyTorch model on the folder), ai00 (web-rwkv's converter layout), bad input.

Model shape L3 C192 (head 64, 3 heads): no other test uses it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvforge import export as E
from rwkvforge import gguf_file as G
from rwkvforge import hf

LAYERS, EMBD, SEED = 3, 192, 11
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sd():
    from rwkvforge.demo import make_random_model_sd

    return make_random_model_sd(LAYERS, EMBD, seed=SEED)


@pytest.fixture(scope="module")
def base_path(sd, tmp_path_factory):
    from rwkvforge.checkpoint import save_pth

    p = tmp_path_factory.mktemp("exp") / "base.pth"
    save_pth(sd, p)
    return p


# ----------------------------------------------------------------------------- GGUF, no runtime
def test_gguf_tensor_names_and_metadata_follow_llama_cpp(sd, tmp_path):
    import gguf

    out = tmp_path / "m.gguf"
    G.write_gguf(sd, out, "f16")
    meta, tensors, qtypes = G.read_gguf(out)
    # every name is one of gguf's MODEL_ARCH.RWKV7 tensors, and every per-layer one is there
    allowed = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.RWKV7]}
    bases = {n.rsplit(".", 1)[0] for n in tensors}
    want = {a.format(bid=i) for a in allowed for i in range(LAYERS)}
    assert bases == want
    assert meta["general.architecture"] == "rwkv7"
    assert meta["tokenizer.ggml.model"] == "rwkv"
    assert meta["rwkv7.block_count"] == LAYERS and meta["rwkv7.embedding_length"] == EMBD
    assert meta["rwkv7.wkv.head_size"] == 64 and meta["rwkv7.attention.head_count"] == 0
    assert meta["rwkv7.feed_forward_length"] == 4 * EMBD
    assert meta["tokenizer.ggml.eot_token_id"] == 261 and meta["tokenizer.ggml.bos_token_id"] == 0
    assert meta["tokenizer.ggml.tokens"] == 65536
    # shapes llama.cpp's loader asks for (numpy order = reversed ggml ne)
    C, D = EMBD, sd["blocks.0.att.w1"].shape[1]
    assert tuple(tensors["blk.1.time_mix_w1.weight"].shape) == (D, C)
    assert tuple(tensors["blk.1.time_mix_lerp_fused.weight"].shape) == (6, 1, 1, C)
    assert tuple(tensors["blk.0.time_mix_v1.weight"].shape) == tuple(tensors["blk.0.time_mix_a1.weight"].shape)
    # the converter's dtype rules
    assert qtypes["blk.0.time_mix_key.weight"] == "F16"
    assert qtypes["blk.0.time_mix_w1.weight"] == "F32"
    assert qtypes["blk.0.time_mix_lerp_fused.weight"] == "F32"
    assert qtypes["token_embd_norm.weight"] == "F32" and qtypes["blk.0.time_mix_r_k.weight"] == "F32"
    # and it reads back to our tensors (f16-rounded where stored as F16)
    back = G.read_gguf_state_dict(out)
    for k, v in back.items():
        exp = sd[k].float()
        if qtypes[G.blinkdl_to_gguf_name(k)] == "F16":
            exp = exp.half().float()
        assert torch.equal(v, exp), k


def test_gguf_world_vocab_escapes_like_llama_cpp():
    vocab, types = G.world_vocab(65536)
    from rwkvforge.tokenizer import token_table

    t = token_table()
    assert vocab[0] == b"<s>" and vocab[65535] == b"[PAD65535]"
    nl = t.index(b"\n\n")
    assert nl == 261 and vocab[nl] == b"\\n\\n"
    hi = next(i for i, b in enumerate(t) if b and b[0] >= 0x80 and len(b) == 1)
    assert vocab[hi] == f"\\x{t[hi][0]:02x}".encode()


@pytest.mark.parametrize("ft,qt", [("q8_0", "Q8_0"), ("bf16", "BF16")])
def test_gguf_other_types(sd, tmp_path, ft, qt):
    out = tmp_path / f"m-{ft}.gguf"
    s = G.write_gguf(sd, out, ft)
    assert s["qtypes"][qt] == 38 and s["qtypes"]["F32"] == 52
    back = G.read_gguf_state_dict(out)
    w = sd["blocks.2.att.key.weight"]
    err = float((back["blocks.2.att.key.weight"] - w).abs().max())
    assert 0 < err <= float(w.abs().max()) / (127 if ft == "q8_0" else 128)


def test_cli_gguf_writes_model_modelfile_and_report(base_path, tmp_path):
    out = tmp_path / "x.gguf"
    r = _cli("--format", "gguf", "--base-model", str(base_path), "--out", str(out), "--verify", "off")
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "x.gguf.verify.json").read_text())
    assert rep["passed"] and rep["checks"]["llama_cpp"]["skipped"]
    assert 0 < rep["checks"]["rounding_effect"]["max_abs_logit_diff_file_vs_fp32_source"] < 0.05
    mf = (tmp_path / "x.Modelfile").read_text()
    assert "FROM ./x.gguf" in mf and "Assistant:" in mf and 'PARAMETER stop "User:"' in mf
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def _cli(*args, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rwkvforge", "export", *args],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.mark.parametrize("args,msg", [
    (["--format", "gguf", "--dtype", "q4_0"], "--dtype q4_0 is not available for --format gguf"),
    (["--format", "hf", "--dtype", "q8_0"], "--dtype q8_0 is not available for --format hf"),
    (["--format", "gguf", "--state", "s.pth"], "export it with --format ai00"),
    (["--format", "gguf", "--out", "x.bin", "--verify", "off"], "must end in .gguf"),
])
def test_cli_refuses_bad_input(base_path, tmp_path, args, msg):
    r = _cli("--base-model", str(base_path), *args)
    assert r.returncode == 1 and msg in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_cli_missing_base_model(tmp_path):
    r = _cli("--format", "ai00", "--base-model", str(tmp_path / "nope.pth"))
    assert r.returncode == 1 and "not found" in r.stderr


# ----------------------------------------------------------------------------- ai00
def test_ai00_layout_is_web_rwkv_converters(sd, base_path, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "m.st"
    rep = E.export("ai00", base_path, out=out, log=lambda m: None)
    assert rep["checks"]["dtypes"] == ["float16"]
    with safe_open(str(out), "pt") as f:
        keys = set(f.keys())
        assert keys == set(sd)  # BlinkDL names (already lower case), layer 0 as in the .pth
        assert f.metadata() == {"format": "pt"}
        for k in keys:
            t = f.get_tensor(k)
            assert t.dtype == torch.float16
            short = k.split(".")[-1]
            if short in ("w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2"):
                assert torch.equal(t, sd[k].half().t()), k  # transposed by the converter
            else:
                assert torch.equal(t, sd[k].half()), k


def test_ai00_state_export(sd, base_path, tmp_path):
    H, N = EMBD // 64, 64
    st = {f"blocks.{i}.att.time_state": torch.randn(H, N, N) for i in range(LAYERS)}
    torch.save(st, tmp_path / "s.pth")
    E.export("ai00", base_path, out=tmp_path / "m.st", state=tmp_path / "s.pth", log=lambda m: None)
    from safetensors.torch import load_file

    back = load_file(str(tmp_path / "m.state.st"))
    assert torch.equal(back["blocks.1.att.time_state"], st["blocks.1.att.time_state"].half().transpose(1, 2))
    torch.save({"blocks.0.att.time_state": torch.zeros(H, N, N)}, tmp_path / "bad.pth")
    with pytest.raises(E.ExportError, match="expected exactly blocks.0..2.att.time_state"):
        E.export("ai00", base_path, out=tmp_path / "m2.st", state=tmp_path / "bad.pth")


# ----------------------------------------------------------------------------- HF
def test_hf_round_trip_is_exact_and_loads_as_base_model(sd, base_path, tmp_path):
    from rwkvforge.checkpoint import load_model, load_state_dict

    out = tmp_path / "m-hf"
    rep = E.export("hf", base_path, out=out, dtype="fp32", log=lambda m: None)
    assert rep["checks"]["read_back"]["exact"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "rwkv7" and cfg["architectures"] == ["RWKV7ForCausalLM"]
    assert (out / "rwkv_vocab_v20230424.txt").is_file()
    back = load_state_dict(out)  # the BASE_MODEL path: a folder is read as HF
    assert set(back) == set(sd)
    for k in sd:
        assert back[k].dtype == sd[k].dtype and torch.equal(back[k], sd[k]), k
    ids = torch.tensor([[1, 500, 30000, 261]])
    with torch.no_grad():
        assert torch.equal(load_model(out)(ids)[0], load_model(base_path)(ids)[0])


def test_hf_import_errors(sd, tmp_path):
    from rwkvforge.checkpoint import CheckpointError, load_state_dict

    d = tmp_path / "gpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(CheckpointError, match="not an RWKV-7 model in the HF layout"):
        load_state_dict(d)
    (d / "config.json").write_text(json.dumps({"model_type": "rwkv7"}))
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_state_dict(d)
    from safetensors.torch import save_file

    hsd = hf.to_hf_state_dict(sd)
    hsd["model.layers.1.attn.mystery"] = torch.zeros(3)
    save_file(hsd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensor"):
        load_state_dict(d)
    del hsd["model.layers.1.attn.mystery"]
    hsd["model.layers.1.attn.k_proj.weight"] = torch.zeros(EMBD, EMBD + 1)
    save_file(hsd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="blocks.1.att.key.weight has shape"):
        load_state_dict(d)


RWKV7_HF = "rwkv7-hf==0.9.0"


@pytest.fixture(scope="session")
def rwkv7_hf_dir():
    """rwkv7-hf (pure PyTorch; torch and transformers come from .venv) installed once, without
    dependencies, into its own folder under the user's cache: never into .venv."""
    d = G.cache_dir() / "rwkv7-hf-0.9.0"
    if not (d / ".complete").is_file():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                            "--disable-pip-version-check", "--target", str(d), RWKV7_HF],
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            pytest.skip(f"cannot install {RWKV7_HF} (no package index?): {r.stderr[-300:]}")
        (d / ".complete").write_text("ok\n")
    return d


_HF_RUNNER = r"""
import json, sys, torch
from rwkv7_hf import RWKV7ForCausalLM, __version__
m, info = RWKV7ForCausalLM.from_pretrained(sys.argv[1], torch_dtype=torch.float32,
                                           output_loading_info=True)
m.eval()
ids = json.loads(sys.argv[2])
with torch.no_grad():
    logits = m(torch.tensor([ids])).logits[0].float()
torch.save(logits, sys.argv[3])
print(json.dumps({"version": __version__, "missing": sorted(info["missing_keys"]),
                  "unexpected": sorted(info["unexpected_keys"]), "mismatched": [str(x) for x in info["mismatched_keys"]]}))
"""


def test_hf_folder_runs_in_rwkv7_hf_with_our_logits(sd, base_path, tmp_path, rwkv7_hf_dir):
    out = tmp_path / "m-hf"
    E.export("hf", base_path, out=out, dtype="fp32", log=lambda m: None)
    ids = [1, 500, 30000, 261, 23, 88, 9000, 4, 65000]
    env = {**os.environ, "PYTHONPATH": str(rwkv7_hf_dir)}
    r = subprocess.run([sys.executable, "-c", _HF_RUNNER, str(out), json.dumps(ids),
                        str(tmp_path / "l.pt")], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["missing"] == [] and info["unexpected"] == [] and info["mismatched"] == []
    theirs = torch.load(tmp_path / "l.pt")
    ours = E.logits_of(sd, ids)
    scale = max(1.0, float(ours.abs().max()))
    # fp32 both sides, different summation order only (measured 2.4e-6 at scale 4.9)
    assert float((theirs - ours).abs().max()) <= 1e-5 * scale


# ----------------------------------------------------------------------------- llama.cpp
@pytest.fixture(scope="session")
def llama_cpp():
    """llama-cpp-python built once from source into its cached venv (scripts/llama_cpp_venv.sh)."""
    if G.llama_cpp_python() is None:
        if shutil.which("cmake") is None or not (shutil.which("c++") or shutil.which("g++")):
            pytest.skip("llama.cpp runtime check needs cmake and a C++ compiler to build "
                        "llama-cpp-python (apt-get install cmake g++)")
        r = subprocess.run([str(ROOT / "scripts" / "llama_cpp_venv.sh")], capture_output=True,
                           text=True, timeout=3600)
        if r.returncode != 0:
            pytest.fail(f"building llama-cpp-python failed:\n{r.stderr[-3000:]}")
    assert G.llama_cpp_python() is not None
    return G.llama_cpp_python()


@pytest.mark.slow
def test_llama_cpp_greedy_equals_ours_f16(base_path, tmp_path, llama_cpp):
    rep = E.export("gguf", base_path, out=tmp_path / "m.gguf", dtype="f16", verify="require",
                   log=lambda m: None)
    c = rep["checks"]["llama_cpp"]
    assert c["arch"] == "rwkv7" and c["tokenizer"] == "rwkv" and c["tokenizer_matches"]
    assert c["greedy_llama_cpp"] == c["greedy_ours"] and len(c["greedy_ours"]) == E.N_NEW
    assert len(set(c["greedy_ours"])) > 1  # a real continuation, not one token repeated
    assert c["max_abs_logit_diff_vs_ours"] <= c["tolerance"]


@pytest.mark.slow
def test_llama_cpp_q8_0_within_tolerance(base_path, tmp_path, llama_cpp):
    rep = E.export("gguf", base_path, out=tmp_path / "m.gguf", dtype="q8_0", verify="require",
                   log=lambda m: None)
    c = rep["checks"]["llama_cpp"]
    assert c["passed"] and c["tokenizer_matches"]
    assert c["max_abs_logit_diff_vs_ours"] <= c["tolerance"]


def test_gguf_read_back_catches_a_wrong_mapping(base_path, tmp_path, monkeypatch):
    orig = G.gguf_tensors

    def broken(s):
        t = orig(s)
        t["blk.1.time_mix_k_k.weight"] = t["blk.1.time_mix_k_k.weight"].flip(0)
        return t

    monkeypatch.setattr(G, "gguf_tensors", broken)
    with pytest.raises(E.ExportError, match="blocks.1.att.k_k .* the GGUF mapping is wrong"):
        E.export("gguf", base_path, out=tmp_path / "m.gguf", verify="off", log=lambda m: None)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_llama_cpp_catches_a_consistent_but_wrong_mapping(base_path, tmp_path, llama_cpp,
                                                         monkeypatch):
    """A mapping that reads back consistently (both directions wrong the same way) but means
    something else to llama.cpp: the fused lerp rows in another order. Only the runtime can
    tell, and it must: the check fails and nothing is written."""
    monkeypatch.setattr(G, "LERP_ORDER", ("x_w", "x_r", "x_k", "x_v", "x_a", "x_g"))
    with pytest.raises(E.ExportError, match="llama.cpp disagrees"):
        E.export("gguf", base_path, out=tmp_path / "m.gguf", verify="require", log=lambda m: None)
    assert not (tmp_path / "m.gguf").exists()


# ----------------------------------------------------------------------------- with an adapter
def test_export_merges_the_adapter_first(sd, base_path, tmp_path):
    """--adapter: the exported model is base + adapter merged in fp32 (as merge --dtype fp32)."""
    from rwkvforge import adapter as A
    from rwkvforge import peft as rp
    from rwkvforge.checkpoint import load_state_dict, model_from_state_dict

    spec = rp.AdapterSpec(r=4, alpha=8.0)
    pm = rp.apply_adapter(model_from_state_dict(sd), spec)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cfg, tensors = rp.export_adapter(pm, spec)
    A.save_adapter(tmp_path / "adapter", cfg, tensors)
    E.export("hf", base_path, adapter=tmp_path / "adapter", out=tmp_path / "m-hf", dtype="fp32",
             log=lambda m: None)
    merged = A.merge_state_dict(sd, A.read_adapter(tmp_path / "adapter"), torch.float32, "fp32")
    back = load_state_dict(tmp_path / "m-hf")
    changed = [k for k in sd if not torch.equal(merged[k], sd[k])]
    assert changed  # the adapter does something ...
    for k in back:
        assert torch.equal(back[k], merged[k]), k  # ... and the export is exactly the merge


def test_export_is_never_silent_for_long(base_path, tmp_path, capsys, monkeypatch):
    """Not a terminal: plain lines while the export runs (EVERY_S shrunk below the tiny
    model's export time), counting the steps it has logged; progress=False: none."""
    from rwkvforge import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.005)
    E.export("hf", base_path, out=tmp_path / "a-hf", dtype="fp32", log=lambda m: None)
    err = capsys.readouterr().err.splitlines()
    assert err and all(x.startswith("[export] hf: ") for x in err)
    assert err[-1].startswith("[export] hf: 1 steps done, ") and err[-1].endswith(", done")
    E.export("hf", base_path, out=tmp_path / "b-hf", dtype="fp32", log=lambda m: None,
             progress=False)
    assert capsys.readouterr().err == ""

"""The adapter format and maths (rwkvforge.adapter): the fast merge vs a slow reference, the
scale rules, the PEFT-folder writer and reader (metadata, run folders, refusals), and
base + adapter -> model. The merge stage (verification, outputs): test_merge.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from rwkvforge import adapter as A
from rwkvforge.checkpoint import model_from_state_dict, save_pth

LAYERS, EMBD, VOCAB, R = 2, 128, 1024, 4
TARGETS = ("att.key", "ffn.value")


@pytest.fixture(scope="module")
def base_sd():
    from rwkvforge.demo import make_random_model_sd

    return make_random_model_sd(LAYERS, EMBD, vocab_size=VOCAB, seed=0)


def _peft_tensors(base_sd, seed=0) -> tuple[dict, dict[str, torch.Tensor]]:
    """A LoRA in PEFT layout, written by hand (r=4, alpha=8 -> scale 2) + a whole ln tensor."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(LAYERS):
        for t in TARGETS:
            out_f, in_f = base_sd[f"blocks.{i}.{t}.weight"].shape
            pre = f"{A.PEFT_PREFIX}blocks.{i}.{t}"
            tensors[pre + ".lora_A.weight"] = torch.randn(R, in_f, generator=g) / in_f**0.5
            tensors[pre + ".lora_B.weight"] = torch.randn(out_f, R, generator=g) * 0.05
    tensors[A.PEFT_PREFIX + "blocks.1.ln1.weight"] = base_sd["blocks.1.ln1.weight"] * 1.1
    cfg = {"peft_type": "LORA", "r": R, "lora_alpha": 8.0, "target_modules": A.target_regex(TARGETS)}
    return cfg, tensors


@pytest.fixture(scope="module")
def lora_dir(base_sd, tmp_path_factory):
    cfg, tensors = _peft_tensors(base_sd)
    return A.save_adapter(tmp_path_factory.mktemp("lora") / "adapter", cfg, tensors, {"step": 7})


# ----------------------------------------------------------------------------- maths
@pytest.mark.parametrize("dora", [False, True])
def test_fast_merge_matches_slow_reference(dora):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 32, generator=g)
    f = A.LoraFactor(torch.randn(5, 32, generator=g), torch.randn(48, 5, generator=g) * 0.1,
                     scale=A.lora_scale(16, 5), magnitude=(torch.rand(48, generator=g) + 0.5) if dora else None)
    fast, ref = A.merge_fast(W, f), A.merge_reference(W, f)
    assert fast.dtype == torch.float32
    assert torch.allclose(fast.double(), ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ref, W.double(), atol=1e-3)  # the adapter did something
    if dora:  # every row has exactly the trained magnitude
        assert torch.allclose(ref.norm(dim=1), f.magnitude.double(), rtol=1e-9)


def test_scale_rules():
    assert A.lora_scale(32, 16) == 2.0
    assert A.lora_scale(32, 16, use_rslora=True) == 8.0  # alpha / sqrt(r)


def test_merge_state_dict_adds_s_b_a_and_applies_replacements(base_sd, lora_dir):
    ad = A.read_adapter(lora_dir)
    merged = A.merge_state_dict(base_sd, ad, torch.bfloat16, "bf16")
    k = "blocks.0.att.key.weight"
    f = ad.factors[k]
    assert f.scale == 2.0
    assert torch.equal(merged[k], (base_sd[k] + 2.0 * f.B @ f.A).to(torch.bfloat16))
    assert torch.equal(merged["blocks.1.ln1.weight"],
                       (base_sd["blocks.1.ln1.weight"] * 1.1).to(torch.bfloat16))
    assert torch.equal(merged["blocks.0.att.value.weight"],
                       base_sd["blocks.0.att.value.weight"].to(torch.bfloat16))  # not a target


def test_check_finite_names_the_tensor_and_the_fix():
    with pytest.raises(A.NonFiniteError, match=r"1 tensor\(s\): b\..*try --dtype bf16"):
        A.check_finite({"a": torch.ones(2), "b": torch.tensor([1.0, float("inf")])}, "x", "fp16")
    A.check_finite({"a": torch.ones(2), "i": torch.tensor([3])}, "x")  # finite: no error


# ----------------------------------------------------------------------------- writer + reader
def test_written_folder_reads_back_exactly(base_sd, lora_dir):
    cfg, tensors = _peft_tensors(base_sd)
    assert sorted(p.name for p in lora_dir.iterdir()) == [A.CHECKSUMS, A.ADAPTER_CONFIG,
                                                          A.ADAPTER_WEIGHTS[0]]
    ad = A.read_adapter(lora_dir)
    assert ad.kind == "peft" and ad.metadata == {"step": 7} and ad.config["r"] == R
    assert len(ad.factors) == LAYERS * len(TARGETS)
    for key, f in ad.factors.items():
        pre = A.PEFT_PREFIX + key[: -len(".weight")]
        assert torch.equal(f.A, tensors[pre + ".lora_A.weight"])
        assert torch.equal(f.B, tensors[pre + ".lora_B.weight"])
    assert set(ad.replacements) == {"blocks.1.ln1.weight"}


def test_adapter_checksums_are_checked(lora_dir, tmp_path):
    """save_adapter writes SHA256SUMS of the weights (what coreutils' `sha256sum -c` reads); a
    flipped byte or a missing file is refused naming the file; a hand-edited config is not
    checked; without SHA256SUMS (an adapter from peft itself) the folder loads unchecked."""
    import shutil
    import subprocess

    d = tmp_path / "a"
    shutil.copytree(lora_dir, d)
    assert A.verify_checksums(d) == 1
    if shutil.which("sha256sum"):
        subprocess.run(["sha256sum", "--quiet", "-c", A.CHECKSUMS], cwd=d, check=True)
    w = d / A.ADAPTER_WEIGHTS[0]
    blob = bytearray(w.read_bytes())
    blob[-3] ^= 0x10  # inside the last tensor's data: still a readable safetensors file
    w.write_bytes(bytes(blob))
    with pytest.raises(A.MergeError, match=r"adapter_model.safetensors: checksum mismatch"):
        A.read_adapter(d)
    (d / A.CHECKSUMS).unlink()
    assert A.read_adapter(d).config["r"] == R  # unchecked, as peft's own folders are
    shutil.rmtree(d)
    shutil.copytree(lora_dir, d)
    (d / A.ADAPTER_CONFIG).write_text((d / A.ADAPTER_CONFIG).read_text().replace('"r": ', '"r":  '))
    assert A.read_adapter(d).config["r"] == R
    (d / A.ADAPTER_WEIGHTS[0]).unlink()
    (d / A.ADAPTER_WEIGHTS[1]).write_bytes(b"")  # a folder holding only the other weights name
    with pytest.raises(A.MergeError, match=r"adapter_model.safetensors: missing"):
        A.verify_checksums(d)
    (d / A.CHECKSUMS).write_text("not a checksum line\n")
    with pytest.raises(A.MergeError, match=r"SHA256SUMS:1: not a `sha256sum` line"):
        A.verify_checksums(d)


def test_peft_export_of_a_read_adapter_is_the_same_adapter(lora_dir, tmp_path):
    ad = A.read_adapter(lora_dir)
    out = A.save_peft_adapter(ad, tmp_path / "exported")
    back = A.read_adapter(out)
    assert back.factors.keys() == ad.factors.keys() and back.metadata == {}
    assert all(torch.equal(back.factors[k].A, f.A) and torch.equal(back.factors[k].B, f.B)
               and back.factors[k].scale == f.scale for k, f in ad.factors.items())
    assert torch.equal(back.replacements["blocks.1.ln1.weight"],
                       ad.replacements["blocks.1.ln1.weight"])
    assert not (tmp_path / "exported.tmp").exists()  # the folder appeared whole


def test_a_run_folder_reads_as_its_final_adapter(lora_dir, tmp_path):
    run = tmp_path / "runs" / "r"
    shutil.copytree(lora_dir, run / "adapter")
    (run / "config.json").write_text("{}")
    assert A.resolve_adapter_path(run) == run / "adapter"
    assert A.resolve_adapter_path(lora_dir) == lora_dir
    assert A.read_adapter(run).source == str(run / "adapter")
    (run / "adapter" / A.ADAPTER_CONFIG).unlink()  # no final adapter yet: the folder itself
    assert A.resolve_adapter_path(run) == run
    with pytest.raises(A.MergeError, match="no adapter_config.json"):
        A.read_adapter(run)


def test_reader_refusals(lora_dir, tmp_path):
    with pytest.raises(A.MergeError, match="disagrees"):
        A.read_adapter(lora_dir, alpha=16)
    with pytest.raises(A.MergeError, match="adapter not found"):
        A.read_adapter(tmp_path / "nope")
    d = tmp_path / "pissa"
    shutil.copytree(lora_dir, d)
    cfg = json.loads((d / A.ADAPTER_CONFIG).read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (d / A.ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(A.MergeError, match="modified"):
        A.read_adapter(d)


def test_other_targets_refused(base_sd, lora_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "a"
    shutil.copytree(lora_dir, d)
    t = load_file(str(d / A.ADAPTER_WEIGHTS[0]))
    t["base_model.model.blocks.0.att.gate.lora_A.weight"] = torch.zeros(R, EMBD)
    t["base_model.model.blocks.0.att.gate.lora_B.weight"] = torch.zeros(EMBD, R)
    save_file(t, str(d / A.ADAPTER_WEIGHTS[0]))
    (d / A.CHECKSUMS).unlink()  # changed on purpose
    with pytest.raises(A.MergeError, match="blocks.0.att.gate: no such weight"):
        A.check_adapter_matches_base(A.read_adapter(d), base_sd)


# ----------------------------------------------------------------------------- base + adapter
def test_load_with_adapter_is_the_fp32_merge(base_sd, lora_dir, tmp_path):
    base = save_pth(base_sd, tmp_path / "base.pth")
    want = A.merge_state_dict(base_sd, A.read_adapter(lora_dir), torch.float32, "fp32")
    for b in (base, base_sd):
        m = A.load_with_adapter(b, lora_dir)
        got = m.state_dict()
        assert all(torch.equal(got[k], want[k]) for k in want)
    m16 = A.load_with_adapter(base, lora_dir, dtype=torch.bfloat16)
    k = "blocks.1.ffn.value.weight"
    assert torch.equal(m16.state_dict()[k], want[k].to(torch.bfloat16))
    plain = A.load_with_adapter(base, None).state_dict()
    assert torch.equal(plain[k], base_sd[k])
    assert torch.equal(A.load_with_adapter(base, "").state_dict()[k], base_sd[k])
    idx = torch.randint(1, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(m(idx)[0], model_from_state_dict(want)(idx)[0])


def test_a_bad_adapter_fails_before_the_base_is_read(tmp_path):
    """The adapter is read first: a missing base is not what the user hears about."""
    with pytest.raises(A.MergeError, match="adapter not found"):
        A.load_with_adapter(tmp_path / "no-base.pth", tmp_path / "no-adapter")

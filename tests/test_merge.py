"""The merge stage: merged logits vs base + adapter (peft, unmerged) for LoRA, a QLoRA-trained
adapter, DoRA, rsLoRA and PiSSA, refusals (non-finite, mismatched, not RWKV-7, missing),
RWKV-PEFT .pth import, the rwkv pip runtime check, and no output on failure. The adapter
format and maths alone: test_adapter.py."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rwkvforge import adapter as A
from rwkvforge import merge as M
from rwkvforge.checkpoint import DTYPES
from rwkvforge.state_tuning import run_state_note

VOCAB, LAYERS, EMBD = 1024, 2, 128  # small vocab: merge does not care, the tests get faster


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def base_sd():
    from rwkvforge.demo import make_random_model_sd

    return make_random_model_sd(LAYERS, EMBD, vocab_size=VOCAB, seed=0)


@pytest.fixture(scope="module")
def base_path(base_sd, tmp_path_factory):
    from rwkvforge.checkpoint import save_pth

    p = tmp_path_factory.mktemp("base") / "base.pth"
    save_pth(base_sd, p)
    return p


def _peft_model(base_sd, **spec_kw):
    from rwkvforge import peft as rp
    from rwkvforge.checkpoint import model_from_state_dict

    spec = rp.AdapterSpec(**{"r": 4, "alpha": 8.0, **spec_kw})
    return rp.apply_adapter(model_from_state_dict(base_sd), spec), spec


def _perturb(pm, seed=0, std=0.05):
    """Stand-in for training where the test needs no optimiser: random B (A is random already),
    DoRA magnitudes nudged."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            elif "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _save(pm, spec, folder: Path) -> Path:
    from rwkvforge import peft as rp

    cfg, tensors = rp.export_adapter(pm, spec)
    A.save_adapter(folder, cfg, tensors)
    return folder


@pytest.fixture(scope="module")
def lora_dir(base_sd, tmp_path_factory):
    pm, spec = _peft_model(base_sd)
    _perturb(pm)
    return _save(pm, spec, tmp_path_factory.mktemp("lora") / "adapter")


_ulp = M.ulp


# ----------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16", "fp16"])
def test_lora_merge_matches_base_plus_adapter(base_sd, base_path, lora_dir, tmp_path, dtype_name):
    out = tmp_path / f"m-{dtype_name}.pth"
    res = M.merge(base_path, lora_dir, out, dtype_name, runtime_check=False, log=lambda m: None)
    rep = json.loads(out.with_suffix(".verify.json").read_text())
    c = rep["checks"]["logits"]
    assert rep["passed"] and c["passed"] and rep["output"] == out.name
    assert c["max_abs_diff"] <= c["tolerance"]
    assert c["adapter_effect_max_abs"] > 10 * c["tolerance"]  # the check can see the adapter
    if dtype_name == "fp32":
        assert c["rounding_effect"] == 0.0 and c["max_abs_diff"] < 1e-4
    else:  # the budget comes from rounding, and rounding is what we see
        assert c["rounding_effect"] > 0 and c["max_abs_diff"] > 0.1 * c["rounding_effect"]
    merged = torch.load(out, weights_only=True)
    dt = DTYPES[dtype_name]
    assert set(merged) == set(base_sd) and all(v.dtype == dt for v in merged.values())
    # rounded exactly once: each merged weight is the nearest `dt` number to the float64 merge,
    # up to the fp32 arithmetic of the fast path (~1e-7 of the magnitude of the summed terms)
    adapter = A.read_adapter(lora_dir)
    assert len(adapter.factors) == 12  # 6 targets x 2 layers
    for key, f in adapter.factors.items():
        ref = A.merge_reference(base_sd[key], f)
        terms = base_sd[key].double().abs() + f.scale * (f.B.double().abs() @ f.A.double().abs())
        slack = 0.5 * _ulp(ref, dt) * (1 + 1e-6) + 4e-7 * terms
        assert bool(((merged[key].double() - ref).abs() <= slack).all()), key
    assert res.report["sha256"] and res.output == out


def test_lora_merge_into_bf16_base_upcasts_first(base_sd, lora_dir, tmp_path):
    """A bf16 base (what BlinkDL ships) is merged in fp32: W.float() + s B A, then rounded."""
    from rwkvforge.checkpoint import save_pth

    bf = {k: v.to(torch.bfloat16) for k, v in base_sd.items()}
    save_pth(bf, tmp_path / "bf.pth")
    res = M.merge(tmp_path / "bf.pth", lora_dir, tmp_path / "o.pth", "bf16", runtime_check=False,
                  log=lambda m: None)
    c = res.report["checks"]["logits"]
    # the base is exact in bf16, but the merged matrices are not: the budget must see that
    assert c["passed"] and c["rounding_effect"] > 0 and c["max_abs_diff"] > 0
    merged = torch.load(tmp_path / "o.pth", weights_only=True)
    f = A.read_adapter(lora_dir).factors["blocks.1.att.key.weight"]
    ref = (bf["blocks.1.att.key.weight"].float() + f.scale * f.B @ f.A).to(torch.bfloat16)
    assert torch.equal(merged["blocks.1.att.key.weight"], ref)
    # adding in bf16 (the rounding-order bug) gives a different, worse result
    bad = bf["blocks.1.att.key.weight"] + (f.scale * f.B @ f.A).to(torch.bfloat16)
    assert not torch.equal(bad, ref)


# ----------------------------------------------------------------------------- QLoRA
@pytest.mark.slow  # real bitsandbytes NF4 training steps
def test_qlora_trained_adapter_merges_into_full_precision_base(base_sd, base_path, tmp_path):
    """Train 3 real steps on an NF4 base (bitsandbytes), then merge: the result is the fp32
    base + adapter, not the NF4-dequantised base + adapter."""
    import bitsandbytes.functional as bnbf

    from rwkvforge import peft as rp

    pm, spec = _peft_model(base_sd, quant="nf4")
    inner = rp.unwrap(pm)
    assert type(inner.blocks[0].att.key.base_layer).__name__ == "Linear4bit"
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    idx = torch.randint(1, VOCAB, (2, 17), generator=torch.Generator().manual_seed(0))
    inner.train()
    for _ in range(3):
        logits, _ = inner(idx[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), idx[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    folder = _save(pm, spec, tmp_path / "adapter")
    res = M.merge(base_path, folder, tmp_path / "q.pth", "fp32", runtime_check=False, log=lambda m: None)
    assert res.report["checks"]["logits"]["passed"]
    merged = torch.load(tmp_path / "q.pth", weights_only=True)
    key = "blocks.0.att.key.weight"
    f = A.read_adapter(folder).factors[key]
    assert float(f.B.abs().max()) > 0  # training moved B off zero
    W = base_sd[key]
    assert torch.allclose(merged[key], W + f.scale * f.B @ f.A, atol=1e-6)
    q, st = bnbf.quantize_4bit(W, quant_type="nf4")
    deq = bnbf.dequantize_4bit(q, st).float()
    assert float((merged[key] - (deq + f.scale * f.B @ f.A)).abs().max()) > 100 * 1e-6


# ----------------------------------------------------------------------------- DoRA / rsLoRA / PiSSA
def test_dora_merge(base_sd, base_path, tmp_path):
    pm, spec = _peft_model(base_sd, use_dora=True)
    _perturb(pm, seed=3)
    folder = _save(pm, spec, tmp_path / "adapter")
    ad = A.read_adapter(folder)
    assert ad.use_dora and all(f.magnitude is not None for f in ad.factors.values())
    res = M.merge(base_path, folder, tmp_path / "d.pth", "fp32", runtime_check=False, log=lambda m: None)
    c = res.report["checks"]["logits"]
    assert c["passed"] and c["adapter_effect_max_abs"] > 100 * c["max_abs_diff"]
    merged = torch.load(tmp_path / "d.pth", weights_only=True)
    k = "blocks.1.ffn.value.weight"
    assert torch.allclose(merged[k].norm(dim=1), ad.factors[k].magnitude, rtol=1e-5)


def test_rslora_adapter_saved_by_peft(base_sd, base_path, tmp_path):
    """An adapter written by peft's own save_pretrained with use_rslora: scale alpha/sqrt(r)."""
    from peft import LoraConfig, get_peft_model

    from rwkvforge.checkpoint import model_from_state_dict

    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["att.key", "ffn.value"])
    pm = get_peft_model(model_from_state_dict(base_sd), cfg)
    _perturb(pm, seed=4)
    pm.save_pretrained(str(tmp_path / "adapter"))
    ad = A.read_adapter(tmp_path / "adapter")
    assert {f.scale for f in ad.factors.values()} == {8 / math.sqrt(4)}
    res = M.merge(base_path, tmp_path / "adapter", tmp_path / "r.pth", "fp32", runtime_check=False,
                  log=lambda m: None)
    assert res.report["checks"]["logits"]["passed"]
    assert res.report["adapter"]["use_rslora"] is True


def test_pissa_adapter_merged_matches_the_live_training_model(base_sd, base_path, tmp_path):
    """PiSSA trains on the residual W - s B0 A0; the exported (converted) adapter merged into the
    original base must reproduce the live peft model that trained."""
    from rwkvforge import peft as rp

    pm, spec = _peft_model(base_sd, init="pissa")
    _perturb(pm, seed=5, std=0.02)
    folder = _save(pm, spec, tmp_path / "adapter")
    M.merge(base_path, folder, tmp_path / "p.pth", "fp32", runtime_check=False, log=lambda m: None)
    idx = M.probe_batch(VOCAB)
    with torch.no_grad():
        live = rp.unwrap(pm).eval()(idx)[0]
    merged = M.model_logits(torch.load(tmp_path / "p.pth", weights_only=True), idx)
    assert float((merged - live).abs().max()) < 1e-3


# ----------------------------------------------------------------------------- refusals
def _assert_nothing_written(folder: Path, name: str):
    assert not (folder / name).exists()
    assert not list(folder.glob(".*verifying*")), "temporary file left behind"


def test_non_finite_adapter_refused(base_sd, base_path, tmp_path):
    pm, spec = _peft_model(base_sd)
    _perturb(pm)
    with torch.no_grad():
        next(p for n, p in pm.named_parameters() if "blocks.1.att.value.lora_B" in n)[0, 0] = float("nan")
    folder = _save(pm, spec, tmp_path / "adapter")
    with pytest.raises(A.NonFiniteError, match="NaN"):
        M.merge(base_path, folder, tmp_path / "out" / "x.pth", "bf16", runtime_check=False, log=lambda m: None)
    assert not (tmp_path / "out" / "x.pth").exists()


def test_fp16_overflow_refused(base_sd, base_path, tmp_path):
    pm, spec = _peft_model(base_sd)
    _perturb(pm, std=1e5)  # finite in fp32, > 65504 after the merge
    folder = _save(pm, spec, tmp_path / "adapter")
    with pytest.raises(A.NonFiniteError, match="bf16"):
        M.merge(base_path, folder, tmp_path / "x.pth", "fp16", runtime_check=False, log=lambda m: None)
    _assert_nothing_written(tmp_path, "x.pth")


def test_failed_verification_leaves_no_output(base_path, lora_dir, tmp_path, monkeypatch):
    """A merge that is subtly wrong (scale x1.5, e.g. a misread alpha) must be caught by the
    logit check, even in bf16, and leave no model file behind (only bad.verify-failed.json)."""
    real = A.merge_fast
    monkeypatch.setattr(A, "merge_fast", lambda W, f: real(W, A.LoraFactor(f.A, f.B, f.scale * 1.5)))
    out = tmp_path / "bad.pth"
    with pytest.raises(M.VerificationError, match="differs from base"):
        M.merge(base_path, lora_dir, out, "bf16", runtime_check=False, log=lambda m: None)
    _assert_nothing_written(tmp_path, "bad.pth")
    assert not (tmp_path / "bad.verify.json").exists()
    rep = json.loads((tmp_path / "bad.verify-failed.json").read_text())
    assert rep["passed"] is False and rep["checks"]["logits"]["max_abs_diff"] > rep["checks"]["logits"]["tolerance"]


def test_outputs_that_would_destroy_inputs_or_other_files_are_refused(base_path, lora_dir,
                                                                        tmp_path):
    import shutil

    base = tmp_path / "base.pth"
    shutil.copy(base_path, base)
    before = base.read_bytes()
    with pytest.raises(M.MergeError, match="is an input of this merge"):
        M.merge(base, lora_dir, base, "bf16", runtime_check=False, log=lambda m: None)
    assert base.read_bytes() == before
    work = tmp_path / "mywork"
    (work / "notes").mkdir(parents=True)
    (work / "thesis.md").write_text("important")
    out = tmp_path / "m.pth"
    with pytest.raises(M.MergeError, match=r"holds other files \(notes, thesis.md\)"):
        M.merge(base, lora_dir, out, "fp32", export_adapter=work, runtime_check=False,
                log=lambda m: None)
    assert (work / "thesis.md").read_text() == "important" and not out.exists()
    # an adapter folder (e.g. an earlier export) may be replaced; the record is per model
    exp = tmp_path / "exported"
    for _ in range(2):
        M.merge(base, lora_dir, out, "fp32", export_adapter=exp, runtime_check=False,
                log=lambda m: None)
    assert sorted(p.name for p in exp.iterdir()) == ["SHA256SUMS", "adapter_config.json",
                                                     "adapter_model.safetensors"]
    M.merge(base, lora_dir, tmp_path / "m16.pth", "bf16", runtime_check=False,
            log=lambda m: None)
    assert json.loads((tmp_path / "m.verify.json").read_text())["output"] == "m.pth"
    assert json.loads((tmp_path / "m16.verify.json").read_text())["output"] == "m16.pth"


def test_merging_into_another_base_than_the_run_used_warns(base_path, lora_dir, tmp_path):
    import shutil

    run = tmp_path / "runs" / "r"
    shutil.copytree(lora_dir, run / "adapter")
    other = tmp_path / "other.pth"
    shutil.copy(base_path, other)
    logs: list[str] = []
    for trained_on in (base_path, other):
        (run / "config.json").write_text(json.dumps({"model": {"path": str(trained_on)}}))
        logs.clear()
        M.merge(base_path, run / "adapter", tmp_path / "o.pth", "bf16", runtime_check=False,
                log=logs.append)
        warned = [m for m in logs if "warning: the run trained this adapter on" in m]
        assert len(warned) == (trained_on == other), logs


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, "truncated"])
def test_unreadable_adapter_weights_are_a_merge_error(base_path, lora_dir, tmp_path, data):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(lora_dir, bad)
    w = bad / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:len(w.read_bytes()) // 2] if data == "truncated" else data)
    with pytest.raises(M.MergeError, match="cannot be read as adapter weights"):
        M.merge(base_path, bad, tmp_path / "o.pth", "bf16", runtime_check=False,
                log=lambda m: None)


def test_mismatched_adapter_refused_before_work(lora_dir, tmp_path):
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd

    wide = tmp_path / "wide.pth"
    save_pth(make_random_model_sd(LAYERS, 192, vocab_size=VOCAB, seed=1), wide)
    with pytest.raises(M.MergeError, match=r"does not fit base weight \(192, 192\)"):
        M.merge(wide, lora_dir, tmp_path / "o.pth", runtime_check=False, log=lambda m: None)
    shallow = tmp_path / "shallow.pth"
    save_pth(make_random_model_sd(1, EMBD, vocab_size=VOCAB, seed=1), shallow)
    with pytest.raises(M.MergeError, match="the base has only 1 layers"):
        M.merge(shallow, lora_dir, tmp_path / "o.pth", runtime_check=False, log=lambda m: None)
    assert not list(tmp_path.glob("o.pth"))


def test_bad_inputs_are_clear_errors(base_path, lora_dir, tmp_path):
    with pytest.raises(M.MergeError, match="base model not found"):
        M.merge(tmp_path / "nope.pth", lora_dir, tmp_path / "o.pth", log=lambda m: None)
    with pytest.raises(M.MergeError, match="adapter not found"):
        M.merge(base_path, tmp_path / "nope", tmp_path / "o.pth", log=lambda m: None)
    v6 = {"emb.weight": torch.zeros(8, 4), "blocks.0.att.time_maa_x": torch.zeros(1, 1, 4),
          "blocks.0.att.time_decay_w1": torch.zeros(4, 2), "head.weight": torch.zeros(8, 4)}
    torch.save(v6, tmp_path / "v6.pth")
    with pytest.raises(M.MergeError, match="RWKV-6"):
        M.merge(tmp_path / "v6.pth", lora_dir, tmp_path / "o.pth", log=lambda m: None)


# ----------------------------------------------------------------------------- RWKV-PEFT
def _rwkv_peft_pth(base_sd, path: Path, prefix: str = "") -> dict:
    """A checkpoint in RWKV-PEFT's LoRA layout: bf16, keys without '.weight', a trained ln."""
    g = torch.Generator().manual_seed(7)
    sd = {}
    for i in range(LAYERS):
        for t in ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value"):
            out_f, in_f = base_sd[f"blocks.{i}.{t}.weight"].shape
            sd[f"{prefix}blocks.{i}.{t}.lora_A"] = (torch.randn(8, in_f, generator=g) / in_f**0.5).bfloat16()
            sd[f"{prefix}blocks.{i}.{t}.lora_B"] = (torch.randn(out_f, 8, generator=g) * 0.02).bfloat16()
    sd[f"{prefix}blocks.1.ln1.weight"] = (base_sd["blocks.1.ln1.weight"] * 1.1).bfloat16()
    torch.save(sd, path)
    return sd


@pytest.mark.parametrize("prefix", ["", "model."])
def test_rwkv_peft_pth_import(base_sd, base_path, tmp_path, prefix):
    lp = tmp_path / "rwkv-0.pth"
    sd = _rwkv_peft_pth(base_sd, lp, prefix)
    with pytest.raises(M.MergeError, match="--alpha"):
        A.read_adapter(lp)
    with pytest.raises(M.MergeError, match="rank 8"):
        A.read_adapter(lp, alpha=16, rank=4)
    res = M.merge(base_path, lp, tmp_path / "m.pth", "fp32", alpha=16, runtime_check=False,
                  export_adapter=tmp_path / "peft", log=lambda m: None)
    assert res.report["checks"]["logits"]["passed"]
    assert res.report["adapter"]["kind"] == "rwkv-peft" and res.report["adapter"]["scales"] == [2.0]
    merged = torch.load(tmp_path / "m.pth", weights_only=True)
    k = "blocks.0.att.receptance"
    expect = base_sd[k + ".weight"] + 2.0 * sd[f"{prefix}{k}.lora_B"].float() @ sd[f"{prefix}{k}.lora_A"].float()
    assert torch.allclose(merged[k + ".weight"], expect, atol=1e-6)
    assert torch.equal(merged["blocks.1.ln1.weight"], sd[f"{prefix}blocks.1.ln1.weight"].float())
    # the PEFT-layout export reads back (here and in peft) as the same adapter
    back = A.read_adapter(tmp_path / "peft")
    assert back.kind == "peft" and set(back.factors) == {f"{k}.weight" for k in
                                                         (x[len(prefix):-len(".lora_A")] for x in sd if x.endswith("lora_A"))}
    assert back.factors[k + ".weight"].scale == 2.0 and "blocks.1.ln1.weight" in back.replacements
    idx = M.probe_batch(VOCAB)
    via_peft = M.unmerged_logits(base_sd, back, idx, adapter_dir=tmp_path / "peft")
    assert float((via_peft - M.model_logits(merged, idx)).abs().max()) < 1e-3


# ----------------------------------------------------------------------------- runtime + CLI
@pytest.mark.slow  # a subprocess importing torch + the rwkv package
def test_cli_merge_runs_in_rwkv_pip_and_exports(base_path, lora_dir, tmp_path, capsys):
    out = tmp_path / "merged" / "tiny.pth"
    rc = M.main(["--base", str(base_path), "--adapter", str(lora_dir), "--out", str(out),
                 "--dtype", "bf16", "--safetensors"])
    assert rc == 0, capsys.readouterr().err
    rep = json.loads(out.with_suffix(".verify.json").read_text())
    pip = rep["checks"]["rwkv_pip"]
    assert pip["passed"] and pip["env"] == "RWKV_V7_ON=1" and pip["max_abs_diff_vs_ours"] <= pip["tolerance"]
    import os
    assert os.environ.get("RWKV_V7_ON") is None  # the env var stayed in the subprocess
    from safetensors.torch import load_file

    st = load_file(str(out.with_suffix(".safetensors")))
    pth = torch.load(out, weights_only=True)
    assert set(st) == set(pth) and all(torch.equal(st[k], pth[k]) for k in pth)
    import hashlib

    assert rep["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert "merged model:" in capsys.readouterr().out


def test_cli_error_is_for_people(lora_dir, tmp_path, capsys):
    rc = M.main(["--adapter", str(lora_dir)])
    assert rc == 2 and "--base-model is required" in capsys.readouterr().err


@pytest.mark.slow  # the CLI's merge runs the rwkv pip package check in a subprocess
def test_cli_adapter_that_is_missing_or_a_run_folder(base_path, lora_dir, tmp_path, capsys):
    import shutil

    rc = M.main(["--adapter", str(tmp_path / "runs" / "nope" / "adapter")])
    assert rc == 2 and "not found" in capsys.readouterr().err
    run = tmp_path / "runs" / "r"
    shutil.copytree(lora_dir, run / "adapter")
    (run / "config.json").write_text(json.dumps({"model": {"path": str(base_path)}}))
    # TRAIN_TYPE=lora+state: the merged .pth leaves the state out, and merge says so
    (run / "state").mkdir()
    (run / "state" / "state.pth").write_bytes(b"")
    rc = M.main(["--adapter", str(run), "--dtype", "fp32", "--out", str(tmp_path / "m.pth")])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"using the run's final adapter {run / 'adapter'}" in err
    assert "--base is required" not in err
    assert f"this run also tuned an initial state ({run / 'state'})" in err
    assert f"--state {run} with infer / serve" in err
    (run / "state" / "state.pth").unlink()
    assert run_state_note(run / "adapter", "x") is None


# ----------------------------------------------------------------------------- issue 28
def _checkpoint_of(lora_dir: Path, run: Path) -> Path:
    """A training checkpoint folder (COMPLETE with checksums) holding `lora_dir`'s adapter."""
    import shutil

    from rwkvforge.checkpoint import write_checkpoint

    def fill(tmp):
        for f in lora_dir.iterdir():
            shutil.copy(f, tmp / f.name)
    return write_checkpoint(run, 2, fill)


def test_damaged_checkpoint_is_refused_naming_the_file(base_path, lora_dir, tmp_path):
    ck = _checkpoint_of(lora_dir, tmp_path / "run")
    w = ck / A.ADAPTER_WEIGHTS[0]
    data = bytearray(w.read_bytes())
    data[-100] ^= 0x08  # a flipped bit inside a tensor: still loads, silently different
    w.write_bytes(bytes(data))
    with pytest.raises(A.MergeError, match=rf"checkpoint step-2 is damaged: .*{w.name}: "
                                           "checksum mismatch"):
        M.merge(base_path, ck, tmp_path / "m.pth", "fp32", runtime_check=False)
    assert not (tmp_path / "m.pth").exists()


def test_read_only_disk_merge_says_so(base_path, lora_dir, small_fs):
    """--out on a real read-only filesystem: refused before any merging, naming the folder;
    and a disk that turns read-only between that check and the write (EROFS from the
    kernel) gives one MergeError saying so and what to do, not "free some space" and not
    the clean-up's own OSError."""
    ro = small_fs("1m", readonly=True)
    logs = []
    with pytest.raises(A.MergeError, match=rf"--out: {ro} is not writable"):
        M.merge(base_path, lora_dir, ro / "sub" / "m.pth", "fp32", runtime_check=False,
                log=logs.append)
    assert not logs  # refused before reading anything
    err = OSError(30, "Read-only file system", str(ro / "m.pth"))
    msg = str(M._disk_full(err, ro / "m.pth", 1 << 20))
    print(msg)
    assert msg.startswith("the disk is read-only: writing the merged model")
    assert "Pass --out on a writable disk" in msg and "Free some space" not in msg


def test_full_disk_merge_says_how_much_space(base_path, lora_dir, small_fs):
    """--out on a real 1 MiB tmpfs: the merged model does not fit; a MergeError (not the
    torch "enforce fail" traceback) says so, with the space needed, and nothing is left."""
    out = small_fs("1m") / "m.pth"
    with pytest.raises(A.MergeError) as ei:
        M.merge(base_path, lora_dir, out, "fp32", runtime_check=False)
    msg = str(ei.value)
    print(msg)
    assert msg.startswith("the disk is full: writing the merged model")
    assert "It needs about" in msg and "run the same merge command again" in msg
    assert not [p.name for p in out.parent.iterdir() if p.suffix == ".pth"]


# ----------------------------------------------------------------------------- progress
def test_verification_is_never_silent_for_long(base_path, lora_dir, tmp_path, capsys,
                                               monkeypatch):
    """stderr is not a terminal here: plain lines count the verification's forward passes
    (every EVERY_S seconds, shrunk so the tiny model's passes outlast it) up to all of them;
    progress=False keeps it quiet."""
    from rwkvforge import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.005)
    M.merge(base_path, lora_dir, tmp_path / "m.pth", "bf16", runtime_check=False,
            log=lambda m: None)
    err = capsys.readouterr().err.splitlines()
    total = M.verify_passes("bf16")
    assert total == 7 and any(x.startswith("[merge] verifying: ") for x in err[:-1])
    assert err[-1].startswith(f"[merge] verifying: {total}/{total} forward pass (100%)")
    assert err[-1].endswith(", done")
    M.merge(base_path, lora_dir, tmp_path / "q.pth", "fp32", runtime_check=False,
            log=lambda m: None, progress=False)
    assert capsys.readouterr().err == ""

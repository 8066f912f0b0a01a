"""Adapters on RWKV-7: LoRA / PiSSA / DoRA through peft, QLoRA through bitsandbytes (CPU),
the PEFT export layout and the reference merge."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkvforge import adapter as A
from rwkvforge import peft as P
from rwkvforge.checkpoint import model_from_state_dict

IDX = torch.randint(0, 65536, (2, 12), generator=torch.Generator().manual_seed(1))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _perturb(pm, seed=0, std=0.05):
    """Move every trainable tensor away from its init (as training would)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(pm.named_parameters()):
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _logits(m):
    with torch.no_grad():
        return P.unwrap(m)(IDX)[0]


def test_parse_targets_and_parts_say_what_is_wrong():
    assert P.parse_targets("att.key, ffn.value") == ("att.key", "ffn.value")
    with pytest.raises(P.AdapterError, match="Did you mean att.key"):
        P.parse_targets("att.kye")
    with pytest.raises(P.AdapterError, match="empty"):
        P.parse_targets(" , ")
    with pytest.raises(P.AdapterError, match="Did you mean time"):
        P.parse_train_parts("ln,tiem")
    with pytest.raises(P.AdapterError, match="not supported"):
        P.AdapterSpec(init="pissa", use_dora=True)


def test_train_part_mapping():
    ln = ["blocks.0.ln0.weight", "blocks.1.ln2.bias", "blocks.3.att.ln_x.weight", "ln_out.bias"]
    time_ = ["blocks.0.att.x_r", "blocks.2.att.w1", "blocks.1.att.v2", "blocks.0.ffn.x_k",
             "blocks.0.att.r_k"]
    never = ["blocks.0.att.receptance.weight", "blocks.0.ffn.key.weight", "emb.weight"]
    for n in ln:
        assert P.train_part_of(n, ("ln", "time")) == "ln", n
    for n in time_:
        assert P.train_part_of(n, ("ln", "time")) == "time", n
    for n in never:
        assert P.train_part_of(n, ("ln", "time", "head")) is None, n
    assert P.train_part_of("emb.weight", ("emb",)) == "emb"


def test_lora_targets_only_named_linears_and_starts_at_base(tiny_model):
    base = _logits(tiny_model)
    spec = P.AdapterSpec(r=4, alpha=8, targets=("att.key", "ffn.value"))
    pm = P.apply_adapter(tiny_model, spec)
    names = {n for n, p in P.unwrap(pm).named_parameters() if p.requires_grad}
    L = 2
    assert len(names) == 2 * 2 * L  # lora_A + lora_B on 2 targets x 2 layers
    assert all(".att.key.lora_" in n or ".ffn.value.lora_" in n for n in names)
    assert all(p.dtype == torch.float32 for p in P.unwrap(pm).parameters() if p.requires_grad)
    assert torch.equal(_logits(pm), base)  # B = 0: adapter starts as the identity


def test_train_parts_are_trainable_and_exported_whole(tiny_model):
    spec = P.AdapterSpec(r=2, alpha=2, targets=("att.output",), train_parts=("ln", "head"))
    pm = P.apply_adapter(tiny_model, spec)
    trainable = {n for n, p in P.unwrap(pm).named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "blocks.1.att.ln_x.bias" in trainable
    assert "blocks.0.att.x_r" not in trainable and "emb.weight" not in trainable
    cfg, tensors = P.export_adapter(pm, spec)
    assert "base_model.model.head.weight" in tensors
    assert "base_model.model.blocks.0.ln0.weight" in tensors
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2


@pytest.mark.parametrize("init,dora", [("default", False), ("pissa", False), ("default", True)],
                         ids=["lora", "pissa", "dora"])
def test_export_merges_into_original_base(tiny_model, init, dora):
    """The exported adapter applied to the ORIGINAL weights reproduces the trained model:
    PiSSA is converted to a rank-2r LoRA, DoRA keeps its magnitudes."""
    base_sd = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ref = _logits(tiny_model)
    spec = P.AdapterSpec(r=4, alpha=8, init=init, use_dora=dora, train_parts=("ln",))
    pm = P.apply_adapter(tiny_model, spec)
    if init == "pissa":  # residual + B0 A0 == W: the untrained model is the base model
        torch.testing.assert_close(_logits(pm), ref, atol=2e-4, rtol=1e-4)
    _perturb(pm)
    trained = _logits(pm)
    cfg, tensors = P.export_adapter(pm, spec)
    if init == "pissa":
        assert cfg["r"] == 8 and cfg["lora_alpha"] == 16
        assert tensors["base_model.model.blocks.0.att.key.lora_A.weight"].shape[0] == 8
    merged = A.merge_state_dict(base_sd, A.adapter_from_peft(cfg, tensors), torch.float32)
    torch.testing.assert_close(_logits(model_from_state_dict(merged)), trained,
                               atol=2e-4, rtol=1e-4)


def test_adapter_files_load_with_peft_itself(tiny_model, tmp_path):
    """PEFT layout: peft's own PeftModel.from_pretrained reads our files and gives the
    same outputs as the model we trained."""
    from peft import PeftModel

    fresh = copy.deepcopy(tiny_model)
    spec = P.AdapterSpec(r=4, alpha=16, use_dora=True)
    pm = P.apply_adapter(tiny_model, spec)
    _perturb(pm, seed=3)
    cfg, tensors = P.export_adapter(pm, spec)
    A.save_adapter(tmp_path / "ad", cfg, tensors, {"note": "test"})
    back = A.read_adapter(tmp_path / "ad")
    assert back.metadata == {"note": "test"} and back.config["r"] == 4 and back.use_dora
    for key, f in back.factors.items():
        mod = A.PEFT_PREFIX + key[: -len(".weight")]
        assert torch.equal(f.A, tensors[mod + ".lora_A.weight"])
        assert torch.equal(f.B, tensors[mod + ".lora_B.weight"])
        assert torch.equal(f.magnitude, tensors[mod + ".lora_magnitude_vector"])
    assert 3 * len(back.factors) == len(tensors)
    loaded = PeftModel.from_pretrained(fresh, str(tmp_path / "ad"))
    torch.testing.assert_close(_logits(loaded), _logits(pm), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("quant,cls", [("nf4", "Linear4bit"), ("int8", "Linear8bitLt")])
def test_qlora_uses_bitsandbytes_layers_and_trains_adapters_only(tiny_model, quant, cls):
    import bitsandbytes as bnb

    ref = _logits(tiny_model)
    fp_bytes = sum(m.weight.numel() * 4 for n, m in tiny_model.named_modules()
                   if n in P.target_module_names(tiny_model, P.LORA_TARGETS))
    spec = P.AdapterSpec(r=4, alpha=8, quant=quant)
    pm = P.apply_adapter(tiny_model, spec, compute_dtype=torch.float32)
    inner = P.unwrap(pm)
    assert getattr(inner, f"is_loaded_in_{'4' if quant == 'nf4' else '8'}bit") is True
    layer = inner.blocks[1].att.key
    assert type(layer).__name__ == cls  # peft's bitsandbytes LoRA layer
    base_layer = layer.get_base_layer()
    assert isinstance(base_layer, bnb.nn.Linear4bit if quant == "nf4" else bnb.nn.Linear8bitLt)
    q_bytes = sum(m.get_base_layer().weight.numel() * m.get_base_layer().weight.element_size()
                  for n, m in inner.named_modules()
                  if n in P.target_module_names(inner, P.LORA_TARGETS))
    assert q_bytes <= fp_bytes / (7.9 if quant == "nf4" else 3.9)
    out = _logits(pm)
    rel = (out - ref).norm() / ref.norm()
    assert rel < (0.1 if quant == "nf4" else 0.03), float(rel)  # quantisation error only
    loss = P.unwrap(pm)(IDX)[0].float().logsumexp(-1).mean()
    loss.backward()
    grads = {n for n, p in inner.named_parameters() if p.grad is not None}
    assert grads and all("lora_" in n for n in grads)
    assert inner.blocks[0].att.key.lora_B["default"].weight.grad.abs().sum() > 0  # A: 0 (B=0)


def test_qlora_pissa_quantises_the_residual(tiny_model):
    import bitsandbytes as bnb

    ref = _logits(tiny_model)
    spec = P.AdapterSpec(r=8, alpha=8, init="pissa", quant="nf4")
    pm = P.apply_adapter(tiny_model, spec, compute_dtype=torch.float32)
    layer = P.unwrap(pm).blocks[0].ffn.key
    assert isinstance(layer.base_layer, bnb.nn.Linear4bit)
    # PiSSA moves the largest singular directions into the fp32 adapter, so the quantised
    # residual is smaller than W and the error of the untrained model is small
    rel = (_logits(pm) - ref).norm() / ref.norm()
    assert rel < 0.1, float(rel)


def test_trainable_state_roundtrip_and_mismatch(tiny_model):
    spec = P.AdapterSpec(r=4, alpha=8)
    a = P.apply_adapter(copy.deepcopy(tiny_model), spec)
    _perturb(a, seed=5)
    b = P.apply_adapter(copy.deepcopy(tiny_model), spec)
    P.load_trainable_state(b, P.trainable_state(a))
    assert torch.equal(_logits(a), _logits(b))
    c = P.apply_adapter(copy.deepcopy(tiny_model), P.AdapterSpec(r=8, alpha=8))
    with pytest.raises(P.AdapterError, match="shape"):
        P.load_trainable_state(c, P.trainable_state(a))
    d = P.apply_adapter(tiny_model, P.AdapterSpec(r=4, alpha=8, train_parts=("ln",)))
    with pytest.raises(P.AdapterError, match="missing"):
        P.load_trainable_state(d, P.trainable_state(a))


def test_merge_refuses_non_finite_and_wrong_base(tiny_model):
    base_sd = dict(tiny_model.state_dict())
    spec = P.AdapterSpec(r=2, alpha=2, targets=("att.key",))
    pm = P.apply_adapter(tiny_model, spec)
    cfg, tensors = P.export_adapter(pm, spec)
    bad = dict(tensors)
    k = next(k for k in bad if k.endswith("lora_B.weight"))
    bad[k] = torch.full_like(bad[k], float("nan"))
    with pytest.raises(A.NonFiniteError, match="NaN"):
        A.merge_state_dict(base_sd, A.adapter_from_peft(cfg, bad), torch.float32)
    small = {k: v for k, v in base_sd.items() if not k.startswith("blocks.1.")}
    with pytest.raises(A.MergeError, match="the base has only 1 layers"):
        A.merge_state_dict(small, A.adapter_from_peft(cfg, tensors), torch.float32)

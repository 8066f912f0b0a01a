"""loss.py: the chunked head + cross-entropy against the full one, its bf16 and native softmax
paths, the numerics of bf16 training and evaluation with 4-bit bases."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkvforge import config as cfgmod
from rwkvforge import loss as L
from rwkvforge.train import build_model

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("train_head", [False, True])
def test_chunked_head_loss_matches_full_cross_entropy(train_head):
    g = torch.Generator().manual_seed(0)
    B, Tn, C, V = 3, 7, 16, 50
    h = torch.randn(B, Tn, C, generator=g, requires_grad=True)
    head = torch.nn.Linear(C, V, bias=False)
    head.weight.requires_grad_(train_head)
    y = torch.randint(0, V, (B, Tn), generator=g)
    w = (torch.rand(B, Tn, generator=g) > 0.3).float() * 0.37
    loss = L.chunked_head_loss(h, head, y, w, chunk=4)  # 4 does not divide the token count
    ref = (F.cross_entropy(head(h).reshape(-1, V), y.reshape(-1), reduction="none")
           * w.reshape(-1)).sum()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    gh, = torch.autograd.grad(loss * 2.0, h, retain_graph=True)
    gh_ref, = torch.autograd.grad(ref * 2.0, h, retain_graph=True)
    torch.testing.assert_close(gh, gh_ref, atol=1e-5, rtol=1e-5)
    if train_head:
        gw, = torch.autograd.grad(loss, head.weight)
        gw_ref, = torch.autograd.grad(ref, head.weight)
        torch.testing.assert_close(gw, gw_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("V", [3000, 3008])
def test_chunked_head_loss_bf16_matmuls(V, monkeypatch):
    """bf16 matmuls (the bf16 profiles): the loss is exact for the bf16 logits; the gradient
    carries only the bf16 rounding of the softmax. Reused CPU scratch buffers: a second
    call with fewer tokens gives its own answer. V = 3008 (a multiple of 32) takes the C
    softmax where it builds, 3000 torch's log_softmax."""
    used = []
    real = L._softmax_bf16_
    monkeypatch.setattr(L, "_softmax_bf16_", lambda x: used.append(real(x)) or used[-1])
    g = torch.Generator().manual_seed(1)
    C = 32
    head = torch.nn.Linear(C, V, bias=False)
    head.weight.requires_grad_(False)
    for n in (37, 20):
        h = torch.randn(1, n, C, generator=g, requires_grad=True)
        y = torch.randint(0, V, (1, n), generator=g)
        w = torch.full((1, n), 1.0 / n)
        loss = L.chunked_head_loss(h, head, y, w, chunk=16, dtype=torch.bfloat16)
        logits = (h.bfloat16() @ head.weight.bfloat16().t()).float()
        ref = (F.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none")
               * w.reshape(-1)).sum()
        torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
        gh, = torch.autograd.grad(loss, h)
        gh_ref, = torch.autograd.grad(ref, h)
        assert (gh - gh_ref).abs().max() < 1e-2 * gh_ref.abs().max()
    kernel = V % 32 == 0 and L._softmax_lib() is not None
    assert used and all((x is not None) == kernel for x in used)


@pytest.mark.skipif(L._softmax_lib() is None, reason="no C compiler")
def test_native_bf16_softmax_matches_torch():
    """csrc/softmax_cpu.c against torch in fp32 on the same bf16 logits, extreme rows
    included (one dominant logit: the rest underflow to 0; all equal: uniform)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 4096, generator=g) * 4).bfloat16()
    x[0] = -30.0
    x[0, 7] = 90.0
    x[1] = 2.5
    x[2, ::3] = -1e4
    ref_lse = torch.logsumexp(x.float(), -1)
    ref_p = torch.softmax(x.float(), -1)
    p = x.clone()
    lse = L._softmax_bf16_(p)
    assert p.dtype == torch.bfloat16
    torch.testing.assert_close(lse, ref_lse, rtol=2e-6, atol=2e-6)
    # P rounded to bf16 once: within one bf16 step (2^-8 relative) of the exact value
    assert ((p.float() - ref_p).abs() <= ref_p * 2.0 ** -8 + 1e-30).all()
    assert p[0, 7] == 1.0 and (p[0, :7] == 0).all() and torch.equal(p[1], torch.full_like(
        p[1], 1 / 4096))
    torch.testing.assert_close(p.float().sum(-1), torch.ones(37), rtol=0, atol=2e-2)
    assert L._softmax_bf16_(torch.zeros(3, 40, dtype=torch.bfloat16)) is None  # 40 % 32


def test_chunked_head_loss_never_builds_full_logits(monkeypatch):
    """Every matmul against the head weight sees at most `chunk` tokens."""
    seen = []
    real = torch.Tensor.__matmul__

    def spy(a, b):
        out = real(a, b)
        if out.dim() == 2 and out.shape[-1] == 1000:
            seen.append(out.shape[0])
        return out

    real_mm = torch.mm

    def spy_mm(a, b, **kw):
        out = real_mm(a, b, **kw)
        if out.dim() == 2 and out.shape[-1] == 1000:
            seen.append(out.shape[0])
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    monkeypatch.setattr(torch, "mm", spy_mm)
    h = torch.randn(2, 300, 8, requires_grad=True)
    head = torch.nn.Linear(8, 1000, bias=False)
    loss = L.chunked_head_loss(h, head, torch.randint(0, 1000, (2, 300)), torch.ones(2, 300),
                               chunk=64)
    loss.backward()
    assert seen and max(seen) <= 64 and sum(seen) == 600


def test_bf16_training_skips_peft_input_casts(tiny_model_path):
    """Under bf16 autocast the LoRA layers take their bf16 input as it is (LossModule turns
    peft's cast to the adapters' fp32 off): the same loss and gradients bit for bit, with two
    fewer full-size copies per adapter in the forward alone."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from rwkvforge.peft import target_module_names, unwrap

    class CountCopies(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket is torch.ops.aten._to_copy and args[0].dim() == 3:
                CountCopies.n += 1  # (B, T, C) activations, not the small weights
            return func(*args, **(kwargs or {}))

    s = cfgmod.Settings(lora_r=8, lora_alpha=16.0, precision="bf16", head_chunk=64)
    pm, _, _ = build_model(s, tiny_model_path, torch.device("cpu"))
    torch.manual_seed(0)
    for p in pm.parameters():
        if p.requires_grad:  # lora_B starts at zero: give every adapter a gradient path
            p.data.normal_(0, 0.02)
    x, y = torch.randint(0, 65536, (2, 33)), torch.randint(0, 65536, (2, 33))
    w = torch.full(x.shape, 1 / 66)
    lora_layers = [m for m in pm.modules() if hasattr(m, "cast_input_dtype_enabled")]
    runs = {}
    for cast in (True, False):
        lm = L.LossModule(pm, 64, torch.bfloat16)
        assert all(not m.cast_input_dtype_enabled for m in lora_layers)
        for m in lora_layers:
            m.cast_input_dtype_enabled = cast  # True: what peft does on its own
        CountCopies.n = 0
        with L.autocast_ctx(torch.device("cpu"), "bf16"), CountCopies():
            loss = lm(x, y, w)
        copies = CountCopies.n
        loss.backward()
        runs[cast] = (loss.item(), copies,
                      [p.grad.clone() for p in pm.parameters() if p.requires_grad])
        pm.zero_grad(set_to_none=True)
    (l0, c0, g0), (l1, c1, g1) = runs[True], runs[False]
    assert l1 == l0 and all(torch.equal(a, b) for a, b in zip(g0, g1))
    n_adapters = len(target_module_names(unwrap(pm), s.lora_targets.split(",")))
    assert n_adapters == 6 * 2 and c1 <= c0 - 2 * n_adapters, (c0, c1)


def test_evaluation_keeps_4bit_backward_intact(tiny_model_path):
    """bitsandbytes repacks 4-bit CPU weights for an inference-only kernel when run in eval
    mode; evaluate_loss must not trigger that, or later gradients through the frozen base
    would be lost."""
    from rwkvforge.peft import unwrap

    s = cfgmod.resolve(profile="qlora-nf4", cli={"lora_r": 4, "precision": "fp32"}, env={},
                       root=ROOT).settings
    pm, _, _ = build_model(s, tiny_model_path, torch.device("cpu"))
    lm = L.LossModule(pm, 256, torch.float32)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 65536, (1, 16), generator=g)
    y = torch.randint(0, 65536, (1, 16), generator=g)
    w = torch.ones(1, 16)
    with torch.no_grad():  # give lora_B a value so grads reach lora_A and earlier layers
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02, generator=g)

    def grads():
        pm.zero_grad()
        lm(x, y, w).backward()
        return {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}

    before = grads()
    L.evaluate_loss(pm, [{"input_ids": x, "targets": y, "loss_mask": w}], 256, "fp32")
    after = grads()
    assert unwrap(pm).training
    first = "base_model.model.blocks.0.att.key.lora_A.default.weight"
    assert before[first].abs().sum() > 0
    for n in before:
        torch.testing.assert_close(after[n], before[n], rtol=1e-4, atol=1e-6)

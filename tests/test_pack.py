"""Packed rows (PACK=1): every WKV kernel and the token shift restart at a document start, so a
packed row computes exactly what its documents compute one by one.

Kernel level: a (B, T) row of several documents with `reset` against each document run alone
(y, final state and all gradients). Model level: the masked loss of a packed batch against the
sum of the examples' losses, each run alone, per kernel, and its gradients; the same check with
the reset dropped from one kernel or from the token shift fails (so the test can fail).
fla's varlen path is checked under Triton's interpreter in tests/test_pack_fla.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from rwkvforge.model import rwkv7 as M
from rwkvforge.model import wkv as W

# two rows of 43 tokens; row 0 continues the given state (no reset at t=0), row 1 drops it.
# Documents cross 8- and 16-step chunk edges, start on one (t=16 of row 1: 3 + 13) and one
# is a single token.
DOCS = ([5, 17, 1, 20], [3, 13, 27])
T_ROW = 43
N = 64  # the C kernel's head size


def _inputs(B, T, H, seed):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, H, N, generator=g)
    k = torch.randn(B, T, H, N, generator=g) * 0.5
    v = torch.randn(B, T, H, N, generator=g)
    log_w = -0.606531 * torch.sigmoid(torch.randn(B, T, H, N, generator=g) * 3)
    kk = F.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    iclr = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    s0 = torch.randn(B, H, N, N, generator=g) * 0.5
    return [x.clone().requires_grad_(True) for x in (r, log_w, k, v, -kk, kk * iclr, s0)]


def _reset(first_reset=(False, True)):
    reset = torch.zeros(len(DOCS), T_ROW, dtype=torch.bool)
    for b, lens in enumerate(DOCS):
        t = 0
        for n in lens:
            reset[b, t] = t > 0 or first_reset[b]
            t += n
    return reset


KERNELS = {
    "ref": W.wkv_ref,
    "chunked8": lambda *a, **k: W.wkv_chunked(*a, chunk_size=8, **k),
    "chunked32": W.wkv_chunked,
    "native": W.wkv_native,
}


def _grads(xs):
    out = [x.grad.clone() for x in xs]
    for x in xs:
        x.grad = None
    return out


def documents_alone(fn, xs, reset, gy, gs, start):
    """Each document of the DOCS rows through `fn` alone, from `start` (None: zero; else a
    tensor (H,N,N)), a row's first document without a reset from the row state xs[6]; the
    outputs and final states weighted by the cotangents gy / gs as the packed call's are, and
    backward run. Returns (y, final states) laid out as the packed call's."""
    ys, ss, total = torch.zeros_like(gy), torch.zeros_like(gs), 0.0
    for b, lens in enumerate(DOCS):
        t = 0
        for i, n in enumerate(lens):
            part = [x[b:b + 1, t:t + n] for x in xs[:6]]
            first = t == 0 and not reset[b, 0]
            yd, sd = fn(*part, xs[6][b:b + 1] if first else
                        None if start is None else start[None])
            total = total + (yd * gy[b:b + 1, t:t + n]).sum()
            ys[b, t:t + n] = yd[0].detach()
            if i == len(lens) - 1:
                total = total + (sd * gs[b:b + 1]).sum()
                ss[b] = sd[0].detach()
            t += n
    total.backward()
    return ys, ss


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_packed_row_equals_documents_alone(kernel):
    if kernel == "native" and not W.native_available():
        pytest.skip("the C kernel does not build here")
    fn = KERNELS[kernel]
    xs = _inputs(2, T_ROW, 2, seed=3)
    g = torch.Generator().manual_seed(4)
    gy = torch.randn(2, T_ROW, 2, N, generator=g)
    gs = torch.randn(2, 2, N, N, generator=g)
    reset = _reset()

    y, s = fn(*xs[:6], xs[6], reset=reset)
    ((y * gy).sum() + (s * gs).sum()).backward()
    packed = (y.detach(), s.detach(), _grads(xs))

    ys, ss = documents_alone(fn, xs, reset, gy, gs, None)
    alone = (ys, ss, _grads(xs))

    # fp32 rounding: ref and the C kernel run the same operations on the same numbers either
    # way (the reset only zeroes a state); the chunked form regroups sums over other chunk
    # edges: |y| ~ 10, ~N*L products per term at 2^-24 each -> well under 1e-4 relative
    torch.testing.assert_close(packed[0], alone[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(packed[1], alone[1], rtol=1e-4, atol=1e-4)
    for name, p, a in zip(("r", "log_w", "k", "v", "a", "b", "state"), packed[2], alone[2]):
        torch.testing.assert_close(p, a, rtol=2e-4, atol=2e-4, msg=name)
    assert packed[2][6][1].abs().max() == 0  # row 1 resets at t=0: its given state is unused

    # without the reset the packed row is a different computation (what the test guards)
    y2, _ = fn(*[x.detach() for x in xs], reset=None)
    assert (y2 - alone[0]).abs().max() > 1e-2


def test_reset_mask_shape_is_checked():
    xs = [x.detach() for x in _inputs(2, 5, 1, seed=0)]
    with pytest.raises(ValueError, match=r"reset mask has shape \(2, 4\), expected \(B, T\)"):
        W.wkv_ref(*xs, reset=torch.zeros(2, 4, dtype=torch.bool))


def test_no_reset_changes_nothing():
    """reset=None, or an all-False mask, gives bit-identical results to the unmasked call."""
    xs = [x.detach() for x in _inputs(2, 37, 2, seed=5)]
    none = torch.zeros(2, 37, dtype=torch.bool)
    for name, fn in KERNELS.items():
        if name == "native" and not W.native_available():
            continue
        y0, s0 = fn(*xs)
        y1, s1 = fn(*xs, reset=none)
        assert torch.equal(y0, y1) and torch.equal(s0, s1), name


def test_token_shift_is_zero_before_a_document_start():
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    shift = torch.full((2, 3), -1.0)
    reset = torch.tensor([[False, False, True, False, False], [True, False, False, True, False]])
    prev = M.token_shift(x, shift, reset)
    assert torch.equal(prev[0, 0], shift[0]) and torch.equal(prev[0, 1], x[0, 0])
    assert prev[0, 2].abs().max() == 0 and prev[1, 0].abs().max() == 0
    assert prev[1, 3].abs().max() == 0 and torch.equal(prev[1, 4], x[1, 3])
    assert torch.equal(M.token_shift(x, shift), M.token_shift(x, shift, torch.zeros_like(reset)))


# ---- model level: packed loss = sum of the examples' losses ---------------------------------------

def _examples():
    """Four 'examples' (ids ending with 0, 0/1 loss masks on the answer part)."""
    g = torch.Generator().manual_seed(11)
    out = []
    for n, prompt in ((9, 4), (23, 10), (2, 1), (30, 7)):
        ids = torch.randint(1, 65536, (n,), generator=g)
        ids[-1] = 0
        mask = torch.zeros(n)
        mask[prompt:] = 1
        out.append((ids, mask))
    return out


def _packed_batch(examples, T):
    """One packed row the way data/loader.py builds it: inputs, targets, loss mask (0 where
    the target is the next example's first token) and the reset mask."""
    from rwkvforge.data.loader import pack_rows

    rows = [(e[0].numpy(), e[1].numpy().astype("uint8")) for e in examples]
    return pack_rows([rows], T)


def _token_losses(model, x, y, m, reset=None):
    """Masked per-token cross-entropy of the model's head, (n,) over the masked tokens."""
    h, _ = model.forward_hidden(x, reset=reset)
    ce = F.cross_entropy(model.head(h).float().flatten(0, 1), y.flatten(), reduction="none")
    return ce[m.flatten() > 0]


MODEL_KERNELS = ["ref", "chunked", "native"]


def _packed_vs_alone(model, impl):
    """Per-token losses and gradients of a packed row and of its examples run alone."""
    model.wkv_impl = impl
    model.wkv_chunk = 8  # documents cross chunk edges
    ex = _examples()
    batch = _packed_batch(ex, 64)
    params = [p for p in model.parameters() if p.requires_grad]
    packed = _token_losses(model, batch["input_ids"], batch["targets"], batch["loss_mask"],
                           batch["reset"])
    gp = torch.autograd.grad(packed.sum(), params)
    alone = torch.cat([_token_losses(model, ids[None, :-1], ids[None, 1:], mask[None, 1:])
                       for ids, mask in ex])
    ga = torch.autograd.grad(alone.sum(), params)
    grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(gp, ga))
    return packed.detach(), alone.detach(), grad_diff


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from rwkvforge.checkpoint import load_model

    m = load_model(tiny_model_path)
    m.train()
    return m


@pytest.mark.parametrize("impl", MODEL_KERNELS)
def test_packed_loss_and_gradients_equal_examples_alone(model, impl):
    if impl == "native" and not W.native_available():
        pytest.skip("the C kernel does not build here")
    packed, alone, grad_diff = _packed_vs_alone(model, impl)
    assert packed.shape == alone.shape == (sum(int(e[1][1:].sum()) for e in _examples()),)
    # fp32: the same tokens, the same operations up to the chunk edges (chunked) and the
    # batch shape of the matmuls: per-token losses (~11 nats) agree to a few ulp, 2^-24 * 11
    # * a few ~ 1e-6 (measured <= 4e-6); the sum over the ~60 tokens to ~60 x that
    torch.testing.assert_close(packed, alone, rtol=0, atol=2e-5)
    assert abs(float(packed.sum() - alone.sum())) <= 1e-5 * float(alone.sum())
    assert grad_diff < 1e-4, grad_diff


def _drop_kernel_reset(monkeypatch, impl):
    name = {"ref": "wkv_ref", "chunked": "wkv_chunked", "native": "wkv_native"}[impl]
    orig = getattr(W, name)
    def no_reset(*args, reset=None, **kw):  # noqa: ARG001 - the reset, dropped
        return orig(*args[:7], **kw)  # r, log_w, k, v, a, b, state (a positional reset too)

    monkeypatch.setattr(W, name, no_reset)


@pytest.mark.parametrize("drop", ["ref", "chunked", "native", "token_shift"])
def test_dropping_any_one_reset_breaks_the_equality(model, monkeypatch, drop):
    """The equality above depends on each reset: without it (one kernel, or the token shift
    with the kernel's reset kept) the packed loss is another number."""
    impl = "chunked" if drop == "token_shift" else drop
    if impl == "native" and not W.native_available():
        pytest.skip("the C kernel does not build here")
    if drop == "token_shift":
        orig = M.token_shift
        monkeypatch.setattr(M, "token_shift", lambda x, shift, reset=None: orig(x, shift))  # noqa: ARG005
    else:
        _drop_kernel_reset(monkeypatch, impl)
    packed, alone, _ = _packed_vs_alone(model, impl)
    # measured: some tokens' losses move by 0.05-1 nats without the reset; 1e-2 is 500x the
    # equality test's tolerance
    assert (packed - alone).abs().max() > 1e-2, (packed - alone).abs().max()


# ---- a training run with PACK=1 ------------------------------------------------------------------

def test_training_with_pack_trains_the_examples_own_loss(tiny_model_path, sft_prefix, tmp_path,
                                                         one_torch_thread):
    """`rwkvforge train` with PACK=1 (fp32, 2 steps): the first step's logged loss (LoRA B = 0:
    the base model) is the mean token loss of the first batch's examples, each run alone."""
    import json
    from pathlib import Path

    from rwkvforge import config as cfgmod
    from rwkvforge import train as T
    from rwkvforge.checkpoint import load_model
    from rwkvforge.data.loader import build_train_loader, open_split

    root = Path(__file__).resolve().parents[1]
    cli = {"base_model": str(tiny_model_path), "data_prefix": str(sft_prefix),
           "runs_dir": str(tmp_path), "ctx_len": 512, "micro_bsz": 2, "grad_accum": 1,
           "lora_r": 8, "lora_alpha": 16, "warmup_steps": 1, "head_chunk": 256,
           "eval_every": 0, "max_steps": 2, "save_every": 0, "precision": "fp32",
           "pack": True}
    run = tmp_path / "packed"
    T.Trainer(cfgmod.resolve(cli=cli, env={}, root=root), run, root=root, progress=False).run()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]

    ld = build_train_loader(sft_prefix, 512, 2, seed=cfgmod.resolve(cli=cli, env={}, root=root)
                            .settings.seed, pack=True)
    split, plan = open_split(sft_prefix), ld._plan(0)[:2]
    assert sum(len(r) for r in plan) > 2  # the first step packs more than one example a row
    model = load_model(tiny_model_path)
    total, count = 0.0, 0.0
    with torch.no_grad():
        for i in (i for row in plan for i in row):
            ids, mask = (torch.from_numpy(a.astype("int64")) for a in split.item(i, 513))
            h, _ = model.forward_hidden(ids[None, :-1])
            ce = F.cross_entropy(model.head(h)[0].float(), ids[1:], reduction="none")
            total += float((ce * mask[1:]).sum())
            count += float(mask[1:].sum())
    assert rows[0]["loss"] == pytest.approx(total / count, rel=1e-5)


def test_memory_planner_counts_packing(tiny_model):
    """PACK=1: the planner adds the reset mask (and wkv_chunked's document masks) and says that
    every row is CTX_LEN tokens; PACK=0 is unchanged."""
    from rwkvforge import memory

    cfg = tiny_model.config
    for impl in ("chunked", "native"):
        base = {"ctx_len": 512, "micro_bsz": 4, "wkv_impl": impl, "data_type": "sft"}
        off = memory.estimate(cfg, {**base, "pack": False}, device="cpu")
        on = memory.estimate(cfg, {**base, "pack": True}, device="cpu")
        extra = on.items["activations"] - off.items["activations"]
        per_layer_chunked = memory.ACT_WKV_PACK_CHUNKED * cfg.n_embd * cfg.n_layer
        assert extra == int(4 * 512 * (1 + (per_layer_chunked if impl == "chunked" else 0)))
        assert "PACK=1" in on.notes["activations"] and "PACK=1" not in off.notes["activations"]
        assert memory.estimate(cfg, base, device="cpu").items == off.items


# ---- PACK=1 under torch.compile and DeepSpeed ----------------------------------------------------

PACK_RUN = {"ctx_len": 512, "micro_bsz": 2, "grad_accum": 1, "lora_r": 8, "lora_alpha": 16,
            "lora_dropout": 0.0, "warmup_steps": 0, "lr": 3e-3, "lr_schedule": "constant",
            "head_chunk": 256, "eval_every": 0, "save_every": 0, "log_every": 1,
            "precision": "fp32", "pack": True}


def _pack_losses(tiny_model_path, sft_prefix, run, **over):
    import json
    from pathlib import Path

    from rwkvforge import config as cfgmod
    from rwkvforge import train as T

    root = Path(__file__).resolve().parents[1]
    cli = {"base_model": str(tiny_model_path), "data_prefix": str(sft_prefix),
           "runs_dir": str(run.parent), **PACK_RUN, **over}
    T.Trainer(cfgmod.resolve(cli=cli, env={}, root=root), run, root=root, progress=False).run()
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_packed_rows_train_alike_compiled_and_eager(tiny_model_path, sft_prefix, tmp_path,
                                                    one_torch_thread):
    """COMPILE=1 with PACK=1: the compiled blocks take the reset mask (the token shift's
    traced form and the WKV kernel's reset) and train the same losses as eager, up to the
    rounding of inductor's fused loops."""
    eager = _pack_losses(tiny_model_path, sft_prefix, tmp_path / "eager", max_steps=3)
    comp = _pack_losses(tiny_model_path, sft_prefix, tmp_path / "comp", max_steps=3,
                        compile=True)
    assert "compiled during the first step" in (tmp_path / "comp" / "train.log").read_text()
    # fp32: per-token losses (~11 nats) differ by a few ulp of fused vs unfused ops; the step
    # losses, means over ~1000 tokens, by far less than 1e-5 relative at step 1. Steps 2-3
    # follow updates taken from those gradients (lr 3e-3): allow 1e-4 relative, as
    # tests/test_train.py's compiled-vs-eager run does
    assert len(comp) == len(eager) == 3 and eager[0] != eager[-1]
    assert comp[0] == pytest.approx(eager[0], rel=1e-5)
    assert comp == pytest.approx(eager, rel=1e-4)


@pytest.mark.slow
def test_packed_rows_train_alike_under_deepspeed(tiny_model_path, sft_prefix, tmp_path):
    """PACK=1 under DeepSpeed ZeRO-2 (one process over gloo: DeepSpeed's engine, its
    optimiser and its gradient path) == the same run without DeepSpeed: the engine passes
    the reset mask on to the loss module and trains the same losses."""
    import json
    import subprocess

    from test_train import _train_cmd, sub_env

    env = sub_env()
    over = [f"--{k.replace('_', '-')}={v}" for k, v in PACK_RUN.items()]
    over = [a.replace("=True", "=1") for a in over] + ["--max-steps=3"]
    runs = {}
    for name, extra in (("one", []), ("ds", ["--deepspeed-stage=2"])):
        r = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, name, *over,
                                      *extra), env=env, capture_output=True, text=True,
                           timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[name] = [json.loads(x)["loss"] for x in
                      (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert (tmp_path / "ds" / "checkpoints" / "step-3" / "deepspeed").is_dir()  # its engine
    # fp32, the same rows and the same forward; DeepSpeed keeps fp32 gradients and runs its
    # own Adam step (another order of the same operations): 1e-4 relative as
    # tests/test_distributed.py allows
    assert len(runs["one"]) == 3 and runs["ds"] == pytest.approx(runs["one"], rel=1e-4)

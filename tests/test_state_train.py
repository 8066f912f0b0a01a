"""State tuning (TRAIN_TYPE=state / lora+state) through the real trainer: only the initial
states change (every weight bit-identical), the held-out loss drops, the run writes state/ in
the RWKV-PEFT / rwkv pip / ai00 layouts, resume continues, QUANT and DPO work.

Runs use the tiny fixture model (L2 C128, real 65536 vocabulary; the learning test: the demo
model, L4 C256) and the shipped SFT sample.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rwkvforge import config as cfgmod
from rwkvforge import state_tuning as ST
from rwkvforge import train as T
from rwkvforge.checkpoint import load_model

ROOT = Path(__file__).resolve().parents[1]
FAST = {"ctx_len": 48, "micro_bsz": 2, "grad_accum": 1, "warmup_steps": 0, "head_chunk": 256,
        "log_every": 1, "eval_every": 0, "save_every": 0}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def resolved(model_path, prefix, runs, profile="state", **over):
    cli = {"base_model": str(model_path), "data_prefix": str(prefix), "runs_dir": str(runs),
           **FAST, **over}
    return cfgmod.resolve(profile=profile, cli=cli, env={}, root=ROOT)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()
            if not k.endswith(".time_state")}


def test_profile_and_settings():
    res = cfgmod.resolve(profile="state", cli={}, env={}, root=ROOT)
    assert res.settings.train_type == "state" and "profile/state.env" in res.sources["TRAIN_TYPE"]
    with pytest.raises(cfgmod.ConfigError, match="TRAIN_TYPE"):
        cfgmod.resolve(cli={"train_type": "states"}, env={}, root=ROOT)
    for bad, msg in (({"train_parts": "ln"}, "TRAIN_TYPE=lora\\+state"),
                     ({"deepspeed_stage": 3}, "DEEPSPEED_STAGE=2")):
        s = cfgmod.Settings(train_type="state", **bad)
        with pytest.raises(T.TrainError, match=msg):
            T.check_combination(s)


def test_state_only_model_trains_only_the_state(tiny_model_path):
    s = cfgmod.Settings(train_type="state", precision="fp32")
    model, _, cfg = T.build_model(s, tiny_model_path, torch.device("cpu"))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [f"blocks.{i}.att.time_state" for i in range(cfg.n_layer)]
    groups = ST.optimizer_groups(model, cfgmod.Settings(lr=1.0, state_lr=0.5))
    assert len(groups) == 1 and groups[0]["lr"] == 0.5
    # lora+state: the adapters and the states, at their own rates
    s2 = cfgmod.Settings(train_type="lora+state", precision="fp32", lora_r=4, lr=1e-3,
                         state_lr=0.1)
    pm, _, _ = T.build_model(s2, tiny_model_path, torch.device("cpu"))
    trained = [n for n, p in pm.named_parameters() if p.requires_grad]
    assert sum(n.endswith(".time_state") for n in trained) == cfg.n_layer
    assert any("lora_A" in n for n in trained)
    lrs = sorted(g["lr"] for g in T.make_optimizer(pm, s2).param_groups)
    assert lrs == [1e-3, 0.1]


@pytest.fixture(scope="module")
def demo_model_path(tmp_path_factory):
    """The workspace's random-weight demo model (demo.py: L4 C256, the real vocabulary)."""
    from rwkvforge.demo import TINY_SHAPE, write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("demo") / "rwkv7-tiny-demo.pth",
                            *TINY_SHAPE)[0]


@pytest.mark.slow
def test_state_tuning_learns_and_leaves_weights_bit_identical(demo_model_path, sft_prefix,
                                                             tmp_path):
    """The learning test, on the demo model and the shipped SFT sample: 30 steps of the state
    profile (LR 1 -> 0.01, fp32, ctx 48, 2 rows per step) lower the held-out loss by at least
    1.0 nat (measured: 11.63 -> 9.43, a 2.20 drop; the tiny L2 C128 model: 0.84), and every
    weight of the model after training equals the base file's bit for bit."""
    run = tmp_path / "st"
    tr = T.Trainer(resolved(demo_model_path, sft_prefix, tmp_path, max_steps=30,
                            precision="fp32"), run, root=ROOT, progress=False)
    res = tr.run()
    base = load_model(demo_model_path)
    after = weights(tr.inner)
    assert after.keys() == weights(base).keys()
    for k, v in weights(base).items():
        assert torch.equal(after[k], v), k
    assert res.val_loss_end < res.val_loss_start - 1.0, (res.val_loss_start, res.val_loss_end)
    # outputs: no adapter, the state in three layouts
    assert not (run / "adapter").exists()
    wkv = tr.inner.initial_wkv().detach()
    assert wkv.abs().max() > 0
    sd = torch.load(run / "state" / ST.STATE_PTH, weights_only=True)
    assert sorted(sd) == [f"blocks.{i}.att.time_state" for i in range(4)]
    assert torch.equal(torch.stack([sd[f"blocks.{i}.att.time_state"] for i in range(4)]), wkv)
    pip = torch.load(run / "state" / ST.RWKV_PIP_STATE, weights_only=True)
    assert len(pip) == 12 and torch.equal(pip[4], wkv[1]) and not pip[3].any()
    meta = json.loads((run / "state" / ST.STATE_JSON).read_text())
    assert meta["train_type"] == "state" and meta["step"] == 30
    assert torch.equal(ST.read_state(run), wkv)
    log = (run / "train.log").read_text()
    assert f"state {run / 'state'}" in log and "rwkvforge infer --state" in log


@pytest.mark.slow
def test_state_resume_matches_uninterrupted(tiny_model_path, sft_prefix, tmp_path):
    """6 steps straight == the same run stopped after its step-3 checkpoint, then --resume:
    the same tuned state (fp32; the state comes back from trainer_state.pt)."""
    straight = tmp_path / "a"
    T.Trainer(resolved(tiny_model_path, sft_prefix, tmp_path, max_steps=6, precision="fp32"),
              straight, root=ROOT, progress=False).run()
    split = tmp_path / "b"

    def stop(step, index, micro_bsz):  # noqa: ARG001
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        T.Trainer(resolved(tiny_model_path, sft_prefix, tmp_path, max_steps=6, save_every=3,
                           precision="fp32"), split, root=ROOT, progress=False,
                  on_micro_batch=stop).run()
    assert (split / "checkpoints" / "step-3" / "state" / ST.STATE_PTH).is_file()
    assert not (split / "state").exists()
    args = T.build_parser().parse_args(["--resume", str(split)])
    res = T.resolve_for_resume(split, args)
    T.Trainer(res, split, resume=True, root=ROOT, progress=False).run()
    a, b = ST.read_state(straight), ST.read_state(split)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (a - b).abs().max()
    assert json.loads((split / "state" / ST.STATE_JSON).read_text())["step"] == 6


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["nf4", "int8"])
def test_state_tuning_on_quantised_base(tiny_model_path, sft_prefix, tmp_path, quant):
    """QUANT=nf4 / int8 (bitsandbytes on the CPU): the base Linears are quantised and frozen,
    the state trains, the held-out loss drops."""
    run = tmp_path / quant
    tr = T.Trainer(resolved(tiny_model_path, sft_prefix, tmp_path, max_steps=8, quant=quant),
                   run, root=ROOT, progress=False)
    res = tr.run()
    kinds = {type(m).__name__ for m in tr.inner.modules()}
    assert ("Linear4bit" if quant == "nf4" else "Linear8bitLt") in kinds
    assert [n for n, p in tr.inner.named_parameters() if p.requires_grad] == [
        "blocks.0.att.time_state", "blocks.1.att.time_state"]
    assert res.val_loss_end < res.val_loss_start
    assert (run / "state" / ST.STATE_PTH).is_file()


@pytest.mark.slow
def test_lora_plus_state_writes_both(tiny_model_path, sft_prefix, tmp_path):
    """TRAIN_TYPE=lora+state: an adapter without the states (it merges like any adapter) and
    the state folder; base + adapter + state loads back to the trained model's logits."""
    from rwkvforge.adapter import load_with_adapter, read_adapter

    run = tmp_path / "ls"
    tr = T.Trainer(resolved(tiny_model_path, sft_prefix, tmp_path, max_steps=4,
                            train_type="lora+state", lora_r=4, lr=1e-3, state_lr=0.5,
                            precision="fp32"), run, root=ROOT, progress=False)
    tr.run()
    ad = read_adapter(run)
    assert ad.factors and not any("time_state" in k for k in ad.replacements)
    model = load_with_adapter(tiny_model_path, run)
    ST.load_state_into(model, run)
    ids = torch.tensor([[11, 45, 300, 7, 900, 12]])
    tr.inner.eval()
    with torch.no_grad():
        want, _ = tr.inner(ids)  # (peft put the adapters into the RWKV7's own modules)
        got, _ = model(ids)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_memory_planner_counts_the_state(tiny_model_path):
    """memory.estimate: TRAIN_TYPE=state trains L x H x N x N fp32 numbers (no adapters);
    lora+state adds them to the adapters; the model's own trainable count agrees."""
    from rwkvforge import memory as M
    from rwkvforge.checkpoint import infer_config, load_state_dict

    cfg = infer_config(load_state_dict(tiny_model_path))
    n_state = cfg.n_layer * cfg.n_head * cfg.head_size ** 2
    kw = dict(precision="fp32", lora_r=4)
    lora = M.estimate(cfg, dict(kw, train_type="lora"), device="cpu")
    state = M.estimate(cfg, dict(kw, train_type="state"), device="cpu")
    both = M.estimate(cfg, dict(kw, train_type="lora+state"), device="cpu")
    assert state.items["adapter"] == 4 * n_state
    assert state.items["optimizer"] == 8 * n_state
    assert both.items["adapter"] == lora.items["adapter"] + 4 * n_state
    assert "initial state 2x64x64 x 2 layers" in state.notes["adapter"]
    model, _, _ = T.build_model(cfgmod.Settings(train_type="state", precision="fp32"),
                                tiny_model_path, torch.device("cpu"))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == n_state
    with pytest.raises(M.MemoryPlanError, match="TRAIN_TYPE"):
        M.estimate(cfg, dict(kw, train_type="prefix"), device="cpu")


@pytest.mark.slow
def test_state_tuning_with_dpo(tiny_model_path, tmp_path_factory, tmp_path):
    """DATA_TYPE=dpo with TRAIN_TYPE=state: the reference is the untuned model (zero state), so
    the held-out DPO loss starts at ln 2 exactly and the tuned state lowers it."""
    from sample_data import prepare_sample

    ln2 = 0.6931471805599453
    prefix = prepare_sample(tmp_path_factory, "bsl_dpo", "dpo", 0.15)
    run = tmp_path / "dpo"
    out = T.Trainer(resolved(tiny_model_path, prefix, tmp_path, max_steps=12, micro_bsz=4,
                             ctx_len=160, precision="fp32", lr_schedule="constant",
                             data_type="dpo"), run, root=ROOT, progress=False).run()
    assert out.val_loss_start == pytest.approx(ln2, abs=1e-6)
    assert out.val_loss_end < ln2 - 0.01, out.val_loss_end
    assert (run / "state" / ST.STATE_PTH).is_file() and not (run / "adapter").exists()


@pytest.mark.slow
def test_state_tuning_under_deepspeed_matches_one_process(tiny_model_path, sft_prefix,
                                                          tmp_path):
    """DeepSpeed ZeRO-2 over gloo, 2 processes x MICRO_BSZ 1 == 1 process x MICRO_BSZ 2: the
    same losses and the same tuned state."""
    import subprocess

    from test_train import _train_cmd, metrics, sub_env

    env = sub_env()
    base = ("--profile=state", "--max-steps=3", "--save-every=0", "--warmup-steps=0")
    one = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "one", *base,
                                    "--micro-bsz=2"), env=env, capture_output=True, text=True,
                         timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "two", *base,
                                    "--micro-bsz=1", "--deepspeed-stage=2", "--num-gpus=2"),
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-4000:]
    a = [r["loss"] for r in metrics(tmp_path / "one")]
    b = [r["loss"] for r in metrics(tmp_path / "two")]
    assert len(a) == 3 and b == pytest.approx(a, rel=1e-4)
    sa, sb = ST.read_state(tmp_path / "one"), ST.read_state(tmp_path / "two")
    assert sa.abs().max() > 0
    torch.testing.assert_close(sb, sa, rtol=1e-4, atol=1e-5)


def test_rwkv_peft_trainer_gets_train_type_state():
    """TRAINER=rwkv-peft: TRAIN_TYPE=state becomes RWKV-PEFT's --train_type state (no adapter);
    lora+state, which it has no form for, is refused."""
    from rwkvforge import upstream as U
    from rwkvforge.model.rwkv7 import RWKV7Config

    cfg = RWKV7Config.suggested(24, 2048)
    s = cfgmod.resolve(profile="state", cli={}, env={}, root=ROOT).settings
    argv = U.rwkv_peft_command(s, Path("/m"), Path("/d"), cfg, Path("/o"), Path("/tp"))
    opt = {argv[i]: argv[i + 1] for i in range(2, len(argv) - 1) if argv[i].startswith("--")}
    assert opt["--train_type"] == "state" and opt["--peft"] == "none"
    assert float(opt["--lr_init"]) == 1.0 and "--lora_config" not in opt
    both = cfgmod.resolve(cli={"train_type": "lora+state"}, env={}, root=ROOT).settings
    with pytest.raises(U.UpstreamError, match="TRAIN_TYPE=lora\\+state has no RWKV-PEFT"):
        U.rwkv_peft_command(both, Path("/m"), Path("/d"), cfg, Path("/o"), Path("/tp"))

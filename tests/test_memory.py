"""The memory planner: VRAM parsing, monotonicity, the constants against the real model,
preflight refusal, the CLI, and calibration of predicted vs measured peak on the CPU."""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from rwkvforge import memory
from rwkvforge.memory import GiB, MiB, MemoryPlanError, Workload, estimate, parse_vram

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "memory_bench.py"


# ----------------------------------------------------------------------------- parsing
@pytest.mark.parametrize("text,expected", [
    ("12GiB", 12 * 2**30), ("12GB", 12 * 10**9), ("12000MiB", 12000 * 2**20),
    ("11.5 GiB", int(11.5 * 2**30)), ("12g", 12 * 2**30), ("8192MB", 8192 * 10**6),
])
def test_parse_vram(text, expected):
    assert parse_vram(text) == expected


@pytest.mark.parametrize("text", ["12", "", "twelve GiB", "12 XB", "-1GiB"])
def test_parse_vram_rejects(text):
    with pytest.raises(MemoryPlanError, match="VRAM"):
        parse_vram(text)


# ----------------------------------------------------------------------------- shapes
def test_size_configs_follow_blinkdl_formulas():
    c = memory.size_config("1.5b")
    assert (c.n_layer, c.n_embd, c.dim_ffn, c.vocab_size) == (24, 2048, 8192, 65536)
    assert (c.d_decay, c.d_aaa, c.d_mv, c.d_gate) == (96, 96, 64, 256)
    small = memory.size_config("rwkv7-g1-0.1B")
    assert (small.d_decay, small.d_aaa, small.d_mv, small.d_gate) == (64, 64, 32, 128)
    # nominal sizes: within 10% of the name (the name counts the model, emb+head included)
    for name, nominal in (("0.1b", 0.19e9), ("0.4b", 0.45e9), ("1.5b", 1.53e9),
                          ("2.9b", 2.95e9), ("7.2b", 7.2e9)):
        assert abs(memory.size_config(name).n_params() / nominal - 1) < 0.1, name
    with pytest.raises(MemoryPlanError, match="unknown model size"):
        memory.size_config("3b")


def _tiny_cfg():
    from rwkvforge.model.rwkv7 import RWKV7Config

    return RWKV7Config.suggested(2, 256, vocab_size=1024)


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
def test_weight_and_adapter_bytes_match_real_model(tmp_path, quant):
    """Base weights + trainable params predicted == bytes actually held by the peft /
    bitsandbytes model that train.build_model makes (on the CPU)."""
    from rwkvforge import config as cfgmod
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.train import build_model

    p = tmp_path / "m.pth"
    save_pth(make_random_model_sd(2, 256, vocab_size=1024), p)
    s = cfgmod.Settings(device="cpu", quant=quant, precision="bf16", lora_r=8,
                        train_parts="ln")
    pm, _, cfg = build_model(s, p, torch.device("cpu"))
    seen: dict[int, int] = {}
    for t in list(pm.parameters()) + list(pm.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    for mod in pm.modules():  # bitsandbytes keeps scales outside the parameter
        qs = getattr(getattr(mod, "weight", None), "quant_state", None)
        if qs is not None:
            seen[qs.absmax.untyped_storage().data_ptr()] = qs.absmax.untyped_storage().nbytes()
        scb = getattr(getattr(mod, "weight", None), "SCB", None)
        if scb is not None:
            seen[scb.untyped_storage().data_ptr()] = scb.untyped_storage().nbytes()
    real = sum(seen.values())
    bd = estimate(cfg, s, device="cpu")
    predicted = bd.items["base_weights"] + bd.items["adapter"]
    assert abs(real / predicted - 1) < 0.01, (real, predicted)


# ----------------------------------------------------------------------------- activations
def _saved_bytes_per_token_layer(precision: str, lora_r: int, tmp_path,
                                 wkv_impl: str = "chunked") -> float:
    """Bytes autograd saves per token per layer in forward_hidden, on the training path."""
    from rwkvforge import config as cfgmod
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.peft import unwrap
    from rwkvforge.train import autocast_ctx, build_model

    L, C = 2, 256
    p = tmp_path / f"act-{precision}.pth"
    save_pth(make_random_model_sd(L, C, vocab_size=1024), p)
    s = cfgmod.Settings(device="cpu", precision=precision, lora_r=lora_r, wkv_impl=wkv_impl)
    pm, _, _ = build_model(s, p, torch.device("cpu"))
    m = unwrap(pm)
    params = {q.untyped_storage().data_ptr() for q in pm.parameters()}

    def count(T: int) -> int:
        seen: dict[int, int] = {}

        def pack(t):
            st = t.untyped_storage()
            if st.data_ptr() not in params:
                seen[st.data_ptr()] = st.nbytes()
            return t

        idx = torch.randint(0, 1024, (1, T))
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with autocast_ctx(torch.device("cpu"), precision):
                m.forward_hidden(idx)
        return sum(seen.values())

    return (count(128) - count(64)) / (64 * L)


@pytest.mark.parametrize("impl", ["chunked", "native"])
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_activation_constants_match_saved_tensors(precision, impl, tmp_path):
    """The per-token-per-layer constants are what the model really saves for backward."""
    from rwkvforge.model.wkv import native_available

    if impl == "native" and not native_available():
        pytest.skip("the C WKV kernel cannot be built here (no C compiler)")
    r, C = 16, 256
    counted = _saved_bytes_per_token_layer(precision, r, tmp_path, impl)
    wkv_c = (memory.ACT_WKV_CHUNKED if impl == "chunked" else memory.ACT_WKV_NATIVE)[precision]
    model = ((memory.ACT_BLOCK[precision] + wkv_c) * C
             + memory.ACT_LORA_RANK[precision] * r * 6)
    assert abs(counted / model - 1) < 0.02, (counted, model)


# ----------------------------------------------------------------------------- monotonicity
CFG_15 = None


def _cfg15():
    global CFG_15
    if CFG_15 is None:
        CFG_15 = memory.size_config("1.5b")
    return CFG_15


def test_more_context_or_batch_needs_more_memory():
    cfg = _cfg15()
    w = Workload(ctx_len=512, micro_bsz=1)
    base = estimate(cfg, w).total
    assert estimate(cfg, dataclasses.replace(w, ctx_len=1024)).total > base
    assert estimate(cfg, dataclasses.replace(w, micro_bsz=2)).total > base
    assert estimate(cfg, dataclasses.replace(w, lora_r=128)).total > base
    bigger = memory.size_config("2.9b")
    assert estimate(bigger, w).total > base


def test_quantisation_order_nf4_int8_bf16():
    cfg = _cfg15()
    tot = {q: estimate(cfg, Workload(quant=q, ctx_len=1024)).total for q in ("nf4", "int8", "none")}
    assert tot["nf4"] < tot["int8"] < tot["none"]
    w = {q: estimate(cfg, Workload(quant=q)).items["base_weights"] for q in ("nf4", "int8", "none")}
    # 1.2B of the 1.53B params sit in the six block Linears: int8 saves ~40%, nf4 ~60%
    assert 0.55 < w["int8"] / w["none"] < 0.65
    assert 0.35 < w["nf4"] / w["none"] < 0.45


def test_grad_cp_and_8bit_optimizer_reduce_their_parts():
    cfg = _cfg15()
    w = Workload(ctx_len=2048, micro_bsz=2)
    no_cp = estimate(cfg, w)
    cp = estimate(cfg, dataclasses.replace(w, grad_cp=True))
    assert cp.items["activations"] < no_cp.items["activations"] / 5
    a8 = estimate(cfg, dataclasses.replace(w, optimizer="adamw8bit"))
    assert a8.items["optimizer"] < no_cp.items["optimizer"] / 3
    hc = estimate(cfg, dataclasses.replace(w, head_chunk=256))
    assert hc.items["head_ce"] == no_cp.items["head_ce"] // 4


def test_a_dpo_micro_batch_counts_two_sequences_per_pair():
    """DATA_TYPE=dpo: MICRO_BSZ pairs = 2 x MICRO_BSZ rows of activations; the head runs one
    row at a time (loss.sequence_logps); suggestions stay in pairs."""
    cfg = _cfg15()
    sft = estimate(cfg, Workload(ctx_len=1024, micro_bsz=2))
    dpo = estimate(cfg, Workload(ctx_len=1024, micro_bsz=1, data_type="dpo"))
    assert dpo.items["activations"] == sft.items["activations"]
    assert dpo.items["wkv_state"] == sft.items["wkv_state"]
    short = estimate(cfg, Workload(ctx_len=256, micro_bsz=4, data_type="dpo", head_chunk=1024))
    assert short.items["head_ce"] == estimate(
        cfg, Workload(ctx_len=256, micro_bsz=1, head_chunk=1024)).items["head_ce"]
    s = {"quant": "none", "ctx_len": 4096, "micro_bsz": 4, "data_type": "dpo",
         "grad_cp": True, "head_chunk": 256, "optimizer": "adamw8bit"}
    need = memory.preflight(s, cfg, None).total
    budget = (need + estimate(cfg, {**s, "micro_bsz": 2}).total) // 2
    with pytest.raises(MemoryPlanError) as ei:
        memory.preflight(s, cfg, budget)
    assert "DPO: 4 pairs = 8 sequences" in str(ei.value)
    k = int(re.search(r"MICRO_BSZ=(\d+) with GRAD_ACCUM", str(ei.value)).group(1))
    after = {**s, "quant": "nf4"}  # the suggestions before it in the list
    assert estimate(cfg, {**after, "micro_bsz": k}).total <= budget  # k pairs fit,
    assert estimate(cfg, {**after, "micro_bsz": k + 1}).total > budget  # k + 1 pairs do not


def test_plan_recommends_the_largest_fitting_micro_batch_and_context():
    cfg = _cfg15()
    w = Workload(ctx_len=1024, micro_bsz=1, lora_r=64, grad_cp=True)
    budget = 12 * GiB
    pl = memory.plan(cfg, w, budget)
    assert pl.max_micro_bsz >= 1
    assert estimate(cfg, dataclasses.replace(w, micro_bsz=pl.max_micro_bsz)).total <= budget
    assert estimate(cfg, dataclasses.replace(w, micro_bsz=pl.max_micro_bsz + 1)).total > budget
    assert pl.max_ctx_len % memory.CTX_STEP == 0
    assert estimate(cfg, dataclasses.replace(w, ctx_len=pl.max_ctx_len)).total <= budget
    assert estimate(cfg, dataclasses.replace(w, ctx_len=pl.max_ctx_len + 128)).total > budget


def test_fit_table_on_a_12gib_card():
    rows = memory.fit_table(Workload(ctx_len=1024, lora_r=64, grad_cp=True), 12 * GiB)
    by = {r["size"]: r for r in rows}
    assert [r["size"] for r in rows] == list(memory.SIZES)
    assert all(by["0.1b"][p]["fits"] for p in memory.PROFILES)
    assert not by["7.2b"]["lora-bf16"]["fits"]  # 14+ GiB of bf16 weights alone
    assert by["7.2b"]["qlora-nf4"]["fits"]


# ----------------------------------------------------------------------------- preflight
def test_preflight_refuses_with_suggestions_and_force_overrides():
    cfg = _cfg15()
    s = {"quant": "none", "ctx_len": 4096, "micro_bsz": 4, "grad_cp": False}
    with pytest.raises(MemoryPlanError) as ei:
        memory.preflight(s, cfg, 8 * GiB)
    msg = str(ei.value)
    assert "exceeds" in msg and "8.00 GiB" in msg and "GRAD_CP=1" in msg and "--force" in msg
    assert ei.value.breakdown is not None and ei.value.breakdown.total > 8 * GiB
    bd = memory.preflight(s, cfg, 8 * GiB, force=True)
    assert bd.total > 8 * GiB and "force" in bd.warning(8 * GiB)
    ok = memory.preflight({**s, "ctx_len": 512, "micro_bsz": 1, "quant": "nf4"}, cfg, 8 * GiB)
    assert ok.total < 8 * GiB
    assert memory.preflight(s, cfg, None).total > 0  # no budget known: no check


def test_preflight_accepts_settings_object():
    from rwkvforge import config as cfgmod

    s = cfgmod.Settings(quant="nf4", ctx_len=1024, lora_targets="att.key,ffn.value")
    bd = memory.preflight(s, _cfg15(), 24 * GiB)
    assert bd.workload.lora_targets == ("att.key", "ffn.value")
    assert bd.workload.quant == "nf4"


# ----------------------------------------------------------------------------- CLI
def test_cli_json(capsys):
    rc = memory.main(["--size", "1.5b", "--ctx-len", "1024", "--vram", "12GiB", "--lora-r",
                      "64", "--grad-cp", "1", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["n_layer"] == 24
    assert out["plan"]["fits"] is True and out["plan"]["max_micro_bsz"] >= 1
    assert out["plan"]["vram"] == 12 * GiB
    assert [r["size"] for r in out["fit_table"]] == list(memory.SIZES)


def test_cli_text_via_rwkvforge_plan(capsys):
    from rwkvforge import cli

    rc = cli.main(["plan", "--size", "7.2b", "--ctx-len", "2048", "--vram", "12000MiB"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "base weights" in out and "does NOT fit" in out and "qlora-nf4" in out
    assert "To fit" not in out and "  - " in out  # suggestions listed


def test_cli_bad_vram_is_a_clear_error(capsys):
    assert memory.main(["--size", "0.1b", "--vram", "12"]) == 2
    assert "VRAM" in capsys.readouterr().err


# ----------------------------------------------------------------------------- calibration
# Predicted vs measured peak of real training steps (train.build_model + LossModule +
# backward + clip + AdamW) on the demo model's shape (L4 C256, 65536 vocab), each profile in
# a fresh process, RSS-based (see bench/memory_bench.py for the method). Tolerance: 20% -
# the planner's promise; RSS also holds allocator rounding and short-lived backward buffers
# that the model folds into its constants.
CAL_TOL = 0.20


@pytest.mark.slow
@pytest.mark.parametrize("profile", ["lora-bf16", "qlora-int8", "qlora-nf4", "lora-fp32"])
def test_calibration_cpu_demo_model(profile):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc to reset the peak RSS")
    sys.path.insert(0, str(BENCH.parent))
    try:
        import memory_bench
    finally:
        sys.path.pop(0)
    r = memory_bench.run_one(["--model", "tiny", "--profile", profile, "--device", "cpu",
                              "--ctx-len", "128", "--micro-bsz", "2", "--head-chunk", "128",
                              "--lora-r", "16", "--grad-cp", "0", "--steps", "2"])
    print(f"{profile}: predicted {r['predicted'] / MiB:.0f} MiB, measured "
          f"{r['measured'] / MiB:.0f} MiB, ratio {r['ratio']:.3f}")
    assert abs(r["ratio"] - 1) <= CAL_TOL, r


def test_plan_with_a_model_config_name_uses_its_settings():
    """`rwkvforge plan --model rwkv7-1.5b` applies configs/model/rwkv7-1.5b.env (CTX_LEN,
    LORA_R, GRAD_CP), not only the size."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rwkvforge", "plan", "--model", "rwkv7-1.5b",
                          "--profile", "qlora-nf4", "--vram", "12GiB", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode in (0, 1), out.stderr
    env = (Path(__file__).resolve().parents[1] / "configs" / "model" / "rwkv7-1.5b.env").read_text()
    assert "CTX_LEN=1024" in env
    data = json.loads(out.stdout)
    assert data["fit_table_settings"]["ctx_len"] == 1024
    # LoRA r=64 from the model config: 28.31M params at r=32 -> twice that at r=64
    adapter = data["plan"]["breakdown"]["items"]["adapter"]
    assert adapter == 2 * 4 * 28_311_552, adapter


@pytest.mark.parametrize("given,fix", [("1.5b", "--size 1.5b"),
                                       ("models/base/x.pth", "--base-model models/base/x.pth")])
def test_plan_model_flag_names_a_config_layer_only(given, fix, capsys):
    """--model means a configs/model/*.env layer for every command: a size or a file there
    is refused with the flag that takes it."""
    assert memory.main(["--model", given, "--vram", "12GiB"]) == 2
    err = capsys.readouterr().err
    assert "configs/model/*.env" in err and fix in err


def test_plan_says_how_much_disk_a_run_takes(capsys):
    """`rwkvforge plan` estimates the run's disk: checkpoints (adapter + trainable weights +
    AdamW's two fp32 moments = 16 B per trainable param) times how many are kept."""
    assert memory.main(["--size", "0.1b", "--max-steps", "100", "--save-every", "20",
                        "--keep-checkpoints", "2"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("disk: "))
    assert "2 checkpoint(s)" in line and "KEEP_CHECKPOINTS=2" in line
    per, kept, total = memory.run_disk_bytes(1_000_000, 100, 20, 0)
    assert kept == 5 and per == 16_000_000 + (64 << 10)
    assert total == 5 * per + 4_000_000 + (1 << 20)
    assert memory.run_disk_bytes(1_000_000, 100, 20, 2)[1] == 2
    assert memory.run_disk_bytes(1_000_000, 101, 20, 0)[1] == 6  # the last step is saved too
    assert line.endswith("+ the final adapter")
    # a state run writes no adapter: the line named one
    for train_type, end in (("state", "+ the final state"),
                            ("lora+state", "+ the final adapter and state")):
        assert memory.main(["--size", "0.1b", "--train-type", train_type]) == 0
        out = capsys.readouterr().out
        assert next(x for x in out.splitlines() if x.startswith("disk: ")).endswith(end)


# ----------------------------------------------------------------------------- several GPUs / nodes
def _counted_module(cfg) -> torch.nn.Module:
    """The real RWKV7 module of `cfg` at no memory cost: built on the meta device, then every
    parameter given a one-element storage of its own, expanded to its shape (DeepSpeed's
    counter tells parameters apart by their storage address and reads their numel)."""
    from rwkvforge.model.rwkv7 import RWKV7

    with torch.device("meta"):
        model = RWKV7(cfg)
    for mod in model.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[k] = torch.nn.Parameter(torch.zeros(1).expand(p.shape))
    return model


@pytest.mark.parametrize("size", ["1.5b", "7.2b", "13.3b"])
def test_zero3_per_gpu_model_states_against_deepspeeds_estimator(size, capsys):
    """The planner's ZeRO-3 per-GPU model states (LoRA r32 on the six block Linears, bf16
    frozen base, fp32 adapter + AdamW) for 1 x 1, 1 x 8, 2 x 8 and 4 x 8 GPUs, against
    deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs_all_live on the real
    module (parameters and largest layer counted by DeepSpeed, GPU column):
    - DeepSpeed's count of all parameters and of the largest layer == the planner's;
    - ZeRO-3 + offload (parameters and optimiser in CPU RAM): == DeepSpeed's
      offload_param=cpu, offload_optimizer=cpu figure (4 B x the largest layer);
    - ZeRO-3 without offload: == DeepSpeed's offload_param=none, offload_optimizer=none figure
      for the base module fully trained (18 B per parameter over the ranks + 4 B x the
      largest layer), less the 16 B a frozen base parameter does not carry (gradient,
      optimiser states), plus the n LoRA parameters the base module lacks at 20 B each (fp32
      parameter, ZeRO's fp32 partition copy, gradient, two AdamW moments), over the ranks;
      and it lies between DeepSpeed's offload_optimizer=cpu figure (2 B per parameter
      resident) and its no-offload one. Equal to within DeepSpeed's int() rounding and our
      per-component ceil (bytes), and its printed 2 decimals."""
    from deepspeed.runtime.zero.stage3 import (estimate_zero3_model_states_mem_needs,
                                               estimate_zero3_model_states_mem_needs_all_live,
                                               model_to_params)

    cfg = memory.size_config(size)
    module = _counted_module(cfg)
    total, largest = model_to_params(module)
    assert (total, largest) == memory.param_counts(cfg)
    w = Workload(quant="none", precision="bf16", lora_r=32)
    n_train = estimate(cfg, w).items["adapter"] // 4  # LoRA parameters, not in the module
    for nodes, gpus in ((1, 1), (1, 8), (2, 8), (4, 8)):
        W = nodes * gpus
        capsys.readouterr()
        estimate_zero3_model_states_mem_needs_all_live(module, num_gpus_per_node=gpus,
                                                       num_nodes=nodes)
        printed = capsys.readouterr().out
        rows = {}  # (offload_param, offload_optimizer) -> GB per GPU, zero_init=1 rows
        for m in re.finditer(r"\|\s*([\d.]+)GB \| offload_param=(\S+), offload_optimizer="
                             r"(\S+), zero_init=1", printed):
            rows[("cpu" in m.group(2), "cpu" in m.group(3))] = float(m.group(1))
        assert len(rows) == 3, printed

        def ds(off_opt: bool, off_param: bool) -> int:
            return estimate_zero3_model_states_mem_needs(
                total, largest, gpus, nodes, cpu_offload=off_opt, cpu_offload_params=off_param,
                zero_init=True)[1]

        ours_off = memory.model_states(memory.zero_estimate(cfg, w, 3, True, nodes, gpus)[0])
        assert ours_off == ds(True, True)
        assert ours_off / 2**30 == pytest.approx(rows[(True, True)], abs=0.005)
        ours = memory.model_states(memory.zero_estimate(cfg, w, 3, False, nodes, gpus)[0])
        expect = ds(False, False) - 16 * total / W + 20 * n_train / W
        assert ours == pytest.approx(expect, abs=4 + 4 * 3)  # int() and ceil per component
        assert ds(True, False) < ours < ds(False, False)
        assert rows[(False, True)] < ours / 2**30 < rows[(False, False)]  # (param, optim)


def test_zero_sharding_divides_over_every_rank_of_every_node():
    """Per GPU: ZeRO-3 shards the frozen base over nodes x GPUs (2 x 4 == 1 x 8), ZeRO-2 keeps
    it whole; adding nodes never raises the figure; offload moves states to CPU RAM, which each
    node holds for its own ranks only."""
    cfg = memory.size_config("7.2b")
    w = Workload(quant="none", precision="bf16", ctx_len=1024, grad_cp=True)
    one = memory.estimate(cfg, w)
    z3 = {n: memory.zero_estimate(cfg, w, 3, False, n, 4)[0] for n in (1, 2, 4)}
    assert z3[2].items["base_weights"] == memory.zero_estimate(cfg, w, 3, False, 1, 8)[0].items[
        "base_weights"] == -(-one.items["base_weights"] // 8)
    assert z3[1].total > z3[2].total > z3[4].total
    z2 = memory.zero_estimate(cfg, w, 2, False, 2, 4)[0]
    assert z2.items["base_weights"] == one.items["base_weights"]
    assert z2.items["optimizer"] == -(-one.items["optimizer"] // 8)
    assert z2.items["activations"] == one.items["activations"]
    bd, cpu = memory.zero_estimate(cfg, w, 3, True, 2, 4)
    assert bd.items["base_weights"] == bd.items["optimizer"] == 0
    _, cpu1 = memory.zero_estimate(cfg, w, 3, True, 1, 4)
    assert cpu == pytest.approx(cpu1 / 2, rel=1e-6)  # two nodes: each holds half


def test_plan_num_nodes_finds_the_smallest_cluster(capsys):
    """`plan --num-nodes N --num-gpus G`: per-GPU totals for ZeRO-2 / 3 with and without
    offload, and the smallest cluster that fits; the JSON agrees with the planner."""
    argv = ["--size", "13.3b", "--num-nodes", "2", "--num-gpus", "8", "--vram", "24GiB",
            "--ctx-len", "1024", "--grad-cp", "1", "--device", "cuda"]
    assert memory.main(argv) == 0
    out = capsys.readouterr().out
    assert "DeepSpeed over 2 node(s) x 8 GPU(s) = 16 ranks" in out
    assert memory.main([*argv, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["cluster"]["zero"]
    by = {(r["stage"], r["offload"]): r for r in rows}
    cfg = memory.size_config("13.3b")
    w = Workload(quant="none", precision="bf16", ctx_len=1024, grad_cp=True)
    z3 = by[(3, False)]
    assert z3["total"] == memory.zero_estimate(cfg, w, 3, False, 2, 8)[0].total
    # the reported smallest cluster fits and one GPU fewer does not
    n, g = z3["min_nodes"], z3["min_gpus"]
    ranks = n * g
    assert memory.zero_estimate(cfg, w, 3, False, 1, ranks)[0].total <= 24 * GiB
    below = ranks - 1 if n == 1 else (n - 1) * 8
    assert memory.zero_estimate(cfg, w, 3, False, 1, below)[0].total > 24 * GiB
    assert by[(2, False)]["min_nodes"] is None  # the whole bf16 base on each GPU: 25 GiB
    assert "none up to 1024 nodes" in out
    qlora = memory.main([*argv, "--quant", "nf4", "--json"])
    rows = json.loads(capsys.readouterr().out)["cluster"]["zero"]
    assert qlora == 0 and all("refused" in r for r in rows if r["stage"] == 3)


def test_plan_on_a_machine_without_a_gpu_plans_for_its_ram(capsys):
    """DEVICE=auto with no GPU torch can see (this machine): the plan is for this CPU's
    memory, not a request for --vram (issue 27, item 7)."""
    import psutil
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: auto plans for the card")
    rc = memory.main(["--size", "0.1b", "--ctx-len", "512", "--device", "auto", "--json"])
    cap = capsys.readouterr()
    assert rc == 0, cap.err
    out = json.loads(cap.out)
    assert out["plan"]["fits"] is True and "--vram" not in cap.err
    assert 0 < out["plan"]["vram"] <= psutil.virtual_memory().total


def test_cli_on_a_machine_without_a_gpu_says_how_to_plan_for_one(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: auto plans for it")
    argv = ["--size", "1.5b", "--ctx-len", "1024", "--vram", "12GiB"]
    assert memory.main([*argv, "--device", "auto"]) == 0
    out = capsys.readouterr().out
    assert "device cpu" in out and "add --device cuda" in out
    assert memory.main([*argv, "--device", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "device cuda" in out and "add --device cuda" not in out


@pytest.mark.parametrize("doc", ["quickstart.md", "quickstart.zh-CN.md"])
def test_quickstart_memory_table_is_the_planners_output(doc, capsys):
    """docs/quickstart.md's table per size x profile, as `rwkvforge plan` prints it for a card
    with the settings the doc names (it had drifted from the planner)."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    rows = re.findall(r"^\| (\d+\.\dB) \| ([\d.]+ GiB) \| ([\d.]+ GiB) \| ([\d.]+ GiB) \|$",
                      text, re.M)
    assert [r[0] for r in rows] == ["0.1B", "0.4B", "1.5B", "2.9B", "7.2B"]
    assert memory.main(["--size", "1.5b", "--ctx-len", "1024", "--micro-bsz", "1", "--grad-cp",
                        "1", "--lora-r", "32", "--device", "cuda", "--json"]) == 0
    table = {r["size"]: r for r in json.loads(capsys.readouterr().out)["fit_table"]}
    for size, *cells in rows:
        got = [memory.fmt_bytes(table[size.lower()][p]["total"])
               for p in ("lora-bf16", "qlora-int8", "qlora-nf4")]
        assert cells == got, f"docs/{doc}: the {size} row; `rwkvforge plan` prints {got}"

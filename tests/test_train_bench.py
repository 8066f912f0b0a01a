"""bench/train_bench.py: its FLOP count against the model's own weights, and one real run of
the script (our side only, tiny model) so the MFU it prints rests on the probes it claims."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench" / "train_bench.py"


def _bench_module():
    sys.path.insert(0, str(BENCH.parent))
    try:
        import train_bench
    finally:
        sys.path.pop(0)
    return train_bench


def test_flops_per_token_counts_every_matmul_weight_once(tiny_model):
    """The matmul FLOPs of the count equal 2 x the 2-D weights a token passes through (all
    but the embedding table and the per-head bonus r_k), from the state dict itself."""
    tb = _bench_module()
    cfg = tiny_model.config.to_dict()
    used = sum(p.numel() for n, p in tiny_model.named_parameters()
               if p.dim() == 2 and n != "emb.weight" and not n.endswith(".r_k"))
    f = tb.model_flops_per_token(cfg, r=8)
    assert f["matmul_weights"] == used
    L, C, F_ = cfg["n_layer"], cfg["n_embd"], cfg["dim_ffn"]
    lora = L * 8 * (4 * 2 * C + (C + F_ + F_ + C))  # A and B of the 6 adapters, rank 8
    wkv = L * 8 * cfg["head_size"] * C
    assert f["forward"] == 2 * used + 2 * lora + wkv
    # frozen base: activation gradients only (2N); adapters: both gradients (4 per weight)
    assert f["backward"] == 2 * used + 4 * lora + 2 * wkv
    assert f["total"] == f["forward"] + f["backward"]


def test_matmul_window_runs_as_long_as_asked_and_reports_two_rates():
    tb = _bench_module()
    import time

    t = time.perf_counter()
    sustained, fastest = tb.matmul_window(1, 0.3, n=256)
    took = time.perf_counter() - t
    assert 0.3 <= took < 5
    assert 0 < sustained <= fastest  # a window's average never beats its fastest call


def test_mfu_figures_pair_each_step_with_the_windows_around_it():
    tb = _bench_module()
    r = {"tokens_per_step": 100, "step_s": [1.0, 2.0, 1.0],
         "step_sustained": [10.0, 20.0, 5.0, 40.0], "step_peaks": [30.0, 25.0, 50.0, 40.0]}
    f = tb.mfu_figures(r, 2.0, run_best=100.0)  # 200 FLOP per step
    # step 0: 200/1 over max(10, 20); step 1: 100 over max(20, 5); step 2: 200 over max(5, 40)
    assert f["mfu_per_step"] == [10.0, 5.0, 5.0]
    assert f["mfu"] == 5.0
    assert f["mfu_vs_fastest_matmul"] == 4.0  # 200/30, 100/50, 200/50 -> median 4
    assert f["mfu_vs_run_best"] == 2.0  # 2, 1, 2
    assert f["matmul_loop_vs_run_best"] == 0.2  # median window 20 of 100


@pytest.mark.slow
def test_bench_runs_and_pairs_each_step_with_the_windows_around_it(tiny_model_path, tmp_path):
    out = tmp_path / "train_bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--model", str(tiny_model_path),
                        "--ctx-len", "64", "--steps", "3", "--compile", "0", "--no-peer",
                        "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    ours = res["ours"]["ours"]
    assert len(ours["step_s"]) == 3
    sus, fast = ours["step_sustained"], ours["step_peaks"]
    # one window before the first timed step, one after each
    assert len(sus) == len(fast) == 4
    assert all(0 < a <= b for a, b in zip(sus, fast))
    best = res["peak_flops"]["bf16"]
    assert best >= max(fast)
    got = res["results"]["ours"]
    expect = _bench_module().mfu_figures(ours, res["flops_per_token"]["total"], best)
    assert got["mfu_per_step"] == pytest.approx(expect["mfu_per_step"], rel=1e-12)
    assert got["mfu"] == pytest.approx(expect["mfu"], rel=1e-12)
    # the bars rise from sustained to fastest-around-the-step to fastest-of-the-run
    assert got["mfu"] >= got["mfu_vs_fastest_matmul"] >= got["mfu_vs_run_best"] > 0
    for line in ("sustained over a window", "ours: the windows sustained", "fastest single bf16 matmul of the whole run",
                 "a pure matmul loop scores"):
        assert line in r.stdout, r.stdout
    assert ours["first_loss"] > 0

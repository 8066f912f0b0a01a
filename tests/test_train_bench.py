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


@pytest.mark.slow
def test_bench_runs_and_pairs_each_step_with_the_peaks_around_it(tiny_model_path, tmp_path):
    out = tmp_path / "train_bench.json"
    r = subprocess.run([sys.executable, str(BENCH), "--model", str(tiny_model_path),
                        "--ctx-len", "64", "--steps", "3", "--compile", "0", "--no-peer",
                        "--threads", "1", "--out", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(out.read_text())
    ours = res["ours"]["ours"]
    assert len(ours["step_s"]) == 3
    peaks = ours["step_peaks"]
    assert len(peaks) == 4 and min(peaks) > 0  # one before the first timed step, one after each
    flops = res["flops_per_token"]["total"]
    expect = sorted(ours["tokens_per_step"] * flops / t / max(peaks[j], peaks[j + 1])
                    for j, t in enumerate(ours["step_s"]))
    got = res["results"]["ours"]
    assert got["mfu_per_step"] == pytest.approx(expect, rel=1e-12)
    assert got["mfu_per_step_median"] == expect[1]
    # the lower bound: the whole run against the best peak seen anywhere in it, which is
    # at least every bracketing probe, so it cannot exceed the best step's figure
    best = res["peak_flops"]["bf16"]
    assert best >= max(peaks)
    assert got["mfu_whole_run_vs_best_peak"] == pytest.approx(
        ours["tokens_per_s"] * flops / best, rel=1e-12)
    assert got["mfu_whole_run_vs_best_peak"] <= max(expect) * (1 + 1e-12)
    assert "MFU" in r.stdout and "lower bound" in r.stdout
    assert ours["first_loss"] > 0

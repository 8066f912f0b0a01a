"""bench/gpu_acceptance.py's smoke mode on the CPU: the script CI cannot run on a GPU still
runs here end to end (healthcheck, a real training step, inference), writes its JSON and
markdown table, and records why each GPU-only part was skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_the_reasons(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_acceptance.py"), "--smoke",
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    rep = json.loads((tmp_path / "acceptance.json").read_text())
    table = (tmp_path / "acceptance.md").read_text()
    assert rep["mode"] == "smoke" and rep["device"]["cuda"] is False
    # the GPU-only parts are skipped, each with its reason
    assert "smoke" in rep["skipped"]["bootstrap"]
    assert "no CUDA device" in rep["skipped"]["gpu_tests"]
    # the healthcheck ran for real
    assert rep["healthcheck"]["status"] in ("ready", "warnings", "blocked")
    # one real training row: a finite loss, a measured speed and peak beside the plan
    (row,) = rep["rows"]
    assert (row["size"], row["profile"]) == ("tiny", "lora-bf16")
    assert 0 < row["loss"] < 20 and row["tokens_per_s"] > 0
    assert row["peak"] > 0 and row["predicted"] > 0
    assert row["ratio"] == pytest.approx(row["peak"] / row["predicted"])
    inf = rep["inference"]
    assert inf["prefill_tokens_per_s"] > 0 and inf["decode_tokens_per_s"] > 0
    # the CUDA-graph decode's code ran through its CPU stand-in: the replayed step is the step
    assert inf["graph_api"] == "cpu stand-in" and inf["graph_failed"] is None
    assert inf["graph_first_logits_max_diff"] == 0.0 and inf["graph_decode_tokens_per_s"] > 0
    assert "the graph path through its CPU stand-in ran" in table
    # the markdown holds the same numbers as the JSON
    assert f"| tiny | lora-bf16 | {row['wkv']} | {row['tokens_per_s']:.0f} |" in table
    assert f"{row['ratio']:.2f}" in table and "skipped:" in table
    assert out.stdout == table  # and prints it

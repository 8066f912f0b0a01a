"""Healthcheck: stable JSON schema, exit codes, and the torch-kernel capability logic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvforge import doctor

ROOT = Path(__file__).resolve().parents[1]


def test_json_schema_is_stable() -> None:
    out = subprocess.run([sys.executable, "-m", "rwkvforge", "doctor", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    rep = json.loads(out.stdout)
    assert tuple(rep) == doctor.REPORT_KEYS
    assert rep["schema_version"] == doctor.SCHEMA_VERSION
    assert out.returncode == rep["exit_code"] == {"ready": 0, "warnings": 1, "blocked": 2}[rep["status"]]
    for f in rep["findings"]:
        assert set(f) == {"id", "level", "message", "fix"}
        assert f["level"] in ("ok", "warn", "block")
        if f["level"] != "ok":
            assert f["fix"], f"finding {f['id']} has no fix"
    assert rep["torch"]["installed"] is True
    assert rep["packages"]["torch"] and rep["packages"]["peft"]
    assert rep["disk"]["free_gib"] > 0
    assert set(rep["gpu"]) >= {"available", "count", "devices", "driver"}


def test_no_gpu_is_a_warning_not_a_blocker() -> None:
    rep = doctor.collect()
    if rep["gpu"]["available"]:
        pytest.skip("a GPU is present")
    levels = {f["id"]: f["level"] for f in rep["findings"]}
    assert levels["gpu"] == "warn"
    assert rep["exit_code"] >= 1
    fix = next(f["fix"] for f in rep["findings"] if f["id"] == "gpu")
    assert ("WSL2" in fix) == bool(rep["os"]["wsl"])  # the advice fits the machine


@pytest.mark.parametrize("cap,archs,ok", [
    ("12.0", ["sm_80", "sm_86", "sm_90"], False),          # RTX 50 on a CUDA 12.4 build
    ("12.0", ["sm_80", "sm_90", "sm_100", "sm_120"], True),  # CUDA 12.8 build
    ("8.9", ["sm_80", "sm_86"], True),                      # same major, binary compatible
    ("8.6", ["sm_50", "sm_60", "compute_70"], True),        # PTX JIT forward
    ("7.5", ["sm_80", "sm_90"], False),
])
def test_torch_supports(cap: str, archs: list[str], ok: bool) -> None:
    assert doctor.torch_supports(cap, archs) is ok


def test_missing_sm120_kernels_is_a_blocker_with_the_fix() -> None:
    rep = doctor.collect()
    rep["gpu"] = {"available": True, "count": 1, "driver": "580.1", "cuda_driver_version": "13.0",
                  "source": "nvidia-smi", "devices": [{"name": "NVIDIA GeForce RTX 5070 Ti",
                                                        "compute_capability": "12.0",
                                                        "memory_mib": 12227}]}
    rep["torch"] = {"installed": True, "version": "2.5.1+cu124", "cuda_build": "12.4",
                    "cuda_available": True, "arch_list": ["sm_80", "sm_86", "sm_90"]}
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert found["gpu0-kernels"]["level"] == "block"
    assert "cu128" in found["gpu0-kernels"]["fix"]


def test_wsl_reports_pinned_memory_limit() -> None:
    rep = doctor.collect()
    rep["os"]["wsl"] = True
    rep["gpu"]["available"] = False
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert "pinned" in found["wsl-pinned-memory"]["message"]


def test_healthcheck_script_uses_the_venv(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "VENV_DIR": str(tmp_path / "nope")}
    out = subprocess.run([str(ROOT / "scripts" / "healthcheck.sh"), "--json"],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 2
    assert "bootstrap" in out.stderr


def test_tokenizer_encoder_is_reported() -> None:
    rep = doctor.collect()
    assert rep["tokenizer"]["backend"] in ("native", "fast", "reference")
    assert rep["wkv_cpu"]["kernel"] in ("native", "chunked")
    rep["tokenizer"] = {"backend": "fast", "native": "native C encoder unavailable (...)"}
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert found["tokenizer"]["level"] == "warn" and "apt install gcc" in found["tokenizer"]["fix"]
    rep["tokenizer"] = {"backend": None, "native": None, "error": "ImportError: no rwkv"}
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert found["tokenizer"]["level"] == "block" and "no rwkv" in found["tokenizer"]["message"]

    rep["tokenizer"] = {"backend": "native", "native": "native C encoder loaded"}
    rep["wkv_cpu"] = {"kernel": "chunked", "problem": "unavailable (...)"}
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert found["tokenizer"]["level"] == "ok"
    assert found["wkv-cpu"]["level"] == "warn" and "gcc" in found["wkv-cpu"]["fix"]

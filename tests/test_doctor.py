"""Healthcheck: stable JSON schema, exit codes, and the torch-kernel capability logic."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rwkvforge import doctor
from rwkvforge.dashboard import i18n

ROOT = Path(__file__).resolve().parents[1]


def test_json_schema_is_stable() -> None:
    out = subprocess.run([sys.executable, "-m", "rwkvforge", "doctor", "--json"],
                         capture_output=True, text=True, cwd=ROOT)
    rep = json.loads(out.stdout)
    assert tuple(rep) == doctor.REPORT_KEYS
    assert rep["schema_version"] == doctor.SCHEMA_VERSION
    assert out.returncode == rep["exit_code"] == {"ready": 0, "warnings": 1, "blocked": 2}[rep["status"]]
    for f in rep["findings"]:
        assert set(f) == {"id", "level", "message", "fix"}  # no "key" / "params" in JSON
        assert f["level"] in ("ok", "warn", "block")
        if f["level"] != "ok":
            assert f["fix"], f"finding {f['id']} has no fix"
    assert rep["torch"]["installed"] is True
    assert rep["packages"]["torch"] and rep["packages"]["peft"]
    assert rep["disk"]["free_gib"] > 0
    assert set(rep["gpu"]) >= {"available", "count", "devices", "driver"}
    # importing fla-core (installed by --dev) on a machine without a GPU warned on stderr
    assert "Triton is not supported" not in out.stderr, out.stderr


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
    assert "cu129 or cu130" in found["gpu0-kernels"]["fix"]  # builds torch 2.13.0 has


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


# ---- finding texts: the CLI's English stays as it was; the dashboard translates each one ----

def _gpu(*devices: tuple[str, str, int | None]) -> dict[str, Any]:
    return {"available": bool(devices), "count": len(devices), "driver": "580.65",
            "cuda_driver_version": "13.0", "source": "nvidia-smi" if devices else None,
            "devices": [{"name": n, "compute_capability": c, "memory_mib": m}
                        for n, c, m in devices]}


def _report(**over: Any) -> dict[str, Any]:
    """A report as `collect()` gathers it (without findings), with the given sections."""
    rep: dict[str, Any] = {
        "status": "ready",
        "os": {"system": "Linux", "release": "6.8.0-45-generic", "machine": "x86_64",
               "distro": "Ubuntu 24.04.1 LTS", "wsl": False, "wsl_version": None},
        "gpu": _gpu(("NVIDIA GeForce RTX 4090", "8.9", 24564)),
        "torch": {"installed": True, "version": "2.5.1+cu124", "cuda_build": "12.4",
                  "cuda_available": True, "arch_list": ["sm_80", "sm_86", "sm_90"]},
        "bitsandbytes": {"installed": True, "version": "0.44.1", "backend": "cuda",
                         "error": None},
        "deepspeed": {"installed": True, "version": "0.15.4"},
        "fla": {"installed": True, "version": "0.6.0", "problem": None},
        "tokenizer": {"backend": "native", "native": "native C encoder loaded"},
        "wkv_cpu": {"kernel": "native", "problem": None},
        "disk": {"path": "/home/me/rwkvforge", "free_gib": 812.4, "total_gib": 931.5},
        "memory": {"total_gib": 62.7, "available_gib": 51.0, "cpu_count": 16},
        "packages": {"torch": "2.5.1+cu124", "peft": "0.13.2", "streamlit": None},
    }
    return {**rep, **over}


WSL = {"system": "Linux", "release": "5.15.167.4-microsoft-standard-WSL2", "machine": "x86_64",
       "distro": "Ubuntu 22.04.5 LTS", "wsl": True, "wsl_version": 2}
CPU_TORCH = {"installed": True, "version": "2.5.1+cpu", "cuda_build": None,
             "cuda_available": False, "arch_list": []}
CU129_TORCH = {"installed": True, "version": "2.13.0+cu129", "cuda_build": "12.9",
               "cuda_available": True,
               "arch_list": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]}
SCENARIOS: dict[str, dict[str, Any]] = {
    "all-ok": _report(),
    "wsl-cpu-torch": _report(
        status="blocked", os=WSL, torch=CPU_TORCH,
        bitsandbytes={"installed": False, "version": None, "backend": None},
        deepspeed={"installed": False, "version": None},
        fla={"installed": False, "version": None, "problem": "fla-core is not installed"},
        tokenizer={"backend": "fast", "native": "native C encoder unavailable (no C compiler "
                   "found: set CC or install gcc); using pyrwkv-tokenizer"},
        wkv_cpu={"kernel": "chunked", "problem": "unavailable (no C compiler found)"},
        disk={"path": "/mnt/c/rwkvforge", "free_gib": 3.2, "total_gib": 476.3},
        memory={"total_gib": 15.5, "available_gib": 12.1, "cpu_count": 8}),
    "rtx50-old-torch": _report(
        status="blocked",
        gpu=_gpu(("NVIDIA GeForce RTX 5070 Ti", "12.0", 12227),
                 ("NVIDIA RTX A4000", "8.6", None)),
        torch={"installed": True, "version": "2.5.1+cu124", "cuda_build": "12.4",
               "cuda_available": False, "arch_list": ["sm_80", "sm_86", "sm_90"]},
        bitsandbytes={"installed": True, "version": "0.43.0", "backend": None,
                      "error": "RuntimeError: CUDA Setup failed despite GPU being available."},
        tokenizer={"backend": None, "native": None,
                   "error": "ModuleNotFoundError: No module named 'rwkv'"},
        wkv_cpu={"kernel": "chunked", "problem": "switched off (RWKVFORGE_NATIVE=0)"}),
    "cuda-torch-no-archs": _report(
        torch={"installed": True, "version": "2.6.0", "cuda_build": "12.6",
               "cuda_available": True, "arch_list": []}),
    "wsl-no-gpu-no-torch": _report(
        status="blocked", os=WSL, gpu=_gpu(),
        torch={"installed": False, "error": "ModuleNotFoundError: No module named 'torch'"},
        bitsandbytes={"installed": True, "version": "0.44.1", "backend": "cpu", "error": None},
        fla={"installed": False, "version": None, "problem": "fla-core is not installed"},
        tokenizer={"backend": "reference",
                   "native": "native C encoder switched off (RWKVFORGE_NATIVE=0); using "
                   "pyrwkv-tokenizer"},
        memory={"total_gib": None, "available_gib": None, "cpu_count": 4}),
    "linux-no-gpu": _report(
        status="warnings", gpu=_gpu(), torch=CPU_TORCH,
        disk={"path": "/srv/rwkvforge", "free_gib": 9.9, "total_gib": 100.0}),
    # issue 21: bitsandbytes' CUDA library against the GPU, and DEEPSPEED_OFFLOAD's CPU Adam
    "rtx50-cu129-old-bnb": _report(
        status="warnings", gpu=_gpu(("NVIDIA GeForce RTX 5070 Ti", "12.0", 12227)),
        torch=CU129_TORCH,
        bitsandbytes={"installed": True, "version": "0.50.2", "backend": "cuda", "error": None,
                      "cuda_library": "libbitsandbytes_cuda126.so",
                      "cuda_archs": ["sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"]},
        deepspeed={"installed": True, "version": "0.16.4", "cpu_adam": {
            "builder": "deepspeed.ops.op_builder.cpu_adam.CPUAdamBuilder", "state": "missing",
            "missing": ["the CUDA toolkit's nvcc (CUDA_HOME=/usr/local/cuda has no bin/nvcc)"],
            "fix": "install a CUDA 12.9 toolkit and set CUDA_HOME to it."}}),
    "h100-cpu-adam-prebuilt": _report(
        gpu=_gpu(("NVIDIA H100 80GB HBM3", "9.0", 81559)),
        torch=CU129_TORCH,
        bitsandbytes={"installed": True, "version": "0.50.2", "backend": "cuda", "error": None,
                      "cuda_library": "libbitsandbytes_cuda128.so",
                      "cuda_archs": ["sm_75", "sm_80", "sm_90", "sm_100", "sm_120"]},
        deepspeed={"installed": True, "version": "0.19.8", "cpu_adam": {
            "builder": "deepspeed.ops.op_builder.cpu.cpu_adam.CPUAdamBuilder", "state": "ready",
            "how": "built into DeepSpeed", "missing": [], "fix": ""}}),
    "a100-no-bnb-binary": _report(
        status="warnings", gpu=_gpu(("NVIDIA A100-SXM4-40GB", "8.0", 40960)),
        torch={**CU129_TORCH, "version": "2.13.0+cu140", "cuda_build": "14.0"},
        bitsandbytes={"installed": True, "version": "0.50.2", "backend": "cuda", "error": None,
                      "cuda_library": "libbitsandbytes_cuda140.so", "cuda_archs": None},
        deepspeed={"installed": True, "version": "0.19.8", "cpu_adam": {
            "builder": "deepspeed.ops.op_builder.cpu.cpu_adam.CPUAdamBuilder",
            "state": "builds", "missing": [], "fix": ""}}),
}

# `rwkvforge doctor` for SCENARIOS, printed by the doctor before its texts moved into
# doctor.TEXTS (@PY@: this Python's version). The CLI's English must not change.
GOLDEN_REPORTS = {
    "all-ok": "\n".join([
        "rwkvforge healthcheck — ready",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.5.1+cu124 (CUDA build: 12.4).",
        "[  ok  ] NVIDIA GeForce RTX 4090 sm_89, 24564 MiB, driver 580.65.",
        "[  ok  ] bitsandbytes 0.44.1 (cuda backend).",
        "[  ok  ] deepspeed 0.15.4.",
        "[  ok  ] WKV on CUDA (training): fla-core 0.6.0 Triton kernels.",
        "[  ok  ] tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[  ok  ] 812.4 GiB free.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "wsl-cpu-torch": "\n".join([
        "rwkvforge healthcheck — blocked",
        "os: Ubuntu 22.04.5 LTS 5.15.167.4-microsoft-standard-WSL2 (WSL2)",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.5.1+cpu (CUDA build: none).",
        "[BLOCK ] NVIDIA GeForce RTX 4090 found but the installed torch is a CPU build.",
        "         fix: Set TORCH_SPEC/TORCH_INDEX_URL empty in configs/workspace.env, delete "
        ".venv and re-run ./scripts/bootstrap.sh to get a CUDA build.",
        "[ warn ] bitsandbytes is not installed: QLoRA profiles unavailable.",
        "         fix: Run ./scripts/bootstrap.sh.",
        "[ warn ] deepspeed not installed: multi-GPU (DEEPSPEED_STAGE) unavailable.",
        "         fix: Run ./scripts/bootstrap.sh (it installs deepspeed with "
        "--no-build-isolation).",
        "[ warn ] WKV on CUDA (training): chunked torch kernel, slower and hungrier than fla, "
        "because fla cannot be used: fla-core is not installed.",
        "         fix: Re-run ./scripts/bootstrap.sh: it installs the fla-core + triton pair "
        "that matches the installed torch.",
        "[ warn ] tokenizer: fast encoder; native C encoder unavailable (no C compiler found: "
        "set CC or install gcc); using pyrwkv-tokenizer.",
        "         fix: Install a C compiler (sudo apt install gcc) for ~2x faster data "
        "preparation; the ids are the same either way.",
        "[ warn ] WKV on CPU (training, prefill): chunked torch kernel (C kernel unavailable "
        "(no C compiler found)).",
        "         fix: Install a C compiler (sudo apt install gcc): CPU training steps are "
        "~1.5x faster with the C kernel; results are the same.",
        "[ warn ] Only 3.2 GiB free at /mnt/c/rwkvforge.",
        "         fix: Free disk space: checkpoints of a 1.5B model take several GiB each.",
        "[ warn ] Running under WSL2 with 15.5 GiB visible. WSL2 caps pinned (page-locked) "
        "memory, so CPU offload and pinned data loading can fail with 'CUDA error: out of "
        "memory' even when the GPU has room.",
        "         fix: Keep DEEPSPEED_OFFLOAD=0 on WSL2 unless needed; raise memory= in "
        "%UserProfile%\\.wslconfig and run `wsl --shutdown` to apply.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "rtx50-old-torch": "\n".join([
        "rwkvforge healthcheck — blocked",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.5.1+cu124 (CUDA build: 12.4).",
        "[BLOCK ] torch 2.5.1+cu124 has no kernels for NVIDIA GeForce RTX 5070 Ti (sm_120); it "
        "was built for sm_80, sm_86, sm_90. Symptom: 'no kernel image is available for "
        "execution on the device'.",
        "         fix: Let bootstrap pick the torch build for this GPU: leave TORCH_SPEC and "
        "TORCH_INDEX_URL empty in configs/workspace.env, delete .venv, re-run "
        "./scripts/bootstrap.sh (sm_50 .. sm_90: cu126; sm_100 / sm_120 and newer: cu129 or "
        "cu130 - torch 2.13.0 has no cu128 build).",
        "[BLOCK ] torch has CUDA but torch.cuda.is_available() is False.",
        "         fix: Update the NVIDIA driver (on WSL2: the Windows driver; do not install a "
        "Linux display driver inside WSL).",
        "[  ok  ] NVIDIA RTX A4000 sm_86, None MiB, driver 580.65.",
        "[BLOCK ] torch has CUDA but torch.cuda.is_available() is False.",
        "         fix: Update the NVIDIA driver (on WSL2: the Windows driver; do not install a "
        "Linux display driver inside WSL).",
        "[ warn ] bitsandbytes 0.43.0 fails to import: RuntimeError: CUDA Setup failed despite "
        "GPU being available.",
        "         fix: See docs/troubleshooting.md#bitsandbytes; re-run ./scripts/bootstrap.sh.",
        "[  ok  ] deepspeed 0.15.4.",
        "[  ok  ] WKV on CUDA (training): fla-core 0.6.0 Triton kernels.",
        "[BLOCK ] the World tokenizer cannot be loaded (ModuleNotFoundError: No module named "
        "'rwkv').",
        "         fix: Run ./scripts/bootstrap.sh (it installs the rwkv and pyrwkv-tokenizer "
        "packages).",
        "[  ok  ] WKV on CPU (training, prefill): chunked torch kernel (C kernel switched off "
        "(RWKVFORGE_NATIVE=0)).",
        "[  ok  ] 812.4 GiB free.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "cuda-torch-no-archs": "\n".join([
        "rwkvforge healthcheck — ready",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.6.0 (CUDA build: 12.6).",
        "[BLOCK ] torch 2.6.0 has no kernels for NVIDIA GeForce RTX 4090 (sm_89); it was built "
        "for nothing. Symptom: 'no kernel image is available for execution on the device'.",
        "         fix: Let bootstrap pick the torch build for this GPU: leave TORCH_SPEC and "
        "TORCH_INDEX_URL empty in configs/workspace.env, delete .venv, re-run "
        "./scripts/bootstrap.sh (sm_50 .. sm_90: cu126; sm_100 / sm_120 and newer: cu129 or "
        "cu130 - torch 2.13.0 has no cu128 build).",
        "[  ok  ] bitsandbytes 0.44.1 (cuda backend).",
        "[  ok  ] deepspeed 0.15.4.",
        "[  ok  ] WKV on CUDA (training): fla-core 0.6.0 Triton kernels.",
        "[  ok  ] tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[  ok  ] 812.4 GiB free.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "wsl-no-gpu-no-torch": "\n".join([
        "rwkvforge healthcheck — blocked",
        "os: Ubuntu 22.04.5 LTS 5.15.167.4-microsoft-standard-WSL2 (WSL2)",
        "[  ok  ] Python @PY@.",
        "[BLOCK ] torch cannot be imported (ModuleNotFoundError: No module named 'torch').",
        "         fix: Run ./scripts/bootstrap.sh.",
        "[ warn ] No NVIDIA GPU found: everything runs on the CPU (fine for the demo model; "
        "slow for real models).",
        "         fix: On WSL2 install the NVIDIA Windows driver and check `nvidia-smi` works "
        "inside WSL.",
        "[  ok  ] bitsandbytes 0.44.1 (cpu backend).",
        "[  ok  ] deepspeed 0.15.4.",
        "[  ok  ] tokenizer: reference encoder; native C encoder switched off "
        "(RWKVFORGE_NATIVE=0); using pyrwkv-tokenizer.",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[  ok  ] 812.4 GiB free.",
        "[  ok  ] Running under WSL2 with None GiB visible. WSL2 caps pinned (page-locked) "
        "memory, so CPU offload and pinned data loading can fail with 'CUDA error: out of "
        "memory' even when the GPU has room.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "linux-no-gpu": "\n".join([
        "rwkvforge healthcheck — warnings",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.5.1+cpu (CUDA build: none).",
        "[ warn ] No NVIDIA GPU found: everything runs on the CPU (fine for the demo model; "
        "slow for real models).",
        "         fix: To train on a GPU: install the NVIDIA driver until `nvidia-smi` lists "
        "the card, then re-run ./scripts/bootstrap.sh (it picks the CUDA torch). Nothing to do "
        "for CPU-only use.",
        "[  ok  ] bitsandbytes 0.44.1 (cuda backend).",
        "[  ok  ] deepspeed 0.15.4.",
        "[  ok  ] tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[ warn ] Only 9.9 GiB free at /srv/rwkvforge.",
        "         fix: Free disk space: checkpoints of a 1.5B model take several GiB each.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "rtx50-cu129-old-bnb": "\n".join([
        "rwkvforge healthcheck — warnings",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.13.0+cu129 (CUDA build: 12.9).",
        "[  ok  ] NVIDIA GeForce RTX 5070 Ti sm_120, 12227 MiB, driver 580.65.",
        "[  ok  ] bitsandbytes 0.50.2 (cuda backend).",
        "[ warn ] bitsandbytes 0.50.2's CUDA 12.9 library (libbitsandbytes_cuda126.so) has "
        "kernels for sm_60, sm_70, sm_75, sm_80, sm_86, sm_90, none of which runs on NVIDIA "
        "GeForce RTX 5070 Ti (sm_120): QLoRA (QUANT=nf4 / int8) fails on this GPU.",
        "         fix: Upgrade bitsandbytes to a release built for sm_120 (re-run "
        "./scripts/bootstrap.sh; "
        "bitsandbytes 0.45+ with CUDA 12.8+ has Blackwell kernels), or train with "
        "PROFILE=lora-bf16.",
        "[  ok  ] deepspeed 0.16.4.",
        "[ warn ] DEEPSPEED_OFFLOAD=1 would fail: DeepSpeed compiles its CPU Adam on first use "
        "(deepspeed.ops.op_builder.cpu_adam.CPUAdamBuilder) and this machine lacks the CUDA "
        "toolkit's nvcc (CUDA_HOME=/usr/local/cuda has no bin/nvcc).",
        "         fix: Install what is missing: install a CUDA 12.9 toolkit and set CUDA_HOME "
        "to it.",
        "[  ok  ] WKV on CUDA (training): fla-core 0.6.0 Triton kernels.",
        "[  ok  ] tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[  ok  ] 812.4 GiB free.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "h100-cpu-adam-prebuilt": "\n".join([
        "rwkvforge healthcheck — ready",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.13.0+cu129 (CUDA build: 12.9).",
        "[  ok  ] NVIDIA H100 80GB HBM3 sm_90, 81559 MiB, driver 580.65.",
        "[  ok  ] bitsandbytes 0.50.2 (cuda backend).",
        "[  ok  ] deepspeed 0.19.8.",
        "[  ok  ] DEEPSPEED_OFFLOAD=1: DeepSpeed's CPU Adam is ready (built into DeepSpeed).",
        "[  ok  ] WKV on CUDA (training): fla-core 0.6.0 Triton kernels.",
        "[  ok  ] tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[  ok  ] 812.4 GiB free.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
    "a100-no-bnb-binary": "\n".join([
        "rwkvforge healthcheck — warnings",
        "os: Ubuntu 24.04.1 LTS 6.8.0-45-generic",
        "[  ok  ] Python @PY@.",
        "[  ok  ] torch 2.13.0+cu140 (CUDA build: 14.0).",
        "[  ok  ] NVIDIA A100-SXM4-40GB sm_80, 40960 MiB, driver 580.65.",
        "[  ok  ] bitsandbytes 0.50.2 (cuda backend).",
        "[ warn ] bitsandbytes 0.50.2 has no library for torch's CUDA 14.0 "
        "(libbitsandbytes_cuda140.so is missing): QLoRA (QUANT=nf4 / int8) cannot run on the GPU.",
        "         fix: Re-run ./scripts/bootstrap.sh to install a bitsandbytes built for CUDA "
        "14.0, or "
        "train with PROFILE=lora-bf16 (no bitsandbytes).",
        "[  ok  ] deepspeed 0.19.8.",
        "[  ok  ] DEEPSPEED_OFFLOAD=1: DeepSpeed's CPU Adam is compiled on its first use "
        "(deepspeed.ops.op_builder.cpu.cpu_adam.CPUAdamBuilder; a minute or two) and everything "
        "it needs is here.",
        "[  ok  ] WKV on CUDA (training): fla-core 0.6.0 Triton kernels.",
        "[  ok  ] tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
        "[  ok  ] WKV on CPU (training, prefill): native C kernel.",
        "[  ok  ] 812.4 GiB free.",
        "packages: torch 2.5.1+cu124, peft 0.13.2",
    ]),
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_cli_report_text_is_unchanged(name: str) -> None:
    rep = dict(SCENARIOS[name])
    rep["findings"] = doctor.findings_for(rep)
    assert doctor.format_report(rep) == GOLDEN_REPORTS[name].replace("@PY@",
                                                                     platform.python_version())
    assert all(tuple(f) == doctor.FINDING_KEYS for f in doctor.public_report(rep)["findings"])


def test_ok_findings_keep_their_fix_and_old_python_blocks() -> None:
    """The fixes format_report leaves out (ok level) are in the JSON, unchanged too."""
    def fixes(name: str) -> dict[str, str]:
        return {f["id"]: f["fix"] for f in doctor.findings_for(SCENARIOS[name])}

    assert fixes("rtx50-old-torch")["wkv-cpu"] == (
        "Install a C compiler (sudo apt install gcc): CPU training steps are ~1.5x faster with "
        "the C kernel; results are the same.")
    assert fixes("wsl-no-gpu-no-torch")["tokenizer"] == (
        "Install a C compiler (sudo apt install gcc) for ~2x faster data preparation; the ids "
        "are the same either way.")
    old = doctor.python_finding((3, 9, 18), "3.9.18")
    assert (old["level"], old["message"], old["fix"]) == (
        "block", "Python 3.9 is too old.",
        "Install Python 3.10+ (3.11 recommended) and re-run ./scripts/bootstrap.sh.")
    assert doctor.python_finding((3, 11, 7), "3.11.7")["message"] == "Python 3.11.7."


def _every_finding() -> list[dict[str, Any]]:
    found = [doctor.python_finding((3, 9, 18), "3.9.18")] + doctor.collect()["findings"]
    for rep in SCENARIOS.values():
        found += doctor.findings_for(rep)
    return found


def test_every_finding_text_is_in_both_catalogues() -> None:
    """Each finding names its text (key) and values (params); the dashboard's English is the
    doctor's, and zh-CN.json has a Chinese text with the same placeholders for every one."""
    zh = json.loads((i18n.CATALOGUE_DIR / "zh-CN.json").read_text(encoding="utf-8"))
    found = _every_finding()
    assert {f["key"] for f in found} == set(doctor.TEXTS)  # the scenarios reach every text
    for f in found:
        message, fix = doctor.TEXTS[f["key"]]
        assert set(f["params"]) == i18n.placeholders(message) | i18n.placeholders(fix), f
        for part, english in (("message", message), ("fix", fix)):
            key = f"doctor.{f['key']}.{part}"
            if not english:
                assert f[part] == "" and key not in zh and key not in i18n.catalogue("en")
                continue
            assert key in zh, f"{key} missing from zh-CN.json"
            assert i18n.placeholders(zh[key]) == i18n.placeholders(english), key
            assert i18n.t("en", key, **f["params"]) == f[part]
            chinese = i18n.t("zh-CN", key, **f["params"])
            assert re.search("[\u4e00-\u9fff]", chinese) and chinese != f[part], key


# ---- issue 21: bitsandbytes' GPU code, DeepSpeed's CPU Adam -------------------------------------

BNB_DIR = Path(importlib.util.find_spec("bitsandbytes").origin).parent


@pytest.mark.parametrize("torch_cuda,env,library", [
    ("12.6", {}, "libbitsandbytes_cuda126.so"),
    ("12.9", {}, "libbitsandbytes_cuda128.so"),  # no cuda129 shipped: the newest 12.x below
    ("13.0", {}, "libbitsandbytes_cuda130.so"),
    ("12.9", {"BNB_CUDA_VERSION": "126"}, "libbitsandbytes_cuda126.so"),  # its override
])
def test_bnb_library_is_the_one_bitsandbytes_loads(torch_cuda: str, env: dict[str, str],
                                                   library: str) -> None:
    """The same pick as bitsandbytes' own get_cuda_bnb_library_path (given torch's CUDA)."""
    from bitsandbytes import cextension
    from bitsandbytes.cuda_specs import CUDASpecs

    assert doctor.bnb_library(BNB_DIR, torch_cuda, env).name == library
    old = dict(os.environ)
    try:
        os.environ.pop("BNB_CUDA_VERSION", None)
        os.environ.update(env)
        spec = CUDASpecs(highest_compute_capability=(9, 0),
                         cuda_version_string=torch_cuda.replace(".", ""),
                         cuda_version_tuple=tuple(int(x) for x in torch_cuda.split(".")))
        assert cextension.get_cuda_bnb_library_path(spec).name == library
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_cuda_binary_archs_reads_the_installed_bitsandbytes() -> None:
    """The fatbin reader on the real libraries of the installed wheel: CUDA 11.8 cannot emit
    Blackwell code and CUDA 12.8+ builds carry it (bitsandbytes' release notes)."""
    old = doctor.cuda_binary_archs(BNB_DIR / "libbitsandbytes_cuda118.so")
    new = doctor.cuda_binary_archs(BNB_DIR / "libbitsandbytes_cuda128.so")
    assert "sm_90" in old and "sm_80" in old and not any(a in old for a in ("sm_100", "sm_120"))
    assert {"sm_80", "sm_90", "sm_100", "sm_120"} <= set(new)
    assert all(re.fullmatch(r"(sm|compute)_[0-9]+", a) for a in old + new)
    assert doctor.cuda_binary_archs(BNB_DIR / "libbitsandbytes_cpu.so") == []


@pytest.mark.parametrize("cap,bnb_cuda,ok", [
    ("7.5", "126", True), ("8.6", "126", True), ("8.9", "126", True), ("9.0", "126", True),
    ("10.0", "126", False), ("12.0", "126", False),   # CUDA 12.6 libraries: no Blackwell
    ("10.0", "128", True), ("12.0", "128", True), ("10.3", "130", True), ("12.1", "130", True),
    ("7.5", "130", True),
])
def test_bitsandbytes_binary_against_the_gpu(cap: str, bnb_cuda: str, ok: bool) -> None:
    """bitsandbytes' library (its real arch list) compared with each capability: a mismatch
    is a warning naming the GPU, the library and the way out."""
    lib = BNB_DIR / f"libbitsandbytes_cuda{bnb_cuda}.so"
    b = {"installed": True, "version": "0.50.2", "backend": "cuda", "error": None,
         "cuda_library": lib.name, "cuda_archs": doctor.cuda_binary_archs(lib)}
    rep = _report(gpu=_gpu(("GPU", cap, 16000)), bitsandbytes=b, torch=CU129_TORCH)
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert ("bitsandbytes-gpu0" not in found) is ok
    if not ok:
        f = found["bitsandbytes-gpu0"]
        assert f["level"] == "warn" and lib.name in f["message"]
        assert f"sm_{cap.replace('.', '')}" in f["message"] and "lora-bf16" in f["fix"]


def _cuda_accelerator():
    from deepspeed.accelerator.cuda_accelerator import CUDA_Accelerator

    return CUDA_Accelerator()


def test_cpu_adam_on_cuda_needs_no_toolkit_with_the_pinned_deepspeed(tmp_path: Path) -> None:
    """DeepSpeed 0.19's CUDA accelerator compiles cpu_adam with its CPU builder: a CUDA_HOME
    without nvcc is no problem; only a C++ compiler, ninja and Python's headers are needed."""
    builder = _cuda_accelerator().create_op_builder("CPUAdamBuilder")
    env = {"PATH": os.environ["PATH"], "CUDA_HOME": str(tmp_path)}  # no bin/nvcc in it
    missing = doctor.cpu_adam_missing(builder, "12.9", env)
    assert not any("CUDA" in m for m in missing), missing
    no_tools = doctor.cpu_adam_missing(builder, "12.9", {"PATH": str(tmp_path),
                                                         "CUDA_HOME": str(tmp_path)})
    assert any("C++ compiler" in m for m in no_tools) and any("ninja" in m for m in no_tools)
    fix = doctor.cpu_adam_fix(no_tools, "12.9", "0.19.8")
    assert "build-essential" in fix and "ninja-build" in fix and "DS_BUILD_CPU_ADAM=1" in fix


def test_cuda_op_builder_without_nvcc_says_which_toolkit(tmp_path: Path) -> None:
    """A CUDA op builder (DeepSpeed's cpu_adam before 0.19 was one; FusedAdam still is) with
    CUDA_HOME pointing at a folder without nvcc: the toolkit is named, with torch's version."""
    builder = _cuda_accelerator().create_op_builder("FusedAdamBuilder")
    env = {"PATH": os.environ["PATH"], "CUDA_HOME": str(tmp_path)}
    missing = doctor.cpu_adam_missing(builder, "12.9", env)
    assert any("nvcc" in m and str(tmp_path) in m for m in missing), missing
    fix = doctor.cpu_adam_fix(missing, "12.9", "0.19.8")
    assert "cuda-toolkit-12-9" in fix and "nvidia-cuda-toolkit" in fix and "CUDA_HOME" in fix
    assert doctor.cpu_adam_missing(builder, None, env) == missing[:-1]  # no GPU: no CUDA code
    nvcc = shutil.which("nvcc")
    if nvcc:  # a real toolkit here: its major version against torch's
        home = str(Path(nvcc).resolve().parent.parent)
        release = doctor._nvcc_release(Path(home) / "bin" / "nvcc")
        assert release
        same = doctor.cpu_adam_missing(builder, release, {**env, "CUDA_HOME": home})
        assert not any("CUDA" in m for m in same), same
        other = f"{int(release.split('.')[0]) - 1}.8"
        wrong = doctor.cpu_adam_missing(builder, other, {**env, "CUDA_HOME": home})
        assert any(f"CUDA {release}" in m for m in wrong), wrong


def test_offload_is_checked_before_training_starts(tmp_path: Path, monkeypatch) -> None:
    """On this CPU machine (gloo) DEEPSPEED_OFFLOAD=1 passes the check (tests/test_distributed.py
    trains with it); without a compiler and no compiled op cached, `train` refuses before
    DeepSpeed's processes start, naming what to install."""
    from rwkvforge import config as cfgmod
    from rwkvforge.train import check_combination

    s = cfgmod.resolve(cli={"deepspeed_stage": 2, "deepspeed_offload": 1}, env={},
                       root=ROOT).settings
    check_combination(s)  # the tools are here (or the op is compiled already)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))  # nothing cached there
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(cfgmod.ConfigError, match="C[+][+] compiler.*build-essential"):
        check_combination(s)
    check_combination(cfgmod.resolve(cli={"deepspeed_stage": 2, "deepspeed_offload": 0},
                                     env={}, root=ROOT).settings)  # no offload: nothing to build
    info = doctor.cpu_adam_info()
    assert info["state"] == "missing" and info["builder"].endswith("CPUAdamBuilder")


# torch 2.13.0's CUDA builds (download.pytorch.org, x86_64; release wheels carry SASS only)
TORCH_2_13_ARCHS = {"cu126": ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"],
                    "cu129": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"],
                    "cu130": ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]}


@pytest.mark.parametrize("cap", ["7.5", "8.6", "8.9", "9.0", "10.0", "12.0"])
def test_torch_2_13_builds_against_each_capability(cap: str) -> None:
    """The healthcheck's comparison with each real arch list: cu126 stops at Hopper, the
    CUDA 12.9 / 13.0 builds run everything from Turing to Blackwell - the route bootstrap takes
    (tests/test_scripts.py) is one the healthcheck then accepts."""
    blackwell = int(cap.split(".")[0]) >= 10
    assert doctor.torch_supports(cap, TORCH_2_13_ARCHS["cu126"]) is not blackwell
    assert doctor.torch_supports(cap, TORCH_2_13_ARCHS["cu129"])
    assert doctor.torch_supports(cap, TORCH_2_13_ARCHS["cu130"])
    rep = _report(gpu=_gpu(("GPU", cap, 16000)),
                  torch={**CU129_TORCH, "version": "2.13.0+cu126", "cuda_build": "12.6",
                         "arch_list": TORCH_2_13_ARCHS["cu126"]})
    found = {f["id"]: f for f in doctor.findings_for(rep)}
    assert ("gpu0-kernels" in found) is blackwell
    if blackwell:
        assert found["gpu0-kernels"]["level"] == "block"
        assert "cu129 or cu130" in found["gpu0-kernels"]["fix"]

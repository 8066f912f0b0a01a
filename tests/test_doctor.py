"""Healthcheck: stable JSON schema, exit codes, and the torch-kernel capability logic."""

from __future__ import annotations

import json
import platform
import re
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
        "         fix: RTX 50-series (sm_120) needs a CUDA 12.8+ torch build: set "
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 in configs/workspace.env, "
        "delete .venv, re-run ./scripts/bootstrap.sh.",
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
        "         fix: RTX 50-series (sm_120) needs a CUDA 12.8+ torch build: set "
        "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 in configs/workspace.env, "
        "delete .venv, re-run ./scripts/bootstrap.sh.",
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

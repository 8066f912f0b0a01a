"""Healthcheck: is this machine ready to fine-tune, and if not, what to do.

    ./scripts/healthcheck.sh            (== rwkvforge doctor)
    rwkvforge doctor --json

Reports OS / WSL2 (and WSL's pinned-memory limit), GPU + driver + compute capability,
whether the installed torch has kernels for that capability, the bitsandbytes backend,
deepspeed, flash-linear-attention, the tokenizer encoder and CPU WKV kernel in use (the
native C ones or their fallbacks), free disk, Python and key package versions.
Exit code: 0 = ready, 1 = warnings only, 2 = blockers.

The JSON schema (SCHEMA_VERSION) is stable: top-level keys are listed in REPORT_KEYS and each
finding is {"id", "level": "ok"|"warn"|"block", "message", "fix"}.

Every message / fix is written once, as an English template in TEXTS. In `collect()`'s report a
finding also carries "key" (into TEXTS) and "params" (the values filled in), so the dashboard
can show it in another language (its catalogue keys are "doctor.<key>.message" / ".fix"); the
JSON output leaves both out.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from rwkvforge.paths import workspace_root

SCHEMA_VERSION = 1
REPORT_KEYS = ("schema_version", "status", "exit_code", "os", "python", "gpu", "torch",
               "bitsandbytes", "deepspeed", "fla", "tokenizer", "wkv_cpu", "disk", "memory",
               "packages", "findings")
KEY_PACKAGES = ("torch", "rwkv", "pyrwkv-tokenizer", "peft", "bitsandbytes", "deepspeed",
                "safetensors", "numpy", "fastapi", "uvicorn", "streamlit",
                "flash-linear-attention", "triton", "transformers", "wandb")
MIN_FREE_DISK_GIB = 10.0
LEVEL_RANK = {"ok": 0, "warn": 1, "block": 2}
FINDING_KEYS = ("id", "level", "message", "fix")  # what the JSON output has of a finding

_BOOTSTRAP = "Run ./scripts/bootstrap.sh."
_NO_KERNELS = ("torch {version} has no kernels for {name} (sm_{sm}); it was built for {archs}. "
               "Symptom: 'no kernel image is available for execution on the device'.")
_CU128_FIX = ("RTX 50-series (sm_120) needs a CUDA 12.8+ torch build: set "
              "TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 in configs/workspace.env, "
              "delete .venv, re-run ./scripts/bootstrap.sh.")
_NO_GPU = ("No NVIDIA GPU found: everything runs on the CPU (fine for the demo model; slow for "
           "real models).")
# key -> (message, fix): the English text of every finding, `str.format` templates. The
# dashboard's English catalogue takes them from here (rwkvforge.dashboard.i18n); zh-CN.json
# translates each one ("doctor.<key>.message", and ".fix" where the fix is not empty).
TEXTS: dict[str, tuple[str, str]] = {
    "python.too_old": ("Python {major}.{minor} is too old.",
                       "Install Python 3.10+ (3.11 recommended) and re-run "
                       "./scripts/bootstrap.sh."),
    "python.ok": ("Python {version}.", ""),
    "torch.missing": ("torch cannot be imported ({error}).", _BOOTSTRAP),
    "torch.ok": ("torch {version} (CUDA build: {cuda_build}).", ""),
    "torch.ok_cpu": ("torch {version} (CUDA build: none).", ""),
    "gpu.cpu_torch": ("{name} found but the installed torch is a CPU build.",
                      "Set TORCH_SPEC/TORCH_INDEX_URL empty in configs/workspace.env, delete "
                      ".venv and re-run ./scripts/bootstrap.sh to get a CUDA build."),
    "gpu.no_kernels": (_NO_KERNELS, _CU128_FIX),
    "gpu.no_kernels_no_archs": (_NO_KERNELS.replace("{archs}", "nothing"), _CU128_FIX),
    "gpu.ok": ("{name} sm_{sm}, {memory_mib} MiB, driver {driver}.", ""),
    "cuda_runtime.unavailable": ("torch has CUDA but torch.cuda.is_available() is False.",
                                 "Update the NVIDIA driver (on WSL2: the Windows driver; do not "
                                 "install a Linux display driver inside WSL)."),
    "gpu.none": (_NO_GPU,
                 "To train on a GPU: install the NVIDIA driver until `nvidia-smi` lists the "
                 "card, then re-run ./scripts/bootstrap.sh (it picks the CUDA torch). Nothing "
                 "to do for CPU-only use."),
    "gpu.none_wsl": (_NO_GPU, "On WSL2 install the NVIDIA Windows driver and check "
                              "`nvidia-smi` works inside WSL."),
    "bitsandbytes.missing": ("bitsandbytes is not installed: QLoRA profiles unavailable.",
                             _BOOTSTRAP),
    "bitsandbytes.broken": ("bitsandbytes {version} fails to import: {error}",
                            "See docs/troubleshooting.md#bitsandbytes; re-run "
                            "./scripts/bootstrap.sh."),
    "bitsandbytes.ok": ("bitsandbytes {version} ({backend} backend).", ""),
    "deepspeed.missing": ("deepspeed not installed: multi-GPU (DEEPSPEED_STAGE) unavailable.",
                          "Run ./scripts/bootstrap.sh (it installs deepspeed with "
                          "--no-build-isolation)."),
    "deepspeed.ok": ("deepspeed {version}.", ""),
    "fla.missing": ("WKV on CUDA (training): chunked torch kernel, slower and hungrier than "
                    "fla, because fla cannot be used: {problem}.",
                    "Re-run ./scripts/bootstrap.sh: it installs the fla-core + triton pair "
                    "that matches the installed torch."),
    "fla.ok": ("WKV on CUDA (training): fla-core {version} Triton kernels.", ""),
    "tokenizer.missing": ("the World tokenizer cannot be loaded ({error}).",
                          "Run ./scripts/bootstrap.sh (it installs the rwkv and "
                          "pyrwkv-tokenizer packages)."),
    "tokenizer.fallback": ("tokenizer: {backend} encoder; {status}.",
                           "Install a C compiler (sudo apt install gcc) for ~2x faster data "
                           "preparation; the ids are the same either way."),
    "tokenizer.native": ("tokenizer: native C encoder (built and cached in ~/.cache/rwkvforge).",
                         ""),
    "wkv_cpu.native": ("WKV on CPU (training, prefill): native C kernel.", ""),
    "wkv_cpu.chunked": ("WKV on CPU (training, prefill): chunked torch kernel (C kernel "
                        "{problem}).",
                        "Install a C compiler (sudo apt install gcc): CPU training steps are "
                        "~1.5x faster with the C kernel; results are the same."),
    "disk.low": ("Only {free_gib} GiB free at {path}.",
                 "Free disk space: checkpoints of a 1.5B model take several GiB each."),
    "disk.ok": ("{free_gib} GiB free.", ""),
    "wsl.pinned_memory": ("Running under WSL2 with {memory_gib} GiB visible. WSL2 caps pinned "
                          "(page-locked) memory, so CPU offload and pinned data loading can fail "
                          "with 'CUDA error: out of memory' even when the GPU has room.",
                          "Keep DEEPSPEED_OFFLOAD=0 on WSL2 unless needed; raise memory= in "
                          "%UserProfile%\\.wslconfig and run `wsl --shutdown` to apply."),
}


def _version(pkg: str) -> str | None:
    try:
        return md.version(pkg)
    except md.PackageNotFoundError:
        return None


def _run(argv: list[str], timeout: float = 10.0) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=True)
        return out.stdout
    except (OSError, subprocess.SubprocessError):
        return None


def os_info() -> dict[str, Any]:
    release = platform.release()
    proc_version = ""
    try:
        proc_version = Path("/proc/version").read_text(errors="replace")
    except OSError:
        pass
    wsl = "microsoft" in (release + proc_version).lower() or bool(os.environ.get("WSL_DISTRO_NAME"))
    distro = None
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {"system": platform.system(), "release": release, "machine": platform.machine(),
            "distro": distro, "wsl": wsl, "wsl_version": (2 if "wsl2" in release.lower()
                                                          or wsl else None) if wsl else None}


def memory_info() -> dict[str, Any]:
    total = avail = None
    try:
        import psutil

        vm = psutil.virtual_memory()
        total, avail = vm.total, vm.available
    except ImportError:
        pass
    gib = 1024 ** 3
    return {"total_gib": round(total / gib, 1) if total else None,
            "available_gib": round(avail / gib, 1) if avail else None,
            "cpu_count": os.cpu_count()}


def gpu_info() -> dict[str, Any]:
    info: dict[str, Any] = {"available": False, "count": 0, "devices": [], "driver": None,
                            "cuda_driver_version": None, "source": None}
    out = _run(["nvidia-smi", "--query-gpu=name,driver_version,compute_cap,memory.total",
                "--format=csv,noheader,nounits"]) if shutil.which("nvidia-smi") else None
    if out:
        for line in out.strip().splitlines():
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 4:
                info["devices"].append({"name": parts[0], "compute_capability": parts[2],
                                        "memory_mib": int(float(parts[3]))
                                        if parts[3].replace(".", "").isdigit() else None})
                info["driver"] = parts[1]
        info["available"] = bool(info["devices"])
        info["count"] = len(info["devices"])
        info["source"] = "nvidia-smi"
        head = _run(["nvidia-smi"]) or ""
        for token in head.split("|"):
            if "CUDA Version" in token:
                info["cuda_driver_version"] = token.split(":")[-1].strip()
    return info


def torch_info() -> dict[str, Any]:
    try:
        torch = importlib.import_module("torch")
    except Exception as e:  # noqa: BLE001 - any import failure is a finding
        return {"installed": False, "error": f"{type(e).__name__}: {e}"}
    cuda_ok = bool(torch.cuda.is_available())
    return {"installed": True, "version": torch.__version__,
            "cuda_build": torch.version.cuda, "cuda_available": cuda_ok,
            "arch_list": list(torch.cuda.get_arch_list()) if torch.version.cuda else [],
            "threads": torch.get_num_threads()}


def torch_supports(cap: str, arch_list: list[str]) -> bool:
    """True when a torch build with `arch_list` has kernels (SASS, or PTX it can JIT) for
    compute capability `cap` ("12.0")."""
    major, _, minor = cap.partition(".")
    want = int(major) * 10 + int(minor or 0)
    for arch in arch_list:
        kind, _, num = arch.partition("_")
        if not num.isdigit():
            continue
        n = int(num)
        if kind == "sm" and n == want:
            return True
        if kind == "sm" and n // 10 == want // 10 and n <= want:  # same major: binary compatible
            return True
        if kind == "compute" and n <= want:  # PTX JIT-compiles forward
            return True
    return False


def bnb_info() -> dict[str, Any]:
    ver = _version("bitsandbytes")
    if not ver:
        return {"installed": False, "version": None, "backend": None}
    try:
        import torch

        importlib.import_module("bitsandbytes")
        backend = "cuda" if torch.cuda.is_available() else "cpu"
        return {"installed": True, "version": ver, "backend": backend, "error": None}
    except Exception as e:  # noqa: BLE001
        return {"installed": True, "version": ver, "backend": None,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}


def optional_info(dist: str) -> dict[str, Any]:
    ver = _version(dist)
    return {"installed": ver is not None, "version": ver}


def fla_info() -> dict[str, Any]:
    """fla-core (the CUDA WKV kernel): version, and why it cannot be used (None: it imports)."""
    ver = _version("fla-core") or _version("flash-linear-attention")
    if ver is None:
        return {"installed": False, "version": None,
                "problem": "fla-core is not installed"}
    from rwkvforge.model.wkv import fla_problem

    return {"installed": True, "version": ver, "problem": fla_problem()}


def tokenizer_info() -> dict[str, Any]:
    """Which encoder `get_tokenizer()` uses, and why not the native (C) one, if not."""
    try:
        from rwkvforge import tokenizer

        return {"backend": tokenizer.get_tokenizer().backend,
                "native": tokenizer.native_status()}
    except Exception as e:  # noqa: BLE001 - a broken install is a finding, not a crash
        return {"backend": None, "native": None, "error": f"{type(e).__name__}: {e}"}


def wkv_cpu_info() -> dict[str, Any]:
    """Which WKV kernel `wkv_impl=auto` runs on CPU, and why not the native (C) one, if not."""
    from rwkvforge import native

    if native.available("wkv_cpu"):
        return {"kernel": "native", "problem": None}
    return {"kernel": "chunked", "problem": native.problem("wkv_cpu")}


def disk_info(path: Path) -> dict[str, Any]:
    usage = shutil.disk_usage(path)
    gib = 1024 ** 3
    return {"path": str(path), "free_gib": round(usage.free / gib, 1),
            "total_gib": round(usage.total / gib, 1)}


def finding(id_: str, level: str, key: str, **params: Any) -> dict[str, Any]:
    """A finding whose message and fix are TEXTS[key] filled with `params`."""
    message, fix = TEXTS[key]
    return {"id": id_, "level": level, "message": message.format(**params),
            "fix": fix.format(**params), "key": key, "params": params}


def python_finding(version_info: tuple[int, ...], version: str) -> dict[str, Any]:
    """Python itself: `version_info` as sys.version_info, `version` as the text to show."""
    if tuple(version_info[:2]) < (3, 10):
        return finding("python", "block", "python.too_old", major=version_info[0],
                       minor=version_info[1])
    return finding("python", "ok", "python.ok", version=version)


def findings_for(rep: dict[str, Any]) -> list[dict[str, Any]]:
    """Turn the raw facts into findings, each with a fix."""
    out: list[dict[str, Any]] = [python_finding(sys.version_info, platform.python_version())]

    def add(id_: str, level: str, key: str, **params: Any) -> None:
        out.append(finding(id_, level, key, **params))

    t = rep["torch"]
    g = rep["gpu"]
    if not t.get("installed"):
        add("torch", "block", "torch.missing", error=t.get("error"))
    elif t["cuda_build"]:
        add("torch", "ok", "torch.ok", version=t["version"], cuda_build=t["cuda_build"])
    else:
        add("torch", "ok", "torch.ok_cpu", version=t["version"])
    if g["available"]:
        for i, d in enumerate(g["devices"]):
            cap = d["compute_capability"]
            sm = cap.replace(".", "")
            if t.get("installed") and not t.get("cuda_build"):
                add(f"gpu{i}-torch", "block", "gpu.cpu_torch", name=d["name"])
            elif t.get("installed") and not torch_supports(cap, t.get("arch_list", [])):
                archs = ", ".join(t.get("arch_list", []))
                add(f"gpu{i}-kernels", "block",
                    "gpu.no_kernels" if archs else "gpu.no_kernels_no_archs",
                    version=t["version"], name=d["name"], sm=sm,
                    **({"archs": archs} if archs else {}))
            else:
                add(f"gpu{i}", "ok", "gpu.ok", name=d["name"], sm=sm,
                    memory_mib=d["memory_mib"], driver=g["driver"])
            if t.get("installed") and t.get("cuda_build") and not t.get("cuda_available"):
                add("cuda-runtime", "block", "cuda_runtime.unavailable")
    else:
        add("gpu", "warn", "gpu.none_wsl" if rep["os"]["wsl"] else "gpu.none")
    b = rep["bitsandbytes"]
    if not b["installed"]:
        add("bitsandbytes", "warn", "bitsandbytes.missing")
    elif b.get("error"):
        add("bitsandbytes", "warn", "bitsandbytes.broken", version=b["version"],
            error=b["error"])
    else:
        add("bitsandbytes", "ok", "bitsandbytes.ok", version=b["version"], backend=b["backend"])
    if not rep["deepspeed"]["installed"]:
        add("deepspeed", "warn", "deepspeed.missing")
    else:
        add("deepspeed", "ok", "deepspeed.ok", version=rep["deepspeed"]["version"])
    fla = rep["fla"]
    if g["available"] and fla.get("problem"):
        add("fla", "warn", "fla.missing", problem=fla["problem"])
    elif g["available"]:
        add("fla", "ok", "fla.ok", version=fla["version"])
    tk = rep["tokenizer"]
    if tk["backend"] is None:
        add("tokenizer", "block", "tokenizer.missing", error=tk.get("error"))
    elif tk["backend"] != "native":
        switched_off = "RWKVFORGE_NATIVE=0" in str(tk["native"])
        add("tokenizer", "ok" if switched_off else "warn", "tokenizer.fallback",
            backend=tk["backend"], status=tk["native"])
    else:
        add("tokenizer", "ok", "tokenizer.native")
    wk = rep["wkv_cpu"]
    if wk["kernel"] == "native":
        add("wkv-cpu", "ok", "wkv_cpu.native")
    else:
        add("wkv-cpu", "ok" if "RWKVFORGE_NATIVE=0" in str(wk["problem"]) else "warn",
            "wkv_cpu.chunked", problem=wk["problem"])
    d = rep["disk"]
    if d["free_gib"] < MIN_FREE_DISK_GIB:
        add("disk", "warn", "disk.low", free_gib=d["free_gib"], path=d["path"])
    else:
        add("disk", "ok", "disk.ok", free_gib=d["free_gib"])
    if rep["os"]["wsl"]:
        add("wsl-pinned-memory", "warn" if g["available"] else "ok", "wsl.pinned_memory",
            memory_gib=rep["memory"].get("total_gib"))
    return out


def catalogue_entries() -> dict[str, str]:
    """TEXTS as flat translation-catalogue entries: "doctor.<key>.message" and, where a fix
    exists, "doctor.<key>.fix" (the dashboard's English catalogue includes these)."""
    out: dict[str, str] = {}
    for key, (message, fix) in TEXTS.items():
        out[f"doctor.{key}.message"] = message
        if fix:
            out[f"doctor.{key}.fix"] = fix
    return out


def public_report(rep: dict[str, Any]) -> dict[str, Any]:
    """`rep` in the stable JSON schema: findings without their text keys and params."""
    return {**rep, "findings": [{k: f[k] for k in FINDING_KEYS} for f in rep["findings"]]}


def collect(root: Path | None = None) -> dict[str, Any]:
    root = root or workspace_root()
    rep: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "os": os_info(),
        "python": {"version": platform.python_version(), "executable": sys.executable,
                   "venv": sys.prefix != sys.base_prefix},
        "gpu": gpu_info(),
        "torch": torch_info(),
        "bitsandbytes": bnb_info(),
        "deepspeed": optional_info("deepspeed"),
        "fla": fla_info(),
        "tokenizer": tokenizer_info(),
        "wkv_cpu": wkv_cpu_info(),
        "disk": disk_info(root if root.exists() else Path.cwd()),
        "memory": memory_info(),
        "packages": {p: _version(p) for p in KEY_PACKAGES},
    }
    rep["findings"] = findings_for(rep)
    worst = max((LEVEL_RANK[f["level"]] for f in rep["findings"]), default=0)
    rep["exit_code"] = worst
    rep["status"] = ("ready", "warnings", "blocked")[worst]
    return {k: rep[k] for k in REPORT_KEYS}


def format_report(rep: dict[str, Any]) -> str:
    mark = {"ok": "  ok  ", "warn": " warn ", "block": "BLOCK "}
    lines = [f"rwkvforge healthcheck — {rep['status']}"]
    o = rep["os"]
    lines.append(f"os: {o['distro'] or o['system']} {o['release']}{' (WSL2)' if o['wsl'] else ''}")
    for f in rep["findings"]:
        lines.append(f"[{mark[f['level']]}] {f['message']}")
        if f["level"] != "ok" and f["fix"]:
            lines.append(f"         fix: {f['fix']}")
    pk = ", ".join(f"{k} {v}" for k, v in rep["packages"].items() if v)
    lines.append(f"packages: {pk}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvforge doctor", description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    args = ap.parse_args(argv)
    rep = collect()
    print(json.dumps(public_report(rep), indent=2) if args.json else format_report(rep))
    return int(rep["exit_code"])


if __name__ == "__main__":
    raise SystemExit(main())

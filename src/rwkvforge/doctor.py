"""Healthcheck: is this machine ready to fine-tune, and if not, what to do.

    ./scripts/healthcheck.sh            (== rwkvforge doctor)
    rwkvforge doctor --json

Reports OS / WSL2 (and WSL's pinned-memory limit), GPU + driver + compute capability, whether
the installed torch has kernels for that capability, the bitsandbytes backend and whether its
CUDA library has code for the GPU (read from the library's fatbin), deepspeed and whether
DEEPSPEED_OFFLOAD=1's CPU Adam is built or can be (which DeepSpeed builder, compiler, ninja,
Python headers, CUDA toolkit), flash-linear-attention, the tokenizer encoder and CPU WKV kernel
in use (the native C ones or their fallbacks), free disk, Python and key package versions.
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
import functools
import importlib
import importlib.metadata as md
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import warnings
from pathlib import Path
from typing import Any

from rwkvforge.config import ConfigError
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
_BUILD_FIX = ("Let bootstrap pick the torch build for this GPU: leave TORCH_SPEC and "
              "TORCH_INDEX_URL empty in configs/workspace.env, delete .venv, re-run "
              "./scripts/bootstrap.sh (sm_50 .. sm_90: cu126; sm_100 / sm_120 and newer: cu129 "
              "or cu130 - torch 2.13.0 has no cu128 build).")
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
    "gpu.no_kernels": (_NO_KERNELS, _BUILD_FIX),
    "gpu.no_kernels_no_archs": (_NO_KERNELS.replace("{archs}", "nothing"), _BUILD_FIX),
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
    "bitsandbytes.no_binary": ("bitsandbytes {version} has no library for torch's CUDA "
                               "{cuda} ({library} is missing): QLoRA (QUANT=nf4 / int8) cannot "
                               "run on the GPU.",
                               "Re-run ./scripts/bootstrap.sh to install a bitsandbytes built "
                               "for CUDA {cuda}, or train with PROFILE=lora-bf16 (no "
                               "bitsandbytes)."),
    "bitsandbytes.no_arch": ("bitsandbytes {version}'s CUDA {cuda} library ({library}) has "
                             "kernels for {archs}, none of which runs on {name} (sm_{sm}): "
                             "QLoRA (QUANT=nf4 / int8) fails on this GPU.",
                             "Upgrade bitsandbytes to a release built for sm_{sm} (re-run "
                             "./scripts/bootstrap.sh; bitsandbytes 0.45+ with CUDA 12.8+ has "
                             "Blackwell kernels), or train with PROFILE=lora-bf16."),
    "deepspeed.missing": ("deepspeed not installed: multi-GPU (DEEPSPEED_STAGE) unavailable.",
                          "Run ./scripts/bootstrap.sh (it installs deepspeed with "
                          "--no-build-isolation)."),
    "deepspeed.ok": ("deepspeed {version}.", ""),
    "deepspeed.cpu_adam_ready": ("DEEPSPEED_OFFLOAD=1: DeepSpeed's CPU Adam is ready ({how}).",
                                 ""),
    "deepspeed.cpu_adam_builds": ("DEEPSPEED_OFFLOAD=1: DeepSpeed's CPU Adam is compiled on its "
                                  "first use ({builder}; a minute or two) and everything it "
                                  "needs is here.", ""),
    "deepspeed.cpu_adam_missing": ("DEEPSPEED_OFFLOAD=1 would fail: DeepSpeed compiles its CPU "
                                   "Adam on first use ({builder}) and this machine lacks "
                                   "{missing}.",
                                   "Install what is missing: {fix}"),
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

        bnb = importlib.import_module("bitsandbytes")
        backend = "cuda" if torch.cuda.is_available() else "cpu"
        out = {"installed": True, "version": ver, "backend": backend, "error": None}
        if torch.version.cuda:  # the library bitsandbytes loads for this torch, and its GPUs
            lib = bnb_library(Path(bnb.__file__).parent, torch.version.cuda, os.environ)
            out["cuda_library"] = lib.name
            out["cuda_archs"] = cuda_binary_archs(lib) if lib.is_file() else None
        return out
    except Exception as e:  # noqa: BLE001
        return {"installed": True, "version": ver, "backend": None,
                "error": f"{type(e).__name__}: {str(e)[:300]}"}


def bnb_library(package_dir: Path, torch_cuda: str, env: dict[str, str]) -> Path:
    """The CUDA library bitsandbytes (0.50) loads for torch's CUDA X.Y: BNB_CUDA_VERSION's
    when set (its override), else libbitsandbytes_cudaXY.so, else the newest shipped one of
    the same major below X.Y, else the oldest above it; with no same-major library, the exact
    name (which does not exist)."""
    if env.get("BNB_CUDA_VERSION"):
        return package_dir / f"libbitsandbytes_cuda{env['BNB_CUDA_VERSION']}.so"
    major, minor = (int(x) for x in torch_cuda.split(".")[:2])
    exact = package_dir / f"libbitsandbytes_cuda{major}{minor}.so"
    if exact.is_file():
        return exact
    shipped = {}
    for lib in package_dir.glob(f"libbitsandbytes_cuda{major}*.so"):
        tail = lib.name[len(f"libbitsandbytes_cuda{major}"):-len(".so")]
        if tail.isdigit() and len(tail) <= 2:  # cuda12X / cuda12XY: minor X or XY
            shipped[int(tail)] = lib
    below = [m for m in shipped if m <= minor]
    above = [m for m in shipped if m > minor]
    if below:
        return shipped[max(below)]
    return shipped[min(above)] if above else exact


def cuda_binary_archs(path: Path) -> list[str]:
    """The GPU code a CUDA shared library carries, read from its .nv_fatbin ELF section:
    "sm_XY" for each cubin (machine code), "compute_XY" for each PTX (JIT-compiled forward) -
    what `cuobjdump --list-elf / --list-ptx` prints, without the CUDA toolkit. [] when the
    file has no fatbin."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELF64 only (every CUDA build today)
        raise ValueError(f"{path}: not a 64-bit ELF shared library")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    heads = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    names = heads[shstrndx][4]  # the section-name table's file offset
    blob = b""
    for name, _, _, _, offset, size in heads:
        if data[names + name:data.index(b"\0", names + name)] == b".nv_fatbin":
            blob = data[offset:offset + size]
    found: set[tuple[int, int]] = set()
    pos = 0
    while pos + 16 <= len(blob):  # fatbin containers, one per compiled unit, 8-byte aligned
        magic, _, head, size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != 0xBA55ED50:
            pos += 8
            continue
        entry, end = pos + head, pos + head + size
        while entry + 32 <= end:  # entries: kind (1 PTX, 2 cubin), header size, payload size
            kind, _, entry_head, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            found.add((kind, arch))
            entry += entry_head + payload
        pos = end
    return [f"{'sm' if kind == 2 else 'compute'}_{arch}"
            for kind, arch in sorted(found, key=lambda k: (k[1], k[0])) if kind in (1, 2)]


def optional_info(dist: str) -> dict[str, Any]:
    ver = _version(dist)
    return {"installed": ver is not None, "version": ver}


# ---- DeepSpeed's CPU Adam (DEEPSPEED_OFFLOAD=1) --------------------------------------------------
# DEEPSPEED_OFFLOAD=1 trains with DeepSpeedCPUAdam, whose C++ op DeepSpeed compiles the first
# time it is used (torch.utils.cpp_extension + ninja) unless the wheel was built with
# DS_BUILD_CPU_ADAM=1. Which builder compiles it decides what that needs: in DeepSpeed 0.19 the
# CUDA accelerator hands out the CPU builder (a C++ compiler, ninja, Python's headers); older
# DeepSpeed used a CUDA op builder that also needs the CUDA toolkit (nvcc + headers, of torch's
# CUDA major version) - pip's CUDA runtime wheels have no nvcc. These checks ask DeepSpeed
# which builder it will use and look for each thing on this machine, before anything starts.
def cuda_home(env: dict[str, str]) -> Path | None:
    """The CUDA toolkit torch's extension builder uses: CUDA_HOME or CUDA_PATH, else the
    folder above `nvcc` on PATH, else /usr/local/cuda (torch.utils.cpp_extension's order)."""
    for key in ("CUDA_HOME", "CUDA_PATH"):
        if env.get(key):
            return Path(env[key])
    nvcc = shutil.which("nvcc", path=env.get("PATH", ""))
    if nvcc:
        return Path(nvcc).parent.parent
    return Path("/usr/local/cuda") if Path("/usr/local/cuda").is_dir() else None


def _nvcc_release(nvcc: Path) -> str | None:
    out = _run([str(nvcc), "--version"], timeout=30)
    m = re.search(r"release (\d+\.\d+)", out or "")
    return m.group(1) if m else None


def cpu_adam_missing(builder: Any, cuda: str | None, env: dict[str, str]) -> list[str]:
    """What compiling DeepSpeed's CPU Adam with `builder` (a DeepSpeed op builder) lacks here;
    [] when it can be built. `cuda`: torch's CUDA version when a GPU is in use (only then does
    a CUDA op builder compile CUDA code), else None. `env`: the environment it will run in."""
    from deepspeed.ops.op_builder.builder import CUDAOpBuilder

    missing = []
    path = env.get("PATH", "")
    cxx = env.get("CXX") or "c++"
    if not shutil.which(cxx, path=path):
        missing.append(f"a C++ compiler ({cxx} is not on PATH)")
    if not shutil.which("ninja", path=path):
        beside = Path(sys.executable).parent / "ninja"
        missing.append("ninja on PATH" + (f" ({beside} exists: put {beside.parent} on PATH, "
                                          "e.g. `source .venv/bin/activate`)"
                                          if beside.exists() else ""))
    headers = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not headers.is_file():
        missing.append(f"Python's C headers ({headers})")
    if cuda and isinstance(builder, CUDAOpBuilder):
        home = cuda_home(env)
        nvcc = home / "bin" / "nvcc" if home else None
        if nvcc is None or not nvcc.is_file():
            missing.append("the CUDA toolkit's nvcc (" + (f"CUDA_HOME={home} has no bin/nvcc"
                                                          if home else "no CUDA_HOME, no nvcc "
                                                          "on PATH, no /usr/local/cuda") + ")")
        else:
            release = _nvcc_release(nvcc)
            if release is None or release.split(".")[0] != cuda.split(".")[0]:
                missing.append(f"a CUDA {cuda.split('.')[0]}.x toolkit ({nvcc} is CUDA "
                               f"{release or '?'}; torch is built with CUDA {cuda})")
    return missing


def cpu_adam_fix(missing: list[str], cuda: str | None, deepspeed_version: str | None) -> str:
    """What to install for each thing `cpu_adam_missing` found (Ubuntu / WSL2 names)."""
    steps = []
    text = " ".join(missing)
    if "C++ compiler" in text:
        steps.append("sudo apt install build-essential")
    if "ninja" in text:
        steps.append("put ninja on PATH (sudo apt install ninja-build, or activate .venv)")
    if "Python's C headers" in text:
        steps.append(f"sudo apt install python{sys.version_info[0]}.{sys.version_info[1]}-dev")
    if "CUDA" in text:
        major, _, minor = (cuda or "12.8").partition(".")
        steps.append(f"install a CUDA {major}.{minor} toolkit and set CUDA_HOME to it (Ubuntu: "
                     "sudo apt install nvidia-cuda-toolkit if its version matches; WSL2: NVIDIA's "
                     f"cuda-toolkit-{major}-{minor} from the WSL-Ubuntu repository - never a "
                     f"Linux driver; conda: conda install -c nvidia cuda-toolkit={major}.{minor})")
    pin = f"=={deepspeed_version}" if deepspeed_version else ""
    return ("; ".join(steps) + f". Or build it once into DeepSpeed: DS_BUILD_CPU_ADAM=1 pip "
            f"install --no-build-isolation --force-reinstall deepspeed{pin} (needs the same tools "
            "once). Or set DEEPSPEED_OFFLOAD=0 (Adam states stay on the GPU).")


def cpu_adam_info(env: dict[str, str] | None = None) -> dict[str, Any]:
    """Whether DEEPSPEED_OFFLOAD=1's CPU Adam can run here: "state" is "ready" (prebuilt into
    DeepSpeed, or compiled before and cached), "builds" (compiled on first use, and all it
    needs is here) or "missing" (with "missing" and "fix"). Imports deepspeed."""
    env = dict(os.environ if env is None else env)
    import torch
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops

    accel = get_accelerator()
    builder = accel.create_op_builder("CPUAdamBuilder")
    name = f"{type(builder).__module__}.{type(builder).__name__}"
    cuda = torch.version.cuda if accel.device_name() == "cuda" else None
    out: dict[str, Any] = {"builder": name, "state": "builds", "missing": [], "fix": ""}
    if installed_ops.get("cpu_adam") and accelerator_name == accel._name:
        return {**out, "state": "ready", "how": "built into DeepSpeed"}
    from torch.utils.cpp_extension import get_default_build_root

    root = env.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        get_default_build_root(), f"py{sys.version_info[0]}{sys.version_info[1]}_"
        + (f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"))
    cached = Path(root) / builder.name / f"{builder.name}.so"
    if cached.is_file():
        return {**out, "state": "ready", "how": f"compiled before, {cached}"}
    if not builder.is_compatible(False):
        missing = [f"what DeepSpeed's {builder.name} builder needs ({builder.error_log})"]
    else:
        missing = cpu_adam_missing(builder, cuda, env)
    if missing:
        out.update(state="missing", missing=missing,
                   fix=cpu_adam_fix(missing, cuda, _version("deepspeed")))
    return out


def cpu_adam_problem(env: dict[str, str] | None = None) -> str | None:
    """None when DEEPSPEED_OFFLOAD=1 can run here, else what is missing and what to do -
    `train` checks it before DeepSpeed's processes start."""
    info = cpu_adam_info(env)
    if info["state"] != "missing":
        return None
    message, fix = TEXTS["deepspeed.cpu_adam_missing"]
    return (message.format(builder=info["builder"], missing="; ".join(info["missing"]))
            + " Install what is missing: " + info["fix"])


def require_cpu_adam(settings: Any) -> None:
    """ConfigError (what is missing, what to install) when `settings` train with
    DEEPSPEED_OFFLOAD=1 and DeepSpeed's CPU Adam can neither be loaded nor compiled here."""
    if settings.deepspeed_stage > 0 and settings.deepspeed_offload:
        why = cpu_adam_problem()
        if why:
            raise ConfigError(why)


def deepspeed_info() -> dict[str, Any]:
    """deepspeed's version and, when installed, its CPU Adam (cpu_adam_info)."""
    out: dict[str, Any] = optional_info("deepspeed")
    if out["installed"]:
        out["cpu_adam"] = _cpu_adam_in_child()
    return out


@functools.lru_cache(maxsize=1)
def _cpu_adam_in_child() -> dict[str, Any] | None:
    """cpu_adam_info() asked in a child process, once per process (importing deepspeed takes
    seconds and prints to stdout); None when the child fails."""
    code = ("import json, sys; from rwkvforge.doctor import cpu_adam_info; "
            "sys.stdout.write('\\n' + json.dumps(cpu_adam_info()))")
    text = _run([sys.executable, "-c", code], timeout=120)
    try:
        return json.loads((text or "").strip().splitlines()[-1])
    except (IndexError, ValueError):
        return None


def fla_info() -> dict[str, Any]:
    """fla-core (the CUDA WKV kernel): version, and why it cannot be used (None: it imports)."""
    ver = _version("fla-core") or _version("flash-linear-attention")
    if ver is None:
        return {"installed": False, "version": None,
                "problem": "fla-core is not installed"}
    from rwkvforge.model.wkv import fla_problem

    with warnings.catch_warnings():
        # fla's import warns "Triton is not supported on current platform" on a machine
        # without a GPU: that is the GPU finding's news already, not a healthcheck line
        warnings.filterwarnings("ignore", message="Triton is not supported", category=UserWarning)
        problem = fla_problem()
    return {"installed": True, "version": ver, "problem": problem}


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


def bnb_gpu_findings(b: dict[str, Any], t: dict[str, Any], g: dict[str, Any], add) -> None:
    """bitsandbytes' CUDA library against each GPU: is there one for torch's CUDA, and does it
    carry kernels for the GPU's compute capability (`torch_supports`' rule)."""
    if "cuda_archs" not in b or not g["available"] or not t.get("cuda_build"):
        return
    if b["cuda_archs"] is None:
        add("bitsandbytes-cuda", "warn", "bitsandbytes.no_binary", version=b["version"],
            cuda=t["cuda_build"], library=b["cuda_library"])
        return
    for i, d in enumerate(g["devices"]):
        if not torch_supports(d["compute_capability"], b["cuda_archs"]):
            add(f"bitsandbytes-gpu{i}", "warn", "bitsandbytes.no_arch", version=b["version"],
                cuda=t["cuda_build"], library=b["cuda_library"],
                archs=", ".join(b["cuda_archs"]) or "no GPU", name=d["name"],
                sm=d["compute_capability"].replace(".", ""))


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
        bnb_gpu_findings(b, t, g, add)
    if not rep["deepspeed"]["installed"]:
        add("deepspeed", "warn", "deepspeed.missing")
    else:
        add("deepspeed", "ok", "deepspeed.ok", version=rep["deepspeed"]["version"])
        ca = rep["deepspeed"].get("cpu_adam")
        if ca and ca["state"] == "ready":
            add("deepspeed-cpu-adam", "ok", "deepspeed.cpu_adam_ready", how=ca["how"])
        elif ca and ca["state"] == "builds":
            add("deepspeed-cpu-adam", "ok", "deepspeed.cpu_adam_builds", builder=ca["builder"])
        elif ca:  # only DEEPSPEED_OFFLOAD=1 needs it: a warning, not a blocker
            add("deepspeed-cpu-adam", "warn", "deepspeed.cpu_adam_missing",
                builder=ca["builder"], missing="; ".join(ca["missing"]), fix=ca["fix"])
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
        "deepspeed": deepspeed_info(),
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

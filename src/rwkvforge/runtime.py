"""Process-level settings for the entry points (`infer`, `serve`, `eval`, and `train` on a
CPU): called from their `main`, never on import, so a program that imports rwkvforge keeps
its own.

`keep_freed_memory()`: glibc serves allocations above an adaptive threshold (128 KiB up to
32 MiB) with fresh mmaps and gives memory back to the kernel on free (munmap, heap trim), so
the next tensor of that size page-faults all its pages in again, zero-filled by the kernel. A
prefill or a training step allocates and frees the same activation-sized tensors over and
over: on the 2-core CPU here a 512-token prefill of the 0.1B shape took 6k-120k page faults,
and removing them made it ~20-30 % faster (bench/infer_bench.py, interleaved A/B runs). A
LoRA training step of the 0.1B shape at ctx 512 took 24k-37k page faults per step and none
once the heap is kept; the native WKV forward alone ran 9-12 ms per layer on freshly mapped
buffers and 3.4-4.7 ms on reused ones. Raising the mmap and trim thresholds keeps freed
blocks in the heap for reuse, what jemalloc or tcmalloc would do, without a new dependency.
The process just does not hand its heap back between steps. Peak resident memory stayed
within 1%: inference, VmHWM 1.55 GB either way on the 0.1B shape through prefills of mixed
lengths and 16-stream decode; training (LoRA bf16, 0.1B shape, ctx 512, 10 steps), 1.80 GB
with glibc's defaults and 1.82 GB kept, with 1.02 vs 0.76 s per step in that pair of runs.
The heap needs a few rounds to settle: torch allocates 64-byte aligned, and a freed block is
a few bytes short of the next aligned request of the same size until its neighbours have
merged, so one buffer size repeated alone (tests/test_runtime.py: 64 MiB, 16 rounds) leaves
the resident set a few blocks higher than the live data; a training step's many sizes fill
those gaps.
`train` applies it on CPU only (CUDA activations live in torch's caching allocator); its
explicit `malloc_trim` after the setup still hands the setup's transients (fp32 load,
quantisation) back to the OS, whatever the thresholds.

An explicit glibc malloc setting in the environment (MALLOC_MMAP_THRESHOLD_,
MALLOC_TRIM_THRESHOLD_, or malloc tunables in GLIBC_TUNABLES) wins: nothing is changed then.
Memory measurements use that to make resident memory follow live tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_THRESHOLD = -3
_applied: bool | None = None


def pid_alive(pid: object) -> bool:
    """True when a process with this pid exists (signal 0 sends nothing)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def _env_sets_malloc() -> bool:
    """The user (or a measurement) chose glibc's malloc behaviour through the environment."""
    return bool(os.environ.get("MALLOC_MMAP_THRESHOLD_") or os.environ.get(
        "MALLOC_TRIM_THRESHOLD_") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""))


def keep_freed_memory(mmap_threshold: int = 1 << 30, trim_threshold: int = 2**31 - 1) -> bool:
    """Keep freed blocks below `mmap_threshold` bytes in glibc's heap, and never trim free
    heap below `trim_threshold`. True when applied; False where the C library is not glibc
    (macOS, musl, Windows), or where the environment sets glibc's malloc (see the module
    doc): nothing changes there. Idempotent."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if not sys.platform.startswith("linux") or _env_sets_malloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - glibc only (musl's mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _applied = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))
                    and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    return _applied

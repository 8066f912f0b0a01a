"""Process-level settings and measurements for the entry points: `keep_freed_memory` (called
from the `main` of `infer`, `serve`, `eval`, and `train` on a CPU, never on import, so a
program that imports rwkvforge keeps its own), `pid_alive`, and the training process's
`MemoryMonitor` / `release_freed_memory`.

`keep_freed_memory()` raises glibc's mmap and trim thresholds so freed activation-sized blocks
stay in the heap for reuse (what jemalloc / tcmalloc would do, without a new dependency):
otherwise every step maps, page-faults and zero-fills the same buffers again. Figures:
docs/memory.md ("Freed memory on a CPU"). An explicit glibc malloc setting in the
environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, malloc tunables in
GLIBC_TUNABLES) wins: nothing is changed then; memory measurements use that.

This module stays torch-free at import (the data-preparation workers import it); the
monitor imports torch only for a CUDA device.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import sys
import threading

import psutil

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


class MemoryMonitor:
    """Peak memory of this process: CUDA allocator peak on GPU, else resident set size
    sampled every `interval` s by a background thread (psutil)."""

    def __init__(self, device, interval: float = 0.02):
        self.device, self.interval = device, interval
        self.peak_mb = 0.0
        self.window_peak_mb = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _rss_mb(self) -> float:
        return psutil.Process().memory_info().rss / 2**20

    def start(self) -> "MemoryMonitor":
        if self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.peak_mb = self.window_peak_mb = self._rss_mb()
            self._thread = threading.Thread(target=self._run, daemon=True, name="mem-monitor")
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            v = self._rss_mb()
            self.window_peak_mb = max(self.window_peak_mb, v)
            self.peak_mb = max(self.peak_mb, v)

    def take_window(self) -> float:
        """Peak since the last call (MB)."""
        if self.device.type == "cuda":
            import torch

            v = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.peak_mb = max(self.peak_mb, v)
            return v
        v = max(self.window_peak_mb, self._rss_mb())
        self.peak_mb = max(self.peak_mb, v)
        self.window_peak_mb = self._rss_mb()
        return v

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)


def release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc malloc_trim), so that resident memory
    measured afterwards reflects live tensors rather than setup leftovers."""
    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass

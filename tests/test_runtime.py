"""runtime.keep_freed_memory: a freed large block is reused, not page-faulted in again."""

import subprocess
import sys

import pytest

# a 64 MiB block (above glibc's largest adaptive mmap threshold, 32 MiB) malloc'ed, written
# and freed five times in a fresh process; prints the page faults of the last four rounds
PROBE = r"""
import ctypes, resource, sys
from rwkvforge.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "1" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
n, out = 64 << 20, []
for _ in range(5):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(int(applied), *out[1:])
"""


def _probe(flag: str) -> tuple[int, list[int]]:
    p = subprocess.run([sys.executable, "-c", PROBE, flag], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    applied, *faults = map(int, p.stdout.split())
    return applied, faults


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_keep_freed_memory_reuses_freed_blocks():
    applied, kept = _probe("1")
    if not applied:
        pytest.skip("the C library is not glibc")
    _, default = _probe("0")
    pages = (64 << 20) // 4096
    assert min(default) > pages // 2, default  # glibc default: munmap, fault in again
    assert max(kept) < pages // 50, kept  # kept in the heap: reused as it is


def test_keep_freed_memory_is_idempotent():
    from rwkvforge import runtime

    first = runtime.keep_freed_memory()
    assert runtime.keep_freed_memory() is first

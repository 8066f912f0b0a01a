"""runtime.keep_freed_memory: a freed large block is reused, not page-faulted in again, at
the malloc level and for torch's (64-byte aligned) allocations; an explicit glibc setting in
the environment wins. The probes run in fresh interpreters (the setting is process-wide)."""

import json
import os
import subprocess
import sys

import pytest

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")


def _env() -> dict:
    """This environment without glibc malloc settings (they would win over the probe's)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}


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


def _probe_malloc(flag: str) -> tuple[int, list[int]]:
    p = subprocess.run([sys.executable, "-c", PROBE, flag], env=_env(), capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    applied, *faults = map(int, p.stdout.split())
    return applied, faults


@linux
def test_keep_freed_memory_reuses_freed_blocks():
    applied, kept = _probe_malloc("1")
    if not applied:
        pytest.skip("the C library is not glibc")
    _, default = _probe_malloc("0")
    pages = (64 << 20) // 4096
    assert min(default) > pages // 2, default  # glibc default: munmap, fault in again
    assert max(kept) < pages // 50, kept  # kept in the heap: reused as it is


def test_keep_freed_memory_is_idempotent():
    from rwkvforge import runtime

    first = runtime.keep_freed_memory()
    assert runtime.keep_freed_memory() is first


# allocate, touch and free a 64 MiB buffer (above glibc's largest adaptive mmap threshold, so
# by default a fresh mmap each time) 16 times; the page faults of the last 4 rounds tell
# whether the memory is reused. glibc's heap reaches its steady state within a few rounds
# (torch allocates 64-byte aligned: the first freed blocks are a few bytes short of the next
# aligned request until neighbours have merged); the RSS it settles at is printed too.
TORCH_PROBE = r"""
import json, resource, sys
import torch
from rwkvforge.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
faults = []
for _ in range(16):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
rss_mb = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize() >> 20
print(json.dumps({"applied": applied, "faults": sum(faults[-4:]), "rss_mb": rss_mb}))
"""


def _probe(mode: str, **env) -> dict:
    r = subprocess.run([sys.executable, "-c", TORCH_PROBE, mode], capture_output=True, text=True,
                       env={**_env(), "OMP_NUM_THREADS": "1", **env}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@linux
def test_torch_allocations_reach_a_steady_state_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _probe("default")
    kept = _probe("keep")
    assert kept["applied"] is True
    assert default["faults"] > 4 * pages // 2, default  # fresh zero-filled pages every round
    assert kept["faults"] < pages // 20, kept  # heap blocks reused: no new pages
    print(f"RSS after 16 rounds of 64 MiB: default {default['rss_mb']} MB, "
          f"kept {kept['rss_mb']} MB")


@linux
def test_explicit_malloc_environment_wins():
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        out = _probe("keep", **env)
        assert out["applied"] is False, env
        assert out["faults"] > 4 * ((64 << 20) // os.sysconf("SC_PAGE_SIZE")) // 2, (env, out)

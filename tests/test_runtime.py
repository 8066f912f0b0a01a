"""rwkvforge.runtime.keep_freed_memory: freed activation-sized blocks are reused instead of
being unmapped and page-faulted in again; an explicit glibc setting in the environment wins.
Each case runs in a fresh interpreter (the setting is process-wide)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# allocate, touch, free a 64 MiB buffer (above glibc's largest adaptive mmap threshold, so by
# default it is a fresh mmap each time), then count the page faults of doing it again
PROBE = r"""
import json, resource, sys
import torch
from rwkvforge.runtime import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
def once():
    t = torch.empty(16 << 20, dtype=torch.float32)
    t.fill_(1.0)
    del t
once()
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
once()
print(json.dumps({"applied": applied,
                  "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0}))
"""


def _probe(mode: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    r = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True,
                       env={**base, "OMP_NUM_THREADS": "1", **env}, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_page_faults():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    default = _probe("default")
    kept = _probe("keep")
    assert kept["applied"] is True
    assert default["faults"] > pages // 2, default  # fresh pages, zero-filled by the kernel
    assert kept["faults"] < pages // 20, kept  # the same heap block again


def test_explicit_malloc_environment_wins():
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        out = _probe("keep", **env)
        assert out["applied"] is False, env
        assert out["faults"] > ((64 << 20) // os.sysconf("SC_PAGE_SIZE")) // 2, (env, out)

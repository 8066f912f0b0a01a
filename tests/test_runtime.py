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

# allocate, touch and free a 64 MiB buffer (above glibc's largest adaptive mmap threshold, so
# by default a fresh mmap each time) ROUNDS times; the page faults of the last 4 rounds tell
# whether the memory is reused. glibc's heap reaches its steady state within a few rounds
# (torch allocates 64-byte aligned: the first freed blocks are a few bytes short of the next
# aligned request until neighbours have merged); the RSS it settles at is printed too.
PROBE = r"""
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
    assert default["faults"] > 4 * pages // 2, default  # fresh zero-filled pages every round
    assert kept["faults"] < pages // 20, kept  # heap blocks reused: no new pages
    print(f"RSS after 16 rounds of 64 MiB: default {default['rss_mb']} MB, "
          f"kept {kept['rss_mb']} MB")


def test_explicit_malloc_environment_wins():
    for env in ({"MALLOC_MMAP_THRESHOLD_": "65536"},
                {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}):
        out = _probe("keep", **env)
        assert out["applied"] is False, env
        assert out["faults"] > 4 * ((64 << 20) // os.sysconf("SC_PAGE_SIZE")) // 2, (env, out)

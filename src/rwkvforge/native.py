"""The package's small C kernels (``csrc/*.c``): built on first use, cached, optional.

Each source is plain C (no Python or torch headers) loaded with ctypes, so nothing is built at
install time and nothing breaks when no compiler exists: ``load(name)`` returns None and
``problem(name)`` says why, and every caller has a pure-Python / torch fallback that gives
the same results. They are:

* ``trie_tokenizer``: the World tokenizer's greedy longest match (used by tokenizer.py);
* ``wkv_cpu``: the RWKV-7 recurrence forward and backward on CPU (used by model/wkv.py);
* ``softmax_cpu``: the training head's row softmax of bf16 logits (used by train.py);
* ``decode_cpu``: the decode step's bf16 GEMV and sparse channel-mix (used by model/decode.py),
  and the sampler's top-p cutoff (used by sampling.py).

The compiler is ``$CC`` (else ``cc``); the library goes to ``$XDG_CACHE_HOME/rwkvforge`` (else
``~/.cache/rwkvforge``) under a name hashing the source with the shared headers
(``csrc/*.h``), the flags and the compiler, written to a temp name and renamed (concurrent
processes never load a half-written file). x86-64 builds by GCC or clang >= 14 carry
AVX-512 / AVX2 / baseline clones picked at load time, so a cached library is safe on any CPU
(both compilers are tested; an older clang builds the baseline only, and the WKV kernel then
runs no faster than the torch fallback). A source with optional flags (``-fopenmp``) that
the compiler rejects is built without them, and the rejection is cached too
(``<name>-<key>.failed``), so later processes do not run the failing build again.
``RWKVFORGE_NATIVE=0`` turns all of them off.

    python -m rwkvforge.native          # build them all and print their status
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("trie_tokenizer", "wkv_cpu", "softmax_cpu", "decode_cpu")
FLAGS = ("-O3", "-shared", "-fPIC", "-fopenmp-simd", "-fno-math-errno", "-Wno-psabi")
# flags a source is first built with; where that build fails (a compiler without OpenMP) it
# is built without them, and the library says so itself (wkv_cpu: rf_wkv_openmp())
OPTIONAL_FLAGS = {"wkv_cpu": ("-fopenmp",), "softmax_cpu": ("-fopenmp",), "decode_cpu": ("-fopenmp",)}
_problems: dict[str, str] = {}


def enabled() -> bool:
    return os.environ.get("RWKVFORGE_NATIVE", "1").strip().lower() not in (
        "0", "false", "no", "off")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rwkvforge"


class BuildError(OSError):
    """The compiler ran and rejected the source or its flags."""


def _compile(cc: list[str], flags: tuple[str, ...], src: Path, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([*cc, *flags, "-o", tmp, str(src)], capture_output=True,
                              text=True, timeout=300)
        if proc.returncode != 0:
            raise BuildError(f"`{' '.join(cc)}` exited with {proc.returncode}: "
                             f"{proc.stderr.strip()[-500:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _write_marker(path: Path, text: str) -> None:
    """`text` to `path` atomically (temp + rename); a cache that cannot be written is only
    slower (the build is tried again next time)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, path)
    except OSError:
        pass


@functools.lru_cache(maxsize=None)
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library `name` (built once per source version, flags and compiler), or
    None with the reason in `problem(name)`."""
    if name not in SOURCES:
        raise ValueError(f"unknown native source {name!r}: one of {', '.join(SOURCES)}")
    if not enabled():
        _problems[name] = "off (RWKVFORGE_NATIVE=0)"
        return None
    src = CSRC / f"{name}.c"
    cc = shlex.split(os.environ.get("CC", "")) or [shutil.which("cc") or "cc"]
    # the source and the headers it may include (csrc/simd.h): a change to either rebuilds
    code = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))
    error: Exception | None = None
    for flags in dict.fromkeys((FLAGS + OPTIONAL_FLAGS.get(name, ()), FLAGS)):
        key = hashlib.sha256(code + " ".join([*cc, *flags]).encode()
                             + platform.machine().encode()).hexdigest()[:16]
        lib_path = cache_dir() / f"{name}-{key}.so"
        # optional flags this compiler rejected once (no OpenMP) are not tried again by every
        # new process: the rejection is kept beside the libraries (delete it to retry)
        failed = lib_path.with_suffix(".failed") if flags != FLAGS else None
        if failed is not None and failed.is_file() and not lib_path.is_file():
            continue
        try:
            if not lib_path.is_file():
                _compile(cc, flags, src, lib_path)
            return ctypes.CDLL(str(lib_path))
        except (OSError, subprocess.SubprocessError) as e:
            error = error or e  # the first failure says the most
            if failed is not None and isinstance(e, BuildError):
                _write_marker(failed, str(e))
    _problems[name] = f"unavailable ({error})"
    return None


def available(name: str) -> bool:
    """Whether `load(name)` gives a library (builds it on first call)."""
    return load(name) is not None


def problem(name: str) -> str | None:
    """Why `load(name)` gave None (None when it loaded or was not tried)."""
    return _problems.get(name)


def main(argv: list[str] | None = None) -> int:  # noqa: ARG001 - the stage signature; no arguments yet
    for name in SOURCES:
        lib = load(name)
        print(f"{name}: {'loaded' if lib is not None else problem(name)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

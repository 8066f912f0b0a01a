"""Shared fixtures: a tiny random RWKV-7 checkpoint (real 65536 vocabulary, L2 C128 head 64)."""

from __future__ import annotations

import pytest

TINY_LAYERS, TINY_EMBD = 2, 128


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory):
    """Path to a tiny random RWKV-7 .pth (written once per test session; do not modify it)."""
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd

    path = tmp_path_factory.mktemp("tiny_model") / "rwkv7-tiny-test.pth"
    save_pth(make_random_model_sd(TINY_LAYERS, TINY_EMBD, seed=0), path)
    return path


@pytest.fixture
def tiny_model(tiny_model_path):
    """A fresh fp32 RWKV7 (eval mode) loaded from `tiny_model_path`; each test gets its own."""
    from rwkvforge.checkpoint import load_model

    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def parts(tiny_model_path):
    """(fp32 RWKV7 loaded from `tiny_model_path`, the World tokenizer), one per test module:
    the server tests run engines over it (do not modify it)."""
    from rwkvforge.checkpoint import load_model
    from rwkvforge.tokenizer import get_tokenizer

    return load_model(tiny_model_path), get_tokenizer()


@pytest.fixture
def one_torch_thread():
    """The CI machine has 2 cores shared by several processes: one torch thread each
    (used by the training-heavy test files through `pytestmark`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def sft_prefix(tmp_path_factory):
    """The shipped SFT sample, prepared (10% held out for validation); shared by the training
    test files (do not modify it)."""
    from sample_data import prepare_sample

    return prepare_sample(tmp_path_factory, "bsl_sft", "sft", 0.1)


@pytest.fixture
def small_fs(tmp_path):
    """mount_small(size, readonly=False) -> a folder on a real tmpfs of that size (a full
    disk is a real ENOSPC there; a read-only one a real EROFS); unmounted after the test. Skips where this process may not mount (not
    root / no CAP_SYS_ADMIN)."""
    import subprocess

    mounted = []

    def mount_small(size: str = "2m", readonly: bool = False):
        d = tmp_path / f"small-fs-{len(mounted)}"
        d.mkdir()
        opts = f"size={size},mode=0777" + (",ro" if readonly else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here to fill it (needs root): "
                        f"{r.stderr.strip() or r.returncode}")
        mounted.append(d)
        return d

    yield mount_small
    for d in mounted:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


def fill_disk(folder) -> None:
    """Write a filler file in `folder` until its filesystem has no space left."""
    import errno
    import os

    with open(os.path.join(folder, "filler"), "wb") as f:
        try:
            while True:
                f.write(b"\0" * (64 << 10))
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    # small writes may still fit in a last partial page: take those too
    i = 0
    while True:
        try:
            with open(os.path.join(folder, f"filler-{i}"), "wb") as f:
                f.write(b"\0" * 4096)
            i += 1
        except OSError:  # noqa: PERF203 - fills the disk until it is full
            break

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

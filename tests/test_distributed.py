"""distributed.py without a GPU: the device every NCCL collective and barrier runs on."""

from __future__ import annotations

import torch
import torch.distributed as dist

from rwkvforge import distributed


def test_process_group_sets_the_ranks_gpu_before_nccl_starts(monkeypatch):
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(dist, "init_process_group",
                        lambda backend, **kw: calls.append(("init", backend, kw.get("device_id"))))
    monkeypatch.setenv("WORLD_SIZE", "2")
    gpu = torch.device("cuda", 1)  # LOCAL_RANK=1
    distributed.init_process_group(gpu)
    # the device first (every later barrier / collective uses it), then NCCL bound to it
    assert calls == [("set_device", gpu), ("init", "nccl", gpu)]


def test_all_reduce_hands_nccl_a_tensor_on_the_ranks_gpu(monkeypatch):
    """The Trainer reduces CPU float64 stats; NCCL accepts CUDA tensors only. Without a GPU:
    record the device each tensor is moved to and check the collective gets the moved one."""
    moved, reduced = [], []
    real_to = torch.Tensor.to

    def fake_to(self, *args, **kw):
        target = torch.device(args[0]) if args and isinstance(args[0], (str, torch.device)) else None
        if target is not None and target.type == "cuda":  # stand-in for a copy to the GPU
            out = self.clone()
            moved.append((target, out))
            return out
        return real_to(self, *args, **kw)

    monkeypatch.setattr(torch.Tensor, "to", fake_to)
    monkeypatch.setattr(dist, "all_reduce", lambda t: reduced.append(t) or t.mul_(2))
    s = object.__new__(distributed.DeepSpeedStrategy)
    s.device = torch.device("cuda", 1)
    stats = torch.tensor([1.5, 0.25], dtype=torch.float64)
    out = s.all_reduce(stats)
    assert [d for d, _ in moved] == [torch.device("cuda", 1)]
    assert len(reduced) == 1 and reduced[0] is moved[0][1]  # the collective saw the GPU copy
    assert out.device.type == "cpu" and out.dtype == torch.float64
    assert out.tolist() == [3.0, 0.5]


def test_all_reduce_on_gloo_keeps_cpu_tensors():
    distributed.init_process_group(torch.device("cpu"))  # one process, loopback rendezvous
    try:
        s = object.__new__(distributed.DeepSpeedStrategy)
        s.device = torch.device("cpu")
        out = s.all_reduce(torch.tensor([2.0], dtype=torch.float64))
        assert out.tolist() == [2.0] and out.dtype == torch.float64
    finally:
        dist.destroy_process_group()

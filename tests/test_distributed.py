"""distributed.py: one process or DeepSpeed ZeRO-2/3 behind one interface. Real DeepSpeed
processes over gloo on the CPU (slow tests); the strategy choice, the ZeRO config and the
device every NCCL collective and barrier runs on as units, without a GPU."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from rwkvforge import config as cfgmod
from rwkvforge.checkpoint import complete_marker
from rwkvforge import distributed
from rwkvforge.distributed import (DeepSpeedStrategy, SingleProcess, make_strategy,
                                   weights_only_load)
from test_train import _train_cmd, metrics, sub_env

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_one_process_is_plain_torch_and_several_need_deepspeed(monkeypatch):
    s = cfgmod.resolve(cli={}, env={}, root=ROOT).settings
    assert isinstance(make_strategy(s, torch.device("cpu")), SingleProcess)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(cfgmod.ConfigError, match="2 processes but DEEPSPEED_STAGE=0"):
        make_strategy(s, torch.device("cpu"))


def test_zero_config_follows_the_settings_and_the_split(monkeypatch):
    """The DeepSpeed config: the batch is micro x accumulation x processes; offload moves Adam
    states (and, under ZeRO-3, parameters) to CPU memory; clipping is DeepSpeed's."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("rwkvforge.distributed.init_process_group", lambda device: None)
    for stage, offload in ((2, 0), (2, 1), (3, 1)):
        s = cfgmod.resolve(cli={"deepspeed_stage": stage, "deepspeed_offload": offload,
                                "grad_clip": 0.5}, env={}, root=ROOT).settings
        ds = DeepSpeedStrategy(s, torch.device("cpu"))
        c = ds.ds_config(micro_bsz=2, grad_accum=3)
        assert c["train_batch_size"] == 12 and c["gradient_clipping"] == 0.5
        zero = c["zero_optimization"]
        assert zero["stage"] == stage
        assert ("offload_optimizer" in zero) == bool(offload)
        assert ("offload_param" in zero) == (stage == 3 and bool(offload))
        # the gradient reduce bucket (DeepSpeed allocates it whole, 5e8 elements by default):
        # the trainable parameters' size once they are known
        assert "reduce_bucket_size" not in zero
        ds.params = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.zeros(5))]
        assert ds.ds_config(2, 3)["zero_optimization"]["reduce_bucket_size"] == 17


@pytest.mark.slow
def test_deepspeed_two_processes_match_one(tiny_model_path, sft_prefix, tmp_path):
    """ZeRO-2 and ZeRO-3 (+ CPU-offloaded Adam) over gloo with 2 processes x MICRO_BSZ 1 ==
    1 process x MICRO_BSZ 2 (same global batch): every step's loss within 1e-4 relative,
    final adapters within 1e-5."""
    env = sub_env()
    base = ("--max-steps=3", "--save-every=0", "--grad-clip=1.0")
    one = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "one", *base,
                                    "--micro-bsz=2"),
                         env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "two", *base,
                                    "--micro-bsz=1", "--deepspeed-stage=2", "--num-gpus=2"),
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-4000:]
    cfg = json.loads((tmp_path / "two" / "config.json").read_text())
    assert cfg["training"]["world_size"] == 2
    three = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "three", *base,
                                      "--micro-bsz=1", "--deepspeed-stage=3",
                                      "--deepspeed-offload=1", "--num-gpus=2"),
                           env=env, capture_output=True, text=True, timeout=900)
    assert three.returncode == 0, three.stderr[-4000:]
    from rwkvforge.adapter import read_adapter

    a = [r["loss"] for r in metrics(tmp_path / "one")]
    want = read_adapter(tmp_path / "one" / "adapter").factors
    for run in ("two", "three"):
        b = [r["loss"] for r in metrics(tmp_path / run)]
        assert len(a) == len(b) == 3
        assert b == pytest.approx(a, rel=1e-4), run
        got = read_adapter(tmp_path / run / "adapter").factors
        assert got.keys() == want.keys()
        for k in want:
            torch.testing.assert_close(got[k].A, want[k].A, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got[k].B, want[k].B, rtol=1e-4, atol=1e-5)


class _Planted:
    """Unpickled by torch.load(weights_only=False), it creates the file it names."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@pytest.mark.slow
def test_deepspeed_resume_reads_its_checkpoint_weights_only(tiny_model_path, sft_prefix,
                                                             tmp_path):
    """A ZeRO-2 run (2 processes) resumed from its step-2 checkpoint repeats step 3's loss;
    its DeepSpeed files are read with torch.load(weights_only=True), so an object planted in
    one is refused with a clear error and never built."""
    env = sub_env()
    extra = ("--max-steps=3", "--save-every=2", "--micro-bsz=1", "--deepspeed-stage=2",
             "--num-gpus=2")
    r = subprocess.run(_train_cmd(tiny_model_path, sft_prefix, tmp_path, "ds", *extra),
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "ds"
    want = [m["loss"] for m in metrics(run)]
    resume = [sys.executable, "-m", "rwkvforge.train", "--no-progress", "--resume", str(run)]
    shutil.rmtree(run / "checkpoints" / "step-3")  # as if killed after step 2
    r = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step-2" in r.stderr
    assert [m["loss"] for m in metrics(run)] == want
    # the same again, with an object planted in one of step 2's DeepSpeed files
    shutil.rmtree(run / "checkpoints" / "step-3")
    marker = tmp_path / "code-ran"
    target = (run / "checkpoints" / "step-2" / "deepspeed" / "state"
              / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    sd = weights_only_load(str(target))
    sd["planted"] = _Planted(str(marker))
    torch.save(sd, target)
    # first line of defence: the file no longer matches the checksum its COMPLETE recorded
    r = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0 and "checksum mismatch" in r.stderr, r.stderr[-3000:]
    assert not marker.exists()
    # second: with the checksum forged too, DeepSpeed's loader still builds no object
    ck = run / "checkpoints" / "step-2"
    (ck / "COMPLETE").write_bytes(complete_marker(ck, 2))
    r = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode != 0
    assert "weights_only=True" in r.stderr and "refuses" in r.stderr, r.stderr[-3000:]
    assert not marker.exists()


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

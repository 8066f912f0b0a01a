"""How a training step runs across processes: plain torch in one process, or DeepSpeed ZeRO
2 / 3 over NUM_GPUS processes (gloo on a CPU, NCCL on CUDA). Both are one small interface
the trainer calls without asking which it has: wrap, forward, backward, step, the checkpoint
save / load, the gathered adapter export, the micro-batch split, and an ordered shutdown.

    strategy = make_strategy(settings, device)      # in train.Trainer.setup
    strategy.wrap(loss_module, optimizer, model, micro_bsz, grad_accum)

`launch` re-runs `rwkvforge train` under an existing launcher (none of our own):
torch.distributed.run with NUM_GPUS processes on one node, or on each of NUM_NODES nodes
(its static rendezvous at MASTER_ADDR:MASTER_PORT, this node being NODE_RANK), or DeepSpeed's
multi-node runner over pdsh / ssh when HOSTFILE is set. Global rank 0 alone writes the run
folder, which every node must see (shared storage): `check_shared_folder` proves it at start.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import secrets
import shlex
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from rwkvforge import config
from rwkvforge.checkpoint import (COMPLETE_MARKER, atomic_write_bytes, complete_marker,
                                  fsync_dir, load_trainer_state, save_trainer_state,
                                  write_checkpoint)
from rwkvforge.peft import load_trainable_state, trainable_state


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# ---- RNG -----------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Every random stream a step draws from (torch, Python, numpy, CUDA)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = st["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]),
                         float(n[4])))
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---- one process ---------------------------------------------------------------------------------
class SingleProcess:
    """Plain torch in one process: our optimiser, our checkpoint files."""

    world = 1
    rank = 0

    def __init__(self, device: torch.device):
        self.device = device
        self.module: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.model: nn.Module | None = None
        self.params: list[nn.Parameter] = []

    def wrap(self, loss_module: nn.Module, optimizer, model: nn.Module, micro_bsz: int,
             grad_accum: int) -> None:
        del micro_bsz, grad_accum  # the interface: DeepSpeed's wrap configures the split
        self.module, self.optimizer, self.model = loss_module, optimizer, model
        self.params = [p for p in model.parameters() if p.requires_grad]

    def forward(self, *args):
        return self.module(*args)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:  # noqa: ARG002
        loss.backward()

    def step(self, grad_clip: float) -> float | None:
        """The optimiser step at the end of the accumulation; the gradient norm (clipped
        from) when GRAD_CLIP > 0."""
        gnorm = (float(torch.nn.utils.clip_grad_norm_(self.params, grad_clip))
                 if grad_clip > 0 else None)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gnorm

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_split(self, micro_bsz: int, grad_accum: int) -> None:
        """A new micro-batch split of the same global batch (after an OOM back-off)."""

    def gathered(self):
        """The block sees whole trainable weights (ZeRO-3 shards them; here they are)."""
        return contextlib.nullcontext()

    def eval_forward(self) -> Callable | None:
        """The loss call validation must use instead of the plain module, if any."""
        return None

    def state(self) -> dict:
        """What trainer_state.pt holds for this strategy."""
        return {"optimizer": self.optimizer.state_dict(),
                "trainable": trainable_state(self.model)}

    def save_checkpoint(self, run_dir: Path, step: int, fill: Callable[[Path], None],
                        rank_rng: dict) -> Path:  # noqa: ARG002
        """checkpoints/step-N/ written through `fill(tmp)` (the adapter and
        trainer_state.pt), COMPLETE last, renamed into place."""
        return write_checkpoint(run_dir, step, fill)

    def load_checkpoint(self, ck: Path, st: dict) -> dict:  # noqa: ARG002 - the interface: DeepSpeed's load reads `ck`
        """Restore the optimiser and trainable weights from `ck`; the RNG state to resume."""
        load_trainable_state(self.model, st["trainable"])
        self.optimizer.load_state_dict(st["optimizer"])
        return st["rng"]

    def sync_lr(self, scheduler) -> None:
        """After a resume: the LR of the (possibly extended, MAX_STEPS) schedule now."""
        for g, base, fn in zip(self.optimizer.param_groups, scheduler.base_lrs,
                               scheduler.lr_lambdas):
            g["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


# ---- DeepSpeed -----------------------------------------------------------------------------------
class DeepSpeedError(RuntimeError):
    """A DeepSpeed checkpoint or setting we refuse; the message says what to do."""


def weights_only_load(path: str, map_location=None):
    """DeepSpeed's checkpoint-engine `load`, through torch.load(weights_only=True): tensors,
    plain containers and the three DeepSpeed classes its ZeRO optimizer states hold (no
    other object is built, so a tampered file cannot run code)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    with torch.serialization.safe_globals([LossScaler, ZeroStageEnum, fragment_address]):
        return torch.load(path, map_location=map_location, weights_only=True)


def init_process_group(device: torch.device) -> None:
    """NCCL on CUDA, gloo on a CPU; one process alone gets a private loopback rendezvous.
    On CUDA the rank's GPU (cuda:LOCAL_RANK, see train.pick_device) becomes the current device
    first: NCCL's barrier and collectives otherwise all land on cuda:0."""
    import torch.distributed as dist

    if dist.is_initialized():
        return
    kw = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        kw["device_id"] = device  # binds the group (and its barriers) to this rank's GPU
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, **kw)
    else:
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            port = sk.getsockname()[1]
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1, **kw)


def collective_device(device: torch.device) -> torch.device:
    """Where a collective's tensors must live: NCCL takes CUDA tensors only (the rank's GPU),
    gloo CPU ones."""
    return device if device.type == "cuda" else torch.device("cpu")


class DeepSpeedStrategy:
    """DeepSpeed ZeRO-2 / 3 (DEEPSPEED_OFFLOAD=1: Adam states, and under ZeRO-3 the
    parameters, in CPU memory). Every rank calls every method: the collectives inside
    (gather, barrier, save) need all of them. Checkpoints hold DeepSpeed's sharded state
    under step-N/deepspeed/, read back by its own loader through `weights_only_load`."""

    def __init__(self, settings: config.Settings, device: torch.device,
                 run_dir: Path | None = None):
        self.settings = settings
        self.device = device
        self.world = world_size()
        self.rank = rank()
        self.engine = None
        self.optimizer = None
        self.params: list[nn.Parameter] = []
        init_process_group(device)
        if run_dir is not None and self.world > 1:
            check_shared_folder(Path(run_dir), self.rank, self.world)

    def ds_config(self, micro_bsz: int, grad_accum: int) -> dict[str, Any]:
        s = self.settings
        zero: dict[str, Any] = {"stage": s.deepspeed_stage}
        if self.params:
            # DeepSpeed allocates its gradient reduce bucket whole (default 5e8 elements: 2 GB
            # in fp32 on every GPU); the adapter's gradients need only their own size
            zero["reduce_bucket_size"] = min(sum(p.numel() for p in self.params), 500_000_000)
        if s.deepspeed_offload:
            zero["offload_optimizer"] = {"device": "cpu"}
            if s.deepspeed_stage == 3:
                zero["offload_param"] = {"device": "cpu"}
        return {"train_micro_batch_size_per_gpu": micro_bsz,
                "gradient_accumulation_steps": grad_accum,
                "train_batch_size": micro_bsz * grad_accum * self.world,
                "gradient_clipping": s.grad_clip, "zero_optimization": zero,
                "zero_allow_untested_optimizer": True, "steps_per_print": 2**31 - 1,
                "wall_clock_breakdown": False}

    def wrap(self, loss_module: nn.Module, optimizer, model: nn.Module, micro_bsz: int,
             grad_accum: int) -> None:
        import deepspeed

        self.params = [p for p in model.parameters() if p.requires_grad]
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=loss_module, optimizer=optimizer, model_parameters=self.params,
            config=self.ds_config(micro_bsz, grad_accum), dist_init_required=False)
        if self.settings.deepspeed_stage == 3:
            # weights read as tensors, not through their module's forward: ZeRO-3 must
            # gather them with the module that uses them
            reg = deepspeed.zero.register_external_parameter
            inner = loss_module.inner()
            reg(loss_module, inner.head.weight)
            for blk in inner.blocks:
                reg(blk.att, blk.att.ln_x.weight)
                reg(blk.att, blk.att.ln_x.bias)

    def forward(self, *args):
        return self.engine(*args)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)
        if not last_micro:
            self.engine.step()  # DeepSpeed counts micro-steps; it steps at the boundary

    def step(self, grad_clip: float) -> float | None:  # noqa: ARG002 - in ds_config
        self.engine.step()
        g = self.engine.get_global_grad_norm()
        return float(g) if g is not None else None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def set_split(self, micro_bsz: int, grad_accum: int) -> None:
        self.engine.set_train_micro_batch_size(micro_bsz)
        self.engine.set_train_batch_size(micro_bsz * grad_accum * self.world)

    def gathered(self):
        if self.settings.deepspeed_stage == 3:
            import deepspeed

            return deepspeed.zero.GatheredParameters(self.params)
        return contextlib.nullcontext()

    def eval_forward(self) -> Callable | None:
        # under ZeRO-3 the engine's forward gathers the sharded weights; every rank joins
        return self.engine if self.settings.deepspeed_stage == 3 else None

    def state(self) -> dict:
        return {}  # the optimiser and weights are in DeepSpeed's own files

    def save_checkpoint(self, run_dir: Path, step: int, fill: Callable[[Path], None],
                        rank_rng: dict) -> Path:
        """The same protocol as write_checkpoint (a .tmp folder, COMPLETE last, renamed into
        place) with every rank writing its shard and RNG state first."""
        import torch.distributed as dist

        final = Path(run_dir) / "checkpoints" / f"step-{step}"
        tmp = final.with_name(final.name + ".tmp")
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state",
                                    client_state={"rank": self.rank})
        save_trainer_state(tmp / f"trainer_state.rank{self.rank}.pt", {"rng": rank_rng})
        dist.barrier()
        if self.rank == 0:
            fill(tmp)
            atomic_write_bytes(tmp / COMPLETE_MARKER, complete_marker(tmp, step))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(final.parent)
        dist.barrier()
        return final

    def load_checkpoint(self, ck: Path, st: dict) -> dict:  # noqa: ARG002
        import pickle

        # DeepSpeed reads its files with torch.load(weights_only=False): ours go through
        # the weights_only unpickler instead
        self.engine.checkpoint_engine.load = weights_only_load
        try:
            self.engine.load_checkpoint(str(ck / "deepspeed"), tag="state",
                                        load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        except pickle.UnpicklingError as e:
            why = (str(e).splitlines() or ["?"])[0]
            raise DeepSpeedError(f"--resume: {ck / 'deepspeed'} holds an object that "
                                 f"torch.load(weights_only=True) refuses to build, so it "
                                 f"was not read ({why}). Resume only from checkpoints this "
                                 f"tool wrote.") from e
        return load_trainer_state(ck / f"trainer_state.rank{self.rank}.pt")["rng"]

    def sync_lr(self, scheduler) -> None:
        pass  # DeepSpeed's optimiser wrapper takes the LR from the scheduler's next step

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of `t`, returned on t's device (the Trainer's stats are CPU
        float64; NCCL reduces them on this rank's GPU)."""
        import torch.distributed as dist

        x = t.to(collective_device(self.device))
        dist.all_reduce(x)
        return x.to(t.device)

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self, failed: bool = False) -> None:
        """Ordered shutdown, so no C++ worker thread of the process group or the engine is
        still alive when the interpreter tears down (a rank aborting at exit with
        "terminate called without an active exception"): every rank reaches the barrier
        (rank 0 has written and fsynced the outputs before it), the engine drops its
        optimiser and hooks, then the process group goes. `failed`: no barrier (the other
        ranks may be gone), only the local teardown."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return
        if not failed:
            dist.barrier()
        if self.engine is not None:
            with contextlib.suppress(Exception):
                self.engine.destroy()
            self.engine = None
        dist.destroy_process_group()


# ---- several nodes ------------------------------------------------------------------------------
SHARED_MARKER = ".shared-check"
# the cluster's addresses may change between a run and its resume (a node replaced)
RESUME_CLUSTER = ("node_rank", "master_addr", "master_port", "hostfile")


def check_shared_folder(run_dir: Path, rank_: int, world: int) -> None:
    """Every rank must see the run folder rank 0 writes (checkpoint shards, per-rank RNG files
    and resume all read it): rank 0 writes a marker holding a random token, every rank reads
    it back, and all ranks learn who could not. ConfigError on every rank when one cannot, so
    no rank waits alone in a later collective."""
    import torch.distributed as dist

    marker = run_dir / f"{SHARED_MARKER}.{os.getpid()}" if rank_ == 0 else None
    token = [None, None]
    if rank_ == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        token = [secrets.token_hex(16), marker.name]
        atomic_write_bytes(marker, token[0].encode())
    dist.broadcast_object_list(token, src=0)
    try:
        seen = (run_dir / token[1]).read_bytes().decode() == token[0]
    except OSError:
        seen = False
    everyone = [None] * world
    dist.all_gather_object(everyone, (seen, socket.gethostname()))
    if rank_ == 0:
        with contextlib.suppress(OSError):
            marker.unlink()
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(everyone) if not ok]
    if blind:
        raise config.ConfigError(
            f"the run folder {run_dir} is not shared: {', '.join(blind)} cannot see the "
            f"file global rank 0 wrote there ({token[1]}). Multi-node runs keep one run "
            "folder that every node reads and writes (checkpoint shards, resume): put RUNS_DIR "
            "on shared storage (NFS, a cluster file system) mounted at the same path on every "
            "node, and give every node the same RUNS_DIR and --run-name.")


def check_cluster(settings: config.Settings, argv: list[str]) -> None:
    """The multi-node settings `launch` needs, checked before any process starts."""
    s = settings
    if s.num_nodes > 1 and s.deepspeed_stage == 0:
        raise config.ConfigError(f"NUM_NODES={s.num_nodes} but DEEPSPEED_STAGE=0: multi-node "
                                 "training runs through DeepSpeed; set DEEPSPEED_STAGE=2 (or 3).")
    if s.hostfile:
        if not Path(s.hostfile).expanduser().is_file():
            raise config.ConfigError(f"HOSTFILE={s.hostfile}: no such file. It lists one "
                                     "`hostname slots=GPUS` line per node (DeepSpeed's format).")
        return
    if s.num_nodes == 1:
        return
    if s.node_rank >= s.num_nodes:
        raise config.ConfigError(f"NODE_RANK={s.node_rank} with NUM_NODES={s.num_nodes}: node "
                                 f"ranks are 0 ... {s.num_nodes - 1}, one per node.")
    if not s.master_addr:
        raise config.ConfigError(f"NUM_NODES={s.num_nodes}: set MASTER_ADDR (--master-addr) to "
                                 "node 0's address, the same on every node.")
    named = "--resume" in argv or any(a == "--run-name" or a.startswith(("--run-name=",
                                                                          "--resume="))
                                      for a in argv)
    if not (named or s.run_name):
        raise config.ConfigError(f"NUM_NODES={s.num_nodes}: give every node the same "
                                 "--run-name (the default name holds each node's own start "
                                 "time, so the nodes would not agree on the run folder).")


def launch_command(settings: config.Settings, argv: list[str], run_name: str) -> list[str]:
    """The launcher command that runs `rwkvforge train argv` as NUM_NODES x NUM_GPUS
    processes (see the module docstring); `--print-command` is not passed on."""
    s = settings
    check_cluster(s, argv)
    fwd = [a for a in argv if a not in ("--print-command", "--print-cmd")]
    if "--resume" not in fwd and not any(a.startswith(("--resume=", "--run-name="))
                                         for a in fwd) and "--run-name" not in fwd:
        fwd += ["--run-name", run_name]
    if s.hostfile:  # DeepSpeed's runner: pdsh / ssh into every host, its launch.py there
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner",
               "--hostfile", str(Path(s.hostfile).expanduser().resolve()),
               "--num_nodes", str(s.num_nodes), "--num_gpus", str(s.num_gpus),
               "--master_port", str(s.master_port)]
        if s.master_addr:
            cmd += ["--master_addr", s.master_addr]
        return [*cmd, "--no_local_rank", "--module", "rwkvforge.train", *fwd]
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if s.num_nodes > 1:  # static rendezvous: node 0 hosts the store at MASTER_ADDR:PORT
        cmd += ["--nnodes", str(s.num_nodes), "--node_rank", str(s.node_rank),
                "--master_addr", s.master_addr, "--master_port", str(s.master_port)]
    else:
        cmd += ["--standalone"]
    return [*cmd, "--nproc_per_node", str(s.num_gpus), "-m", "rwkvforge.train", *fwd]


def make_strategy(settings: config.Settings, device: torch.device,
                  run_dir: Path | None = None):
    """DeepSpeed for DEEPSPEED_STAGE > 0, else plain torch (which refuses more than one
    process: multi-GPU training runs through DeepSpeed). With `run_dir`, several processes
    first prove they all see that folder (check_shared_folder)."""
    if settings.deepspeed_stage > 0:
        return DeepSpeedStrategy(settings, device, run_dir)
    if world_size() > 1:
        raise config.ConfigError(f"{world_size()} processes but DEEPSPEED_STAGE=0: multi-GPU "
                                 "training runs through DeepSpeed; set DEEPSPEED_STAGE=2.")
    return SingleProcess(device)


def launch(settings: config.Settings, argv: list[str], run_name: str,
           print_only: bool = False) -> int:
    """Re-run `rwkvforge train argv` under the launcher `launch_command` picks; its exit code.
    `print_only` (--print-command): print the command, start nothing."""
    cmd = launch_command(settings, argv, run_name)
    if print_only:
        print(shlex.join(cmd))
        return 0
    where = (f"on each of {settings.num_nodes} nodes (HOSTFILE {settings.hostfile})"
             if settings.hostfile else f"on node {settings.node_rank} of {settings.num_nodes}"
             if settings.num_nodes > 1 else "on this machine")
    print(f"launching {settings.num_gpus} DeepSpeed process(es) {where}: {shlex.join(cmd)}", file=sys.stderr)
    return subprocess.run(cmd, check=False).returncode

"""LoRA / QLoRA training of an RWKV-7 model: one process or DeepSpeed ZeRO 2/3, resumable.

    rwkvforge train                                   # demo model + shipped sample, if unset
    rwkvforge train --profile qlora-nf4 --max-steps 200 --run-name bsl-nf4
    rwkvforge train --resume runs/bsl-nf4 --max-steps 400   # continue from its last checkpoint
    rwkvforge train --deepspeed-stage 2 --num-gpus 2        # relaunches itself under
                                                            # torch.distributed.run (gloo on CPU)
    TRAINER=rwkv-peft rwkvforge train --print-command           # the mapped RWKV-PEFT command
    ./scripts/train_lora_bf16.sh | train_qlora_nf4.sh | train_qlora_int8.sh
    ./scripts/train_state.sh    # TRAIN_TYPE=state: the initial WKV states only (state_tuning.py)
    python -m rwkvforge.train --help

Settings come from the config layers (workspace < model < profile < env < flags; see
`rwkvforge config show`). A run writes runs/<run>/: config.json (resolved settings, their
sources, git SHA, versions, hardware), status.json, metrics.jsonl, train.log,
checkpoints/step-N/ (adapter + trainer_state.pt; COMPLETE written last, folder renamed into
place), adapter/ (PEFT layout) and loss.png.

One optimiser step consumes MICRO_BSZ x GRAD_ACCUM x NUM_GPUS sequences. All ranks read the
same global batch and each takes its rows; every token's loss is divided by the masked-token
count of the whole global batch, so the gradient is the same whatever the split into
micro-batches or processes (1 process x 2 micro-batches == 2 processes x 1). The loss (chunked
vocabulary head, DPO) lives in loss.py, the run folder in runs.py.

DeepSpeed (DEEPSPEED_STAGE 2 / 3, DEEPSPEED_OFFLOAD=1 for CPU-offloaded Adam states): the
command re-runs itself with NUM_GPUS processes; checkpoints then hold DeepSpeed's sharded
state under step-N/deepspeed/ (read back by DeepSpeed's own loader) next to the adapter.

A CUDA out-of-memory error inside a step halves MICRO_BSZ and doubles GRAD_ACCUM (same
effective batch), logs it (metrics "event": "oom_backoff") and retries the same step.

TRAINER=rwkv-peft runs third_party/RWKV-PEFT/train.py, mapped from the same config instead.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from rwkvforge import config as cfgmod
from rwkvforge import doctor, paths, upstream
from rwkvforge.checkpoint import (CheckpointError, CorruptCheckpoint, load_model,
                                  load_trainer_state, prune_checkpoints, save_trainer_state,
                                  verified_checkpoint)
from rwkvforge.data.loader import build_loaders
from rwkvforge.data.prepare import SAMPLES, DataInputError, PrepareError, detect_type, prepared_data
from rwkvforge.demo import resolve_base_model
from rwkvforge.distributed import (DeepSpeedError, DeepSpeedStrategy, SingleProcess, launch,
                                   local_rank, make_strategy, rank, rng_state,
                                   seed_everything, set_rng_state, world_size, RESUME_CLUSTER)
from rwkvforge.dpo import DpoReferenceError, dpo_reference
from rwkvforge.loss import (LossModule, autocast_ctx, compute_dtype, evaluate_dpo, evaluate_loss,
                            packed_pair_inputs, pair_rows)
from rwkvforge.memory import MemoryPlanError, preflight_model
from rwkvforge.model.wkv import describe_impl
from rwkvforge.peft import AdapterError, AdapterSpec, count_parameters, unwrap
from rwkvforge.runs import (RunError, RunFolder, RunLocked, config_record,
                            default_run_name, disk_full_message, disk_plan,
                            final_lines, init_wandb, metrics_row, run_started,
                            start_disk_message)
from rwkvforge.progress import bar_fits
from rwkvforge.runtime import MemoryMonitor, keep_freed_memory, release_freed_memory
from rwkvforge.state_tuning import (StateError, Tuning, apply_training, check_settings,
                                    done_lines, export_tuning, finished, optimizer_groups)

log = logging.getLogger("rwkvforge.train")

# settings that may change when resuming (everything else must match the run's config.json)
RESUME_MUTABLE = ("max_steps", "epochs", "save_every", "eval_every", "log_every",
                  "wandb_project", "device", "keep_checkpoints", *RESUME_CLUSTER)


class Stopped(KeyboardInterrupt):
    """SIGTERM / SIGHUP to a training process: it stops as on Ctrl-C (status.json records
    the run as failed, the last complete checkpoint resumes it); args[0] names the signal."""


def _stop_on_signals() -> None:
    def stop(signum, frame):  # noqa: ARG001
        raise Stopped(signal.Signals(signum).name)

    if threading.current_thread() is threading.main_thread():  # only there can it be set
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, stop)


class TrainError(RuntimeError):
    """A problem a person can fix; the message says what and how."""


# ---- schedule ------------------------------------------------------------------------------------
def lr_at(step: int, *, lr: float, lr_final: float, warmup: int, total: int,
          schedule: str) -> float:
    """Learning rate of optimiser step `step` (0-based) of `total`.

    warmup: linear from lr/warmup to lr over the first `warmup` steps; then
    cosine: lr -> lr_final along a half cosine; wsd: flat at lr, then linear to lr_final over
    the last 20% of steps; constant: flat at lr."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    rest = max(total - warmup, 1)
    t = min(max(step - warmup, 0) / max(rest - 1, 1), 1.0)  # 0 at first post-warmup step, 1 at last
    if schedule == "cosine":
        return lr_final + (lr - lr_final) * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "wsd":
        decay_from = 0.8
        if t <= decay_from:
            return lr
        return lr + (lr_final - lr) * (t - decay_from) / (1.0 - decay_from)
    raise TrainError(f"LR_SCHEDULE={schedule!r}: expected cosine, wsd or constant.")


# ---- inputs --------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """Resolved model and data locations (demo defaults filled in)."""

    model_path: Path
    data_prefix: Path
    data_file: Path | None
    demo_model: bool
    demo_data: bool


def resolve_inputs(res: cfgmod.Resolved, root: Path, prepare: bool = True,
                   say: Callable[[str], None] = print, check_data: bool = True,
                   resuming: bool = False) -> Inputs:
    """Model .pth and prepared data prefix; generates the demo model and prepares the data
    when needed (only when `prepare`). `check_data=False`: only name the prefix.
    `resuming`: prepared data that no longer matches DATA_FILE is an error, not redone."""
    s, src = res.settings, res.sources
    model_path, demo_model = resolve_base_model(s.base_model, src.get("BASE_MODEL", "cli"), root,
                                                generate=prepare, say=say)
    try:
        prefix, data_file = prepared_data(s, src, root, prepare=prepare, say=say,
                                          check_data=check_data, resuming=resuming)
    except DataInputError as e:
        raise TrainError(str(e)) from None
    return Inputs(model_path, prefix, data_file, demo_model,
                  demo_data=not s.data_file and not s.data_prefix)


# ---- model ---------------------------------------------------------------------------------------
def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "cuda" or (setting == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TrainError("DEVICE=cuda but torch sees no CUDA GPU (torch "
                             f"{torch.__version__}); run `rwkvforge doctor`, or set DEVICE=auto.")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def build_model(s: cfgmod.Settings, model_path: Path, device: torch.device):
    """Base model + adapters per the settings: (peft model, AdapterSpec, RWKV7Config)."""
    spec = AdapterSpec.from_settings(s)
    if s.precision == "fp16" and device.type == "cpu":
        raise TrainError("PRECISION=fp16 needs a CUDA GPU; on a CPU use bf16 or fp32.")
    compute = compute_dtype(s.precision)
    load_dev = "cpu" if spec.quant != "none" else device  # bnb quantises on the move
    base = load_model(model_path, dtype=torch.float32, device=load_dev)
    cfg = base.config
    pm = apply_training(base, spec, s.train_type, compute_dtype=compute)
    inner = unwrap(pm)
    # frozen float weights in the compute dtype (bf16 halves their memory); trainables fp32
    for p in inner.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != compute:
            p.data = p.data.to(compute)
    inner.to(device)
    inner.gradient_checkpointing = bool(s.grad_cp)
    inner.wkv_impl = s.wkv_impl
    inner.train()
    return pm, spec, cfg


def compile_blocks(model: nn.Module) -> None:
    """torch.compile each block's forward for the training calls (gradients on); no-grad
    calls (evaluation) keep the eager forward, so they neither wait for a second compile nor
    take the training graph. Inductor fuses the token-shift mixes, the gates, the norms and
    the casts around the matmuls and the WKV kernel into a few loops, forward and backward:
    on CPU the kernel is a custom op inside the block's graph (model/wkv.py), so each block
    is one graph, not four pieces split at the recurrence."""
    import torch._dynamo

    # every block shares Block.forward's code object, and dynamo caches per code object with
    # a guard on the block: without room for one entry per block (and layer 0's own), the
    # blocks past the default limit of 8 silently run eager
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(model.blocks) + 8)
    for block in model.blocks:
        eager = block.forward
        compiled = torch.compile(eager)

        def forward(*args, _eager=eager, _compiled=compiled, **kw):
            return (_compiled if torch.is_grad_enabled() else _eager)(*args, **kw)

        block.forward = forward


def make_optimizer(model: nn.Module, s: cfgmod.Settings):
    groups = optimizer_groups(model, s)  # LoRA (decayed), other trainables, the states
    if s.deepspeed_stage > 0 and s.deepspeed_offload:
        if s.optimizer != "adamw":
            raise TrainError("DEEPSPEED_OFFLOAD=1 runs DeepSpeed's CPU Adam: set "
                             "OPTIMIZER=adamw (8-bit states are for GPU memory).")
        from deepspeed.ops.adam import DeepSpeedCPUAdam  # optimiser states in CPU RAM

        return DeepSpeedCPUAdam(groups, lr=s.lr, betas=(0.9, 0.99), eps=1e-8,
                                adamw_mode=True)
    if s.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, lr=s.lr, betas=(0.9, 0.99), eps=1e-8)
    # fused: one kernel over all tensors (CPU and CUDA) instead of a loop of small ops per
    # tensor; the update is the same (21 -> 7 ms per step for the 0.1B shape's adapters on
    # the CPU here). DeepSpeed keeps the default: it wraps the optimiser itself.
    fused = s.deepspeed_stage == 0 and all(
        p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.bfloat16)
        for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=s.lr, betas=(0.9, 0.99), eps=1e-8,
                             fused=fused or None)


# ---- trainer parts -------------------------------------------------------------------------------
def check_combination(s: cfgmod.Settings) -> None:
    """Settings that cannot go together; checked before DeepSpeed's launcher starts too."""
    with as_train_error(StateError):
        check_settings(s)  # TRAIN_TYPE=state / lora+state
    if s.compile and s.deepspeed_stage > 0:
        raise TrainError("COMPILE=1 is for single-process training; with DeepSpeed set "
                         "COMPILE=0.")
    if s.deepspeed_stage == 3 and s.quant != "none":
        raise TrainError("DEEPSPEED_STAGE=3 cannot shard 4-/8-bit base weights: use "
                         "DEEPSPEED_STAGE=2 with QUANT, or QUANT=none with stage 3.")
    if s.data_type == "dpo" and s.compile and s.lora_dropout > 0:
        raise TrainError("COMPILE=1 with DATA_TYPE=dpo needs LORA_DROPOUT=0: the reference "
                         "log-probs are taken by the compiled training forward, which would "
                         "apply the dropout. Set LORA_DROPOUT=0 or COMPILE=0.")
    if s.data_type == "dpo" and s.deepspeed_stage == 3:
        raise TrainError("DATA_TYPE=dpo runs in one process or under DEEPSPEED_STAGE=2 (each "
                         "process computes the reference log-probs with the whole model); set "
                         "DEEPSPEED_STAGE=2.")
    if s.precision == "fp16":
        # fp16 autocast needs a loss scaler (no trainer here has one, DeepSpeed's config
        # included): small LoRA gradients underflow to zero, and training stalls silently
        raise TrainError("PRECISION=fp16 is not supported for training: it needs loss scaling, "
                         "which rwkvforge does not do (fp16 gradients of the small LoRA updates "
                         "underflow to zero). Use PRECISION=bf16 (RTX 30 and newer) or fp32 "
                         "(older cards).")
    doctor.require_cpu_adam(s)  # DEEPSPEED_OFFLOAD=1: checked before DeepSpeed's processes start


def micro_inputs(batch: dict, device: torch.device, world: int, dpo_ftx: float,
                 ref: torch.Tensor | None) -> Callable[[int, int], tuple]:
    """The loss module's arguments for rows a:b of a step's global batch, on the device
    (`ref`: the DPO reference log-probs; None for SFT / text). Every token's loss (DPO: every
    pair's loss, and DPO_FTX's chosen-answer cross-entropy by their token count) is divided
    by the count over the whole global batch, so any split into micro-batches or processes
    gives the same gradient. x world: DeepSpeed averages the ranks' gradients, undo it."""
    if ref is not None and "segment" in batch:  # PACK=1: whole pairs in packed rows
        return packed_pair_inputs(batch, device, world, dpo_ftx, ref)
    if ref is not None:
        pair_scale = world / batch["pair_index"].numel()
        ftx = dpo_ftx * world / max(float(batch["chosen_loss_mask"].sum()), 1.0)

        def pairs(a: int, b: int) -> tuple:
            x, y, w = (t.to(device, non_blocking=True) for t in pair_rows(batch, a, b))
            return x, y, w, ref[batch["pair_index"][a:b]].to(device), pair_scale, ftx
        return pairs
    scale = world / max(float(batch["loss_mask"].sum()), 1.0)
    keys = [k for k in ("input_ids", "targets", "loss_mask", "reset") if k in batch]

    def rows(a: int, b: int) -> tuple:  # + (no ref, 1, 0, the document starts) when packed
        x, y, m, *rs = (batch[k][a:b].to(device, non_blocking=True) for k in keys)
        return x, y, m.float() * scale, *((None, 1.0, 0.0, *rs) if rs else ())
    return rows


def demo_note(s: cfgmod.Settings, root: Path) -> str | None:
    """The banner of a run on the demo model and / or the shipped sample, naming only what is
    unset (None: neither is used)."""
    what, unset = [], []
    if not s.base_model:
        what.append("the random-weight demo model " + paths.demo_model_path(root).name)
        unset.append(("BASE_MODEL", "--base-model"))
    if not (s.data_file or s.data_prefix):
        what.append(f"the shipped sample data ({SAMPLES[s.data_type]})")
        unset.append(("DATA_FILE", "--data-file"))
    if not what:
        return None
    return (f"DEMO RUN: training {' on '.join(what)}. Set {' and '.join(k for k, _ in unset)} "
            f"in configs/workspace.env (or {' / '.join(f for _, f in unset)}) for a real run.")


@contextlib.contextmanager
def as_train_error(*types: type[BaseException]):
    """Errors of `types` from a library become TrainError: their message is for people."""
    try:
        yield
    except types as e:
        raise TrainError(str(e)) from None


def schedule_warnings(s: cfgmod.Settings, total: int) -> list[str]:
    """A learning-rate schedule that cannot do what the settings mean."""
    out = []
    if s.warmup_steps >= total > 0 and s.lr_schedule != "constant":
        out.append(f"warning: WARMUP_STEPS={s.warmup_steps} >= the run's {total} steps: the "
                   "learning rate never reaches LR; lower WARMUP_STEPS")
    if s.lr_final > s.lr and s.lr_schedule != "constant":
        out.append(f"warning: LR_FINAL={s.lr_final:g} is above LR={s.lr:g}: the "
                   f"{s.lr_schedule} schedule will raise the learning rate towards the end "
                   "instead of lowering it; set LR_FINAL below LR (e.g. LR/10)")
    return out


def make_scheduler(optimizer, s: cfgmod.Settings, total: int):
    """LambdaLR over `lr_at` (a multiplier of LR per optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_at(i, lr=s.lr, lr_final=s.lr_final, warmup=s.warmup_steps,
                                   total=total, schedule=s.lr_schedule) / s.lr if s.lr else 0.0)


def model_summary(s: cfgmod.Settings, path: Path, cfg, n_total: int, n_trainable: int,
                  device: torch.device, seconds: float) -> str:
    return (f"model {path} L{cfg.n_layer} C{cfg.n_embd} ({n_total / 1e6:.1f}M params, "
            f"{n_trainable / 1e6:.3f}M trainable; {s.profile}: QUANT={s.quant} "
            f"PRECISION={s.precision}" + (f" r={s.lora_r} init={s.peft_init}" if "lora" in
                                          s.train_type else "") + f"{' dora' if s.use_dora else ''}"
            f"{' TRAIN_TYPE=' + s.train_type if s.train_type != 'lora' else ''}) on {device} "
            f"in {seconds:.1f}s")


def step_line(step: int, total: int, loss: float, lr: float, tps: float, row: dict,
              val: float | None) -> str:
    """The console / log line of a logged step (DPO: with its reward accuracy and margin)."""
    return (f"step {step}/{total} loss {loss:.4f} lr {lr:.2e} {tps:,.0f} tok/s"
            + (f" reward acc {row['reward_acc']:.2f} margin {row['reward_margin']:.3f}"
               if "reward_acc" in row else "")
            + (f" val {val:.4f}" if val is not None else ""))


def halved_split(micro_bsz: int, grad_accum: int, step: int, ctx_len: int,
                 err: BaseException) -> tuple[int, int]:
    """After a CUDA out-of-memory error: half the micro-batch, twice the accumulation (the
    same effective batch); TrainError with the fixes when MICRO_BSZ is 1 already."""
    if micro_bsz <= 1:
        raise TrainError(
            f"out of GPU memory at step {step} with MICRO_BSZ=1 (CTX_LEN={ctx_len}): lower "
            "CTX_LEN, set GRAD_CP=1, use QUANT=nf4 or a smaller HEAD_CHUNK, or run `rwkvforge "
            "plan` to pick a config. "
            f"({str(err).splitlines()[0] if str(err) else type(err).__name__})") from err
    return micro_bsz // 2, grad_accum * 2


def val_start_line(s: cfgmod.Settings, val: float, n_batches: int) -> str:
    """The validation loss before training (DPO: at ln 2 while the model is its reference)."""
    dpo = s.data_type == "dpo"
    kind = ("SimPO " if s.dpo_loss == "simpo" else "DPO ") if dpo else ""
    return (f"val {kind}loss before training: {val:.4f} ({n_batches} batches"
            + (", ln 2 = 0.6931 while the model is its own reference)"
               if dpo and s.dpo_loss == "sigmoid" else ")"))


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss_start: float | None
    val_loss_end: float | None
    peak_mem_mb: float
    micro_bsz: int
    grad_accum: int


# ---- trainer -------------------------------------------------------------------------------------
class Trainer:
    """One training run: `setup()` builds everything, `run()` trains, checkpoints and writes
    the final adapter. `on_micro_batch(step, index, micro_bsz)` is called before every
    micro-batch forward (tests use it to inject faults through the real code path); `force`
    starts a run the memory planner refuses (--force)."""

    def __init__(self, res: cfgmod.Resolved, run_dir: Path, *, resume: bool = False,
                 root: Path | None = None, progress: bool | None = None, force: bool = False,
                 on_micro_batch: Callable[[int, int, int], None] | None = None,
                 say: Callable[[str], None] | None = None, fallback: bool = False):
        self.res = res
        self.settings = res.settings
        self.root = root or paths.workspace_root()
        self.run_dir = Path(run_dir)
        self.resume = resume
        self.force = force
        self.fallback = fallback  # --fallback-checkpoint: a damaged newest checkpoint is skipped
        self.on_micro_batch = on_micro_batch
        self.world = world_size()
        self.rank = rank()
        self.is_main = self.rank == 0
        self.folder = RunFolder(self.run_dir, enabled=self.is_main)
        self.progress = (bar_fits(sys.stderr) if progress is None else progress) and self.is_main
        self._say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self.micro_bsz = self.settings.micro_bsz
        self.grad_accum = self.settings.grad_accum
        self.rows_per_step = self.micro_bsz * self.grad_accum * self.world
        self.dpo = self.settings.data_type == "dpo"
        # built by setup()
        self.device: torch.device | None = None
        self.strategy: SingleProcess | DeepSpeedStrategy | None = None
        self.inputs: Inputs | None = None
        self.model: nn.Module | None = None  # the peft model
        self.inner: nn.Module | None = None  # the RWKV7 inside it
        self.spec = self.model_cfg = None
        self.n_trainable = self.n_total = 0
        self.weights_mb = 0.0
        self.loss_module: LossModule | None = None
        self.optimizer = self.scheduler = self.loader = None
        self.val_batches: list[dict] = []
        self.total_steps = 0
        self.ref_train = self.ref_val = None  # DPO reference log-probs
        # run state
        self.step = 0
        self.resumed_from: Path | None = None
        self.val_start = self.val_end = self.val_acc = None
        self.wandb = None
        self._bar = None
        self._events: list[str] = []
        self._dpo_stats = torch.zeros(4, dtype=torch.float64)
        self._writing = "the run folder's files"  # what a write that fails was writing
        self.checkpoint_mb = 0.0  # estimated size of one checkpoint

    def say(self, msg: str, level: int = logging.INFO) -> None:
        if not self.is_main:
            return
        log.log(level, msg)
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            self._say(msg)

    # ---- setup -----------------------------------------------------------------------------------
    def setup(self) -> None:
        s = self.settings
        self.device = pick_device(s.device, local_rank())
        check_combination(s)
        self.strategy = make_strategy(s, self.device, self.run_dir)  # + shared-folder check
        self.folder.lock()  # before anything is written: one writer per run folder
        self.folder.open_log()
        self.folder.clean_stray()  # temp files a kill -9 left (the lock is ours now)
        with as_train_error(RuntimeError):
            self.say("WKV kernel: {} ({})".format(*describe_impl(s.wkv_impl, self.device)))
        note = demo_note(s, self.root)
        if note:
            self.say(note)
        if self.is_main:  # generates the demo model / prepares the data when needed
            self.inputs = resolve_inputs(self.res, self.root, prepare=True, say=self.say,
                                         resuming=self.resume)
        self.strategy.barrier()  # the other ranks wait for rank 0's files
        if not self.is_main:
            self.inputs = resolve_inputs(self.res, self.root, prepare=False,
                                         say=lambda m: None)
        with as_train_error(MemoryPlanError):  # a refusal says --force starts it anyway
            preflight_model(s, self.inputs.model_path, "cuda" if self.device.type == "cuda"
                            else "cpu", self.force, self.say)
        seed_everything(s.seed)
        t0 = time.time()
        self.model, self.spec, self.model_cfg = build_model(s, self.inputs.model_path,
                                                            self.device)
        self.inner = unwrap(self.model)
        self.n_trainable, self.n_total = count_parameters(self.model)
        self.weights_mb = sum(t.numel() * t.element_size() for t in
                              [*self.inner.parameters(), *self.inner.buffers()]) / 2**20
        self.say(model_summary(s, self.inputs.model_path, self.model_cfg, self.n_total,
                               self.n_trainable, self.device, time.time() - t0))
        if s.compile:
            compile_blocks(self.inner)
            self.say("COMPILE=1: the blocks are compiled during the first step (about a "
                     "minute on a CPU)")
        seed_everything(s.seed + 1000 * self.rank)  # dropout streams differ per rank
        self.loss_module = LossModule(self.model, s.head_chunk, compute_dtype(s.precision),
                                      s.dpo_beta, s.dpo_loss, s.simpo_gamma)
        self.optimizer = make_optimizer(self.model, s)
        with as_train_error(ValueError):
            self.loader, self.val_batches = build_loaders(s, self.inputs.data_prefix,
                                                          self.micro_bsz, self.grad_accum,
                                                          self.world, self.say)
        self.total_steps = total = s.max_steps or s.epochs * self.loader.steps_per_epoch
        for warning in schedule_warnings(s, total):
            self.say(warning, logging.WARNING)
        if self.is_main:
            self.checkpoint_mb, notes = disk_plan(self.run_dir, self.n_trainable,
                                                  self.total_steps, s)
            for msg, level in notes:
                self.say(msg, level)
        self.scheduler = make_scheduler(self.optimizer, s, total)
        if self.dpo:
            with as_train_error(DpoReferenceError):
                self.ref_train, self.ref_val = dpo_reference(
                    s, self.model, self.loader, self.val_batches, self.run_dir, self.device,
                    resume=self.resume, write=self.is_main, say=self.say)
        self.strategy.wrap(self.loss_module, self.optimizer, self.model, self.micro_bsz,
                           self.grad_accum)
        self.optimizer = self.strategy.optimizer
        if self.resume:
            self._load_resume()
        if self.is_main:
            with as_train_error(RunError):
                self.wandb = init_wandb(s, self.run_dir)

    # ---- checkpoints -----------------------------------------------------------------------------
    def _export(self) -> Tuning:
        """The adapter and / or tuned state as they are now; every rank calls it (ZeRO-3
        gathers the shards)."""
        meta = self.spec.metadata(self.inputs.model_path, self.model_cfg, step=self.step,
                                  run=self.run_dir.name, profile=self.settings.profile)
        with self.strategy.gathered():
            return export_tuning(self.model, self.spec, self.settings.train_type, meta,
                                 str(self.inputs.model_path))

    def save_checkpoint(self) -> Path:
        state = {"step": self.step, "total_steps": self.total_steps,
                 "scheduler": self.scheduler.state_dict(), "loader": self.loader.state_dict(),
                 "rng": rng_state(), "micro_bsz": self.micro_bsz,
                 "grad_accum": self.grad_accum, "format": "rwkvforge-trainer/1",
                 **self.strategy.state()}
        adapter = self._export()

        def fill(tmp: Path) -> None:
            adapter.save(tmp)
            save_trainer_state(tmp / "trainer_state.pt", state)

        self._writing = f"checkpoint step-{self.step}"
        path = self.strategy.save_checkpoint(self.run_dir, self.step, fill, state["rng"])
        self._writing = "the run folder's files"
        self.say(f"checkpoint {path.relative_to(self.run_dir)}")
        if self.is_main:
            for old in prune_checkpoints(self.run_dir, self.settings.keep_checkpoints):
                self.say(f"removed {old.relative_to(self.run_dir)} "
                         f"(KEEP_CHECKPOINTS={self.settings.keep_checkpoints})")
        return path

    def _load_resume(self) -> None:
        try:
            ck = verified_checkpoint(self.run_dir, self.fallback, lambda m: self.say(
                m, logging.WARNING))
        except CorruptCheckpoint as e:
            raise TrainError(f"--resume {self.run_dir}: {e}") from None
        if ck is None:
            raise TrainError(f"--resume {self.run_dir}: no complete checkpoint in "
                             f"{self.run_dir / 'checkpoints'} (a folder counts once it holds "
                             "COMPLETE). Start a new run instead: another --run-name, or delete "
                             f"{self.run_dir} first.")
        st = load_trainer_state(ck / "trainer_state.pt")
        if st.get("format") != "rwkvforge-trainer/1":
            raise TrainError(f"{ck}/trainer_state.pt: unknown format {st.get('format')!r}.")
        if st["total_steps"] != self.total_steps and self.settings.max_steps == 0:
            self.say(f"note: steps per run changed {st['total_steps']} -> {self.total_steps}")
        self.micro_bsz, self.grad_accum = int(st["micro_bsz"]), int(st["grad_accum"])
        self.strategy.set_split(self.micro_bsz, self.grad_accum)
        try:
            rng = self.strategy.load_checkpoint(ck, st)
        except DeepSpeedError as e:
            raise TrainError(str(e)) from e
        self.scheduler.load_state_dict(st["scheduler"])
        self.strategy.sync_lr(self.scheduler)
        try:
            self.loader.load_state_dict(st["loader"])
        except ValueError as e:
            raise TrainError(f"--resume {self.run_dir}: {e}. The run's data changed since "
                             "it started; resume with the same data, or start a new run.") \
                from None
        set_rng_state(rng)
        self.step = int(st["step"])
        self.resumed_from = ck
        self.say(f"resumed from {ck} at step {self.step} (micro_bsz {self.micro_bsz}, "
                 f"grad_accum {self.grad_accum})")

    # ---- one step --------------------------------------------------------------------------------
    def _backoff(self, err: BaseException) -> None:
        old = (self.micro_bsz, self.grad_accum)
        self.micro_bsz, self.grad_accum = halved_split(*old, self.step + 1,
                                                       self.settings.ctx_len, err)
        self.strategy.set_split(self.micro_bsz, self.grad_accum)
        self.strategy.zero_grad()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.say(f"out of memory at step {self.step + 1}: MICRO_BSZ {old[0]} -> "
                 f"{self.micro_bsz}, GRAD_ACCUM {old[1]} -> {self.grad_accum} (same "
                 "effective batch); retrying the step", logging.WARNING)
        self._events.append("oom_backoff")

    def _micro_steps(self, batch: dict) -> float:
        """Forward/backward of this rank's rows (DPO: pairs) in micro-batches; returns this
        rank's share of the global mean loss (sum over ranks = the step's loss). DPO also
        leaves this rank's (DPO loss sum, right-ordered pairs, margin sum, pairs) in
        self._dpo_stats."""
        lo = self.rank * (self.rows_per_step // self.world)
        inputs = micro_inputs(batch, self.device, self.world, self.settings.dpo_ftx,
                              self.ref_train if self.dpo else None)
        total = 0.0
        self._dpo_stats = torch.zeros(4, dtype=torch.float64)
        for i in range(self.grad_accum):
            a = lo + i * self.micro_bsz
            if self.on_micro_batch is not None:
                self.on_micro_batch(self.step + 1, i, self.micro_bsz)
            args = inputs(a, a + self.micro_bsz)
            with autocast_ctx(self.device, self.settings.precision):
                loss = self.strategy.forward(*args)
            self.strategy.backward(loss, last_micro=i == self.grad_accum - 1)
            total += float(loss.detach()) / self.world
            if self.dpo:
                self._dpo_stats += self.loss_module.last_stats.double()
        return total

    def train_step(self, batch: dict) -> tuple[float, float | None]:
        """One optimiser step on the global batch; returns (loss, grad norm)."""
        while True:
            try:
                loss = self._micro_steps(batch)
                break
            except torch.cuda.OutOfMemoryError as e:  # noqa: PERF203
                self._backoff(e)
        gnorm = self.strategy.step(self.settings.grad_clip)
        self.scheduler.step()
        if self.world > 1:
            t = torch.tensor([loss], dtype=torch.float64)
            if self.dpo:
                t = torch.cat([t, self._dpo_stats])
            t = self.strategy.all_reduce(t)
            loss = float(t[0])
            if self.dpo:
                self._dpo_stats = t[1:]
        return loss, gnorm

    # ---- loop ------------------------------------------------------------------------------------
    def _eval(self) -> float | None:
        """Validation loss on rank 0 (None elsewhere). Under ZeRO-3 every rank joins the
        forward passes (they gather the sharded weights together)."""
        fn = self.strategy.eval_forward()
        if not self.val_batches or not (self.is_main or fn is not None):
            return None
        s = self.settings
        if self.dpo:
            loss, self.val_acc = evaluate_dpo(self.loss_module, self.val_batches, self.ref_val,
                                              s.precision, self.device)
            return loss
        return evaluate_loss(self.model, self.val_batches, s.head_chunk, s.precision,
                             self.device, loss_fn=fn)

    def _log(self, row: dict, loss: float, lr: float, tps: float, val: float | None) -> None:
        if self._events:
            row["event"] = ",".join(self._events)
            row["micro_bsz"], row["grad_accum"] = self.micro_bsz, self.grad_accum
            self._events = []
        if self.is_main:
            self.folder.append_metrics(row)
            self.folder.status("running", self.step, self.total_steps,
                               val_loss_start=self.val_start)
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in row.items() if isinstance(v, (int, float))},
                               step=self.step)
        line = step_line(self.step, self.total_steps, loss, lr, tps, row, val)
        if self._bar is None:
            self.say(line)
        else:  # the bar shows it; the log keeps it
            log.info(line)

    def run(self) -> TrainResult:
        try:
            return self._run()
        finally:
            self.folder.unlock()

    def _run(self) -> TrainResult:
        s = self.settings
        try:
            self.setup()
        except BaseException as e:  # the run folder says why it never started
            self.folder.setup_failed(e, status=not self.resume)
            if self.wandb is not None:
                self.wandb.finish(exit_code=1)
            raise
        prev = self.folder.read_status() if self.resume else {}
        if self.resume and self.step >= self.total_steps:  # every rank returns here
            if prev.get("state") == "finished" and finished(self.run_dir, s.train_type):
                self.say(f"{self.run_dir} already finished {self.total_steps} steps: nothing "
                         f"to do (pass --max-steps N with N > {self.step} to train further)")
                self.folder.close_log()
                self.strategy.close()
                return TrainResult(self.run_dir, self.step, prev.get("final_loss"),
                                   prev.get("val_loss_start"), prev.get("val_loss_end"), 0.0,
                                   self.micro_bsz, self.grad_accum)
            return self._complete_outputs(prev)
        if self.is_main:
            if self.resume:
                self.folder.truncate_metrics(self.step)
                self.folder.record_resume(self.settings, self.res.sources, RESUME_MUTABLE,
                                          self.step, self.total_steps, self.resumed_from)
            else:
                self.folder.write_json("config.json", config_json(self))
            self.folder.status("running", self.step, self.total_steps,
                               val_loss_start=prev.get("val_loss_start"))
        release_freed_memory()  # setup transients (fp32 load, quantisation) back to the OS
        mon = MemoryMonitor(self.device).start()
        loss = None
        try:  # from here a failure is recorded in status.json
            self.val_start = self._eval() if not self.resume else prev.get("val_loss_start")
            if self.val_start is not None and not self.resume:
                self.say(val_start_line(s, self.val_start, len(self.val_batches)))
            if self.resume:
                self._events.append("resumed")
            if self.progress:
                self._bar = tqdm(total=self.total_steps, initial=self.step, unit="step",
                                 dynamic_ncols=True, file=sys.stderr, desc="train")
            n, packed = self.rows_per_step, s.pack and self.loader.data_type != "text"
            rows = (f"{n} packed rows of pairs, 2" if self.dpo and packed else
                    f"{n} pairs ({2 * n} sequences)" if self.dpo else
                    f"{n} packed rows of whole examples," if packed else f"{n} sequences")
            self.say(f"training {self.total_steps} steps: {rows} x <= {s.ctx_len} tokens "
                     f"per step, lr {s.lr:g} ({s.lr_schedule}), run folder {self.run_dir}")
            t_log, tok_log, tps = time.time(), 0, 0.0
            while self.step < self.total_steps:
                batch = next(self.loader)
                lr = self.optimizer.param_groups[0]["lr"]
                loss, gnorm = self.train_step(batch)
                self.step += 1
                tok_log += sum(int(v.numel()) for k, v in batch.items()
                               if k.endswith("input_ids"))
                if not math.isfinite(loss):
                    raise TrainError(f"loss is {loss} at step {self.step}: training diverged. "
                                     "Lower LR, keep GRAD_CLIP=1, or use PRECISION=bf16/fp32.")
                last = self.step == self.total_steps
                val = None
                if s.eval_every and self.step % s.eval_every == 0 and not last:
                    val = self._eval()
                if last:
                    val = self.val_end = self._eval()
                if self.step % s.log_every == 0 or last or val is not None or self._events:
                    now = time.time()
                    tps = tok_log / max(now - t_log, 1e-9)
                    t_log, tok_log = now, 0
                    row = metrics_row(self.step, loss, lr, tps, mon.take_window(),
                                      float(getattr(self.loader, "epoch_progress", 0.0)),
                                      gnorm, self._dpo_stats if self.dpo else None, val,
                                      self.val_acc if self.dpo else None)
                    self._log(row, loss, lr, tps, val)
                if self._bar is not None:
                    self._bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}",
                                          refresh=False)
                    self._bar.update(1)
                if (s.save_every and self.step % s.save_every == 0) or last:
                    self.save_checkpoint()
            self._finish(loss, mon)
        except BaseException as e:
            self._close_bar(mon)
            disk = None if isinstance(e, TrainError) else disk_full_message(
                e, self.run_dir, self._writing, self.step, self.checkpoint_mb)
            if self.is_main:
                msg = (f"stopped by {e.args[0]}" if isinstance(e, Stopped) else
                       "interrupted (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else
                       disk or f"{type(e).__name__}: {e}")
                # on a full disk these writes may fail too: the message above is what counts
                with contextlib.suppress(OSError, RuntimeError):
                    self.folder.status("failed", self.step, self.total_steps, error=msg,
                                       val_loss_start=self.val_start)  # for a resume's summary
                log.error("run failed at step %d: %s", self.step, msg)
                with contextlib.suppress(OSError, RuntimeError):
                    self.folder.plot_loss()
            if self.wandb is not None:
                self.wandb.finish(exit_code=1)
            self.folder.close_log()
            self.strategy.close(failed=True)
            if disk is not None:
                raise TrainError(disk) from e
            raise
        return TrainResult(self.run_dir, self.step, loss, self.val_start, self.val_end,
                           mon.peak_mb, self.micro_bsz, self.grad_accum)

    def _complete_outputs(self, prev: dict) -> TrainResult:
        """A run that trained every step but stopped before its final outputs were written
        (killed after the last checkpoint, a full disk at the end): they are written now from
        that checkpoint, which holds the final weights."""
        self.say(f"{self.run_dir}: all {self.total_steps} steps are trained but the final "
                 f"outputs are missing (the run stopped while writing them): writing them "
                 f"from {self.resumed_from.name}")
        rows = [r for r in self.folder.read_metrics() if "loss" in r]
        last = rows[-1] if rows else {}
        # the checkpoint holds the final weights: the final validation loss, exactly
        self.val_start, self.val_end = prev.get("val_loss_start"), self._eval()
        mon = MemoryMonitor(self.device).start()
        self._finish(last.get("loss"), mon)
        return TrainResult(self.run_dir, self.step, last.get("loss"), self.val_start,
                           self.val_end, mon.peak_mb, self.micro_bsz, self.grad_accum)

    def _close_bar(self, mon: MemoryMonitor) -> None:
        mon.stop()
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def _finish(self, loss, mon: MemoryMonitor) -> None:
        """Final adapter / state, loss curve and status; then the processes shut down in order."""
        self._close_bar(mon)
        adapter = self._export()
        self._writing = "the final adapter"
        if self.is_main:
            adapter.save_final(self.run_dir)
            png = self.folder.plot_loss()
            self.folder.status("finished", self.step, self.total_steps, error=None,
                               peak_mem_mb=round(mon.peak_mb, 1),
                               weights_mb=round(self.weights_mb, 1), final_loss=loss,
                               val_loss_start=self.val_start, val_loss_end=self.val_end)
            lines = final_lines(self.run_dir, loss, self.val_start, self.val_end, png, mon.peak_mb)
            for line in done_lines(lines, self.run_dir, self.settings.train_type):
                self.say(line)
        if self.wandb is not None:
            self.wandb.finish()
        self.folder.close_log()
        self.strategy.close()


def config_json(tr: "Trainer") -> dict:
    """A trainer's config.json (runs.config_record): what the run is made of."""
    inp = tr.inputs
    return config_record(
        tr.res, tr.root,
        model={"path": str(inp.model_path), "demo": inp.demo_model,
               **tr.model_cfg.to_dict(), "params": tr.n_total,
               "trainable_params": tr.n_trainable, "weights_mb": round(tr.weights_mb, 1)},
        data={"prefix": str(inp.data_prefix), "demo": inp.demo_data,
              "file": str(inp.data_file) if inp.data_file else None,
              "train_examples": getattr(tr.loader, "samples_per_epoch", None),
              "val_batches": len(tr.val_batches)},
        training={"total_steps": tr.total_steps, "world_size": tr.world,
                  "rows_per_step": tr.rows_per_step,  # DPO: pairs of 2 sequences
                  "tokens_per_step_max": tr.rows_per_step * tr.settings.ctx_len
                  * (2 if tr.dpo else 1), "device": str(tr.device)})


# ---- CLI -----------------------------------------------------------------------------------------
def resolve_for_resume(run_dir: Path, args: argparse.Namespace) -> cfgmod.Resolved:
    """The run's own settings (config.json), with only RESUME_MUTABLE flags applied."""
    cfg_p = run_dir / "config.json"
    if not cfg_p.is_file():
        raise TrainError(f"--resume {run_dir}: no config.json there; is it a run folder "
                         "(runs/<run>)?")
    try:
        saved = json.loads(cfg_p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise TrainError(f"--resume {run_dir}: {cfg_p}:{e.lineno}: not valid JSON ({e.msg}); "
                         "the run's settings cannot be read. Restore the file (the settings "
                         "the run started with) or start a new run.") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TrainError(f"--resume {run_dir}: {cfg_p} cannot be read ({e}).") from None
    values = saved.get("settings") if isinstance(saved, dict) else None
    if not isinstance(values, dict):
        raise TrainError(f"--resume {run_dir}: {cfg_p} has no \"settings\" object: not the "
                         "config.json a run writes. Restore it or start a new run.")
    known = {f.name for f in dataclasses.fields(cfgmod.Settings)} - set(cfgmod.SECRETS)
    values = {k: v for k, v in values.items() if k in known}  # secrets were never recorded
    sources = dict(saved.get("sources", {}))
    given = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    for name, v in given.items():
        key = name.upper()
        new = cfgmod.coerce(key, str(v), f"command-line flag --{name.replace('_', '-')}")
        if new == values.get(name):
            continue
        if name not in RESUME_MUTABLE:
            raise TrainError(f"--{name.replace('_', '-')} cannot change when resuming "
                             f"({values.get(name)!r} in {cfg_p}); only "
                             + ", ".join("--" + m.replace("_", "-") for m in RESUME_MUTABLE)
                             + " may. Start a new run to change it.")
        values[name] = new
        sources[key] = "cli (resume)"
    if getattr(args, "model", None) or getattr(args, "profile", None):
        raise TrainError("--model / --profile cannot be given with --resume: the run keeps the "
                         f"settings in {cfg_p}.")
    return cfgmod.Resolved(settings=cfgmod.Settings(**values), sources=sources,
                           files=list(saved.get("files", [])))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rwkvforge train", description=__doc__.split("\n\n")[0],
                                 epilog="Every setting also reads from configs/*.env and the "
                                 "environment (KEY=value); see `rwkvforge config show`.")
    ap.add_argument("--resume", metavar="RUN_DIR", help="continue runs/<run> from its last "
                    "complete checkpoint (explicit: nothing is resumed otherwise)")
    ap.add_argument("--print-command", "--print-cmd", dest="print_command",
                    action="store_true", help="print the command that would run (DeepSpeed's / "
                    "torchrun's launcher, or TRAINER=rwkv-peft's) and exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines "
                    "instead)")
    ap.add_argument("--fallback-checkpoint", action="store_true", help="with --resume: when "
                    "the newest checkpoint fails its checksums, resume from the previous "
                    "complete one instead of stopping")
    ap.add_argument("--force", action="store_true", help="start even when the memory "
                    "planner predicts the run will not fit (see `rwkvforge plan`)")
    # the server / dashboard / inference / bootstrap (torch) settings exist in every layer but
    # do not change a training run: accepted, not listed
    cfgmod.add_settings_flags(ap, hide=("serve_", "dashboard_", "infer_", "torch_"))
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    root = paths.workspace_root()
    try:
        if args.resume:
            run_dir = Path(args.resume).expanduser()
            if not run_dir.is_absolute():
                run_dir = (Path.cwd() / run_dir)
            if not run_dir.is_dir():
                raise TrainError(f"--resume {args.resume}: no such run folder.")
            res = resolve_for_resume(run_dir, args)
        else:
            # with no base model: the demo model's recommended settings layer too
            res = detect_type(cfgmod.resolve_for_training(args, root), root)
            s = res.settings
            runs = paths.resolve(s.runs_dir, res.sources.get("RUNS_DIR", "default"), root)
            name = s.run_name or default_run_name(s)
            if name in (".", "..") or "/" in name or "\\" in name:
                raise TrainError(f"RUN_NAME={name!r}: a run name is one folder name inside "
                                 f"RUNS_DIR ({runs}); set RUNS_DIR to keep runs elsewhere.")
            if runs.exists() and not runs.is_dir():
                raise TrainError(f"RUNS_DIR {runs} is a file, not a folder: point RUNS_DIR "
                                 "at a folder (it is created when missing).")
            run_dir = runs / name
        s = res.settings
        if s.trainer == "rwkv-peft":
            checkout = upstream.rwkv_peft_preflight(s, root)
            inputs = resolve_inputs(res, root, prepare=not args.print_command,
                                    check_data=not args.print_command)
            return upstream.run_rwkv_peft(s, checkout, inputs.model_path, inputs.data_prefix,
                                          run_dir, args.print_command)
        check_combination(s)
        in_dist = "WORLD_SIZE" in os.environ
        if (s.deepspeed_stage > 0 or s.num_nodes > 1) and not in_dist:  # under a launcher
            if not (args.resume or args.print_command or s.node_rank) and run_started(run_dir):
                raise TrainError(f"{run_dir} already exists: pick another --run-name or "
                                 f"--resume {run_dir}.")
            return launch(s, argv, run_dir.name, print_only=args.print_command)
        if not args.resume and int(os.environ.get("RANK", "0")) == 0 \
                and run_started(run_dir):
            raise TrainError(f"{run_dir} already exists: pick another --run-name, or continue "
                             f"it with --resume {run_dir}.")
        if pick_device(s.device).type == "cpu":
            keep_freed_memory()  # CPU: reuse freed activation memory (see runtime.py)
        trainer = Trainer(res, run_dir, resume=bool(args.resume), root=root,
                          progress=False if args.no_progress else None, force=args.force,
                          fallback=args.fallback_checkpoint)
        _stop_on_signals()
        try:
            trainer.run()
        except KeyboardInterrupt as e:
            why = f"stopped by {e.args[0]}" if isinstance(e, Stopped) else "interrupted"
            print(f"train: {why} at step {getattr(trainer, 'step', 0)}; continue with: "
                  f"rwkvforge train --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
            return 143 if isinstance(e, Stopped) else 130
        return 0
    except (TrainError, cfgmod.ConfigError, upstream.UpstreamError, RunLocked) as e:
        print(f"train error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - errors from the model/adapter/data layers
        if isinstance(e, PrepareError):  # training prepared the data itself (resolve_inputs)
            print(f"train error: preparing the data: {e}\n(`rwkvforge prepare --input FILE "
                  "--type TYPE --skip-invalid` prepares it without the bad lines; then train "
                  "again)", file=sys.stderr)
            return 2
        if isinstance(e, (CheckpointError, AdapterError)):
            print(f"train error: {e}", file=sys.stderr)
            return 2
        msg = start_disk_message(e)
        if msg is not None:  # before the run's own handler (e.g. writing config.json)
            print(f"train error: {msg}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())

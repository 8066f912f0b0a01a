"""Everything that reaches outside the package into the optional upstream checkouts
(third_party/RWKV-PEFT, third_party/Albatross) or the `rwkv` pip package: the one place that
knows their paths, their command lines and RWKV_V7_ON.

    TRAINER=rwkv-peft rwkvforge train --print-command   # the mapped RWKV-PEFT command
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
from pathlib import Path

from rwkvforge import config
from rwkvforge.checkpoint import infer_config, load_state_dict
from rwkvforge.data.loader import load_meta
from rwkvforge.peft import parse_train_parts

DPO_NOT_MAPPED = ("DATA_TYPE=dpo with TRAINER=rwkv-peft: our DPO pairs are not mapped to "
                  "RWKV-PEFT's trainer; use TRAINER=builtin for DPO.")


class UpstreamError(RuntimeError):
    """An upstream back-end cannot run as asked; the message says what to do."""


# =========================================================================== RWKV-PEFT
def rwkv_peft_dir(root: Path) -> Path:
    return root / "third_party" / "RWKV-PEFT"


def rwkv_peft_command(s: config.Settings, model_path: Path, data_prefix: Path,
                      model_cfg, proj_dir: Path, checkout: Path,
                      python: str = sys.executable, data_type: str = "binidx",
                      epoch_steps: int | None = None) -> list[str]:
    """argv for third_party/RWKV-PEFT/train.py mapped from the settings (no shell).

    Mapping: LORA_R / LORA_ALPHA / LORA_DROPOUT -> --lora_config (or PEFT_INIT=pissa ->
    --peft pissa --pissa_config), QUANT -> --quant, PRECISION -> --precision,
    DEEPSPEED_STAGE -> --strategy deepspeed_stage_N (stage 1 when 0: RWKV-PEFT's default),
    NUM_GPUS -> --devices, MAX_STEPS -> one "epoch" of --epoch_steps steps, TRAIN_PARTS ->
    --train_parts, LR_SCHEDULE -> --lr_schedule cos|wsd (constant: lr_final = lr). The
    prepared binidx prefix is passed as --data_file; SFT data uses RWKV-PEFT's own prompt
    masking (--loss_mask qa): our mask stream is not read by it. Shapes come from the
    checkpoint (--n_layer / --n_embd / --dim_ffn / --head_size_a / --vocab_size)."""
    if s.data_type == "dpo":
        raise UpstreamError(DPO_NOT_MAPPED)
    if s.use_dora:
        raise UpstreamError("USE_DORA=1 has no RWKV-PEFT equivalent (it offers LoRA, PiSSA, "
                         "DiSHA); use TRAINER=builtin or USE_DORA=0.")
    # MAX_STEPS > 0: one "epoch" of exactly that many steps; else EPOCHS passes over the data
    steps_per_epoch = s.max_steps if s.max_steps else max(int(epoch_steps or 1000), 1)
    strategy = (f"deepspeed_stage_{s.deepspeed_stage}" if s.deepspeed_stage
                else "deepspeed_stage_1")
    precision = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}[s.precision]
    argv = [python, str(checkout / "train.py"),
            "--load_model", str(model_path), "--proj_dir", str(proj_dir),
            "--data_file", str(data_prefix), "--data_type", data_type,
            "--vocab_size", str(model_cfg.vocab_size),
            "--n_layer", str(model_cfg.n_layer), "--n_embd", str(model_cfg.n_embd),
            "--dim_ffn", str(model_cfg.dim_ffn), "--head_size_a", str(model_cfg.head_size),
            "--ctx_len", str(s.ctx_len), "--micro_bsz", str(s.micro_bsz),
            "--accumulate_grad_batches", str(s.grad_accum),
            "--epoch_steps", str(steps_per_epoch),
            "--epoch_count", str(1 if s.max_steps else s.epochs), "--epoch_begin", "0",
            "--epoch_save", "1",
            "--lr_init", repr(float(s.lr)), "--lr_final", repr(float(s.lr_final)),
            "--warmup_steps", str(s.warmup_steps),
            "--lr_schedule", {"cosine": "cos", "wsd": "wsd", "constant": "cos"}[s.lr_schedule],
            "--beta1", "0.9", "--beta2", "0.99", "--adam_eps", "1e-8",
            "--weight_decay", repr(float(s.weight_decay)),
            "--accelerator", "gpu", "--devices", str(s.num_gpus), "--precision", precision,
            "--strategy", strategy, "--grad_cp", "1" if s.grad_cp else "0",
            "--random_seed", str(s.seed), "--my_testing", "x070",
            "--dataload", "pad",
            "--loss_mask", "pad" if s.data_type == "text" else "qa",
            "--quant", s.quant,
            "--op", "fla" if s.wkv_impl == "fla" else "cuda",
            ]
    if s.lr_schedule == "constant":
        argv[argv.index("--lr_final") + 1] = repr(float(s.lr))
    if s.peft_init == "pissa":
        argv += ["--peft", "pissa", "--pissa_config", json.dumps(
            {"pissa_load": "", "pissa_init": "", "pissa_r": s.lora_r, "svd_niter": 4})]
    else:
        argv += ["--peft", "lora", "--lora_config", json.dumps(
            {"lora_load": "", "lora_r": s.lora_r, "lora_alpha": s.lora_alpha,
             "lora_dropout": s.lora_dropout})]
    parts = parse_train_parts(s.train_parts)
    argv += ["--train_parts", *parts] if parts else ["--train_parts"]
    if s.wandb_project:
        argv += ["--wandb", s.wandb_project]
    return argv


def rwkv_peft_unmapped(s: config.Settings) -> list[str]:
    """Settings changed from their defaults that rwkv_peft_command cannot pass on."""
    fields = {f.name: f.default for f in dataclasses.fields(config.Settings)}
    return [f"{k.upper()}={getattr(s, k)}" for k in
            ("lora_targets", "optimizer", "grad_clip", "head_chunk", "compile")
            if getattr(s, k) != fields[k]]


def rwkv_peft_preflight(s: config.Settings, root: Path) -> Path:
    """The RWKV-PEFT checkout to run for these settings; UpstreamError when it cannot run."""
    if s.device == "cpu":
        raise UpstreamError("TRAINER=rwkv-peft trains on CUDA GPUs only (its kernels and "
                            "--accelerator gpu); with DEVICE=cpu use TRAINER=builtin.")
    if s.data_type == "dpo":
        raise UpstreamError(DPO_NOT_MAPPED)
    checkout = rwkv_peft_dir(root)
    if not (checkout / "train.py").is_file():
        raise UpstreamError(f"TRAINER=rwkv-peft but {checkout}/train.py is missing: run "
                            "`./scripts/bootstrap.sh --with-upstream` (clones RWKV-PEFT into "
                            "third_party/), or set TRAINER=builtin.")
    return checkout


def run_rwkv_peft(s: config.Settings, checkout: Path, model_path: Path, data_prefix: Path,
                  run_dir: Path, print_only: bool) -> int:
    """Run (or with `print_only` print) RWKV-PEFT's train.py for the resolved inputs; its
    exit code. The command goes to stderr, with the settings it cannot apply."""
    mcfg = infer_config(load_state_dict(model_path))
    _, meta = load_meta(data_prefix)
    docs = ((meta or {}).get("splits") or {}).get("train", {}).get("documents")
    per_step = s.micro_bsz * s.grad_accum * s.num_gpus
    argv = rwkv_peft_command(s, model_path, data_prefix, mcfg, run_dir / "rwkv-peft", checkout,
                             epoch_steps=max(docs // per_step, 1) if docs else None)
    print("RWKV-PEFT command: " + " ".join(shlex.quote(a) for a in argv), file=sys.stderr)
    unmapped = rwkv_peft_unmapped(s)
    if unmapped:
        print("note: RWKV-PEFT has no option for " + ", ".join(unmapped) + ": not applied "
              "(TRAINER=builtin applies them)", file=sys.stderr)
    if print_only:
        return 0
    (run_dir / "rwkv-peft").mkdir(parents=True, exist_ok=True)
    return subprocess.run(argv, cwd=str(checkout), check=False).returncode


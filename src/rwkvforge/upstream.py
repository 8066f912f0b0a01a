"""Everything that reaches outside the package into the optional upstream checkouts
(third_party/RWKV-PEFT, third_party/Albatross) or the `rwkv` pip package: the one place that
knows their paths, their command lines and RWKV_V7_ON.

    TRAINER=rwkv-peft rwkvforge train --print-command   # the mapped RWKV-PEFT command
    rwkvforge infer --infer-backend rwkv --prompt Hi       # the rwkv pip package
    rwkvforge merge ...                                    # checks its output in the rwkv pip package

Rule: RWKV_V7_ON and sys.path are touched only here, and the merge's rwkv pip check runs in a
subprocess: the pip package reads RWKV_V7_ON once, at import, so it must not leak into the
caller's process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from rwkvforge import config
from rwkvforge.checkpoint import infer_config, load_state_dict
from rwkvforge.data.loader import load_meta
from rwkvforge.peft import parse_train_parts

DPO_NOT_MAPPED = ("DATA_TYPE=dpo with TRAINER=rwkv-peft: our DPO pairs are not mapped to "
                  "RWKV-PEFT's trainer; use TRAINER=builtin for DPO.")


class UpstreamError(RuntimeError):
    """An upstream back-end cannot run as asked; the message says what to do."""


# an external model's step: forward(ids, state) -> (logits (V,), state)
Forward = Callable[[list[int], Any], tuple[torch.Tensor, Any]]


# ---- RWKV-PEFT -----------------------------------------------------------------------------------
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
    if s.train_type == "lora+state":
        raise UpstreamError("TRAIN_TYPE=lora+state has no RWKV-PEFT equivalent (its "
                            "--train_type state trains the state alone); use TRAINER=builtin.")
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
    if s.train_type == "state":  # RWKV-PEFT's state tuning: no adapter
        argv += ["--train_type", "state", "--peft", "none"]
    elif s.peft_init == "pissa":
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



# ---- rwkv pip package ----------------------------------------------------------------------------
def rwkv_pip_forward(model_path: Path, device: str, dtype: str) -> Forward:
    """forward(ids, state) -> (logits (V,), state) of `model_path` run by the `rwkv` pip
    package (strategy "cpu fp32" / "cuda <dtype>"), in this process."""
    # The package reads RWKV_V7_ON when rwkv.model is imported; set it here, at the edge.
    # It prints banners to stdout: send them to stderr so stdout carries only the answer.
    os.environ["RWKV_V7_ON"] = "1"
    with contextlib.redirect_stdout(sys.stderr):
        try:
            from rwkv import model as rwkv_model
        except ImportError as e:
            raise UpstreamError(f"INFER_BACKEND=rwkv needs the `rwkv` pip package ({e}): "
                                "pip install rwkv") from None
    if not hasattr(rwkv_model, "RWKV_x070"):
        raise UpstreamError("the rwkv package was imported before RWKV_V7_ON=1 was set; run "
                            "the rwkv back-end in a fresh process")
    dev = "cuda" if device == "cuda" else "cpu"
    strategy = f"{dev} {dtype if dev == 'cuda' or dtype != 'fp16' else 'fp32'}"
    if not str(model_path).endswith(".pth"):
        raise UpstreamError(f"the rwkv package only loads files ending in .pth: {model_path}")
    with contextlib.redirect_stdout(sys.stderr):
        model = rwkv_model.RWKV(model=str(model_path)[:-4], strategy=strategy)

    def forward(ids: list[int], state: Any) -> tuple[torch.Tensor, Any]:
        out, state = model.forward(list(ids), state)
        return out.float().cpu(), state

    return forward


_RWKV_PIP_PROBE = "rwkv-pip-probe"


def _rwkv_pip_probe_main(argv: list[str]) -> int:
    """Subprocess side of `run_rwkv_pip` (env RWKV_V7_ON=1 set by the parent):
    <model.pth> <probe.pt> <out.pt> -> logits of every probe row, (B, T, V) fp32."""
    model_path, probe_path, out_path = argv
    with contextlib.redirect_stdout(io.StringIO()):  # the package prints banners
        from rwkv.model import RWKV

        assert model_path.endswith(".pth")
        m = RWKV(model=model_path[: -len(".pth")], strategy="cpu fp32")
    idx = torch.load(probe_path, weights_only=True)
    rows = []
    with torch.no_grad():
        for row in idx.tolist():
            out, _ = m.forward(row, None, full_output=True)
            rows.append(out.float().reshape(len(row), -1))
    torch.save(torch.stack(rows), out_path)
    return 0


def run_rwkv_pip(model_path: Path, idx: torch.Tensor, timeout: float = 900) -> torch.Tensor:
    """Logits (B, T, V) of `model_path` on the token rows `idx`, run by the `rwkv` pip package
    (RWKV_V7_ON=1, strategy "cpu fp32") in a subprocess, so its env vars stay out of this
    process. UpstreamError when it does not load or run."""
    with tempfile.TemporaryDirectory(prefix="rwkvforge-rwkvpip-") as td:
        probe, out = Path(td) / "probe.pt", Path(td) / "logits.pt"
        torch.save(idx.clone(), probe)
        env = dict(os.environ, RWKV_V7_ON="1", RWKV_JIT_ON="1", RWKV_CUDA_ON="0")
        cmd = [sys.executable, "-m", "rwkvforge.upstream", _RWKV_PIP_PROBE,
               str(model_path), str(probe), str(out)]
        try:
            p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            raise UpstreamError(f"the rwkv pip package did not finish loading/running "
                                f"{model_path.name} within {timeout:.0f} s.") from e
        if p.returncode != 0 or not out.is_file():
            tail = (p.stderr or p.stdout).strip().splitlines()[-6:]
            raise UpstreamError(
                "the merged file does not load/run in the rwkv pip package (RWKV_V7_ON=1, "
                "strategy 'cpu fp32'):\n    " + "\n    ".join(tail)
                + "\nIs the rwkv package installed (pip install rwkv==0.8.32)?")
        return torch.load(out, weights_only=True)


# ---- Albatross -----------------------------------------------------------------------------------
def albatross_dir(root: Path) -> Path:
    return root / "third_party" / "Albatross"


def albatross_forward(model_path: Path, root: Path) -> Forward:
    """forward(ids, state) -> (logits (V,), state) of `model_path` run by the Albatross
    reference checkout (third_party/Albatross/reference; CUDA only)."""
    ref = albatross_dir(root) / "reference"
    if not (ref / "rwkv7.py").is_file():
        raise UpstreamError(f"INFER_BACKEND=albatross needs a checkout at {ref.parent} "
                            "(run ./scripts/bootstrap.sh --with-upstream, or git clone "
                            "https://github.com/BlinkDL/Albatross third_party/Albatross); "
                            "or use INFER_BACKEND=builtin")
    if not torch.cuda.is_available():
        raise UpstreamError("INFER_BACKEND=albatross needs a CUDA GPU (its kernels are CUDA "
                            "only) and none is visible to torch; use INFER_BACKEND=builtin")
    if not str(model_path).endswith(".pth"):
        raise UpstreamError(f"Albatross only loads files ending in .pth: {model_path}")
    c = infer_config(load_state_dict(model_path))
    sys.path.insert(0, str(ref))
    import rwkv7 as alb  # type: ignore[import-not-found]  # compiles its CUDA op on import

    args = SimpleNamespace(MODEL_NAME=str(model_path)[:-4], n_layer=c.n_layer,
                           n_embd=c.n_embd, head_size=c.head_size, vocab_size=c.vocab_size)
    model = alb.RWKV_x070(args)

    def forward(ids: list[int], state: Any) -> tuple[torch.Tensor, Any]:
        state = model.get_state(state, B=0)
        out, state = (model.forward_seq(list(ids), state) if len(ids) > 1
                      else model.forward_one(int(ids[0]), state))
        return out.float().cpu(), state

    return forward


if __name__ == "__main__":  # the rwkv pip probe's subprocess (run_rwkv_pip)
    if sys.argv[1:2] != [_RWKV_PIP_PROBE]:
        raise SystemExit(f"usage: python -m rwkvforge.upstream {_RWKV_PIP_PROBE} "
                         "MODEL.pth PROBE.pt OUT.pt")
    raise SystemExit(_rwkv_pip_probe_main(sys.argv[2:]))

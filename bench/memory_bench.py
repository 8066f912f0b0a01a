"""Memory planner vs reality: measure the peak of real training steps and print it beside
the prediction of `rwkvforge.memory.estimate`, with the ratio.

    # CUDA (what docs/memory.md asks for): random-weight 0.1B and 0.4B, three profiles
    python bench/memory_bench.py --model 0.1b,0.4b --ctx-len 1024 --micro-bsz 1 --lora-r 64 --grad-cp 1
    # CPU (RSS-based; what tests/test_memory.py runs on the demo shape)
    python bench/memory_bench.py --device cpu --model tiny --ctx-len 512 --micro-bsz 2 --head-chunk 256

Each (model, profile) runs in a fresh child process that builds the model exactly as
`rwkvforge.train.build_model` does (the training code path: peft / bitsandbytes adapters,
frozen weights in the compute dtype, fp32 trainables), then runs `--steps` optimiser steps
of train.py's LossModule (forward_hidden + chunked head/CE) with autocast, backward,
gradient clipping and the optimiser.

Measured peak:
- CUDA: torch.cuda.max_memory_allocated() over the steps (peak stats reset after the model
  is built, so weights count and load-time copies do not). Compared with
  Breakdown.allocated (the context and allocator slack are outside that statistic).
- CPU: peak resident set (VmHWM, reset through /proc/self/clear_refs after the model is
  built) minus the resident set after imports, before the model existed. The child runs
  with MALLOC_MMAP_THRESHOLD_=65536 so glibc returns every freed tensor to the OS instead of
  keeping it in its heap; RSS then follows live tensors rather than allocator history.
  Compared with Breakdown.allocated for device="cpu".
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

PROFILES = {"lora-bf16": {"quant": "none"}, "qlora-int8": {"quant": "int8"},
            "qlora-nf4": {"quant": "nf4"}, "lora-fp32": {"quant": "none", "precision": "fp32"}}
TINY = (4, 256)  # rwkvforge.demo TINY_SHAPE


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(args) -> dict:
    """Runs inside the fresh process: build, step, measure."""
    import torch

    from rwkvforge import config as cfgmod
    from rwkvforge import memory
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.loss import LossModule, autocast_ctx, compute_dtype
    from rwkvforge.train import build_model, make_optimizer

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    dev = torch.device(args.device)
    if args.model == "tiny":
        L, C = TINY
    else:
        L, C = memory.SIZES[memory.normalize_size(args.model)]
    tmp = tempfile.mkdtemp(prefix="membench-")
    path = os.path.join(tmp, "model.pth")
    save_pth(make_random_model_sd(L, C, vocab_size=args.vocab), path)
    fields = dict(device=args.device, precision="bf16", lora_r=args.lora_r, ctx_len=args.ctx_len,
                  micro_bsz=args.micro_bsz, grad_cp=bool(args.grad_cp), head_chunk=args.head_chunk,
                  optimizer=args.optimizer, wkv_impl=args.wkv_impl)
    fields.update(PROFILES[args.profile])
    s = cfgmod.Settings(**fields)

    # libraries the build imports, and the thread pools of the first ops, are runtime
    # overhead (like a CUDA context), not training memory: load them before the baseline
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401

    with autocast_ctx(dev, s.precision):
        torch.ones(64, 64, device=dev, requires_grad=True).matmul(torch.ones(64, 64, device=dev)).sum().backward()
    baseline_kb = _rss_kb("VmRSS")
    model, spec, cfg = build_model(s, path, dev)
    os.remove(path)
    loss_module = LossModule(model, s.head_chunk, compute_dtype(s.precision))
    opt = make_optimizer(model, s)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (s.micro_bsz, s.ctx_len), generator=g).to(dev)
    y = torch.randint(0, cfg.vocab_size, (s.micro_bsz, s.ctx_len), generator=g).to(dev)
    w = torch.full((s.micro_bsz, s.ctx_len), 1.0 / (s.micro_bsz * s.ctx_len), device=dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    t0 = time.time()
    for _ in range(args.steps):
        with autocast_ctx(dev, s.precision):
            loss = loss_module(x, y, w)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        measured = (_rss_kb("VmHWM") - baseline_kb) * 1024
        reserved = None
    bd = memory.estimate(cfg, s, device=dev.type)
    return {"model": args.model, "profile": args.profile, "device": dev.type,
            "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "ctx_len": s.ctx_len,
            "micro_bsz": s.micro_bsz, "grad_cp": s.grad_cp, "lora_r": s.lora_r,
            "head_chunk": s.head_chunk, "predicted": bd.allocated, "predicted_total": bd.total,
            "measured": measured, "reserved": reserved, "ratio": measured / bd.allocated,
            "items": bd.items, "loss": float(loss), "seconds": time.time() - t0}


def run_one(argv: list[str], timeout: float = 600) -> dict:
    """Run one measurement in a fresh interpreter; returns its JSON result."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", *argv]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if p.returncode != 0:
        raise RuntimeError(f"memory bench child failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="0.1b,0.4b", help="comma list: tiny, 0.1b ... 7.2b")
    ap.add_argument("--profiles", default="lora-bf16,qlora-int8,qlora-nf4")
    ap.add_argument("--profile", default="lora-bf16", help=argparse.SUPPRESS)
    ap.add_argument("--device", default=None, help="cuda (default when present) or cpu")
    ap.add_argument("--ctx-len", type=int, default=1024)
    ap.add_argument("--micro-bsz", type=int, default=1)
    ap.add_argument("--lora-r", type=int, default=64)
    ap.add_argument("--grad-cp", type=int, default=1)
    ap.add_argument("--head-chunk", type=int, default=1024)
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--wkv-impl", default="auto")
    ap.add_argument("--vocab", type=int, default=65536)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        print(json.dumps(child(args)))
        return 0
    common = ["--device", args.device, "--ctx-len", str(args.ctx_len), "--micro-bsz",
              str(args.micro_bsz), "--lora-r", str(args.lora_r), "--grad-cp", str(args.grad_cp),
              "--head-chunk", str(args.head_chunk), "--optimizer", args.optimizer,
              "--wkv-impl", args.wkv_impl, "--vocab", str(args.vocab), "--steps", str(args.steps)]
    rows = []
    what = "max_memory_allocated" if args.device == "cuda" else "peak RSS growth"
    if not args.json:
        print(f"device {args.device}; measured = {what}; ctx {args.ctx_len}, micro-batch "
              f"{args.micro_bsz}, r {args.lora_r}, grad_cp {args.grad_cp}")
        print(f"{'model':<6} {'profile':<11} {'predicted':>11} {'measured':>11} {'ratio':>6}")
    for m in args.model.split(","):
        for prof in args.profiles.split(","):
            r = run_one(["--model", m, "--profile", prof, *common])
            rows.append(r)
            if not args.json:
                print(f"{m:<6} {prof:<11} {r['predicted'] / 2**20:>8.0f} MiB "
                      f"{r['measured'] / 2**20:>7.0f} MiB {r['ratio']:>6.2f}", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""One compiled RWKV-7 block, forward + backward, on the CPU: the token shift as
`roll` + `where` (model/rwkv7.py's `token_shift` under torch.compile) against the `torch.cat`
form it replaced, each compiled by inductor and called interleaved in one process on the same
inputs. The figures in `token_shift`'s doc come from here.

    python bench/token_shift_bench.py                 # 0.1B shape (C=768), T=512, bf16
    python bench/token_shift_bench.py --reps 40 --ctx-len 1024
    python bench/token_shift_bench.py --profile       # + inductor's kernel times per form

The end-to-end figure moves by a few percent against this VM's noise; --profile isolates what
the change acts on: the self time of inductor's fused kernels (torch profiler, kernels built
with inductor's kernel profiling on), summed per call of the block.

Like training (train.py's build_model and LossModule): a random 2-layer model of the given
width with rank-32 LoRA adapters on the six block Linears, frozen bf16 base weights, bf16
autocast, the gradient flowing back to the block's input and the adapters; the WKV kernel is
the one `auto` picks (the C one on a CPU where it builds).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


def cat_shift(x, shift, reset=None):
    """The form `token_shift` uses eagerly, and used under torch.compile before (same
    signature, packed rows' `reset` mask included)."""
    import torch

    prev = torch.cat([shift.to(x.dtype).unsqueeze(1), x[:, :-1]], dim=1)
    return prev if reset is None else prev.masked_fill(reset.unsqueeze(-1), 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--reps", type=int, default=20, help="timed calls of each (after compiling)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--profile", action="store_true",
                    help="also time inductor's fused kernels of each form (torch profiler)")
    args = ap.parse_args(argv)
    if args.ctx_len < 2 or args.reps < 1 or args.threads < 1:
        ap.error("--ctx-len must be >= 2 (a shift needs a previous token), --reps and "
                 "--threads >= 1")
    if args.n_embd < 64 or args.n_embd % 64:
        ap.error(f"--n-embd {args.n_embd}: must be a positive multiple of 64 (heads of 64)")

    import tempfile

    import torch

    from rwkvforge import config as cfgmod
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.model import rwkv7
    from rwkvforge.model.wkv import resolve_impl
    from rwkvforge.peft import unwrap
    from rwkvforge.loss import LossModule
    from rwkvforge.train import build_model

    torch.set_num_threads(args.threads)
    if args.profile:  # before compiling: each fused kernel then records itself
        torch._inductor.config.cpp.enable_kernel_profile = True
    cpu = torch.device("cpu")
    s = cfgmod.Settings(lora_r=32, lora_alpha=32.0, precision="bf16")
    with tempfile.TemporaryDirectory() as tmp:
        path = save_pth(make_random_model_sd(2, args.n_embd, vocab_size=256),
                        Path(tmp) / "model.pth")
        pm, _, _ = build_model(s, path, cpu)
    LossModule(pm, s.head_chunk, torch.bfloat16)  # its setting on peft's layers, as in training
    m = unwrap(pm)
    impl = resolve_impl(s.wkv_impl, cpu)
    block = torch.compile(m.blocks[1])  # layer 1: with the v_first mix, like layers 1..L-1
    x = torch.randn(1, args.ctx_len, args.n_embd, dtype=torch.bfloat16, requires_grad=True)
    v_first = torch.randn(1, args.ctx_len, args.n_embd, dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    state = m.init_state(1, cpu)[1]
    forms = {"roll + where": rwkv7.token_shift, "cat": cat_shift}

    def call(form) -> float:
        rwkv7.token_shift = form  # the compiled block keeps one graph per form (a guard)
        x.grad = None
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = block(x, v_first, *state, impl, 16, m._lin)[0]
        out.backward(dy)
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {name: [] for name in forms}
    try:
        for form in forms.values():  # compile both first
            call(form)
            call(form)
        for _ in range(args.reps):
            for name, form in forms.items():
                times[name].append(call(form))
    finally:
        rwkv7.token_shift = forms["roll + where"]
    print(f"one compiled block, forward + backward: C={args.n_embd}, T={args.ctx_len}, bf16, "
          f"WKV {impl}, {args.threads} threads, {args.reps} interleaved calls each")
    for name, ts in times.items():
        print(f"  {name:13s} min {min(ts) * 1e3:7.2f} ms   median "
              f"{statistics.median(ts) * 1e3:7.2f} ms")
    ratio = statistics.median(times["cat"]) / statistics.median(times["roll + where"])
    print(f"  roll + where is {ratio:.2f}x as fast as cat (medians)")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        print("inductor's fused kernels, self time per call of the block (forward + backward):")
        for name, form in forms.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(args.reps):
                    call(form)
            rows = sorted(((e.self_cpu_time_total / 1e3 / args.reps, e.key)
                           for e in prof.key_averages() if "cpp_fused" in e.key), reverse=True)
            print(f"  {name:13s} {sum(ms for ms, _ in rows):7.2f} ms in {len(rows)} kernels; "
                  f"slowest {rows[0][0]:.2f} ms ({rows[0][1][:70]})")
        rwkv7.token_shift = forms["roll + where"]
    return 0


if __name__ == "__main__":
    sys.exit(main())

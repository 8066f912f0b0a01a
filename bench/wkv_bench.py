"""The WKV-7 recurrence, forward + backward, for one layer on the CPU: the C kernel
(`wkv_native`) against the torch chunked form (`wkv_chunked`, the fallback without a C
compiler), interleaved in one process on the same inputs. The figure in model/wkv.py's
module doc comes from here.

    python bench/wkv_bench.py                      # T=512, 12 heads of 64, bf16 inputs
    python bench/wkv_bench.py --dtype fp32 --reps 10
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="r, k, v, a, b as bf16 autocast hands them over, or fp32")
    ap.add_argument("--reps", type=int, default=6, help="timed calls of each (after one untimed)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from rwkvforge.model.wkv import native_available, wkv_chunked, wkv_native

    if not native_available():
        print("the C kernel is unavailable here (no C compiler?): nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    B, T, H, N = 1, args.ctx_len, args.heads, 64
    g = torch.Generator().manual_seed(0)
    rnd = lambda: torch.randn(B, T, H, N, generator=g)  # noqa: E731
    dt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    kk = F.normalize(rnd(), dim=-1)
    r, k, v = rnd() * 0.5, rnd() * 0.5, rnd() * 0.5
    a, b = -kk, kk * torch.sigmoid(rnd())
    xs = [x.to(dt).requires_grad_() for x in (r, k, v, a, b)]
    log_w = (-0.6066 * torch.sigmoid(rnd())).requires_grad_()
    dy = torch.randn(B, T, H, N, generator=g)
    times: dict[str, list[float]] = {"native": [], "chunked": []}
    for rep in range(args.reps + 1):
        for name, fn in (("native", wkv_native), ("chunked", wkv_chunked)):
            for x in (*xs, log_w):
                x.grad = None
            t0 = time.perf_counter()
            y, _ = fn(xs[0], log_w, *xs[1:])
            y.backward(dy)
            if rep:
                times[name].append(time.perf_counter() - t0)
    print(f"WKV-7 forward + backward, one layer: T={T}, {H} heads of {N}, {args.dtype} inputs, "
          f"{args.threads} threads, {args.reps} interleaved calls each")
    for name, ts in times.items():
        print(f"  {name:8s} min {min(ts) * 1e3:7.1f} ms   median "
              f"{statistics.median(ts) * 1e3:7.1f} ms")
    ratio = statistics.median(times["chunked"]) / statistics.median(times["native"])
    print(f"  native is {ratio:.1f}x faster than chunked (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

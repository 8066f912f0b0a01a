"""LoRA training speed: this package vs the `rwkvtune` package on the same 0.1B-shaped model,
same data, same context and batch, on the CPU; plus model-FLOPs utilisation (MFU).

    rwkvforge demo-model --bench                 # models/base/rwkv7-0.1b-shape.pth, once
    python -m venv /tmp/vbench && /tmp/vbench/bin/pip install -c constraints.txt \\
        torch==2.13.0 rwkvtune==0.1.0           # the peer, in its own environment
    python bench/train_bench.py --peer-python /tmp/vbench/bin/python
    python bench/train_bench.py --steps 2 --ctx-len 256 --no-peer

Both sides train rank-32 LoRA adapters on the six block Linears (att.receptance / key / value
/ output, ffn.key / value) of the same weights, with bf16 autocast, AdamW (ours: train.py's
make_optimizer, with the heap setting `rwkvforge train` applies on a CPU), a batch of
--batch packed SFT windows of --ctx-len tokens from the shipped sample (every token
trained), one optimiser step per batch. Each side runs alone in its own process, one after
the other, with the same torch thread count; the first --warmup steps are not timed. The
first step's loss is printed for both as a check that they train the same model on the same
tokens. Our side runs twice by default (--compile both): eager, and with COMPILE=1
(train.compile_blocks; its first, untimed step includes the compile, printed).

MFU = achieved model FLOP/s / the bf16 matmul rate this machine sustains at that moment: model
FLOPs per token are 2N forward + 2N for the activation gradients (frozen base weights need no
weight gradient) over the N weights a token uses, plus the WKV recurrence and the adapters.
A shared VM's matmul rate drifts, so the worker measures it in windows around every timed step
and prints three figures (sustained window, fastest matmul in the window, fastest in the run);
why, and the measured drift, are in docs/memory.md ("Measuring MFU on a shared CPU").
Targets (issue 5): >= 5x rwkvtune's tokens/s, MFU >= 40%.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

LORA_R, LORA_ALPHA, LR = 32, 32.0, 1e-4


# ------------------------------------------------------------------------------ FLOPs
def model_flops_per_token(cfg: dict, r: int = LORA_R) -> dict:
    """FLOPs per token for one LoRA training step (see module doc)."""
    C, F_, V, L, N = cfg["n_embd"], cfg["dim_ffn"], cfg["vocab_size"], cfg["n_layer"], cfg[
        "head_size"]
    per_layer = 4 * C * C + 2 * C * F_ + 2 * C * (cfg["d_decay"] + cfg["d_aaa"] + cfg["d_gate"])
    mm = L * per_layer + (L - 1) * 2 * C * cfg["d_mv"] + V * C
    lora = L * (4 * r * 2 * C + 2 * r * (C + F_))  # A and B of 6 adapters per layer
    wkv = L * 8 * N * C  # state update + readout per token, all heads
    fwd = 2 * (mm + lora) + wkv
    bwd = 2 * mm + 4 * lora + 2 * wkv  # frozen: input grads only; adapters: both grads
    return {"forward": fwd, "backward": bwd, "total": fwd + bwd, "matmul_weights": mm}


def measure_peak(threads: int, kinds=("bf16", "fp32"), sizes=(1024, 2048, 3072)) -> dict:
    """Best bf16 / fp32 matmul FLOP/s on this machine with `threads` torch threads."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    for name in kinds:
        dt = dtypes[name]
        best = 0.0
        for n in sizes:
            a = torch.randn(n, n, dtype=dt)
            b = torch.randn(n, n, dtype=dt)
            a @ b
            t = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                a @ b
                t = min(t, time.perf_counter() - t0)
            best = max(best, 2 * n ** 3 / t)
        out[name] = best
    return out


def matmul_window(threads: int, seconds: float, n: int = 2048) -> tuple[float, float]:
    """bf16 n x n matmuls back to back for `seconds` (at least 3): (the rate they sustained
    over the whole window, the rate of the fastest single one), FLOP/s."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    a @ b
    best, calls = float("inf"), 0
    t0 = time.perf_counter()
    while calls < 3 or time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
        calls += 1
    return 2 * n ** 3 * calls / (time.perf_counter() - t0), 2 * n ** 3 / best


# ------------------------------------------------------------------------------ data
def make_batches(path: Path, ctx_len: int, batch: int, n: int) -> None:
    """`n` batches of `batch` packed SFT windows (ctx_len + 1 tokens) -> a .pt of int64."""
    import torch

    from rwkvforge.data.loader import build_train_loader
    from rwkvforge.data.prepare import Options, run

    with tempfile.TemporaryDirectory() as d:
        prefix = Path(d) / "bsl_sft"
        run(Options(input=ROOT / "data" / "samples" / "bsl_sft.jsonl", prefix=prefix,
                    data_type="sft", ctx_len=ctx_len, seed=42, val_fraction=0.0, workers=1,
                    progress=False), log=lambda *a: None)
        loader = build_train_loader(prefix, ctx_len, batch, seed=42, pack=True)
        xs, ys = [], []
        for _ in range(n):
            b = next(loader)
            xs.append(b["input_ids"])
            ys.append(b["targets"])
    torch.save({"input_ids": torch.stack(xs), "targets": torch.stack(ys)}, path)


# ------------------------------------------------------------------------------ workers
def worker_ours(model: str, data: str, warmup: int, threads: int, n: int,
                compile_: bool = False) -> dict:
    import torch

    from rwkvforge import config as cfgmod
    from rwkvforge.runtime import keep_freed_memory
    from rwkvforge.peft import unwrap
    from rwkvforge.loss import LossModule, autocast_ctx
    from rwkvforge.train import build_model, compile_blocks, make_optimizer

    keep_freed_memory()  # what `rwkvforge train` does on a CPU (see rwkvforge/runtime.py)
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    d = torch.load(data, weights_only=True)
    s = cfgmod.Settings(lora_r=LORA_R, lora_alpha=LORA_ALPHA, precision="bf16", lr=LR,
                        head_chunk=1024)
    pm, _, cfg = build_model(s, Path(model), torch.device("cpu"))
    if compile_:
        compile_blocks(unwrap(pm))  # COMPILE=1 (the first, untimed step compiles)
    lm = LossModule(pm, s.head_chunk, torch.bfloat16)
    opt = make_optimizer(pm, s)  # train.py's AdamW (fused, weight decay on the adapters)
    dev = torch.device("cpu")
    times, losses, windows = [], [], []
    for i in range(min(n, len(d["input_ids"]))):
        x, y = d["input_ids"][i], d["targets"][i]
        w = torch.full(x.shape, 1.0 / x.numel())
        if i == warmup:  # a matmul window right before the first timed step (see main)
            windows.append(matmul_window(threads, min(2.0, max(0.5, times[-1] if times else 1))))
        t = time.perf_counter()
        with autocast_ctx(dev, "bf16"):
            loss = lm(x, y, w)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
        if i >= warmup:  # ... and one right after each timed step, as long as the step
            windows.append(matmul_window(threads, max(0.5, times[-1])))
    from rwkvforge.model.wkv import resolve_impl

    return {**_summary(times, losses, d, warmup, cfg.to_dict()),
            "wkv": resolve_impl(s.wkv_impl, dev), "first_step_s": times[0],
            "step_sustained": [w[0] for w in windows], "step_peaks": [w[1] for w in windows]}


def worker_rwkvtune(model: str, data: str, warmup: int, threads: int, n: int) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:
        import rwkvtune
        from rwkvtune.models.configuration import RWKVConfig
        from rwkvtune.models.rwkv7.model import RWKV7Model
        from rwkvtune.peft import LoraConfig, get_peft_model
    except Exception as e:  # noqa: BLE001 - report exactly what failed
        return {"error": f"import rwkvtune failed: {type(e).__name__}: {e}"}
    d = torch.load(data, weights_only=True)
    sd = torch.load(model, map_location="cpu", weights_only=True)
    C = sd["emb.weight"].shape[1]
    L = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    T = d["input_ids"].shape[-1]
    cfg = RWKVConfig(n_layer=L, n_embd=C, vocab_size=sd["emb.weight"].shape[0],
                     head_size_a=sd["blocks.0.att.r_k"].shape[1], ctx_len=T,
                     dim_att_lora=sd["blocks.0.att.w1"].shape[1],
                     dim_gate_lora=sd["blocks.0.att.g1"].shape[1],
                     dim_mv_lora=sd["blocks.1.att.v1"].shape[1], dim_att=C,
                     dim_ffn=sd["blocks.0.ffn.key.weight"].shape[0])
    try:
        m = RWKV7Model(cfg)
        res = m.load_state_dict(sd, strict=False)
        missing = [k for k in res.missing_keys if not k.startswith("blocks.0.att.v")]
        if missing or res.unexpected_keys:
            return {"error": f"rwkvtune did not take the weights: missing {missing[:5]}, "
                             f"unexpected {res.unexpected_keys[:5]}"}
        m = get_peft_model(m, LoraConfig(r=LORA_R, lora_alpha=int(LORA_ALPHA)))
    except Exception as e:  # noqa: BLE001
        return {"error": f"rwkvtune model/LoRA setup failed: {type(e).__name__}: {e}"}
    m.train()
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, betas=(0.9, 0.99))
    times, losses = [], []
    try:
        for i in range(min(n, len(d["input_ids"]))):
            x, y = d["input_ids"][i], d["targets"][i]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16):  # Lightning "bf16-mixed"
                logits = m(x)
            # rwkvtune's SFT training_step: full logits + cross-entropy over every token
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(float(loss))
    except Exception as e:  # noqa: BLE001
        return {"error": f"rwkvtune training step failed on CPU: {type(e).__name__}: {e}"}
    out = _summary(times, losses, d, warmup, None)
    out["version"] = getattr(rwkvtune, "__version__", "0.1.0")
    out["wkv"] = "rwkvtune operators/wkv_cpu.py (per-token Python loop, autograd)"
    return out


def _summary(times, losses, d, warmup, cfg) -> dict:
    tok = d["input_ids"][0].numel()
    timed = times[warmup:] or times
    return {"tokens_per_step": tok, "step_s": timed, "tokens_per_s": tok * len(timed)
            / sum(timed), "first_loss": losses[0], "losses": losses, "model": cfg}


def median(xs) -> float:
    """The middle value (the upper one of an even count)."""
    xs = sorted(xs)
    return xs[len(xs) // 2]


def mfu_figures(r: dict, flops_per_token: float, run_best: float) -> dict:
    """The MFU figures of one of our runs (see the module doc), each a median over its timed
    steps. Window j is the one right before step j, window j + 1 the one right after it."""
    sus, fast, f = r["step_sustained"], r["step_peaks"], r["tokens_per_step"] * flops_per_token
    per_step = [f / t / max(sus[j], sus[j + 1]) for j, t in enumerate(r["step_s"])]
    return {"mfu": median(per_step), "mfu_per_step": per_step,
            "mfu_vs_fastest_matmul": median(f / t / max(fast[j], fast[j + 1])
                                            for j, t in enumerate(r["step_s"])),
            "mfu_vs_run_best": median(f / t / run_best for t in r["step_s"]),
            "matmul_loop_vs_run_best": median(sus) / run_best}


# ------------------------------------------------------------------------------ driver
def run_worker(python: str, which: str, model: Path, data: Path, warmup: int, threads: int,
               timeout: float, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    cmd = [python, str(Path(__file__).resolve()), "--worker", which, "--model", str(model),
           "--data", str(data), "--warmup", str(warmup), "--threads", str(threads),
           "--steps", str(steps)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"{which}: did not finish in {timeout:.0f} s"}
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-5:]
        return {"error": f"{which}: exit {r.returncode}: " + " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "base" /
                    "rwkv7-0.1b-shape.pth")
    ap.add_argument("--ctx-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=8, help="timed steps of ours (the per-step "
                    "MFU is the median over them: more steps, less VM noise)")
    ap.add_argument("--peer-steps", type=int, default=3,
                    help="timed steps for rwkvtune (its steps take 20-45 s each here)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed first steps per side "
                    "(oneDNN builds its kernels on the first calls)")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--peer-python", default="/tmp/vbench/bin/python",
                    help="python of the environment with rwkvtune installed")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--timeout", type=float, default=3000.0, help="seconds per side")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "train_bench.json")
    ap.add_argument("--compile", choices=("both", "0", "1"), default="both",
                    help="our side eager (0), with COMPILE=1 (1), or both runs (default)")
    ap.add_argument("--worker", choices=("ours", "ours-compile", "rwkvtune"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        wargs = (str(args.model), str(args.data), args.warmup, args.threads,
                 args.warmup + args.steps)
        if args.worker == "rwkvtune":
            print(json.dumps(worker_rwkvtune(*wargs)))
        else:
            print(json.dumps(worker_ours(*wargs, compile_=args.worker == "ours-compile")))
        return 0

    if not args.model.is_file():
        from rwkvforge.demo import BENCH_SHAPE, write_demo_model

        print(f"writing {args.model} (L{BENCH_SHAPE[0]} C{BENCH_SHAPE[1]}, random weights)")
        write_demo_model(args.model, *BENCH_SHAPE)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"{args.threads} torch threads per side")
    work = Path(tempfile.mkdtemp(prefix="train_bench_"))
    data = work / "batches.pt"
    peer_steps = args.peer_steps
    make_batches(data, args.ctx_len, args.batch, args.warmup + max(args.steps, peer_steps))
    peak = measure_peak(args.threads)
    print(f"matmul peak: bf16 {peak['bf16'] / 1e9:.1f} GFLOP/s, fp32 "
          f"{peak['fp32'] / 1e9:.1f} GFLOP/s")
    modes = {"both": ("ours", "ours-compile"), "0": ("ours",), "1": ("ours-compile",)}
    ours_runs = {}
    for which in modes[args.compile]:
        r = run_worker(sys.executable, which, args.model, data, args.warmup, args.threads,
                       args.timeout, args.steps)
        if "error" in r:
            print(f"{which} failed: {r['error']}")
            return 1
        ours_runs[which] = r
    # the peak again after our runs; the best of every probe is the third figure's denominator
    after = measure_peak(args.threads)
    print(f"matmul peak after our run: bf16 {after['bf16'] / 1e9:.1f} GFLOP/s")
    in_run = max(p for r in ours_runs.values() for p in r["step_peaks"])
    print(f"fastest single bf16 matmul in the windows around our timed steps: "
          f"{in_run / 1e9:.1f} GFLOP/s")
    for which, r in ours_runs.items():
        sus = r["step_sustained"]
        print(f"  {which}: the windows sustained {median(sus) / 1e9:.0f} GFLOP/s "
              f"(median; {min(sus) / 1e9:.0f}-{max(sus) / 1e9:.0f})")
    peak = {k: max(peak[k], after[k]) for k in peak}
    peak["bf16"] = max(peak["bf16"], in_run)
    peer = {"error": "not run (--no-peer)"}
    if not args.no_peer:
        if not Path(args.peer_python).is_file():
            peer = {"error": f"{args.peer_python} not found: create the peer environment "
                             "(see the module doc)"}
        else:
            peer = run_worker(args.peer_python, "rwkvtune", args.model, data, args.warmup,
                              args.threads, args.timeout, peer_steps)
    any_ours = next(iter(ours_runs.values()))
    flops = model_flops_per_token(any_ours["model"])
    rows = []
    for which, r in ours_runs.items():
        how = (f"COMPILE=1, 1st step {r['first_step_s']:.0f} s" if which == "ours-compile"
               else "eager")
        rows.append((f"rwkvforge ({how}; {r['wkv']} WKV)", r))
    if "error" not in peer:
        rows.append((f"rwkvtune {peer.get('version', '')} (its LoRA, CPU WKV, full logits)",
                     peer))
    print(f"\nLoRA r={LORA_R} training, bf16 autocast, ctx {args.ctx_len}, batch {args.batch}, "
          f"{args.steps} (rwkvtune {peer_steps}) timed steps, "
          f"model L{any_ours['model']['n_layer']} "
          f"C{any_ours['model']['n_embd']}")
    print(f"{'system':<58} {'tokens/s':>10} {'s/step':>8} {'1st loss':>9}")
    for name, r in rows:
        print(f"{name:<58} {r['tokens_per_s']:>10.1f} "
              f"{sum(r['step_s']) / len(r['step_s']):>8.2f} {r['first_loss']:>9.4f}")
    if "error" in peer:
        print(f"rwkvtune: not measured: {peer['error']}")
    results = {}
    for which, r in ours_runs.items():
        label = "COMPILE=1" if which == "ours-compile" else "eager"
        ratio = None if "error" in peer else r["tokens_per_s"] / peer["tokens_per_s"]
        if ratio is not None:
            print(f"{label}: ratio rwkvforge / rwkvtune: {ratio:.2f}x (target >= 5x)")
        res = mfu_figures(r, flops["total"], peak["bf16"])
        results[which] = {"ratio": ratio, **res}
        print(f"{label}: MFU (target >= 40%), {flops['total'] / 1e9:.3f} GFLOP per token; "
              f"median over the {len(r['step_s'])} timed steps of the step's FLOP/s against:")
        print(f"  the bf16 matmul rate sustained over a window as long as the step, right "
              f"before or after it (the higher): {res['mfu'] * 100:.1f}%")
        print(f"  the fastest single bf16 matmul in those two windows: "
              f"{res['mfu_vs_fastest_matmul'] * 100:.1f}%")
        print(f"  the fastest single bf16 matmul of the whole run "
              f"({peak['bf16'] / 1e9:.1f} GFLOP/s): {res['mfu_vs_run_best'] * 100:.1f}% "
              f"(a pure matmul loop scores {res['matmul_loop_vs_run_best'] * 100:.1f}% on "
              f"this scale: the median window against that best)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {"ctx_len": args.ctx_len, "batch": args.batch, "threads": args.threads,
              "load_average": os.getloadavg()[0], "peak_flops": peak, "flops_per_token": flops,
              "ours": ours_runs, "rwkvtune": peer, "results": results}
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

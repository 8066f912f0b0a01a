"""Inference speed: this package vs the `rwkv` pip package on the same 0.1B-shaped model (CPU).

    rwkvforge demo-model --bench            # writes models/base/rwkv7-0.1b-shape.pth once
    python bench/infer_bench.py             # a few minutes on an idle 2-core machine
    python bench/infer_bench.py --dtypes fp32 --strategies "cpu fp32" --rounds 1
    python bench/infer_bench.py --tokens 16 --rounds 2     # quicker
    python bench/infer_bench.py --tokens 8 --rounds 1 --accuracy-tokens 16   # a smoke run

Our modes (--dtypes) are WEIGHTS[+FAST]: fp32 is the exact path; fp32+int8 / fp32+bf16 set
the model's `infer_dtype` fast path (see RWKV7.infer_dtype). Each row reports our fastest
mode and names it.

Prints one table: single-stream decode, 16-stream batched decode (aggregate) and a
512-token prefill, each as tokens/s for us and for the package's best CPU strategy (the
strategies listed are all measured; the fastest per row is the peer), with ratios. Decode is
also reported as a fraction of the memory-bandwidth limit: bytes of weights read per token
(every parameter except the embedding table, of which one row is read) vs the bandwidth
measured just before each decode (a sum over a large tensor: read only; a copy beside it).
Both systems live in this one process with the same torch thread count and are measured in
interleaved rounds (best of each kept), so a load spike from other work on the machine hits
both alike.

Both run with glibc told to keep freed blocks for reuse (rwkvforge.runtime.keep_freed_memory,
what `rwkvforge infer` / `serve` set): without it every prefill page-faults its activations in
again, which costs either system time that is the kernel's, not the model's.

The default path is the mode a user gets with no INFER_FAST set (config.Settings'
infer_fast default): it is measured whatever --dtypes says. Each fast mode also gets an
accuracy row against the exact fp32 step (model/decode.py fast_path_accuracy: max and mean
logit error, greedy-token agreement over --accuracy-tokens steps; the gate is in
docs/inference.md). On a machine with CUDA, rows for our fp16 step and the package's
`cuda fp16` strategy are added; without one they print as skipped, with the reason.

Targets (issue 26): the default path beats the package's best CPU strategy on every row,
the exact fp32 path beats `cpu fp32`; decode >= 70% of the bandwidth limit; 16 streams >=
25x the package's single-stream best. The last line, `default path: decode Xx, 16 streams
Yx, prefill Zx the rwkv package's best`, is for scripts. A busy machine (see the load
average printed) lowers every number.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))


# the clock every timing reads: wall time (the default), or --clock cpu: this process's CPU
# time, which a machine shared with other busy processes inflates far less (use it with
# --threads 1: with more threads, time spent waiting at a barrier counts as CPU time too)
CLOCK = time.perf_counter


def _now() -> float:
    return CLOCK()


def _best(fn, reps: int) -> float:
    """Fastest wall time of `reps` runs of fn()."""
    best = float("inf")
    for _ in range(reps):
        t = _now()
        fn()
        best = min(best, _now() - t)
    return best


def measure_bandwidth(mib: int = 1024, reps: int = 5) -> tuple[float, float]:
    """(copy, read) bytes/s of the memory: a large tensor copy (read + write bytes) and a sum
    over it (read only: what a decode step does to its weights), best of `reps` each. The
    driver measures both just before each of our single-stream decodes and quotes the decode
    against them round by round (on a shared 2-core VM the read rate moved between ~31 and
    ~56 GB/s from one minute to the next, the copy between ~33 and ~50)."""
    import torch

    n = mib * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    copy = 2 * n * 4 / _best(lambda: dst.copy_(src), reps)
    read = n * 4 / _best(lambda: src.sum(), reps)
    return copy, read


# ------------------------------------------------------------------------------ systems
class Ours:
    def __init__(self, path: str, mode: str, model=None):
        """mode = WEIGHTS[+FAST]: weight dtype (fp32|bf16|fp16) and optionally the model's
        `infer_dtype` fast path (int8: weight-only int8 GEMV for 1 stream, bf16 GEMMs for
        many rows; bf16: bf16 GEMMs for many rows). `model` reuses an already loaded model
        with the same weight dtype (the fast paths only add cached low-precision copies)."""
        import torch

        from rwkvforge.checkpoint import load_model

        dtype, _, fast = mode.partition("+")
        dt = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
        self.name = f"rwkvforge {mode}"
        self.model = model if model is not None else load_model(path, dtype=dt)
        self.model.use_decode_layout()  # as `rwkvforge infer` / `serve` on CPU (set_fast_path)
        self.infer_dtype = {"": None, "int8": torch.int8, "bf16": torch.bfloat16}[fast]
        emb = self.model.emb.weight
        wbytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        # every weight is read once per step, except the embedding table (one row)
        self.bytes_per_token = wbytes - emb.numel() * emb.element_size() \
            + emb.shape[1] * emb.element_size()
        lins = [mod.weight for mod in self.model.modules() if type(mod) is torch.nn.Linear]
        # the channel-mix value weights: the sparse path reads only some of their rows
        per = 1 if self.infer_dtype is torch.int8 else (
            2 if self.infer_dtype is torch.bfloat16 else 4)
        self.value_bytes = 0 if self.infer_dtype is torch.int8 else sum(
            b.ffn.value.weight.numel() * per for b in self.model.blocks)
        if self.infer_dtype is torch.bfloat16:  # single stream reads bf16 copies of the Linears
            # and of the time-mix's low-rank matrices (RWKV7._mm)
            lowrank = [getattr(b.att, n) for b in self.model.blocks
                       for n in ("w1", "w2", "a1", "a2", "v1", "v2", "g1", "g2") if hasattr(b.att, n)]
            self.bytes_per_token -= sum(w.numel() * (w.element_size() - 2) for w in lins + lowrank)
        if self.infer_dtype is torch.int8:  # single stream reads int8 copies of the Linears
            self.bytes_per_token -= sum(w.numel() * w.element_size() for w in lins)
            self.bytes_per_token += sum(w.numel() + 2 * w.shape[0] for w in lins)

    def decode(self, B: int, n: int) -> float:
        import torch

        m = self.model
        m.infer_dtype = self.infer_dtype
        with torch.inference_mode():
            state = m.init_state(B)
            idx = torch.arange(1, B + 1)
            # in place, as generate.Engine decodes (it owns its batch's state)
            for _ in range(2):  # warm-up
                logits, state = m.step(idx, state, inplace=True)
            t = _now()
            for _ in range(n):
                logits, state = m.step(idx, state, inplace=True)
                idx = logits.argmax(-1)
            return B * n / (_now() - t)

    def prefill(self, ids: list[int]) -> float:
        import torch

        self.model.infer_dtype = self.infer_dtype
        with torch.inference_mode():
            x = torch.tensor([ids])
            t = _now()
            self.model(x, last_only=True)
            return len(ids) / (_now() - t)

    def engine_decode(self, n: int) -> float:
        """Single stream through generate.Engine: sampling and text included (top_p 0.85:
        on a random model's flat logits the nucleus is wide, the sampler's slowest case)."""
        from rwkvforge.generate import Engine
        from rwkvforge.sampling import SamplingParams
        from rwkvforge.tokenizer import get_tokenizer

        self.model.infer_dtype = self.infer_dtype
        if getattr(self, "engine", None) is None:
            self.engine = Engine(self.model, get_tokenizer(), cache_prompts=False)
            self.engine.generate([1, 2, 3], SamplingParams(max_tokens=2, token_stop=()))
        eng = self.engine
        p = SamplingParams(temperature=1.0, top_p=0.85, max_tokens=n, token_stop=(), seed=0)
        # decode only, as the raw step is timed: a full request minus a one-token one (the
        # prompt's prefill and the first sample are in both)
        t = _now()
        eng.generate([1, 2, 3], dataclasses.replace(p, max_tokens=1))
        t1 = _now()
        h = eng.generate([1, 2, 3], p)
        t2 = _now()
        return (h.completion_tokens - 1) / max((t2 - t1) - (t1 - t), 1e-9)


class RwkvPip:
    def __init__(self, path: str, strategy: str):
        import contextlib

        os.environ["RWKV_V7_ON"] = "1"  # read by rwkv.model at import
        with contextlib.redirect_stdout(sys.stderr):
            from rwkv.model import RWKV

            self.model = RWKV(model=path[:-4], strategy=strategy)
        self.name = f"rwkv pip '{strategy}'"

    def decode(self, B: int, n: int) -> float:  # the package decodes one stream at a time
        import torch

        with torch.no_grad():
            state, tok = None, 1
            for _ in range(2):
                logits, state = self.model.forward([tok], state)
            t = _now()
            for _ in range(n):
                logits, state = self.model.forward([tok], state)
                tok = int(logits.argmax())
            return n / (_now() - t)

    def prefill(self, ids: list[int]) -> float:
        import torch

        with torch.no_grad():
            t = _now()
            self.model.forward(list(ids), None)
            return len(ids) / (_now() - t)


# ------------------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "base" / "rwkv7-0.1b-shape.pth"))
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per round")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds; the best of each is kept (robust to a busy box)")
    ap.add_argument("--dtypes", default="fp32,fp32+int8,fp32+bf16",
                    help="our modes to measure, WEIGHTS[+FAST]: weight dtype fp32|bf16|fp16, "
                         "optional infer_dtype fast path int8|bf16 (the best per row is ours)")
    ap.add_argument("--strategies", default="cpu fp32,cpu bf16",
                    help="rwkv package strategies to measure (the best is the peer)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both systems (0: torch's default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall time, or this process's CPU time (robust on a loaded machine; "
                         "use with --threads 1)")
    ap.add_argument("--accuracy-tokens", type=int, default=128,
                    help="greedy steps of each fast mode's accuracy row (0: no accuracy rows)")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: {args.model} not found; run `rwkvforge demo-model --bench` first",
              file=sys.stderr)
        return 2
    import torch

    global CLOCK
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    from rwkvforge.config import Settings
    from rwkvforge.model import decode
    from rwkvforge.runtime import keep_freed_memory

    # as `rwkvforge infer` / `serve` do; process-wide, so the rwkv package measured in this
    # same process gets the same allocator setting (no page-fault refill for either side)
    kept = keep_freed_memory()
    print(f"model {args.model}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; freed memory kept "
          f"for reuse (runtime.keep_freed_memory): {kept}; clock: {args.clock}", flush=True)
    if os.getloadavg()[0] > 0.75 * (os.cpu_count() or 1):
        print(f"WARNING: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs before "
              "the bench: other work is running, and the figures below measure it too",
              flush=True)
    fast_default = Settings().infer_fast  # what a user gets with no INFER_FAST set
    default_mode = "fp32" if fast_default == "none" else f"fp32+{fast_default}"
    modes = list(dict.fromkeys(["fp32", default_mode, *args.dtypes.split(",")]))
    ours: list[Ours] = []
    for d in modes:  # modes with the same weight dtype share one model
        same = [o for o in ours if o.name.split()[-1].partition("+")[0] == d.partition("+")[0]]
        ours.append(Ours(args.model, d, same[0].model if same else None))
    peers = [RwkvPip(args.model, s) for s in args.strategies.split(",")]
    ids = torch.randint(0, 65536, (args.prefill,), generator=torch.Generator().manual_seed(1)).tolist()
    res: dict[str, dict[str, float]] = {x.name: {} for x in ours + peers}

    def keep(name: str, key: str, v: float) -> None:
        res[name][key] = max(res[name].get(key, 0.0), v)

    for r in range(args.rounds):  # interleaved, so a load spike hits both systems alike
        for x in [*ours, *peers]:
            if isinstance(x, Ours):
                decode.STATS.clear()
                # the memory's speed just before this decode (it drifts on a shared VM)
                x.bandwidth = getattr(x, "bandwidth", []) + [measure_bandwidth(reps=3)]
            d1 = x.decode(1, args.tokens)
            keep(x.name, "decode_1", d1)
            if isinstance(x, Ours) and decode.STATS.get("rows"):  # sparse channel-mix
                x.read_fraction = decode.STATS["read"] / decode.STATS["rows"]
            keep(x.name, "prefill", x.prefill(ids))
            if isinstance(x, Ours):
                keep(x.name, "decode_b", x.decode(args.batch, max(8, args.tokens // 2)))
                # the engine end to end beside its raw step, in the same round: the ratio of
                # the two measured back to back (the machine's speed drifts between rounds)
                e1 = x.engine_decode(args.tokens)
                keep(x.name, "engine_decode_1", e1)
                # (raw measured before and after it: their geometric mean is the reference)
                ref = (d1 * x.decode(1, args.tokens)) ** 0.5
                x.engine_ratios = getattr(x, "engine_ratios", []) + [e1 / ref]
                x.decodes = getattr(x, "decodes", []) + [d1]
        print(f"round {r + 1}/{args.rounds} done (load average {os.getloadavg()[0]:.1f})",
              flush=True)
    reads = [bw[1] for x in ours for bw in x.bandwidth]
    copies = [bw[0] for x in ours for bw in x.bandwidth]
    print(f"memory bandwidth (1 GiB tensor, before each of our decodes): read (a sum) "
          f"{min(reads) / 1e9:.1f}-{max(reads) / 1e9:.1f} GB/s, copy (read+write bytes) "
          f"{min(copies) / 1e9:.1f}-{max(copies) / 1e9:.1f} GB/s")

    def best(names: list[str], key: str) -> tuple[str, float]:
        k = max(names, key=lambda n: res[n].get(key, 0.0))
        return k, res[k].get(key, 0.0)

    on, pn = [x.name for x in ours], [x.name for x in peers]
    dflt = f"rwkvforge {default_mode}"
    exact = "rwkvforge fp32"
    p32 = [n for n in pn if n.endswith("'cpu fp32'")]
    # (label, our key, peer key, our modes, peer strategies, target ratio)
    table = [("decode, 1 stream (tok/s)", "decode_1", "decode_1"),
             (f"decode, {args.batch} streams aggregate (tok/s)", "decode_b", "decode_1"),
             (f"prefill {args.prefill} tokens (tok/s)", "prefill", "prefill")]
    targets = {"decode_1": 1.0, "decode_b": 25.0, "prefill": 1.0}
    ratios: dict[str, float] = {}
    print()
    print(f"{'measure':<36} {'rwkvforge':>26} {'rwkv pip':>30} {'ratio':>7} {'target':>7}")
    for title, mine, theirs in (("our fastest mode vs the package's best", on, pn),
                                (f"the default path ({default_mode}) vs the package's best",
                                 [dflt], pn),
                                ("exact fp32 vs the package's 'cpu fp32'", [exact], p32)):
        if not theirs:
            continue
        print(title)
        for label, ko, kp in table:
            so, vo = best(mine, ko)
            sp, vp = best(theirs, kp)
            ratio = vo / vp if vp else float("inf")
            # 25x at 16 streams for the default path; the exact path: ahead on every row
            target = (1.0 if mine == [exact] else targets[ko]) if mine != on else \
                (targets[ko] if ko == "decode_b" else 0.0)
            if title.startswith("the default path"):
                ratios[ko] = ratio
            mark = ("ok" if ratio >= target else "BELOW") if target else ""
            print(f"  {label:<34} {vo:>8.1f} {so:>17} {vp:>8.1f} {sp:>21} {ratio:>6.2f}x "
                  f"{(f'{target:.1f}x' if target else '-'):>6} {mark}")
    print()
    for x in ours:
        r = res[x.name]
        nbytes = x.bytes_per_token - x.value_bytes * (1.0 - getattr(x, "read_fraction", 1.0))
        # each round's decode against the read / copy rate measured just before it
        share = statistics.median(d * nbytes / bw[1] for d, bw in zip(x.decodes, x.bandwidth))
        share_c = statistics.median(d * nbytes / bw[0] for d, bw in zip(x.decodes, x.bandwidth))
        limit = statistics.median(bw[1] for bw in x.bandwidth) / nbytes
        sparse = (f" (channel-mix value rows read: {x.read_fraction:.0%})"
                  if hasattr(x, "read_fraction") else "")
        print(f"{x.name}: {nbytes / 1e6:.0f} MB of weights read per token{sparse} -> "
              f"bandwidth limit {limit:.1f} tok/s; single-stream decode {r['decode_1']:.1f} "
              f"tok/s, {share:.0%} of the read bandwidth measured just before it ({share_c:.0%} of "
              f"the copy; medians over the rounds); {args.batch}-stream aggregate "
              f"{r['decode_b']:.1f} tok/s (weights read once per step for all streams); "
              f"engine end-to-end single stream (sampling incl.) {r['engine_decode_1']:.1f} tok/s "
              f"= {statistics.median(x.engine_ratios):.0%} of the raw step (median over the "
              f"rounds of engine / raw measured back to back)")
    for n in pn:
        print(f"{n}: decode {res[n]['decode_1']:.1f} tok/s, prefill {res[n]['prefill']:.1f} tok/s")
    if args.accuracy_tokens > 0:
        print()
        print(f"accuracy vs the exact fp32 step, {args.accuracy_tokens} greedy steps "
              f"(teacher-forced; gate in docs/inference.md):")
        for x in ours:
            if x.infer_dtype is None or x.model.emb.weight.dtype != torch.float32:
                continue
            a = decode.fast_path_accuracy(x.model, x.infer_dtype, ids[:8], args.accuracy_tokens)
            print(f"  {x.name}: max logit error {a['max_err']:.2%} of max |logit|, mean "
                  f"{a['mean_err']:.2%} of mean |logit|, greedy token the same at "
                  f"{a['agree']:.1%} of steps, free-running greedy identical for "
                  f"{a['free_run']}/{a['n']} tokens")
    cuda_rows(args)
    print()
    print(f"default path: decode {ratios['decode_1']:.2f}x, {args.batch} streams "
          f"{ratios['decode_b']:.2f}x, "
          f"prefill {ratios['prefill']:.2f}x the rwkv package's best")
    return 0


def cuda_rows(args) -> None:
    """Our fp16 decode step vs the package's `cuda fp16`, one stream, on the first GPU; a
    line saying why not where there is none."""
    import torch

    print()
    if not torch.cuda.is_available():
        print("CUDA rows: skipped (torch.cuda.is_available() is False on this machine)")
        return
    from rwkvforge.checkpoint import load_model

    m = load_model(args.model, dtype=torch.float16).cuda()
    peer = RwkvPip(args.model, "cuda fp16")

    def decode_with(step, n: int) -> float:  # one stream, greedy, GPU time included
        with torch.inference_mode():
            state, idx = m.init_state(1), torch.tensor([1], device="cuda")
            for _ in range(2):
                logits, state = step(idx, state)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(n):
                logits, state = step(logits.argmax(-1), state)
            torch.cuda.synchronize()
            return n / (time.perf_counter() - t)

    def ours_decode(n: int) -> float:
        return decode_with(m.step, n)

    def graphed_decode(n: int) -> float:  # the same through model/graphs.py (the Engine's)
        from rwkvforge.model.graphs import GraphedStep

        return decode_with(GraphedStep(m).step, n)

    o = max(ours_decode(args.tokens) for _ in range(args.rounds))
    g = max(graphed_decode(args.tokens) for _ in range(args.rounds))
    p = max(peer.decode(1, args.tokens) for _ in range(args.rounds))
    print(f"CUDA ({torch.cuda.get_device_name()}): decode 1 stream, rwkvforge fp16 {o:.1f} tok/s "
          f"({g:.1f} through a CUDA graph), {peer.name} {p:.1f} tok/s, ratio {o / p:.2f}x "
          f"({g / p:.2f}x graphed)")

if __name__ == "__main__":
    raise SystemExit(main())

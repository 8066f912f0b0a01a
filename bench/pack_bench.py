"""Packing (PACK=1) against padded rows (PACK=0): useful (loss-masked) tokens per second of
LoRA training, same model, same CTX_LEN, same MICRO_BSZ, in one process on the CPU.

    python bench/pack_bench.py                      # SFT sample + long tail + DPO, ctx 1024
    python bench/pack_bench.py --data sample --ctx-len 512,1024 --peers pad_longest
    python bench/pack_bench.py --data dpo --steps 4 --layers 4 --embd 256   # quicker
    python bench/pack_bench.py --base-model models/base/rwkv7-0.1b-shape.pth

The peers are this package's own padded batches: PACK=0 with rows padded to the longest of the
micro-batch (the default, `pad_to="longest"`) and PACK=0 padded to CTX_LEN (fixed shapes, as
RWKV-PEFT's pad mode). Data: the shipped SFT sample (data/samples/bsl_sft.jsonl), a synthetic
long-tail chat set (log-normal lengths, median ~60 tokens, a few near CTX_LEN) and the shipped
DPO sample (data/samples/bsl_dpo.jsonl: PACK=1's rows of 2 x CTX_LEN holding whole pairs
against MICRO_BSZ pairs padded to their longest answer), all through `rwkvforge prepare`. Each
step is a real training step: train.py's build_model (LoRA r=32 on the six block Linears,
bf16 autocast), LossModule (PACK=1 passes the reset mask; DPO: train.micro_inputs' arguments),
backward, train.py's AdamW. The modes run interleaved, one step each in turn, after one
untimed step each, so the VM's drift hits them alike; several --ctx-len run one after the
other in the same process. Printed per data set: padding share of the input positions, useful
tokens/s and all positions/s per mode, the ratios PACK=1 / PACK=0 and what padding alone
would give (the ratio of the useful shares: PACK=1 at PACK=0's speed per position). Target
(issue 23): >= 2x. Padding costs the blocks, not the head (the loss skips masked positions),
so the ratio grows with the model's depth and with the padding share.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

MODES = {"pack": {"pack": True}, "pad_longest": {"pad_to": "longest"},
         "pad_ctx": {"pad_to": "ctx_len"}}


def long_tail_jsonl(path: Path, n: int, seed: int = 0) -> None:
    """`n` prompt/response records with log-normal word counts (a few long ones)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = [f"слово{i}" for i in range(200)] + [f"word{i}" for i in range(200)]

    def text(k):
        return " ".join(words[j] for j in rng.integers(0, len(words), max(int(k), 1)))

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n):
            total = min(rng.lognormal(np.log(30), 0.9), 900)
            f.write(json.dumps({"prompt": text(total * 0.4), "response": text(total * 0.6)},
                               ensure_ascii=False) + "\n")


def prepare(src: Path, prefix: Path, ctx_len: int, data_type: str = "sft") -> Path:
    from rwkvforge.data.prepare import Options, run

    run(Options(input=src, prefix=prefix, data_type=data_type, ctx_len=ctx_len, seed=42,
                val_fraction=0.0, workers=1, progress=False), log=lambda *a: None)
    return prefix


def trainer(model_path: Path):
    """What every mode here trains with: train.py's build_model (LoRA r=32 on the six block
    Linears, bf16 autocast), its LossModule and AdamW, after what `rwkvforge train` does on a
    CPU (keep freed memory, seed 0). Returns (settings, model config, loss module, optimiser)."""
    import torch

    from rwkvforge import config as cfgmod
    from rwkvforge.loss import LossModule
    from rwkvforge.runtime import keep_freed_memory
    from rwkvforge.train import build_model, make_optimizer

    keep_freed_memory()
    torch.manual_seed(0)
    s = cfgmod.Settings(lora_r=32, lora_alpha=32.0, precision="bf16", lr=1e-4, head_chunk=1024)
    pm, _, cfg = build_model(s, model_path, torch.device("cpu"))
    return s, cfg, LossModule(pm, s.head_chunk, torch.bfloat16), make_optimizer(pm, s)


def timed_modes(lm, opt, loaders: dict, steps: int, make, tally, counters=()) -> dict:
    """Training steps of each mode, interleaved (one untimed step each first: first-call
    allocations, the C kernels' load): `make(batch)` -> a thunk giving the loss module's
    arguments (what it does up front is untimed, the thunk itself is timed with the forward,
    backward and AdamW step); `tally(acc, mode, batch)` counts a timed batch. -> per mode
    {"time", "useful", "positions", *counters}."""
    import torch

    from rwkvforge.loss import autocast_ctx

    dev = torch.device("cpu")
    acc = {m: {"time": 0.0, "useful": 0.0, "positions": 0, **dict.fromkeys(counters, 0)}
           for m in loaders}

    def one(mode: str) -> tuple[float, dict]:
        b = next(loaders[mode])
        args = make(b)
        t = time.perf_counter()
        with autocast_ctx(dev, "bf16"):
            loss = lm(*args())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t, b

    for m in loaders:
        one(m)
    for _ in range(steps):
        for m in loaders:
            dt, b = one(m)
            acc[m]["time"] += dt
            tally(acc[m], m, b)
    return acc


def report(cfg, ctx_len: int, micro_bsz: int, steps: int, st: dict, acc: dict, per_mode
           ) -> dict:
    """The results of `timed_modes`: the run's shape, the epoch's padding shares (`st`), each
    mode's speeds (+ `per_mode(acc)`'s own figures) and PACK=1 against every other mode."""
    out = {"model": {k: cfg.to_dict()[k] for k in ("n_layer", "n_embd")}, "ctx_len": ctx_len,
           "micro_bsz": micro_bsz, "timed_steps_per_mode": steps, "examples": st["examples"],
           "pad_share_epoch": {"pad_longest": st["pad_share_unpacked"],
                               "pack": st["pad_share_packed"]},
           "modes": {}}
    for m, a in acc.items():
        # positions/s: the blocks' speed over every input position, padding included; the
        # useful share: what the padding leaves of it
        out["modes"][m] = {"useful_tok_s": a["useful"] / a["time"],
                           "positions_s": a["positions"] / a["time"],
                           "useful_share": a["useful"] / a["positions"],
                           "s_per_step": a["time"] / steps, **per_mode(a)}
    o = out["modes"]
    for peer in (m for m in acc if m != "pack"):
        out[f"ratio_pack_vs_{peer}"] = o["pack"]["useful_tok_s"] / o[peer]["useful_tok_s"]
        # what the ratio would be at the peer's speed per position: padding alone
        out[f"padding_only_vs_{peer}"] = o["pack"]["useful_share"] / o[peer]["useful_share"]
    return out


def bench(prefix: Path, model_path: Path, ctx_len: int, micro_bsz: int, steps: int,
          modes: tuple[str, ...] = tuple(MODES)) -> dict:
    from rwkvforge.data.loader import build_train_loader, open_split, pack_stats

    s, cfg, lm, opt = trainer(model_path)
    loaders = {m: build_train_loader(prefix, ctx_len, micro_bsz, seed=42, **MODES[m])
               for m in modes}

    def make(b: dict):
        w = b["loss_mask"] / b["loss_mask"].sum().clamp_min(1)
        reset = (None, 1.0, 0.0, b["reset"]) if "reset" in b else ()
        return lambda: (b["input_ids"], b["targets"], w, *reset)

    def tally(a: dict, _mode: str, b: dict) -> None:
        a["useful"] += float(b["loss_mask"].sum())
        a["positions"] += b["input_ids"].numel()
        a["real"] += int((b["input_ids"] != 0).sum())

    acc = timed_modes(lm, opt, loaders, steps, make, tally, ("real",))
    st = pack_stats(open_split(prefix).ids.sizes, ctx_len, micro_bsz)
    return report(cfg, ctx_len, micro_bsz, steps, st, acc,
                  lambda a: {"pad_share_measured": 1 - a["real"] / a["positions"]})


def bench_dpo(prefix: Path, model_path: Path, ctx_len: int, micro_bsz: int, steps: int
              ) -> dict:
    """DPO pairs: PACK=1 (MICRO_BSZ rows of 2 x CTX_LEN holding whole pairs) against PACK=0
    (MICRO_BSZ pairs = 2 x MICRO_BSZ rows padded to the longest answer), each step the loss
    module's DPO call through train.micro_inputs (reference log-probs: zeros; the work does
    not depend on their values), backward and AdamW. Useful tokens: the answers' masked
    tokens."""
    import torch

    from rwkvforge.data.loader import build_train_loader, open_split, pair_pack_stats
    from rwkvforge.train import micro_inputs

    s, cfg, lm, opt = trainer(model_path)
    dev = torch.device("cpu")
    modes = {"pack": {"pack": True}, "pad_longest": {"pad_to": "longest"}}
    loaders = {m: build_train_loader(prefix, ctx_len, micro_bsz, seed=42, **kw)
               for m, kw in modes.items()}
    ref = torch.zeros(loaders["pack"].split.num_examples, 2, dtype=torch.float64)

    def make(b: dict):
        rows = b["input_ids"].shape[0] if "segment" in b else b["pair_index"].numel()
        return lambda: micro_inputs(b, dev, 1, 0.0, ref)(0, rows)  # (timed, as before)

    def tally(a: dict, mode: str, b: dict) -> None:
        a["pairs"] += b["pair_index"].numel()
        if mode == "pack":
            a["useful"] += float(b["loss_mask"].sum())
            a["positions"] += b["input_ids"].numel()
        else:
            a["useful"] += float(b["chosen_loss_mask"].sum() + b["rejected_loss_mask"].sum())
            a["positions"] += 2 * b["chosen_input_ids"].numel()

    acc = timed_modes(lm, opt, loaders, steps, make, tally, ("pairs",))
    split = open_split(prefix)
    st = pair_pack_stats(split, range(split.num_examples), ctx_len, micro_bsz)
    return report(cfg, ctx_len, micro_bsz, steps, st, acc,
                  lambda a: {"pairs_per_step": a["pairs"] / steps})


def shape_profile(model_path: Path, ctx_list: list[int], micro_bsz: int, steps: int) -> dict:
    """Speed per input position of one training step at fixed shapes (what PACK=1 runs:
    MICRO_BSZ x CTX_LEN rows, with and without a reset every 270 tokens) against rows whose
    length changes every step (what PACK=0 padded to the longest runs: 400-519 here), each
    split into the forward of the blocks, the head + loss, backward and the AdamW step.
    Random tokens, 70% of them in the loss. Modes interleaved, one untimed step each."""
    import torch

    from rwkvforge.loss import autocast_ctx, chunked_head_loss

    s, _, lm, opt = trainer(model_path)
    m, dev = lm.inner(), torch.device("cpu")
    g = torch.Generator().manual_seed(0)

    def step(T: int, reset: bool) -> list[float]:
        x, y = (torch.randint(1, 65536, (micro_bsz, T), generator=g) for _ in range(2))
        w = (torch.rand(micro_bsz, T, generator=g) < 0.7).float()
        kw = {}
        if reset:
            kw["reset"] = torch.zeros(micro_bsz, T, dtype=torch.bool)
            kw["reset"][:, ::270] = True
        t = [time.perf_counter()]
        with autocast_ctx(dev, "bf16"):
            h, _ = m.forward_hidden(x, **kw)
            t.append(time.perf_counter())
            loss = chunked_head_loss(h, m.head, y, w / w.sum(), s.head_chunk, torch.bfloat16)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
        return [b - a for a, b in zip(t, t[1:])]

    varying = list(range(519, 400, -7))
    modes = {f"{c} reset": ([c], True) for c in ctx_list}
    modes[f"{ctx_list[0]} no reset"] = ([ctx_list[0]], False)
    modes["400-519 changing"] = (varying, False)
    acc = {k: [0.0] * 4 + [0] for k in modes}
    for Ts, r in modes.values():
        step(Ts[0], r)
    for i in range(steps):
        for k, (Ts, r) in modes.items():
            T = Ts[(i + 1) % len(Ts)]
            for j, dt in enumerate(step(T, r)):
                acc[k][j] += dt
            acc[k][4] += micro_bsz * T
    return {k: {"positions_s": a[4] / sum(a[:4]),
                **{part: 1e3 * a[j] / a[4] for j, part in
                   enumerate(("fwd_s_per_1k", "head_s_per_1k", "bwd_s_per_1k", "opt_s_per_1k"))}}
            for k, a in acc.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=("sample", "longtail", "both", "dpo", "all", "shapes"),
                    default="all", help="dpo: the shipped DPO sample, PACK=1 vs PACK=0 "
                    "(pairs); all: sample, longtail and dpo; shapes: no data, the speed per "
                    "position of fixed rows (each --ctx-len, with / without resets) against "
                    "rows whose length changes every step")
    ap.add_argument("--ctx-len", default="1024", help="one or several, comma-separated "
                    "(e.g. 512,1024: each in turn in this process)")
    ap.add_argument("--peers", default="pad_longest,pad_ctx", help="the PACK=0 modes to time "
                    "against PACK=1 (SFT)")
    ap.add_argument("--micro-bsz", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per mode")
    ap.add_argument("--base-model", default="", help="a .pth; empty: a random model of "
                    "--layers x --embd (real World vocabulary)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--embd", type=int, default=768)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--json", default="", help="also write the results here")
    a = ap.parse_args(argv)
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    ctx_list = [int(c) for c in a.ctx_len.split(",") if c]
    results = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        model = Path(a.base_model) if a.base_model else d / "model.pth"
        if not a.base_model:
            from rwkvforge.demo import write_demo_model

            write_demo_model(model, a.layers, a.embd)
        if a.data == "shapes":
            r = results["shapes"] = shape_profile(model, ctx_list, a.micro_bsz, a.steps)
            print(f"[shapes] MICRO_BSZ {a.micro_bsz}, {a.steps} timed steps per mode, torch "
                  f"threads {torch.get_num_threads()}; seconds per 1000 positions:")
            for k, v in r.items():
                print(f"  {k:18s} {v['positions_s']:8.1f} positions/s  fwd "
                      f"{v['fwd_s_per_1k']:.3f}  head {v['head_s_per_1k']:.3f}  bwd "
                      f"{v['bwd_s_per_1k']:.3f}  adamw {v['opt_s_per_1k']:.3f}")
        sets = {}
        if a.data in ("sample", "both", "all"):
            sets["sample"] = ROOT / "data" / "samples" / "bsl_sft.jsonl"
        if a.data in ("longtail", "both", "all"):
            long_tail_jsonl(d / "longtail.jsonl", 600)
            sets["longtail"] = d / "longtail.jsonl"
        peers = tuple(p for p in a.peers.split(",") if p)
        for ctx_len, (name, src) in ((c, x) for c in ctx_list for x in sets.items()):
            prefix = prepare(src, d / f"{name}{ctx_len}", ctx_len)
            r = bench(prefix, model, ctx_len, a.micro_bsz, a.steps, ("pack", *peers))
            results[f"{name}@{ctx_len}"] = r
            print(f"[{name}] {r['examples']} examples, model L{r['model']['n_layer']} "
                  f"C{r['model']['n_embd']}, CTX_LEN {ctx_len}, MICRO_BSZ {a.micro_bsz}, "
                  f"{a.steps} timed steps per mode, torch threads {torch.get_num_threads()}")
            print(f"  padding share of input positions over an epoch: PACK=0 (longest) "
                  f"{r['pad_share_epoch']['pad_longest']:.1%}, PACK=1 "
                  f"{r['pad_share_epoch']['pack']:.1%}")
            for m, v in r["modes"].items():
                print(f"  {m:12s} {v['useful_tok_s']:8.1f} useful tok/s  {v['positions_s']:8.1f} "
                      f"positions/s  {v['s_per_step']:6.2f} s/step  padding "
                      f"{v['pad_share_measured']:.1%}, useful {v['useful_share']:.1%} (timed "
                      "steps)")
            for p in peers:
                print(f"  PACK=1 / PACK=0 {p}: {r[f'ratio_pack_vs_{p}']:.2f}x (padding alone, "
                      f"at equal speed per position: {r[f'padding_only_vs_{p}']:.2f}x)")
        for ctx_len in ctx_list if a.data in ("dpo", "all") else ():
            prefix = prepare(ROOT / "data" / "samples" / "bsl_dpo.jsonl", d / f"dpo{ctx_len}",
                             ctx_len, "dpo")
            r = results[f"dpo@{ctx_len}"] = bench_dpo(prefix, model, ctx_len, a.micro_bsz,
                                                      a.steps)
            print(f"[dpo] {r['examples']} pairs, model L{r['model']['n_layer']} "
                  f"C{r['model']['n_embd']}, CTX_LEN {ctx_len}, MICRO_BSZ {a.micro_bsz} "
                  f"(PACK=0: pairs, PACK=1: rows of 2 x CTX_LEN), {a.steps} timed steps per "
                  f"mode, torch threads {torch.get_num_threads()}")
            print(f"  padding share of input positions over an epoch: PACK=0 (longest) "
                  f"{r['pad_share_epoch']['pad_longest']:.1%}, PACK=1 "
                  f"{r['pad_share_epoch']['pack']:.1%}")
            for m, v in r["modes"].items():
                print(f"  {m:12s} {v['useful_tok_s']:8.1f} useful tok/s  {v['positions_s']:8.1f} "
                      f"positions/s  {v['s_per_step']:6.2f} s/step  {v['pairs_per_step']:.1f} "
                      f"pairs/step, useful {v['useful_share']:.1%} (timed steps)")
            print(f"  PACK=1 / PACK=0 pad-to-longest: {r['ratio_pack_vs_pad_longest']:.2f}x "
                  f"(padding alone, at equal speed per position: "
                  f"{r['padding_only_vs_pad_longest']:.2f}x)")
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

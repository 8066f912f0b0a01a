"""GPU acceptance: one command that proves the CUDA path on a machine with a fresh clone.

    python3 bench/gpu_acceptance.py                   # CUDA machine: everything, < 8 min (H100)
    python3 bench/gpu_acceptance.py --skip-bootstrap  # the .venv exists already
    python3 bench/gpu_acceptance.py --smoke           # CPU, tiny model, seconds (what CI runs)

Parts, in order, against one global time budget (--budget, default 480 s; a part that would
not fit is skipped and says so):
1. `./scripts/bootstrap.sh --dev` (torch for the GPU, bitsandbytes, deepspeed, fla + triton).
2. The healthcheck (`rwkvforge doctor --json`): its status and every finding that is not ok.
3. The `gpu`-marked tests (`pytest -m gpu`).
4. Training: random-weight 0.4B- and 1.5B-shaped models (BlinkDL shapes, World vocabulary) at
   ctx 1024, micro-batch 1, LoRA r 64, GRAD_CP=1, with the lora-bf16, qlora-int8 and
   qlora-nf4 profiles: one warm-up step (Triton compiles fla's kernels), then timed steps.
   Reported: tokens/s; the measured peak (torch.cuda.max_memory_allocated over the timed
   steps, stats reset after the warm-up step, so Triton's autotuning buffers are left out)
   against `rwkvforge plan`'s prediction (memory.estimate's allocated);
   the peak reserved by the allocator against RWKV-PEFT's published RTX 4090 figures
   (README, deepspeed_stage_1, same ctx / batch / rank; 1.5B: 5.6 / 4.6 / 3.9 GB).
5. Inference on the larger model in bf16: prefill tokens/s (one 1024-token prompt) and
   single-stream decode tokens/s (128 greedy steps through RWKV7.step), eager and replayed
   from a CUDA graph (model/graphs.py, what generate.Engine uses on CUDA), with the graph's
   first logits against the eager step's.

Writes the table to OUT/acceptance.json and OUT/acceptance.md (OUT: --out, default
runs/gpu-acceptance/) and prints it. With --smoke (no GPU needed): the tiny demo shape, one
profile (lora-bf16), ctx 64, one timed step, memory as peak RSS growth; bootstrap and the gpu
tests are skipped, each with its reason in the JSON.

The parent process needs only the standard library (a fresh clone has no torch before
bootstrap); every measurement runs in a child under the workspace's .venv Python.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROFILES = {"lora-bf16": "none", "qlora-int8": "int8", "qlora-nf4": "nf4"}
FULL = {"sizes": ["0.4b", "1.5b"], "profiles": list(PROFILES), "ctx_len": 1024, "steps": 3,
        "prefill": 1024, "decode": 128}
SMOKE = {"sizes": ["tiny"], "profiles": ["lora-bf16"], "ctx_len": 64, "steps": 1,
         "prefill": 64, "decode": 8}
TINY = (4, 256)  # rwkvforge.demo.TINY_SHAPE
GIB = 2**30


# ---- children (run under the workspace Python; they import torch) --------------------------------
def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _shape(size: str) -> tuple[int, int]:
    from rwkvforge import memory

    return TINY if size == "tiny" else memory.SIZES[memory.normalize_size(size)]


def child_train(a: argparse.Namespace) -> None:
    """Write a random model of `a.size`, then train each profile on it; one JSON line each."""
    import torch

    from rwkvforge import config as cfgmod
    from rwkvforge import memory
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd
    from rwkvforge.loss import LossModule, autocast_ctx, compute_dtype
    from rwkvforge.model.wkv import describe_impl
    from rwkvforge.train import build_model, make_optimizer

    dev = torch.device(a.device)
    n_layer, n_embd = _shape(a.size)
    save_pth(make_random_model_sd(n_layer, n_embd, dtype=torch.bfloat16), a.model_path)
    for profile in a.profiles.split(","):
        s = cfgmod.resolve(profile=profile, env={}, root=ROOT, cli={
            "device": a.device, "ctx_len": a.ctx_len, "micro_bsz": 1, "lora_r": 64,
            "grad_cp": 1, "head_chunk": 1024, "wkv_impl": "auto", "compile": 0}).settings
        if dev.type == "cpu":  # the math library's first-use buffers are not training memory
            with autocast_ctx(dev, s.precision):
                torch.ones(64, 64, requires_grad=True).matmul(torch.ones(64, 64)).sum().backward()
        baseline = _rss_kb("VmRSS")
        model, _, cfg = build_model(s, a.model_path, dev)
        loss_module = LossModule(model, s.head_chunk, compute_dtype(s.precision))
        opt = make_optimizer(model, s)
        params = [p for p in model.parameters() if p.requires_grad]
        g = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, cfg.vocab_size, (1, s.ctx_len), generator=g).to(dev)
                for _ in range(2))
        w = torch.full((1, s.ctx_len), 1.0 / s.ctx_len, device=dev)
        times = []
        for step in range(1 + a.steps):  # the first step compiles (Triton / autotune): untimed
            if step == 1:  # the peak of steady training: weights, adapter, Adam states, one step
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                else:
                    with open("/proc/self/clear_refs", "w") as f:
                        f.write("5")  # VmHWM := the current RSS
            t0 = time.perf_counter()
            with autocast_ctx(dev, s.precision):
                loss = loss_module(x, y, w)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if dev.type == "cuda":
            peak, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
        else:
            peak, reserved = (_rss_kb("VmHWM") - baseline) * 1024, None
        bd = memory.estimate(cfg, s, device=dev.type)
        pub = memory.RWKV_PEFT_PUBLISHED.get(a.size)
        print(json.dumps({
            "size": a.size, "profile": profile, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd,
            "wkv": describe_impl(s.wkv_impl, dev)[0], "ctx_len": s.ctx_len,
            "tokens_per_s": a.steps * s.ctx_len / sum(times[1:]), "first_step_s": times[0],
            "loss": float(loss), "peak": peak, "reserved": reserved,
            "predicted": bd.allocated, "predicted_total": bd.total,
            "ratio": peak / bd.allocated,
            "rwkv_peft_4090_gb": pub[list(PROFILES).index(profile)] if pub else None,
            "measure": "max_memory_allocated" if dev.type == "cuda" else "peak RSS growth"}),
            flush=True)
        del model, loss_module, opt, params
        if dev.type == "cuda":
            torch.cuda.empty_cache()


def child_infer(a: argparse.Namespace) -> None:
    """Prefill and single-stream decode speed of the model at a.model_path (bf16 on CUDA)."""
    import torch

    from rwkvforge.checkpoint import load_model

    dev = torch.device(a.device)
    model = load_model(a.model_path, dtype=torch.bfloat16 if dev.type == "cuda"
                       else torch.float32, device=dev)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    idx = torch.randint(0, model.emb.weight.shape[0], (1, a.prefill),
                        generator=torch.Generator().manual_seed(0)).to(dev)
    with torch.no_grad():
        model(idx[:, :16], None, last_only=True)  # warm-up (kernel compiles)
        sync()
        t0 = time.perf_counter()
        logits, state = model(idx, None, last_only=True)
        sync()
        prefill_s = time.perf_counter() - t0
        tok = logits.argmax(-1)
        logits, state = model.step(tok, state)  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(a.decode):
            logits, state = model.step(logits.argmax(-1), state)
        sync()
        decode_s = time.perf_counter() - t0
        # the same loop through a CUDA graph (what generate.Engine does); on a CPU (--smoke)
        # through graphs.ReplayApi, the recorded step re-run on the same buffers, so this code
        # has run before the first GPU meets it (its speed there means nothing)
        from rwkvforge.model.graphs import GraphedStep, ReplayApi

        gs = GraphedStep(model, api=None if dev.type == "cuda" else ReplayApi())
        g_state = [tuple(t.clone() for t in layer) for layer in state]
        e_logits, _ = model.step(tok, [tuple(t.clone() for t in layer) for layer in state])
        g_logits, g_state = gs.step(tok, g_state)  # captures, then replays
        first_diff = float((g_logits.float() - e_logits.float()).abs().max())
        sync()
        t0 = time.perf_counter()
        for _ in range(a.decode):
            g_logits, g_state = gs.step(g_logits.argmax(-1), g_state)
        sync()
        graphed = {"graph_api": "cuda" if dev.type == "cuda" else "cpu stand-in",
                   "graph_failed": gs.failed,
                   "graph_decode_tokens_per_s": a.decode / (time.perf_counter() - t0)
                   if gs.failed is None else None,
                   # the replayed step against the eager one from the same state
                   "graph_first_logits_max_diff": first_diff}
    print(json.dumps({"size": a.size, "dtype": "bf16" if dev.type == "cuda" else "fp32",
                      "prefill_tokens": a.prefill, "prefill_tokens_per_s": a.prefill / prefill_s,
                      "decode_tokens": a.decode, "decode_tokens_per_s": a.decode / decode_s,
                      **graphed}))


def _graph_line(inf: dict) -> str:
    """The CUDA-graph decode beside the eager one (on CPU: that its code ran)."""
    if "graph_failed" not in inf:
        return ""
    if inf["graph_failed"]:
        return f"; CUDA graph: capture failed ({inf['graph_failed']})"
    if inf.get("graph_api") != "cuda":
        return (f"; the graph path through its CPU stand-in ran (first logits within "
                f"{inf['graph_first_logits_max_diff']:.2e} of the eager step)")
    return (f"; through a CUDA graph {inf['graph_decode_tokens_per_s']:.1f} tokens/s "
            f"({inf['graph_decode_tokens_per_s'] / inf['decode_tokens_per_s']:.2f}x), first "
            f"logits within {inf['graph_first_logits_max_diff']:.2e} of the eager step")


def child_probe(a: argparse.Namespace) -> None:  # noqa: ARG001
    import torch

    out = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if out["cuda"]:
        p = torch.cuda.get_device_properties(0)
        out.update(gpu=p.name, capability=f"{p.major}.{p.minor}",
                   memory_gib=round(p.total_memory / GIB, 1))
    print(json.dumps(out))


# ---- parent --------------------------------------------------------------------------------------
class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


SECONDS: dict[str, float] = {}  # wall time of each part, for the report


def run(cmd: list[str], timeout: float, part: str = "") -> tuple[int | None, str, str]:
    """(exit code or None on timeout, stdout, stderr) of `cmd` in the workspace root; its
    wall time is added to SECONDS[part]."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]),
        # CPU (smoke): glibc returns freed tensors to the OS, so RSS follows live memory
        MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    t0 = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env,
                           timeout=max(1.0, timeout))
        return p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        def text(b) -> str:
            return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")
        return None, text(e.stdout), text(e.stderr)
    finally:
        SECONDS[part or "other"] = SECONDS.get(part or "other", 0.0) + time.monotonic() - t0


def json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GIB:.2f}"


def markdown(rep: dict) -> str:
    """The one table (+ the lines around it) that docs/memory.md takes."""
    env = rep.get("device") or {}
    head = [f"# GPU acceptance ({rep['mode']})", "",
            f"- device: {env.get('gpu', 'CPU')}"
            + (f" (sm_{env['capability'].replace('.', '')}, {env['memory_gib']} GiB)"
               if env.get("cuda") else "") + f", torch {env.get('torch', '?')}",
            f"- healthcheck: {rep['healthcheck'].get('status', rep['healthcheck'].get('skipped'))}",
            f"- gpu tests: {rep['gpu_tests'].get('summary', rep['gpu_tests'].get('skipped'))}",
            f"- elapsed: {rep['elapsed_s']:.0f} s of a {rep['budget_s']:.0f} s budget ("
            + ", ".join(f"{k} {v:.0f} s" for k, v in rep["seconds"].items()) + ")", ""]
    measure = rep["rows"][0]["measure"] if rep["rows"] and "measure" in rep["rows"][0] else "peak"
    lines = [f"| model | profile | WKV | tokens/s | peak GiB ({measure}) | plan GiB | peak / plan "
             "| reserved GiB | RWKV-PEFT 4090 GB | reserved / RWKV-PEFT |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['size']} | {r['profile']} | skipped: {r['skipped']} |"
                         + " |" * 7)
            continue
        pub = r.get("rwkv_peft_4090_gb")
        vs = (f"{r['reserved'] / GIB / pub:.2f}" if pub and r.get("reserved") else "-")
        lines.append(f"| {r['size']} | {r['profile']} | {r['wkv']} | {r['tokens_per_s']:.0f} | "
                     f"{_gb(r['peak'])} | {_gb(r['predicted'])} | {r['ratio']:.2f} | "
                     f"{_gb(r.get('reserved'))} | {pub if pub else '-'} | {vs} |")
    inf = rep["inference"]
    tail = ["", ("inference: skipped: " + inf["skipped"]) if "skipped" in inf else
            (f"inference ({inf['size']}, {inf['dtype']}): prefill "
             f"{inf['prefill_tokens_per_s']:.0f} tokens/s ({inf['prefill_tokens']}-token prompt), "
             "decode "
             f"{inf['decode_tokens_per_s']:.1f} tokens/s (one stream)" + _graph_line(inf))]
    skipped = [f"- {k}: {v}" for k, v in rep["skipped"].items()]
    return "\n".join(head + lines + tail + (["", "skipped:"] + skipped if skipped else [])) + "\n"


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny model, one profile")
    ap.add_argument("--skip-bootstrap", action="store_true")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for everything")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "gpu-acceptance")
    ap.add_argument("--child", choices=("train", "infer", "probe"), help=argparse.SUPPRESS)
    for flag in ("--device", "--size", "--profiles", "--model-path"):
        ap.add_argument(flag, help=argparse.SUPPRESS)
    for flag in ("--ctx-len", "--steps", "--prefill", "--decode"):
        ap.add_argument(flag, type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        {"train": child_train, "infer": child_infer, "probe": child_probe}[a.child](a)
        return 0

    t_start, budget = time.monotonic(), Budget(a.budget)
    plan = SMOKE if a.smoke else FULL
    rep: dict = {"mode": "smoke" if a.smoke else "full", "budget_s": a.budget, "skipped": {},
                 "healthcheck": {}, "gpu_tests": {}, "rows": [], "inference": {}}

    def say(msg: str) -> None:
        print(f"[gpu-acceptance] {msg}", file=sys.stderr, flush=True)

    # 1. bootstrap
    if a.smoke or a.skip_bootstrap:
        rep["skipped"]["bootstrap"] = ("smoke mode: runs in the environment it was started "
                                       "from" if a.smoke else "--skip-bootstrap")
    else:
        say("bootstrap: ./scripts/bootstrap.sh --dev")
        rc, out, err = run([str(ROOT / "scripts" / "bootstrap.sh"), "--dev"], budget.left() - 120,
                          "bootstrap")
        rep["bootstrap"] = {"exit_code": rc, "log_tail": (out + err)[-2000:]}
        if rc != 0:
            print(f"bootstrap failed (exit {rc}):\n{(out + err)[-3000:]}", file=sys.stderr)
            return 2
    venv = ROOT / ".venv" / "bin" / "python"
    py = sys.executable if a.smoke or not venv.exists() else str(venv)
    me = [py, str(Path(__file__).resolve())]

    rc, out, err = run([*me, "--child", "probe"], min(120.0, budget.left()), "probe")
    probe = (json_lines(out) or [{}])[-1]
    if rc != 0 or not probe:
        print(f"cannot import torch with {py}:\n{err[-2000:]}", file=sys.stderr)
        return 2
    rep["device"] = probe
    if not probe["cuda"] and not a.smoke:
        print("no CUDA device visible to torch: this script measures a GPU (run the healthcheck; "
              "on a CPU use --smoke)", file=sys.stderr)
        return 2
    device = "cuda" if probe["cuda"] else "cpu"

    # 2. healthcheck
    say("healthcheck: rwkvforge doctor --json")
    rc, out, err = run([py, "-m", "rwkvforge.cli", "doctor", "--json"], min(180.0, budget.left()),
                      "healthcheck")
    try:
        doc = json.loads(out)
        rep["healthcheck"] = {"status": doc["status"], "exit_code": rc, "findings": [
            {k: f[k] for k in ("id", "level", "message")} for f in doc["findings"]
            if f["level"] != "ok"]}
    except (ValueError, KeyError):
        rep["healthcheck"] = {"status": "failed to run", "exit_code": rc, "log_tail": err[-2000:]}

    # 3. the gpu-marked tests
    if device != "cuda" or budget.left() < 270:
        rep["gpu_tests"] = {"skipped": "no CUDA device: the gpu-marked tests skip themselves"
                            if device != "cuda" else "time budget (training comes first)"}
        rep["skipped"]["gpu_tests"] = rep["gpu_tests"]["skipped"]
    else:
        say("gpu tests: pytest -m gpu")
        rc, out, err = run([py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
                            "tests"], min(180.0, budget.left() - 240), "gpu_tests")
        summary = re.findall(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$",
                             out, flags=re.M)
        rep["gpu_tests"] = {"exit_code": rc, "summary": summary[-1] if summary else
                            ("timed out" if rc is None else "no summary"),
                            "log_tail": out[-1500:] if rc else ""}

    # 4. training, one child per model size (it writes the random model, then each profile)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-acceptance-"))
    made = None
    for i, size in enumerate(plan["sizes"]):
        share = (budget.left() - 60) / (len(plan["sizes"]) - i)  # keep a minute for inference
        path = tmp / f"{size}.pth"
        if share < 30:
            for p in plan["profiles"]:
                rep["rows"].append({"size": size, "profile": p, "skipped": "time budget"})
            continue
        say(f"train {size}: {', '.join(plan['profiles'])} ({share:.0f} s)")
        rc, out, err = run([*me, "--child", "train", "--device", device, "--size", size,
                            "--profiles", ",".join(plan["profiles"]), "--model-path", str(path),
                            "--ctx-len", str(plan["ctx_len"]), "--steps", str(plan["steps"])],
                           share, f"train_{size}")
        rows = json_lines(out)
        rep["rows"] += rows
        for p in plan["profiles"][len(rows):]:
            why = "time budget" if rc is None else f"failed: {err.strip().splitlines()[-1:]}"
            rep["rows"].append({"size": size, "profile": p, "skipped": why,
                                "log_tail": err[-1500:]})
        if path.exists():
            made = (size, path)

    # 5. inference on the largest model written
    if made is None or budget.left() < 10:
        rep["inference"] = {"skipped": "no model (training skipped)" if made is None
                            else "time budget"}
    else:
        say(f"inference {made[0]}")
        rc, out, err = run([*me, "--child", "infer", "--device", device, "--size", made[0],
                            "--model-path", str(made[1]), "--prefill", str(plan["prefill"]),
                            "--decode", str(plan["decode"])], budget.left(), "inference")
        res = json_lines(out)
        rep["inference"] = res[-1] if res else {"skipped": f"failed: {err[-500:]}"}
    for f in tmp.iterdir():
        f.unlink()
    tmp.rmdir()
    for part in ("inference",):
        if "skipped" in rep[part]:
            rep["skipped"][part] = rep[part]["skipped"]

    rep["elapsed_s"] = time.monotonic() - t_start
    rep["seconds"] = {k: round(v, 1) for k, v in SECONDS.items()}
    a.out.mkdir(parents=True, exist_ok=True)
    table = markdown(rep)
    write_atomic(a.out / "acceptance.json", json.dumps(rep, indent=2) + "\n")
    write_atomic(a.out / "acceptance.md", table)
    print(table, end="")
    print(f"written: {a.out / 'acceptance.json'}, {a.out / 'acceptance.md'}", file=sys.stderr)
    failed = [r for r in rep["rows"] if "skipped" in r] or "skipped" in rep["inference"]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Serving speed: `rwkvforge serve` vs `rwkvserve` (PyPI) on CPU, same model, same prompts.

    python -m venv /tmp/vbench2 && /tmp/vbench2/bin/pip install -c /tmp/c.txt torch==2.13.0 rwkvserve==0.1.0
    python bench/serve_bench.py                          # the demo model, 1 and 8 clients
    python bench/serve_bench.py --clients 8              # one client count only
    python bench/serve_bench.py --model models/base/rwkv7-0.1b-shape.pth --requests 2

Both servers run on 127.0.0.1 (started here as subprocesses, stopped afterwards; the one not
being measured sits idle), measured back to back at each client count, and each gets the same
load at each client count (--clients, default 1 and 8): that many concurrent
clients, each sending the same list of prompts to /v1/completions with the same sampling
settings. Printed per server and client count: aggregate completion
tokens/s (sum of `usage.completion_tokens` over the wall time of the run, non-streaming
requests) and median time-to-first-token (streaming requests, time until the first
non-empty text chunk), then the ratios. Known rwkvserve 0.1.0 quirks, measured around: it
ignores `max_tokens` on /v1/completions (always 100 new tokens: the handler passes
"max_new_tokens", the engine reads "max_tokens"), and its completion stream is bare JSON
objects without SSE "data: " lines. Targets (issue 26): tokens/s >= 3x at 8 clients and
>= 1.5x at 1 client; median TTFT no worse.

rwkvserve reads a model *directory* (config.json + model.pth) and loads weights with
strict=False, silently keeping random values for any key it does not know, defaults the
FFN width to 3.5 x n_embd (RWKV-7 uses 4x) and needs the vocabulary file next to the
weights. So the bench writes a config.json with every shape read from our checkpoint
(symlinking the same .pth and the World vocabulary) and then checks, in rwkvserve's venv,
that every one of its parameters was loaded from the file; a mismatch is printed and the
run stops.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

PROMPTS = [
    "The history of the city begins with a small fishing village on the river, where",
    "Write a short story about a robot who learns to paint. Once upon a time,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Процедура ОбработкаПроведения(Отказ, Режим)\n\t// движения по регистрам",
    "Q: What are the three primary colors?\nA:",
    "In a distant galaxy, the crew of the starship noticed a strange signal coming from",
    "The recipe calls for two cups of flour, one egg, and",
    "List five ways to improve sleep quality:\n1.",
]

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not ready after {timeout:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------ load
# the schema of the constrained-decoding phase: bounded, so every reply can close
SCHEMA = {"type": "object", "properties": {
    "title": {"type": "string", "maxLength": 40},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "score": {"type": "integer", "minimum": 0, "maximum": 100},
    "ok": {"type": "boolean"}},
    "required": ["title", "tags", "score", "ok"], "additionalProperties": False}


def run_chat(base: str, model: str, clients: int, requests: int, max_tokens: int,
             schema: dict | None) -> dict:
    """Chat throughput (non-streaming), with or without response_format json_schema: the
    cost of constrained decoding is the ratio of the two tokens/s."""
    import httpx

    body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0}
    if schema is not None:
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "bench", "schema": schema}}

    def client(i: int) -> tuple[int, int, int]:
        toks = n = valid = 0
        with httpx.Client(base_url=base, timeout=600) as cl:
            for j in range(requests):
                msgs = [{"role": "user", "content": PROMPTS[(i + j) % len(PROMPTS)]}]
                r = cl.post("/v1/chat/completions",
                            json={**body, "messages": msgs, "seed": i * 100 + j})
                r.raise_for_status()
                out = r.json()
                toks += int(out["usage"]["completion_tokens"])
                n += 1
                if schema is not None and out["choices"][0]["finish_reason"] == "stop":
                    try:
                        json.loads(out["choices"][0]["message"]["content"])
                        valid += 1
                    except ValueError:
                        pass
        return toks, n, valid

    client(0)  # warm-up
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(client, range(clients)))
    wall = time.perf_counter() - t0
    toks, n = sum(r[0] for r in res), sum(r[1] for r in res)
    return {"tok_s": toks / wall, "tokens": toks, "requests": n, "wall_s": wall,
            "tokens_per_request": toks / max(n, 1), "valid_json": sum(r[2] for r in res)}


def run_load(base: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    """Throughput phase (non-streaming, usage counts) then TTFT phase (streaming)."""
    import httpx

    body = {"model": model, "max_tokens": max_tokens, "temperature": 1.0, "top_p": 0.85,
            "top_k": 0}

    def throughput_client(i: int) -> tuple[int, int]:
        toks = n = 0
        with httpx.Client(base_url=base, timeout=600) as cl:
            for j in range(requests):
                p = PROMPTS[(i + j) % len(PROMPTS)]
                r = cl.post("/v1/completions", json={**body, "prompt": p, "seed": i * 100 + j})
                r.raise_for_status()
                toks += int(r.json()["usage"]["completion_tokens"])
                n += 1
        return toks, n

    def ttft_client(i: int) -> float:
        # time to the first chunk carrying non-empty text; matched on raw bytes because
        # rwkvserve 0.1.0 streams bare JSON objects without the SSE "data: " framing
        first_text = re.compile(rb'"text"\s*:\s*"[^"]')
        with httpx.Client(base_url=base, timeout=600) as cl:
            t0 = time.perf_counter()
            first = None
            with cl.stream("POST", "/v1/completions",
                           json={**body, "prompt": PROMPTS[i % len(PROMPTS)], "stream": True,
                                 "max_tokens": 16}) as r:
                r.raise_for_status()
                buf = b""
                for data in r.iter_raw():
                    buf += data
                    if first is None and first_text.search(buf):
                        first = time.perf_counter() - t0
            return first if first is not None else float("nan")

    # warm-up: one request per client shape
    throughput_client(0) if requests else None
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        res = list(ex.map(throughput_client, range(clients)))
    wall = time.perf_counter() - t0
    toks = sum(t for t, _ in res)
    n = sum(k for _, k in res)
    with ThreadPoolExecutor(clients) as ex:
        ttfts = [x for x in ex.map(ttft_client, range(clients)) if x == x]
    return {"tok_s": toks / wall, "tokens": toks, "requests": n, "wall_s": wall,
            "tokens_per_request": toks / max(n, 1),
            "ttft_median_s": statistics.median(ttfts) if ttfts else float("nan")}


# ------------------------------------------------------------------------------ servers
def start_ours(model: str, port: int, batch: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rwkvforge.serve", "--base-model", model, "--serve-port", str(port),
           "--serve-max-batch", str(batch), "--log-level", "warning", "--model-id", "bench"]
    return subprocess.Popen(cmd, env={**os.environ, "PYTHONPATH": str(ROOT / "src"),
                                      "RWKVFORGE_ROOT": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def convert_for_rwkvserve(model: str, out_dir: Path) -> Path:
    """A directory rwkvserve can read: config.json with our shapes + model.pth (symlink)."""
    from rwkvforge.checkpoint import infer_config, load_state_dict

    c = infer_config(load_state_dict(model))
    if c.d_aaa != c.d_decay:
        raise SystemExit(f"rwkvserve cannot load this model: it uses one rank for w1/w2 and "
                         f"a1/a2 (dim_att_lora) but the checkpoint has d_decay={c.d_decay}, "
                         f"d_aaa={c.d_aaa}")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model_type": "rwkv7", "n_layer": c.n_layer, "n_embd": c.n_embd,
           "vocab_size": c.vocab_size, "head_size_a": c.head_size, "dim_ffn": c.dim_ffn,
           "dim_att_lora": c.d_decay, "dim_gate_lora": c.d_gate, "dim_mv_lora": c.d_mv,
           "ctx_len": 4096}
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    from rwkvforge.tokenizer import vocab_path

    # rwkvserve also wants the World vocabulary file inside the model directory
    for name, target in (("model.pth", Path(model).resolve()),
                         ("rwkv_vocab_v20230424.txt", Path(vocab_path()).resolve())):
        link = out_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return out_dir


CHECK = r"""
import sys, torch
from rwkvserve.models.configuration import RWKVConfig
from rwkvserve.models.rwkv7.model import RWKV7Model
d = sys.argv[1]
cfg = RWKVConfig.from_pretrained(d)
m = RWKV7Model(cfg)
sd = torch.load(d + "/model.pth", map_location="cpu", weights_only=True)
res = m.load_state_dict(sd, strict=False)
print("MISSING", [k for k in res.missing_keys])
print("UNEXPECTED", [k for k in res.unexpected_keys if not k.startswith("blocks.0.att.v")])
"""


def check_rwkvserve_load(py: str, model_dir: Path) -> list[str]:
    p = subprocess.run([py, "-c", CHECK, str(model_dir)], capture_output=True, text=True)
    if p.returncode != 0:
        return [f"loader check failed: {p.stderr.strip().splitlines()[-1:]}"]
    problems = []
    for line in p.stdout.splitlines():
        kind, _, rest = line.partition(" ")
        if kind in ("MISSING", "UNEXPECTED") and rest.strip() != "[]":
            problems.append(f"{kind.lower()} keys: {rest.strip()[:400]}")
    return problems


def start_rwkvserve(exe: str, model_dir: Path, port: int, batch: int) -> subprocess.Popen:
    cmd = [exe, "--model-path", str(model_dir), "--model-name", "bench", "--device", "cpu",
           "--dtype", "fp32", "--max-batch-size", str(batch), "--host", "127.0.0.1",
           "--port", str(port)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "base" / "rwkv7-tiny-demo.pth"))
    ap.add_argument("--clients", default="1,8",
                    help="concurrent client counts, comma-separated; each server is measured at "
                         "each (its max batch: the largest)")
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=100,
                    help="100: rwkvserve 0.1.0 ignores max_tokens on /v1/completions and "
                    "always generates 100 tokens, so both do the same work at 100")
    ap.add_argument("--venv", default="/tmp/vbench2", help="venv holding rwkvserve")
    ap.add_argument("--ours-only", action="store_true",
                    help="only rwkvforge serve (plain and with a JSON schema); no rwkvserve")
    args = ap.parse_args(argv)
    if not Path(args.model).is_file():
        print(f"error: {args.model} not found (rwkvforge demo-model [--bench])", file=sys.stderr)
        return 2
    exe = Path(args.venv) / "bin" / "rwkvserve"
    if not exe.exists() and not args.ours_only:
        print(f"error: {exe} missing; install rwkvserve in a separate venv:\n  python -m venv "
              f"{args.venv} && {args.venv}/bin/pip install -c /tmp/c.txt torch==2.13.0 "
              "rwkvserve==0.1.0", file=sys.stderr)
        return 2
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        print(f"error: --clients {args.clients!r}: give client counts >= 1, e.g. 1,8",
              file=sys.stderr)
        return 2
    batch = max(counts)
    print(f"model {args.model}; {','.join(map(str, counts))} clients x {args.requests} requests, "
          f"max_tokens {args.max_tokens}; load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs", flush=True)
    results: dict[int, dict[str, dict]] = {c: {} for c in counts}

    with contextlib.ExitStack() as stack:
        servers: dict[str, tuple[str, subprocess.Popen]] = {}
        port = free_port()
        proc = start_ours(args.model, port, batch)
        stack.callback(stop, proc)
        wait_ready(f"http://127.0.0.1:{port}/health", proc)
        servers["rwkvforge serve"] = (f"http://127.0.0.1:{port}", proc)
        if not args.ours_only:
            model_dir = convert_for_rwkvserve(
                args.model, Path(stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="rwkvserve-model-"))))
            problems = check_rwkvserve_load(str(Path(args.venv) / "bin" / "python"), model_dir)
            if problems:
                print("rwkvserve does not load this checkpoint completely (it would silently "
                      "use random weights):\n  " + "\n  ".join(problems))
                return 1
            print("rwkvserve: converted (config.json + model.pth); every parameter loaded from "
                  "the file", flush=True)
            port = free_port()
            peer = start_rwkvserve(str(exe), model_dir, port, batch)
            stack.callback(stop, peer)
            servers["rwkvserve"] = (f"http://127.0.0.1:{port}", peer)
        # both servers up (idle while the other is measured); at each client count they run
        # back to back, so a change in the machine's load between counts hits both alike
        for c in counts:
            for name, (url, p) in servers.items():
                try:
                    if name == "rwkvserve" and c == counts[0]:
                        wait_ready(f"{url}/health", p)
                    results[c][name] = run_load(url, "bench", c, args.requests, args.max_tokens)
                except Exception as e:  # noqa: BLE001 - a peer's failure is reported, not raised
                    if name != "rwkvserve":
                        raise
                    err = p.stderr.read()[-2000:] if p.poll() is not None and p.stderr else ""
                    print(f"rwkvserve run failed: {e}\n{err}")
                    return 1
                print(f"{name}, {c} clients: {results[c][name]} (load average "
                      f"{os.getloadavg()[0]:.1f})", flush=True)
        url = servers["rwkvforge serve"][0]
        chat = {name: run_chat(url, "bench", batch, args.requests, args.max_tokens, schema)
                for name, schema in (("chat", None), ("chat + json_schema", SCHEMA))}
    print(f"\n{f'rwkvforge serve, {batch} clients':<30} {'tok/s (aggregate)':>18} "
          f"{'tokens/request':>15}")
    for name, r in chat.items():
        print(f"{name:<30} {r['tok_s']:>18.1f} {r['tokens_per_request']:>15.1f}"
              + (f"   valid JSON {r['valid_json']}/{r['requests']}" if "json" in name else ""))
    cost = chat["chat + json_schema"]["tok_s"] / chat["chat"]["tok_s"]
    print(f"constrained decoding: {cost:.2f}x the unconstrained tokens/s", flush=True)
    if args.ours_only:
        return 0

    print()
    print(f"{'server':<18} {'clients':>7} {'tok/s (aggregate)':>18} {'tokens/request':>15} "
          f"{'median TTFT':>12}")
    for c in counts:
        for name, r in results[c].items():
            print(f"{name:<18} {c:>7} {r['tok_s']:>18.1f} {r['tokens_per_request']:>15.1f} "
                  f"{r['ttft_median_s'] * 1000:>10.0f}ms")
    print()
    for c in counts:
        a, b = results[c]["rwkvforge serve"], results[c]["rwkvserve"]
        ratio = a["tok_s"] / b["tok_s"] if b["tok_s"] else float("inf")
        target = 1.5 if c == 1 else 3.0
        print(f"{c} clients: throughput rwkvforge / rwkvserve {ratio:.2f}x (target >= "
              f"{target:.1f}x: {'ok' if ratio >= target else 'BELOW'}); median TTFT "
              f"{a['ttft_median_s'] * 1000:.0f} ms vs {b['ttft_median_s'] * 1000:.0f} ms "
              f"({'ok' if a['ttft_median_s'] <= b['ttft_median_s'] else 'WORSE'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

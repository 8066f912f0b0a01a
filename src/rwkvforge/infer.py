"""Talk to a model: a one-shot prompt or an interactive chat, streamed to stdout.

    rwkvforge infer --prompt "What is RWKV?"                  # demo model, World chat format
    rwkvforge infer --model models/merged/my.pth              # interactive chat REPL
    rwkvforge infer --model my.pth --raw --prompt "def f(x):" # plain completion, no chat format
    rwkvforge infer --infer-backend rwkv --prompt "Hi"         # the `rwkv` pip package
    rwkvforge infer --state runs/<run> --prompt "Hi"          # a tuned initial state
    python scripts/infer_albatross.py --infer-backend albatross --prompt "Hi"  # CUDA + checkout

Back-ends (INFER_BACKEND): `builtin` (this package's model + generate.Engine, default),
`rwkv` (the pip package, RWKV_V7_ON=1, strategy "cpu fp32" / "cuda fp16"), `albatross`
(third_party/Albatross/reference, needs CUDA). Every back-end samples with the same
generate.py rules (temperature, top_p, top_k, penalties, stop strings).

`--model` takes a .pth file or a model config name under configs/model/; with neither,
BASE_MODEL from the config is used, and when that is empty the embedded demo model
(generated on first use).
REPL commands: /reset (forget the conversation), /quit (or Ctrl-D).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rwkvforge import config as cfgmod
from rwkvforge import upstream
from rwkvforge.adapter import load_with_adapter
from rwkvforge.checkpoint import DTYPES
from rwkvforge.generate import (
    CHAT_DEFAULTS, Engine, LeadingSpaceStrip, PrefixCache, TextStream, chat_params, chat_turn,
    encode_chat_prompt, resolve_device_dtype, set_fast_path)
from rwkvforge.sampling import SamplingParams, count_token, request_generator, sample_step
from rwkvforge.demo import resolve_base_model
from rwkvforge.paths import workspace_root
from rwkvforge.runtime import keep_freed_memory
from rwkvforge.state_tuning import load_state_into, read_state, run_state_note, rwkv_pip_state
from rwkvforge.tokenizer import ChatFormatError, get_tokenizer


class InferError(RuntimeError):
    """A problem the user can fix (missing file, unavailable back-end); printed, exit 2."""


# ---- back-ends: each gives forward(ids, state) -> (logits (V,), state) ---------------------------

class BuiltinRunner:
    """This package's RWKV7 through generate.Engine (prefix cache, batching)."""

    name = "builtin"

    def __init__(self, model_path: Path, tokenizer: Any, dtype: torch.dtype, device: str,
                 adapter: str = "", fast: str = "none", state: str = ""):
        model = load_with_adapter(model_path, adapter or None, dtype, device)
        load_state_into(model, state)  # a tuned initial state: every conversation starts there
        set_fast_path(model, fast, device)
        self.model = model
        self.engine = Engine(model, tokenizer, max_batch=1, device=device)

    def generate(self, ids: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cache_at: Sequence[int] = ()) -> tuple[str, str, int]:
        h = self.engine.generate(ids, params, on_text=on_text, cache_at=cache_at)
        return h.result(), h.finish_reason or "stop", h.completion_tokens


class LoopRunner:
    """A single-stream loop over an external model's forward(ids, state) -> (logits, state),
    with the same sampler and a prefix-state cache."""

    def __init__(self, name: str, forward: Callable[[list[int], Any], tuple[torch.Tensor, Any]],
                 tokenizer: Any, chunk: int = 256):
        self.name = name
        self.forward = forward
        self.tok = tokenizer
        self.chunk = chunk
        self.cache = PrefixCache()

    def generate(self, ids: list[int], params: SamplingParams, on_text: Callable[[str], None],
                 cache_at: Sequence[int] = ()) -> tuple[str, str, int]:
        ids = list(ids) or [0]
        n, state, logits = self.cache.lookup(ids)
        points = sorted({c for c in cache_at if n < c <= len(ids)} | {len(ids)})
        pos = n
        for end in points:
            while pos < end:
                piece = ids[pos: min(end, pos + self.chunk)]
                logits, state = self.forward(piece, state)
                pos += len(piece)
            self.cache.put(ids[:end], state, logits)
        V = logits.shape[-1]
        occ, seen = torch.zeros(1, V), torch.zeros(1, V, dtype=torch.bool)
        gen = request_generator(params.seed)
        ts = TextStream(params.stop)
        n_out, reason = 0, "length"
        while n_out < params.max_tokens:
            tok = sample_step(logits.reshape(1, -1), [params], [gen], occ, seen)[0]
            if tok in params.token_stop:
                reason = "stop"
                break
            n_out += 1
            count_token(params, tok, occ[0], seen[0], self.tok)
            text, stopped = ts.feed(self.tok.decode_bytes([tok]))
            if text:
                on_text(text)
            if stopped:
                reason = "stop"
                break
            logits, state = self.forward([tok], state)
        tail = ts.finish()
        if tail:
            on_text(tail)
        return ts.text, reason, n_out


def make_runner(backend: str, model_path: Path, tokenizer: Any, *, device: str, dtype: str,
                adapter: str = "", root: Path | None = None, fast: str = "none",
                state: str = ""):
    if adapter and backend != "builtin":
        raise InferError("--adapter works with INFER_BACKEND=builtin; merge it first "
                         "(rwkvforge merge) to use another back-end")
    if state and backend == "albatross":
        raise InferError("--state works with INFER_BACKEND=builtin or rwkv")
    if backend == "builtin":
        return BuiltinRunner(model_path, tokenizer, DTYPES[dtype], device, adapter, fast, state)
    try:
        if backend == "rwkv":
            forward = upstream.rwkv_pip_forward(model_path, device, dtype)
            if state:  # the state in rwkv pip's own layout, a fresh copy per conversation
                forward = _from_state(forward, read_state(state), device, dtype)
            return LoopRunner("rwkv", forward, tokenizer)
        if backend == "albatross":
            return LoopRunner("albatross",
                              upstream.albatross_forward(model_path, root or workspace_root()),
                              tokenizer)
    except upstream.UpstreamError as e:
        raise InferError(str(e)) from None
    raise InferError(f"unknown INFER_BACKEND {backend!r}: use builtin, rwkv or albatross")


def _from_state(forward: Callable, wkv: torch.Tensor, device: str, dtype: str) -> Callable:
    """rwkv pip's forward, starting from the tuned state `wkv` (L,H,N,N) where it would start
    from None (token-shift vectors in the weights' dtype, WKV states fp32)."""
    shift_dtype = DTYPES.get(dtype, torch.float32)
    start = [t.to(device, shift_dtype if t.dim() == 1 else torch.float32)
             for t in rwkv_pip_state(wkv, wkv.shape[1] * wkv.shape[2])]

    def fwd(ids: list[int], state: Any) -> tuple[torch.Tensor, Any]:
        return forward(ids, [t.clone() for t in start] if state is None else state)
    return fwd


# ---- CLI -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="rwkvforge infer", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    cfgmod.add_settings_flags(ap, only=["base_model", "infer_backend", "infer_fast", "device",
                                        "seed"])
    ap.add_argument("--prompt", help="one-shot prompt; without it: interactive chat")
    ap.add_argument("--system", default="", help="system message for chat")
    ap.add_argument("--raw", action="store_true",
                    help="send --prompt as plain text (completion), not as a chat turn")
    ap.add_argument("--adapter", default="", help="LoRA adapter folder (PEFT layout) "
                    "merged into the base model in memory")
    ap.add_argument("--state", default="", metavar="PATH",
                    help="a tuned initial state (state tuning: a run folder, its state/ or a "
                    "state .pth) each conversation starts from")
    ap.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                    help="weight dtype: auto = fp16 on CUDA, fp32 on CPU")
    ap.add_argument("--max-tokens", type=int, default=256,
                    help="the longest answer, in tokens (default %(default)s)")
    # sampling defaults: the chat ones (generate.CHAT_DEFAULTS), also for --raw
    d = CHAT_DEFAULTS
    ap.add_argument("--temperature", type=float, default=d.temperature,
                    help="sampling temperature (default %(default)s; 0 = greedy)")
    ap.add_argument("--top-p", type=float, default=d.top_p,
                    help="nucleus cut (default %(default)s, RWKV's chat default; 1 = off)")
    ap.add_argument("--top-k", type=int, default=d.top_k,
                    help="keep the k likeliest tokens (default %(default)s; 0 = off)")
    ap.add_argument("--presence-penalty", type=float, default=d.alpha_presence,
                    help="subtracted once from a token already in the answer "
                    "(default %(default)s)")
    ap.add_argument("--frequency-penalty", type=float, default=d.alpha_frequency,
                    help="subtracted per (decaying) occurrence in the answer "
                    "(default %(default)s)")
    ap.add_argument("--penalty-decay", type=float, default=d.alpha_decay,
                    help="per-token decay of the occurrence counts (default %(default)s)")
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    return ap


def sampling_params(args: argparse.Namespace, chat: bool, seed: int | None) -> SamplingParams:
    """The sampling flags -> SamplingParams; a chat reply also ends at its turn's end
    (generate.chat_params)."""
    fields = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                  alpha_presence=args.presence_penalty, alpha_frequency=args.frequency_penalty,
                  alpha_decay=args.penalty_decay, max_tokens=args.max_tokens, seed=seed)
    if chat:
        return chat_params(args.stop, **fields)
    return SamplingParams(stop=tuple(args.stop), **fields)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    keep_freed_memory()  # inference: reuse freed activation memory (see runtime.py)
    try:
        res = cfgmod.resolve_from_args(args)
    except cfgmod.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    s = res.settings
    try:
        device, dtype = resolve_device_dtype(s.device, args.dtype)
        path, is_demo = resolve_base_model(s.base_model, res.sources["BASE_MODEL"],
                                           say=lambda m: print(f"[rwkvforge] {m}",
                                                               file=sys.stderr),
                                           adapter=args.adapter or None)
        if is_demo:
            print(f"[rwkvforge] using the demo model {path} (random weights: output is "
                  "gibberish; set BASE_MODEL for a real model)", file=sys.stderr)
        if args.adapter and not args.state:
            note = run_state_note(args.adapter, "this answers from base + adapter alone")
            if note:
                print(f"[rwkvforge] {note}", file=sys.stderr)
        tok = get_tokenizer()
        runner = make_runner(s.infer_backend, path, tok, device=device, dtype=dtype,
                             adapter=args.adapter, fast=s.infer_fast, state=args.state)
    except (InferError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    def params(chat: bool) -> SamplingParams:
        return sampling_params(args, chat, s.seed).validate(tok.vocab_size)

    def out(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        if args.prompt is not None:
            if args.raw:
                runner.generate(tok.encode(args.prompt), params(False), out)
            else:
                ids, ends = encode_chat_prompt(chat_turn(args.prompt, args.system), tok)
                runner.generate(ids, params(True), lambda t, f=LeadingSpaceStrip(): out(f(t)),
                                cache_at=ends)
            out("\n")
            return 0
        return repl(runner, tok, args.system, params)
    except (ValueError, ChatFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def repl(runner: Any, tok: Any, system: str, params: Callable[[bool], SamplingParams],
         read: Callable[[str], str] = input) -> int:
    """Interactive World-format chat. Earlier turns are prefilled once (prefix cache)."""
    print(f"[rwkvforge] chat with {runner.name} back-end; /reset clears, /quit exits",
          file=sys.stderr)
    msgs: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    while True:
        try:
            line = read("User: ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/quit", "/exit"):
            return 0
        if cmd == "/reset":
            msgs = msgs[:1] if system else []
            print("[conversation cleared]")
            continue
        if any("\ud800" <= ch <= "\udfff" for ch in line):
            print("[that line is not valid UTF-8 (is the terminal set to UTF-8?); ignored]",
                  file=sys.stderr)
            continue
        try:
            ids, ends = encode_chat_prompt(msgs + [{"role": "user", "content": line}], tok)
        except (ValueError, ChatFormatError) as e:
            print(f"[{e}; line ignored]", file=sys.stderr)
            continue
        sys.stdout.write("Assistant: ")
        strip = LeadingSpaceStrip()

        def out(t: str) -> None:
            sys.stdout.write(strip(t))
            sys.stdout.flush()

        try:
            text, _, _ = runner.generate(ids, params(True), out, cache_at=ends)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            print("\n[reply stopped; that turn is dropped]", file=sys.stderr)
            continue
        sys.stdout.write("\n\n")
        reply = text.strip() or "..."
        msgs += [{"role": "user", "content": line}, {"role": "assistant", "content": reply}]


if __name__ == "__main__":
    raise SystemExit(main())

"""The `rwkvforge` command: one subcommand per stage. It only dispatches; each stage module
parses its own arguments in `main(argv)`, so `rwkvforge X ...` == `python -m rwkvforge.Y ...`.

    rwkvforge --help
    rwkvforge config show --profile qlora-nf4
"""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module, one-line help)
STAGES: dict[str, tuple[str, str]] = {
    "doctor": ("rwkvforge.doctor", "check the environment (GPU, torch, bitsandbytes, ...)"),
    "config": ("rwkvforge.config", "show / check the resolved settings"),
    "demo-model": ("rwkvforge.demo", "write the embedded random-weight demo models"),
    "prepare": ("rwkvforge.data.prepare", "JSONL -> binidx / SFT / DPO training data"),
    "train": ("rwkvforge.train", "LoRA / QLoRA training run"),
    "merge": ("rwkvforge.merge", "merge an adapter into its base model, verified"),
    "export": ("rwkvforge.export", "export to GGUF (llama.cpp / Ollama), Hugging Face or ai00, verified"),
    "eval": ("rwkvforge.evaluate", "loss / perplexity and prompt checks, base vs tuned"),
    "infer": ("rwkvforge.infer", "one-shot prompt or interactive chat"),
    "serve": ("rwkvforge.serve", "OpenAI-compatible HTTP server"),
    "plan": ("rwkvforge.memory", "predict peak memory and pick a config that fits"),
    "dashboard": ("rwkvforge.dashboard.launch", "bilingual web dashboard"),
}


def usage() -> str:
    w = max(len(k) for k in STAGES)
    lines = ["usage: rwkvforge <command> [options]", "", "commands:"]
    lines += [f"  {k:<{w}}  {h}" for k, (_, h) in STAGES.items()]
    lines += ["", "Run `rwkvforge <command> --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from rwkvforge import __version__

        print(__version__)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in STAGES:
        import difflib

        close = difflib.get_close_matches(cmd, list(STAGES), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        print(f"rwkvforge: unknown command '{cmd}'.{hint}\n\n{usage()}", file=sys.stderr)
        return 2
    try:
        return int(importlib.import_module(STAGES[cmd][0]).main(rest) or 0)
    except KeyboardInterrupt:  # Ctrl-C in a stage that does not handle it itself (train does)
        print(f"\nrwkvforge {cmd}: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which stopped reading
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error
        return 141


if __name__ == "__main__":
    raise SystemExit(main())

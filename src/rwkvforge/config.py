"""Settings: the .env grammar, the typed schema, precedence and the resolved-config JSON.

Purpose: one place that turns `configs/workspace.env` < `configs/model/<name>.env` <
`configs/profile/<name>.env` < environment variables < CLI flags into one typed `Settings`
object, remembering where every value came from.

    rwkvforge config show --model rwkv7-tiny --profile qlora-nf4
    python -m rwkvforge.config show --json

Grammar of a `.env` file (also `source`-able by bash):
    # a comment
    KEY=value            # trailing comment after whitespace
    KEY="value with spaces"   or   KEY='literal'
No `export`, no `$VAR` / `$(...)` / backticks, no `;`, `|`, `&`: values are literal, and
anything that looks like shell is an error naming the file, line and key.

This module knows nothing of torch.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

from rwkvforge.paths import workspace_root

KEY_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")
SHELL_CHARS = re.compile(r"[$`;|&<>(){}\\]")


# The allowed values of the settings other modules check too: defined here once.
DATA_TYPES = ("auto", "text", "sft", "dpo")
QUANTS = ("none", "nf4", "int8")
PRECISIONS = ("fp32", "bf16", "fp16")
OPTIMIZERS = ("adamw", "adamw8bit")
LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")
TRAIN_PARTS = ("ln", "time", "emb", "head")
TRAIN_TYPES = ("lora", "state", "lora+state")


class ConfigError(ValueError):
    """A configuration problem a person can fix; the message says where and how."""


def _f(default: Any, help: str, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, group: str = "workspace", secret: bool = False) -> Any:
    meta = {"help": help, "choices": choices, "min": lo, "max": hi, "group": group,
            "secret": secret}
    return field(default=default, metadata=meta)


@dataclass
class Settings:
    """Every knob of the workspace. KEY in a .env file = the field name in upper case;
    CLI flag = `--field-name`."""

    # ---- workspace -------------------------------------------------------------------------------
    base_model: str = _f("", "Base model .pth (BlinkDL layout). Empty: the embedded demo "
                         "model under models/base/ is generated and used.")
    data_file: str = _f("", "Training JSONL, or a folder of text files (DATA_TYPE=text: one "
                        "file = one document). Empty: the shipped sample data/samples/.")
    data_glob: str = _f("**/*", "Which files of a DATA_FILE folder to read, e.g. **/*.bsl "
                        "(hidden files and folders are skipped).")
    data_type: str = _f("auto", "How DATA_FILE is read: auto (from the records' keys; a file "
                        "mixing kinds is refused), text (binidx, plain LM), sft (chat, prompt "
                        "masked out of the loss) or dpo (preference pairs).",
                        choices=DATA_TYPES)
    data_prefix: str = _f("", "Prepared data prefix (<prefix>.bin/.idx). Empty: "
                          "data/processed/<name of DATA_FILE>.")
    val_fraction: float = _f(0.05, "Share of documents held out for validation.",
                             lo=0.0, hi=0.9)
    runs_dir: str = _f("runs", "Folder holding one sub-folder per run.")
    run_name: str = _f("", "Run folder name. Empty: <model>-<profile>-<timestamp>.")
    trainer: str = _f("builtin", "builtin (this package) or rwkv-peft "
                      "(third_party/RWKV-PEFT's trainer, arguments mapped from this config).",
                      choices=("builtin", "rwkv-peft"))
    infer_backend: str = _f("builtin", "Inference engine: builtin, rwkv (pip package) or "
                            "albatross (third_party/Albatross, CUDA only).",
                            choices=("builtin", "rwkv", "albatross"))
    infer_fast: str = _f("bf16", "CPU fast path of the builtin engine (infer, serve, the "
                         "dashboard's chat, eval's prompt checks): bf16 (bf16 weights: each "
                         "decode layer one C call for up to 16 streams, bf16 GEMMs above that "
                         "and for prefill; ~0.3% logit error, within the accuracy gate of "
                         "docs/inference.md), int8 (int8 decode GEMVs, bf16 prefill: ~2% logit "
                         "error) or none (exact fp32 maths).",
                         choices=("none", "int8", "bf16"))
    torch_spec: str = _f("", "pip requirement for torch chosen by bootstrap "
                         "(e.g. torch==2.13.0). Empty: picked from the GPU.")
    torch_index_url: str = _f("", "pip index for torch (e.g. "
                              "https://download.pytorch.org/whl/cu129). Empty: picked from the "
                              "GPU.")
    device: str = _f("auto", "auto (CUDA when present, else CPU), cpu or cuda.",
                     choices=("auto", "cpu", "cuda"))
    seed: int = _f(42, "Random seed for data order, init and sampling.", lo=0, hi=2**32 - 1)
    wandb_project: str = _f("", "Weights & Biases project; empty disables W&B logging.")
    serve_host: str = _f("127.0.0.1", "Server bind address. 0.0.0.0 exposes the model to "
                         "your network: set SERVE_API_KEY first.")
    serve_port: int = _f(8000, "OpenAI-compatible server port.", lo=1, hi=65535)
    serve_api_key: str = _f("", "Bearer key required by the server (printable ASCII, no "
                            "spaces); empty: no auth "
                            "(fine on 127.0.0.1). A secret: run records, logs and W&B only "
                            "say whether it is set.", secret=True)
    serve_max_batch: int = _f(16, "Streams decoded together by the server: more = higher "
                              "throughput, more memory.", lo=1, hi=1024)
    serve_max_queue: int = _f(64, "Waiting requests before the server answers 429.",
                              lo=1, hi=100000)
    serve_max_tokens: int = _f(2048, "Cap on max_tokens per request.", lo=1)
    dashboard_port: int = _f(8501, "Dashboard port (binds 127.0.0.1 unless `rwkvforge "
                             "dashboard --address` says otherwise).", lo=1, hi=65535)
    vram: str = _f("", "Memory budget for the planner, e.g. 12GiB. Empty: the detected "
                   "GPU's memory (or system RAM on CPU).")

    # ---- model -----------------------------------------------------------------------------------
    model_name: str = _f("rwkv7-tiny", "Display name of the model (set by model/*.env).",
                         group="model")
    ctx_len: int = _f(512, "Training context in tokens: longer = more memory, better "
                      "long-range learning.", lo=16, hi=1 << 20, group="model")
    wkv_impl: str = _f("auto", "WKV kernel: auto (fla on CUDA, native on CPU when a C "
                       "compiler is present, chunked otherwise), ref (sequential, slow, "
                       "exact), chunked (matmul form), native (C, CPU) or fla.",
                       choices=("auto", "ref", "chunked", "native", "fla"), group="model")

    # ---- profile: adapter + precision ------------------------------------------------------------
    profile: str = _f("lora-bf16", "Profile name (set by profile/*.env).", group="profile")
    quant: str = _f("none", "Base weights: none, nf4 (4-bit, least memory, slower) or int8.",
                    choices=QUANTS, group="profile")
    precision: str = _f("bf16", "Compute dtype: bf16 (fast on modern GPUs / AMX CPUs), "
                        "fp32 (exact, slow) or fp16 (inference only: training refuses it, "
                        "no loss scaling).", choices=PRECISIONS,
                        group="profile")
    lora_r: int = _f(32, "LoRA rank: higher = more capacity, more memory.", lo=1, hi=4096,
                     group="profile")
    lora_alpha: float = _f(32.0, "LoRA scale numerator (scale = alpha / r).", lo=0.0,
                           group="profile")
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input: regularises small datasets.",
                             lo=0.0, hi=0.9, group="profile")
    lora_targets: str = _f(",".join(LORA_TARGETS), "Comma list of block Linears that get "
                           "adapters.", group="profile")
    train_parts: str = _f("", "Extra full-trained parts, comma list of: ln (layer norms), "
                          "time (time-mix / decay parameters), emb, head.", group="profile")
    train_type: str = _f("lora", "What trains: lora (the adapters set here), state (only "
                         "the initial WKV state of every layer, (heads, N, N) each, every "
                         "weight frozen: RWKV-PEFT's state tuning; the run writes state/) or "
                         "lora+state (both).", choices=TRAIN_TYPES, group="profile")
    state_lr: float = _f(0.0, "Peak learning rate of the tuned initial state (TRAIN_TYPE="
                         "state / lora+state); 0 = LR. The schedule scales it like LR.",
                         lo=0.0, hi=100.0, group="profile")
    peft_init: str = _f("default", "Adapter init: default (B=0) or pissa (principal "
                        "singular vectors: faster start, slower setup).",
                        choices=("default", "pissa"), group="profile")
    use_dora: bool = _f(False, "DoRA (weight-decomposed LoRA): a bit better, ~20% slower.",
                        group="profile")

    # ---- training --------------------------------------------------------------------------------
    micro_bsz: int = _f(1, "Sequences per forward pass: more = faster, more memory.", lo=1,
                        group="train")
    grad_accum: int = _f(1, "Micro-batches per optimiser step (effective batch = "
                         "MICRO_BSZ x GRAD_ACCUM x NUM_GPUS x NUM_NODES).", lo=1, group="train")
    pack: bool = _f(False, "DATA_TYPE=sft: fill each CTX_LEN row with whole examples instead "
                    "of one padded example per row (far less padding on short examples: "
                    "more trained tokens per second). The state and token shift restart at "
                    "every example, so the loss is the examples' own. DATA_TYPE=dpo: rows of "
                    "2 x CTX_LEN hold whole pairs, each answer its own document.",
                    group="train")
    lr: float = _f(1e-4, "Peak learning rate.", lo=0.0, hi=1.0, group="train")
    lr_final: float = _f(1e-5, "Learning rate at the end of the schedule.", lo=0.0, hi=1.0,
                         group="train")
    lr_schedule: str = _f("cosine", "cosine, wsd (warmup-stable-decay) or constant.",
                          choices=("cosine", "wsd", "constant"), group="train")
    warmup_steps: int = _f(10, "Linear warm-up steps.", lo=0, group="train")
    max_steps: int = _f(60, "Optimiser steps to run (0 = EPOCHS over the data).", lo=0,
                        group="train")
    epochs: int = _f(1, "Passes over the data when MAX_STEPS=0.", lo=1, group="train")
    weight_decay: float = _f(0.0, "AdamW weight decay on adapter weights.", lo=0.0,
                             group="train")
    grad_clip: float = _f(1.0, "Clip gradient norm (0 = off).", lo=0.0, group="train")
    grad_cp: bool = _f(False, "Recompute activations: ~30% slower, far less memory.",
                       group="train")
    compile: bool = _f(False, "torch.compile each block for training: fuses the "
                       "element-wise work around the matmuls and the WKV kernel (20-28% "
                       "less time per step in in-process A/B runs on a CPU); the first step "
                       "waits for the compile (about a minute).", group="train")
    optimizer: str = _f("adamw", "adamw (fp32 states) or adamw8bit (bitsandbytes, ~4x less "
                        "optimiser memory).", choices=OPTIMIZERS, group="train")
    head_chunk: int = _f(1024, "Tokens per chunk of head + cross-entropy: smaller = less "
                         "memory for the 65536-way logits.", lo=16, group="train")
    save_every: int = _f(20, "Checkpoint every N steps (0 = only at the end).", lo=0,
                         group="train")
    keep_checkpoints: int = _f(0, "Keep only the newest N checkpoints of a run (0 = keep "
                               "all); the newest complete one is never removed.", lo=0,
                               group="train")
    eval_every: int = _f(0, "Validation loss every N steps (0 = only at the end).", lo=0,
                         group="train")
    log_every: int = _f(1, "Metrics line every N steps.", lo=1, group="train")
    deepspeed_stage: int = _f(0, "0 = plain torch; 2 / 3 = DeepSpeed ZeRO stage.",
                              choices=(0, 1, 2, 3), group="train")
    deepspeed_offload: bool = _f(False, "ZeRO CPU offload of optimiser states: less VRAM, "
                                 "slower steps.", group="train")
    num_gpus: int = _f(1, "Processes for DeepSpeed (one per GPU) on each node.", lo=1,
                       group="train")
    num_nodes: int = _f(1, "Machines in the run (NUM_NODES > 1 needs DEEPSPEED_STAGE 2 / 3): "
                        "run `rwkvforge train` on each with its own NODE_RANK, or once with "
                        "HOSTFILE. RUNS_DIR must be the same shared folder on every node "
                        "(docs/multinode.md).", lo=1, hi=4096, group="train")
    node_rank: int = _f(0, "This machine's index, 0 ... NUM_NODES-1; node 0 is the one at "
                        "MASTER_ADDR and writes the run folder.", lo=0, group="train")
    master_addr: str = _f("", "NUM_NODES > 1: the address of node 0 that every node can reach "
                          "(e.g. 10.0.0.1). Empty: required with NUM_NODES > 1; with HOSTFILE "
                          "the first host of the file.", group="train")
    master_port: int = _f(29500, "NUM_NODES > 1: TCP port on MASTER_ADDR for the rendezvous "
                          "(torch.distributed's store); open it to the other nodes (gloo / "
                          "NCCL then also connect between all nodes on ephemeral ports).",
                          lo=1, hi=65535, group="train")
    hostfile: str = _f("", "DeepSpeed hostfile (one `host slots=N` line per node): start all "
                       "nodes from this one with DeepSpeed's launcher over pdsh / ssh "
                       "(passwordless ssh, the same paths on every node). Empty: start "
                       "`rwkvforge train` on each node yourself.", group="train")
    dpo_beta: float = _f(0.1, "DATA_TYPE=dpo: the DPO temperature beta (larger = stay closer "
                         "to the starting model).", lo=1e-6, hi=100.0, group="train")
    dpo_ftx: float = _f(0.0, "DATA_TYPE=dpo: weight of an added cross-entropy loss on the "
                        "chosen answers (0 = pure DPO; e.g. 1.0 keeps the chosen answers "
                        "likely).", lo=0.0, hi=100.0, group="train")
    dpo_loss: str = _f("sigmoid", "DATA_TYPE=dpo: sigmoid (DPO: rewards against the starting "
                       "model's log-probs, computed once) or simpo (SimPO: reference-free, "
                       "length-normalised rewards, no reference pass; use DPO_BETA around 2).",
                       choices=("sigmoid", "simpo"), group="train")
    simpo_gamma: float = _f(0.5, "DPO_LOSS=simpo: the reward margin gamma the chosen answer "
                            "should win by.", lo=0.0, hi=100.0, group="train")


FIELD_BY_KEY = {f.name.upper(): f for f in fields(Settings)}
# settings whose value never reaches a run record, a log, W&B or the dashboard
SECRETS = tuple(f.name for f in fields(Settings) if f.metadata.get("secret"))
SET, NOT_SET = "(set)", ""


def public_settings(settings: Settings) -> dict[str, Any]:
    """The settings as a dict with every secret shown only as set / not set."""
    out = dataclasses.asdict(settings)
    for name in SECRETS:
        out[name] = SET if out[name] else NOT_SET
    return out


@dataclass
class Resolved:
    """Resolved settings plus, for every key, where its value came from."""

    settings: Settings
    sources: dict[str, str]
    files: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": public_settings(self.settings),
            "sources": dict(self.sources),
            "files": list(self.files),
        }


def suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]}?" if close else ""


def _strip_comment(raw: str) -> str:
    """Remove a trailing ` # comment` that is outside quotes."""
    quote = None
    for i, ch in enumerate(raw):
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or raw[i - 1] in " \t"):
            return raw[:i].rstrip()
    return raw.rstrip()


def parse_env_text(text: str, origin: str) -> dict[str, tuple[str, int]]:
    """Parse .env text into {KEY: (raw value, line number)}; raise ConfigError on bad syntax."""
    out: dict[str, tuple[str, int]] = {}
    for lineno, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        where = f"{origin}:{lineno}"
        if s.startswith("export "):
            raise ConfigError(f"{where}: 'export' is not allowed; write plain KEY=value.")
        if "=" not in s:
            raise ConfigError(f"{where}: expected KEY=value, got {s!r}.")
        key, _, rest = s.partition("=")
        if key != key.strip() or not KEY_RE.match(key):
            raise ConfigError(f"{where}: bad key {key!r}: keys are UPPER_CASE with no spaces "
                              "around '='.")
        val = _strip_comment(rest)
        if val and val[0] in "\"'":
            q = val[0]
            if len(val) < 2 or not val.endswith(q) or q in val[1:-1]:
                raise ConfigError(f"{where}: key {key}: unbalanced quotes in {val!r}.")
            if q == '"' and SHELL_CHARS.search(val[1:-1]):
                raise ConfigError(f"{where}: key {key}: shell syntax in {val!r}; values are "
                                  "literal (no $VAR, $(...), backticks). Use single quotes "
                                  "for a literal value.")
            val = val[1:-1]
        else:
            if SHELL_CHARS.search(val) or " " in val or "\t" in val:
                raise ConfigError(f"{where}: key {key}: shell syntax or unquoted space in "
                                  f"{val!r}; values are literal. Quote values with spaces; "
                                  "no $VAR, $(...), ;, |, &.")
        if key in out:
            raise ConfigError(f"{where}: key {key} repeated (first on line {out[key][1]}).")
        out[key] = (val, lineno)
    return out


def coerce(key: str, raw: str, where: str) -> Any:
    """Convert a raw string to the field's type, checking choices and range."""
    if key not in FIELD_BY_KEY:
        raise ConfigError(f"{where}: unknown key {key}.{suggest(key, FIELD_BY_KEY)}")
    f = FIELD_BY_KEY[key]
    meta = f.metadata
    typ = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if typ == "bool":
            low = raw.strip().lower()
            if low in ("1", "true", "yes", "on"):
                val: Any = True
            elif low in ("0", "false", "no", "off", ""):
                val = False
            else:
                raise ValueError("expected 0/1/true/false")
        elif typ == "int":
            val = int(raw)
        elif typ == "float":
            val = float(raw)
            if not math.isfinite(val):
                raise ValueError("must be a finite number")
        else:
            val = raw
    except ValueError as e:
        raise ConfigError(f"{where}: key {key}: {raw!r} is not a valid {typ} ({e}).") from None
    if meta.get("choices") is not None and val not in meta["choices"]:
        opts = ", ".join(str(c) for c in meta["choices"])
        raise ConfigError(f"{where}: key {key}: {raw!r} is not one of {opts}."
                          f"{suggest(str(val), [str(c) for c in meta['choices']])}")
    if key == "SERVE_API_KEY" and not all(33 <= ord(c) <= 126 for c in val):
        # HTTP header values are bytes that servers read as latin-1 and most clients only
        # send as ASCII: such a key could never authenticate (every request would get 401)
        raise ConfigError(f"{where}: key {key}: the key must be printable ASCII without "
                          "spaces (letters, digits, punctuation): HTTP clients cannot send "
                          "other characters in the Authorization header, so no request "
                          "could ever authenticate. Pick another key, e.g. the output of "
                          "`openssl rand -hex 24`.")
    if meta.get("min") is not None and val < meta["min"]:
        raise ConfigError(f"{where}: key {key}: {val} is below the minimum {meta['min']}.")
    if meta.get("max") is not None and val > meta["max"]:
        raise ConfigError(f"{where}: key {key}: {val} is above the maximum {meta['max']}.")
    return val


def load_env_file(path: Path) -> dict[str, tuple[Any, str]]:
    """Parse and validate one .env file: {KEY: (typed value, 'file:line')}."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8.") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read it ({e.strerror or e}).") from None
    text = text.removeprefix("\ufeff")  # a byte-order mark (Windows Notepad's "UTF-8 BOM")
    out = {}
    for key, (raw, lineno) in parse_env_text(text, str(path)).items():
        where = f"{path}:{lineno}"
        out[key] = (coerce(key, raw, where), where)
    return out


def _named_env(root: Path, kind: str, name: str) -> Path:
    folder = root / "configs" / kind
    if name.endswith(".env") or "/" in name:
        p = Path(name).expanduser()
        p = p if p.is_absolute() else (Path.cwd() / p)
        if not p.is_file():
            raise ConfigError(f"{kind} file {p} not found (a name such as "
                              f"{next(iter(sorted(x.stem for x in folder.glob('*.env'))), '?')} "
                              f"means {folder}/<name>.env).")
        return p
    p = folder / f"{name}.env"
    if not p.exists():
        known = sorted(x.stem for x in folder.glob("*.env"))
        raise ConfigError(f"no {kind} named {name!r} in {folder}.{suggest(name, known)} "
                          f"Available: {', '.join(known) or 'none'}.")
    return p


def resolve(model: str | None = None, profile: str | None = None,
            cli: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
            root: Path | None = None) -> Resolved:
    """Resolve settings: defaults < workspace.env < model < profile < environment < cli.

    `model` / `profile` are names under configs/ (or paths to .env files); when None, the
    MODEL / PROFILE named by the workspace file or environment (RWKVFORGE_MODEL /
    RWKVFORGE_PROFILE) is used, if any. `cli` maps field names (lower case) to values that
    were given on the command line (None values are ignored).
    """
    root = root or workspace_root()
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources: dict[str, str] = {f.name.upper(): "default" for f in fields(Settings)}
    files: list[str] = []

    def apply(layer: Mapping[str, tuple[Any, str]]) -> None:
        for k, (v, where) in layer.items():
            values[k] = v
            sources[k] = where

    ws = root / "configs" / "workspace.env"
    if not ws.exists():
        ws = root / "configs" / "workspace.env.example"
    if ws.exists():
        apply(load_env_file(ws))
        files.append(str(ws))
    model = model or env.get("RWKVFORGE_MODEL") or None
    profile = profile or env.get("RWKVFORGE_PROFILE") or None
    if model:
        p = _named_env(root, "model", model)
        apply(load_env_file(p))
        files.append(str(p))
    if profile:
        p = _named_env(root, "profile", profile)
        layer = load_env_file(p)
        if "PROFILE" not in layer:  # a profile file of one's own: its name labels the runs
            layer = {"PROFILE": (p.name.removesuffix(".env"), f"{p} (its name)"), **layer}
        apply(layer)
        files.append(str(p))
    for key in FIELD_BY_KEY:
        if key in env:
            values[key] = coerce(key, env[key], f"environment variable {key}")
            sources[key] = "env"
    for name, v in (cli or {}).items():
        if v is None:
            continue
        key = name.upper().replace("-", "_")
        values[key] = coerce(key, str(int(v) if isinstance(v, bool) else v),
                             f"command-line flag --{name.lower().replace('_', '-')}")
        sources[key] = "cli"
    settings = Settings(**{k.lower(): v for k, v in values.items()})
    return Resolved(settings=settings, sources=sources, files=files)


def add_settings_flags(parser: argparse.ArgumentParser, only: Iterable[str] | None = None,
                       hide: tuple[str, ...] = ()) -> None:
    """Add `--model`, `--profile` and one `--field-name` flag per setting (default None, so
    only flags given on the command line override lower layers). Settings whose name starts
    with a `hide` prefix are accepted but left out of --help."""
    parser.add_argument("--model", help="model config name under configs/model/ or a .env path")
    parser.add_argument("--profile", help="profile name under configs/profile/ or a .env path")
    wanted = set(only) if only is not None else None
    for f in fields(Settings):
        if (wanted is not None and f.name not in wanted) or f.name == "profile":
            continue  # PROFILE is set by the profile file that --profile picks
        flag = "--" + f.name.replace("_", "-")
        help_ = f"{f.metadata['help']} [{f.name.upper()}]".replace("%", "%%")  # argparse
        if f.name.startswith(hide) and hide:
            help_ = argparse.SUPPRESS
        parser.add_argument(flag, dest=f"set_{f.name}", default=None, help=help_,
                            metavar=f.name.upper())


def check_model_layer(model: str | None) -> None:
    """`--model` names a configs/model/*.env layer for every command; a checkpoint file given
    there is refused with the flag that takes it."""
    if model and not model.endswith(".env") and (
            model.endswith((".pth", ".pt")) or (os.sep in model and Path(model).is_file())):
        raise ConfigError(f"--model {model}: --model names a configs/model/*.env layer; for "
                          f"a checkpoint file use --base-model {model}.")


def resolve_from_args(args: argparse.Namespace, root: Path | None = None) -> Resolved:
    check_model_layer(getattr(args, "model", None))
    cli = {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}
    return resolve(model=getattr(args, "model", None), profile=getattr(args, "profile", None),
                   cli=cli, root=root)


DEMO_MODEL_ENV = "rwkv7-tiny"  # configs/model/ file `train` adds when BASE_MODEL is empty


def resolve_for_training(args: argparse.Namespace, root: Path | None = None) -> Resolved:
    """What `rwkvforge train` runs with: resolve_from_args, plus the demo model's settings
    layer (configs/model/rwkv7-tiny.env: its CTX_LEN, MICRO_BSZ, LR, ...) when no base model
    is set anywhere. Sets args.model to that layer's name when it applies."""
    root = root or workspace_root()
    res = resolve_from_args(args, root)
    if (not res.settings.base_model and not getattr(args, "model", None)
            and not os.environ.get("RWKVFORGE_MODEL")
            and (root / "configs" / "model" / f"{DEMO_MODEL_ENV}.env").is_file()):
        args.model = DEMO_MODEL_ENV
        res = resolve_from_args(args, root)
    return res


def format_table(res: Resolved) -> str:
    rows = []
    for f in fields(Settings):
        key = f.name.upper()
        val = getattr(res.settings, f.name)
        rows.append((key, json.dumps(val, ensure_ascii=False) if isinstance(val, str)
                     else str(int(val) if isinstance(val, bool) else val), res.sources[key]))
    w0 = max(len(r[0]) for r in rows)
    w1 = min(max(len(r[1]) for r in rows), 60)
    lines = [f"{'KEY':<{w0}}  {'VALUE':<{w1}}  SOURCE"]
    lines += [f"{k:<{w0}}  {v:<{w1}}  {s}" for k, v, s in rows]
    return "\n".join(lines)


GROUP_TITLES = {
    "en": {"workspace": "Workspace", "model": "Model", "profile": "Profile (adapter and "
           "precision)", "train": "Training"},
    "zh-CN": {"workspace": "工作区", "model": "模型", "profile": "配置档（适配器与精度）",
              "train": "训练"},
}
REFERENCE_INTRO = {
    "en": ("# Configuration reference\n\n"
           "Generated from the settings schema (`src/rwkvforge/config.py`) by "
           "`rwkvforge config docs`; a test fails when it is stale. Set a key in "
           "`configs/workspace.env`, `configs/model/<name>.env`, `configs/profile/<name>.env`, "
           "as an environment variable, or as a command-line flag (later wins). "
           "[中文](configuration.zh-CN.md)\n"),
    "zh-CN": ("# 配置参考\n\n"
              "由 `rwkvforge config docs` 根据配置模式（`src/rwkvforge/config.py`）生成；内容过期时"
              "测试会失败。可以在 `configs/workspace.env`、`configs/model/<name>.env`、"
              "`configs/profile/<name>.env`、环境变量或命令行参数中设置（后者优先）。"
              "说明文字取自代码中的英文文档。[English](configuration.md)\n"),
}


def reference_markdown(lang: str = "en") -> str:
    """The configuration reference page, generated from `Settings`."""
    head = ("| KEY | flag | type | default | allowed | meaning |" if lang == "en" else
            "| 键 | 命令行参数 | 类型 | 默认值 | 取值范围 | 说明 |")
    parts = [REFERENCE_INTRO[lang]]
    for group, title in GROUP_TITLES[lang].items():
        parts.append(f"\n## {title}\n\n{head}\n|---|---|---|---|---|---|")
        for f in fields(Settings):
            if f.metadata["group"] != group:
                continue
            m = f.metadata
            typ = f.type if isinstance(f.type, str) else f.type.__name__
            if m["choices"]:
                allowed = " / ".join(f"`{c}`" for c in m["choices"])
            elif m["min"] is not None or m["max"] is not None:
                allowed = f"{'' if m['min'] is None else m['min']} … {'' if m['max'] is None else m['max']}"
            else:
                allowed = ""
            default = json.dumps(f.default, ensure_ascii=False)
            flag = "(set by --profile)" if f.name == "profile" else f"`--{f.name.replace('_', '-')}`"
            parts.append(f"| `{f.name.upper()}` | {flag} | {typ} | `{default}` | {allowed} | "
                         f"{m['help']} |")
    return "\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvforge config",
                                 description="Show the resolved settings and their sources.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    show = sub.add_parser("show", help="print resolved settings (workspace < model < "
                          "profile < environment < CLI flag)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    add_settings_flags(show)
    sub.add_parser("check", help="validate every .env under configs/")
    docs = sub.add_parser("docs", help="write docs/configuration.md and its Chinese twin")
    docs.add_argument("--out-dir", default=None, help="default: <workspace>/docs")
    args = ap.parse_args(argv)
    if args.cmd == "docs":
        out_dir = Path(args.out_dir) if args.out_dir else workspace_root() / "docs"
        out_dir.mkdir(parents=True, exist_ok=True)
        for lang, name in (("en", "configuration.md"), ("zh-CN", "configuration.zh-CN.md")):
            tmp = out_dir / f".{name}.tmp"
            tmp.write_text(reference_markdown(lang), encoding="utf-8")
            os.replace(tmp, out_dir / name)
            print(f"wrote {out_dir / name}")
        return 0
    try:
        if args.cmd == "check":
            root = workspace_root()
            n = 0
            for p in sorted((root / "configs").rglob("*.env*")):
                load_env_file(p)
                n += 1
            print(f"{n} config files valid")
            return 0
        res = resolve_for_training(args)  # what `rwkvforge train` would run with
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(res.to_json(), indent=2, ensure_ascii=False))
    else:
        print("files: " + (", ".join(res.files) or "(none)"))
        print(format_table(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

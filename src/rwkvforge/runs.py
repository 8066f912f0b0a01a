"""The run folder, runs/<run>/: the one owner of its layout, for the trainer that writes it and
for merge, eval, the dashboard and the scripts that read it.

    runs/<run>/config.json        resolved settings, their sources, git SHA, versions, hardware
               status.json        state (running / finished / failed), step, pid, error
               metrics.jsonl      one JSON object per logged step
               train.log          the training log
               loss.png           the loss curve
               checkpoints/step-N/  adapter + trainer_state.pt, COMPLETE written last
               adapter/           the final adapter (PEFT layout)
               merged/<run>[-step-N]-<dtype>.pth   what `rwkvforge merge` writes by default

    python -m rwkvforge.runs merged-path runs/<run> [--dtype bf16]   # where merge writes
    python -m rwkvforge.runs chat-prompt runs/<run>   # "chat" or "raw", then a prompt to try

Writer: `RunFolder`; only rank 0 writes (`RunFolder(enabled=False)` elsewhere). Readers
(`run_of`, `run_config`, `final_adapter`, `merged_path`, `read_json`, `read_metrics`) read
tolerantly: another process may be writing the folder right now.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

try:
    import fcntl
except ImportError:  # native Windows: no flock (WSL2 has it)
    fcntl = None

from rwkvforge import config, paths
from rwkvforge.checkpoint import (READ_ONLY, atomic_write_bytes, disk_error, fmt_mb, free_bytes,
                                  latest_checkpoint)
from rwkvforge.data.loader import load_meta, open_split
from rwkvforge.memory import final_outputs, run_disk_bytes

log = logging.getLogger("rwkvforge.train")

def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).astimezone().isoformat(timespec="seconds")


def atomic_json(path: Path, obj: Any) -> None:
    """`obj` as indented UTF-8 JSON at `path`, atomically (temp + rename)."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False, default=str)
                              + "\n").encode("utf-8"))


def git_sha(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        sha = out.stdout.strip() if out.returncode == 0 else "unknown"
        if sha != "unknown":
            dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain",
                                    "--untracked-files=no"], capture_output=True, text=True,
                                   timeout=10)
            if dirty.returncode == 0 and dirty.stdout.strip():
                sha += "-dirty"
        return sha
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_version(name: str) -> str | None:
    """The installed version of a distribution (None: not installed)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str]:
    """Python and the packages a run record names (those installed)."""
    out = {"python": platform.python_version()}
    for pkg in ("rwkvforge", "torch", "peft", "bitsandbytes", "deepspeed", "numpy",
                "safetensors", "wandb"):
        v = package_version(pkg)
        if v is not None:
            out[pkg] = v
    return out


def hardware_info() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "cpu_count": os.cpu_count(),
                            "torch_threads": torch.get_num_threads()}
    info["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["cuda"] = torch.version.cuda
        info["gpus"] = [{"name": torch.cuda.get_device_name(i),
                         "memory_gb": round(torch.cuda.get_device_properties(i).total_memory
                                            / 2**30, 1)}
                        for i in range(torch.cuda.device_count())]
    return info


LOCK = ".lock"


class _QuietFileHandler(logging.FileHandler):
    """train.log's handler: a line that cannot be written (a full disk) is dropped, not a
    "--- Logging error ---" traceback on the console; the failing write that matters (a
    checkpoint, the adapter) reports the full disk itself."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: ARG002
        pass


class RunLocked(RuntimeError):
    """Another process is writing this run folder; the message names its PID."""


class RunFolder:
    """Writes runs/<run>/ (only rank 0 does), as its one writer: `lock()` holds an OS lock
    for the writer's life."""

    def __init__(self, path: Path, enabled: bool = True):
        # the training log: train.log receives the `rwkvforge.train` logger's records
        self.path = Path(path)
        self.enabled = enabled
        self.metrics_path = self.path / "metrics.jsonl"
        self._handler: logging.Handler | None = None
        self._lock_fd: int | None = None

    def lock(self) -> None:
        """One writer per run folder: flock on runs/<run>/.lock, held until `unlock()` or the
        process ends; the OS releases it when the process dies, so no stale lock is ever
        left to clean by hand. RunLocked names the holder's PID. (No-op where the OS has no
        flock, e.g. native Windows; WSL2 has it.)"""
        if not self.enabled or self._lock_fd is not None or fcntl is None:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise RunLocked(f"{self.path} is being written by another rwkvforge train process "
                            f"(PID {holder}): wait for it to end, or stop it (kill {holder}) "
                            "and resume; two processes never write one run folder.") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def clean_stray(self) -> list[Path]:
        """Remove what a writer killed mid-write (kill -9, power loss) left: temporary files
        of atomic writes (.status.json.*.tmp, .loss.png.tmp) and half-built folders
        (adapter.tmp, checkpoints/step-N.tmp / .old). Only while holding the lock (no other
        writer can be making them). Returns what was removed."""
        if not self.enabled or (self._lock_fd is None and fcntl is not None):
            return []
        gone: list[Path] = []
        cands = [p for p in self.path.glob(".*.tmp") if p.is_file()]
        cands += [p for p in (self.path / "adapter.tmp", self.path / "adapter.old")
                  if p.is_dir()]
        ck = self.path / "checkpoints"
        if ck.is_dir():
            cands += [p for p in ck.iterdir() if p.name.endswith((".tmp", ".old"))
                      and p.name.startswith("step-")]
            cands += [p for p in ck.glob("step-*/.*.tmp") if p.is_file()]
        for p in cands:
            try:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
                gone.append(p)
            except OSError:  # noqa: PERF203 - a handful of stray files, once per start
                pass
        if gone:
            log.info("removed %d temporary file(s) an interrupted write left: %s", len(gone),
                     ", ".join(str(p.relative_to(self.path)) for p in gone[:5]))
        return gone

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def open_log(self) -> None:
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        h = _QuietFileHandler(self.path / "train.log", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                         "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False  # console output goes through say() / the progress bar
        self._handler = h

    def setup_failed(self, e: BaseException, status: bool = True) -> None:
        """A start that failed before the run began: train.log says why (the dashboard shows
        it: dashboard/runs.py SETUP_FAILED) and, with `status`, status.json of stage "setup",
        which does not take the run name (run_started)."""
        if not self.logging:
            return
        log.error("the run did not start: %s", e)
        if status:
            self.status("failed", 0, 0, error=f"the run did not start: {e}", stage="setup")
        self.close_log()

    @property
    def logging(self) -> bool:
        """train.log is open (the run got far enough to have a log)."""
        return self._handler is not None

    def close_log(self) -> None:
        if self._handler is not None:
            log.removeHandler(self._handler)
            self._handler.close()
            self._handler = None

    def write_json(self, name: str, obj: Any) -> None:
        if self.enabled:
            atomic_json(self.path / name, obj)

    def status(self, state: str, step: int, max_steps: int, error: str | None = None,
               **extra: Any) -> None:
        self.write_json("status.json", {"state": state, "pid": os.getpid(), "step": step,
                                        "max_steps": max_steps, "updated": time.time(),
                                        "error": error, **extra})

    def read_status(self) -> dict:
        """status.json, or {} when it is missing or unreadable."""
        return read_json(self.path / "status.json") or {}

    def record_resume(self, settings: config.Settings, sources: dict[str, str],
                      mutable: tuple[str, ...], step: int, total_steps: int,
                      resumed_from: Path | None) -> None:
        """config.json keeps what a resume changed (the `mutable` settings, such as a longer
        MAX_STEPS), so that the next --resume continues with it."""
        path = self.path / "config.json"
        record = json.loads(path.read_text(encoding="utf-8"))
        new = config.public_settings(settings)
        changed = {k: [record["settings"].get(k), new[k]] for k in mutable
                   if record["settings"].get(k) != new[k]}
        for k in changed:
            record["settings"][k] = new[k]
            record.setdefault("sources", {})[k.upper()] = sources.get(k.upper(), "cli (resume)")
        record.setdefault("training", {})["total_steps"] = total_steps
        record.setdefault("resumes", []).append({
            "step": step, "from": str(resumed_from), "changed": changed,
            "command": [sys.executable, "-m", "rwkvforge.train", *sys.argv[1:]],
            "at": now_iso()})
        self.write_json("config.json", record)

    def append_metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        return read_metrics(self.metrics_path)

    def truncate_metrics(self, last_step: int) -> None:
        """Drop metric lines after `last_step` (written before a crash, redone on resume)."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        keep = [r for r in self.read_metrics() if int(r.get("step", 0)) <= last_step]
        atomic_write_bytes(self.metrics_path, "".join(
            json.dumps(r, ensure_ascii=False) + "\n" for r in keep).encode("utf-8"))

    def plot_loss(self) -> Path | None:
        if not self.enabled:
            return None
        rows = self.read_metrics()
        pts = [(r["step"], r["loss"]) for r in rows if "loss" in r]
        if not pts:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        dpo = any("reward_margin" in r for r in rows)
        ax.plot(*zip(*pts), label="train loss", lw=1.2)
        pure = [(r["step"], r["dpo_loss"]) for r in rows if "dpo_loss" in r]
        if pure and any(r.get("dpo_loss") != r.get("loss") for r in rows if "dpo_loss" in r):
            ax.plot(*zip(*pure), label="train DPO loss (without DPO_FTX's term)", lw=1.2)
        val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o-", label="val loss", ms=4)
        ax.set_xlabel("step")
        ax.set_ylabel("loss (per pair)" if dpo else "loss (nats/token)")
        ax.set_title(self.path.name)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = self.path / "loss.png"
        tmp = self.path / ".loss.png.tmp"
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, out)
        return out



def metrics_row(step: int, loss: float, lr: float, tps: float, mem_mb: float, epoch: float,
                gnorm: float | None, dpo_stats: Any, val: float | None,
                val_acc: float | None) -> dict[str, Any]:
    """One metrics.jsonl line. DPO: this step's pairs' DPO loss alone, share ranked right,
    mean margin (dpo_stats: sum of DPO losses, right-ordered pairs, margin sum, pairs)."""
    row: dict[str, Any] = {"step": step, "loss": round(loss, 6), "lr": lr,
                           "tokens_per_s": round(tps, 1), "mem_mb": round(mem_mb, 1),
                           "time": round(time.time(), 3), "epoch": round(epoch, 4)}
    if gnorm is not None:
        row["grad_norm"] = round(gnorm, 6)
    if dpo_stats is not None:
        st = dpo_stats
        row["dpo_loss"] = round(float(st[0] / st[3]), 6)
        row["reward_acc"] = round(float(st[1] / st[3]), 4)
        row["reward_margin"] = round(float(st[2] / st[3]), 6)
    if val is not None:
        row["val_loss"] = round(val, 6)
        if val_acc is not None:
            row["val_reward_acc"] = round(val_acc, 4)
    return row


def init_wandb(s: config.Settings, run_dir: Path):
    """The W&B run for WANDB_PROJECT (None when unset)."""
    if not s.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        raise RunError("WANDB_PROJECT is set but wandb is not installed: install it with "
                         "`.venv/bin/pip install -e '.[wandb]'` (the extra `wandb`; "
                         "`./scripts/bootstrap.sh --dev` has it too), or leave WANDB_PROJECT "
                         "empty.") from None
    try:
        return wandb.init(project=s.wandb_project, name=run_dir.name,
                          id=run_dir.name.replace("/", "-"), resume="allow", dir=str(run_dir),
                          config=config.public_settings(s))
    except Exception as e:  # noqa: BLE001 - wandb raises many types (auth, network, usage)
        why = (str(e).splitlines() or [type(e).__name__])[0]
        raise RunError(f"W&B could not start ({why}): run `wandb login` once, or set "
                         "WANDB_MODE=offline to log to the run folder only, or leave "
                         "WANDB_PROJECT empty.") from None



def config_record(res: config.Resolved, root: Path, *, model: dict, data: dict,
                  training: dict) -> dict[str, Any]:
    """config.json of a run: the resolved settings and sources (secrets only as set / not
    set), the code and machine, and what the run was made of (model, data with its prepared
    meta, training shape), with the command that started it."""
    _, meta = load_meta(data["prefix"])
    record = res.to_json()
    record.update({
        "git_sha": git_sha(root), "versions": package_versions(), "hardware": hardware_info(),
        "model": model,
        "data": {**data, "meta": {k: meta.get(k) for k in ("type", "source", "splits",
                                                            "num_tokens", "sha256")
                                  if k in meta} if meta else None},
        "training": training,
        "command": [sys.executable, "-m", "rwkvforge.train", *sys.argv[1:]],
        "started_at": now_iso(),
    })
    return record


def final_lines(run_dir: Path, loss: float | None, val_start: float | None,
                val_end: float | None, png: Path | None, peak_mb: float) -> list[str]:
    """What a finished run says last: where its outputs are, its losses, the next commands."""
    losses = ([f"final train loss {loss:.4f}"] if loss is not None else []) + (
        [f"validation {val_start:.4f} -> {val_end:.4f}"]
        if val_start is not None and val_end is not None else [])
    run = shlex.quote(str(run_dir))
    return [f"done: adapter {run_dir / FINAL_ADAPTER}" + (f", loss curve {png}" if png else "")
            + f", peak memory {peak_mb:,.0f} MB",
            ("; ".join(losses) + ". " if losses else "")
            + f"Next: rwkvforge eval --run {run}  (base vs tuned), then "
            f"rwkvforge merge --adapter {run}/adapter"]


def default_run_name(s: config.Settings) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{s.model_name}-{s.profile}-{stamp}"


def run_started(run_dir: Path) -> bool:
    """True when `run_dir` holds a run: anything but what a start that failed before the run
    began leaves (bad data, a missing model, W&B not logged in): its train.log, its lock and
    a status.json of stage "setup". A new start under that name may reuse the folder."""
    if not run_dir.is_dir():
        return False
    for p in run_dir.iterdir():
        if p.name in ("train.log", LOCK):
            continue
        if p.name == "status.json" and (read_json(p) or {}).get("stage") == "setup":
            continue
        return True
    return False


# ---- readers -------------------------------------------------------------------------------------
CONFIG, FINAL_ADAPTER, MERGED = "config.json", "adapter", "merged"


class RunError(ValueError):
    """A run folder file that cannot be read; the message names it."""


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing or half-written."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


# path -> (inode, bytes parsed up to the last complete line, rows): a live page re-reads
# every run's metrics every few seconds, and a long run's file only grows by appends
_METRICS_CACHE: dict[str, tuple[int, int, list[dict[str, Any]]]] = {}
_METRICS_CACHE_MAX = 256


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a torn last line (being appended right now, or cut by a crash)
    is skipped. Only the bytes appended since the last call are parsed; a replaced (resume
    truncates it) or shrunk file is read again from the start."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            ino, done, rows = _METRICS_CACHE.get(str(path), (st.st_ino, 0, []))
            if ino != st.st_ino or st.st_size < done:
                done, rows = 0, []
            f.seek(done)
            new = f.read()
    except OSError:
        return []
    end = new.rfind(b"\n") + 1  # a torn last line waits for its newline
    rows = list(rows)
    for line in new[:end].decode("utf-8", errors="replace").splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    if len(_METRICS_CACHE) >= _METRICS_CACHE_MAX:
        _METRICS_CACHE.clear()
    _METRICS_CACHE[str(path)] = (st.st_ino, done + end, rows)
    out = list(rows)
    try:  # a last line without its newline counts once it is whole JSON (not cached)
        tail = json.loads(new[end:].decode("utf-8", errors="replace")) if new[end:].strip() \
            else None
    except ValueError:
        tail = None
    if isinstance(tail, dict):
        out.append(tail)
    return out


def is_run(path: Path) -> bool:
    """A run folder: one with the config.json training wrote."""
    return (Path(path) / CONFIG).is_file()


def run_of(adapter_path: Path) -> Path | None:
    """The run folder of an adapter path (runs/<run>/adapter, runs/<run>/checkpoints/step-N,
    or a file in them); None outside a run."""
    p = Path(adapter_path).resolve()
    for cand in (p.parent, p.parent.parent, p.parent.parent.parent):
        if is_run(cand) and ((cand / FINAL_ADAPTER).exists() or (cand / "checkpoints").exists()):
            return cand
    return None


def run_config(run_dir: Path | None, strict: bool = False) -> dict[str, Any]:
    """A run's config.json ({} without a run or a config). An unreadable one is {} too, or,
    with `strict`, a RunError naming file:line."""
    if run_dir is None or not is_run(run_dir):
        return {}
    path = Path(run_dir) / CONFIG
    if strict:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise RunError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        return record if isinstance(record, dict) else {}
    return read_json(path) or {}


def run_settings(record: dict[str, Any]) -> dict[str, Any]:
    """The resolved settings (lower-case keys) of a run's config.json."""
    s = record.get("settings")
    return s if isinstance(s, dict) else {}


def run_base_model(record: dict[str, Any]) -> Path | None:
    """The base model .pth a run trained on (config.json -> model.path)."""
    model = record.get("model")
    path = model.get("path") if isinstance(model, dict) else None
    return Path(path) if path else None


def run_data_prefix(record: dict[str, Any]) -> Path | None:
    """The prepared data prefix a run trained on (config.json -> data.prefix)."""
    data = record.get("data")
    prefix = data.get("prefix") if isinstance(data, dict) else None
    return Path(prefix) if prefix else None


def final_adapter(run_dir: Path) -> Path:
    """Where a run's final adapter is (written when training ends)."""
    return Path(run_dir) / FINAL_ADAPTER


def merged_path(adapter_path: Path, dtype_name: str) -> Path:
    """Where `rwkvforge merge` writes `adapter_path` merged in `dtype_name` by default:
    runs/<run>/merged/<run>-<dtype>.pth for a run's final adapter, <run>-step-N-<dtype>.pth
    for a checkpoint, models/merged/<adapter>-<dtype>.pth outside a run."""
    adapter_path = Path(adapter_path)
    run_dir = run_of(adapter_path)
    if run_dir is not None:
        ck = adapter_path.resolve()
        tag = f"-{ck.name}" if ck.parent.name == "checkpoints" else ""
        return run_dir / MERGED / f"{run_dir.name}{tag}-{dtype_name}.pth"
    stem = adapter_path.stem if adapter_path.is_file() else adapter_path.name
    if stem == FINAL_ADAPTER:
        stem = adapter_path.parent.name
    return paths.workspace_root() / "models" / MERGED / f"{stem}-{dtype_name}.pth"

# ---- the run's own held-out data -----------------------------------------------------------------
# the question quickstart asks a model tuned on the shipped 1C sample (the demo data)
DEMO_QUESTION = "Напиши процедуру, которая выводит сообщение «Привет» на клиенте."


def uses_demo_data(record: dict[str, Any]) -> bool:
    """True when the run trained on the shipped sample data, or records no data at all (its
    readers then fall back to the sample)."""
    data = record.get("data")
    return not isinstance(data, dict) or not data.get("prefix") or bool(data.get("demo"))


def held_out_turns(prefix: Path, limit: int, split: str = "val",
                   tok=None) -> list[tuple[str, str]]:
    """(question, reference reply) of the first `limit` examples of a prepared SFT / DPO split
    that have one: the last user turn before the first trained reply, and that reply (DPO: the
    chosen one), decoded from the tokens the run saw. [] for text data or without the split."""
    split_data = open_split(prefix, split)
    if split_data is None or split_data.mask is None:
        return []
    if tok is None:
        from rwkvforge.tokenizer import get_tokenizer

        tok = get_tokenizer()
    out: list[tuple[str, str]] = []
    per = 2 if split_data.data_type == "dpo" else 1  # (chosen, rejected): the chosen one
    for i in range(0, len(split_data.ids), per):
        ids, mask = (a.tolist() for a in split_data.item(i, len(split_data.ids[i])))
        if 1 not in mask:
            continue
        a = mask.index(1)
        b = mask.index(0, a) if 0 in mask[a:] else len(mask)
        before = tok.decode([t for t in ids[:a] if t]).rsplit("User: ", 1)
        reply = tok.decode([t for t in ids[a:b] if t]).strip()
        question = before[-1].removesuffix("Assistant:").strip() if len(before) == 2 else ""
        if question and reply:
            out.append((question, reply))
            if len(out) >= limit:
                break
    return out


def chat_prompt(record: dict[str, Any]) -> tuple[str, str]:
    """("chat" | "raw", prompt): something to ask a model tuned by this run, from its own
    data: the first held-out question (else the first training one); for text data the start
    of the first held-out document, as a plain completion; the 1C question for the demo."""
    prefix = run_data_prefix(record)
    if uses_demo_data(record) or prefix is None:
        return "chat", DEMO_QUESTION
    for split in ("val", "train"):
        try:
            turns = held_out_turns(prefix, 1, split)
            data = open_split(prefix, split)
        except (OSError, ValueError):
            break
        if turns:
            return "chat", turns[0][0]
        if data is not None and data.data_type == "text" and len(data.ids):
            from rwkvforge.tokenizer import get_tokenizer

            text = get_tokenizer().decode([t for t in data.ids[0][:64].tolist() if t])
            first = next((x for x in text.splitlines() if x.strip()), "").strip()
            if first:
                return "raw", first
    return "chat", "Hello! What can you do?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rwkvforge.runs",
                                 description="Answer questions about a run folder.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    mp = sub.add_parser("merged-path", help="the .pth `rwkvforge merge --adapter X` writes "
                        "by default (X: a run folder = its final adapter, or an adapter path)")
    mp.add_argument("path", type=Path)
    mp.add_argument("--dtype", default="bf16", help="merge's --dtype (default bf16)")
    cp = sub.add_parser("chat-prompt", help="a prompt from the run's own data to try the tuned "
                        "model with: prints 'chat' or 'raw' (a plain completion), then it")
    cp.add_argument("path", type=Path)
    args = ap.parse_args(argv)
    if args.cmd == "chat-prompt":
        mode, prompt = chat_prompt(run_config(args.path))
        print(f"{mode}\n{prompt}")
        return 0
    adapter = final_adapter(args.path) if is_run(args.path) else args.path
    print(merged_path(adapter, args.dtype).resolve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))


# ---- the disk a run takes ------------------------------------------------------------------------
def last_checkpoint_bytes(run_dir: Path) -> int:
    """Size of the newest complete checkpoint of a run (0 without one)."""
    ck = latest_checkpoint(run_dir)
    if ck is None:
        return 0
    return sum(p.stat().st_size for p in ck.rglob("*") if p.is_file())


def disk_plan(run_dir: Path, n_trainable: int, total_steps: int, s: config.Settings
              ) -> tuple[float, list[tuple[str, int]]]:
    """(MB of one checkpoint, the lines to say): roughly how much disk the run takes
    (checkpoints + final adapter), and a warning when the run folder's filesystem has less
    free."""
    per, n_kept, total = run_disk_bytes(n_trainable, total_steps, s.save_every,
                                        s.keep_checkpoints, s.optimizer)
    free = free_bytes(run_dir)
    notes = [(f"disk: about {fmt_mb(total)} for this run ({n_kept} checkpoint(s) of "
              f"~{fmt_mb(per)} + {final_outputs(s.train_type)}; KEEP_CHECKPOINTS="
              f"{s.keep_checkpoints or 'all'}), {fmt_mb(free)} free at {run_dir.parent}",
              logging.INFO)]
    if free is not None and free < total:
        notes.append((f"warning: the run needs about {fmt_mb(total)} but only {fmt_mb(free)} "
                      "is free: free space, or set KEEP_CHECKPOINTS=1 (or a larger SAVE_EVERY)",
                      logging.WARNING))
    return per / 2**20, notes


def start_disk_message(e: BaseException) -> str | None:
    """The message of a write before training started (the run folder, config.json) that
    failed for the disk's sake, or None."""
    what = disk_error(e)
    if what is None:
        return None
    where = getattr(e, "filename", None) or "the run folder"
    fix = ("Point RUNS_DIR at a writable disk (or remount this one read-write)"
           if what == READ_ONLY else
           "Free some space (or point RUNS_DIR at a writable disk with room)")
    return f"{what}: writing {where} failed ({e}). {fix}, then run the same command again."


def disk_full_message(e: BaseException, run_dir: Path, writing: str, step: int,
                      checkpoint_mb: float) -> str | None:
    """The message of a write that failed for the disk's sake (full, read-only), or None:
    what happened, how much is needed and free, and the resume command."""
    what = disk_error(e, run_dir)
    if what is None:
        return None
    need = max(checkpoint_mb * 2**20, last_checkpoint_bytes(run_dir))
    free = free_bytes(run_dir)
    resume = (f"rwkvforge train --resume {shlex.quote(str(run_dir))}"
              if latest_checkpoint(run_dir) is not None else
              "start the run again (it has no complete checkpoint yet)")
    head = (f"{what}: writing {writing} in {run_dir} failed at step {step} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).")
    if what == READ_ONLY:
        return (f"{head} Remount that disk read-write (or copy the run folder to a writable "
                f"disk and resume it from there), then continue with: {resume}")
    return (f"{head} A checkpoint "
            f"of this run needs about {fmt_mb(need)}; {fmt_mb(free)} is free there. Free some "
            "space (KEEP_CHECKPOINTS=N keeps only the newest N checkpoints), then continue "
            f"with: {resume}")

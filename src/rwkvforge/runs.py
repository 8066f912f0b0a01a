"""The run folder, runs/<run>/: the one owner of its layout, for the trainer that writes it and
for merge, eval, the dashboard and the scripts that read it.

    runs/<run>/config.json        resolved settings, their sources, git SHA, versions, hardware
               status.json        state (running / finished / failed), step, pid, error
               metrics.jsonl      one JSON object per logged step
               train.log          the training log
               loss.png           the loss curve
               checkpoints/step-N/  adapter + trainer_state.pt, COMPLETE written last
               adapter/           the final adapter (PEFT layout)

Only rank 0 writes (`RunFolder(enabled=False)` elsewhere).
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil
import torch

from rwkvforge import config
from rwkvforge.checkpoint import atomic_write_bytes

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


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("rwkvforge", "torch", "peft", "bitsandbytes", "deepspeed", "numpy",
                "safetensors", "wandb"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
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


class RunFolder:
    """Writes runs/<run>/ (only rank 0 does)."""

    def __init__(self, path: Path, enabled: bool = True):
        # the training log: train.log receives the `rwkvforge.train` logger's records
        self.path = Path(path)
        self.enabled = enabled
        self.metrics_path = self.path / "metrics.jsonl"
        self._handler: logging.Handler | None = None

    def open_log(self) -> None:
        if not self.enabled:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        h = logging.FileHandler(self.path / "train.log", encoding="utf-8")
        h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                         "%Y-%m-%d %H:%M:%S"))
        log.addHandler(h)
        log.setLevel(logging.INFO)
        log.propagate = False  # console output goes through say() / the progress bar
        self._handler = h

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
        try:
            return json.loads((self.path / "status.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def record_resume(self, settings: config.Settings, sources: dict[str, str],
                      mutable: tuple[str, ...], step: int, total_steps: int,
                      resumed_from: Path | None) -> None:
        """config.json keeps what a resume changed (the `mutable` settings, such as a longer
        MAX_STEPS), so that the next --resume continues with it."""
        path = self.path / "config.json"
        cfg = json.loads(path.read_text(encoding="utf-8"))
        new = config.public_settings(settings)
        changed = {k: [cfg["settings"].get(k), new[k]] for k in mutable
                   if cfg["settings"].get(k) != new[k]}
        for k in changed:
            cfg["settings"][k] = new[k]
            cfg.setdefault("sources", {})[k.upper()] = sources.get(k.upper(), "cli (resume)")
        cfg.setdefault("training", {})["total_steps"] = total_steps
        cfg.setdefault("resumes", []).append({
            "step": step, "from": str(resumed_from), "changed": changed,
            "command": [sys.executable, "-m", "rwkvforge.train", *sys.argv[1:]],
            "at": now_iso()})
        self.write_json("config.json", cfg)

    def append_metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()

    def read_metrics(self) -> list[dict]:
        rows = []
        if self.metrics_path.is_file():
            for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
        return rows

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



def default_run_name(s: config.Settings) -> str:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{s.model_name}-{s.profile}-{stamp}"


def run_started(run_dir: Path) -> bool:
    """True when `run_dir` holds a run: anything but the train.log of a start that failed
    before the run began (bad data, a missing model), which a new start may append to."""
    return run_dir.is_dir() and any(p.name != "train.log" for p in run_dir.iterdir())

"""Read-only access to run folders (`runs/<run>/`) for the dashboard.

Nothing here writes, moves or deletes a file: the dashboard watches runs that another
process (`rwkvforge train`) is writing. Every path is checked to lie inside the workspace
root first (`PathRefused` otherwise), and files that are half-written (a metrics line being
appended, a status.json being replaced) are read tolerantly.

Layout read (see the run-folder contract):
    runs/<run>/config.json  status.json  metrics.jsonl  train.log
    runs/<run>/checkpoints/step-N/COMPLETE   adapter/   merged/*.pth   eval/

    python -c "from rwkvforge.dashboard.runs import list_runs; print(list_runs('runs'))"
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rwkvforge.paths import is_within, workspace_root

# A "running" status.json whose `updated` is older than this is treated as dead: the trainer
# refreshes it every logged step, and steps on a CPU demo take seconds, not minutes.
STALE_AFTER_S = 300.0

STATUSES = ("running", "finished", "failed", "resumable", "unknown")
_STEP_RE = re.compile(r"^step-(\d+)$")


class PathRefused(ValueError):
    """A path outside the workspace root was asked for; the dashboard never reads it."""

    def __init__(self, path: Path | str, root: Path):
        super().__init__(f"{path} is outside the workspace {root}")
        self.path = str(path)
        self.root = str(root)


def check_inside(path: Path | str, root: Path | None = None) -> Path:
    """Return `path` resolved (relative paths are taken from the workspace root) if it lies
    inside the workspace; raise PathRefused otherwise."""
    root = Path(root or workspace_root()).resolve()
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = root / p
    if not is_within(p, root):
        raise PathRefused(p, root)
    return p.resolve()


@dataclass
class Checkpoint:
    step: int
    path: Path
    complete: bool
    size_mb: float
    mtime: float


@dataclass
class RunInfo:
    """What the Runs table shows about one run folder."""

    name: str
    path: Path
    status: str
    state: str | None  # raw state from status.json
    profile: str = ""
    model: str = ""
    step: int = 0
    max_steps: int = 0
    best_loss: float | None = None
    last_loss: float | None = None
    started_at: str = ""
    updated: float | None = None
    error: str | None = None
    pid: int | None = None
    checkpoints: list[Checkpoint] = field(default_factory=list)
    has_adapter: bool = False
    merged: list[Path] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from `path`, or None when it is missing or half-written."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Rows of metrics.jsonl; a torn last line (being appended right now) is skipped."""
    rows: list[dict[str, Any]] = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def pid_alive(pid: Any) -> bool:
    """True when a process with this pid exists (signal 0 sends nothing)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    except OSError:
        return False
    return True


def list_checkpoints(run_dir: Path) -> list[Checkpoint]:
    """Checkpoints under `checkpoints/`, oldest step first. `step-N.tmp` folders (being
    written) are not listed; a `step-N` without COMPLETE is listed as incomplete."""
    out = []
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return out
    for d in ck.iterdir():
        m = _STEP_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        out.append(Checkpoint(step=int(m.group(1)), path=d, complete=(d / "COMPLETE").is_file(),
                              size_mb=size / 2**20, mtime=d.stat().st_mtime))
    return sorted(out, key=lambda c: c.step)


def classify(status: dict[str, Any] | None, checkpoints: list[Checkpoint],
             now: float | None = None) -> str:
    """running | finished | failed | resumable | unknown.

    running: status.json says running, its pid is alive and it was updated recently.
    finished: status.json says finished.
    resumable: not finished, not running, and a COMPLETE checkpoint exists.
    failed: not finished, not running, no complete checkpoint.
    unknown: no readable status.json and no complete checkpoint.
    """
    now = time.time() if now is None else now
    state = (status or {}).get("state")
    if state == "finished":
        return "finished"
    if state == "running":
        updated = status.get("updated") if status else None
        fresh = isinstance(updated, (int, float)) and now - float(updated) < STALE_AFTER_S
        if fresh and pid_alive(status.get("pid")):
            return "running"
    if any(c.complete for c in checkpoints):
        return "resumable"
    if status is None:
        return "unknown"
    return "failed"


def _finite(x: Any) -> float | None:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def read_run(run_dir: Path, now: float | None = None) -> RunInfo:
    """Summarise one run folder."""
    status = read_json(run_dir / "status.json")
    cfg = read_json(run_dir / "config.json") or {}
    settings = cfg.get("settings") or {}
    model = cfg.get("model") or {}
    cks = list_checkpoints(run_dir)
    metrics = read_metrics(run_dir / "metrics.jsonl")
    losses = [v for v in (_finite(r.get("loss")) for r in metrics) if v is not None]
    steps = [int(r["step"]) for r in metrics if isinstance(r.get("step"), int)]
    info = RunInfo(
        name=run_dir.name,
        path=run_dir,
        status=classify(status, cks, now),
        state=(status or {}).get("state"),
        profile=str(settings.get("profile", "")),
        model=str(settings.get("model_name") or Path(str(model.get("path", ""))).name),
        step=int((status or {}).get("step") or (max(steps) if steps else 0)),
        max_steps=int((status or {}).get("max_steps") or settings.get("max_steps") or 0),
        best_loss=min(losses) if losses else None,
        last_loss=losses[-1] if losses else None,
        started_at=str(cfg.get("started_at", "")),
        updated=_finite((status or {}).get("updated")),
        error=(status or {}).get("error"),
        pid=(status or {}).get("pid"),
        checkpoints=cks,
        has_adapter=(run_dir / "adapter" / "adapter_config.json").is_file(),
        merged=sorted((run_dir / "merged").glob("*.pth")) if (run_dir / "merged").is_dir()
        else [],
    )
    return info


def is_run_dir(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in
                              ("config.json", "status.json", "metrics.jsonl"))


def list_runs(runs_dir: Path | str, root: Path | None = None,
              now: float | None = None) -> list[RunInfo]:
    """Every run folder under `runs_dir` (inside the workspace), newest first."""
    d = check_inside(runs_dir, root)
    if not d.is_dir():
        return []
    runs = [read_run(p, now) for p in d.iterdir() if is_run_dir(p)]
    return sorted(runs, key=lambda r: (r.started_at, r.name), reverse=True)


def config_rows(run_dir: Path) -> list[tuple[str, str, str]]:
    """(KEY, value, source) for every setting in config.json, in the file's order."""
    cfg = read_json(run_dir / "config.json") or {}
    settings = cfg.get("settings") or {}
    sources = cfg.get("sources") or {}
    rows = []
    for k, v in settings.items():
        key = str(k).upper()
        shown = json.dumps(v, ensure_ascii=False) if isinstance(v, (str, list, dict)) else str(v)
        rows.append((key, shown, str(sources.get(key, ""))))
    return rows


def find_models(root: Path | None = None) -> list[Path]:
    """Loadable .pth files in the workspace: models/**, runs/*/merged/*.pth."""
    root = Path(root or workspace_root()).resolve()
    found: set[Path] = set()
    models = root / "models"
    if models.is_dir():
        found.update(p for p in models.rglob("*.pth") if p.is_file())
    runs = root / "runs"
    if runs.is_dir():
        found.update(p for p in runs.glob("*/merged/*.pth") if p.is_file())
    return sorted(p for p in found if is_within(p, root))


def find_adapters(runs_dir: Path | str, root: Path | None = None) -> list[Path]:
    """Adapter folders of runs (final `adapter/` and complete checkpoints)."""
    out = []
    for run in list_runs(runs_dir, root):
        if run.has_adapter:
            out.append(run.path / "adapter")
        for c in run.checkpoints:
            if c.complete and (c.path / "adapter_config.json").is_file():
                out.append(c.path)
    return out

"""Read-only access to run folders (`runs/<run>/`) for the dashboard.

Nothing here writes, moves or deletes a file: the dashboard watches runs that another
process (`rwkvforge train`) is writing. Every path is checked to lie inside the workspace
root first (`PathRefused` otherwise), and files that are half-written (a metrics line being
appended, a status.json being replaced) are read tolerantly.

The layout and its tolerant readers (read_json, read_metrics) are rwkvforge.runs'; the
checkpoint listing is checkpoint.checkpoint_dirs'. This module adds the workspace checks and
what the dashboard shows.

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

from rwkvforge.adapter import ADAPTER_CONFIG
from rwkvforge.checkpoint import checkpoint_dirs
from rwkvforge.paths import is_within, workspace_root
from rwkvforge.runs import CONFIG, FINAL_ADAPTER, MERGED, read_json, read_metrics
from rwkvforge.runtime import pid_alive
from rwkvforge.state_tuning import STATE_DIR, STATE_PTH

# A "running" status.json whose `updated` is older than this is treated as dead: the trainer
# refreshes it every logged step, and steps on a CPU demo take seconds, not minutes.
STALE_AFTER_S = 300.0

STATUSES = ("running", "finished", "failed", "resumable", "unknown")


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


def list_checkpoints(run_dir: Path, root: Path | None = None) -> list[Checkpoint]:
    """Checkpoints under `checkpoints/`, oldest step first. `step-N.tmp` folders (being
    written) are not listed; a `step-N` without COMPLETE is listed as incomplete. Anything
    that resolves outside the workspace (a symlink) is not looked at."""
    root = Path(root or workspace_root()).resolve()
    if not is_within(run_dir / "checkpoints", root):
        return []
    out = []
    for step, d, complete in checkpoint_dirs(run_dir):
        if not is_within(d, root):
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file() and is_within(f, root))
        out.append(Checkpoint(step=step, path=d, complete=complete, size_mb=size / 2**20,
                              mtime=d.stat().st_mtime))
    return out


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


def _int(x: Any) -> int | None:
    """An int from a JSON value written by another program (None when it is not one)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, int):
        return x
    if isinstance(x, str) and x.strip().isdigit():
        return int(x)
    return None


def _dict(x: Any) -> dict[str, Any]:
    return x if isinstance(x, dict) else {}


def read_run(run_dir: Path, now: float | None = None, root: Path | None = None) -> RunInfo:
    """Summarise one run folder. Files that resolve outside the workspace (symlinks) are
    not read, and fields of the wrong type count as missing."""
    root = Path(root or workspace_root()).resolve()

    def inside(name: str) -> Path | None:
        p = run_dir / name
        return p if is_within(p, root) else None

    def read(name: str) -> dict[str, Any] | None:
        p = inside(name)
        return read_json(p) if p is not None else None

    status = read("status.json")
    st = status or {}
    record = read(CONFIG) or {}
    settings = _dict(record.get("settings"))
    model = _dict(record.get("model"))
    cks = list_checkpoints(run_dir, root)
    mp = inside("metrics.jsonl")
    metrics = read_metrics(mp) if mp is not None else []
    rows = [r for r in metrics if _int(r.get("step")) is not None]  # the curve's points
    losses = [v for v in (_finite(r.get("loss")) for r in rows) if v is not None]
    steps = [_int(r["step"]) for r in rows]
    error = st.get("error")
    log = inside("train.log")
    if status is None and not record and log is not None and log.is_file():
        # only a log: a run still setting up (loading, preparing), or a start that failed
        # before training began (train logs why: "the run did not start: ...")
        why = _setup_failure(log)
        fresh = (time.time() if now is None else now) - log.stat().st_mtime < STALE_AFTER_S
        if why is not None or not fresh:
            status = st = {"state": "failed"}
            error = why or "stopped before training began (see train.log)"
        else:
            error = "starting: loading the model / preparing the data (see train.log)"
    status_now = classify(status, cks, now)
    if status_now in ("failed", "resumable") and not error and log is not None \
            and log.is_file():  # status.json without the reason (e.g. a full disk stopped
        error = _last_logged_error(log)  # its last write): the trainer also logs it
    adapter = inside(f"{FINAL_ADAPTER}/{ADAPTER_CONFIG}")
    merged_dir = inside(MERGED)
    info = RunInfo(
        name=run_dir.name,
        path=run_dir,
        status=status_now,
        state=st.get("state") if isinstance(st.get("state"), str) else None,
        profile=str(settings.get("profile", "")),
        model=str(settings.get("model_name") or Path(str(model.get("path", ""))).name),
        step=_int(st.get("step")) or (max(steps) if steps else 0),
        max_steps=_int(st.get("max_steps")) or _int(settings.get("max_steps")) or 0,
        best_loss=min(losses) if losses else None,
        last_loss=losses[-1] if losses else None,
        started_at=str(record.get("started_at", "")),
        updated=_finite(st.get("updated")),
        error=str(error) if error not in (None, "") else None,
        pid=_int(st.get("pid")),
        checkpoints=cks,
        has_adapter=adapter is not None and adapter.is_file(),
        merged=sorted(p for p in merged_dir.glob("*.pth") if is_within(p, root))
        if merged_dir is not None and merged_dir.is_dir() else [],
    )
    return info


SETUP_FAILED = "the run did not start: "  # what train.py logs when setup fails


def _log_tail(log: Path, size: int = 8192) -> str | None:
    """The last `size` bytes of a run's train.log as text (None: unreadable)."""
    try:
        with open(log, "rb") as f:
            f.seek(max(f.seek(0, os.SEEK_END) - size, 0))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def _setup_failure(log: Path) -> str | None:
    """The reason a run's setup failed, from the end of its train.log (None: not logged)."""
    tail = _log_tail(log)
    if tail is None:
        return None
    i = tail.rfind(SETUP_FAILED)
    if i < 0:
        return None
    why = tail[i + len(SETUP_FAILED):]
    if _LOG_RECORD.search(why):  # a later start wrote after it: that one counts
        return None
    return why.strip() or None


_LOG_RECORD = re.compile(r"\n\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")  # train.log's record start
_LOG_LEVEL = re.compile(r"(?m)^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ([A-Z]+) (.*)$")


def _last_logged_error(log: Path) -> str | None:
    """The message of an ERROR record among the last 3 records of a run's train.log (the
    trainer logs one as its run fails; one further up belongs to an earlier attempt that was
    resumed). None when there is none, e.g. the process was killed."""
    tail = _log_tail(log)
    if tail is None:
        return None
    last = _LOG_LEVEL.findall(tail)[-3:]
    errors = [msg.strip() for level, msg in last if level == "ERROR" and msg.strip()]
    return errors[-1] if errors else None


def is_run_dir(d: Path) -> bool:
    return d.is_dir() and any((d / f).exists() for f in
                              ("config.json", "status.json", "metrics.jsonl", "train.log"))


def list_runs(runs_dir: Path | str, root: Path | None = None,
              now: float | None = None) -> list[RunInfo]:
    """Every run folder under `runs_dir` (inside the workspace), newest first. A folder
    that resolves outside the workspace is skipped; one that cannot be read is listed as
    unknown with the reason, and never hides the others."""
    root = Path(root or workspace_root()).resolve()
    d = check_inside(runs_dir, root)
    try:
        if not d.is_dir():
            return []
        entries = sorted(d.iterdir())
    except OSError:  # e.g. a name too long for the file system
        return []
    runs = []
    for p in entries:
        try:
            if not is_within(p, root) or not is_run_dir(p):
                continue
            runs.append(read_run(p, now, root))
        except Exception as e:  # noqa: BLE001 - one bad folder must not hide the others
            runs.append(RunInfo(name=p.name, path=p, status="unknown", state=None,
                                error=f"cannot read this run folder: {type(e).__name__}: {e}"))
    return sorted(runs, key=lambda r: (r.started_at, r.name), reverse=True)


def run_file(run_dir: Path, name: str, root: Path | None = None) -> Path | None:
    """runs/<run>/<name> when it resolves inside the workspace, else None: the one
    containment check of every page that reads a run's files (a config.json or
    metrics.jsonl symlinked out of the workspace is not read)."""
    p = Path(run_dir) / name
    return p if is_within(p, Path(root or workspace_root())) else None


def run_metrics(run_dir: Path, root: Path | None = None) -> list[dict[str, Any]]:
    """The rows of a run's metrics.jsonl ([] when it is missing or outside the workspace)."""
    p = run_file(run_dir, "metrics.jsonl", root)
    return read_metrics(p) if p is not None else []


def config_rows(run_dir: Path, root: Path | None = None) -> list[tuple[str, str, str]]:
    """(KEY, value, source) for every setting in config.json, in the file's order ([] when it
    is missing, unreadable or outside the workspace)."""
    p = run_file(run_dir, CONFIG, root)
    record = (read_json(p) if p is not None else None) or {}
    settings = _dict(record.get("settings"))
    sources = _dict(record.get("sources"))
    rows = []
    for k, v in settings.items():
        key = str(k).upper()
        shown = ("—" if v is None else  # unset, as the Runs table shows it (not "None")
                 json.dumps(v, ensure_ascii=False) if isinstance(v, (str, list, dict)) else str(v))
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


def find_states(runs_dir: Path | str, root: Path | None = None) -> list[Path]:
    """Tuned initial states of runs (state tuning: runs/<run>/state/)."""
    root = Path(root or workspace_root()).resolve()
    return [run.path / STATE_DIR for run in list_runs(runs_dir, root)
            if (run.path / STATE_DIR / STATE_PTH).is_file() and is_within(run.path / STATE_DIR, root)]


def find_adapters(runs_dir: Path | str, root: Path | None = None) -> list[Path]:
    """Adapter folders of runs (final `adapter/` and complete checkpoints)."""
    out = []
    root = Path(root or workspace_root()).resolve()
    for run in list_runs(runs_dir, root):
        if run.has_adapter and is_within(run.path / FINAL_ADAPTER, root):
            out.append(run.path / FINAL_ADAPTER)
        for c in run.checkpoints:
            if c.complete and (c.path / ADAPTER_CONFIG).is_file():
                out.append(c.path)
    return out

"""Every marimo notebook in notebooks/ runs headless, top to bottom, in a throw-away copy of the
workspace (RWKVFORGE_ROOT), and a failing cell fails the run.

    python -m pytest tests/test_notebooks.py -q          # slow: trains the demo model

A marimo notebook is a Python file: `python notebooks/X.py` runs every cell in dependency order
and exits non-zero when a cell raises.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.py"))


def _workspace_copy(tmp: Path) -> Path:
    """configs/ + the shipped sample data: all a notebook may read from the workspace."""
    ws = tmp / "ws"
    shutil.copytree(ROOT / "configs", ws / "configs",
                    ignore=shutil.ignore_patterns("workspace.env"))  # the user's own stays out
    shutil.copytree(ROOT / "data" / "samples", ws / "data" / "samples")
    (ws / "pyproject.toml").write_text("", encoding="utf-8")
    return ws


def _run(nb: Path, ws: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = dict(os.environ, RWKVFORGE_ROOT=str(ws), MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, str(nb)], cwd=ws, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, "notebooks/ holds no marimo notebook"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_header_and_public_api(nb: Path) -> None:
    text = nb.read_text(encoding="utf-8")
    header = re.match(r"# /// script\n((?:#.*\n)*?)# ///\n", text)
    assert header, f"{nb.name}: no PEP 723 '# /// script' header at the top"
    deps = header.group(1)
    for dep in ("rwkvforge", "marimo"):
        assert f'"{dep}' in deps, f"{nb.name}: the script header does not list {dep}"
    assert "marimo.App(" in text and "app.run()" in text
    # the walkthrough drives the package, it does not re-implement it
    private = re.findall(r"from rwkvforge[\w.]* import [^\n]*\b_\w+", text)
    assert not private, f"{nb.name} imports private names: {private}"


@pytest.mark.slow
@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_headless(nb: Path, tmp_path: Path) -> None:
    ws = _workspace_copy(tmp_path)
    repo_runs_before = set((ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else set()
    proc = _run(nb, ws)
    assert proc.returncode == 0, (f"{nb.name} failed (exit {proc.returncode}):\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    if nb.name == "sft_walkthrough.py":
        runs = sorted((ws / "runs").glob("sft-walkthrough-*"))
        assert len(runs) == 1, f"expected one run folder in {ws / 'runs'}"
        run = runs[0]
        assert (run / "adapter" / "adapter_config.json").is_file()
        assert (run / "adapter" / "adapter_model.safetensors").is_file()
        status = json.loads((run / "status.json").read_text())
        assert status["state"] == "finished" and status["step"] == 8
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 9))
        assert (ws / "data" / "processed" / "sft_walkthrough.meta.json").is_file()
    repo_runs_after = set((ROOT / "runs").glob("*")) if (ROOT / "runs").is_dir() else set()
    assert repo_runs_after == repo_runs_before, "the notebook wrote into the repository's runs/"


@pytest.mark.slow
def test_a_failing_cell_fails_the_headless_run(tmp_path: Path) -> None:
    """The harness is only worth something if an error stops it: a workspace without the sample
    data must make the walkthrough exit non-zero, naming the missing file."""
    ws = _workspace_copy(tmp_path)
    shutil.rmtree(ws / "data" / "samples")
    proc = _run(ROOT / "notebooks" / "sft_walkthrough.py", ws, timeout=300)
    assert proc.returncode != 0
    assert "bsl_sft.jsonl" in proc.stdout + proc.stderr
    assert not (ws / "runs").exists(), "training must not start after a failed prepare cell"

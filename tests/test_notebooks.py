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
        # the data the settings name (here none: the shipped sample), prepared as train does
        assert (ws / "data" / "processed" / "bsl_sft.meta.json").is_file()
        record = json.loads((run / "config.json").read_text())
        assert record["data"]["demo"] is True
        assert "the shipped 1C checks" in json.loads(
            (run / "eval" / "eval.json").read_text())["checks"]["file"]
    if nb.name == "dpo_walkthrough.py":
        sft = sorted((ws / "runs").glob("dpo-walkthrough-*-sft"))
        dpo = sorted((ws / "runs").glob("dpo-walkthrough-*-dpo"))
        assert len(sft) == 1 and len(dpo) == 1, sorted((ws / "runs").iterdir())
        merged = sorted((sft[0] / "merged").glob("*.pth"))
        assert len(merged) == 1 and merged[0].with_suffix(".verify.json").is_file()
        # a fresh DPO adapter on the merged SFT model, trained on preference pairs
        record = json.loads((dpo[0] / "config.json").read_text())
        assert Path(record["model"]["path"]).resolve() == merged[0].resolve()
        assert record["settings"]["data_type"] == "dpo"
        assert (dpo[0] / "reference_logps.pt").is_file()
        rows = [json.loads(x) for x in (dpo[0] / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert all("reward_margin" in r and "reward_acc" in r for r in rows)
        assert (dpo[0] / "rewards.png").stat().st_size > 1000
        assert "preference" in json.loads((dpo[0] / "eval" / "eval.json").read_text())
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


def test_bootstrap_installs_marimo():
    """The notebooks run in the environment scripts/bootstrap.sh makes: its default install
    names the extra that brings marimo (it used to be in the dev extra only)."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    with_marimo = {k for k, v in extras.items() if any(d.startswith("marimo") for d in v)}
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    default = re.search(r'^\s*extras="\[([\w,]*)\]"', boot, re.M)
    assert default, "bootstrap.sh installs no extra by default"
    assert with_marimo & set(default.group(1).split(",")), (default.group(1), with_marimo)


def test_notebook_state_folder_is_ignored():
    ignored = subprocess.run(["git", "check-ignore", "-q", "notebooks/__marimo__/session/x.json"],
                             cwd=ROOT, capture_output=True)
    assert ignored.returncode == 0, "notebooks/__marimo__/ is not in .gitignore"


@pytest.mark.slow
def test_the_walkthrough_trains_on_the_data_the_settings_name(tmp_path: Path) -> None:
    """DATA_FILE (here from the environment, as for `rwkvforge train`) is what the notebook
    prepares and trains on; its eval checks and chat question come from that data too."""
    ws = _workspace_copy(tmp_path)
    own = ws / "data" / "raw" / "mine.jsonl"
    own.parent.mkdir(parents=True)
    own.write_text("".join(json.dumps({"prompt": f"Сколько будет {i} + {i}?",
                                       "response": f"Ответ: {2 * i}."}) + "\n"
                           for i in range(40)), encoding="utf-8")
    env = dict(os.environ, RWKVFORGE_ROOT=str(ws), MPLBACKEND="Agg", CUDA_VISIBLE_DEVICES="",
               DATA_FILE="data/raw/mine.jsonl", DATA_TYPE="sft")
    proc = subprocess.run([sys.executable, str(ROOT / "notebooks" / "sft_walkthrough.py")],
                          cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (ws / "data" / "processed" / "mine.meta.json").is_file()
    assert not (ws / "data" / "processed" / "bsl_sft.meta.json").exists()
    run = next((ws / "runs").glob("sft-walkthrough-*"))
    record = json.loads((run / "config.json").read_text())
    assert record["data"]["demo"] is False and record["data"]["file"].endswith("mine.jsonl")
    checks = json.loads((run / "eval" / "eval.json").read_text())["checks"]
    assert "held-out" in checks["file"]
    assert all(it["prompt"].startswith("Сколько будет ") for it in checks["items"])

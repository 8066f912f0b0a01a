"""The training pre-flight uses the memory planner: a run predicted not to fit is refused
before any weights load, with the planner's suggestion; --force starts it anyway."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _ws(tmp_path: Path, tiny_model_path: Path) -> Path:
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "data" / "samples", root / "data" / "samples")
    (root / "pyproject.toml").write_text("")
    return root


def _train(root: Path, model: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RWKVFORGE_ROOT=str(root))
    return subprocess.run([sys.executable, "-m", "rwkvforge", "train", "--profile", "lora-bf16",
                           "--precision", "fp32", "--base-model", str(model), "--ctx-len", "64",
                           "--micro-bsz", "1", "--max-steps", "1", "--warmup-steps", "0",
                           "--no-progress", *extra], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_run_that_cannot_fit_is_refused_then_forced(tmp_path: Path, tiny_model_path: Path) -> None:
    root = _ws(tmp_path, tiny_model_path)
    out = _train(root, tiny_model_path, "--vram", "8MiB", "--run-name", "refused")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "exceeds the RAM budget" in out.stderr and "--force" in out.stderr
    assert not (root / "runs" / "refused" / "adapter").exists()
    out = _train(root, tiny_model_path, "--vram", "8MiB", "--run-name", "forced", "--force")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "runs" / "forced" / "adapter" / "adapter_config.json").exists()
    log = (root / "runs" / "forced" / "train.log").read_text()
    assert "--force" in log


@pytest.mark.slow
def test_bad_data_prepared_by_train_fails_cleanly_and_the_name_stays_free(
        tmp_path: Path, tiny_model_path: Path) -> None:
    root = _ws(tmp_path, tiny_model_path)
    data = root / "data" / "mine.jsonl"
    good = "".join(f'{{"text": "line {i} of the corpus, long enough to train on"}}\n'
                   for i in range(40))
    data.write_text(good + '{"text": "broken\n', encoding="utf-8")
    out = _train(root, tiny_model_path, "--data-file", str(data), "--data-type", "text",
                 "--run-name", "mine")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr
    assert f"train error: preparing the data: 1 invalid line(s) in {data}" in out.stderr
    assert f"{data}:41: invalid JSON" in out.stderr and "--skip-invalid" in out.stderr
    # a failed start leaves its log, its lock and a status of stage "setup": never a run
    assert {p.name for p in (root / "runs" / "mine").iterdir()} <= {"train.log", ".lock",
                                                                   "status.json"}
    assert "the run did not start: 1 invalid line(s)" in (root / "runs" / "mine" /
                                                           "train.log").read_text()
    data.write_text(good, encoding="utf-8")  # fixed: the same run name starts the run
    out = _train(root, tiny_model_path, "--data-file", str(data), "--data-type", "text",
                 "--run-name", "mine")
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "runs" / "mine" / "adapter" / "adapter_config.json").exists()


def test_fp16_training_is_refused_with_the_reason() -> None:
    from rwkvforge import config as cfgmod
    from rwkvforge.train import TrainError, check_combination

    check_combination(cfgmod.Settings(precision="bf16"))
    with pytest.raises(TrainError, match="loss scaling.*bf16"):
        check_combination(cfgmod.Settings(precision="fp16"))

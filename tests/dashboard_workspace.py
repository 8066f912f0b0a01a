"""A dashboard test workspace built the way a user builds one: a tiny random base model,
`rwkvforge prepare` on a small SFT JSONL and two short real `rwkvforge train` runs.

Shared by tests/test_dashboard.py and tests/test_dashboard_browser.py: the first caller in a
pytest session builds it under the session's base temp folder, later callers reuse it.
Nothing is faked: if training cannot run, the caller's test fails with the trainer's output.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_MODEL = "models/base/rwkv7-tiny-test.pth"
RUNS = (("run-a", "1e-3"), ("run-b", "3e-4"))
SFT_EXAMPLES = [
    {"messages": [{"role": "user", "content": "Сложи 2 и 3."},
                  {"role": "assistant", "content": "Результат = 2 + 3; // 5"}]},
    {"messages": [{"role": "system", "content": "You write 1C:Enterprise code."},
                  {"role": "user", "content": "Объяви переменную."},
                  {"role": "assistant", "content": "Перем Счетчик;"}]},
    {"prompt": "你好", "response": "你好！我能帮你什么？"},
    {"prompt": "Say hi", "response": "Hi there."},
    {"instruction": "Return 1", "input": "", "output": "Возврат 1;"},
    {"prompt": "Count to three", "response": "one, two, three"},
]


def _env(ws: Path) -> dict[str, str]:
    # drop settings from the developer's shell (e.g. LR=...), keep what processes need
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if not k.isupper() or k in keep}
    env.update(RWKVFORGE_ROOT=str(ws), OMP_NUM_THREADS="1")
    return env


def build_workspace(tmp_path_factory) -> Path:
    ws = tmp_path_factory.getbasetemp() / "dashboard-workspace"
    if (ws / "READY").is_file():
        return ws
    importlib.import_module("rwkvforge.train")  # must exist: no faked run folders
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd

    if ws.exists():
        shutil.rmtree(ws)  # a half-built one from a failed attempt in this session
    (ws / "configs").mkdir(parents=True)
    for sub in ("model", "profile"):
        if (ROOT / "configs" / sub).is_dir():
            shutil.copytree(ROOT / "configs" / sub, ws / "configs" / sub)
    (ws / "pyproject.toml").write_text("[project]\nname = 'ws'\n")
    base = ws / BASE_MODEL
    save_pth(make_random_model_sd(2, 128, seed=0), base)
    raw = ws / "data" / "raw" / "sft.jsonl"
    raw.parent.mkdir(parents=True)
    raw.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in SFT_EXAMPLES),
                   encoding="utf-8")
    env = _env(ws)
    prefix = ws / "data" / "processed" / "sft"
    out = subprocess.run([sys.executable, "-m", "rwkvforge.data.prepare", "--input", str(raw),
                          "--type", "sft", "--output-prefix", str(prefix), "--val-fraction",
                          "0.2", "--workers", "1", "--no-progress", "--ctx-len", "64"],
                         env=env, cwd=ws, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"rwkvforge prepare failed:\n{out.stdout}\n{out.stderr}"
    common = ["--base-model", str(base), "--data-file", str(raw), "--data-type", "sft",
              "--data-prefix", str(prefix), "--ctx-len", "64", "--max-steps", "3",
              "--save-every", "2", "--warmup-steps", "1", "--lora-r", "4",
              "--precision", "fp32", "--device", "cpu", "--no-progress"]
    # the two runs train side by side (one torch thread each) to keep the session short
    procs = {name: subprocess.Popen([sys.executable, "-m", "rwkvforge.train", *common,
                                     "--run-name", name, "--lr", lr],
                                    env=env, cwd=ws, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
             for name, lr in RUNS}
    for name, p in procs.items():
        out_text, _ = p.communicate(timeout=300)
        assert p.returncode == 0, f"rwkvforge train {name} failed ({p.returncode}):\n{out_text}"
    (ws / "READY").write_text("")
    return ws

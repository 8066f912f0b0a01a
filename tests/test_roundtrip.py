"""The whole pipeline, through the real command line, in a throw-away workspace:
prepare -> train -> merge -> infer -> serve, and the answers of the merged model (CLI and
server) equal those of base + adapter."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "Напиши процедуру, которая выводит сообщение пользователю."


def _run(args: list[str], root: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, RWKVFORGE_ROOT=str(root), PYTHONUNBUFFERED="1")
    out = subprocess.run([sys.executable, "-m", "rwkvforge", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"rwkvforge {' '.join(args)} failed:\n{out.stdout}\n{out.stderr}"
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_prepare_train_merge_infer_serve(tmp_path: Path, tiny_model_path: Path) -> None:
    root = tmp_path / "ws"
    (root / "data").mkdir(parents=True)
    shutil.copytree(ROOT / "configs", root / "configs")
    shutil.copytree(ROOT / "data" / "samples", root / "data" / "samples")
    (root / "pyproject.toml").write_text("")
    (root / "models" / "base").mkdir(parents=True)
    base = root / "models" / "base" / "tiny.pth"
    shutil.copy(tiny_model_path, base)

    # 1. prepare: masked SFT data from the shipped sample
    _run(["prepare", "--input", "data/samples/bsl_sft.jsonl", "--type", "sft",
          "--output-prefix", "data/processed/rt", "--ctx-len", "128", "--no-progress"], root)
    meta = json.loads((root / "data" / "processed" / "rt.meta.json").read_text())
    records = [x for x in (root / "data" / "samples" / "bsl_sft.jsonl").read_text(
        encoding="utf-8").splitlines() if x.strip()]
    assert meta["type"] == "sft" and meta["rejected"] == 0
    assert meta["documents"] == len(records) > 0
    assert (meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"]
            == meta["documents"])

    # 2. train a few fp32 LoRA steps with a checkpoint on the way
    _run(["train", "--profile", "lora-bf16", "--precision", "fp32", "--base-model", str(base),
          "--data-prefix", "data/processed/rt", "--ctx-len", "128", "--micro-bsz", "2",
          "--max-steps", "4", "--warmup-steps", "1", "--save-every", "2", "--lr", "1e-3",
          "--run-name", "rt", "--no-progress"], root)
    run = root / "runs" / "rt"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "finished" and status["step"] == 4
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 4
    assert (run / "checkpoints" / "step-2" / "COMPLETE").exists()
    assert (run / "adapter" / "adapter_config.json").exists()

    # 3. merge in fp32 (exact) and check its verification record
    _run(["merge", "--adapter", str(run / "adapter"), "--base-model", str(base), "--dtype", "fp32",
          "--out", str(run / "merged" / "rt.pth")], root)
    merged = run / "merged" / "rt.pth"
    assert merged.exists()
    verify = json.loads((run / "merged" / "rt.verify.json").read_text())
    assert verify["passed"] is True and verify["output"] == "rt.pth" and verify["dtype"] == "fp32"
    assert verify["checks"]["logits"]["passed"] is True
    assert verify["checks"]["rwkv_pip"]["passed"] is True
    assert verify["sha256"] == hashlib.sha256(merged.read_bytes()).hexdigest()
    assert not (run / "merged" / "rt.verify-failed.json").exists()

    # 4. infer, greedy: merged model == base + adapter (merged in memory)
    common = ["infer", "--prompt", PROMPT, "--max-tokens", "12", "--temperature", "0",
              "--seed", "1"]
    a = _run([*common, "--base-model", str(merged)], root).stdout.strip()
    b = _run([*common, "--base-model", str(base), "--adapter", str(run / "adapter")],
             root).stdout.strip()
    assert a and a == b

    # 5. serve the merged model; the official client gets the same greedy answer
    from openai import OpenAI

    port = _free_port()
    env = dict(os.environ, RWKVFORGE_ROOT=str(root))
    proc = subprocess.Popen([sys.executable, "-m", "rwkvforge", "serve", "--base-model",
                             str(merged), "--serve-port", str(port), "--log-level", "warning"],
                            cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        deadline = time.time() + 120
        while True:
            try:
                client.models.list()
                break
            except Exception:  # noqa: BLE001 - still starting
                if time.time() > deadline or proc.poll() is not None:
                    raise AssertionError(f"server did not start:\n{proc.stdout.read() if proc.poll() is not None else ''}")
                time.sleep(0.5)
        r = client.chat.completions.create(model="rt", max_tokens=12, temperature=0, seed=1,
                                           messages=[{"role": "user", "content": PROMPT}])
        served = r.choices[0].message.content
        assert r.usage.completion_tokens >= 1
        assert served.strip() and served.strip() in a
    finally:
        proc.terminate()
        proc.wait(timeout=30)

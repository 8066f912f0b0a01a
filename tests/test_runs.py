"""The run folder readers (rwkvforge.runs): which run an adapter path belongs to, its settings,
base model, data and final adapter, where merge writes by default, tolerant JSON / metrics
reading, and quickstart's merged-path lookup answering the very file merge wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rwkvforge import runs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run(tmp_path) -> Path:
    r = tmp_path / "runs" / "r1"
    (r / "checkpoints" / "step-4").mkdir(parents=True)
    (r / "adapter").mkdir()
    (r / "config.json").write_text(json.dumps({
        "model": {"path": "/m/base.pth"}, "data": {"prefix": "data/processed/x"},
        "settings": {"ctx_len": 256, "quant": "nf4"}}))
    return r


def test_run_of_an_adapter_path(run, tmp_path):
    assert runs.run_of(run / "adapter") == run.resolve()
    assert runs.run_of(run / "checkpoints" / "step-4") == run.resolve()
    assert runs.run_of(run / "adapter" / "adapter_model.safetensors") == run.resolve()
    (tmp_path / "loose" / "adapter").mkdir(parents=True)
    assert runs.run_of(tmp_path / "loose" / "adapter") is None
    assert runs.final_adapter(run) == run / "adapter"


def test_what_a_run_config_says(run, tmp_path):
    cfg = runs.run_config(run)
    assert runs.run_settings(cfg) == {"ctx_len": 256, "quant": "nf4"}
    assert runs.run_base_model(cfg) == Path("/m/base.pth")
    assert runs.run_data_prefix(cfg) == Path("data/processed/x")
    empty = runs.run_config(None)
    assert empty == {} and runs.run_base_model(empty) is None and runs.run_settings(empty) == {}
    (run / "config.json").write_text('{"model":\n  {"path": ')  # half-written
    assert runs.run_config(run) == {}
    with pytest.raises(runs.RunError, match=r"config.json:2: invalid JSON"):
        runs.run_config(run, strict=True)
    assert runs.run_config(tmp_path, strict=True) == {}  # not a run: nothing to read


def test_merged_path_names(run, tmp_path, monkeypatch):
    assert runs.merged_path(run / "adapter", "bf16") == run.resolve() / "merged" / "r1-bf16.pth"
    assert (runs.merged_path(run / "checkpoints" / "step-4", "fp16")
            == run.resolve() / "merged" / "r1-step-4-fp16.pth")
    monkeypatch.setenv("RWKVFORGE_ROOT", str(tmp_path))
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "x").mkdir()
    torch.save({}, tmp_path / "x" / "rwkv-3.pth")
    assert runs.merged_path(tmp_path / "x" / "rwkv-3.pth", "fp32") == \
        tmp_path / "models" / "merged" / "rwkv-3-fp32.pth"


def test_read_json_and_metrics_are_tolerant(tmp_path):
    assert runs.read_json(tmp_path / "missing.json") is None
    (tmp_path / "s.json").write_text('{"state": "runn')
    assert runs.read_json(tmp_path / "s.json") is None
    (tmp_path / "l.json").write_text("[1, 2]")
    assert runs.read_json(tmp_path / "l.json") is None  # not an object
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in runs.read_metrics(m)] == [1, 2]  # torn last line waits
    with open(m, "a") as f:
        f.write('ss": 1.0}\n')
    assert [r["step"] for r in runs.read_metrics(m)] == [1, 2, 3]
    folder = runs.RunFolder(tmp_path)
    folder.truncate_metrics(2)  # a resume rewrites the file: read again from the start
    assert [r["step"] for r in folder.read_metrics()] == [1, 2]


def test_quickstart_merged_path_is_the_file_merge_writes(tmp_path):
    """scripts/quickstart.sh runs `merge --adapter RUN/adapter` (default dtype) and then asks
    `python -m rwkvforge.runs merged-path RUN` for the file: it must be the one merge wrote."""
    from rwkvforge import adapter as A
    from rwkvforge import merge as M
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd

    qs = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert 'cli merge --adapter "$RUN_DIR/adapter"\n' in qs  # default dtype, default output
    assert 'MERGED="$("$PY" -m rwkvforge.runs merged-path "$RUN_DIR")"' in qs

    sd = make_random_model_sd(1, 64, vocab_size=256, seed=0)
    base = save_pth(sd, tmp_path / "base.pth")
    run = tmp_path / "runs" / "qs"
    g = torch.Generator().manual_seed(0)
    A.save_adapter(run / "adapter", {"peft_type": "LORA", "r": 2, "lora_alpha": 2.0,
                                     "target_modules": A.target_regex(["att.key"])},
                   {f"{A.PEFT_PREFIX}blocks.0.att.key.lora_A.weight": torch.randn(2, 64, generator=g),
                    f"{A.PEFT_PREFIX}blocks.0.att.key.lora_B.weight": torch.randn(64, 2, generator=g)})
    (run / "config.json").write_text(json.dumps({"model": {"path": str(base)}}))
    res = M.merge(base, run / "adapter", runtime_check=False, log=lambda m: None)
    assert res.output.is_file()
    p = subprocess.run([sys.executable, "-m", "rwkvforge.runs", "merged-path", str(run)],
                       capture_output=True, text=True, timeout=120, env=dict(os.environ))
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()) == res.output.resolve()


# ------------------------------------------------------------------ issue 27: 3 (quickstart)
def _prepared(tmp_path: Path, name: str, records: list[dict], data_type: str) -> Path:
    from rwkvforge.data.prepare import Options, run as prepare

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")
    prepare(Options(input=src, prefix=tmp_path / name, data_type=data_type, ctx_len=64, seed=5,
                    val_fraction=0.25, workers=1, progress=False), log=lambda *a: None)
    return tmp_path / name


def _quickstart_ask(run_dir: Path) -> tuple[str, str, str]:
    """The chat step of scripts/quickstart.sh, its own lines run by bash: (MODE, PROMPT, the
    extra infer flags)."""
    qs = (ROOT / "scripts" / "quickstart.sh").read_text().splitlines()
    a = next(i for i, x in enumerate(qs) if x.startswith("ASK="))
    b = next(i for i, x in enumerate(qs) if x.startswith('[[ "$MODE" == raw ]]'))
    script = "\n".join(["set -euo pipefail", *qs[a: b + 1],
                        'printf "%s\\0%s\\0%s" "$MODE" "$PROMPT" "${raw[*]+${raw[*]}}"'])
    env = dict(os.environ, PY=sys.executable, RUN_DIR=str(run_dir))
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                       env=env)
    assert p.returncode == 0, p.stderr
    mode, prompt, flags = p.stdout.split("\0")
    return mode, prompt, flags


@pytest.mark.slow  # three python processes (torch imports): ~1 min on 2 busy cores
def test_quickstart_asks_a_question_of_the_data_used(tmp_path):
    """Your own SFT data: the first held-out question, verbatim; text data: the start of a
    held-out document as a plain completion (--raw); the demo data: the 1C question."""
    qa = [{"prompt": f"Назови столицу страны номер {i}.", "response": f"Столица {i}."}
          for i in range(8)]
    sft = _prepared(tmp_path, "sft", qa, "sft")
    run = tmp_path / "own"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"prefix": str(sft), "demo": False}}))
    mode, prompt, flags = _quickstart_ask(run)
    assert mode == "chat" and flags == ""
    assert prompt == runs.held_out_turns(sft, 1)[0][0] and prompt in {r["prompt"] for r in qa}
    assert prompt != runs.DEMO_QUESTION
    # the val split holds it (2 of 8 held out), not the first line of the file
    val = json.loads(Path(f"{sft}.meta.json").read_text())["splits"]["val"]["documents"]
    assert val == 2

    text = _prepared(tmp_path, "text", [{"text": f"Глава {i}.\nТекст главы {i}."}
                                        for i in range(8)], "text")
    (run / "config.json").write_text(json.dumps({"data": {"prefix": str(text), "demo": False}}))
    mode, prompt, flags = _quickstart_ask(run)
    assert mode == "raw" and flags == "--raw" and prompt.startswith("Глава ")

    (run / "config.json").write_text(json.dumps({"data": {"prefix": str(sft), "demo": True}}))
    assert _quickstart_ask(run) == ("chat", runs.DEMO_QUESTION, "")
    assert runs.DEMO_QUESTION not in (ROOT / "scripts" / "quickstart.sh").read_text()

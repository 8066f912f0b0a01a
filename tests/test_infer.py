"""Tests for rwkvforge.infer and scripts/infer_albatross.py: one-shot chat / raw prompts
streamed to stdout (compared with the engine run directly), the `rwkv` pip back-end giving
the same greedy text as the built-in one, LoopRunner sampling the engine's tokens for the
same seed (one sampling step), the interactive REPL reusing earlier turns from
the prefix cache, and clear errors for a missing model or an unavailable back-end.

    /tmp/v1/bin/python -m pytest tests/test_infer.py -q
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from rwkvforge import infer
from rwkvforge.generate import CHAT_STOP, Engine, chat_params, encode_chat_prompt, set_fast_path
from rwkvforge.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    from rwkvforge.tokenizer import get_tokenizer

    return get_tokenizer()


def _greedy(model_path, ids, n, chat: bool) -> str:
    """What infer must print with only --temperature 0: the other flags default to the chat
    defaults (penalties on), and a chat reply ends at CHAT_STOP."""
    from rwkvforge.checkpoint import load_model
    from rwkvforge.tokenizer import get_tokenizer

    from rwkvforge.config import Settings

    p = chat_params(temperature=0, max_tokens=n)
    if not chat:
        p.stop = ()
    model = load_model(model_path)
    set_fast_path(model, Settings().infer_fast, "cpu")  # the default INFER_FAST, as infer's
    eng = Engine(model, get_tokenizer())
    return eng.generate(ids, p).result()


def test_one_shot_chat_streams_the_engine_answer(tiny_model_path, tok, capsys):
    rc = infer.main(["--base-model", str(tiny_model_path), "--prompt", "Hello there",
                     "--max-tokens", "8", "--temperature", "0", "--system", "Be kind."])
    assert rc == 0
    out = capsys.readouterr().out
    ids, _ = encode_chat_prompt([{"role": "system", "content": "Be kind."},
                                 {"role": "user", "content": "Hello there"}], tok)
    assert out == _greedy(tiny_model_path, ids, 8, chat=True).lstrip() + "\n"


def test_raw_prompt(tiny_model_path, tok, capsys):
    rc = infer.main(["--base-model", str(tiny_model_path), "--raw", "--prompt", "def f(x):",
                     "--max-tokens", "6", "--temperature", "0"])
    assert rc == 0
    assert capsys.readouterr().out == _greedy(tiny_model_path, tok.encode("def f(x):"), 6,
                                              chat=False) + "\n"


@pytest.mark.slow
def test_rwkv_pip_backend_matches_builtin(tiny_model_path):
    """Same greedy text from the `rwkv` package (fresh process: it reads RWKV_V7_ON on
    import) as from the built-in model run through scripts/infer_albatross.py."""
    args = ["--base-model", str(tiny_model_path), "--raw", "--prompt", "The weather today",
            "--max-tokens", "8", "--temperature", "0", "--presence-penalty", "0",
            "--frequency-penalty", "0"]
    env = {**os.environ, "RWKVFORGE_ROOT": str(ROOT)}
    outs = {}
    for backend, entry in (("builtin", [str(ROOT / "scripts" / "infer_albatross.py")]),
                           ("rwkv", ["-m", "rwkvforge.infer"])):
        p = subprocess.run([sys.executable, *entry, *args, "--infer-backend", backend],
                           capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        outs[backend] = p.stdout
    assert outs["rwkv"] == outs["builtin"] and len(outs["rwkv"].strip()) > 0


def test_repl_reuses_earlier_turns(tiny_model_path, tok, capsys):
    runner = infer.BuiltinRunner(tiny_model_path, tok, infer.DTYPES["fp32"], "cpu")
    lines = iter(["hi", "tell me more", "/reset", "again", "/quit"])
    params = lambda chat: SamplingParams(temperature=0, max_tokens=5,  # noqa: E731
                                         stop=CHAT_STOP if chat else ())
    rc = infer.repl(runner, tok, "", params, read=lambda _: next(lines))
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("Assistant: ") == 3
    # turn 2 starts with turn 1's prompt: its state came from the prefix cache
    assert runner.engine.cache.hits >= 1


def test_repl_survives_bad_lines_and_a_stopped_reply(tiny_model_path, tok, capsys):
    """A line that is not UTF-8 (surrogate-escaped by the terminal) is ignored, and Ctrl-C
    during a reply stops that reply only: the chat goes on without the dropped turn."""
    runner = infer.BuiltinRunner(tiny_model_path, tok, infer.DTYPES["fp32"], "cpu")
    real, calls = runner.generate, []

    def generate(ids, *a, **kw):
        calls.append(ids)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(ids, *a, **kw)

    runner.generate = generate
    lines = iter(["hi \udcff there", "first", "second", "/quit"])
    params = lambda chat: SamplingParams(temperature=0, max_tokens=3,  # noqa: E731
                                         stop=CHAT_STOP if chat else ())
    assert infer.repl(runner, tok, "", params, read=lambda _: next(lines)) == 0
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "[reply stopped; that turn is dropped]" in err
    assert len(calls) == 2  # the bad line never reached the model
    second, _ = encode_chat_prompt([{"role": "user", "content": "second"}], tok)
    assert calls[1] == second  # "first" was dropped with its stopped reply


def _loop_runner_over(model, tok) -> infer.LoopRunner:
    """A LoopRunner over the built-in model, called as the engine calls it (prompt pieces
    through forward_hidden + head, decoded tokens through step), so both see the same
    logits bit for bit."""
    import torch

    def forward(ids, state):
        with torch.no_grad():
            if state is None:
                state = model.init_state(1)
            if len(ids) > 1:
                hidden, state = model.forward_hidden(torch.tensor([ids]), state)
                return model.head(hidden[:, -1]).float()[0], state
            logits, state = model.step(torch.tensor(ids), state)
            return logits[0], state

    return infer.LoopRunner("loop", forward, tok)


def test_loop_runner_samples_like_the_engine(tiny_model, tok):
    """One sampling step for both: the same logits, parameters and seed give the same
    tokens through generate.Engine and infer.LoopRunner (penalties and nucleus on)."""
    ids = tok.encode("Once upon a time there was")
    runner = _loop_runner_over(tiny_model, tok)
    texts = {}
    for seed in (7, 8):
        p = SamplingParams(temperature=1.0, top_p=0.6, alpha_presence=0.5,
                           alpha_frequency=0.5, max_tokens=12, seed=seed, token_stop=())
        h = Engine(tiny_model, tok, cache_prompts=False).generate(ids, p)
        text, reason, n = runner.generate(ids, p, lambda t: None)
        assert (text, reason, n) == (h.result(), h.finish_reason, h.completion_tokens)
        texts[seed] = text
    assert texts[7] != texts[8]  # the seed matters: the match above is not a greedy one


def test_missing_model_and_backend_errors(tmp_path, tiny_model_path, tok, capsys):
    rc = infer.main(["--base-model", str(tmp_path / "nope.pth"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and "model file not found" in err and "nope.pth" in err
    with pytest.raises(infer.InferError, match="third_party/Albatross"):
        infer.make_runner("albatross", tiny_model_path, tok, device="cpu", dtype="fp32",
                          root=tmp_path)
    (tmp_path / "third_party" / "Albatross" / "reference").mkdir(parents=True)
    (tmp_path / "third_party" / "Albatross" / "reference" / "rwkv7.py").write_text("")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(infer.InferError, match="CUDA"):
            infer.make_runner("albatross", tiny_model_path, tok, device="cpu", dtype="fp32",
                              root=tmp_path)
    with pytest.raises(infer.InferError, match="builtin"):
        infer.make_runner("rwkv", tiny_model_path, tok, device="cpu", dtype="fp32",
                          adapter=str(tmp_path))


def test_default_model_is_the_demo(tmp_path):
    from rwkvforge.checkpoint import CheckpointError
    from rwkvforge.demo import resolve_base_model

    with pytest.raises(CheckpointError, match="demo model missing"):
        resolve_base_model("", root=tmp_path, generate=False)
    path, is_demo = resolve_base_model("", root=tmp_path, say=lambda m: None)
    assert is_demo and path.is_file() and path.parent == tmp_path / "models" / "base"


def test_missing_model_names_the_dated_download_beside_it(tmp_path):
    """configs/model/rwkv7-1.5b.env names models/base/rwkv7-g1-1.5b.pth; BlinkDL's download
    carries a date: the error names it and the link to make."""
    from rwkvforge.checkpoint import CheckpointError
    from rwkvforge.demo import resolve_base_model

    base = tmp_path / "models" / "base"
    base.mkdir(parents=True)
    want = "models/base/rwkv7-g1-1.5b.pth"
    with pytest.raises(CheckpointError) as ei:
        resolve_base_model(want, "configs/model/rwkv7-1.5b.env:5", root=tmp_path)
    assert "model file not found" in str(ei.value) and "ln -s" not in str(ei.value)
    (base / "rwkv7-g1-1.5b-20250429-ctx4096.pth").write_bytes(b"")
    (base / "rwkv7-g1-0.4b-20250324-ctx4096.pth").write_bytes(b"")
    with pytest.raises(CheckpointError) as ei:
        resolve_base_model(want, "configs/model/rwkv7-1.5b.env:5", root=tmp_path)
    assert (f"{base} has rwkv7-g1-1.5b-20250429-ctx4096.pth: link it under the expected name "
            f"(ln -s rwkv7-g1-1.5b-20250429-ctx4096.pth {base / 'rwkv7-g1-1.5b.pth'})"
            in str(ei.value)) and "0.4b" not in str(ei.value)


def test_model_flag_takes_a_config_layer_not_a_file(tiny_model_path, capsys):
    """--model names a configs/model/*.env layer for every command; a .pth there is refused
    with the flag that takes it (it used to be read as the base model by infer only)."""
    assert infer.main(["--model", str(tiny_model_path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "configs/model/*.env" in err and f"--base-model {tiny_model_path}" in err


def test_entry_script_help():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "infer_albatross.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--prompt" in p.stdout and "albatross" in p.stdout


def test_infer_fast_sets_the_model_fast_path_and_stays_close(tiny_model_path, tok):
    """INFER_FAST reaches the model (int8 / bf16 kernels on CPU), its greedy answer
    follows the exact one's first tokens on this model, and a bad value or a CUDA device is
    handled, not silently misread."""
    import torch

    exact = infer.BuiltinRunner(tiny_model_path, tok, infer.DTYPES["fp32"], "cpu")
    assert exact.model.infer_dtype is None
    ids = tok.encode("Процедура ПриОткрытии()")
    with torch.no_grad():
        ref, _ = exact.model(torch.tensor([ids]))
    for fast, dt in (("int8", torch.int8), ("bf16", torch.bfloat16)):
        r = infer.make_runner("builtin", tiny_model_path, tok, device="cpu", dtype="fp32",
                              fast=fast)
        assert r.model.infer_dtype is dt
        with torch.no_grad():
            got, _ = r.model(torch.tensor([ids]))
            state = r.model.init_state(1)
            for t in ids:  # the decode path (1 row: fbgemm / weight-only int8 GEMV)
                step, state = r.model.step(torch.tensor([t]), state)
        assert not torch.equal(got, ref)
        for a in (got[0, -1], step[0]):
            assert (a - ref[0, -1]).abs().max() < 0.05 * ref[0, -1].abs().max()
    m = exact.model
    with pytest.raises(ValueError, match="INFER_FAST"):
        set_fast_path(m, "int4", "cpu")
    set_fast_path(m, "int8", "cuda")  # a CPU path: not used on CUDA
    assert m.infer_dtype is None


def test_entry_script_moves_to_the_workspace_environment():
    """`python scripts/infer_albatross.py` run by a python without torch (the system one, as
    the docs write it) re-runs itself in the workspace environment (VENV_DIR)."""
    base = Path(sys.base_prefix) / "bin" / "python3"
    if not base.is_file() or subprocess.run([str(base), "-c", "import torch"],
                                            capture_output=True).returncode == 0:
        pytest.skip("no python without torch to start from")
    env = {**os.environ, "VENV_DIR": sys.prefix}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([str(base), str(ROOT / "scripts" / "infer_albatross.py"), "--help"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "usage: rwkvforge infer" in out.stdout, out.stderr
    out = subprocess.run([str(base), str(ROOT / "scripts" / "infer_albatross.py"), "--help"],
                         capture_output=True, text=True, timeout=300,
                         env={**env, "VENV_DIR": "/nonexistent"})
    assert out.returncode == 1 and "run ./scripts/bootstrap.sh first" in out.stderr


def test_nan_base_model_is_named_not_an_empty_answer(tmp_path, capsys):
    """A base whose weights hold NaN: infer exits 2 naming the tensor (it used to exit 0
    with an empty answer)."""
    from rwkvforge.checkpoint import save_pth
    from rwkvforge.demo import make_random_model_sd

    sd = make_random_model_sd(2, 64, head_size=32, seed=1, dim_ffn=192)
    sd["blocks.1.att.output.weight"][:, 0] = float("inf")
    base = save_pth(sd, tmp_path / "nan.pth")
    rc = infer.main(["--base-model", str(base), "--prompt", "Hello"])
    err = capsys.readouterr().err
    assert rc == 2 and "tensor blocks.1.att.output.weight holds 64 NaN/Inf" in err


def test_every_infer_flag_says_what_it_does():
    """`infer --help` explains every flag, --max-tokens and --temperature included (issue 27,
    item 7: they had none)."""
    ap = infer.build_parser()
    bare = [a.option_strings[0] for a in ap._actions
            if a.option_strings and not a.help]
    assert not bare, f"flags without help: {bare}"
    text = ap.format_help()
    for flag in ("--max-tokens", "--temperature", "--top-p", "--top-k"):
        assert flag in text


def test_adapter_of_a_lora_plus_state_run_names_the_state_it_leaves_out(tiny_model, tiny_model_path,
                                                                        tmp_path, capsys):
    """`infer --adapter runs/<run>` of a TRAIN_TYPE=lora+state run answered from base + adapter
    without a word about the run's tuned state; it now says to add --state."""
    import json

    from rwkvforge import adapter as A
    from rwkvforge import peft as rp

    spec = rp.AdapterSpec(r=4, alpha=8.0)
    run = tmp_path / "runs" / "ls"
    A.save_adapter(run / "adapter", *rp.export_adapter(rp.apply_adapter(tiny_model, spec), spec))
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tiny_model_path)}}))
    (run / "state").mkdir()
    (run / "state" / "state.pth").write_bytes(b"")  # not read without --state
    argv = ["--base-model", str(tiny_model_path), "--adapter", str(run), "--prompt", "Hi",
            "--max-tokens", "2", "--temperature", "0"]
    assert infer.main(argv) == 0
    err = capsys.readouterr().err
    assert f"this run also tuned an initial state ({run / 'state'})" in err
    assert f"--state {run} with infer" in err
    (run / "state" / "state.pth").unlink()
    assert infer.main(argv) == 0
    assert "initial state" not in capsys.readouterr().err


def test_adapter_of_a_run_loads_the_base_that_run_trained_on(tiny_model, tiny_model_path,
                                                              tmp_path, capsys, monkeypatch):
    """`infer --adapter runs/<run>` loaded BASE_MODEL (the demo model when unset) whatever the
    run trained on; like merge and eval it now takes the run's base unless --base-model says
    otherwise on the command line."""
    import json

    from rwkvforge import adapter as A
    from rwkvforge import peft as rp
    from rwkvforge.demo import write_demo_model

    other = tmp_path / "other.pth"
    write_demo_model(other, 1, 64)  # another shape: the adapter does not fit it
    spec = rp.AdapterSpec(r=4, alpha=8.0)
    run = tmp_path / "runs" / "r1"
    A.save_adapter(run / "adapter", *rp.export_adapter(rp.apply_adapter(tiny_model, spec), spec))
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tiny_model_path)}}))
    monkeypatch.setenv("BASE_MODEL", str(other))
    tail = ["--prompt", "Hi", "--max-tokens", "2", "--temperature", "0"]
    for adapter in (run, run / "adapter"):
        assert infer.main(["--adapter", str(adapter), *tail]) == 0
        err = capsys.readouterr().err
        assert (f"using the base model the adapter's run trained on: {tiny_model_path}" in err
                and f"BASE_MODEL says {other}" in err)
    # given on the command line, BASE_MODEL wins (and here does not fit the adapter)
    assert infer.main(["--base-model", str(other), "--adapter", str(run), *tail]) == 2
    assert "using the base model" not in capsys.readouterr().err
    # the run's base moved away: BASE_MODEL as configured
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tmp_path / "gone.pth")}}))
    assert infer.main(["--adapter", str(run), *tail]) == 2
    assert "using the base model" not in capsys.readouterr().err

"""Evaluation: base vs tuned on a real (short) LoRA training run of the tiny model, loss and
perplexity (masks honoured, ppl = exp(loss)), prompt-check pass rates on a controlled case,
results written atomically to <run>/eval/."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rwkvforge import evaluate as E

CTX = 64


@pytest.fixture(scope="module")
def sft_jsonl(tmp_path_factory) -> Path:
    from rwkvforge import paths

    lines = (paths.sample_data_dir() / "bsl_sft.jsonl").read_text(encoding="utf-8").splitlines()[:3]
    p = tmp_path_factory.mktemp("data") / "val.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def trained_run(tiny_model_path, sft_jsonl, tmp_path_factory) -> Path:
    """A real short LoRA run (peft on the tiny model, AdamW, masked SFT loss) on 4 records,
    saved the way training saves its adapter (runs/<run>/adapter, PEFT layout)."""
    from rwkvforge import peft as rp
    from rwkvforge.adapter import save_adapter
    from rwkvforge.checkpoint import load_model

    torch.manual_seed(0)
    spec = rp.AdapterSpec(r=8, alpha=16.0, targets=rp.LORA_TARGETS)
    pm = rp.apply_adapter(load_model(tiny_model_path), spec)
    model = rp.unwrap(pm)
    batches, _ = E.val_batches(sft_jsonl, CTX, 4)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(6):
        for b in batches:
            logits, _ = model(b["input_ids"])
            ce = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="none")
            loss = (ce * b["loss_mask"].flatten()).sum() / b["loss_mask"].sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
    run = tmp_path_factory.mktemp("runs") / "tiny-run"
    cfg, tensors = rp.export_adapter(pm, spec)
    save_adapter(run / "adapter", cfg, tensors)
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tiny_model_path)},
                                                 "settings": {"ctx_len": CTX}}))
    return run


def test_pass_rate_controlled():
    checks = [E.Check("p", "КонецПроцедуры", "substring"), E.Check("p", r"Функция\s+\w+\(", "regex"),
              E.Check("p", "x", "substring"), E.Check("p", r"^\d+$", "regex")]
    answers = ["Процедура А()\nКонецПроцедуры", "Функция Сумма(А, Б)", "y", "12a"]
    r = E.pass_rate(checks, answers)
    assert r["results"] == [True, True, False, False] and r["passed"] == 2 and r["rate"] == 0.5


def test_checks_file_errors_name_the_line(tmp_path):
    p = tmp_path / "c.jsonl"
    p.write_text('{"prompt": "a", "expect": "b"}\n\n{"prompt": "a", "expect": "b", "kind": "glob"}\n')
    with pytest.raises(E.EvalError, match=r"c.jsonl:3: kind='glob'"):
        E.load_checks(p)
    p.write_text('{"prompt": "a", "expect": "(", "kind": "regex"}\n')
    with pytest.raises(E.EvalError, match=r"c.jsonl:1: expect is not a valid regex"):
        E.load_checks(p)
    p.write_text('{"prompt": "a"}\n')
    with pytest.raises(E.EvalError, match=r"c.jsonl:1: field 'expect'"):
        E.load_checks(p)


def test_sample_checks_file_is_valid():
    from rwkvforge import paths

    checks = E.load_checks(paths.sample_data_dir() / "bsl_checks.jsonl")
    assert len(checks) >= 10 and {c.kind for c in checks} <= set(E.CHECK_KINDS)


def test_masked_loss_matches_direct_computation(tiny_model, sft_jsonl):
    """Masks honoured: only assistant tokens count, and the loss equals a direct full-logits
    computation with the tokenizer's own chat masks."""
    from rwkvforge.data.records import record_to_messages
    from rwkvforge.tokenizer import encode_chat

    batches, _ = E.val_batches(sft_jsonl, CTX, 3)
    res = E.masked_loss(tiny_model, batches, head_chunk=17)  # odd chunk: exercises the seams
    total = n = 0.0
    for line in sft_jsonl.read_text(encoding="utf-8").splitlines():
        ids, mask = encode_chat(record_to_messages(json.loads(line)))
        ids, mask = ids[: CTX + 1], mask[: CTX + 1]
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids[:-1]]))[0][0]
        ce = F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
        m = torch.tensor(mask[1:], dtype=torch.float32)
        total += float((ce * m).sum())
        n += float(m.sum())
    assert res["tokens"] == int(n) and 0 < n < sum(b["input_ids"].numel() for b in batches)
    assert res["loss"] == pytest.approx(total / n, rel=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]), rel=1e-9)


@pytest.mark.slow  # a real training run: ~30 s on 2 busy cores
def test_eval_base_vs_tuned(trained_run, tiny_model_path, sft_jsonl, tmp_path):
    checks = tmp_path / "checks.jsonl"
    checks.write_text("\n".join(json.dumps(c, ensure_ascii=False) for c in [
        {"prompt": "Напиши процедуру.", "expect": "", "kind": "substring"},  # always passes
        {"prompt": "Напиши функцию.", "expect": "\u0000never", "kind": "substring"},  # never
        {"prompt": "Что такое запрос?", "expect": r"^[\s\S]*$", "kind": "regex"},  # always
        {"prompt": "Привет", "expect": r"(?!)", "kind": "regex"},  # never
    ]) + "\n", encoding="utf-8")
    rc = E.main(["--run", str(trained_run), "--val", str(sft_jsonl), "--checks", str(checks),
                 "--max-tokens", "6"])
    assert rc == 0
    res = json.loads((trained_run / "eval" / "eval.json").read_text(encoding="utf-8"))
    base, tuned = res["loss"]["base"], res["loss"]["tuned"]
    # the run trained on exactly this data: the tuned model must fit it better
    assert tuned["loss"] < base["loss"] - 0.5
    for r in (base, tuned):
        assert r["ppl"] == pytest.approx(math.exp(r["loss"]), rel=1e-9)
    assert res["loss"]["delta"] == pytest.approx(tuned["loss"] - base["loss"])
    for name in ("base", "tuned"):
        assert res["checks"][name] == {"passed": 2, "total": 4, "rate": 0.5}
    for it in res["checks"]["items"]:  # recorded verdicts agree with the recorded answers
        c = E.Check(it["prompt"], it["expect"], it["kind"])
        assert it["base_pass"] == c.passes(it["base_answer"])
        assert it["tuned_pass"] == c.passes(it["tuned_answer"])
    report = (trained_run / "eval" / "report.md").read_text(encoding="utf-8")
    assert "| perplexity |" in report and "Напиши процедуру." in report
    assert not list((trained_run / "eval").glob("*.tmp"))


@pytest.mark.slow
def test_eval_merged_file_matches_adapter(trained_run, tiny_model_path, sft_jsonl, tmp_path):
    """--tuned with the merged fp32 file gives the adapter's loss."""
    from rwkvforge.merge import merge

    out = tmp_path / "merged.pth"
    merge(tiny_model_path, trained_run / "adapter", out, "fp32", runtime_check=False, log=lambda m: None)
    r1 = E.evaluate(trained_run, tiny_model_path, trained_run / "adapter", None, sft_jsonl, None,
                    tmp_path / "e1", CTX, log=lambda m: None)
    r2 = E.evaluate(trained_run, tiny_model_path, None, out, sft_jsonl, None, tmp_path / "e2", CTX,
                    log=lambda m: None)
    assert r2["loss"]["tuned"]["loss"] == pytest.approx(r1["loss"]["tuned"]["loss"], abs=1e-4)
    assert r1["loss"]["base"] == r2["loss"]["base"] and "checks" not in r1


def test_eval_binidx_val_split(tiny_model, tmp_path):
    """A prepared prefix: its val split is read through data/loader.py, masks included."""
    from rwkvforge import paths
    from rwkvforge.data import prepare

    prefix = tmp_path / "bsl"
    rc = prepare.main(["--input", str(paths.sample_data_dir() / "bsl_sft.jsonl"), "--type", "sft",
                       "--output-prefix", str(prefix), "--no-progress", "--val-fraction", "0.1"])
    assert rc == 0
    batches, desc = E.val_batches(prefix, CTX, 4)
    assert "val split" in desc and batches
    masked = sum(float(b["loss_mask"].sum()) for b in batches)
    assert 0 < masked < sum(b["input_ids"].numel() for b in batches)  # prompts are masked out
    r = E.masked_loss(tiny_model, batches)
    assert r["tokens"] == int(masked) and math.isfinite(r["loss"])


def test_one_document_holds_none_out_and_both_stages_say_why(tmp_path):
    """A folder with one text file (VAL_FRACTION=0.05): prepare warned of nothing, and eval
    blamed 'VAL_FRACTION=0?' (quickstart's eval step failed on it)."""
    from rwkvforge.data import prepare

    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("The quick brown fox. " * 200, encoding="utf-8")
    lines: list[str] = []
    prefix = tmp_path / "notes"
    prepare.run(prepare.Options(input=tmp_path / "docs", prefix=prefix, data_type="text",
                                val_fraction=0.05, workers=1, progress=False),
                log=lambda m, *a, **k: lines.append(str(m)))
    warn = next(x for x in lines if "no validation split" in x)
    assert "VAL_FRACTION=0.05" in warn and "(there is 1)" in warn and "several files" in warn
    with pytest.raises(E.EvalError, match=r"no validation split \(VAL_FRACTION=0.05 holds out "
                       r"whole documents and the data has 1\); .*--val"):
        E.val_batches(prefix, CTX, 4)


def test_bad_inputs(tiny_model_path, tmp_path, capsys):
    assert E.main(["--run", str(tmp_path / "nope")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tiny_model_path)}}))
    rc = E.main(["--run", str(run), "--adapter", str(tmp_path / "none"), "--val", str(tmp_path / "v.jsonl")])
    assert rc == 1 and "adapter not found" in capsys.readouterr().err
    rc = E.main(["--run", str(run), "--val", str(tmp_path / "missing.jsonl")])
    assert rc == 1 and "validation JSONL not found" in capsys.readouterr().err
    rc = E.main(["--run", str(run), "--val", str(tmp_path / "missing.jsonl"), "--base", str(tmp_path / "b.pth")])
    assert rc == 1 and "base model not found" in capsys.readouterr().err


def test_bad_tuned_file_and_numbers_are_clear_errors(tiny_model_path, sft_jsonl, tmp_path,
                                                     capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"path": str(tiny_model_path)}}))
    cut = tmp_path / "cut.pth"
    cut.write_bytes(tiny_model_path.read_bytes()[:4000])
    rc = E.main(["--run", str(run), "--tuned", str(cut), "--val", str(sft_jsonl),
                 "--no-checks", "--max-val-batches", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and f"--tuned: {cut}: cannot be read" in err and "Traceback" not in err
    for flag, bad in (("--micro-bsz", "0"), ("--max-val-batches", "0"), ("--ctx-len", "1")):
        with pytest.raises(SystemExit) as ei:
            E.main(["--run", str(run), flag, bad])
        assert ei.value.code == 2 and f"{flag} must be >=" in capsys.readouterr().err


def test_eval_of_a_dpo_run_measures_the_preference(tiny_model_path, tmp_path, capsys):
    """A real short DPO run (trainer, shipped preference sample, fp32), evaluated on its own
    data through the CLI: the loss covers the chosen answers, and the tuned model's DPO loss
    against the base equals the trainer's final held-out DPO loss (the trainer runs base +
    adapter through peft, eval the merged weights); the base's log-probs equal the trainer's
    reference log-probs."""
    from rwkvforge import config as cfgmod
    from rwkvforge import paths
    from rwkvforge import train as T
    from rwkvforge.dpo import REFERENCE

    cli = {"base_model": str(tiny_model_path), "data_type": "dpo", "runs_dir": str(tmp_path),
           "data_file": str(paths.sample_data_dir() / "bsl_dpo.jsonl"),
           "data_prefix": str(tmp_path / "dpo"), "val_fraction": 0.15, "ctx_len": 160,
           "max_steps": 6, "lr": 3e-3, "lora_r": 8, "save_every": 0, "precision": "fp32",
           "micro_bsz": 4, "warmup_steps": 0, "dpo_beta": 0.2}
    run = tmp_path / "dpo-run"
    out = T.Trainer(cfgmod.resolve(cli=cli, env={}, root=paths.workspace_root()), run,
                    progress=False).run()
    capsys.readouterr()
    assert E.main(["--run", str(run), "--no-checks", "--micro-bsz", "3"]) == 0
    assert "chosen answer likelier" in capsys.readouterr().err
    res = json.loads((run / "eval" / "eval.json").read_text())
    pf = res["preference"]
    assert pf["beta"] == 0.2 and pf["pairs"] == 6  # 15% of the 42 sample pairs
    assert pf["tuned"]["dpo_loss"] == pytest.approx(out.val_loss_end, abs=1e-4)
    assert pf["tuned"]["dpo_loss"] < math.log(2) and pf["tuned"]["reward_margin"] > 0
    assert res["val"]["loss_over"] == "the chosen answers"
    assert "DPO against the base as reference (beta 0.2)" in (run / "eval" / "report.md").read_text()
    # the base side: the same numbers as the trainer's reference pass over the val pairs
    batches, _ = E.val_batches(tmp_path / "dpo", 160, 4)
    from rwkvforge.checkpoint import load_model

    base_model = load_model(tiny_model_path)
    base = E.pair_logps(base_model, batches)
    chosen = E.masked_loss(base_model, [E._side(b, "chosen") for b in batches])
    assert res["loss"]["base"]["loss"] == pytest.approx(chosen["loss"], rel=1e-6)
    assert res["loss"]["base"]["tokens"] == chosen["tokens"]
    ref = torch.load(run / REFERENCE, weights_only=True)["val"]
    order = torch.cat([b["pair_index"] for b in batches])
    torch.testing.assert_close(base, ref[order], rtol=1e-5, atol=1e-3)
    likelier = float((base[:, 0] > base[:, 1]).double().mean())
    assert pf["base"]["chosen_likelier"] == pytest.approx(likelier)


def test_report_keeps_the_checks_row_in_the_table_of_a_dpo_run():
    loss = {"loss": 1.0, "ppl": 2.7, "tokens": 10}
    res = {"run": "r", "models": {"base": "b", "tuned": "t"}, "settings": {"max_tokens": 8},
           "val": {"source": "v"}, "loss": {"base": loss, "tuned": loss},
           "preference": {"pairs": 4, "beta": 0.1, "base": {"chosen_likelier": 0.5},
                          "tuned": {"chosen_likelier": 0.75, "dpo_loss": 0.6,
                                    "reward_accuracy": 0.75, "reward_margin": 0.1}},
           "checks": {"file": "c.jsonl", "base": {"passed": 1, "total": 2, "rate": 0.5},
                      "tuned": {"passed": 2, "total": 2, "rate": 1.0}, "items": []}}
    lines = E.render_report(res).splitlines()
    i = next(n for n, x in enumerate(lines) if x.startswith("| chosen answer likelier"))
    assert lines[i + 1].startswith("| prompt checks passed")  # the same table
    assert any(x.startswith("DPO against the base") for x in lines[i + 2:])


# ------------------------------------------------------------------ issue 27: 3, 4
OWN = [{"messages": [{"role": "user", "content": f"Сколько будет {i} плюс {i}?"},
                     {"role": "assistant", "content": f"```bsl\nРезультат = {2 * i};\n```\n"
                                                      f"Ответ: {2 * i}."}]}
       for i in range(10)]


def _prepare(tmp_path: Path, name: str, records: list[dict], data_type: str) -> Path:
    from rwkvforge.data.prepare import Options, run

    src = tmp_path / f"{name}.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records),
                   encoding="utf-8")
    prefix = tmp_path / name
    run(Options(input=src, prefix=prefix, data_type=data_type, ctx_len=64, seed=3,
                val_fraction=0.3, workers=1, progress=False), log=lambda *a: None)
    return prefix


def _own_run(tmp_path: Path, model_path: Path, prefix: Path, demo: bool = False) -> Path:
    """A run folder as training leaves it: config.json naming the model and the prepared data,
    and an adapter (fresh, so the tuned model equals the base; eval does not care)."""
    from rwkvforge import peft as rp
    from rwkvforge.adapter import save_adapter
    from rwkvforge.checkpoint import load_model

    run = tmp_path / "run"
    spec = rp.AdapterSpec(r=4, alpha=8.0, targets=rp.LORA_TARGETS)
    save_adapter(run / "adapter", *rp.export_adapter(rp.apply_adapter(load_model(model_path),
                                                                      spec), spec))
    (run / "config.json").write_text(json.dumps({
        "model": {"path": str(model_path)}, "settings": {"ctx_len": CTX},
        "data": {"prefix": str(prefix), "demo": demo}}))
    return run


def test_eval_on_your_own_run_checks_its_held_out_examples(tiny_model_path, tmp_path, capsys):
    """Not the shipped 1C checks: each held-out example of the run's own data asks its question
    and expects the first line of its reference reply (past the code fence); one line says so."""
    prefix = _prepare(tmp_path, "own", OWN, "sft")
    run = _own_run(tmp_path, tiny_model_path, prefix)
    assert E.main(["--run", str(run), "--max-tokens", "3", "--max-val-batches", "1"]) == 0
    err = capsys.readouterr().err
    which = [x for x in err.splitlines() if x.startswith("[eval] prompt checks: ")]
    assert len(which) == 1 and "drawn from the run's held-out data" in which[0]
    res = json.loads((run / "eval" / "eval.json").read_text(encoding="utf-8"))
    items = res["checks"]["items"]
    held_out = json.loads((Path(f"{prefix}.meta.json")).read_text())["splits"]["val"]
    assert len(items) == held_out["documents"] == 3
    by_question = {r["messages"][0]["content"]: r["messages"][1]["content"] for r in OWN}
    for it in items:
        assert it["prompt"] in by_question  # a question of the run's own data, verbatim
        assert it["expect"] == by_question[it["prompt"]].splitlines()[1]  # not the ``` line
    assert "bsl_checks" not in res["checks"]["file"] and "held-out" in res["checks"]["file"]


def test_default_checks_say_which_for_demo_and_text_runs(tiny_model_path, tmp_path):
    from rwkvforge import paths

    demo, why = E.default_checks({"data": {"prefix": "x", "demo": True}}, Path("x"))
    assert len(demo) == len(E.load_checks(paths.sample_data_dir() / "bsl_checks.jsonl"))
    assert "shipped 1C checks" in why
    text = _prepare(tmp_path, "text", [{"text": f"строка номер {i}"} for i in range(10)], "text")
    none, why = E.default_checks({"data": {"prefix": str(text), "demo": False}}, text)
    assert none == [] and why.startswith("none: ") and "--checks FILE" in why
    dpo = _prepare(tmp_path, "dpo", [{"prompt": f"Вопрос {i}?", "chosen": f"Да {i}.",
                                      "rejected": f"Нет {i}."} for i in range(10)], "dpo")
    checks, _ = E.default_checks({"data": {"prefix": str(dpo), "demo": False}}, dpo)
    assert checks and all(c.expect == f"Да {c.prompt[7:-1]}." for c in checks)  # the chosen


def test_answering_is_never_silent_for_long(tiny_model, capsys, monkeypatch):
    """Not a terminal: plain lines count the finished answers (EVERY_S shrunk below the tiny
    model's answering time) up to all of them."""
    from rwkvforge import progress
    from rwkvforge.tokenizer import get_tokenizer

    monkeypatch.setattr(progress, "EVERY_S", 0.005)
    answers = E.answer_prompts(tiny_model, get_tokenizer(), ["Привет", "Как дела?", "Что?"], 8,
                               desc="[eval] tuned: answering")
    err = capsys.readouterr().err.splitlines()
    assert len(answers) == 3 and err and all(x.startswith("[eval] tuned: answering: ")
                                             for x in err)
    assert err[-1].startswith("[eval] tuned: answering: 3/3 answer (100%)")


def test_answers_take_infer_fast_and_leave_the_model_exact(tiny_model, monkeypatch):
    """eval's prompt checks answer on INFER_FAST's path (bf16: the decode kernels run) and
    give the model back in its exact mode, so nothing after them is approximate."""
    from rwkvforge.tokenizer import get_tokenizer

    seen = []
    real = tiny_model.step
    monkeypatch.setattr(tiny_model, "step", lambda *a, **k: seen.append(
        tiny_model.infer_dtype) or real(*a, **k))
    E.answer_prompts(tiny_model, get_tokenizer(), ["Привет"], 4, progress=False, fast="bf16")
    assert seen and set(seen) == {torch.bfloat16}
    assert tiny_model.infer_dtype is None
    seen.clear()
    E.answer_prompts(tiny_model, get_tokenizer(), ["Привет"], 4, progress=False)
    assert set(seen) == {None}

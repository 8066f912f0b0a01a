"""prepare: make_data.py-identical binidx, splits, validation with file:line, atomic outputs."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from rwkvforge import config as cfg
from rwkvforge.data import prepare as P
from rwkvforge.data.binidx import BinIdxReader
from rwkvforge.data.loader import open_split
from rwkvforge.tokenizer import encode_chat, get_tokenizer

# Fixed corpus for the byte-compatibility check. The two hashes below were obtained once by
# running RWKV-LM's own writer (BlinkDL/RWKV-LM @ 524481d, RWKV-v5/make_data.py's
# MMapIndexedDatasetBuilder + add_raw with RWKV-v5/src/binidx.py's Index.writer, tokenized by
# the rwkv package's TRIE_TOKENIZER) on this corpus written by `write_jsonl` below.
CORPUS = [
    "Hello, world!",
    "Процедура ОбработкаПроведения(Отказ, Режим)\n\tДвижения.Остатки.Записать();\nКонецПроцедуры",
    "你好，世界。这是一个测试。",
    "def add(a, b):\r\n    return a + b\r\n",
    "emoji 😀👍🏽 and NUL \x00 inside",
    "Запрос.Текст = \"ВЫБРАТЬ Номенклатура.Ссылка ИЗ Справочник.Номенклатура КАК Номенклатура\";",
    "  leading and trailing spaces  \n\n\n",
    "x",
]
MAKE_DATA_BIN_SHA256 = "dd88320e6dd480193de9c8ea9437a8660d0d9a97da70e3e77b952b19f2c5b6f9"
MAKE_DATA_IDX_SHA256 = "67767adcc3ad780144091fef9988e3628462178cb496a2a290f2083575433cfb"


def write_jsonl(path: Path, rows: list) -> Path:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n")
    return path


def opts(tmp_path: Path, src: Path, data_type: str = "text", **kw) -> P.Options:
    kw.setdefault("workers", 1)
    return P.Options(input=src, prefix=tmp_path / "out" / "d", data_type=data_type, progress=False, **kw)


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def outputs(folder: Path) -> list[Path]:
    return sorted([*folder.glob("*.bin"), *folder.glob("*.idx")])


def quiet(*_a, **_k) -> None:
    pass


def test_text_is_byte_identical_to_make_data(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    meta = P.run(opts(tmp_path, src, ctx_len=16), log=quiet)
    out = tmp_path / "out"
    assert sha(out / "d.bin") == MAKE_DATA_BIN_SHA256
    assert sha(out / "d.idx") == MAKE_DATA_IDX_SHA256
    # and independently: the reference tokenizer's ids + EOT, one item per document
    ref = get_tokenizer("reference")
    r = BinIdxReader(out / "d")
    assert [r[i].tolist() for i in range(len(r))] == [ref.reference.encode(t) + [0]
                                                      for t in CORPUS]
    assert meta["documents"] == 8 and meta["splits"]["train"]["tokens"] == r.num_tokens
    assert meta["magic_prime"] == 5  # 145 tokens // 16 - 1 = 8 -> largest p%3==2 prime: 5
    assert meta["rwkv_lm_args"] == f"--my_exit_tokens {r.num_tokens} --magic_prime 5 --ctx_len 16"
    assert json.loads((out / "d.meta.json").read_text()) == meta
    assert sorted(p.name for p in out.iterdir()) == ["d.bin", "d.idx", "d.meta.json"]


@pytest.mark.timeout(60)  # forked workers once deadlocked on the wheel's thread pool
@pytest.mark.parametrize("kind", ["text", "sft"])
def test_workers_give_the_same_bytes(tmp_path, kind):
    if kind == "text":
        rows = [{"text": f"{CORPUS[i % 8]} #{i}"} for i in range(1500)]  # > 2 blocks
    else:
        rows = [{"prompt": f"{CORPUS[i % 8]} #{i}", "response": CORPUS[(i + 1) % 8]}
                for i in range(1100)]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    P.run(opts(tmp_path, src, kind, workers=1), log=quiet)  # this process tokenizes first
    one = [sha(p) for p in outputs(tmp_path / "out")]
    P.run(opts(tmp_path, src, kind, workers=2), log=quiet)
    assert [sha(p) for p in outputs(tmp_path / "out")] == one
    assert len(one) == (2 if kind == "text" else 4)


def test_split_repeat_shuffle_are_seeded(tmp_path):
    rows = [{"text": f"document number {i}"} for i in range(40)]
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    tok = get_tokenizer()

    def docs(prefix: Path) -> list[str]:
        r = BinIdxReader(prefix)
        return [tok.decode(r[i][:-1]) for i in range(len(r))]

    m = P.run(opts(tmp_path, src, val_fraction=0.2, repeat=3, shuffle=True, seed=7), log=quiet)
    train, val = docs(tmp_path / "out/d"), docs(tmp_path / "out/d.val")
    assert len(val) == 8 and m["splits"]["val"]["documents"] == 8
    assert val == sorted(val, key=lambda s: int(s.split()[-1]))  # file order
    assert len(train) == 96 and not set(train) & set(val)
    assert set(train) | set(val) == {r["text"] for r in rows}
    passes = [train[i * 32:(i + 1) * 32] for i in range(3)]
    assert all(sorted(p) == sorted(passes[0]) for p in passes) and passes[0] != passes[1]
    first = (sha(tmp_path / "out/d.bin"), sha(tmp_path / "out/d.val.bin"))
    P.run(opts(tmp_path, src, val_fraction=0.2, repeat=3, shuffle=True, seed=7), log=quiet)
    assert (sha(tmp_path / "out/d.bin"), sha(tmp_path / "out/d.val.bin")) == first
    P.run(opts(tmp_path, src, val_fraction=0.2, repeat=3, shuffle=True, seed=8), log=quiet)
    assert sha(tmp_path / "out/d.bin") != first[0]
    P.run(opts(tmp_path, src), log=quiet)  # no val now: stale val files are removed
    assert not (tmp_path / "out/d.val.bin").exists()


BAD_LINES = [
    ('{"text": "ok"', "invalid JSON"),
    ('{"text": "tab\there"}', "Invalid control character at column 14: tabs and newlines"),
    ("[" * 100000 + "]" * 100000, "nested too deeply"),
    ("\ufeff{\"text\": \"joined\"}", "byte-order mark at the start of this line"),
    ('["a"]', "expected a JSON object, got list"),
    ('{"txt": "a"}', "missing field 'text' (found keys: txt)"),
    ('{"text": 5}', "field 'text' is int"),
    ('{"text": "   "}', "empty text"),
    ('{"text": "bad \\ud800 surrogate"}', "lone surrogate U+D800"),
]


def test_invalid_lines_stop_before_writing(tmp_path):
    rows = ['{"text": "good line"}'] + [b for b, _ in BAD_LINES] + ["", '{"text": "fine"}']
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(P.PrepareError) as ei:
        P.run(opts(tmp_path, src), log=quiet)
    msg = str(ei.value)
    for lineno, (_, reason) in enumerate(BAD_LINES, start=2):
        assert f"{src}:{lineno}: " in msg and reason in msg
    assert "--skip-invalid" in msg and "nothing was written" in msg
    assert list((tmp_path / "out").iterdir()) == []  # not even temp files


def test_skip_invalid_writes_rejects(tmp_path):
    rows = ['{"text": "good line"}'] + [b for b, _ in BAD_LINES] + ["", '{"text": "fine"}']
    src = write_jsonl(tmp_path / "c.jsonl", rows)
    meta = P.run(opts(tmp_path, src, skip_invalid=True), log=quiet)
    assert meta["documents"] == 2 and meta["rejected"] == len(BAD_LINES)
    rej = [json.loads(x) for x in (tmp_path / "out/d.rejects.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rej] == list(range(2, 2 + len(BAD_LINES)))
    assert all(reason in r["reason"] for r, (_, reason) in zip(rej, BAD_LINES))
    assert rej[0]["content"] == BAD_LINES[0][0]
    assert BinIdxReader(tmp_path / "out/d").num_documents == 2


def test_not_utf8_and_oversize_lines(tmp_path):
    src = tmp_path / "c.jsonl"
    src.write_bytes('{"text": "ok"}\n'.encode() + '{"text": "Привет"}\n'.encode("cp1251")
                    + b'{"text": "' + b"x" * 3000 + b'"}\n' + b'{"text": "end"}')
    with pytest.raises(P.PrepareError) as ei:
        P.run(opts(tmp_path, src, max_line_mb=2000 / (1 << 20)), log=quiet)
    msg = str(ei.value)
    assert f"{src}:2: not valid UTF-8 (byte 0xcf" in msg and "iconv" in msg
    assert f"{src}:3: line is 3013 bytes, over the" in msg and "--max-line-mb" in msg
    assert ":1:" not in msg and ":4:" not in msg


@pytest.mark.parametrize("data, hint", [
    ('{"text": "a"}\n'.encode("utf-16"), "looks like UTF-16"),
    # no byte-order mark: every other byte NUL, which "decodes" as UTF-8
    ('{"text": "a"}\n'.encode("utf-16-le"), "looks like UTF-16.*iconv -f utf-16le"),
    ('{"text": "a"}\n'.encode("utf-16-be"), "looks like UTF-16.*iconv -f utf-16be"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", "gzip-compressed"),
    ("Процедура Тест()\n".encode("utf-8"), "must be JSON Lines"),
    # a plain .txt given as the input: where plain text goes instead
    ("Line 1: the quick brown fox\n".encode("utf-8"), "plain text files go in a folder"),
])
def test_wrong_file_kinds_get_their_own_hint(tmp_path, data, hint):
    src = tmp_path / "c.jsonl"
    src.write_bytes(data)
    with pytest.raises(P.PrepareError, match=hint) as ei:
        P.run(opts(tmp_path, src), log=quiet)
    assert f"{src}:1: " in str(ei.value) and "cp1251" not in str(ei.value)


def test_all_lines_rejected_says_why(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"messages": "plain text, not a chat"}] * 3)
    with pytest.raises(P.PrepareError) as ei:
        P.run(opts(tmp_path, src, "sft", skip_invalid=True), log=quiet)
    msg = str(ei.value)
    assert "no valid documents (3 rejected)" in msg
    assert f"{src}:3: field 'messages' is str, expected a list" in msg
    # records of another type: one summarised line instead (tests/test_data_auto.py)
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": "plain text, not a chat"}] * 3)
    with pytest.raises(P.PrepareError, match="^3 of 3 records in .* have no SFT fields "
                       r"\(keys seen: text\) - set DATA_TYPE=text or auto; nothing was"):
        P.run(opts(tmp_path, src, "sft", skip_invalid=True), log=quiet)


def test_bad_inputs_and_options_are_named(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    for bad in (float("nan"), 0.0, -1.0):
        with pytest.raises(P.PrepareError, match="--max-line-mb must be a positive"):
            P.run(opts(tmp_path, src, max_line_mb=bad), log=quiet)


def test_cli_file_system_errors_and_prefix_forms(tmp_path, capsys):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    base = ["--input", str(src), "--type", "text", "--workers", "1", "--no-progress",
            "--ctx-len", "16", "--val-fraction", "0"]
    # the prefix's parent is a file: one line naming it, no traceback
    assert P.main(base + ["--output-prefix", str(src / "sub" / "x")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"prepare error: cannot read or write {src}") and "Traceback" not in err
    # a data file's name stands for its prefix; a folder gets the input's name in it
    assert P.main(base + ["--output-prefix", str(tmp_path / "a" / "x.bin")]) == 0
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["x.bin", "x.idx",
                                                                  "x.meta.json"]
    assert P.main(base + ["--output-prefix", str(tmp_path / "b") + "/"]) == 0
    assert sha(tmp_path / "b" / "c.bin") == MAKE_DATA_BIN_SHA256


def test_stale_temp_files_of_dead_runs_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    out = tmp_path / "out"
    out.mkdir()
    stale = [out / f"d.staging-{dead}.bin.tmp-{dead}", out / f"d.bin.tmp-{dead}",
             out / f"d.meta.json.tmp-{dead}"]
    live = [out / "d.bin.tmp-1", out / f"other.bin.tmp-{dead}"]  # pid 1 is alive
    for p in stale + live:
        p.write_bytes(b"x")
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    P.run(opts(tmp_path, src, ctx_len=16), log=quiet)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in live)


def test_sigterm_leaves_no_temp_files(tmp_path):
    src = tmp_path / "big.jsonl"
    row = json.dumps({"text": "Процедура Тест() Экспорт " + "слово " * 200}, ensure_ascii=False)
    src.write_text((row + "\n") * 40000, encoding="utf-8")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "rwkvforge.cli", "prepare", "--input",
                             str(src), "--type", "text", "--output-prefix", str(out / "d"),
                             "--workers", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not any(out.glob("*.tmp-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, "prepare finished before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert list(out.iterdir()) == []


def test_a_folder_is_one_text_document_per_file(tmp_path):
    """A folder of code (a 1C configuration dump: .bsl files with a BOM and CRLF, nested
    Cyrillic folders) gives the same bytes as a JSONL of the files' texts in path order;
    hidden files, other extensions and empty files are left out; a file that is not UTF-8
    is named."""
    src = tmp_path / "dump"
    (src / "Catalogs" / "Товары" / "Ext").mkdir(parents=True)
    (src / ".git").mkdir()
    (src / "Catalogs" / "Товары" / "Ext" / "ObjectModule.bsl").write_bytes(
        "\ufeffПроцедура ПриЗаписи(Отказ)\r\n\tОтказ = Ложь;\r\nКонецПроцедуры\r\n"
        .encode("utf-8"))
    (src / "Module.bsl").write_text("Функция Тест()\n\tВозврат 1;\nКонецФункции\n",
                                    encoding="utf-8")
    (src / "Empty.bsl").write_text("")
    (src / "Form.xml").write_text("<xml/>")
    (src / ".git" / "x.bsl").write_text("hidden")
    texts = ["Процедура ПриЗаписи(Отказ)\r\n\tОтказ = Ложь;\r\nКонецПроцедуры\r\n",
             "Функция Тест()\n\tВозврат 1;\nКонецФункции\n"]
    ref = write_jsonl(tmp_path / "ref.jsonl", [{"text": t} for t in texts])
    want = P.run(P.Options(input=ref, prefix=tmp_path / "ref" / "d", data_type="text",
                           progress=False, workers=1, ctx_len=16), log=quiet)
    meta = P.run(opts(tmp_path, src, ctx_len=16, glob="**/*.bsl"), log=quiet)
    assert sha(tmp_path / "out/d.bin") == sha(tmp_path / "ref/d.bin")
    assert sha(tmp_path / "out/d.idx") == sha(tmp_path / "ref/d.idx")
    assert meta["documents"] == want["documents"] == 2
    assert (meta["source"]["files"], meta["source"]["empty_files"]) == (3, 1)
    assert meta["source"]["path"] == str(src) and not list((tmp_path / "out").glob("*tmp*"))
    (src / "Bad.bsl").write_bytes("Процедура".encode("cp1251"))
    with pytest.raises(P.PrepareError) as ei:
        P.run(opts(tmp_path, src, ctx_len=16, glob="**/*.bsl"), log=quiet)
    assert f"1 invalid file(s) in {src}" in str(ei.value)
    assert f"{src / 'Bad.bsl'}: not valid UTF-8" in str(ei.value)
    with pytest.raises(P.PrepareError, match="no files match --data-glob"):
        P.run(opts(tmp_path, src, glob="**/*.py"), log=quiet)
    with pytest.raises(P.PrepareError, match="a folder is read as text documents"):
        P.run(opts(tmp_path, src, "sft"), log=quiet)


def test_masked_data_without_meta_refuses_to_load(tmp_path):
    src = write_jsonl(tmp_path / "s.jsonl", [{"prompt": "Q", "response": "A"}])
    P.run(opts(tmp_path, src, "sft"), log=quiet)
    assert open_split(tmp_path / "out/d").data_type == "sft"
    (tmp_path / "out/d.meta.json").unlink()  # what an interrupted publish could leave
    with pytest.raises(ValueError, match="without its .meta.json: an interrupted"):
        open_split(tmp_path / "out/d")


def test_sft_formats_and_masks(tmp_path):
    msgs = [{"role": "user", "content": "Как создать запрос?"},
            {"role": "assistant", "content": "Запрос = Новый Запрос;"}]
    rows = [{"messages": msgs},
            {"prompt": "Как создать запрос?", "response": "Запрос = Новый Запрос;"},
            {"instruction": "Как создать", "input": "запрос?", "output": "Запрос = Новый Запрос;"},
            {"system": "Ты эксперт 1С.", "prompt": "Q", "response": "A"}]
    src = write_jsonl(tmp_path / "s.jsonl", rows)
    meta = P.run(opts(tmp_path, src, "sft"), log=quiet)
    ids_r, mask_r = BinIdxReader(tmp_path / "out/d"), BinIdxReader(tmp_path / "out/d.mask")
    assert meta["splits"]["train"]["mask_prefix"] == "d.mask" and mask_r.dtype == np.uint8
    want = encode_chat(msgs)
    for i in range(2):
        assert ids_r[i].tolist() == want[0] and mask_r[i].tolist() == want[1]
    alpaca = encode_chat([{"role": "user", "content": "Как создать\nзапрос?"}, msgs[1]])
    assert ids_r[2].tolist() == alpaca[0]
    tok = get_tokenizer()
    assert tok.decode(ids_r[3]).startswith("System: Ты эксперт 1С.\n\nUser: Q")
    assert meta["splits"]["train"]["trained_tokens"] == int(mask_r.tokens.sum())


def test_dpo_pairs(tmp_path):
    conv = [{"role": "user", "content": "Первый"}, {"role": "assistant", "content": "Ок"},
            {"role": "user", "content": "Второй"}]
    rows = [{"prompt": "Напиши цикл", "chosen": "Для Каждого Стр Из Т Цикл КонецЦикла;",
             "rejected": "Пока Истина Цикл"},
            {"prompt": conv, "chosen": conv + [{"role": "assistant", "content": "Да"}],
             "rejected": [{"role": "assistant", "content": "Нет"}]},
            {"prompt": "same", "chosen": "x", "rejected": "x"}]
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    meta = P.run(opts(tmp_path, src, "dpo", skip_invalid=True), log=quiet)
    assert meta["documents"] == 2 and "identical" in json.loads(
        (tmp_path / "out/d.rejects.jsonl").read_text())["reason"]
    ids, mask = BinIdxReader(tmp_path / "out/d"), BinIdxReader(tmp_path / "out/d.mask")
    assert len(ids) == 4 and ids.doc_idx.tolist() == [0, 2, 4]
    tok = get_tokenizer()
    trained = [tok.decode(ids[i][mask[i] > 0]) for i in range(4)]
    assert trained == [" Для Каждого Стр Из Т Цикл КонецЦикла;", " Пока Истина Цикл", " Да", " Нет"]
    # the "longer than CTX_LEN" note counts pairs (either answer), of the train split only
    sizes = ids.sizes.reshape(2, 2)
    ctx = int(sizes[0].max()) - 2  # pair 0 is longer only through its chosen answer
    assert sizes[0].min() <= ctx + 1 < sizes[0].max()
    meta = P.run(opts(tmp_path, src, "dpo", skip_invalid=True, ctx_len=ctx), log=quiet)
    assert meta["longer_than_ctx"] == int((sizes > ctx + 1).any(axis=1).sum())
    assert meta["longer_than_ctx"] <= 2


def test_interrupted_run_leaves_no_dataset_or_temp(tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    calls = {"n": 0}
    real = P.BinIdxWriter.commit

    def dying_commit(self):
        calls["n"] += 1
        if calls["n"] == 2:  # staging committed, dies while publishing the train split
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(P.BinIdxWriter, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        P.run(opts(tmp_path, src), log=quiet)
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_defaults_from_config(tmp_path, monkeypatch, capsys):
    root = tmp_path / "ws"
    (root / "configs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    (root / "configs" / "workspace.env").write_text("DATA_TYPE=text\nCTX_LEN=16\n"
                                                    "VAL_FRACTION=0\n")
    (root / "data" / "samples").mkdir(parents=True)
    write_jsonl(root / "data/samples/bsl_code.jsonl", [{"text": t} for t in CORPUS])
    monkeypatch.setenv("RWKVFORGE_ROOT", str(root))
    for k in ("DATA_FILE", "DATA_TYPE", "DATA_PREFIX", "CTX_LEN", "VAL_FRACTION", "SEED"):
        monkeypatch.delenv(k, raising=False)
    assert P.main(["--workers", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "magic_prime 5" in out and "--my_exit_tokens 145 --magic_prime 5 --ctx_len 16" in out
    assert sha(root / "data/processed/bsl_code.bin") == MAKE_DATA_BIN_SHA256
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": 1}'])
    assert P.main(["--input", str(bad), "--output-prefix", str(tmp_path / "x"),
                   "--workers", "1"]) == 1
    assert f"{bad}:1: field 'text' is int" in capsys.readouterr().err


def test_options_from_settings_is_what_the_cli_and_train_build(tmp_path, monkeypatch):
    root = tmp_path / "ws"
    (root / "configs").mkdir(parents=True)
    (root / "pyproject.toml").write_text("")
    monkeypatch.setenv("RWKVFORGE_ROOT", str(root))
    src, prefix = tmp_path / "in.jsonl", tmp_path / "out" / "d"
    args = P.build_parser().parse_args([
        "--input", str(src), "--output-prefix", str(prefix), "--type", "sft", "--ctx-len", "64",
        "--seed", "7", "--val-fraction", "0.25", "--micro-bsz", "2", "--grad-accum", "3",
        "--num-gpus", "2", "--data-glob", "**/*.bsl", "--repeat", "2", "--shuffle",
        "--skip-invalid", "--workers", "3", "--max-line-mb", "8", "--no-progress"])
    cli = P.options_from_args(args)
    s = cfg.resolve_for_training(args).settings
    run = dict(repeat=2, shuffle=True, skip_invalid=True, workers=3, max_line_mb=8.0,
               progress=False)
    assert P.Options.from_settings(s, input=src, output_prefix=prefix, **run) == cli
    assert (cli.input, cli.prefix, cli.data_type, cli.ctx_len, cli.seed, cli.val_fraction,
            cli.micro_bsz, cli.grad_accum, cli.num_gpus, cli.glob) == (
        src, prefix, "sft", 64, 7, 0.25, 2, 3, 2, "**/*.bsl")
    assert {k: getattr(cli, k) for k in run} == run
    # what train.py builds by hand when it prepares DATA_FILE itself
    by_hand = P.Options(input=src, prefix=prefix, data_type=s.data_type, ctx_len=s.ctx_len,
                        seed=s.seed, val_fraction=s.val_fraction, workers=1,
                        micro_bsz=s.micro_bsz, grad_accum=s.grad_accum, num_gpus=s.num_gpus,
                        progress=False, glob=s.data_glob)
    assert P.Options.from_settings(s, input=src, output_prefix=prefix, workers=1,
                                   progress=False) == by_hand
    with pytest.raises(TypeError):  # a setting is the settings' to give
        P.Options.from_settings(s, input=src, output_prefix=prefix, data_type="text")


def test_stale_reason_names_what_changed(tmp_path):
    src = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in CORPUS])
    meta = P.run(opts(tmp_path, src, seed=42, val_fraction=0.0), log=quiet)
    s = cfg.Settings(data_type="text", seed=42, val_fraction=0.0)
    assert P.stale_reason(meta, src, s) is None
    assert P.stale_reason(meta, src, replace(s, data_type="sft")) == "type text != DATA_TYPE sft"
    assert P.stale_reason(meta, src, replace(s, val_fraction=0.1)) == "VAL_FRACTION 0.0 -> 0.1"
    assert P.stale_reason(meta, src, replace(s, seed=7)) == "SEED 42 -> 7"
    assert P.stale_reason(meta, tmp_path / "gone.jsonl", s) is None  # nothing to compare
    data = src.read_bytes()
    src.write_bytes(data.replace(b"Hello", b"Hallo"))  # same size, other bytes
    assert P.stale_reason(meta, src, s) == "c.jsonl changed"
    src.write_bytes(data + b'{"text": "more"}\n')
    assert P.stale_reason(meta, src, s) == "c.jsonl changed size"

"""DATA_TYPE=auto and the SFT variants a newcomer brings: {"text"}, ShareGPT, an Alpaca JSON
array and OpenAI content parts detected and trained with no type given; `weight: 0` turns
out of the loss; a mixed file refused with its counts; one summarised error for an explicit
type that does not fit; a {"text"} file still byte-identical to RWKV-LM's make_data.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from test_prepare import CORPUS, MAKE_DATA_BIN_SHA256, MAKE_DATA_IDX_SHA256

from rwkvforge import config as cfgmod
from rwkvforge import train as T
from rwkvforge.data import detect as D
from rwkvforge.data import prepare as P
from rwkvforge.data import records as R
from rwkvforge.data.binidx import BinIdxReader
from rwkvforge.tokenizer import chat_segments, encode_chat, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--ctx-len", "48", "--micro-bsz", "2", "--grad-accum", "1", "--lora-r", "8",
        "--lora-alpha", "16", "--warmup-steps", "1", "--head-chunk", "256", "--log-every", "1",
        "--eval-every", "0", "--save-every", "0", "--max-steps", "2", "--precision", "fp32",
        "--val-fraction", "0.1", "--no-progress"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def quiet(*_a) -> None:
    pass


def text_rows(n: int = 30) -> list[dict]:
    return [{"text": f"Процедура Тест{i}()\n\tСообщить(\"{i}\");\nКонецПроцедуры"}
            for i in range(n)]


def sharegpt_rows(n: int = 30) -> list[dict]:
    return [{"conversations": [{"from": "human", "value": f"Как вывести {i}?"},
                               {"from": "gpt", "value": f"Сообщить(\"{i}\");"}]}
            for i in range(n)]


def alpaca_rows(n: int = 30) -> list[dict]:
    return [{"instruction": f"Напиши функцию {i}", "input": "кратко" if i % 2 else "",
             "output": f"Функция Ф{i}() Возврат {i}; КонецФункции"} for i in range(n)]


def openai_parts_rows(n: int = 30) -> list[dict]:
    return [{"messages": [
        {"role": "developer", "content": "Отвечай кодом 1С."},
        {"role": "user", "content": [{"type": "text", "text": f"Число {i}"},
                                     {"type": "text", "text": "в строку"}]},
        {"role": "assistant", "content": [{"type": "text", "text": f"Строка({i})"}]}]}
        for i in range(n)]


# ---- no type given: detected, prepared and trained -----------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, rows, kind, why", [
    ("corpus.jsonl", text_rows, "text", '30 {"text"} documents'),
    ("chats.jsonl", sharegpt_rows, "sft", "30 ShareGPT conversations"),
    ("alpaca.json", alpaca_rows, "sft", "30 Alpaca instruction/output"),
    ("parts.jsonl", openai_parts_rows, "sft", "30 OpenAI messages"),
])
def test_each_format_trains_with_no_type_given(name, rows, kind, why, tiny_model_path,
                                               tmp_path, capsys):
    src = tmp_path / name
    if name.endswith(".json"):  # one JSON array, as LLaMA-Factory's alpaca files are
        src.write_text(json.dumps(rows(), ensure_ascii=False, indent=1), encoding="utf-8")
    else:
        write_jsonl(src, rows())
    prefix = tmp_path / "processed" / src.stem
    rc = T.main(["--base-model", str(tiny_model_path), "--data-file", str(src),
                 "--data-prefix", str(prefix), "--runs-dir", str(tmp_path / "runs"),
                 "--run-name", "r", *FAST])
    err = capsys.readouterr().err
    assert rc == 0, err
    [line] = [x for x in err.splitlines() if x.startswith("DATA_TYPE=auto")]
    assert line == f"DATA_TYPE=auto -> {kind}: {name} has {why} (30 records)"
    run = tmp_path / "runs" / "r"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["settings"]["data_type"] == kind
    assert cfg["sources"]["DATA_TYPE"] == f"auto ({line})"
    assert line in (run / "train.log").read_text(encoding="utf-8")
    meta = json.loads(Path(f"{prefix}.meta.json").read_text())
    assert meta["type"] == kind and meta["source"]["sha256"] == hashlib.sha256(
        src.read_bytes()).hexdigest()
    rows_ = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows_)
    assert json.loads((run / "status.json").read_text())["state"] == "finished"
    if kind == "sft":  # the prompt stays out of the loss: fewer trained tokens than tokens
        tr = meta["splits"]["train"]
        assert 0 < tr["trained_tokens"] < tr["tokens"]


def test_detect_type_reuses_matching_prepared_data_and_reads_folders(tmp_path):
    src = write_jsonl(tmp_path / "chats.jsonl", sharegpt_rows(6))
    prefix = tmp_path / "p" / "chats"
    cli = {"data_file": str(src), "data_prefix": str(prefix)}
    res = cfgmod.resolve(cli=cli, env={}, root=ROOT)
    assert res.settings.data_type == "auto"
    said: list[str] = []
    got = P.detect_type(res, ROOT, said.append)
    assert got.settings.data_type == "sft" and said == [
        "DATA_TYPE=auto -> sft: chats.jsonl has 6 ShareGPT conversations (6 records)"]
    P.run(P.Options.from_settings(res.settings, input=src, output_prefix=prefix, workers=1,
                                  progress=False), log=quiet)
    assert P.detect_type(res, ROOT, said.append).settings.data_type == "sft"
    assert said[-1] == f"DATA_TYPE=auto -> sft: as prepared in {prefix}.meta.json"
    write_jsonl(src, text_rows(6))  # the file changed: scanned again
    assert P.detect_type(res, ROOT, said.append).settings.data_type == "text"
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "a.bsl").write_text("Процедура А() КонецПроцедуры")
    res = cfgmod.resolve(cli={"data_file": str(folder), "data_prefix": str(tmp_path / "f")},
                         env={}, root=ROOT)
    assert P.detect_type(res, ROOT, said.append).settings.data_type == "text"
    explicit = cfgmod.resolve(cli={**cli, "data_type": "dpo"}, env={}, root=ROOT)
    assert P.detect_type(explicit, ROOT, said.append) is explicit


def test_dpo_pairs_and_prompt_completion_are_detected(tmp_path):
    dpo = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"Вопрос {i}", "chosen": f"Да {i}", "rejected": f"Нет {i}"}
        for i in range(4)])
    meta = P.run(P.Options(input=dpo, prefix=tmp_path / "d", data_type="auto", workers=1,
                           progress=False), log=quiet)
    assert meta["type"] == "dpo" and meta["type_from"] == {"data_type": "auto",
                                                          "shapes": {"dpo": 4}}
    assert BinIdxReader(tmp_path / "d").num_documents == 4  # two items (chosen, rejected) each
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q", "completion": "A"}] * 3)
    meta = P.run(P.Options(input=pc, prefix=tmp_path / "c", data_type="auto", workers=1,
                           progress=False), log=quiet)
    assert meta["type"] == "sft"
    want = encode_chat([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}])
    assert BinIdxReader(tmp_path / "c")[0].tolist() == want[0]


# ---- weight: 0 -----------------------------------------------------------------------------------

def test_weight_zero_turn_is_out_of_the_loss(tmp_path):
    msgs = [{"role": "user", "content": "Первый вопрос"},
            {"role": "assistant", "content": "Плохой ответ", "weight": 0},
            {"role": "user", "content": "Второй вопрос"},
            {"role": "assistant", "content": "Хороший ответ", "weight": 1}]
    src = write_jsonl(tmp_path / "w.jsonl", [{"messages": msgs}, {"conversations": [
        {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2", "weight": 0}]}])
    P.run(P.Options(input=src, prefix=tmp_path / "d", data_type="auto", workers=1,
                    progress=False), log=quiet)
    ids, mask = BinIdxReader(tmp_path / "d"), BinIdxReader(tmp_path / "d.mask")
    tok = get_tokenizer()
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in msgs]
    ref_ids, ref_mask = encode_chat(plain)
    assert ids[0].tolist() == ref_ids  # the same tokens: only the mask differs
    # the masked turn: exactly its segment's tokens (reply + "\n\n") leave the loss
    seg = tok.encode(chat_segments(plain)[1][0])
    assert int(np.sum(ref_mask)) - int(mask[0].sum()) == len(seg)
    assert tok.decode(ids[0][mask[0] > 0][:-1]) == " Хороший ответ"  # + the trained EOT 0
    assert ids[0][-1] == 0 and mask[0][-1] == 1
    # weight 0 on the last turn: its reply and the end-of-text token are not trained
    assert tok.decode(ids[1][mask[1] > 0]) == " A1\n\n" and mask[1][-1] == 0


@pytest.mark.parametrize("turns, reason", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}],
     "every assistant turn has weight 0"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0.5}],
     "messages[1].weight is 0.5: use 0 (not trained) or 1"),
    ([{"role": "user", "content": "q", "weight": 1}, {"role": "assistant", "content": "a"}],
     "messages[0].weight is 1 on a user turn"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
      {"role": "assistant", "content": "a"}],
     "messages[0].content[0] is a 'image_url' part: only text parts"),
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
     "messages[0].role is 'tool'"),
])
def test_bad_turns_name_the_turn(turns, reason):
    r = R.process_line(json.dumps({"messages": turns}).encode(), 4, "sft", get_tokenizer())
    assert r.items is None and reason in r.error


def test_content_parts_read_as_serve_reads_them():
    from rwkvforge.api import ChatMessage, chat_messages

    msgs = [{"role": "developer", "content": [{"type": "text", "text": "Будь краток."}]},
            {"role": "user", "content": [{"type": "text", "text": "Первая часть"},
                                         {"type": "text", "text": "вторая часть"}]},
            {"role": "assistant", "content": "Ответ"},
            {"role": "user", "content": [{"type": "text", "text": "Ещё"}]}]
    turns, trained = R.normalize_turns(msgs, "messages")
    assert turns == chat_messages([ChatMessage(**m) for m in msgs])
    assert trained == [True] * 4
    sharegpt = [{"from": "system", "value": "Будь краток."},
                {"from": "human", "value": "Первая часть\nвторая часть"},
                {"from": "gpt", "value": "Ответ"}, {"from": "human", "value": "Ещё"}]
    assert R.normalize_turns(sharegpt, "conversations")[0] == turns


# ---- refusals: a mixed file, an explicit type that does not fit ----------------------------------

def test_mixed_file_is_refused_with_counts_per_kind(tmp_path, tiny_model_path, capsys):
    rows = text_rows(10) + alpaca_rows(25) + sharegpt_rows(5)
    src = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(P.PrepareError) as ei:
        P.run(P.Options(input=src, prefix=tmp_path / "out" / "d", data_type="auto",
                        workers=1, progress=False), log=quiet)
    msg = str(ei.value)
    assert (f"{src}: DATA_TYPE=auto found more than one kind of record: 30 sft (25 Alpaca "
            "instruction/output, 5 ShareGPT conversations; first at line 11), 10 text (10 "
            '{"text"} documents; first at line 1)') in msg
    assert "set DATA_TYPE=sft and pass --skip-invalid to leave the other 10 records out" in msg
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
    # train says the same before a run folder is made
    rc = T.main(["--base-model", str(tiny_model_path), "--data-file", str(src),
                 "--data-prefix", str(tmp_path / "p"), "--runs-dir", str(tmp_path / "runs"),
                 *FAST])
    assert rc == 2 and "30 sft (25 Alpaca" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    # an explicit type over the same file: one summarised error, or the other kind skipped
    with pytest.raises(P.PrepareError, match=r"^10 of 40 records in .* have no SFT fields "
                       r"\(keys seen: text\) - the first at line 1; split the file"):
        P.run(P.Options(input=src, prefix=tmp_path / "d", data_type="sft", workers=1,
                        progress=False), log=quiet)
    meta = P.run(P.Options(input=src, prefix=tmp_path / "d", data_type="sft", workers=1,
                           progress=False, skip_invalid=True), log=quiet)
    assert meta["documents"] == 30 and meta["rejected"] == 10


@pytest.mark.parametrize("rows, data_type, want", [
    (text_rows(120), "sft", "120 of 120 records in {src} have no SFT fields (keys seen: text) "
     "- set DATA_TYPE=text or auto; nothing was written"),
    (sharegpt_rows(40), "text", "40 of 40 records in {src} have no 'text' field (keys seen: "
     "conversations) - set DATA_TYPE=sft or auto; nothing was written"),
    (alpaca_rows(7), "dpo", "7 of 7 records in {src} have no 'chosen' + 'rejected' fields "
     "(keys seen: instruction, output) - set DATA_TYPE=sft or auto; nothing was written"),
    ([{"question": "q", "answer": "a"}] * 30, "sft", "30 of 30 records in {src} have no SFT "
     "fields (keys seen: answer, question) - expected {\"text\"}, OpenAI"),
])
def test_explicit_type_that_does_not_fit_is_one_summarised_error(rows, data_type, want,
                                                                 tmp_path, capsys):
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    rc = P.main(["--input", str(src), "--type", data_type, "--output-prefix",
                 str(tmp_path / "out" / "d"), "--workers", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("prepare error: " + want.replace("{src}", str(src)))
    assert len(err.strip().splitlines()) == 1 and f"{src}:2:" not in err
    assert list((tmp_path / "out").iterdir()) == []


def test_a_few_bad_records_are_still_named_by_line(tmp_path):
    src = write_jsonl(tmp_path / "d.jsonl", [*sharegpt_rows(5), {"question": "q"},
                                             {"conversations": "hi"}])
    with pytest.raises(P.PrepareError) as ei:
        P.run(P.Options(input=src, prefix=tmp_path / "d", data_type="auto", workers=1,
                        progress=False), log=quiet)
    msg = str(ei.value)
    assert f"{src}:6: no SFT fields" in msg and f"{src}:7: field 'conversations' is str" in msg


# ---- JSON arrays, and make_data.py bytes ---------------------------------------------------------

def test_text_stays_byte_identical_to_make_data_as_jsonl_and_as_json_array(tmp_path):
    lines = tmp_path / "c.jsonl"
    lines.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in CORPUS),
                     encoding="utf-8")
    arr = tmp_path / "c.json"
    arr.write_text(json.dumps([{"text": t} for t in CORPUS], ensure_ascii=False),
                   encoding="utf-8")
    for src, name in ((lines, "l"), (arr, "a")):
        meta = P.run(P.Options(input=src, prefix=tmp_path / name, data_type="auto", workers=1,
                               progress=False), log=quiet)
        assert meta["type"] == "text"
        for suffix, want in ((".bin", MAKE_DATA_BIN_SHA256), (".idx", MAKE_DATA_IDX_SHA256)):
            got = hashlib.sha256(Path(f"{tmp_path / name}{suffix}").read_bytes()).hexdigest()
            assert got == want, (src.name, suffix)
        assert P.stale_reason(meta, src, cfgmod.Settings(val_fraction=0.0)) is None


def test_json_array_records_are_named_by_number(tmp_path):
    arr = tmp_path / "a.json"
    rows = alpaca_rows(3)
    rows[1] = {"instruction": "x", "output": 5}
    arr.write_text(json.dumps(rows), encoding="utf-8")
    meta = P.run(P.Options(input=arr, prefix=tmp_path / "d", data_type="auto", workers=1,
                           progress=False, skip_invalid=True), log=quiet)
    assert meta["documents"] == 2 and meta["source"]["path"] == str(arr)
    [rej] = [json.loads(x) for x in (tmp_path / "d.rejects.jsonl").read_text().splitlines()]
    assert rej["file"] == str(arr) and rej["record"] == 2 and "'output' is int" in rej["reason"]
    with pytest.raises(P.PrepareError, match=f"{arr}: record 2: field 'output' is int"):
        P.run(P.Options(input=arr, prefix=tmp_path / "e", data_type="sft", workers=1,
                        progress=False), log=quiet)
    bad = tmp_path / "b.json"
    bad.write_text('[{"text": "a"},\n {"text": "b"}\n', encoding="utf-8")
    with pytest.raises(P.PrepareError, match=rf"{bad}:\d+: not valid JSON"):
        P.run(P.Options(input=bad, prefix=tmp_path / "f", data_type="auto", workers=1,
                        progress=False), log=quiet)
    assert D.main([str(arr)]) == 0


@pytest.mark.parametrize("data, hint", [
    ('{"text": "a"}\n'.encode("utf-16"), "looks like UTF-16"),
    (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff", "gzip-compressed"),
    ("Процедура Тест()\n".encode("utf-8"), "must be JSON Lines"),
])
def test_auto_on_a_file_that_is_not_json_lines_keeps_its_hint(tmp_path, data, hint):
    src = tmp_path / "c.jsonl"
    src.write_bytes(data)
    with pytest.raises(P.PrepareError, match=hint):
        P.run(P.Options(input=src, prefix=tmp_path / "d", data_type="auto", workers=1,
                        progress=False), log=quiet)


def test_alpaca_history_is_the_earlier_turns():
    tok = get_tokenizer()
    rec = {"instruction": "И ещё?", "output": "Всё.", "history": [["Привет", "Здравствуйте"]]}
    [(ids, mask)] = R.process_record(rec, "sft", tok)
    want = encode_chat([{"role": "user", "content": "Привет"},
                        {"role": "assistant", "content": "Здравствуйте"},
                        {"role": "user", "content": "И ещё?"},
                        {"role": "assistant", "content": "Всё."}])
    assert np.frombuffer(ids, np.uint16).tolist() == want[0]
    assert np.frombuffer(mask, np.uint8).tolist() == want[1]
    r = R.process_line(json.dumps({**rec, "history": [["only one"]]}).encode(), 2, "sft", tok)
    assert "field 'history'[0] is not a [instruction, response] pair" in r.error


def test_train_with_an_explicit_type_that_does_not_fit_says_it_once(tiny_model_path, tmp_path,
                                                                    capsys):
    src = write_jsonl(tmp_path / "corpus.jsonl", text_rows(120))
    rc = T.main(["--base-model", str(tiny_model_path), "--data-file", str(src),
                 "--data-type", "sft", "--data-prefix", str(tmp_path / "p"),
                 "--runs-dir", str(tmp_path / "runs"), "--run-name", "r", *FAST])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("have no SFT fields") == 1 and f"{src}:2" not in err
    assert (f"120 of 120 records in {src} have no SFT fields (keys seen: text) - set "
            "DATA_TYPE=text or auto") in err


def test_scan_counts_match_a_plain_json_read(tmp_path):
    """The block fast path (one msgspec call per block) and the per-line path (blank lines,
    CRLF, invalid lines, records of no known shape) give the same counts, the same first
    record of each shape and the keys seen, as json.loads line by line."""
    kinds = [*text_rows(3), *sharegpt_rows(3), *alpaca_rows(3),
             {"prompt": "p", "chosen": "c", "rejected": "r"}]
    lines = []
    for i in range(6000):  # ~4 MiB: several 1 MiB blocks
        row = kinds[i * 7 % len(kinds)]
        lines.append(json.dumps({**row, "pad": "x" * 700}, ensure_ascii=False))
        if i % 1999 == 0:  # a few blocks of odd lines; the others take the fast path
            lines += ["", "  ", "not json", "[1, 2]", '{"question": "q"}']
    src = tmp_path / "big.jsonl"
    src.write_bytes(("\n".join(lines[:3000]) + "\r\n" + "\n".join(lines[3000:])).encode())
    want_patterns: dict = {}
    first: dict = {}
    invalid = 0
    for n, line in enumerate(src.read_bytes().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict):
            invalid += 1
            continue
        p = frozenset(k for k in R.SHAPE_KEYS if k in rec)
        want_patterns[p] = want_patterns.get(p, 0) + 1
        first.setdefault(p, n)
    assert src.stat().st_size > 3 << 20
    sh = D.scan(src)
    assert dict(sh.patterns) == want_patterns and sh.first == first
    assert sh.invalid == invalid and sh.records == sum(want_patterns.values()) + invalid
    assert sh.keys_of(lambda p: not p) == ["question"]
    with pytest.raises(D.DataShapeError, match="more than one kind of record: "):
        D.auto_type(sh)

"""blocks: a block of lines gives what records.process_line gives line by line; the file is
cut into whole lines exactly, whatever the block size."""

from __future__ import annotations

import hashlib
import json

import numpy as np
from test_prepare import CORPUS

from rwkvforge.data import blocks as B
from rwkvforge.data.records import process_line
from rwkvforge.tokenizer import get_tokenizer


class Progress:
    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int) -> None:
        self.n += n


def test_blocks_split_lines_exactly(tmp_path):
    """Tiny read blocks: lines across block edges, an over-long line spanning several
    blocks, CRLF, blank lines, a last line without newline, a separator-holding text and
    a line only json.loads accepts (NaN): same documents, errors and line numbers."""
    rows = [json.dumps({"text": CORPUS[i % 8] + f" #{i}"}, ensure_ascii=False)
            for i in range(60)]
    rows[5] = '{"text": "' + "y" * 5000 + '"}'  # over the limit, spans blocks
    rows[9] = '{"text": "unit\\u001fseparator", "x": NaN}'
    rows[12] = ""
    rows[20] = '{"text": "crlf line"}\r'
    src = tmp_path / "c.jsonl"
    src.write_bytes("\n".join(rows).encode("utf-8"))  # no final newline
    for block in (16, 100, 4096, 1 << 20):
        errors = []
        hasher, progress = hashlib.sha256(), Progress()
        blocks = list(B.iter_blocks(src, 3000, hasher, progress, block))
        assert hasher.hexdigest() == hashlib.sha256(src.read_bytes()).hexdigest()
        assert progress.n == src.stat().st_size
        assert b"".join(b for _, b, _ in blocks).count(b"\n") + 1 + sum(
            len(o) for _, _, o in blocks) == len(rows)
        got = []
        for first, data, oversize in blocks:
            errors += [(e.lineno, e.error) for e in oversize]
            r = B.process_block(first, data, 3000, "text", get_tokenizer())
            errors += [(e.lineno, e.error) for e in r.errors]
            got.append(np.frombuffer(r.ids, np.uint16))
        assert errors == [(6, "line is 5013 bytes, over the 0.00286102 MiB limit: split the "
                           "document, or raise --max-line-mb")], block
        tok = get_tokenizer("reference").reference
        want = [tok.encode(json.loads(r)["text"]) + [0] for i, r in enumerate(rows)
                if i not in (5, 12)]
        assert np.concatenate(got).tolist() == [i for w in want for i in w]


def test_whole_block_decode_only_takes_one_object_per_line():
    """The one-call JSON path of a text block is taken only when every line is exactly one
    object with a non-blank string text; everything else goes line by line."""
    ok = b'{"text": "a"}\n{"text": "b", "n": {"x": [1, {"y": 2}]}}\r\n{"text": "c"}'
    assert B._block_texts_at_once(ok, 1 << 20) == ["a", "b", "c"]
    assert B._block_texts_at_once(ok + b"\n", 1 << 20) == ["a", "b", "c"]
    for bad in (
        b'{"text": "a"}\n\n{"text": "b"}\n',  # blank line
        b'{"text": "a"}\n   \n{"text": "b"}\n',  # whitespace-only line
        b' {"text": "a"}\n',  # leading space (json.loads would accept: line by line)
        b'{"text": "a"} {"text": "b"}\n',  # two objects on a line
        b'{"text": "a"}{"text": "b"}\n{"text": "c"}\n',
        b'{"text":\n"a"}\n',  # one object over two lines
        b'{"n": {"m": 1}\n{"text": "x"}}\n',
        b'{"text": "a"} {"text": "b"}\n   \n',  # 2 objects + 1 blank line = 2 "lines"
        b'{"text": "   "}\n',  # blank text
        b'{"text": ""}\n',
        b'{"text": 5}\n',
        b'{"txt": "a"}\n',
        b'\xef\xbb\xbf{"text": "bom"}\n',
        b'{"text": "bad \\ud800 surrogate"}\n',
        b'{"text": "a", "x": NaN}\n',
        b'{"text": "a"}\n{"text": "\xff"}\n',  # not UTF-8
    ):
        assert B._block_texts_at_once(bad, 1 << 20) is None, bad
    assert B._block_texts_at_once(ok, 10) is None  # a line could be over the limit


def test_text_block_paths_agree_and_name_lines(monkeypatch):
    """A block taken in one call and the same block line by line give the same ids; a block
    with a bad line reports it at its own line number."""
    tok = get_tokenizer()
    rows = [json.dumps({"text": t + f" #{i}"}, ensure_ascii=False)
            for i, t in enumerate(CORPUS * 5)]
    data = ("\r\n".join(rows) + "\r\n").encode()
    fast = B.process_text_block(7, data, 1 << 20, tok)
    monkeypatch.setattr(B, "_block_texts_at_once", lambda *a: None)
    slow = B.process_text_block(7, data, 1 << 20, tok)
    assert fast.ids == slow.ids and fast.sizes.tolist() == slow.sizes.tolist()
    assert not fast.errors and len(fast.sizes) == 40
    monkeypatch.undo()
    rows[3] = '{"text": "a"} {"text": "b"}'
    rows[4] = "   "
    r = B.process_text_block(7, "\n".join(rows).encode(), 1 << 20, tok)
    assert [(e.lineno, e.error.split(":")[0]) for e in r.errors] == [(10, "invalid JSON")]
    assert len(r.sizes) == 38


def test_a_block_gives_what_each_line_gives():
    """Good and bad lines of every kind in one block: the block's items are the accepted
    lines' items in order, its errors are process_line's errors, at the same line numbers."""
    tok = get_tokenizer()
    text = ['{"text": "ok"}', '{"text": "ok", "x": NaN}', '{"text": "   "}', '["a"]',
            '{"txt": "a"}', '{"text": "bad \\ud800 surrogate"}', '\ufeff{"text": "bom"}',
            '{"text": "tab\there"}', '{"text": "unit\\u001fsep"}']
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    sft = [json.dumps({"messages": msgs}), json.dumps({"prompt": "q"}),
           json.dumps({"system": "S", "prompt": "Q", "response": "A"}), '{"messages": 1}']
    dpo = [json.dumps({"prompt": "Q", "chosen": "A", "rejected": "B"}),
           json.dumps({"prompt": "Q", "chosen": "A", "rejected": "A"}),
           json.dumps({"prompt": "Q", "chosen": "A"})]
    for kind, rows in (("text", text), ("sft", sft), ("dpo", dpo)):
        data = "\n".join(rows).encode("utf-8") + b"\n"
        r = B.process_block(5, data, 1 << 20, kind, tok)
        each = [process_line(row.encode("utf-8"), 5 + i, kind, tok)
                for i, row in enumerate(rows)]
        want_errors = [(x.lineno, x.error) for x in each if x.error is not None]
        assert [(e.lineno, e.error) for e in r.errors] == want_errors and want_errors, kind
        assert sorted(r.rejected) == [n for n, _ in want_errors]
        items = [it for x in each if x.items for it in x.items]
        assert r.ids == b"".join(i for i, _ in items) and len(r.sizes) == len(items) > 0
        assert r.sizes.tolist() == [len(i) // 2 for i, _ in items]
        if kind != "text":
            assert r.mask == b"".join(m for _, m in items)
        assert r.per_doc == (2 if kind == "dpo" else 1)

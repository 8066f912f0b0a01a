"""The fast tokenizing path: a block of whole JSONL lines -> the items of its accepted
documents back to back, plus its rejected lines (a BlockResult: what a worker process sends
back). A text block is encoded in one tokenizer call and round-trip checked in one vectorised
pass; sft / dpo blocks go line by line through records.process_line. iter_blocks cuts a file
into such blocks, block_size_for sizes them.

Rule: a block gives exactly what records.process_line gives for each of its lines, one after
the other (same ids, same errors, same line numbers). Why: the prepared bytes must not depend
on the block size or on the number of workers.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from rwkvforge.data.records import (FAST_JSON_ERRORS, ROUND_TRIP_ERROR, LineResult, fast_json,
                                    parse_line, process_line, record_text)
from rwkvforge.tokenizer import (doc_sep_id, get_tokenizer, ids_match_bytes, surrogate_error,
                                 word_tables)

try:  # msgspec (optional, see records.fast_json): the `text` of every line of a block at once
    import msgspec as _msgspec

    class _TextLine(_msgspec.Struct):
        text: str

    _fast_text_lines = _msgspec.json.Decoder(_TextLine).decode_lines
except ImportError:  # pragma: no cover - msgspec missing
    _fast_text_lines = None


@dataclass
class BlockResult:
    """One block of lines, processed: the accepted documents' items back to back (file
    order) and the rejected lines."""
    ids: bytes  # uint16 ids of all items
    mask: bytes | None  # uint8 loss mask of all items (sft / dpo)
    sizes: np.ndarray  # int64 size of each item
    per_doc: int  # items per document (2 for dpo pairs)
    errors: list[LineResult]
    rejected: dict[int, str]  # line number -> its text, for the rejects file


def _oversize(lineno: int, n: int, max_line_bytes: int) -> LineResult:
    mb = max_line_bytes / (1 << 20)
    return LineResult(lineno, None, f"line is {n} bytes, over the {mb:g} MiB limit: split "
                      "the document, or raise --max-line-mb")


def _block_lines(first: int, data: bytes, max_line_bytes: int, errors: list[LineResult]
                 ) -> Iterator[tuple[int, bytes]]:
    """(line number, line) of the non-blank lines of a block; over-long ones -> errors."""
    lines = data.split(b"\n")
    if lines[-1] == b"":
        lines.pop()  # the block ends with a newline
        last_open = -1
    else:
        last_open = len(lines) - 1  # the file's last line, without a newline
    for i, raw in enumerate(lines):
        if len(raw) > max_line_bytes:
            errors.append(_oversize(first + i, len(raw) + (i != last_open), max_line_bytes))
        elif raw.strip():
            yield first + i, raw


def _rejected_text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace").rstrip("\r\n")[:100_000]


def _block_texts_at_once(data: bytes, max_line_bytes: int) -> list[str] | None:
    """The `text` of every line of a block in ONE msgspec call, or None: then the per-line
    path decides (and names any problem).

    Taken only when each line is exactly one JSON object holding a non-blank string `text`:
    every line starts with "{" and ends with "}" (before its LF or CRLF), and the decoder
    finds as many objects as there are lines. JSON never allows "}" + whitespace + "{" inside
    a value, and strings cannot hold raw line breaks (msgspec refuses them), so every line
    break ends a top-level object: each line holds at least one, and equal counts mean
    exactly one. Such a line is accepted by json.loads alone exactly when msgspec accepts it
    (lone surrogates, NaN, BOMs, blank lines, over-long lines all leave this path)."""
    if _fast_text_lines is None or not data or len(data) > max_line_bytes:
        return None
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == 10)  # the line breaks
    n_lines = len(nl) + (data[-1] != 10)
    after, before = nl + 1, nl - 1
    before[buf[before] == 13] -= 1  # CRLF
    if (data[0] != 123 or (data[-1] != 10 and data[-1] != 125)  # "{" ... "}"
            or not (buf[before] == 125).all()  # "}" before every line break
            or not (buf[after[after < len(buf)]] == 123).all()):  # "{" after every one
        return None
    try:
        recs = _fast_text_lines(data)
    except FAST_JSON_ERRORS:
        return None
    if len(recs) != n_lines:
        return None
    texts = [r.text for r in recs]
    for t in texts:
        if not t or t.isspace():
            return None
    return texts


def process_text_block(first: int, data: bytes, max_line_bytes: int, tok) -> BlockResult:
    """Text lines of one block -> their ids + EOT, back to back. All documents are encoded
    in one call and checked in one vectorised round trip (per document only when that
    fails): the same results as process_line per line, with little Python per token."""
    errors: list[LineResult] = []
    rejected: dict[int, str] = {}
    texts: list[str] = []
    linenos: list[int] = []
    raws: list[bytes] = []
    whole = _block_texts_at_once(data, max_line_bytes)
    if whole is not None:  # one line per document, no blank lines
        texts, linenos = whole, list(range(first, first + len(whole)))
    for lineno, raw in (() if whole is not None else
                        _block_lines(first, data, max_line_bytes, errors)):
        if fast_json is not None:  # fast path: a well-formed {"text": "..."} line
            try:
                rec = fast_json(raw)  # bytes: msgspec checks UTF-8 and never makes surrogates
            except FAST_JSON_ERRORS:
                rec = None
            text = rec.get("text") if type(rec) is dict else None
            if type(text) is str and text and not text.isspace():
                texts.append(text)
                linenos.append(lineno)
                raws.append(raw)
                continue
        try:  # the slow path gives the exact reason (or accepts what only json.loads does)
            text = record_text(parse_line(raw, lineno))
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise surrogate_error(text, e) from None
        except ValueError as e:
            errors.append(LineResult(lineno, None, str(e)))
            rejected[lineno] = _rejected_text(raw)
            continue
        texts.append(text)
        linenos.append(lineno)
        raws.append(raw)
    arr, sizes, ok = tok.encode_documents_checked(texts)
    if not ok:  # find which documents do not come back
        if whole is not None:
            raws = data.split(b"\n")
        keep = np.ones(len(sizes), bool)
        ends = np.cumsum(sizes)
        for k, (lo, hi) in enumerate(zip(ends - sizes, ends)):
            if not ids_match_bytes(arr[lo:hi - 1], texts[k].encode("utf-8"), empty_tokens=0):
                keep[k] = False
                errors.append(LineResult(linenos[k], None, ROUND_TRIP_ERROR))
                rejected[linenos[k]] = _rejected_text(raws[k])
        arr = arr[np.repeat(keep, sizes)]
        sizes = sizes[keep]
    return BlockResult(arr.tobytes(), None, sizes, 1, errors, rejected)


def process_block(first: int, data: bytes, max_line_bytes: int, data_type: str, tok
                  ) -> BlockResult:
    """The lines of one block (the first is line `first`) -> their BlockResult."""
    if data_type == "text":
        return process_text_block(first, data, max_line_bytes, tok)
    errors: list[LineResult] = []
    rejected: dict[int, str] = {}
    ids: list[bytes] = []
    mask: list[bytes] = []
    sizes: list[int] = []
    for lineno, raw in _block_lines(first, data, max_line_bytes, errors):
        r = process_line(raw, lineno, data_type, tok)
        if r.error is not None:
            errors.append(r)
            rejected[lineno] = _rejected_text(raw)
            continue
        assert r.items is not None
        for i, m in r.items:
            ids.append(i)
            mask.append(m or b"")
            sizes.append(len(i) // 2)
    return BlockResult(b"".join(ids), b"".join(mask), np.asarray(sizes, np.int64),
                       2 if data_type == "dpo" else 1, errors, rejected)


_WORKER_DATA_TYPE = "text"
_WORKER_MAX_LINE = 1 << 26


def worker_init(data_type: str, max_line_bytes: int) -> None:
    """Make this process a worker for `data_type` blocks: the tokenizer and its tables loaded
    (before a fork they are shared with the forked workers)."""
    global _WORKER_DATA_TYPE, _WORKER_MAX_LINE
    _WORKER_DATA_TYPE, _WORKER_MAX_LINE = data_type, max_line_bytes
    get_tokenizer()
    word_tables()
    doc_sep_id()


def pool_worker_init(data_type: str, max_line_bytes: int) -> None:
    """A forked tokenizer process: Ctrl-C is the parent's to handle (it terminates the pool),
    and SIGTERM ends the process at once (not main()'s cleanup handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    worker_init(data_type, max_line_bytes)


def worker_block(task: tuple[int, bytes]) -> BlockResult:
    """process_block on (number of the first line, the block's bytes) with worker_init's
    settings."""
    return process_block(task[0], task[1], _WORKER_MAX_LINE, _WORKER_DATA_TYPE, get_tokenizer())


def block_size_for(file_bytes: int, workers: int) -> int:
    """Bytes per worker task: ~4 tasks per worker (balance), 16 KiB .. 1 MiB (IPC cost)."""
    return int(min(1 << 20, max(16 << 10, file_bytes // (4 * max(workers, 1)))))


def iter_blocks(path: Path, max_line_bytes: int, hasher, progress, block_bytes: int
                ) -> Iterator[tuple[int, bytes, list[LineResult]]]:
    """Yield (number of the first line, whole lines, lines already rejected for size).

    The file is read in `block_bytes` pieces; a line over `max_line_bytes` that does not
    fit in a piece is skipped as it is read, never held whole in memory."""
    lineno = 1  # number of the line that starts `carry`
    carry = b""
    skipping = 0  # > 0: bytes so far of an over-long line being skipped
    with open(path, "rb") as f:
        while True:
            buf = f.read(block_bytes)
            if not buf:
                break
            hasher.update(buf)
            progress.update(len(buf))
            if skipping:
                nl = buf.find(b"\n")
                if nl < 0:
                    skipping += len(buf)
                    continue
                yield lineno, b"", [_oversize(lineno, skipping + nl + 1, max_line_bytes)]
                lineno, skipping, buf = lineno + 1, 0, buf[nl + 1:]
            data = carry + buf if carry else buf
            cut = data.rfind(b"\n") + 1
            block, carry = data[:cut], data[cut:]
            if block:
                yield lineno, block, []
                lineno += int(np.count_nonzero(np.frombuffer(block, np.uint8) == 10))
            if len(carry) > max_line_bytes:
                skipping, carry = len(carry), b""
    if skipping:
        yield lineno, b"", [_oversize(lineno, skipping, max_line_bytes)]
    elif carry:
        yield lineno, carry, []  # the last line has no newline

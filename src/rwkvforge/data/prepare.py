"""Prepare training data: JSONL -> binidx (text), masked SFT examples or DPO pairs.

    rwkvforge prepare --input data/raw/corpus.jsonl --output-prefix data/processed/corpus \\
        --type text --ctx-len 4096 --repeat 3 --shuffle --seed 42 --val-fraction 0
    ./scripts/prepare_binidx.sh --type sft          # DATA_FILE / DATA_TYPE / ... from configs
    python -m rwkvforge.data.prepare --help

Input: one JSON object per line (UTF-8; blank lines are skipped, as in RWKV-LM):
  text  {"text": "..."}
  sft   {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]},
        {"prompt": "...", "response": "..."} or Alpaca {"instruction", "input"?, "output"}
        (optional "system" string on the last two)
  dpo   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
        (optional "system" string, as for SFT)

Outputs, for `--output-prefix P`:
  P.bin / P.idx            train token ids: MMIDIDX v1 binidx, uint16 (see data/binidx.py).
                           text: one item per document, the document's ids + end-of-doc 0;
                           byte-identical to RWKV-LM make_data.py for the same documents in
                           the same order (--val-fraction 0, no --shuffle, --repeat 1 gives
                           the file's order).
                           sft: one item per example (World chat format, ends with 0).
                           dpo: two items per pair (chosen, rejected), one document per pair.
  P.mask.bin / .mask.idx   sft / dpo: the loss mask, uint8 (1 = trained token), item for
                           item the same sizes as P.bin. Why binidx + a mask stream rather
                           than .npz / safetensors: the ids stay readable by every binidx tool
                           (megatron-core IndexedDataset, RWKV-LM readers), both files are
                           memory-mapped (no load time, any size), and streaming writes need
                           no second copy in memory.
  P.val.*                  the validation split, same layout (absent when no document is
                           held out). Held-out documents are picked by --seed and kept in file
                           order; they are never repeated or shuffled.
  P.meta.json              counts, magic prime and steps per epoch for CTX_LEN, the options
                           and the source's sha256. Written last: it marks a complete run.
  P.rejects.jsonl          with --skip-invalid: each rejected line with its reason.

Every line is checked: not UTF-8, invalid JSON, not an object, missing or non-string fields,
empty text, roles out of order, a lone surrogate (e.g. "\\ud800"), encode -> decode not giving
the text back, a line over --max-line-mb. Errors name file:line. By default any error stops
the run before an output is written; --skip-invalid skips such lines and lists them in
P.rejects.jsonl. Outputs are written under temporary names and renamed (.idx after .bin,
meta last), so an interrupted run never leaves a valid-looking half-written dataset.

Tokenization runs in --workers processes (default: all cores) with the fast Rust tokenizer:
the file goes to them in blocks of whole lines (16 KiB .. 1 MiB); each block's documents are
encoded in one call and round-trip checked in one vectorised pass (bench/prepare_bench.py).
msgspec, when installed, parses JSON (json.loads re-parses anything it refuses). A progress
bar shows on a terminal for inputs over a few MB.
"""

from __future__ import annotations

import argparse
import gc
import glob
import hashlib
import json
import math
import multiprocessing as mp
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import numpy as np

from rwkvforge import config as cfg
from rwkvforge.data.binidx import BinIdxReader, BinIdxWriter, bin_path, idx_path
from rwkvforge.paths import sample_data_dir, workspace_root
from rwkvforge.runtime import pid_alive
from rwkvforge.tokenizer import (EOT, VOCAB_NAME, ChatFormatError, TokenizerInputError,
                                 chat_segments, check_messages, doc_sep_id, get_tokenizer,
                                 ids_match_bytes, surrogate_error, word_tables)

SAMPLES = {"text": "bsl_code.jsonl", "sft": "bsl_sft.jsonl", "dpo": "bsl_dpo.jsonl"}
MAX_ERRORS_SHOWN = 20
META_FORMAT = "rwkvforge-data/1"


class PrepareError(Exception):
    """A problem with the input or options; the message says what to do."""


# ---------------------------------------------------------------------------------------
# one line -> token ids (runs in worker processes)
# ---------------------------------------------------------------------------------------

@dataclass
class LineResult:
    lineno: int
    items: list[tuple[bytes, bytes | None]] | None  # [(uint16 ids, uint8 mask | None)]
    error: str | None = None


def _typename(v: Any) -> str:
    return "missing" if v is None else f"{type(v).__name__}"


def _need_str(rec: dict, key: str) -> str:
    v = rec.get(key)
    if not isinstance(v, str):
        if key not in rec:
            raise ValueError(f"missing field '{key}' (found keys: "
                             f"{', '.join(sorted(rec)) or 'none'})")
        raise ValueError(f"field '{key}' is {_typename(v)}, expected a string")
    return v


def record_to_messages(rec: dict) -> list[dict[str, str]]:
    """An SFT record in any supported shape -> World chat messages."""
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"field 'system' is {_typename(system)}, expected a string")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    if "messages" in rec:
        msgs = rec["messages"]
        if not isinstance(msgs, list):
            raise ValueError(f"field 'messages' is {_typename(msgs)}, expected a list")
        if head and msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
            raise ValueError("both a top-level 'system' field and a system message: keep one")
        return head + msgs
    if "prompt" in rec or "response" in rec:
        return head + [{"role": "user", "content": _need_str(rec, "prompt")},
                       {"role": "assistant", "content": _need_str(rec, "response")}]
    if "instruction" in rec or "output" in rec:
        user = _need_str(rec, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"field 'input' is {_typename(extra)}, expected a string")
        if extra and extra.strip():
            user = f"{user}\n{extra}"
        return head + [{"role": "user", "content": user},
                       {"role": "assistant", "content": _need_str(rec, "output")}]
    raise ValueError("no SFT fields: expected 'messages', 'prompt' + 'response', or "
                     f"'instruction' + 'output' (found keys: {', '.join(sorted(rec)) or 'none'})")


def dpo_hint(rec: Any) -> str:
    """For an SFT record that is a DPO pair: how to read it as one."""
    if isinstance(rec, dict) and "chosen" in rec and "rejected" in rec:
        return ("; this is a preference pair (chosen / rejected): prepare it with --type dpo "
                "(train: DATA_TYPE=dpo)")
    return ""


def _dpo_side(rec: dict, key: str, role: str, prompt: list | None = None) -> list[dict]:
    v = rec.get(key)
    if isinstance(v, str):
        return [{"role": role, "content": v}]
    if isinstance(v, list):
        if prompt is not None and len(v) > len(prompt) and v[:len(prompt)] == prompt:
            v = v[len(prompt):]  # chosen / rejected repeating the prompt turns
        return v
    if key not in rec:
        raise ValueError(f"missing field '{key}' (found keys: {', '.join(sorted(rec))})")
    raise ValueError(f"field '{key}' is {_typename(v)}, expected a string or a list of "
                     "messages")


def _encode_segments(segs: list[tuple[str, bool]], tok) -> tuple[bytes, bytes]:
    """Encode chat segments, verify the round trip, return (ids, mask) bytes."""
    ids: list[int] = []
    mask: list[int] = []
    for (text, trained), enc in zip(segs, tok.encode_batch([t for t, _ in segs])):
        ids += enc
        mask += [int(trained)] * len(enc)
    expect = "".join(t for t, _ in segs).encode("utf-8")
    if tok.decode_bytes(ids) != expect:
        raise ValueError("encode -> decode does not give the text back (tokenizer problem); "
                         "report this line")
    ids.append(EOT)
    mask.append(int(segs[-1][1]))
    return np.asarray(ids, np.uint16).tobytes(), np.asarray(mask, np.uint8).tobytes()


def process_record(rec: Any, kind: str, tok) -> list[tuple[bytes, bytes | None]]:
    """A parsed JSON value -> the items of one document; raises ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if kind == "text":
        text = _need_str(rec, "text")
        if not text.strip():
            raise ValueError("empty text")
        ids = tok.encode(text)
        arr = np.empty(len(ids) + 1, np.uint16)  # the document's ids + end-of-doc 0
        arr[:-1] = ids
        arr[-1] = EOT
        if tok.decode_bytes(arr[:-1]) != text.encode("utf-8"):
            raise ValueError("encode -> decode does not give the text back (tokenizer "
                             "problem); report this line")
        return [(arr.tobytes(), None)]
    if kind == "sft":
        try:
            msgs = record_to_messages(rec)
        except ValueError as e:
            raise ValueError(f"{e}{dpo_hint(rec)}") from None
        return [_encode_segments(chat_segments(msgs), tok)]
    if kind == "dpo":
        prompt = _dpo_side(rec, "prompt", "user")
        system = rec.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"field 'system' is {_typename(system)}, expected a string")
        if system and system.strip():
            if prompt and isinstance(prompt[0], dict) and prompt[0].get("role") == "system":
                raise ValueError("both a top-level 'system' field and a system message in "
                                 "'prompt': keep one")
            prompt = [{"role": "system", "content": system}] + prompt
        check_messages(prompt)
        if prompt[-1]["role"] != "user":
            raise ChatFormatError("the DPO prompt must end with a user message")
        out = []
        for key in ("chosen", "rejected"):
            resp = _dpo_side(rec, key, "assistant", prompt)
            try:
                segs = chat_segments(prompt + resp, train_from=len(prompt))
            except ChatFormatError as e:
                raise ChatFormatError(f"'{key}' (after the prompt's {len(prompt)} "
                                      f"messages): {e}") from None
            out.append(_encode_segments(segs, tok))
        if out[0][0] == out[1][0]:
            raise ValueError("'chosen' and 'rejected' are identical: the pair teaches nothing")
        return out
    raise ValueError(f"unknown type {kind!r}")


try:  # optional: ~2x faster than json.loads; any line it rejects is re-parsed by json
    import msgspec as _msgspec

    _fast_json = _msgspec.json.Decoder().decode
    _FastJSONError: type[Exception] = _msgspec.DecodeError

    class _TextLine(_msgspec.Struct):
        text: str

    _fast_text_lines = _msgspec.json.Decoder(_TextLine).decode_lines
except ImportError:  # pragma: no cover - msgspec missing
    _fast_json = _fast_text_lines = None
    _FastJSONError = ValueError


def parse_line(raw: bytes, lineno: int) -> Any:
    """Bytes of one JSONL line -> the JSON value; ValueError says what is wrong.

    Accepts exactly what json.loads accepts (make_data.py's parser): msgspec, when
    installed, is only a fast path; every line it refuses (NaN, lone surrogates, ...) goes
    through json.loads, which gives the value or the error message."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                         f"{e.start} of the line): {_encoding_hint(raw, lineno)}") from None
    if line.startswith("\ufeff"):
        if lineno != 1:
            raise ValueError("a UTF-8 byte-order mark at the start of this line (files "
                             "joined with `cat`?): remove it, e.g. "
                             "`sed -i '2,$ s/^\\xEF\\xBB\\xBF//' in.jsonl`")
        line = line[1:]  # a UTF-8 byte-order mark
    if _fast_json is not None:
        try:
            return _fast_json(line)
        except (_FastJSONError, ValueError, RecursionError):
            pass
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        hint = ""
        if e.msg.startswith("Invalid control character"):
            hint = (": tabs and newlines inside a JSON string must be escaped as \\t and "
                    "\\n (json.dumps does it)")
        elif lineno == 1 and e.pos == 0 and not line.lstrip().startswith(("{", "[", '"')):
            hint = (": the input must be JSON Lines, one object per line such as "
                    '{"text": "..."} (see "Your own data" in docs/quickstart.md)')
        msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "... starting at" + column
        raise ValueError(f"invalid JSON: {msg} at column {e.colno}{hint}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply for the parser") from None


def _encoding_hint(raw: bytes, lineno: int, files: str = "in.jsonl > out.jsonl") -> str:
    """What to do about a line (or a whole file: lineno 1) that is not UTF-8, for the usual
    causes; `files` is the iconv command's input and output."""
    if lineno == 1 and raw[:2] == b"\x1f\x8b":
        return "the file is gzip-compressed: decompress it first (`gunzip in.jsonl.gz`)"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 1 and raw.count(0) * 3 > len(raw)):
        return ("the file looks like UTF-16 (Notepad's \"Unicode\", PowerShell's `>`): "
                f"save it as UTF-8, e.g. `iconv -f utf-16 -t utf-8 {files}`")
    return (f"save the file as UTF-8, e.g. `iconv -f cp1251 -t utf-8 {files}` "
            "(cp1251 is the usual Windows Cyrillic encoding)")


def process_line(raw: bytes, lineno: int, kind: str, tok) -> LineResult:
    try:
        return LineResult(lineno, process_record(parse_line(raw, lineno), kind, tok))
    except (ValueError, ChatFormatError, TokenizerInputError) as e:
        return LineResult(lineno, None, str(e))


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


ROUND_TRIP_ERROR = ("encode -> decode does not give the text back (tokenizer problem); "
                    "report this line")


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
    except (_FastJSONError, ValueError, RecursionError):
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
        if _fast_json is not None:  # fast path: a well-formed {"text": "..."} line
            try:
                rec = _fast_json(raw)  # bytes: msgspec checks UTF-8 and never makes surrogates
            except (_FastJSONError, ValueError, RecursionError):
                rec = None
            text = rec.get("text") if type(rec) is dict else None
            if type(text) is str and text and not text.isspace():
                texts.append(text)
                linenos.append(lineno)
                raws.append(raw)
                continue
        try:  # the slow path gives the exact reason (or accepts what only json.loads does)
            rec = parse_line(raw, lineno)
            if not isinstance(rec, dict):
                raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
            text = _need_str(rec, "text")
            if not text.strip():
                raise ValueError("empty text")
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


def process_block(first: int, data: bytes, max_line_bytes: int, kind: str, tok
                  ) -> BlockResult:
    if kind == "text":
        return process_text_block(first, data, max_line_bytes, tok)
    errors: list[LineResult] = []
    rejected: dict[int, str] = {}
    ids: list[bytes] = []
    mask: list[bytes] = []
    sizes: list[int] = []
    for lineno, raw in _block_lines(first, data, max_line_bytes, errors):
        r = process_line(raw, lineno, kind, tok)
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
                       2 if kind == "dpo" else 1, errors, rejected)


_WORKER_KIND = "text"
_WORKER_MAX_LINE = 1 << 26


def _worker_init(kind: str, max_line_bytes: int) -> None:
    global _WORKER_KIND, _WORKER_MAX_LINE
    _WORKER_KIND, _WORKER_MAX_LINE = kind, max_line_bytes
    get_tokenizer()
    word_tables()  # built before the fork, shared by the workers
    doc_sep_id()


def _pool_worker_init(kind: str, max_line_bytes: int) -> None:
    """A forked tokenizer process: Ctrl-C is the parent's to handle (it terminates the pool),
    and SIGTERM ends the process at once (not main()'s cleanup handler)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
    _worker_init(kind, max_line_bytes)


def _worker_block(task: tuple[int, bytes]) -> BlockResult:
    return process_block(task[0], task[1], _WORKER_MAX_LINE, _WORKER_KIND, get_tokenizer())


# ---------------------------------------------------------------------------------------
# reading the file
# ---------------------------------------------------------------------------------------

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


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", disable=None,
                file=sys.stderr)


# ---------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------

@dataclass
class Options:
    input: Path
    prefix: Path
    kind: str
    ctx_len: int = 512
    repeat: int = 1
    shuffle: bool = False
    seed: int = 42
    val_fraction: float = 0.0
    skip_invalid: bool = False
    workers: int = 1
    max_line_mb: float = 64.0
    micro_bsz: int = 1
    grad_accum: int = 1
    num_gpus: int = 1
    progress: bool = True
    glob: str = "**/*"  # the files of a folder input


class FolderInput(NamedTuple):
    """A folder read into a JSONL by _folder_to_jsonl."""

    path: Path
    names: list[str]  # the files' paths relative to `path`, by JSONL line
    errors: list[LineResult]  # files that are not UTF-8 (their lines are blank)
    empty: int  # empty files (blank lines too)


def _folder_to_jsonl(folder: Path, pattern: str, out: Path) -> FolderInput:
    """Each file under `folder` matching `pattern` (sorted by path; hidden files and folders
    skipped) becomes line k of the JSONL `out`: {"text": its UTF-8 text, BOM removed}. An
    empty file, or one that is not UTF-8, gets a blank line instead (lines keep their
    numbers)."""
    try:
        files = sorted(p for p in folder.glob(pattern) if p.is_file() and not any(
            part.startswith(".") for part in p.relative_to(folder).parts))
    except (ValueError, NotImplementedError) as e:  # a bad pattern, e.g. "/abs" or "**x"
        raise PrepareError(f"--data-glob {pattern!r}: {e}") from None
    if not files:
        raise PrepareError(f"{folder}: no files match --data-glob {pattern!r} (DATA_GLOB)")
    names, errors, empty = [], [], 0
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for k, p in enumerate(files, start=1):
            names.append(p.relative_to(folder).as_posix())
            raw = p.read_bytes()
            try:
                text = raw.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError as e:
                hint = _encoding_hint(raw, 2, f"'{p}' > '{p}.utf8'")
                errors.append(LineResult(k, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                         f"at byte {e.start}): {hint}"))
                text = ""
            if not text.strip():
                empty += not errors or errors[-1].lineno != k
                f.write("\n")
            else:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return FolderInput(folder, names, errors, empty)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _first_errors(where: Callable[[int], str], errors: list[LineResult]) -> str:
    """The first rejected lines, one per row, for an error message ("" when none)."""
    shown = "".join(f"\n  {where(e.lineno)}: {e.error}" for e in errors[:MAX_ERRORS_SHOWN])
    more = (f"\n  ... and {len(errors) - MAX_ERRORS_SHOWN} more"
            if len(errors) > MAX_ERRORS_SHOWN else "")
    return (":" + shown + more) if errors else ""


_TEMP_NAME = re.compile(r"(?:\.staging-(\d+).*|.*\.tmp-(\d+))")


def _remove_stale_temps(prefix: Path) -> None:
    """Delete the staging / temp files that a killed prepare of `prefix` left behind (their
    process is gone); a live concurrent run's files are left alone."""
    try:
        entries = list(prefix.parent.glob(f"{glob.escape(prefix.name)}.*"))
    except OSError:
        return
    for p in entries:
        m = _TEMP_NAME.fullmatch(p.name[len(prefix.name):])
        if m and not pid_alive(int(m.group(1) or m.group(2))):
            p.unlink(missing_ok=True)


def _remove_dataset(prefix: Path) -> None:
    for p in (idx_path(prefix), bin_path(prefix)):
        p.unlink(missing_ok=True)


def split_documents(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train ids, val ids), both in file order; val picked by `seed`. At least one train
    document; at least one val document when val_fraction > 0 and n >= 2."""
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, n - 1)
    perm = np.random.default_rng(seed).permutation(n)
    val = np.sort(perm[:n_val])
    train = np.sort(perm[n_val:])
    return train, val


def train_order(train: np.ndarray, repeat: int, shuffle: bool, seed: int) -> np.ndarray:
    """Document order of the train split: `repeat` passes, each reshuffled when `shuffle`
    (seeded, unlike make_data.py's unseeded random.shuffle)."""
    rng = np.random.default_rng([seed, 1])
    passes = [rng.permutation(train) if shuffle else train for _ in range(repeat)]
    return np.concatenate(passes) if passes else train[:0]


def _write_split(stage_ids: BinIdxReader, stage_mask: BinIdxReader | None,
                 doc_items: np.ndarray, order: np.ndarray, prefix: Path, kind: str
                 ) -> tuple[list[BinIdxWriter], dict[str, Any]]:
    writers = [BinIdxWriter(prefix, np.uint16)]
    if stage_mask is not None:
        writers.append(BinIdxWriter(Path(f"{prefix}.mask"), np.uint8))
    per_doc = 2 if kind == "dpo" else 1
    n_docs = int(len(order))
    tokens = trained = 0
    try:
        if len(order) == len(doc_items) and np.array_equal(order, np.arange(len(order))):
            # every document in staging order (no split / shuffle / repeat): one bulk copy
            for w, src in zip(writers, (stage_ids, stage_mask)):
                assert src is not None
                w.add_items(np.asarray(src.tokens), src.sizes, per_doc)
            tokens = stage_ids.num_tokens
            trained = int(stage_mask.tokens.sum()) if stage_mask is not None else 0
            order = order[:0]
        for d in order.tolist():
            first = int(doc_items[d])
            for k in range(per_doc):
                a = stage_ids[first + k]
                writers[0].add_item(a)
                tokens += len(a)
                if stage_mask is not None:
                    m = stage_mask[first + k]
                    writers[1].add_item(m)
                    trained += int(m.sum())
            for w in writers:
                w.end_document()
        for w in writers:
            w.finalize()
    except BaseException:
        for w in writers:
            w.abort()
        raise
    info = {"prefix": prefix.name, "documents": n_docs, "tokens": tokens,
            "mask_prefix": f"{prefix.name}.mask" if stage_mask is not None else None}
    if stage_mask is not None:
        info["trained_tokens"] = trained
    return writers, info


def _epoch_numbers(opts: Options, train_tokens: int, train_docs: int) -> dict[str, Any]:
    from rwkvforge.data.loader import magic_prime

    per_step = opts.micro_bsz * opts.grad_accum * opts.num_gpus
    out: dict[str, Any] = {"ctx_len": opts.ctx_len, "micro_bsz": opts.micro_bsz,
                           "grad_accum": opts.grad_accum, "num_gpus": opts.num_gpus}
    if opts.kind == "text":
        p = magic_prime(train_tokens, opts.ctx_len)
        out["magic_prime"] = p
        out["samples_per_epoch"] = p
        out["steps_per_epoch"] = (p // per_step) if p else 0
        out["rwkv_lm_args"] = (f"--my_exit_tokens {train_tokens} --magic_prime {p} "
                               f"--ctx_len {opts.ctx_len}" if p else None)
    else:
        out["magic_prime"] = None
        out["samples_per_epoch"] = train_docs
        out["steps_per_epoch"] = train_docs // per_step
    return out


def run(opts: Options, log=print) -> dict[str, Any]:
    """Prepare `opts.input` into `opts.prefix`; returns the meta dict. Raises PrepareError
    (nothing written) on invalid input without skip_invalid."""
    t0 = time.time()
    src = opts.input
    if src.is_dir() and opts.kind != "text":
        raise PrepareError(f"{src} is a folder: a folder is read as text documents (one per "
                           f"file, --type text); {opts.kind} data is one JSONL file")
    if not src.is_dir() and not src.is_file():
        raise PrepareError(f"{src}: input file not found")
    if opts.kind not in SAMPLES:
        raise PrepareError(f"unknown --type {opts.kind!r}: use text, sft or dpo")
    if opts.repeat < 1:
        raise PrepareError(f"--repeat must be >= 1, got {opts.repeat}")
    if not 0 <= opts.val_fraction < 1:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {opts.val_fraction}")
    if not (math.isfinite(opts.max_line_mb) and opts.max_line_mb * (1 << 20) >= 1):
        raise PrepareError(f"--max-line-mb must be a positive number of MiB, got "
                           f"{opts.max_line_mb}")
    prefix = opts.prefix
    prefix.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(prefix)
    if src.is_dir():  # one document per file, through a JSONL of them
        jsonl = prefix.with_name(f"{prefix.name}.folder.jsonl.tmp-{os.getpid()}")
        try:
            return _run(opts, jsonl, log, t0, folder=_folder_to_jsonl(src, opts.glob, jsonl))
        finally:
            jsonl.unlink(missing_ok=True)
    return _run(opts, src, log, t0)


def _run(opts: Options, src: Path, log, t0: float, folder: FolderInput | None = None
         ) -> dict[str, Any]:
    """run() on the JSONL `src`, which `folder` made from a folder's files when given."""
    prefix = opts.prefix
    names = folder.names if folder else None
    shown_src = folder.path if folder else src

    def where(lineno: int) -> str:  # how an error names its place
        return str(shown_src / names[lineno - 1]) if names else f"{src}:{lineno}"

    has_mask = opts.kind in ("sft", "dpo")
    stage_prefix = prefix.with_name(f"{prefix.name}.staging-{os.getpid()}")
    stage_ids = BinIdxWriter(stage_prefix, np.uint16)
    stage_mask = BinIdxWriter(Path(f"{stage_prefix}.mask"), np.uint8) if has_mask else None
    errors: list[LineResult] = list(folder.errors) if folder else []
    raw_lines: dict[int, str] = {}
    doc_first_item: list[int] = []
    hasher = hashlib.sha256()
    size = src.stat().st_size
    bar = _progress(size, opts.progress and size > (4 << 20))
    writers: list[BinIdxWriter] = []
    try:
        max_line = int(opts.max_line_mb * (1 << 20))
        blocks = iter_blocks(src, max_line, hasher, bar, block_size_for(size, opts.workers))
        pool = None
        _worker_init(opts.kind, max_line)  # load the tokenizer once; forked workers inherit it
        if opts.workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            # frozen objects are skipped by the garbage collector: the forked workers never
            # walk (and copy-on-write) the parent's heap, e.g. a loaded reference tokenizer
            gc.freeze()
            try:
                # this process is one of the workers: one fork fewer, and it would
                # otherwise sit idle waiting for results
                pool = ctx.Pool(opts.workers - 1, initializer=_pool_worker_init,
                                initargs=(opts.kind, max_line))
            finally:
                gc.unfreeze()
        try:
            # at most 2 blocks per worker in flight: memory stays bounded on huge files
            pending: deque = deque()
            max_inflight = 2 * opts.workers if pool is not None else 0
            for k, (first, data, oversize) in enumerate(blocks):
                errors.extend(oversize)
                if not data:
                    continue
                task = (first, data)
                # every workers-th block is done here, when it is collected (in order)
                pending.append(pool.apply_async(_worker_block, (task,))
                               if pool is not None and k % opts.workers else task)
                while len(pending) > max_inflight:
                    _collect(pending.popleft(), opts, errors, raw_lines, doc_first_item,
                             stage_ids, stage_mask)
            while pending:
                _collect(pending.popleft(), opts, errors, raw_lines, doc_first_item,
                         stage_ids, stage_mask)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
            bar.close()
        errors.sort(key=lambda r: r.lineno)
        if errors and not opts.skip_invalid:
            raise PrepareError(
                f"{len(errors)} invalid {'file' if names else 'line'}(s) in {shown_src}; "
                f"nothing was written{_first_errors(where, errors)}\n"
                f"Fix them, or pass --skip-invalid to skip them (they are listed in "
                f"{prefix}.rejects.jsonl).")
        n_docs = len(doc_first_item)
        if n_docs == 0:
            raise PrepareError(f"{shown_src}: no valid documents ({len(errors)} rejected); "
                               f"nothing was written{_first_errors(where, errors)}")
        for w in (stage_ids, stage_mask):
            if w is not None:
                w.commit()
        s_ids = BinIdxReader(stage_prefix)
        s_mask = BinIdxReader(Path(f"{stage_prefix}.mask")) if has_mask else None
        items = np.asarray(doc_first_item, np.int64)
        train, val = split_documents(n_docs, opts.val_fraction, opts.seed)
        order = train_order(train, opts.repeat, opts.shuffle, opts.seed)
        w_train, info_train = _write_split(s_ids, s_mask, items, order, prefix, opts.kind)
        writers += w_train
        val_prefix = Path(f"{prefix}.val")
        info_val = None
        if len(val):
            w_val, info_val = _write_split(s_ids, s_mask, items, val, val_prefix, opts.kind)
            writers += w_val
        rejects_file = Path(f"{prefix}.rejects.jsonl")
        meta: dict[str, Any] = {
            "format": META_FORMAT, "type": opts.kind, "tokenizer": VOCAB_NAME,
            "source": {"path": str(shown_src), "sha256": hasher.hexdigest(), "bytes": size,
                       **({"files": len(names), "glob": opts.glob, "empty_files": folder.empty}
                          if folder else {})},
            "options": {"repeat": opts.repeat, "shuffle": opts.shuffle, "seed": opts.seed,
                        "val_fraction": opts.val_fraction, "skip_invalid": opts.skip_invalid},
            "documents": n_docs, "rejected": len(errors),
            "rejects_file": rejects_file.name if errors else None,
            "splits": {"train": info_train, "val": info_val},
            **_epoch_numbers(opts, info_train["tokens"], info_train["documents"]),
            "seconds": round(time.time() - t0, 3),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if has_mask:  # train examples (DPO: pairs with either answer) the loader will cut
            long = s_ids.sizes[items[train, None] + np.arange(2 if opts.kind == "dpo" else 1)]
            meta["longer_than_ctx"] = int((long > opts.ctx_len + 1).any(axis=1).sum())
        if opts.kind == "sft":  # examples the loader leaves out: nothing to train within ctx
            cap = opts.ctx_len + 1
            meta["untrained_within_ctx"] = sum(
                1 for i in items[train].tolist() if not s_mask[i][1:cap].any())
        # publish: the meta goes first (incomplete from here) and comes back last; the
        # .bin / .idx renames in between are the only window in which an interruption leaves
        # data without its meta, and a masked split without one refuses to load (loader.py)
        meta_file = Path(f"{prefix}.meta.json")
        meta_file.unlink(missing_ok=True)
        for stale in (Path(f"{prefix}.mask"), val_prefix, Path(f"{val_prefix}.mask")):
            _remove_dataset(stale)
        if errors:
            _atomic_write_text(rejects_file, "".join(
                json.dumps({"file": where(e.lineno) if names else str(src),
                            "line": None if names else e.lineno, "reason": e.error,
                            "content": raw_lines.get(e.lineno, "")}, ensure_ascii=False)
                + "\n" for e in errors))
        else:
            rejects_file.unlink(missing_ok=True)
        for w in writers[::-1]:  # masks and val first, the train ids last
            w.commit()
        writers = []
        _atomic_write_text(meta_file, json.dumps(meta, indent=2, ensure_ascii=False) + "\n")
        _summary(meta, prefix, log)
        return meta
    finally:
        for w in writers:
            w.abort()
        for w in (stage_ids, stage_mask):
            if w is not None:
                w.abort()
        _remove_dataset(stage_prefix)
        _remove_dataset(Path(f"{stage_prefix}.mask"))


def _collect(job, opts: Options, errors: list[LineResult], raw_lines: dict[int, str],
             doc_first_item: list[int], stage_ids: BinIdxWriter,
             stage_mask: BinIdxWriter | None) -> None:
    """Store one block's results in the staging files (in file order) or as errors."""
    r: BlockResult = job.get() if hasattr(job, "get") else _worker_block(job)
    errors.extend(r.errors)
    if opts.skip_invalid:
        raw_lines.update(r.rejected)
    if (errors and not opts.skip_invalid) or not len(r.sizes):
        return  # failing anyway: keep checking the rest, stop storing
    base = len(stage_ids.sizes)
    doc_first_item.extend(range(base, base + len(r.sizes), r.per_doc))
    stage_ids.add_items(np.frombuffer(r.ids, np.uint16), r.sizes, r.per_doc)
    if stage_mask is not None:
        assert r.mask is not None
        stage_mask.add_items(np.frombuffer(r.mask, np.uint8), r.sizes, r.per_doc)


def _summary(meta: dict[str, Any], prefix: Path, log) -> None:
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    unit = {"text": "documents", "sft": "examples", "dpo": "pairs"}[meta["type"]]
    log(f"prepared {prefix} ({meta['type']}) from {meta['source']['path']}")
    if meta["source"].get("files"):
        log(f"  {meta['source']['files']} files matched {meta['source']['glob']!r} (one "
            f"document each; {meta['source']['empty_files']} empty skipped)")
    log(f"  {meta['documents']} {unit} accepted, {meta['rejected']} rejected"
        + (f" (see {prefix.parent / meta['rejects_file']})" if meta["rejects_file"] else ""))
    log(f"  train: {tr['documents']} {unit}, {tr['tokens']} tokens -> {prefix}.bin/.idx")
    if va:
        log(f"  val:   {va['documents']} {unit}, {va['tokens']} tokens -> {prefix}.val.bin/.idx")
    batch = (f"micro_bsz {meta['micro_bsz']} x grad_accum {meta['grad_accum']} x "
             f"{meta['num_gpus']} GPU")
    if meta["type"] == "text":
        if meta["magic_prime"]:
            log(f"  CTX_LEN={meta['ctx_len']}: magic_prime {meta['magic_prime']} = windows "
                f"per epoch; {meta['steps_per_epoch']} steps per epoch ({batch})")
            log(f"  RWKV-LM: {meta['rwkv_lm_args']}")
            if meta["steps_per_epoch"] == 0:
                log(f"  warning: {meta['magic_prime']} windows make no full step of {batch}: "
                    "lower MICRO_BSZ / GRAD_ACCUM / CTX_LEN, or prepare with --repeat N")
        else:
            log(f"  warning: {tr['tokens']} tokens is under 3 x CTX_LEN={meta['ctx_len']}: no "
                "magic prime; train with a smaller CTX_LEN or prepare with --repeat N")
    else:
        log(f"  CTX_LEN={meta['ctx_len']}: {meta['steps_per_epoch']} steps per epoch "
            f"({batch}, unpacked)")
        if meta["steps_per_epoch"] == 0:
            log(f"  warning: {tr['documents']} {unit} make no full step of {batch}: lower "
                "MICRO_BSZ / GRAD_ACCUM, add data, or prepare with --repeat N")
        if meta.get("longer_than_ctx"):
            log(f"  note: {meta['longer_than_ctx']} {unit} are longer than CTX_LEN + 1 tokens "
                "and will be cut by the loader")
        if meta.get("untrained_within_ctx"):
            log(f"  note: {meta['untrained_within_ctx']} {unit} have no trained (assistant) "
                f"token within CTX_LEN={meta['ctx_len']}; training leaves them out")
    log(f"  wrote {prefix}.meta.json in {meta['seconds']:.1f} s")


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

SETTING_FLAGS = ("data_file", "data_glob", "data_type", "data_prefix", "ctx_len", "val_fraction", "seed",
                 "micro_bsz", "grad_accum", "num_gpus")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="rwkvforge prepare",
        description="JSONL -> binidx (text) / masked SFT examples / DPO pairs, validated.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Defaults come from the config (DATA_FILE, DATA_TYPE, DATA_PREFIX, CTX_LEN, "
               "VAL_FRACTION, SEED); an empty DATA_FILE uses the shipped sample for the type.")
    ap.add_argument("--input", dest="set_data_file", metavar="X.jsonl|DIR",
                    help="input JSONL, or a folder of text files read one document per file "
                    "(--type text; which files: --data-glob) [DATA_FILE]")
    ap.add_argument("--type", dest="set_data_type", choices=("text", "sft", "dpo"),
                    help="text, sft or dpo [DATA_TYPE]")
    ap.add_argument("--output-prefix", dest="set_data_prefix", metavar="PREFIX",
                    help="output prefix, e.g. data/processed/name [DATA_PREFIX]")
    cfg.add_settings_flags(ap, only=SETTING_FLAGS)
    ap.add_argument("--repeat", type=int, default=1, help="write the train documents N times "
                    "(epochs baked into the file, like make_data.py) [1]")
    ap.add_argument("--shuffle", action="store_true",
                    help="shuffle each repeat with --seed (default: file order)")
    ap.add_argument("--skip-invalid", action="store_true",
                    help="skip invalid lines (listed in PREFIX.rejects.jsonl) instead of "
                    "stopping")
    ap.add_argument("--workers", type=int, default=0,
                    help="tokenizer processes (0 = all cores)")
    ap.add_argument("--max-line-mb", type=float, default=64.0,
                    help="reject lines longer than this many MiB [64]")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _resolve_path(value: str, source: str) -> Path:
    """CLI paths are relative to the current folder, config paths to the workspace root."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return p
    return (Path.cwd() if source == "cli" else workspace_root()) / p


def options_from_args(args: argparse.Namespace) -> Options:
    res = cfg.resolve_for_training(args)  # the CTX_LEN / MICRO_BSZ train will use
    s, src = res.settings, res.sources
    kind = s.data_type
    if s.data_file:
        inp = _resolve_path(s.data_file, src["DATA_FILE"])
    else:
        inp = sample_data_dir() / SAMPLES[kind]
    if s.data_prefix:
        prefix = _resolve_path(s.data_prefix, src["DATA_PREFIX"])
        if s.data_prefix.endswith(("/", os.sep)) or prefix.is_dir():
            prefix = prefix / inp.stem  # a folder: the input's name in it
        for suffix in (".meta.json", ".bin", ".idx"):  # a data file's name: its prefix
            if prefix.name.endswith(suffix) and len(prefix.name) > len(suffix):
                prefix = prefix.with_name(prefix.name[: -len(suffix)])
                break
    else:
        prefix = workspace_root() / "data" / "processed" / inp.stem
    workers = args.workers or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                               else os.cpu_count() or 1)
    return Options(input=inp, prefix=prefix, kind=kind, ctx_len=s.ctx_len,
                   repeat=args.repeat, shuffle=args.shuffle, seed=s.seed,
                   val_fraction=s.val_fraction, skip_invalid=args.skip_invalid,
                   workers=max(workers, 1), max_line_mb=args.max_line_mb,
                   micro_bsz=s.micro_bsz, grad_accum=s.grad_accum, num_gpus=s.num_gpus,
                   progress=not args.no_progress, glob=s.data_glob)


def _exit_on_signal(signum, _frame) -> None:
    """SIGTERM / SIGHUP -> SystemExit, so that run()'s cleanup deletes the temp files."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        if sig is not None:
            signal.signal(sig, _exit_on_signal)
    try:
        opts = options_from_args(args)
        if not opts.input.is_file() and not opts.input.is_dir():
            hint = (" (the shipped sample is missing: reinstall the workspace or set "
                    "DATA_FILE)" if opts.input.parent == sample_data_dir() else "")
            raise PrepareError(f"{opts.input}: input file not found{hint}")
        run(opts)
    except cfg.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except PrepareError as e:
        print(f"prepare error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system: unwritable folder, full disk, ...
        where = f" {e.filename}" if e.filename else ""
        print(f"prepare error: cannot read or write{where}: {e.strerror or e}; nothing was "
              "written (check the path, its permissions and the free space)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("prepare: interrupted; nothing was written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

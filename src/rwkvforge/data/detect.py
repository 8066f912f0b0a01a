"""Which kind of training data a file holds, from the keys of its records: the shape scan
behind DATA_TYPE=auto (one line saying what was chosen and why, or a refusal of a file that
mixes kinds), the one summarised error for an explicit DATA_TYPE that does not fit, and the
JSON-array input (a `.json` file holding [{...}, {...}]) read as records.

    python -m rwkvforge.data.detect data/raw/mine.jsonl     # prints what auto would choose

Rule: the scan reads keys, never values, and decides nothing a record's own processing
(data/records.py) would decide differently; a record with a known shape but a bad value is
still named by its own line's error. Why: the scan only picks the type; prepare's per-line
checks stay the single place that says what is wrong with a record.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rwkvforge.data.blocks import iter_blocks
from rwkvforge.data.records import (FAST_JSON_ERRORS, KIND_OF_VARIANT, SHAPE_KEYS, VARIANTS,
                                    encoding_hint, fits, parse_line, record_variant)

try:  # decode only the shape keys of a line, their values left as raw bytes: a fast scan
    import msgspec as _msgspec

    _KeysOnly = _msgspec.defstruct("_KeysOnly", [(k, _msgspec.Raw, _msgspec.Raw())
                                                 for k in SHAPE_KEYS])  # empty: absent
    _decode_keys = _msgspec.json.Decoder(_KeysOnly).decode
    _decode_lines = _msgspec.json.Decoder(_KeysOnly).decode_lines
except ImportError:  # pragma: no cover - msgspec missing
    _decode_keys = _decode_lines = None

TYPES = ("text", "sft", "dpo")
KNOWN_SHAPES = ('{"text"}, OpenAI {"messages"}, ShareGPT {"conversations"}, {"prompt", '
                '"response"}, Alpaca {"instruction", "input"?, "output"} or DPO {"prompt", '
                '"chosen", "rejected"} (see docs/data.md)')
MAX_KEYS_SAMPLED = 200  # records of no known shape whose full key list is read


class DataShapeError(ValueError):
    """The records do not fit the data type (or fit several); the message says what to do."""


# ---- reading the records -------------------------------------------------------------------------

def is_json_array(path: Path) -> bool:
    """Whether the file is one JSON array (its first non-blank byte, after a UTF-8 byte-order
    mark, is "["), not JSON Lines."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head[:1] == b"["


def load_json_array(path: Path) -> list[Any]:
    """The elements of a JSON-array file; DataShapeError says why it cannot be read."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        raise DataShapeError(f"{path}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                             f"{e.start}): {encoding_hint(raw, 1, f'{path} > out.json')}"
                             ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataShapeError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at column "
                             f"{e.colno}); a .json input is one array [{{...}}, {{...}}], "
                             "JSON Lines one object per line") from None
    except RecursionError:
        raise DataShapeError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(value, list):
        raise DataShapeError(f"{path}: the file is one JSON {type(value).__name__}, expected "
                             "an array of records [{...}, {...}] or JSON Lines")
    return value


def json_array_to_jsonl(src: Path, out: Path) -> int:
    """Write the records of the JSON-array file `src` to `out`, record k on line k (ASCII
    escapes: a lone surrogate in a string stays one, for the record's own check); returns
    the number of records."""
    items = load_json_array(src)
    with open(out, "w", encoding="utf-8", newline="\n") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return len(items)


# ---- the scan ------------------------------------------------------------------------------------

@dataclass
class Shapes:
    """What the records of one file look like, by the shape keys present in each."""
    path: Path
    unit: str = "line"  # how a record is numbered: "line" (JSONL) or "record" (JSON array)
    records: int = 0
    invalid: int = 0  # not a JSON object (their own lines' errors say why)
    patterns: Counter = field(default_factory=Counter)  # frozenset of shape keys -> records
    first: dict = field(default_factory=dict)  # pattern -> number of its first record
    other_keys: Counter = field(default_factory=Counter)  # keys of records of no known shape
    sampled: int = 0  # records whose other_keys were read

    def add(self, number: int, keys: frozenset | None, all_keys: Callable[[], Any]) -> None:
        """Count record `number` with these shape keys (None: not a JSON object);
        `all_keys()` gives every key of a record without a shape key (for "keys seen")."""
        self.records += 1
        if keys is None:
            self.invalid += 1
            return
        self.patterns[keys] += 1
        if keys not in self.first:
            self.first[keys] = number
        if not keys and self.sampled < MAX_KEYS_SAMPLED:
            self.sampled += 1
            self.other_keys.update(list(all_keys()))  # the keys (a dict's values are no counts)

    def merge(self, part: Shapes) -> None:
        """Add the counts of a later part of the same file."""
        self.records += part.records
        self.invalid += part.invalid
        self.patterns.update(part.patterns)
        for p, k in part.first.items():
            self.first.setdefault(p, k)
        self.other_keys.update(part.other_keys)
        self.sampled += part.sampled

    def count(self, test) -> int:
        return sum(n for p, n in self.patterns.items() if test(p))

    def variants(self) -> Counter:
        out: Counter = Counter()
        for p, n in self.patterns.items():
            out[record_variant(p)] += n
        return out

    def kinds(self) -> Counter:
        """Records per data type (only the types present)."""
        out: Counter = Counter()
        for v, n in self.variants().items():
            if v is not None:
                out[KIND_OF_VARIANT[v]] += n
        return out

    def first_of(self, test) -> int | None:
        return min((k for p, k in self.first.items() if test(p)), default=None)

    def keys_of(self, test) -> list[str]:
        keys = set().union(*(p for p in self.patterns if test(p)))
        if test(frozenset()):
            keys |= set(self.other_keys)
        return sorted(keys)


def _keys_of(raw: bytes, number: int) -> frozenset | None:
    """The shape keys present in one record (None: it is not a JSON object)."""
    if _decode_keys is not None:
        try:
            rec = _decode_keys(raw)
            return frozenset(k for k in SHAPE_KEYS if len(getattr(rec, k)))
        except FAST_JSON_ERRORS:  # not an object, invalid, or only json.loads reads it
            pass
    try:
        rec = parse_line(raw, number)
    except ValueError:
        return None
    return frozenset(k for k in SHAPE_KEYS if k in rec) if isinstance(rec, dict) else None


def _all_keys(raw: bytes, number: int) -> Callable[[], Any]:
    def keys() -> Any:
        try:
            rec = parse_line(raw, number)
        except ValueError:
            return ()
        return rec if isinstance(rec, dict) else ()
    return keys


def _one_object_per_line(data: bytes) -> list | None:
    """The shape-key structs of a block's lines in ONE msgspec call, or None (then each line
    is read alone). Taken only when every line starts with "{" and ends with "}" and the
    decoder finds as many objects as there are lines, so record k is line k (the argument of
    blocks._block_texts_at_once)."""
    if _decode_lines is None or not data or data[0] != 123:
        return None
    buf = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(buf == 10)
    before = nl - 1
    before[buf[before] == 13] -= 1  # CRLF
    after = nl + 1
    if (not (buf[before] == 125).all() or not (buf[after[after < len(buf)]] == 123).all()
            or (data[-1] != 10 and data.rstrip()[-1:] != b"}")):
        return None
    try:
        recs = _decode_lines(data)
    except FAST_JSON_ERRORS:
        return None
    return recs if len(recs) == len(nl) + (data[-1] != 10) else None


def _scan_block(task: tuple[int, bytes]) -> Shapes:
    """The Shapes of one block of whole JSONL lines, its first line numbered task[0]."""
    first, data = task
    part = Shapes(Path())
    recs = _one_object_per_line(data)
    if recs is not None:
        pats = [frozenset(k for k in SHAPE_KEYS if len(getattr(r, k))) for r in recs]
        if all(pats):  # records of no known shape are read line by line (their keys named)
            for i, p in enumerate(pats):
                part.add(first + i, p, tuple)
            return part
    for i, raw in enumerate(data.split(b"\n")):
        if raw.strip():
            part.add(first + i, _keys_of(raw, first + i), _all_keys(raw, first + i))
    return part


def scan(path: Path, array: Path | None = None) -> Shapes:
    """Read the keys of every record of a JSONL or JSON-array file. `array`: `path` is the
    JSONL that json_array_to_jsonl made of that file (named in messages, by record).

    One process: a scan ran at 4-5x the speed of a one-worker prepare (bench/detect_bench.py
    on the 2-core CI VM); handing its blocks to worker processes measured slower there (the
    blocks' transfer costs more than reading their keys)."""
    if array is None and is_json_array(path):
        sh = Shapes(path, unit="record")
        for k, rec in enumerate(load_json_array(path), start=1):
            keys = frozenset(x for x in SHAPE_KEYS if x in rec) if isinstance(rec, dict) \
                else None
            sh.add(k, keys, lambda rec=rec: rec)
        return sh
    sh = Shapes(array or path, unit="record" if array else "line")
    for first, data, _ in iter_blocks(path, 1 << 62, _NoHash(), _NoHash(), 1 << 20):
        sh.merge(_scan_block((first, data)))
    return sh


class _NoHash:
    """iter_blocks' hasher and progress bar, unused by a scan."""

    def update(self, _data: Any) -> None:
        pass


# ---- deciding ------------------------------------------------------------------------------------

def _listing(variants: Counter) -> str:
    return ", ".join(f"{n} {VARIANTS[v]}" for v, n in variants.most_common() if v is not None)


def auto_type(sh: Shapes) -> tuple[str, str]:
    """(data type, the one line saying why) for DATA_TYPE=auto; DataShapeError for a file of
    no known shape or of several kinds (with the count of each). A file with no JSON object
    at all is ("text", ""): prepare's per-line errors then say what the file is instead."""
    kinds, variants = sh.kinds(), sh.variants()
    unknown = variants.get(None, 0)
    if not kinds and not unknown:  # no JSON object at all (or no record): each line's own
        return "text", ""  # error names the cause (UTF-16, gzip, not JSON Lines, ...)
    if not kinds:
        raise DataShapeError(
            f"{sh.path}: none of its {sh.records} records has a known shape (keys seen: "
            f"{', '.join(sh.keys_of(lambda p: not p)) or 'none'}): expected {KNOWN_SHAPES}.")
    if len(kinds) > 1:
        parts = []
        for kind, n in kinds.most_common():
            of_kind = Counter({v: c for v, c in variants.items()
                               if v is not None and KIND_OF_VARIANT[v] == kind})
            first = sh.first_of(lambda p, kind=kind: KIND_OF_VARIANT.get(
                record_variant(p) or "") == kind)
            parts.append(f"{n} {kind} ({_listing(of_kind)}; first at {sh.unit} {first})")
        top, n_top = kinds.most_common(1)[0]
        raise DataShapeError(
            f"{sh.path}: DATA_TYPE=auto found more than one kind of record: "
            + ", ".join(parts) + ". One file trains one way: split it into one file per kind, "
            f"or set DATA_TYPE={top} and pass --skip-invalid to leave the other "
            f"{sh.records - n_top} records out.")
    kind = next(iter(kinds))
    extra = ""
    if unknown or sh.invalid:
        extra = f"; {unknown + sh.invalid} of no known shape are rejected with their reasons"
    return kind, (f"DATA_TYPE=auto -> {kind}: {sh.path.name} has {_listing(variants)}"
                  f" ({sh.records} records{extra})")


def mismatch_error(sh: Shapes, data_type: str) -> tuple[int, str] | None:
    """ONE message about the records that do not fit `data_type` (their count, the keys
    seen, the fix) and their count, when some are records of another type or none fits;
    None otherwise (a few records of no known shape are named by their own lines)."""
    bad = sh.count(lambda p: not fits(p, data_type))
    other_kind = sh.count(lambda p: not fits(p, data_type) and record_variant(p) is not None)
    if not bad or (not other_kind and bad < sh.records - sh.invalid):
        return None
    missing = {"text": "no 'text' field", "sft": "no SFT fields",
               "dpo": "no 'chosen' + 'rejected' fields"}[data_type]
    keys = ", ".join(sh.keys_of(lambda p: not fits(p, data_type))) or "none"
    others = Counter({KIND_OF_VARIANT[v]: n for v, n in Counter({
        record_variant(p): n for p, n in sh.patterns.items()
        if not fits(p, data_type) and record_variant(p)}).items()})
    good = sh.records - sh.invalid - bad
    first = sh.first_of(lambda p: not fits(p, data_type))
    if not good and len(others) == 1:
        fix = f"set DATA_TYPE={next(iter(others))} or auto"
    elif not good:
        fix = f"expected {KNOWN_SHAPES}"
    else:
        fix = (f"the first at {sh.unit} {first}; split the file, or pass --skip-invalid to "
               "leave them out")
    return bad, (f"{bad} of {sh.records} records in {sh.path} have {missing} (keys seen: "
                 f"{keys}) - {fix}")


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m rwkvforge.data.detect FILE.jsonl|FILE.json", file=sys.stderr)
        return 2
    try:
        print(auto_type(scan(Path(args[0])))[1])
    except (DataShapeError, OSError) as e:
        print(f"detect: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

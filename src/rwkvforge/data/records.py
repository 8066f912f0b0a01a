"""What one JSONL line means: its bytes -> a JSON value -> the token ids (and, for sft / dpo,
the loss mask) of one document, or the reason the line is rejected; and which shape a record
has from its keys alone (record_variant: what DATA_TYPE=auto goes by, in data/detect.py). The
accepted shapes of each --type are listed in data/prepare.py; data/blocks.py runs this per
line in the worker processes.

Rule: every problem with a line is a ValueError (ChatFormatError and TokenizerInputError are
ValueErrors too) whose message says what is wrong and what to do; process_line turns it into
a LineResult. Why: prepare names each rejected line as file:line with that message, and
--skip-invalid writes it to the rejects file.

Rule: parse_line accepts exactly what json.loads accepts; msgspec is only a fast path. Why:
the files RWKV-LM's make_data.py reads are read here the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from rwkvforge.tokenizer import (EOT, ChatFormatError, TokenizerInputError, chat_segments,
                                 check_messages)

try:  # optional and faster than json.loads; any line it rejects is re-parsed by json
    import msgspec as _msgspec

    fast_json: Callable[[str | bytes], Any] | None = _msgspec.json.Decoder().decode
    FAST_JSON_ERRORS: tuple[type[Exception], ...] = (_msgspec.DecodeError, ValueError,
                                                     RecursionError)
except ImportError:  # pragma: no cover - msgspec missing
    fast_json = None
    FAST_JSON_ERRORS = (ValueError, RecursionError)


ROUND_TRIP_ERROR = ("encode -> decode does not give the text back (tokenizer problem); "
                    "report this line")


@dataclass
class LineResult:
    """One line, processed: the items of its document, or why it is rejected."""
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


def record_text(rec: Any) -> str:
    """The text of a --type text record (a JSON value); raises ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    text = _need_str(rec, "text")
    if not text.strip():
        raise ValueError("empty text")
    return text


# ---- the record shapes ---------------------------------------------------------------------------

# What a record is, from its keys alone (no value is read): "text", "sft" or "dpo", and which
# SFT variant. A preference pair wins over SFT keys (its "prompt" is not a prompt-response),
# SFT keys win over "text" (some chat datasets carry a rendered "text" beside the turns).
VARIANTS = {  # variant -> how the one-line detection summary names it
    "text": '{"text"} documents',
    "messages": "OpenAI messages",
    "conversations": "ShareGPT conversations",
    "prompt-response": "prompt/response pairs",
    "alpaca": "Alpaca instruction/output",
    "dpo": "prompt/chosen/rejected pairs",
}
KIND_OF_VARIANT = {"text": "text", "messages": "sft", "conversations": "sft",
                   "prompt-response": "sft", "alpaca": "sft", "dpo": "dpo"}
SHAPE_KEYS = ("text", "messages", "conversations", "prompt", "response", "completion",
              "instruction", "output", "chosen", "rejected")


def record_variant(keys: Any) -> str | None:
    """The shape of a record with these top-level keys (a VARIANTS key), or None when it has
    none of them. Decides from key presence only: what a value holds is checked later."""
    if "chosen" in keys and "rejected" in keys:
        return "dpo"
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "conversations"
    if "prompt" in keys and ("response" in keys or "completion" in keys):
        return "prompt-response"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "text" in keys:
        return "text"
    return None


def fits(keys: Any, data_type: str) -> bool:
    """Whether a record with these keys can be read as `data_type` (text, sft or dpo)."""
    if data_type == "text":
        return "text" in keys
    if data_type == "dpo":
        return "chosen" in keys and "rejected" in keys
    return KIND_OF_VARIANT.get(record_variant(keys) or "") == "sft"


# ---- turns: OpenAI messages, ShareGPT conversations ----------------------------------------------

ROLE_NAMES = {  # OpenAI roles and the ShareGPT "from" names -> World chat roles
    "system": "system", "developer": "system", "user": "user", "human": "user",
    "assistant": "assistant", "gpt": "assistant", "model": "assistant", "bot": "assistant",
    "chatgpt": "assistant",
}


def _content_text(v: Any, where: str) -> Any:
    """A turn's content: a string, or OpenAI content parts [{"type": "text", "text": ...}]
    joined by newlines (what serve does with them); anything else is returned as it is, for
    check_messages to name."""
    if not isinstance(v, list):
        return v
    texts = []
    for j, part in enumerate(v):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind != "text" or not isinstance(part.get("text"), str):
            what = f"a {kind!r} part" if kind else f"{_typename(part)}"
            raise ValueError(f"{where}[{j}] is {what}: only text parts "
                             '{"type": "text", "text": "..."} can be trained')
        texts.append(part["text"])
    return "\n".join(texts)


def normalize_turns(turns: Any, key: str) -> tuple[list[dict], list[bool]]:
    """OpenAI messages ({role, content: str | text parts, weight?}) or ShareGPT turns
    ({from, value, weight?}) -> (World chat messages, trained flag per message).

    `weight` (0 or 1, as in OpenAI fine-tuning files) on an assistant turn decides whether it
    is trained; 0 on another turn changes nothing (those are never trained)."""
    if not isinstance(turns, list):
        raise ValueError(f"field '{key}' is {_typename(turns)}, expected a list")
    msgs: list[dict] = []
    trained: list[bool] = []
    for i, t in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(t, dict):
            msgs.append(t)  # check_messages names it
            trained.append(True)
            continue
        name_key, text_key = ("from", "value") if "role" not in t and "from" in t else \
            ("role", "content")
        name = t.get(name_key)
        role = ROLE_NAMES.get(name.lower(), name) if isinstance(name, str) else name
        if isinstance(name, str) and role not in ("system", "user", "assistant"):
            raise ValueError(f"{where}.{name_key} is {name!r}: use "
                             + ("human, gpt or system" if name_key == "from" else
                                "system, user or assistant")
                             + " (tool and function turns are not trained here)")
        weight = t.get("weight", 1)
        if weight not in (0, 1):
            raise ValueError(f"{where}.weight is {weight!r}: use 0 (not trained) or 1")
        if weight == 1 and "weight" in t and role != "assistant":
            raise ValueError(f"{where}.weight is 1 on a {role} turn: only assistant turns are "
                             "trained; remove the weight")
        msgs.append({"role": role, "content": _content_text(t.get(text_key),
                                                            f"{where}.{text_key}")})
        trained.append(bool(weight))
    return msgs, trained


def record_to_turns(rec: dict) -> tuple[list[dict[str, str]], list[bool]]:
    """An SFT record in any supported shape -> (World chat messages, trained flag per
    message: False for a `weight: 0` turn)."""
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise ValueError(f"field 'system' is {_typename(system)}, expected a string")
    head = [{"role": "system", "content": system}] if system and system.strip() else []
    key = "messages" if "messages" in rec else "conversations" if "conversations" in rec \
        else None
    if key is not None:
        msgs, trained = normalize_turns(rec[key], key)
        if head and msgs and isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
            raise ValueError(f"both a top-level 'system' field and a system turn in '{key}': "
                             "keep one")
        return head + msgs, [True] * len(head) + trained
    if "prompt" in rec or "response" in rec or "completion" in rec:
        answer = "completion" if "completion" in rec and "response" not in rec else "response"
        msgs = head + [{"role": "user", "content": _need_str(rec, "prompt")},
                       {"role": "assistant", "content": _need_str(rec, answer)}]
    elif "instruction" in rec or "output" in rec:
        user = _need_str(rec, "instruction")
        extra = rec.get("input")
        if extra is not None and not isinstance(extra, str):
            raise ValueError(f"field 'input' is {_typename(extra)}, expected a string")
        if extra and extra.strip():
            user = f"{user}\n{extra}"
        msgs = head + _alpaca_history(rec.get("history")) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _need_str(rec, "output")}]
    else:
        raise ValueError("no SFT fields: expected 'messages', 'conversations' (ShareGPT), "
                         "'prompt' + 'response', or 'instruction' + 'output' (found keys: "
                         f"{', '.join(sorted(rec)) or 'none'})")
    return msgs, [True] * len(msgs)


def _alpaca_history(history: Any) -> list[dict[str, str]]:
    """LLaMA-Factory's Alpaca "history": [[instruction, response], ...], the earlier turns
    (trained like the last one, as LLaMA-Factory does by default)."""
    if history is None:
        return []
    turns = []
    for i, pair in enumerate(history if isinstance(history, list) else [None]):
        if not (isinstance(pair, list) and len(pair) == 2
                and all(isinstance(x, str) for x in pair)):
            raise ValueError(f"field 'history'{f'[{i}]' if isinstance(history, list) else ''} "
                             "is not a [instruction, response] pair of strings: history is "
                             "[[\"q1\", \"a1\"], [\"q2\", \"a2\"], ...]")
        turns += [{"role": "user", "content": pair[0]},
                  {"role": "assistant", "content": pair[1]}]
    return turns


def record_to_messages(rec: dict) -> list[dict[str, str]]:
    """An SFT record in any supported shape -> World chat messages."""
    return record_to_turns(rec)[0]


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
        v = normalize_turns(v, key)[0]  # ShareGPT turns, content parts; weights unused
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
        raise ValueError(ROUND_TRIP_ERROR)
    ids.append(EOT)
    mask.append(int(segs[-1][1]))
    return np.asarray(ids, np.uint16).tobytes(), np.asarray(mask, np.uint8).tobytes()


def process_record(rec: Any, data_type: str, tok) -> list[tuple[bytes, bytes | None]]:
    """A parsed JSON value -> the items of one document; raises ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected a JSON object, got {type(rec).__name__}")
    if data_type == "text":
        text = record_text(rec)
        ids = tok.encode(text)
        arr = np.empty(len(ids) + 1, np.uint16)  # the document's ids + end-of-doc 0
        arr[:-1] = ids
        arr[-1] = EOT
        if tok.decode_bytes(arr[:-1]) != text.encode("utf-8"):
            raise ValueError(ROUND_TRIP_ERROR)
        return [(arr.tobytes(), None)]
    if data_type == "sft":
        try:
            msgs, trained = record_to_turns(rec)
        except ValueError as e:
            raise ValueError(f"{e}{dpo_hint(rec)}") from None
        segs = chat_segments(msgs)  # one segment per message
        segs = [(text, on and keep) for (text, on), keep in zip(segs, trained)]
        if not any(on for _, on in segs):
            raise ValueError("every assistant turn has weight 0: the example trains nothing; "
                             "set weight 1 on a turn, or drop the example")
        return [_encode_segments(segs, tok)]
    if data_type == "dpo":
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
    raise ValueError(f"unknown type {data_type!r}")


def parse_line(raw: bytes, lineno: int) -> Any:
    """Bytes of one JSONL line -> the JSON value; ValueError says what is wrong.

    Accepts exactly what json.loads accepts (make_data.py's parser): msgspec, when
    installed, is only a fast path; every line it refuses (NaN, lone surrogates, ...) goes
    through json.loads, which gives the value or the error message."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at byte "
                         f"{e.start} of the line): {encoding_hint(raw, lineno)}") from None
    if line.startswith("\ufeff"):
        if lineno != 1:
            raise ValueError("a UTF-8 byte-order mark at the start of this line (files "
                             "joined with `cat`?): remove it, e.g. "
                             "`sed -i '2,$ s/^\\xEF\\xBB\\xBF//' in.jsonl`")
        line = line[1:]  # a UTF-8 byte-order mark
    if "\x00" in line and line.count("\x00") * 3 > len(line):
        # UTF-16 without a byte-order mark decodes as "UTF-8" with a NUL in every other
        # byte (JSON never has a raw NUL): say so rather than "invalid JSON"
        enc = "utf-16be" if raw[:1] == b"\x00" else "utf-16le"  # no BOM: name the order
        raise ValueError("NUL bytes between the characters: " + UTF16_HINT.replace(
            "utf-16 ", f"{enc} ") + "in.jsonl > out.jsonl`")
    if fast_json is not None:
        try:
            return fast_json(line)
        except FAST_JSON_ERRORS:
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
                    '{"text": "..."}, or a JSON array; plain text files go in a folder, '
                    "given as the input (one file = one document; see \"Your own data\" in "
                    "docs/quickstart.md)")
        msg = e.msg[:-3] if e.msg.endswith(" at") else e.msg  # "... starting at" + column
        raise ValueError(f"invalid JSON: {msg} at column {e.colno}{hint}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply for the parser") from None


UTF16_HINT = ("the file looks like UTF-16 (Notepad's \"Unicode\", PowerShell's `>`): save it "
              "as UTF-8, e.g. `iconv -f utf-16 -t utf-8 ")


def encoding_hint(raw: bytes, lineno: int, files: str = "in.jsonl > out.jsonl") -> str:
    """What to do about a line (or a whole file: lineno 1) that is not UTF-8, for the usual
    causes; `files` is the iconv command's input and output."""
    if lineno == 1 and raw[:2] == b"\x1f\x8b":
        return "the file is gzip-compressed: decompress it first (`gunzip in.jsonl.gz`)"
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 1 and raw.count(0) * 3 > len(raw)):
        return f"{UTF16_HINT}{files}`"
    return (f"save the file as UTF-8, e.g. `iconv -f cp1251 -t utf-8 {files}` "
            "(cp1251 is the usual Windows Cyrillic encoding)")


def process_line(raw: bytes, lineno: int, data_type: str, tok) -> LineResult:
    """Bytes of one line -> its LineResult; a problem with the line is its error."""
    try:
        return LineResult(lineno, process_record(parse_line(raw, lineno), data_type, tok))
    except (ValueError, ChatFormatError, TokenizerInputError) as e:
        return LineResult(lineno, None, str(e))

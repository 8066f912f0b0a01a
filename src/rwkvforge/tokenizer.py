"""The RWKV World tokenizer (vocabulary rwkv_vocab_v20230424) and the World chat format.

Three encoders give the same ids (greedy longest match over UTF-8 bytes):

* ``native``: our own C trie (``csrc/trie_tokenizer.c``), compiled on first use with the
  system C compiler and cached (see rwkvforge/native.py), loaded with ctypes: no Python
  headers, no build step at install.
  It writes ids straight into numpy buffers (no Python object per token), which is most of
  what makes ``rwkvforge prepare`` fast. ``RWKVFORGE_NATIVE=0`` turns it off;
* ``fast``: the Rust ``pyrwkv-tokenizer`` wheel from PyPI (used when no C compiler works);
* ``reference``: the ``rwkv`` pip package's pure-Python ``TRIE_TOKENIZER``. It is loaded from
  its file path with importlib under a private module name, so it never clashes with other
  top-level ``rwkv_tokenizer`` modules.

``get_tokenizer("auto")`` takes the first of native, fast, reference that loads; tests hold
all three together on a mixed corpus (Chinese, Russian 1C identifiers, code, emoji, CRLF,
NUL, ...) and on random vocabulary soup. Decoding never goes through the Rust wheel (it
panics on partial UTF-8 tokens): it joins the tokens' bytes from our own table of the
vocabulary file.

Text and bytes:

* ``encode(str)`` takes Unicode text. A ``str`` holding a lone surrogate (JSON allows
  ``"\\ud800"``) is not valid Unicode and has no UTF-8 form: it raises ``TokenizerInputError``
  (a ``ValueError``) naming the character position. Such input is an error to fix at the source.
* Invalid UTF-8 only exists as bytes. ``encode_bytes(bytes)`` tokenizes any byte string
  exactly like the reference (every single byte is a token, so nothing is lost). Data
  preparation treats a JSONL line that is not valid UTF-8 as an input error (file:line), never
  guesses.
* ``decode(ids)`` returns ``str`` with ``errors="replace"`` (a cut multi-byte character
  becomes U+FFFD); ``decode_bytes(ids)`` returns the exact bytes. Token 0 (end of text) and
  the unused ids 65530..65535 of the model's 65536-row head decode to nothing.

World chat format (what RWKV World / G1 models were trained on)::

    System: <system>\\n\\nUser: <user>\\n\\nAssistant: <reply>\\n\\nUser: ...

"\\n\\n" ends a turn, so inside a turn CRLF becomes LF, runs of blank lines collapse to one
"\\n" and the content is stripped. ``encode_chat`` returns ids and a loss mask covering each
trained assistant reply and its end of turn ("\\n\\n" between turns, end-of-text token 0 after
the last reply). It tokenizes by segment: prompt text up to and including "Assistant:" is one
segment and " <reply>\\n\\n" another, which is exactly what the model sees at inference
(the prompt ends with "Assistant:" and the model generates the reply's tokens).

    python -m rwkvforge.tokenizer "Процедура ОбработкаПроведения(Отказ, Режим)"
"""

from __future__ import annotations

import ast
import ctypes
import functools
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from rwkvforge import native

VOCAB_NAME = "rwkv_vocab_v20230424"
VOCAB_SIZE = 65536  # rows of the model's embedding / head; ids 65530..65535 are unused
EOT = 0  # end of document / end of text
BACKENDS = ("auto", "native", "fast", "reference")
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
_BLANK_LINES = re.compile(r"\n{2,}")


class TokenizerInputError(ValueError):
    """Text the tokenizer cannot encode (e.g. a lone surrogate); the message says where."""


class ChatFormatError(ValueError):
    """A chat conversation that breaks the expected shape; the message names the message."""


# ---- vocabulary files ----------------------------------------------------------------------------

def _package_dir(name: str) -> Path | None:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def vocab_path() -> Path:
    """The vocabulary file: the `rwkv` package's copy, else the one in pyrwkv-tokenizer."""
    for pkg in ("rwkv", "pyrwkv_tokenizer"):
        d = _package_dir(pkg)
        if d is not None and (d / f"{VOCAB_NAME}.txt").is_file():
            return d / f"{VOCAB_NAME}.txt"
    raise FileNotFoundError(f"{VOCAB_NAME}.txt not found: install the `rwkv` or "
                            "`pyrwkv-tokenizer` package (./scripts/bootstrap.sh does).")


@functools.lru_cache(maxsize=None)
def token_table() -> tuple[bytes, ...]:
    """id -> token bytes for all 65536 ids (b"" for id 0 and unused ids)."""
    table = [b""] * VOCAB_SIZE
    path = vocab_path()
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.rstrip("\r\n")
            if not line:
                continue
            a, b = line.index(" "), line.rindex(" ")
            idx, tok, n = int(line[:a]), ast.literal_eval(line[a:b].strip()), int(line[b:])
            tok = tok.encode("utf-8") if isinstance(tok, str) else tok
            if not isinstance(tok, bytes) or len(tok) != n or not 0 < idx < VOCAB_SIZE:
                raise ValueError(f"{path}:{lineno}: malformed vocabulary line")
            table[idx] = tok
    return tuple(table)


def _load_reference_module() -> Any:
    """The rwkv package's rwkv_tokenizer.py, imported from its path under a private name."""
    d = _package_dir("rwkv")
    if d is None or not (d / "rwkv_tokenizer.py").is_file():
        raise ImportError("the reference tokenizer needs the `rwkv` pip package")
    name = "_rwkvforge_reference_rwkv_tokenizer"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, d / "rwkv_tokenizer.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules[name] = mod
    return mod


# ---- the native (C) encoder ----------------------------------------------------------------------

def native_status() -> str:
    """One line: the native encoder in use, or why not."""
    if _native_lib() is not None:
        return "native C encoder loaded"
    advice = (". Install a C compiler (apt install gcc) for faster data preparation"
              if native.enabled() else "")
    return f"native C encoder {native.problem('trie_tokenizer')}; using pyrwkv-tokenizer{advice}"


@functools.lru_cache(maxsize=None)
def _native_lib() -> Any:
    """The C encoder (rwkvforge/csrc/trie_tokenizer.c via native.load), typed; or None."""
    lib = native.load("trie_tokenizer")
    if lib is None:
        return None
    p, i64 = ctypes.c_void_p, ctypes.c_int64
    lib.rf_build.argtypes, lib.rf_build.restype = [p, p, p, p, ctypes.c_int32], p
    lib.rf_encode.argtypes, lib.rf_encode.restype = [p, ctypes.c_char_p, i64, p], i64
    lib.rf_check.argtypes = [p, i64, p, p, p, ctypes.c_char_p, i64, ctypes.POINTER(i64)]
    lib.rf_check.restype = ctypes.c_int32
    return lib


class _NativeEncoder:
    """Greedy longest match over bytes in C; the trie lives for the process (forked workers
    share it)."""

    def __init__(self, lib: Any) -> None:
        blob, lens, offs = _byte_tables()
        self._lib = lib
        self._blob = blob
        self._lens = np.ascontiguousarray(lens, np.int32)
        self._offs = np.ascontiguousarray(offs, np.int64)
        table = token_table()
        # inserted in byte order: depth-first node numbers keep each token's path together
        order = np.array(sorted(range(VOCAB_SIZE), key=table.__getitem__), np.int32)
        self._trie = lib.rf_build(blob.ctypes.data, self._offs.ctypes.data,
                                  self._lens.ctypes.data, order.ctypes.data, VOCAB_SIZE)
        if not self._trie:
            raise MemoryError("native tokenizer: could not build the vocabulary trie")

    def encode(self, data: bytes) -> np.ndarray:
        """uint16 ids of any byte string (a view of a buffer with room for len(data) ids)."""
        out = np.empty(max(len(data), 1), np.uint16)
        k = self._lib.rf_encode(self._trie, data, len(data), out.ctypes.data)
        if k < 0:  # cannot happen with the World vocabulary (all 256 single bytes are tokens)
            raise ValueError(f"no vocabulary token starts with byte {data[-k - 1]:#04x}")
        return out[:k]

    def matches(self, ids: np.ndarray, data: bytes) -> tuple[bool, int]:
        """(the ids' bytes from the vocabulary table == data, how many ids decode to nothing);
        independent of the trie."""
        ids = np.ascontiguousarray(ids, np.uint16)
        empty = ctypes.c_int64(0)
        ok = self._lib.rf_check(ids.ctypes.data, len(ids), self._blob.ctypes.data,
                                self._offs.ctypes.data, self._lens.ctypes.data, data,
                                len(data), ctypes.byref(empty))
        return bool(ok), empty.value


# ---- the tokenizer -------------------------------------------------------------------------------

def surrogate_error(text: str, exc: UnicodeEncodeError) -> TokenizerInputError:
    """The error for `text`, whose UTF-8 encoding failed with `exc` (a lone surrogate)."""
    ch = text[exc.start]
    return TokenizerInputError(
        f"text has a lone surrogate U+{ord(ch):04X} at character {exc.start}: it is not valid "
        "Unicode and has no UTF-8 form (often a broken \\ud8xx escape in JSON). Fix the "
        "source text.")


class Tokenizer:
    """RWKV World tokenizer. `backend` is "auto", "native", "fast" or "reference"; all give
    identical ids ("auto": the first of native, fast, reference that loads)."""

    vocab_size = VOCAB_SIZE
    eot = EOT

    def __init__(self, backend: str = "auto") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"unknown tokenizer backend {backend!r}: use "
                             f"{', '.join(BACKENDS)}")
        self._table = token_table()
        self._native: _NativeEncoder | None = None
        self._fast = None
        self._ref = None
        if backend in ("auto", "native"):
            lib = _native_lib()
            if lib is not None:
                self._native = _NativeEncoder(lib)
            elif backend == "native":
                raise ImportError(native_status())
        if backend == "fast" or (backend == "auto" and self._native is None):
            try:
                import pyrwkv_tokenizer

                self._fast = pyrwkv_tokenizer.WorldTokenizer(str(vocab_path()))
            except ImportError:
                if backend == "fast":
                    raise ImportError("backend 'fast' needs pyrwkv-tokenizer: pip install "
                                      "pyrwkv-tokenizer (or use backend='reference')") from None
        self.backend = ("native" if self._native is not None else
                        "fast" if self._fast is not None else "reference")

    @property
    def reference(self) -> Any:
        """The rwkv package's TRIE_TOKENIZER (loaded on first use: it builds its trie in Python)."""
        if self._ref is None:
            self._ref = _reference_trie()
        return self._ref

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes str, got {type(text).__name__}; use "
                            "encode_bytes() for bytes")
        try:
            if self._native is not None:
                return self._native.encode(text.encode("utf-8")).tolist()
            if self._fast is not None:
                return list(self._fast.encode(text))
            return self.reference.encode(text)
        except UnicodeEncodeError as e:
            raise surrogate_error(text, e) from None

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Not the wheel's encode_batch: it runs a Rust thread pool, and a process forked
        # after that pool started (prepare's workers) deadlocks on its first batch.
        return [self.encode(t) for t in texts]

    def encode_documents(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Each text's ids followed by EOT, back to back as uint16, and each one's size
        (its ids + 1). Same ids as `encode` per text, with much less Python work: the native
        and fast backends encode all texts in ONE call, joined by DOC_SEP. No vocabulary token of 2+
        bytes contains that byte, so greedy longest match can never run across it and each
        text tokenizes exactly as it would alone; the separator's single-byte token is then
        replaced by EOT. Texts that contain DOC_SEP themselves go one by one."""
        arr, sizes, _ = self._encode_documents(texts, check=False)
        return arr, sizes

    def encode_documents_checked(self, texts: Sequence[str]
                                 ) -> tuple[np.ndarray, np.ndarray, bool]:
        """`encode_documents` plus whether ALL the texts survive encode -> decode (and no id
        but each EOT decodes to nothing), checked in one vectorised pass over the joined
        bytes; when False, check the documents one by one to find which."""
        return self._encode_documents(texts, check=True)

    def _encode_documents(self, texts: Sequence[str], check: bool
                          ) -> tuple[np.ndarray, np.ndarray, bool]:
        n = len(texts)
        if n == 0:
            return np.zeros(0, np.uint16), np.zeros(0, np.int64), True
        sep_id = doc_sep_id() if self.backend != "reference" else None
        if sep_id is not None:
            joined = DOC_SEP.join(texts) + DOC_SEP
            try:
                if self._native is not None:
                    data = joined.encode("utf-8")
                    arr = self._native.encode(data).copy()  # own buffer, not len(data)
                else:
                    ids = self._fast.encode(joined)
                    arr = np.fromiter(ids, np.uint16, len(ids))
                    del ids
                    # (this encode reuses the UTF-8 copy the Rust encoder made: a memcpy)
                    data = joined.encode("utf-8")
            except UnicodeEncodeError:
                arr = None  # a lone surrogate: the per-text path names it
            if arr is not None:
                # the separator's token is the only one holding its byte, so there are n of
                # them exactly when no text holds the separator itself
                ends = np.flatnonzero(arr == sep_id)
                if len(ends) == n:
                    # checked with the separators in place: each is one byte of `data`,
                    # so no id may decode to nothing
                    ok = not check or self._matches(arr, data, 0)
                    arr[ends] = EOT
                    return arr, np.diff(ends, prepend=-1), ok
        parts = [self.encode(t) for t in texts]
        flat: list[int] = []
        for p in parts:
            flat += p
            flat.append(EOT)
        arr = np.fromiter(flat, np.uint16, len(flat))
        ok = not check or self._matches(arr, "".join(texts).encode("utf-8"), n)
        return arr, np.fromiter((len(p) + 1 for p in parts), np.int64, n), ok

    def _matches(self, arr: np.ndarray, data: bytes, empty: int) -> bool:
        """The ids' bytes are `data` and exactly `empty` of them decode to nothing."""
        if self._native is not None:
            return self._native.matches(arr, data) == (True, empty)
        return ids_match_bytes(arr, data, empty_tokens=empty)

    def encode_bytes(self, data: bytes) -> list[int]:
        """Tokenize raw bytes exactly like the reference, invalid UTF-8 included."""
        if self._native is not None:
            return self._native.encode(bytes(data)).tolist()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            return self.reference.encodeBytes(bytes(data))
        return self.encode(text)

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        if isinstance(ids, np.ndarray):
            return _gather_bytes(ids)
        if hasattr(ids, "tolist"):  # torch tensors
            ids = ids.tolist()
        ids = ids if isinstance(ids, (list, tuple)) else list(ids)
        if ids and min(ids) < 0:  # a negative index would silently pick from the end
            return _gather_bytes(np.asarray(ids))
        try:
            return b"".join(map(self._table.__getitem__, ids))
        except (IndexError, TypeError):
            return _gather_bytes(np.asarray(ids))

    def decode(self, ids: Iterable[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def __repr__(self) -> str:
        return f"Tokenizer(backend={self.backend!r}, vocab={VOCAB_NAME})"


@functools.lru_cache(maxsize=None)
def _byte_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(all token bytes back to back, length of each id, offset of each id) for numpy."""
    table = token_table()
    lens = np.fromiter((len(t) for t in table), dtype=np.int64, count=len(table))
    offs = np.zeros_like(lens)
    np.cumsum(lens[:-1], out=offs[1:])
    return np.frombuffer(b"".join(table), dtype=np.uint8), lens, offs


def _gather_bytes(ids: np.ndarray) -> bytes:
    """Vectorised decode_bytes: one numpy gather of the tokens' bytes, no Python per token."""
    a = ids.astype(np.int64, copy=False).ravel()
    if a.size and (a.min() < 0 or a.max() >= VOCAB_SIZE):
        bad = a[(a < 0) | (a >= VOCAB_SIZE)][0]
        raise ValueError(f"token id {bad} is outside the vocabulary [0, {VOCAB_SIZE})")
    blob, lens, offs = _byte_tables()
    n = lens[a]
    total = int(n.sum())
    if total == 0:
        return b""
    # byte j of the output comes from blob[offs[token] + j - start of that token's bytes]
    it = np.int32 if blob.size + total < 2**31 else np.int64  # half the memory traffic
    out_start = (np.cumsum(n) - n).astype(it)
    pos = np.arange(total, dtype=it)
    pos += np.repeat(offs[a].astype(it) - out_start, n)
    return blob[pos].tobytes()


# ASCII "unit separator": a single-byte token that no longer vocabulary entry contains
# (checked against the vocabulary file by doc_sep_id), so texts joined by it tokenize
# independently under greedy longest match.
DOC_SEP = "\x1f"


@functools.lru_cache(maxsize=None)
def doc_sep_id() -> int | None:
    """Token id of DOC_SEP, or None if the vocabulary does not allow the join trick."""
    table = token_table()
    sep = DOC_SEP.encode("utf-8")
    if len(sep) != 1 or table.count(sep) != 1:
        return None
    if sep in b"".join(t for t in table if len(t) > 1):  # one byte: no false matches
        return None
    return table.index(sep)


@functools.lru_cache(maxsize=None)
def word_tables() -> tuple[np.ndarray, np.ndarray, tuple[np.ndarray, ...]]:
    """(byte length of each id, mask of its bytes in its first word, the ids' bytes as
    little-endian uint64 words: column j holds bytes 8j..8j+7 of every token, zero padded)."""
    table = token_table()
    k = -(-max(map(len, table)) // 8)
    words = np.frombuffer(b"".join(t.ljust(8 * k, b"\0") for t in table),
                          "<u8").reshape(VOCAB_SIZE, k)
    lens = np.fromiter(map(len, table), np.intp, VOCAB_SIZE)
    mask0 = _LOW_BYTES[np.minimum(lens, 8)]
    return lens, mask0, tuple(np.ascontiguousarray(words[:, j]) for j in range(k))


_LOW_BYTES = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [(1 << 64) - 1], np.uint64)


def ids_match_bytes(ids: np.ndarray | Sequence[int], data: bytes,
                    empty_tokens: int | None = None) -> bool:
    """``decode_bytes(ids) == data``, without building the decoded bytes; with
    `empty_tokens`, also that exactly that many ids decode to nothing (EOT, unused ids).

    Each token's bytes are compared, 8 at a time as one uint64, with the 8-byte window of
    `data` at the token's offset (overlapping windows = a stride-1 uint64 view)."""
    lens, mask0, cols = word_tables()
    a = np.asarray(ids)
    if a.dtype != np.uint16:
        a = a.astype(np.int64, copy=False).ravel()
        if a.size and (a.min() < 0 or a.max() >= VOCAB_SIZE):
            return False
    a = a.astype(np.intp).ravel()  # index once as intp, not converted at every gather
    n = lens[a]
    if int(n.sum()) != len(data):
        return False
    if empty_tokens is not None and a.size - np.count_nonzero(n) != empty_tokens:
        return False
    if a.size == 0:
        return True
    if len(data) < 2**31 - 64:  # int32 offsets: half the memory traffic of the gathers
        n = n.astype(np.int32)
        pos = np.cumsum(n, dtype=np.int32)
    else:
        pos = np.cumsum(n)
    pos -= n  # offset of each token in data
    buf = data + bytes(8 * len(cols) + 8)  # windows near the end read zeros, in bounds
    win = np.ndarray((len(buf) - 7,), "<u8", buffer=buf, strides=(1,))
    got = win[pos]
    got &= mask0[a]
    if not np.array_equal(got, cols[0][a]):
        return False
    sel = np.flatnonzero(n > 8)  # tokens longer than one word
    tok, rem, pos = a[sel], n[sel] - 8, pos[sel] + 8
    for col in cols[1:]:
        if not tok.size:
            break
        if not np.array_equal(win[pos] & _LOW_BYTES[np.minimum(rem, 8)], col[tok]):
            return False
        sel = np.flatnonzero(rem > 8)
        tok, rem, pos = tok[sel], rem[sel] - 8, pos[sel] + 8
    return True


@functools.lru_cache(maxsize=None)
def _reference_trie() -> Any:
    return _load_reference_module().TRIE_TOKENIZER(str(vocab_path()))


@functools.lru_cache(maxsize=None)
def get_tokenizer(backend: str = "auto") -> Tokenizer:
    """The shared tokenizer for `backend` ("auto" | "native" | "fast" | "reference")."""
    return Tokenizer(backend)


# ---- chat format ---------------------------------------------------------------------------------

def clean_turn(text: str) -> str:
    """Turn content as the World format needs it: LF line ends, no blank lines, stripped."""
    return _BLANK_LINES.sub("\n", text.replace("\r\n", "\n")).strip()


def check_messages(messages: Any, *, need_assistant_last: bool = False) -> None:
    """Raise ChatFormatError unless `messages` is [system?] user, assistant, user, ...

    Each message is {"role": "system"|"user"|"assistant", "content": non-empty str}.
    """
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("'messages' must be a non-empty list of {role, content} "
                              "objects")
    expect = "user"
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(f"{where} is {type(m).__name__}, expected an object with "
                                  "'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatFormatError(f"{where}.role is {role!r}: use system, user or assistant")
        if not isinstance(content, str):
            raise ChatFormatError(f"{where}.content is "
                                  f"{'missing' if content is None else type(content).__name__}"
                                  ", expected a string")
        if not clean_turn(content):
            raise ChatFormatError(f"{where}.content is empty")
        if role == "system":
            if i != 0:
                raise ChatFormatError(f"{where}: a system message is only allowed first")
            continue
        if role != expect:
            raise ChatFormatError(f"{where}: roles out of order: got {role}, expected {expect} "
                                  "(after an optional system message, user and assistant "
                                  "alternate, starting with user)")
        expect = "assistant" if role == "user" else "user"
    if need_assistant_last and messages[-1]["role"] != "assistant":
        raise ChatFormatError(f"messages[{len(messages) - 1}] is {messages[-1]['role']}: "
                              "a training conversation must end with an assistant reply")


def render_chat(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """World-format text of a conversation. With `add_generation_prompt` and a last message
    that is not the assistant's, ends with "\\n\\nAssistant:" (no trailing space)."""
    check_messages(messages)
    text = "\n\n".join(f"{ROLES[m['role']]}: {clean_turn(m['content'])}" for m in messages)
    if add_generation_prompt and messages[-1]["role"] != "assistant":
        text += "\n\nAssistant:"
    return text


def chat_segments(messages: list[dict[str, str]], train_from: int = 0
                  ) -> list[tuple[str, bool]]:
    """The conversation as (text, trained) segments; the final EOT token is not included.

    Assistant replies at index >= `train_from` are trained (DPO trains only the response)."""
    check_messages(messages, need_assistant_last=True)
    segs: list[tuple[str, bool]] = []
    last = len(messages) - 1
    for i, m in enumerate(messages):
        body = clean_turn(m["content"])
        if m["role"] == "assistant":
            segs.append((f" {body}" + ("" if i == last else "\n\n"), i >= train_from))
        elif m["role"] == "user":
            segs.append((f"User: {body}\n\nAssistant:", False))
        else:
            segs.append((f"System: {body}\n\n", False))
    return segs


def encode_chat(messages: list[dict[str, str]], tokenizer: Tokenizer | None = None, *,
                train_from: int = 0) -> tuple[list[int], list[int]]:
    """(ids, loss_mask) of a conversation ending with an assistant reply.

    mask[i] = 1 where ids[i] is part of a trained assistant reply or its end of turn
    ("\\n\\n", or the EOT token 0 that ends the conversation); prompts are 0."""
    tok = tokenizer or get_tokenizer()
    segs = chat_segments(messages, train_from)
    ids: list[int] = []
    mask: list[int] = []
    for (_, trained), enc in zip(segs, tok.encode_batch([text for text, _ in segs])):
        ids += enc
        mask += [int(trained)] * len(enc)
    ids.append(EOT)
    mask.append(int(segs[-1][1]))
    return ids, mask


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m rwkvforge.tokenizer",
                                 description="Show the RWKV World token ids of a text.")
    ap.add_argument("text")
    ap.add_argument("--backend", default="auto", choices=BACKENDS)
    args = ap.parse_args(argv)
    tok = get_tokenizer(args.backend)
    ids = tok.encode(args.text)
    print(f"{tok.backend}: {len(ids)} tokens")
    print(" ".join(f"{i}:{tok.decode_bytes([i])!r}" for i in ids))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Tokenizer: the native and fast backends match the rwkv package's reference ids; chat
format + masks; the native encoder's build, cache and fallback."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import types

from pathlib import Path

import numpy as np
import pytest

from rwkvforge import tokenizer as T

MIXED = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "你好，世界！这是一个中文分词测试：人工智能、机器学习。",
    "Процедура ОбработкаПроведения(Отказ, Режим)\n\tДвижения.ТоварыНаСкладах.Записать();\n"
    "КонецПроцедуры",
    "Функция ПолучитьОстаток(Номенклатура, Склад) Экспорт\n\tВозврат 0;\nКонецФункции",
    "Запрос.Текст = \"ВЫБРАТЬ Т.Ссылка ИЗ Справочник.Номенклатура КАК Т ГДЕ Т.ЭтоГруппа = ЛОЖЬ\";",
    "def f(x):\r\n    return {'a': [1, 2, 3]}  # CRLF line ends\r\n",
    "int main(void) { printf(\"%d\\n\", 42); return 0; }",
    "emoji 😀👍🏽👨‍👩‍👧 🇷🇺 and a ZWJ sequence",
    "NUL\x00inside\x00\x00 and other controls \x01\x7f\u0085\u2028\u2029",
    "mixed 混合 смешанный text 123.45e-6 \t\ttabs   spaces\n\n\nnewlines",
    " " * 300 + "-" * 200 + "=" * 81,
    "",
    "\ufeffBOM at start, \ufffd replacement char, combining e\u0301",
]


@pytest.fixture(scope="module", params=["native", "fast"])
def fast(request) -> T.Tokenizer:
    """Each accelerated backend in turn: our C trie and the pyrwkv-tokenizer wheel."""
    if request.param == "native" and shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the native encoder cannot be built here")
    tok = T.Tokenizer(request.param)
    assert tok.backend == request.param
    return tok


@pytest.fixture(scope="module")
def ref() -> T.Tokenizer:
    return T.Tokenizer("reference")


def test_fast_matches_reference_on_mixed_corpus(fast, ref):
    for text in MIXED:
        ids = ref.reference.encode(text)  # the rwkv package's TRIE_TOKENIZER itself
        assert fast.encode(text) == ids, repr(text)
        assert ref.encode(text) == ids
        assert fast.decode(ids) == text
        assert fast.decode_bytes(ids) == text.encode("utf-8")
    joined = "\n".join(MIXED)
    assert fast.encode(joined) == ref.reference.encode(joined)
    assert fast.encode_batch(MIXED) == [ref.reference.encode(t) for t in MIXED]


def test_fast_matches_reference_on_random_token_soup(fast, ref):
    """Concatenations of random vocabulary entries stress greedy longest-match boundaries."""
    rng = random.Random(1234)
    table = [t for t in T.token_table() if t]
    for _ in range(400):
        raw = b"".join(rng.choice(table) for _ in range(rng.randint(1, 25)))
        text = raw.decode("utf-8", errors="replace")
        assert fast.encode(text) == ref.reference.encode(text), repr(text)


def test_invalid_utf8_bytes_follow_reference(fast, ref):
    """Invalid UTF-8 exists only as bytes: encode_bytes gives the reference's byte-level ids,
    and decode_bytes restores the exact bytes."""
    for raw in (b"\xff\xfe abc", b"ok \xe4\xbd", b"\xd0\x9f\xd1 cut cyrillic", b"\x80" * 5,
                "valid Привет".encode()):
        ids = fast.encode_bytes(raw)
        assert ids == ref.reference.encodeBytes(raw)
        assert fast.decode_bytes(ids) == raw
        assert fast.decode(ids) == raw.decode("utf-8", errors="replace")


def test_partial_token_decodes_with_replacement(fast):
    # id 129 is the lone byte 0x80: the Rust wheel panics on it; we must not
    assert fast.decode_bytes([129]) == b"\x80"
    assert fast.decode([129]) == "\ufffd"
    cut = fast.encode("你")
    assert fast.decode(cut + [0]) == "你"  # EOT decodes to nothing


def test_lone_surrogate_is_an_input_error(fast, ref):
    for tok in (fast, ref):
        with pytest.raises(T.TokenizerInputError, match=r"U\+D800 at character 3"):
            tok.encode("abc\ud800def")


def test_vocab_and_ids_range(fast):
    assert fast.vocab_size == 65536 and fast.eot == 0
    assert all(0 < i < 65530 for i in fast.encode("".join(MIXED)))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        fast.decode_bytes([70000])


def test_reference_loads_despite_module_name_clash(monkeypatch):
    """A foreign top-level `rwkv_tokenizer` module must not shadow the rwkv package's file."""
    fake = types.ModuleType("rwkv_tokenizer")
    fake.TRIE_TOKENIZER = None
    monkeypatch.setitem(sys.modules, "rwkv_tokenizer", fake)
    mod = T._load_reference_module()
    assert mod is not fake and mod.__file__.replace("\\", "/").endswith("rwkv/rwkv_tokenizer.py")
    assert callable(mod.TRIE_TOKENIZER)


def test_render_chat_world_format():
    msgs = [{"role": "system", "content": "Ты помощник 1С."},
            {"role": "user", "content": "Line one\n\n\nline two\r\n\r\nthree  "},
            {"role": "assistant", "content": "Ответ"},
            {"role": "user", "content": "Ещё?"}]
    assert T.render_chat(msgs) == ("System: Ты помощник 1С.\n\nUser: Line one\nline two\nthree"
                                   "\n\nAssistant: Ответ\n\nUser: Ещё?\n\nAssistant:")
    assert T.render_chat(msgs, add_generation_prompt=False).endswith("User: Ещё?")


def test_encode_chat_mask_covers_replies_and_end_of_turn(fast):
    msgs = [{"role": "user", "content": "Привет"}, {"role": "assistant", "content": "Здравствуйте!"},
            {"role": "user", "content": "Как дела?"}, {"role": "assistant", "content": "Хорошо."}]
    ids, mask = T.encode_chat(msgs, fast)
    assert len(ids) == len(mask) and ids[-1] == 0 and mask[-1] == 1
    trained = fast.decode([i for i, m in zip(ids, mask) if m])
    assert trained == " Здравствуйте!\n\n Хорошо."
    prompt = fast.decode([i for i, m in zip(ids, mask) if not m])
    assert prompt == "User: Привет\n\nAssistant:User: Как дела?\n\nAssistant:"
    # the prompt tokens are exactly what inference feeds the model for the first turn
    first = T.render_chat(msgs[:1])
    assert ids[:len(fast.encode(first))] == fast.encode(first)
    assert fast.decode(ids) == T.render_chat(msgs, add_generation_prompt=False)
    # DPO: only replies from train_from on are trained
    ids2, mask2 = T.encode_chat(msgs, fast, train_from=3)
    assert ids2 == ids
    assert fast.decode([i for i, m in zip(ids2, mask2) if m]) == " Хорошо."


@pytest.mark.parametrize("msgs, match", [
    ([], "non-empty list"),
    ([{"role": "assistant", "content": "hi"}], "expected user"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], "out of order"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "s"}], "only allowed first"),
    ([{"role": "bot", "content": "a"}], "role is 'bot'"),
    ([{"role": "user", "content": 5}], "content is int"),
    ([{"role": "user", "content": " \n\n "}], "content is empty"),
])
def test_chat_errors_name_the_message(msgs, match):
    with pytest.raises(T.ChatFormatError, match=match):
        T.render_chat(msgs)


def test_encode_chat_requires_assistant_last(fast):
    with pytest.raises(T.ChatFormatError, match="must end with an assistant reply"):
        T.encode_chat([{"role": "user", "content": "q"}], fast)


def test_encode_documents_matches_reference_per_text(fast, ref):
    """One joined call (texts separated by DOC_SEP) gives each text's own ids + EOT; texts
    holding DOC_SEP themselves take the per-text path and still match."""
    assert T.doc_sep_id() == fast.encode(T.DOC_SEP)[0]
    rng = random.Random(7)
    table = [t for t in T.token_table() if t]
    soup = [b"".join(rng.choice(table) for _ in range(rng.randint(1, 20))).decode(
        "utf-8", errors="replace") for _ in range(200)]
    for texts in (MIXED, soup, MIXED + [f"has the separator {T.DOC_SEP} inside"]):
        arr, sizes = fast.encode_documents(texts)
        want = [ref.reference.encode(t) + [0] for t in texts]
        assert arr.dtype == np.uint16 and sizes.tolist() == [len(w) for w in want]
        assert arr.tolist() == [i for w in want for i in w]
    arr, sizes = ref.encode_documents(MIXED[:3])
    assert arr.tolist() == [i for t in MIXED[:3] for i in ref.reference.encode(t) + [0]]


def test_ids_match_bytes_equals_decode_comparison(fast):
    """The vectorised round-trip check agrees with decode_bytes(ids) == data, including
    long tokens (> 8 bytes), swapped tokens, flipped bits, EOT and unused ids."""
    rng = random.Random(3)
    ids = [i for i, t in enumerate(T.token_table()) if t]
    long_ids = [i for i, t in enumerate(T.token_table()) if len(t) > 16]
    for _ in range(2000):
        a = [rng.choice(long_ids if rng.random() < 0.2 else ids)
             for _ in range(rng.randint(0, 12))]
        if rng.random() < 0.2:
            a.insert(rng.randint(0, len(a)), rng.choice([0, 65530, 65535]))
        data = fast.decode_bytes(a)
        r = rng.random()
        if r < 0.3 and data:
            b = bytearray(data)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif r < 0.4 and len(a) > 1:
            i = rng.randrange(len(a) - 1)
            a[i], a[i + 1] = a[i + 1], a[i]
        want = fast.decode_bytes(a) == data
        assert T.ids_match_bytes(np.array(a, np.uint16), data) == want, (a, data)
        assert T.ids_match_bytes(a, data) == want
    empty = [0, fast.encode("a")[0], 65531]
    assert T.ids_match_bytes(empty, b"a", empty_tokens=2)
    assert not T.ids_match_bytes(empty, b"a", empty_tokens=0)
    assert not T.ids_match_bytes([-1], b"") and not T.ids_match_bytes([70000], b"")


def test_native_matches_reference_on_random_bytes(fast, ref):
    """Any byte string (invalid UTF-8, lone continuation bytes, NUL, the separator byte)
    gets the reference's byte-level ids."""
    rng = random.Random(99)
    table = [t for t in T.token_table() if t]
    for _ in range(300):
        parts = [rng.choice(table) if rng.random() < 0.7 else bytes([rng.randrange(256)])
                 for _ in range(rng.randint(0, 30))]
        raw = b"".join(parts)
        assert fast.encode_bytes(raw) == ref.reference.encodeBytes(raw), raw


def test_native_check_is_independent_of_the_trie(fast):
    if fast.backend != "native":
        pytest.skip("native only")
    data = "Процедура Тест() КонецПроцедуры".encode()
    ids = np.asarray(fast.encode_bytes(data), np.uint16)
    assert fast._native.matches(ids, data) == (True, 0)
    wrong = ids.copy()
    wrong[1] = fast.encode("x")[0]
    assert fast._native.matches(wrong, data)[0] is False
    assert fast._native.matches(ids, data + b"!")[0] is False  # bytes left over
    assert fast._native.matches(ids[:-1], data)[0] is False
    with_eot = np.insert(ids, 2, [0, 65533])
    assert fast._native.matches(with_eot, data) == (True, 2)


def _in_fresh_process(code: str, cache: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "XDG_CACHE_HOME": str(cache), **env}
    return subprocess.run([sys.executable, "-c", code], env=full, capture_output=True,
                          text=True, timeout=300)


PROBE = ("from rwkvforge import tokenizer as T\n"
         "t = T.get_tokenizer()\n"
         "print(t.backend, t.encode('Процедура Тест()'))\n"
         "print(T.native_status())\n"
         "try:\n    T.Tokenizer('native')\nexcept ImportError as e:\n    print('ERR', e)\n")


def test_native_build_is_cached_and_falls_back(tmp_path, ref):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    want = str(ref.reference.encode("Процедура Тест()"))
    # a fresh cache: built once, atomically (no temp file left), then reused
    r = _in_fresh_process(PROBE, tmp_path / "c1", CC="cc")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"native {want}" and out[1] == "native C encoder loaded", out
    built = sorted(p.name for p in (tmp_path / "c1" / "rwkvforge").iterdir())
    assert len(built) == 1 and built[0].startswith("trie_tokenizer-") and built[0].endswith(".so")
    mtime = (tmp_path / "c1" / "rwkvforge" / built[0]).stat().st_mtime_ns
    # cache hit: no compiler is run (none could be found on this PATH)
    r = _in_fresh_process(PROBE, tmp_path / "c1", CC="cc", PATH=str(tmp_path / "nowhere"))
    assert r.stdout.splitlines()[0] == f"native {want}", r.stdout + r.stderr
    assert (tmp_path / "c1" / "rwkvforge" / built[0]).stat().st_mtime_ns == mtime
    # a compiler that fails: the wheel takes over, same ids, and the reason is said
    r = _in_fresh_process(PROBE, tmp_path / "c2", CC="false")
    out = r.stdout.splitlines()
    assert r.returncode == 0 and out[0] == f"fast {want}", r.stdout + r.stderr
    assert "native C encoder unavailable" in out[1] and "apt install gcc" in out[1]
    assert out[2].startswith("ERR native C encoder unavailable")
    assert not list((tmp_path / "c2" / "rwkvforge").glob("*"))  # no half-built library
    # switched off: never built
    r = _in_fresh_process(PROBE, tmp_path / "c3", RWKVFORGE_NATIVE="0")
    out = r.stdout.splitlines()
    assert out[0] == f"fast {want}", r.stdout + r.stderr
    assert out[1] == "native C encoder off (RWKVFORGE_NATIVE=0); using pyrwkv-tokenizer"
    assert not (tmp_path / "c3").exists()

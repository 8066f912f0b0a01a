"""records: what one JSONL line means (SFT shapes, the system field, why a line is rejected)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rwkvforge.data import records as R
from rwkvforge.tokenizer import get_tokenizer


def line(row: dict) -> bytes:
    return json.dumps(row, ensure_ascii=False).encode("utf-8")


def test_top_level_system_with_messages():
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    tok = get_tokenizer()
    [(ids, mask)] = R.process_record({"system": "Ты эксперт 1С.", "messages": msgs}, "sft", tok)
    assert tok.decode(np.frombuffer(ids, np.uint16)).startswith(
        "System: Ты эксперт 1С.\n\nUser: Q")
    assert mask is not None and len(mask) == len(ids) // 2
    r = R.process_line(line({"system": "S", "messages": [{"role": "system", "content": "T"},
                                                         *msgs]}), 1, "sft", tok)
    assert r.items is None and "both a top-level 'system' field and a system" in r.error


@pytest.mark.parametrize("row, reason", [
    ({"messages": [{"role": "assistant", "content": "a"}]}, "roles out of order"),
    ({"messages": [{"role": "user", "content": "q"}]}, "must end with an assistant reply"),
    ({"prompt": "q"}, "missing field 'response'"),
    ({"question": "q"}, "no SFT fields"),
    ({"messages": "hi"}, "field 'messages' is str"),
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "prepare it with --type dpo"),
])
def test_sft_errors(row, reason):
    r = R.process_line(line(row), 3, "sft", get_tokenizer())
    assert r.lineno == 3 and r.items is None and reason in r.error

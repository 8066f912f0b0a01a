"""Constrained decoding for the server: JSON mode, JSON schema and forced tool calls.

The grammar engine is llguidance (https://github.com/guidance-ai/llguidance, a Rust wheel
with no torch dependency). It works on the World vocabulary's token *bytes*
(`tokenizer.token_table`), so a token that holds half of a UTF-8 character is handled like
any other, and it computes the set of tokens allowed next in well under a millisecond for
the grammars used here. Token 0 (end of text) is the grammar's end token: it is allowed
only when the text so far is complete.

* `LlgConstraint`: a `generate.Constraint` over one `llguidance.LLMatcher` (the engine asks
  it for the allowed tokens before each sample and advances it after).
* `json_grammar(schema)`: a JSON schema (or None = any JSON object, OpenAI's json_object
  mode) -> an llguidance grammar. Whitespace between tokens is fixed (", " and ": ", no
  newlines), so the reply is one line of JSON and can never hold the chat's end-of-turn
  blank line. Unsupported schema keywords are an error (`GrammarError`), never ignored.
* `tool_call_grammar(tools, name, parallel)`: one (or, with `parallel`, one or more)
  G1 `**Tool Call:**` blocks (TOOL_CALL_HEAD ... TOOL_CALL_TAIL) whose arguments follow
  the named tool's `parameters` schema (used for tool_choice "required" or a named tool).
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence

import numpy as np
import torch

from rwkvforge.generate import Constraint
from rwkvforge.tokenizer import token_table

# separators of the JSON we generate: one line, readable
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """A schema / grammar llguidance cannot compile (the message says why)."""


def _llg() -> Any:
    try:
        import llguidance
    except ImportError as e:  # a dependency of rwkvforge; missing only in a broken env
        raise GrammarError("constrained decoding needs the llguidance package "
                           "(pip install llguidance)") from e
    return llguidance


class _WorldTokens:
    """What llguidance.TokenizerWrapper reads: every id's bytes, the end token and a
    bytes -> ids encoder."""

    def __init__(self, tokenizer: Any, vocab_size: int):
        table = list(token_table())
        self.tokens = (table + [b""] * vocab_size)[:vocab_size]
        self.eos_token_id = 0
        self.bos_token_id = None
        self.special_token_ids = [0]
        self._tok = tokenizer

    def __call__(self, data: bytes) -> list[int]:
        return self._tok.encode_bytes(data)


@functools.lru_cache(maxsize=4)
def _ll_tokenizer(tokenizer: Any, vocab_size: int) -> Any:
    llg = _llg()
    return llg.LLTokenizer(llg.TokenizerWrapper(_WorldTokens(tokenizer, vocab_size)),
                           n_vocab=vocab_size, eos_token=0)


def _with_options(schema: dict) -> dict:
    return {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}


def json_grammar(schema: dict | None) -> str:
    """An llguidance grammar for JSON that validates against `schema` (None: any JSON
    object), after an optional single space: a chat reply starts after "Assistant:",
    where the World format puts a space (LeadingSpaceStrip drops it from the reply)."""
    if schema is None:
        schema = {"type": "object"}
    try:
        body = json.dumps(_with_options(schema), ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise GrammarError(f"not a usable JSON schema: {e}") from None
    return _llg().LLMatcher.grammar_from_lark(f'start: " "? body\nbody: %json {body}')


# a G1 tool call block (RWKV-LM's RWKV7-G1x-templates.txt), around its JSON object; api.py
# writes and parses the same text
TOOL_CALL_HEAD = "**Tool Call:**\n```json\n"
TOOL_CALL_TAIL = "\n```"


def tool_call_grammar(tools: Sequence[dict], name: str | None, parallel: bool) -> str:
    """Lark grammar: a G1 call block, "**Tool Call:**", a ```json line, {"name": "<tool>",
    "arguments": <args>} and a closing ``` line (one, or one or more separated by a newline
    with `parallel`), for the tool `name`
    (None: any of `tools`); each tool's arguments follow its `parameters` schema."""
    alts = []
    for i, t in enumerate(tools):
        fn = t["function"]
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        schema = {"type": "object", "properties": {"name": {"const": fn["name"]},
                                                   "arguments": params},
                  "required": ["name", "arguments"], "additionalProperties": False}
        alts.append((f"call_{i}", schema))
    if not alts:
        raise GrammarError(f"no tool named {name!r}")
    rules = [f"{r}: %json {json.dumps(_with_options(s), ensure_ascii=False)}"
             for r, s in alts]
    one = " | ".join(r for r, _ in alts)
    start = '" "? call ("\\n" call)*' if parallel else '" "? call'
    lark = "\n".join([
        f"start: {start}",
        f"call: {json.dumps(TOOL_CALL_HEAD)} body {json.dumps(TOOL_CALL_TAIL)}",
        f"body: {one}",
        *rules])
    return _llg().LLMatcher.grammar_from_lark(lark)


class LlgConstraint(Constraint):
    """One stream's grammar state (an llguidance matcher over the World vocabulary)."""

    def __init__(self, matcher: Any, vocab_size: int):
        self.m = matcher
        self.V = vocab_size

    def allowed(self, vocab_size: int) -> torch.Tensor:
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8),
                             bitorder="little")[:vocab_size]
        return torch.from_numpy(bits.astype(bool))

    def advance(self, token: int) -> bool:
        return bool(self.m.consume_token(token))

    def done(self) -> bool:
        return bool(self.m.is_stopped())

    def accepting(self) -> bool:
        return bool(self.m.is_accepting())


def compile_grammar(grammar: str, tokenizer: Any, vocab_size: int) -> Any:
    """Check `grammar` once (GrammarError naming the problem) and return the matcher
    factory's input: the checked grammar string."""
    llg = _llg()
    lt = _ll_tokenizer(tokenizer, vocab_size)
    is_err, msgs = llg.LLMatcher.validate_grammar_with_warnings(grammar, lt)
    if is_err:
        raise GrammarError(msgs[0].split("\n")[0] if msgs else "invalid grammar")
    return grammar


def new_constraint(grammar: str, tokenizer: Any, vocab_size: int) -> LlgConstraint:
    """A fresh matcher for `grammar` (checked by compile_grammar)."""
    llg = _llg()
    m = llg.LLMatcher(_ll_tokenizer(tokenizer, vocab_size), grammar, log_level=0)
    if m.is_error():
        raise GrammarError(m.get_error())
    return LlgConstraint(m, vocab_size)

"""Evaluate a run: what did training do? Base vs tuned model, side by side, in one run.

    rwkvforge eval --run runs/<run>                                  # adapter + data of the run
    rwkvforge eval --run runs/<run> --tuned runs/<run>/merged/<run>-bf16.pth
    rwkvforge eval --run runs/<run> --val data/samples/bsl_sft.jsonl --checks data/samples/bsl_checks.jsonl
    ./scripts/eval.sh --run runs/<run>

Three things, each for the base and the tuned model:
1. loss / perplexity on a validation set: a prepared prefix (its val split; a bare binidx made
   elsewhere is read whole, as text) or a JSONL (SFT records: the loss covers the assistant
   replies only, as in training; {"text": ...} records: every token). Loss is token-weighted,
   sum(CE * mask) / sum(mask) over the whole set, and perplexity = exp(loss). DPO data (a
   prefix prepared with --type dpo): the loss covers the chosen answers, and the preference
   is measured too: the share of pairs whose chosen answer is the likelier one, per model, and
   the tuned model's DPO loss, reward accuracy and margin with the base as the reference
   (beta = the run's DPO_BETA).
2. prompt checks from a JSONL of {"prompt", "expect", "kind": "substring" | "regex"}: the
   prompt is asked as a chat turn, answered greedily (temperature 0), and passes when the
   answer contains `expect` (substring) or `re.search(expect, answer)` finds a match (regex).
   Without --checks they come from the run's own held-out data (its prepared val split: up to
   HELD_OUT_CHECKS examples, the user turn as the prompt, the first line of the reference
   reply, past a code fence, as the expected substring), or there are none (text data, no val
   split); the shipped 1C checks (data/samples/bsl_checks.jsonl) only for a run on the shipped
   sample data. One line says which.
3. the answers themselves, base vs tuned, in a table.

Tuned model: `--adapter DIR` (default runs/<run>/adapter) is merged into the base in memory in
fp32 (`rwkvforge.adapter`, the merge `rwkvforge merge` verifies against peft), or `--tuned X.pth`
loads a merged file. A state-tuning run (TRAIN_TYPE=state / lora+state) is evaluated with its
tuned initial state (runs/<run>/state/; `--state PATH` names another): base vs base + state
(+ adapter). Results go to runs/<run>/eval/eval.json and report.md (atomic writes).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F

from rwkvforge import config as cfgmod
from rwkvforge import paths, runs
from rwkvforge.adapter import MergeError, load_with_adapter
from rwkvforge.checkpoint import (CheckpointError, atomic_write_bytes, load_state_dict,
                                  model_from_state_dict)
from rwkvforge.data.loader import build_val_batches, load_meta, open_split
from rwkvforge.data.records import dpo_hint, record_to_messages
from rwkvforge.generate import CHAT_STOP, FAST_PATHS, Engine, encode_chat_prompt
from rwkvforge.sampling import SamplingParams
from rwkvforge.loss import dpo_losses
from rwkvforge.progress import Progress
from rwkvforge.runtime import keep_freed_memory
from rwkvforge.state_tuning import STATE_DIR, StateError, load_state_into, resolve_state_path
from rwkvforge.tokenizer import encode_chat, get_tokenizer

CHECK_KINDS = ("substring", "regex")
HELD_OUT_CHECKS = 8  # answering is eval's slow part (seconds per prompt and model on a CPU)
EXPECT_CHARS = 40  # a held-out check expects the reference reply's first line, up to this


class EvalError(ValueError):
    """Bad input: what was wrong, where (file:line), and what to do."""


# ---- checks --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    prompt: str
    expect: str
    kind: str = "substring"
    where: str = ""  # file:line

    def passes(self, answer: str) -> bool:
        if self.kind == "substring":
            return self.expect in answer
        return re.search(self.expect, answer) is not None


def _jsonl_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) for each non-blank line of a JSONL file; a line that is not
    valid JSON or not an object is an EvalError naming its file:line."""
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise EvalError(f"{where}: invalid JSON ({e.msg} at column {e.colno}).") from e
        if not isinstance(rec, dict):
            raise EvalError(f"{where}: expected a JSON object, got {type(rec).__name__}.")
        yield where, rec


def load_checks(path: str | Path) -> list[Check]:
    """Read and validate a checks JSONL; every problem names file:line."""
    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path}: checks file not found (expected JSONL lines of "
                        f'{{"prompt", "expect", "kind": "substring"|"regex"}}).')
    checks = []
    for where, rec in _jsonl_objects(path):
        for key in ("prompt", "expect"):
            if not isinstance(rec.get(key), str):
                raise EvalError(f"{where}: field '{key}' must be a string "
                                f"(found keys: {', '.join(sorted(rec)) or 'none'}).")
        kind = rec.get("kind", "substring")
        if kind not in CHECK_KINDS:
            raise EvalError(f"{where}: kind={kind!r}; expected one of {', '.join(CHECK_KINDS)}.")
        if kind == "regex":
            try:
                re.compile(rec["expect"])
            except re.error as e:
                raise EvalError(f"{where}: expect is not a valid regex ({e}).") from e
        checks.append(Check(rec["prompt"], rec["expect"], kind, where))
    if not checks:
        raise EvalError(f"{path}: no checks in the file.")
    return checks


def held_out_checks(prefix: str | Path, limit: int = HELD_OUT_CHECKS, tok=None) -> list[Check]:
    """Checks drawn from a prepared dataset's val split (runs.held_out_turns): each asks the
    held-out question and expects the first line of its reference reply (up to EXPECT_CHARS;
    a Markdown code fence line does not count)."""
    try:
        turns = runs.held_out_turns(Path(prefix), limit, "val", tok)
    except (OSError, ValueError) as e:
        raise EvalError(f"{prefix}: cannot read its validation split ({e}).") from e
    checks = []
    for i, (question, reply) in enumerate(turns, 1):
        lines = [x.strip() for x in reply.splitlines() if x.strip()]
        first = next((x for x in lines if not x.startswith("```")), lines[0])  # not a fence
        checks.append(Check(question, first[:EXPECT_CHARS].rstrip(), "substring",
                            f"{prefix}.val #{i}"))
    return checks


def default_checks(record: dict, val_prefix: Path | None) -> tuple[list[Check], str]:
    """The checks `eval` runs without --checks, and the one line that says which: the shipped
    1C checks for a run on the shipped sample data, else the run's held-out examples, else
    none."""
    if runs.uses_demo_data(record):
        path = paths.sample_data_dir() / "bsl_checks.jsonl"
        if path.is_file():
            return load_checks(path), (f"the shipped 1C checks {path} (the run trained on the "
                                       "shipped sample data)")
    if val_prefix is not None and val_prefix.suffix != ".jsonl":
        checks = held_out_checks(val_prefix)
        if checks:
            return checks, (f"{len(checks)} drawn from the run's held-out data {val_prefix}.val "
                            f"(its question; expects the first line of the reference reply)")
    return [], ("none: the run's data has no held-out chat examples (text data or "
                "VAL_FRACTION=0); pass --checks FILE for your own")


def pass_rate(checks: list[Check], answers: list[str]) -> dict:
    """{"passed": n, "total": n, "rate": passed / total, "results": [bool per check]}."""
    if len(checks) != len(answers):
        raise ValueError(f"{len(checks)} checks but {len(answers)} answers")
    results = [c.passes(a) for c, a in zip(checks, answers)]
    return {"passed": sum(results), "total": len(results),
            "rate": (sum(results) / len(results)) if results else 0.0, "results": results}


# ---- validation data -----------------------------------------------------------------------------
def _jsonl_rows(path: Path, ctx_len: int, tok) -> list[tuple[list[int], list[int]]]:
    """(ids, mask) per JSONL record: SFT records through the training chat encoding (mask on
    assistant replies), {"text": ...} records as plain text + end of document (mask all 1)."""
    rows = []
    for where, rec in _jsonl_objects(path):
        try:
            if "text" in rec and isinstance(rec["text"], str):
                ids = tok.encode(rec["text"]) + [0]
                mask = [1] * len(ids)
            else:
                ids, mask = encode_chat(record_to_messages(rec), tok)
        except ValueError as e:
            hint = dpo_hint(rec) and (" (preference pairs: `rwkvforge prepare --type dpo` "
                                      "them and pass the prefix as --val)")
            raise EvalError(f"{where}: {e}{hint}") from e
        ids, mask = ids[: ctx_len + 1], mask[: ctx_len + 1]
        if len(ids) >= 2 and any(mask[1:]):
            rows.append((ids, mask))
    if not rows:
        raise EvalError(f"{path}: no usable records (need SFT records with an assistant reply "
                        f"or {{\"text\": ...}} lines).")
    return rows


def _batch(rows: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """Pad to the longest row; targets[t] = ids[t+1], loss_mask[t] = mask[t+1] (the mask
    belongs to the predicted token, as in data/loader.py)."""
    T = max(len(ids) for ids, _ in rows) - 1
    inp = torch.zeros(len(rows), T, dtype=torch.long)
    tgt = torch.zeros(len(rows), T, dtype=torch.long)
    msk = torch.zeros(len(rows), T, dtype=torch.float32)
    for i, (ids, mask) in enumerate(rows):
        n = len(ids) - 1
        inp[i, :n] = torch.tensor(ids[:-1])
        tgt[i, :n] = torch.tensor(ids[1:])
        msk[i, :n] = torch.tensor(mask[1:], dtype=torch.float32)
    return {"input_ids": inp, "targets": tgt, "loss_mask": msk}


def val_batches(source: str | Path, ctx_len: int, micro_bsz: int, tok=None,
                max_batches: int | None = None) -> tuple[list[dict[str, torch.Tensor]], str]:
    """Validation batches from a JSONL or a binidx prefix; (batches, description)."""
    source = Path(source)
    if source.suffix == ".jsonl":
        if not source.is_file():
            raise EvalError(f"{source}: validation JSONL not found.")
        rows = _jsonl_rows(source, ctx_len, tok or get_tokenizer())
        batches = [_batch(rows[i: i + micro_bsz]) for i in range(0, len(rows), micro_bsz)]
        desc = f"{source} (JSONL, {len(rows)} records)"
    else:
        prefix = Path(str(source).removesuffix(".bin").removesuffix(".idx").removesuffix(".meta.json"))
        if not (prefix.with_suffix(".bin").is_file() or Path(f"{prefix}.meta.json").is_file()
                or Path(f"{prefix}.bin").is_file()):
            raise EvalError(f"{source}: no such JSONL or prepared data (<prefix>.bin/.idx or "
                            f"<prefix>.meta.json); run `rwkvforge prepare` first.")
        _, meta = load_meta(prefix)
        if meta is None:  # a bare binidx from elsewhere: all of it is the validation text
            split = open_split(prefix, "train")
            toks = split.ids.tokens
            rows = []
            for start in range(0, max(len(toks) - 1, 0), ctx_len):
                w = [int(t) for t in toks[start: start + ctx_len + 1]]
                if len(w) >= 2:
                    rows.append((w, [1] * len(w)))
            batches = [_batch(rows[i: i + micro_bsz]) for i in range(0, len(rows), micro_bsz)]
            desc = f"{prefix} (bare binidx, read whole as text)"
        else:
            batches = build_val_batches(prefix, ctx_len, micro_bsz)
            if not batches:
                frac = (meta.get("options") or {}).get("val_fraction", 0)
                why = (f"VAL_FRACTION={frac} holds out whole documents and the data has "
                       f"{meta.get('documents', '?')}" if frac else "VAL_FRACTION=0")
                raise EvalError(f"{prefix}: the prepared data has no validation split "
                                f"({why}); prepare it with VAL_FRACTION > 0 and at least 2 "
                                "documents, or pass --val with a JSONL.")
            desc = f"{prefix} (val split, {meta.get('type', '?')})"
    if max_batches is not None:
        batches = batches[:max_batches]
    return batches, desc


# ---- loss ----------------------------------------------------------------------------------------
@torch.no_grad()
def row_losses(model, batch: dict[str, torch.Tensor], head_chunk: int = 256
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of the batch: (sum of CE * mask, sum of mask), float64 (B,) each. The head
    runs on `head_chunk` positions at a time (never the full T x V logits)."""
    h, _ = model.forward_hidden(b_in := batch["input_ids"])  # (B, T, C)
    total = torch.zeros(b_in.shape[0], dtype=torch.float64)
    count = torch.zeros(b_in.shape[0], dtype=torch.float64)
    for s in range(0, h.shape[1], head_chunk):
        logits = model.head(h[:, s: s + head_chunk]).float()  # (B, t, V)
        ce = F.cross_entropy(logits.transpose(1, 2), batch["targets"][:, s: s + head_chunk],
                             reduction="none")  # (B, t)
        m = batch["loss_mask"][:, s: s + head_chunk].float()
        total += (ce * m).sum(1).double()
        count += m.sum(1).double()
    return total, count


def masked_loss(model, batches: list[dict[str, torch.Tensor]], head_chunk: int = 256) -> dict:
    """Token-weighted masked cross-entropy over all batches: sum(CE * mask) / sum(mask)."""
    total, count = 0.0, 0.0
    for b in batches:
        t, c = row_losses(model, b, head_chunk)
        total += float(t.sum())
        count += float(c.sum())
    return _loss_summary(total, count)


def _loss_summary(total: float, count: float) -> dict:
    if count == 0:
        raise EvalError("the validation set has no target tokens (every loss_mask is 0).")
    loss = total / count
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "tokens": int(count)}


def _side(batch: dict[str, torch.Tensor], side: str) -> dict[str, torch.Tensor]:
    """The chosen_* or rejected_* rows of a DPO batch as a plain batch."""
    return {k[len(side) + 1:]: v for k, v in batch.items() if k.startswith(side + "_")}


def pair_losses(model, batches: list[dict[str, torch.Tensor]], head_chunk: int = 256
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs, 2) float64 each, for the (chosen, rejected) answers of DPO batches: the summed
    cross-entropy (minus the sequence log-prob) and the trained-token count."""
    rows = [[row_losses(model, _side(b, side), head_chunk) for side in ("chosen", "rejected")]
            for b in batches]
    return tuple(torch.cat([torch.stack([sides[0][i], sides[1][i]], 1) for sides in rows])
                 for i in (0, 1))  # type: ignore[return-value]


def pair_logps(model, batches: list[dict[str, torch.Tensor]], head_chunk: int = 256
               ) -> torch.Tensor:
    """(pairs, 2) float64 sequence log-probs of (chosen, rejected) answers of DPO batches."""
    return -pair_losses(model, batches, head_chunk)[0]


def preference(base: torch.Tensor, tuned: torch.Tensor, beta: float) -> dict:
    """Preference metrics from (pairs, 2) log-probs: for each model the share of pairs whose
    chosen answer is the likelier one; for the tuned model against the base as reference, the
    DPO loss, the reward accuracy (margin > 0) and the mean reward margin."""
    losses, margin = dpo_losses(tuned, base, beta)
    return {"pairs": int(base.shape[0]), "beta": beta,
            "base": {"chosen_likelier": float((base[:, 0] > base[:, 1]).double().mean())},
            "tuned": {"chosen_likelier": float((tuned[:, 0] > tuned[:, 1]).double().mean()),
                      "dpo_loss": float(losses.mean()),
                      "reward_accuracy": float((margin > 0).double().mean()),
                      "reward_margin": float(margin.mean())}}


# ---- answers -------------------------------------------------------------------------------------
def answer_prompts(model, tok, prompts: list[str], max_tokens: int, max_batch: int = 16,
                   desc: str = "[eval] answering", progress: bool = True,
                   fast: str = "none") -> list[str]:
    """Greedy answers, each prompt asked as one user turn in the World chat format; a bar (or
    a line every few seconds) counts the finished answers. `fast`: INFER_FAST for these
    answers on CPU (the model's mode is restored afterwards: losses stay exact)."""
    saved = model.infer_dtype
    if next(model.parameters()).device.type == "cpu":
        model.infer_dtype = FAST_PATHS[fast]
    try:
        return _answer(model, tok, prompts, max_tokens, max_batch, desc, progress)
    finally:
        model.infer_dtype = saved


def _answer(model, tok, prompts: list[str], max_tokens: int, max_batch: int, desc: str,
            progress: bool) -> list[str]:
    eng = Engine(model, tok, max_batch=max_batch, cache_prompts=False)
    handles = []
    for p in prompts:
        ids, _ = encode_chat_prompt([{"role": "user", "content": p}], tok)
        params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens,
                                stop=CHAT_STOP, seed=0)  # where a turn ends, as in serve
        handles.append(eng.submit(ids, params))
    with torch.inference_mode(), Progress(desc, len(handles), "answer",
                                          enabled=progress) as bar:
        while not eng.idle():
            eng.step()
            done = sum(h.finish_reason is not None for h in handles)
            bar.update(done - bar.n)
    return [h.result().strip() for h in handles]


# ---- models --------------------------------------------------------------------------------------
def load_tuned(base_sd: dict[str, torch.Tensor], adapter: str | Path | None, tuned: str | Path | None):
    """(tuned RWKV7 in fp32, description)."""
    if tuned is not None:
        try:
            return load_with_adapter(tuned), f"merged model {tuned}"
        except CheckpointError as e:
            raise EvalError(f"--tuned: {e}") from e
    try:
        model = load_with_adapter(base_sd, adapter)
    except MergeError as e:
        raise EvalError(str(e)) from e
    return model, f"base + adapter {adapter} (merged in memory, fp32)"


def _md_cell(text: str, limit: int = 400) -> str:
    t = text if len(text) <= limit else text[:limit] + " …"
    return t.replace("|", "\\|").replace("\r", "").replace("\n", "<br>") or "*(empty)*"


def render_report(res: dict) -> str:
    b, t = res["loss"]["base"], res["loss"]["tuned"]
    lines = [f"# Evaluation: {res['run']}", "",
             f"- base: `{res['models']['base']}`", f"- tuned: {res['models']['tuned']}",
             f"- validation: {res['val']['source']} ({b['tokens']} target tokens)", "",
             "| | base | tuned | change |", "|---|---|---|---|",
             f"| loss | {b['loss']:.4f} | {t['loss']:.4f} | {t['loss'] - b['loss']:+.4f} |",
             f"| perplexity | {b['ppl']:.3f} | {t['ppl']:.3f} | {t['ppl'] / b['ppl'] - 1:+.1%} |"]
    pf = res.get("preference")
    if pf:
        pb, pt = pf["base"], pf["tuned"]
        lines.append(f"| chosen answer likelier ({pf['pairs']} pairs) | "
                     f"{pb['chosen_likelier']:.0%} | {pt['chosen_likelier']:.0%} | "
                     f"{pt['chosen_likelier'] - pb['chosen_likelier']:+.0%} |")
    ch = res.get("checks")
    if ch:
        cb, ct = ch["base"], ch["tuned"]
        lines.append(f"| prompt checks passed | {cb['passed']}/{cb['total']} ({cb['rate']:.0%}) | "
                     f"{ct['passed']}/{ct['total']} ({ct['rate']:.0%}) | {ct['rate'] - cb['rate']:+.0%} |")
    if pf:  # after the table: a paragraph right under it would end it
        lines += ["", f"DPO against the base as reference (beta {pf['beta']:g}): loss "
                      f"{pt['dpo_loss']:.4f} (ln 2 = 0.6931 = no change), reward accuracy "
                      f"{pt['reward_accuracy']:.0%}, mean reward margin {pt['reward_margin']:+.4f}."]
    if ch:
        lines += ["", f"## Answers (greedy, max {res['settings']['max_tokens']} tokens; checks "
                      f"from {ch['file']})", "",
                  "| # | prompt | expect | base | tuned |", "|---|---|---|---|---|"]
        for i, it in enumerate(ch["items"], 1):
            mark = lambda ok: "✅" if ok else "❌"  # noqa: E731
            lines.append(f"| {i} | {_md_cell(it['prompt'], 200)} | `{_md_cell(it['expect'], 80)}` "
                         f"({it['kind']}) | {mark(it['base_pass'])} {_md_cell(it['base_answer'])} | "
                         f"{mark(it['tuned_pass'])} {_md_cell(it['tuned_answer'])} |")
    return "\n".join(lines) + "\n"


def evaluate(run: Path, base: Path, adapter: Path | None, tuned: Path | None, val: Path,
             checks_path: Path | list[Check] | None, out_dir: Path, ctx_len: int = 512,
             micro_bsz: int = 4, max_tokens: int = 128, max_val_batches: int | None = None,
             log=print, dpo_beta: float = 0.1, checks_source: str | None = None,
             progress: bool = True, state: Path | None = None, infer_fast: str = "none") -> dict:
    """`checks_path`: a checks JSONL, or the checks themselves (from `checks_source`);
    `infer_fast`: INFER_FAST of the prompt checks' answers (the losses are always exact)."""
    t0 = time.time()
    # inputs first, all of them, before any long work
    if not Path(base).is_file():
        raise EvalError(f"{base}: base model not found (pass --base-model).")
    if state is not None:
        try:
            state = resolve_state_path(state)
        except StateError as e:
            raise EvalError(str(e)) from e
    if tuned is None and state is not None and (adapter is None or not Path(adapter).exists()):
        adapter = None  # a state-only run: base vs base + state
    elif tuned is None and (adapter is None or not Path(adapter).exists()):
        raise EvalError(f"{adapter}: adapter not found; pass --adapter DIR or --tuned merged.pth "
                        f"(a run has runs/<run>/adapter once training finished).")
    if tuned is not None and not Path(tuned).is_file():
        raise EvalError(f"{tuned}: tuned (merged) model not found.")
    if isinstance(checks_path, list):
        checks = checks_path
    else:
        checks = load_checks(checks_path) if checks_path else []
        checks_source = checks_source or (str(checks_path) if checks_path else None)
    tok = get_tokenizer()
    batches, val_desc = val_batches(val, ctx_len, micro_bsz, tok, max_val_batches)
    try:
        base_sd = load_state_dict(base)
        base_model = model_from_state_dict(base_sd)
    except CheckpointError as e:
        raise EvalError(f"base model: {e}") from e
    tuned_model, tuned_desc = (load_tuned(base_sd, adapter, tuned) if adapter or tuned
                               else (model_from_state_dict(base_sd), "base"))
    if state is not None:
        try:
            load_state_into(tuned_model, state)
        except StateError as e:
            raise EvalError(str(e)) from e
        tuned_desc += f" + state {state}"
    if tuned_model.config != base_model.config:
        raise EvalError(f"tuned model shape {tuned_model.config} differs from the base "
                        f"{base_model.config}: not the same model family.")

    res = {"run": run.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "models": {"base": str(base), "tuned": tuned_desc},
           "val": {"source": val_desc, "batches": len(batches)},
           "settings": {"ctx_len": ctx_len, "micro_bsz": micro_bsz, "max_tokens": max_tokens,
                        "decoding": "greedy (temperature 0)"},
           "loss": {}}
    pairs = "pair_index" in batches[0]  # DPO data: the loss is over the chosen answers
    if pairs:
        res["val"]["loss_over"] = "the chosen answers"
    logps = {}
    for name, model in (("base", base_model), ("tuned", tuned_model)):
        if pairs:  # one pass over both answers gives the chosen answers' loss too
            ce, n = pair_losses(model, batches)
            logps[name] = -ce
            res["loss"][name] = _loss_summary(float(ce[:, 0].sum()), float(n[:, 0].sum()))
        else:
            res["loss"][name] = masked_loss(model, batches)
        log(f"[eval] {name}: loss {res['loss'][name]['loss']:.4f}, "
            f"perplexity {res['loss'][name]['ppl']:.3f} over {res['loss'][name]['tokens']} tokens"
            + (" of the chosen answers" if pairs else ""))
    res["loss"]["delta"] = res["loss"]["tuned"]["loss"] - res["loss"]["base"]["loss"]
    if pairs:
        pf = res["preference"] = preference(logps["base"], logps["tuned"], dpo_beta)
        log(f"[eval] chosen answer likelier: base {pf['base']['chosen_likelier']:.0%}, tuned "
            f"{pf['tuned']['chosen_likelier']:.0%} of {pf['pairs']} pairs; DPO loss vs base "
            f"{pf['tuned']['dpo_loss']:.4f}, reward accuracy {pf['tuned']['reward_accuracy']:.0%}")
    if checks:
        prompts = [c.prompt for c in checks]
        answers = {}
        for name, model in (("base", base_model), ("tuned", tuned_model)):
            log(f"[eval] {name}: answering {len(prompts)} prompts ...")
            answers[name] = answer_prompts(model, tok, prompts, max_tokens,
                                           desc=f"[eval] {name}: answering", progress=progress,
                                           fast=infer_fast)
        pr = {n: pass_rate(checks, answers[n]) for n in answers}
        res["checks"] = {
            "file": checks_source or "given checks",
            "base": {k: v for k, v in pr["base"].items() if k != "results"},
            "tuned": {k: v for k, v in pr["tuned"].items() if k != "results"},
            "items": [{"prompt": c.prompt, "expect": c.expect, "kind": c.kind, "where": c.where,
                       "base_answer": answers["base"][i], "tuned_answer": answers["tuned"][i],
                       "base_pass": pr["base"]["results"][i], "tuned_pass": pr["tuned"]["results"][i]}
                      for i, c in enumerate(checks)],
        }
        log(f"[eval] checks passed: base {pr['base']['passed']}/{len(checks)}, "
            f"tuned {pr['tuned']['passed']}/{len(checks)}")
    res["seconds"] = round(time.time() - t0, 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out_dir / "eval.json", (json.dumps(res, indent=2, ensure_ascii=False) + "\n").encode())
    atomic_write_bytes(out_dir / "report.md", render_report(res).encode())
    return res


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()  # inference: reuse freed activation memory (see runtime.py)

    ap = argparse.ArgumentParser(prog="rwkvforge eval", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="the run folder (runs/<run>)")
    ap.add_argument("--base-model", dest="base", type=Path, default=None, help="base .pth (default: the run's model)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--adapter", type=Path, default=None, help="adapter folder (default: <run>/adapter)")
    g.add_argument("--tuned", type=Path, default=None, help="a merged .pth to evaluate instead")
    ap.add_argument("--state", type=Path, default=None, help="a tuned initial state (a run "
                    "folder, its state/ or a state .pth; default: <run>/state when the run "
                    "tuned one)")
    ap.add_argument("--base", dest="base", type=Path, help=argparse.SUPPRESS)  # old name
    ap.add_argument("--val", type=Path, default=None,
                    help="validation data: a prepared prefix or a JSONL (default: the run's data "
                         "prefix, else data/samples/bsl_sft.jsonl)")
    ap.add_argument("--checks", type=Path, default=None,
                    help="prompt checks JSONL (default: drawn from the run's held-out data; the "
                         "shipped 1C checks for a run on the shipped sample data)")
    ap.add_argument("--no-checks", action="store_true", help="skip prompt checks and answers")
    ap.add_argument("--ctx-len", type=int, default=None, help="tokens per validation row "
                    "(default: the run's CTX_LEN, else 512)")
    ap.add_argument("--micro-bsz", type=int, default=4, help="rows per forward pass")
    ap.add_argument("--max-tokens", type=int, default=128, help="answer length cap")
    ap.add_argument("--max-val-batches", type=int, default=None, help="evaluate only the first N batches")
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/eval)")
    cfgmod.add_settings_flags(ap, only=["infer_fast"])  # the prompt checks' answers
    args = ap.parse_args(argv)
    for flag in ("ctx_len", "micro_bsz", "max_tokens", "max_val_batches"):
        v = getattr(args, flag)
        if v is not None and v < (2 if flag == "ctx_len" else 1):
            ap.error(f"--{flag.replace('_', '-')} must be >= {2 if flag == 'ctx_len' else 1}, "
                     f"got {v}")

    try:
        infer_fast = cfgmod.resolve_from_args(args).settings.infer_fast
    except cfgmod.ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    run = args.run
    if not run.is_dir():
        print(f"error: {run}: no such run folder.", file=sys.stderr)
        return 2
    try:
        record = runs.run_config(run, strict=True)
    except runs.RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    settings = runs.run_settings(record)
    base = args.base or runs.run_base_model(record)
    if base is None:
        print("error: --base-model is required (the run has no config.json naming its model).", file=sys.stderr)
        return 2
    adapter = None if args.tuned else (args.adapter or runs.final_adapter(run))
    val = args.val or runs.run_data_prefix(record) or paths.sample_data_dir() / "bsl_sft.jsonl"
    ctx = args.ctx_len or int(settings.get("ctx_len") or 512)
    try:
        checks: Path | list[Check] | None = args.checks
        if args.no_checks:
            checks, which = None, "none (--no-checks)"
        elif args.checks is not None:
            which = f"{args.checks} (--checks)"
        else:
            checks, which = default_checks(record, runs.run_data_prefix(record))
        print(f"[eval] prompt checks: {which}", file=sys.stderr)
        evaluate(run, base, adapter, args.tuned, val, checks, args.out or run / "eval", ctx,
                 args.micro_bsz, args.max_tokens, args.max_val_batches,
                 log=lambda m: print(m, file=sys.stderr),
                 dpo_beta=float(settings.get("dpo_beta") or 0.1),
                 checks_source=which if isinstance(checks, list) else None,
                 state=args.state or ((run / STATE_DIR) if (run / STATE_DIR).is_dir() else None),
                 infer_fast=infer_fast)
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    out = args.out or run / "eval"
    print(f"results: {out / 'eval.json'}")
    print(f"report:  {out / 'report.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Prepare training data: JSONL -> binidx (text), masked SFT examples or DPO pairs.

    rwkvforge prepare --input data/raw/corpus.jsonl --output-prefix data/processed/corpus \\
        --type text --ctx-len 4096 --repeat 3 --shuffle --seed 42 --val-fraction 0
    ./scripts/prepare_binidx.sh --type sft          # DATA_FILE / DATA_TYPE / ... from configs
    python -m rwkvforge.data.prepare --help

Input: one JSON object per line (UTF-8; blank lines are skipped, as in RWKV-LM), or one JSON
array of them (a file starting with "["; record k is read as line k), or a folder (text):
  text  {"text": "..."}
  sft   {"messages": [{"role": "system"|"user"|"assistant", "content": str | text parts,
        "weight"?: 0|1}, ...]}, ShareGPT {"conversations": [{"from": "human"|"gpt"|"system",
        "value": "..."}, ...]}, {"prompt": "...", "response"|"completion": "..."} or Alpaca
        {"instruction", "input"?, "output", "history"?} (optional "system" string on all)
  dpo   {"prompt": str | messages, "chosen": str | messages, "rejected": str | messages}
        (optional "system" string, as for SFT)
--type auto (DATA_TYPE=auto, the default) picks the type from the records' keys and says so in
one line, or refuses a file that mixes kinds (data/detect.py; every shape: docs/data.md).

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

Tokenization runs in --workers processes (default: all cores): the file goes to them in
blocks of whole lines, tokenized by data/blocks.py; what a line means, and why one is
rejected, is data/records.py. This module is the stage around them: options, folder input,
the splits, writing and publishing the outputs, the command line. A progress bar shows on a
terminal for inputs over a few MB.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from typing import Any, Callable, NamedTuple

import numpy as np

from rwkvforge import config as cfgmod
from rwkvforge import paths
from rwkvforge.data.binidx import BinIdxReader, BinIdxWriter, bin_path, idx_path
from rwkvforge.data.blocks import (BlockResult, block_size_for, iter_blocks, pool_worker_init,
                                   worker_block, worker_init)
from rwkvforge.data.loader import load_meta, magic_prime, packing_line
from rwkvforge.data.detect import (DataShapeError, auto_type, is_json_array, json_array_to_jsonl,
                                   mismatch_error, scan)
from rwkvforge.data.records import LineResult, encoding_hint
from rwkvforge.paths import sample_data_dir, workspace_root
from rwkvforge.runtime import pid_alive
from rwkvforge.tokenizer import VOCAB_NAME

# the shipped sample read for each DATA_TYPE when DATA_FILE is empty (auto: the SFT one)
SAMPLES = {"auto": "bsl_sft.jsonl", "text": "bsl_code.jsonl", "sft": "bsl_sft.jsonl",
           "dpo": "bsl_dpo.jsonl"}
MAX_ERRORS_SHOWN = 20
META_FORMAT = "rwkvforge-data/1"


class PrepareError(Exception):
    """A problem with the input or options; the message says what to do."""


# ---- the progress bar ----------------------------------------------------------------------------

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


# ---- the run -------------------------------------------------------------------------------------

@dataclass
class Options:
    input: Path
    prefix: Path
    data_type: str
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

    @classmethod
    def from_settings(cls, settings: cfgmod.Settings, *, input: Path, output_prefix: Path,
                      **run: Any) -> Options:
        """Options to prepare `input` into `output_prefix` as the settings say (DATA_TYPE,
        CTX_LEN, SEED, VAL_FRACTION, DATA_GLOB and MICRO_BSZ / GRAD_ACCUM / NUM_GPUS for the
        steps per epoch). `run` sets the fields that are not settings (repeat, shuffle,
        skip_invalid, workers, max_line_mb, progress); the others keep their defaults."""
        return cls(input=input, prefix=output_prefix, data_type=settings.data_type,
                   ctx_len=settings.ctx_len, seed=settings.seed,
                   val_fraction=settings.val_fraction, micro_bsz=settings.micro_bsz,
                   grad_accum=settings.grad_accum, num_gpus=settings.num_gpus,
                   glob=settings.data_glob, **run)


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
                hint = encoding_hint(raw, 2, f"'{p}' > '{p}.utf8'")
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
                 doc_items: np.ndarray, order: np.ndarray, prefix: Path, data_type: str
                 ) -> tuple[list[BinIdxWriter], dict[str, Any]]:
    writers = [BinIdxWriter(prefix, np.uint16)]
    if stage_mask is not None:
        writers.append(BinIdxWriter(Path(f"{prefix}.mask"), np.uint8))
    per_doc = 2 if data_type == "dpo" else 1
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
    per_step = opts.micro_bsz * opts.grad_accum * opts.num_gpus
    out: dict[str, Any] = {"ctx_len": opts.ctx_len, "micro_bsz": opts.micro_bsz,
                           "grad_accum": opts.grad_accum, "num_gpus": opts.num_gpus}
    if opts.data_type == "text":
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
    if src.is_dir() and opts.data_type not in ("text", "auto"):
        raise PrepareError(f"{src} is a folder: a folder is read as text documents (one per "
                           f"file, --type text); {opts.data_type} data is one JSONL file")
    if not src.is_dir() and not src.is_file():
        raise PrepareError(f"{src}: input file not found")
    if opts.data_type not in SAMPLES:
        raise PrepareError(f"unknown --type {opts.data_type!r}: use auto, text, sft or dpo")
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
        if opts.data_type == "auto":
            log(f"DATA_TYPE=auto -> text: {src} is a folder (one document per file)")
            opts = dataclasses.replace(opts, data_type="text")
        jsonl = prefix.with_name(f"{prefix.name}.folder.jsonl.tmp-{os.getpid()}")
        try:
            return _run(opts, jsonl, log, t0, folder=_folder_to_jsonl(src, opts.glob, jsonl))
        finally:
            jsonl.unlink(missing_ok=True)
    if is_json_array(src):  # [{...}, {...}]: record k becomes line k of a JSONL
        jsonl = prefix.with_name(f"{prefix.name}.array.jsonl.tmp-{os.getpid()}")
        try:
            try:
                json_array_to_jsonl(src, jsonl)
            except DataShapeError as e:
                raise PrepareError(str(e)) from None
            return _run(opts, jsonl, log, t0, array=src)
        finally:
            jsonl.unlink(missing_ok=True)
    return _run(opts, src, log, t0)


def _run(opts: Options, src: Path, log, t0: float, folder: FolderInput | None = None,
         array: Path | None = None) -> dict[str, Any]:
    """run() on the JSONL `src`, which `folder` made from a folder's files, or
    json_array_to_jsonl from the JSON-array file `array`, when given."""
    prefix = opts.prefix
    names = folder.names if folder else None
    shown_src = folder.path if folder else array or src
    unit = "file" if folder else "record" if array else "line"

    def where(lineno: int) -> str:  # how an error names its place
        if array:
            return f"{array}: record {lineno}"
        return str(shown_src / names[lineno - 1]) if names else f"{src}:{lineno}"

    shapes = None
    detected: dict[str, Any] = {"data_type": opts.data_type}
    if opts.data_type == "auto":  # one scan of the keys picks the type, or refuses the file
        shapes = scan(src, array)
        try:
            kind, why = auto_type(shapes)
        except DataShapeError as e:
            raise PrepareError(str(e)) from None
        if why:
            log(why)
        opts = dataclasses.replace(opts, data_type=kind)
        detected["shapes"] = {v: n for v, n in shapes.variants().items() if v}
    has_mask = opts.data_type in ("sft", "dpo")
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
        worker_init(opts.data_type, max_line)  # load the tokenizer once; forked workers inherit it
        if opts.workers > 1:
            methods = mp.get_all_start_methods()
            ctx = mp.get_context("fork" if "fork" in methods else "spawn")
            # frozen objects are skipped by the garbage collector: the forked workers never
            # walk (and copy-on-write) the parent's heap, e.g. a loaded reference tokenizer
            gc.freeze()
            try:
                # this process is one of the workers: one fork fewer, and it would
                # otherwise sit idle waiting for results
                pool = ctx.Pool(opts.workers - 1, initializer=pool_worker_init,
                                initargs=(opts.data_type, max_line))
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
                pending.append(pool.apply_async(worker_block, (task,))
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
        if errors and not folder and (not opts.skip_invalid or not doc_first_item):
            # records of another shape: one summarised error, not one line per record
            mis = mismatch_error(shapes or scan(src, array), opts.data_type)
            if mis is not None:
                more = (f" ({len(errors) - mis[0]} other {unit}(s) invalid too)"
                        if len(errors) > mis[0] else "")
                raise PrepareError(f"{mis[1]}{more}; nothing was written")
        if errors and not opts.skip_invalid:
            raise PrepareError(
                f"{len(errors)} invalid {unit}(s) in {shown_src}; "
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
        w_train, info_train = _write_split(s_ids, s_mask, items, order, prefix, opts.data_type)
        writers += w_train
        val_prefix = Path(f"{prefix}.val")
        info_val = None
        if len(val):
            w_val, info_val = _write_split(s_ids, s_mask, items, val, val_prefix, opts.data_type)
            writers += w_val
        rejects_file = Path(f"{prefix}.rejects.jsonl")
        meta: dict[str, Any] = {
            "format": META_FORMAT, "type": opts.data_type, "tokenizer": VOCAB_NAME,
            "type_from": detected,  # DATA_TYPE as given; with auto, the shapes it saw
            "source": {"path": str(shown_src), "bytes": array.stat().st_size if array else size,
                       "sha256": (hashlib.sha256(array.read_bytes()) if array else hasher
                                  ).hexdigest(),
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
            long = s_ids.sizes[items[train, None] + np.arange(2 if opts.data_type == "dpo" else 1)]
            meta["longer_than_ctx"] = int((long > opts.ctx_len + 1).any(axis=1).sum())
        if opts.data_type == "sft":  # examples the loader leaves out: nothing to train within ctx
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
                json.dumps({"file": where(e.lineno) if names else str(shown_src),
                            "line": None if names or array else e.lineno,
                            **({"record": e.lineno} if array else {}), "reason": e.error,
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
    r: BlockResult = job.get() if hasattr(job, "get") else worker_block(job)
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
    elif meta["options"]["val_fraction"] > 0:
        log(f"  warning: no validation split: VAL_FRACTION={meta['options']['val_fraction']} holds "
            f"out whole {unit} and needs at least 2 (there is {meta['documents']}); no "
            "validation loss, and `rwkvforge eval` needs --val FILE. "
            + ("Split the text into several files (one file = one document)"
               if meta["source"].get("files") else "Add records") + " to get one.")
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
        packed = packing_line(prefix, meta["ctx_len"], meta["micro_bsz"] * meta["grad_accum"]
                              * meta["num_gpus"])  # None: no SFT / DPO train split
        if packed:
            log(packed)
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


# ---- is prepared data still current --------------------------------------------------------------

def stale_reason(meta: dict, data_file: Path, settings: cfgmod.Settings) -> str | None:
    """Why prepared data (its meta) no longer matches DATA_FILE / the settings (None: it
    matches)."""
    src = meta.get("source") or {}
    opts = meta.get("options") or {}
    if settings.data_type != "auto" and meta.get("type") != settings.data_type:
        return f"type {meta.get('type')} != DATA_TYPE {settings.data_type}"
    if "val_fraction" in opts and float(opts["val_fraction"]) != float(settings.val_fraction):
        return f"VAL_FRACTION {opts['val_fraction']} -> {settings.val_fraction}"
    if "seed" in opts and int(opts["seed"]) != int(settings.seed):
        return f"SEED {opts['seed']} -> {settings.seed}"
    if not data_file.is_file():
        return None  # nothing to compare with; use what was prepared
    size = data_file.stat().st_size
    if "bytes" in src and int(src["bytes"]) != size:
        return f"{data_file.name} changed size"
    if "sha256" in src and size <= 256 * 2**20:
        h = hashlib.sha256(data_file.read_bytes()).hexdigest()
        if h != src["sha256"]:
            return f"{data_file.name} changed"
    return None


# ---- command line --------------------------------------------------------------------------------

SETTING_FLAGS = ("data_file", "data_glob", "data_type", "data_prefix", "ctx_len", "val_fraction",
                 "seed", "micro_bsz", "grad_accum", "num_gpus")


class DataInputError(ValueError):
    """The data a run names cannot be used as it is; the message says what to do."""


def prepared_data(s: cfgmod.Settings, sources: dict[str, str], root: Path, *, prepare: bool = True,
                  say: Callable[[str], None] = print, check_data: bool = True,
                  resuming: bool = False) -> tuple[Path, Path | None]:
    """(prefix, DATA_FILE) of the prepared data a run trains on: DATA_PREFIX, or
    data/processed/<name of DATA_FILE (the shipped sample when unset)>, prepared now when it
    is missing or out of date (only with `prepare`). `check_data=False`: only name it.
    `resuming`: data that no longer matches DATA_FILE is an error, not prepared again (a
    resumed run continues on the data it started with)."""
    prefix, data_file, meta = _data_paths(s, sources, root)
    chosen = sources.get("DATA_TYPE", "")
    if prepare and chosen.startswith(AUTO_SOURCE):  # detect_type's line, in the run's log
        say(chosen[len(AUTO_SOURCE):-1])
    # a bare .bin is text binidx (RWKV-LM's make_data.py); one with a .mask but no meta is
    # an interrupted prepare (loader.open_split refuses it): prepare again
    have = meta is not None or (Path(f"{prefix}.bin").is_file()
                                and not Path(f"{prefix}.mask.idx").is_file())
    if meta is not None and data_file is not None and prepare:
        why = stale_reason(meta, data_file, s)
        if why and resuming:
            raise DataInputError(f"prepared data {prefix} no longer matches {data_file} "
                                 f"({why}): a resumed run continues on the data it started "
                                 "with. Restore the file, or start a new run.")
        if why:
            say(f"prepared data {prefix} is out of date ({why}): preparing it again")
            have = False
    if not have and check_data:
        if data_file is None or not prepare:
            raise DataInputError(f"no prepared data at {prefix} (.meta.json / .bin): run "
                                 f"`rwkvforge prepare` first (DATA_FILE={s.data_file or '-'}).")
        if not data_file.exists():
            raise DataInputError(f"DATA_FILE {data_file} not found. Fix DATA_FILE, or leave "
                                 "it empty for the shipped sample.")
        say(f"preparing {data_file} -> {prefix} ({s.data_type})")
        run(Options.from_settings(s, input=data_file, output_prefix=prefix, workers=1,
                                  progress=False),
            log=lambda m: say(m) if m.startswith("DATA_TYPE=auto") else None)
    return prefix, data_file


def _data_paths(s: cfgmod.Settings, sources: dict[str, str], root: Path
                ) -> tuple[Path, Path | None, dict | None]:
    """(prefix, DATA_FILE, the prefix's meta or None) as prepared_data names them."""
    data_file: Path | None = None
    if s.data_prefix:
        prefix = paths.resolve(s.data_prefix, sources.get("DATA_PREFIX", "cli"), root)
        if s.data_file:
            data_file = paths.resolve(s.data_file, sources.get("DATA_FILE", "cli"), root)
    else:
        data_file = (paths.resolve(s.data_file, sources.get("DATA_FILE", "cli"), root)
                     if s.data_file else sample_data_dir(root) / SAMPLES[s.data_type])
        prefix = root / "data" / "processed" / data_file.stem
    try:
        _, meta = load_meta(prefix)
    except ValueError as e:  # a meta.json that is not valid JSON / not ours
        raise DataInputError(f"prepared data: {e}") from None
    return prefix, data_file, meta


AUTO_SOURCE = "auto ("  # the source of a DATA_TYPE detect_type chose: "auto (<why>)"


def detect_type(res: cfgmod.Resolved, root: Path, say: Callable[[str], None] | None = None
                ) -> cfgmod.Resolved:
    """`res` with DATA_TYPE=auto replaced by the type of the data, its source the one line
    saying why (prepared_data says it again in the run's log; `say` gets it now): the type
    of prepared data that still matches DATA_FILE, else what a scan of DATA_FILE's records
    finds (a folder: text). Other DATA_TYPEs, and data that cannot be found (prepared_data
    then says what is missing), are returned as they are. PrepareError: the file mixes kinds
    of records or has none of a known shape."""
    s = res.settings
    if s.data_type != "auto":
        return res
    try:
        prefix, data_file, meta = _data_paths(s, res.sources, root)
    except DataInputError:
        return res
    kind = why = None
    if meta is not None and meta.get("type") in SAMPLES and (data_file is None or stale_reason(
            meta, data_file, dataclasses.replace(s, data_type=meta["type"])) is None):
        kind = meta["type"]
        why = f"DATA_TYPE=auto -> {kind}: as prepared in {prefix}.meta.json"
    elif data_file is None:
        if Path(f"{prefix}.bin").is_file() and not Path(f"{prefix}.mask.idx").is_file():
            kind, why = "text", f"DATA_TYPE=auto -> text: {prefix}.bin is plain binidx"
    elif data_file.is_dir():
        kind, why = "text", f"DATA_TYPE=auto -> text: {data_file} is a folder"
    elif data_file.is_file():
        try:
            kind, why = auto_type(scan(data_file))
        except DataShapeError as e:
            raise PrepareError(str(e)) from None
    if kind is None or not why:  # nothing to go by: prepare names the problem
        return res
    if say is not None:
        say(why)
    return cfgmod.Resolved(settings=dataclasses.replace(s, data_type=kind),
                           sources={**res.sources, "DATA_TYPE": f"{AUTO_SOURCE}{why})"},
                           files=res.files)


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
    ap.add_argument("--type", dest="set_data_type", choices=tuple(SAMPLES),
                    help="auto (from the records' keys), text, sft or dpo [DATA_TYPE]")
    ap.add_argument("--output-prefix", dest="set_data_prefix", metavar="PREFIX",
                    help="output prefix, e.g. data/processed/name [DATA_PREFIX]")
    cfgmod.add_settings_flags(ap, only=SETTING_FLAGS)
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


def options_from_args(args: argparse.Namespace) -> Options:
    res = cfgmod.resolve_for_training(args)  # the CTX_LEN / MICRO_BSZ train will use
    s, src = res.settings, res.sources
    if s.data_file:
        inp = paths.resolve(s.data_file, src["DATA_FILE"])
    else:
        inp = sample_data_dir() / SAMPLES[s.data_type]
    if s.data_prefix:
        prefix = paths.resolve(s.data_prefix, src["DATA_PREFIX"])
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
    return Options.from_settings(s, input=inp, output_prefix=prefix, repeat=args.repeat,
                                 shuffle=args.shuffle, skip_invalid=args.skip_invalid,
                                 workers=max(workers, 1), max_line_mb=args.max_line_mb,
                                 progress=not args.no_progress)


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
    except cfgmod.ConfigError as e:
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

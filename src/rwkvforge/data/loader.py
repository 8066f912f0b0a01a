"""Training batches from prepared data: magic-prime windows (text), SFT and DPO batches.

    from rwkvforge.data.loader import build_train_loader, build_val_batches
    loader = build_train_loader("data/processed/bsl_sft", ctx_len=512, micro_bsz=4, seed=42)
    batch = next(loader)          # {"input_ids", "targets", "loss_mask"}: (B, T) tensors
    state = loader.state_dict()   # save with the checkpoint; loader.load_state_dict(state)
    val = build_val_batches("data/processed/bsl_sft", ctx_len=512, micro_bsz=4)

Input: a prefix written by `rwkvforge prepare` (its `<prefix>.meta.json` names the type and
splits), or a bare `<prefix>` of a binidx made elsewhere (e.g. RWKV-LM's make_data.py),
read as plain text.

Text (RWKV-LM semantics). The .bin is one token stream. With ctx_len C and D tokens,
magic_prime p is the largest prime p <= D // C - 1 with p % 3 == 2 (make_data.py's rule;
needs D >= 3C). Global sample g = 0, 1, 2, ... reads the C + 1 tokens starting at

    offset(g) = ((floor(p * (sqrt(5) - 1) / 2) * (g + 1) ** 3) mod p) * C

which is RWKV-LM's dataset.py with ii = g + 1. Because p is prime and p % 3 == 2, cubing
and the multiplication are bijections mod p, so samples g = e*p .. e*p + p - 1 (epoch e)
visit each of the p windows exactly once, scattered over the data. input_ids = window[:-1],
targets = window[1:], loss_mask = 1 (the end-of-document 0s are trained, as in RWKV-LM).

SFT. One prepared example = ids ending with 0 + a 0/1 mask (1 on assistant text and its end
of turn). Each epoch visits the examples in a permutation seeded by (seed, epoch). An
example longer than C + 1 tokens is cut to C + 1. targets[t] = ids[t + 1] and
loss_mask[t] = mask[t + 1] (the mask belongs to the predicted token). Batches are padded
(input 0, target 0, mask 0) to the longest row (`pad_to="longest"`, fastest) or to C
(`pad_to="ctx_len"`, fixed shapes).

Packing (`pack=True`, PACK=1). Rows of C + 1 tokens are filled with whole examples (first
fit, in the epoch's order, over the last PACK_WINDOW open rows), and the batch gains `reset`
(B, T) bool: True on each example's first input token. The model restarts its state and token
shift there (model/wkv.py), and loss_mask is 0 where the target is the next example's first
token, so a packed row's loss is the sum of its examples' losses run one by one (unlike
RWKV-LM's stream and RWKV-PEFT's padding, which carry state from one example into the next).
`pack_stats` gives the padding share with and without packing for a list of example sizes.

DPO. One prepared pair = two items, chosen then rejected, each ids + mask over the response.
A batch has chosen_* and rejected_* versions of the three keys, all padded to one T, and
`pair_index` (B,): each row's pair number in its split (the key of the reference log-probs a
DPO run computes once). Pairs where either answer has no trained token within ctx_len are
left out, like such SFT examples.

Packed DPO (`pack=True`). A row is 2 x C positions, the room of one unpacked pair (its chosen
row and its rejected row), and holds whole pairs (first fit over PACK_WINDOW open rows): each
answer cut to C + 1 tokens as unpacked, laid as its own C positions of (input, target) (no
position is spent on a boundary), `reset` True on its first input. `segment` (B, 2C) int64
says whose each position is: 2j for pair j's chosen answer, 2j + 1 for its rejected one, -1
on padding; `pair_index` (P,) names the P pairs in row order and `row_pairs` (B + 1,) the
offsets (row b holds pairs row_pairs[b]:row_pairs[b + 1]), so any split into micro-batches
of whole rows keeps both answers of a pair together. The loss sums each segment's log-probs
separately (loss.segment_logps): the same numbers as the unpacked pair.

Data parallel: rank r of w ranks takes global samples r, r + w, r + 2w, ...; with the same
seed the ranks never overlap. State (epoch, position) is plain ints: resuming yields exactly
the batches an uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import numpy as np

from rwkvforge.data.binidx import BinIdxReader

if TYPE_CHECKING:  # torch is imported on first batch: `prepare` uses magic_prime without it
    import torch

META_SUFFIX = ".meta.json"
GOLDEN = (math.sqrt(5) - 1) / 2


# ---- magic prime (RWKV-LM) -----------------------------------------------------------------------

def is_prime(n: int) -> bool:
    if n <= 3:
        return n >= 2
    if n % 2 == 0 or n % 3 == 0:
        return False
    i = 5
    while i * i <= n:
        if n % i == 0 or n % (i + 2) == 0:
            return False
        i += 6
    return True


def magic_prime(num_tokens: int, ctx_len: int) -> int | None:
    """Largest prime p <= num_tokens // ctx_len - 1 with p % 3 == 2 (RWKV-LM make_data.py),
    or None when num_tokens < 3 * ctx_len."""
    if ctx_len < 1:
        raise ValueError(f"ctx_len must be >= 1, got {ctx_len}")
    if num_tokens < 3 * ctx_len:
        return None
    for p in range(num_tokens // ctx_len - 1, 1, -1):
        if p % 3 == 2 and is_prime(p):
            return p
    return None


def window_offset(sample: int, prime: int, ctx_len: int) -> int:
    """Token offset of global sample `sample` (0-based) in magic-prime order."""
    factor = int(prime * GOLDEN)
    ii = sample + 1
    return ((factor * ii * ii * ii) % prime) * ctx_len


def too_small_text(num_tokens: int, ctx_len: int, where: str) -> ValueError:
    need = 3 * ctx_len
    return ValueError(
        f"{where}: {num_tokens} tokens is too small for ctx_len={ctx_len}: magic-prime "
        f"sampling needs at least 3 x ctx_len = {need} tokens. Lower CTX_LEN (--ctx-len) "
        f"to at most {max(num_tokens // 3, 0)}, or prepare more data (more documents, or "
        f"--repeat {math.ceil(need / max(num_tokens, 1))} in rwkvforge prepare).")


# ---- prepared data -------------------------------------------------------------------------------

def meta_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}{META_SUFFIX}")


def load_meta(prefix_or_meta: str | Path) -> tuple[Path, dict[str, Any] | None]:
    """(prefix, meta or None). Accepts `<prefix>`, `<prefix>.meta.json` or `<prefix>.bin`."""
    s = str(prefix_or_meta)
    for suffix in (META_SUFFIX, ".bin", ".idx"):
        if s.endswith(suffix):
            s = s[: -len(suffix)]
            break
    prefix = Path(s)
    mp = meta_path(prefix)
    if not mp.is_file():
        return prefix, None
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{mp}: not valid JSON ({e}); prepare the data again") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("splits", {}), dict) or not all(
            isinstance(v, dict) or v is None for v in meta.get("splits", {}).values()):
        raise ValueError(f"{mp}: not a meta file of prepared data (its JSON has another "
                         "shape); prepare the data again")
    if meta.get("format") != "rwkvforge-data/1":
        raise ValueError(f"{mp}: unknown format {meta.get('format')!r}, expected "
                         "rwkvforge-data/1")
    return prefix, meta


class Split:
    """One split of prepared data: token items (+ mask items for sft / dpo)."""

    def __init__(self, prefix: Path, data_type: str, mask_prefix: Path | None = None) -> None:
        self.prefix, self.data_type = prefix, data_type
        self.ids = BinIdxReader(prefix)
        self.mask = BinIdxReader(mask_prefix) if mask_prefix is not None else None
        if self.mask is not None and not np.array_equal(self.mask.sizes, self.ids.sizes):
            raise ValueError(f"{mask_prefix}: mask items do not match {prefix} item sizes; "
                             "prepare the data again")
        if data_type == "dpo" and len(self.ids) % 2:
            raise ValueError(f"{prefix}: a DPO split needs an even number of items "
                             f"(chosen, rejected), has {len(self.ids)}")

    @property
    def num_examples(self) -> int:
        return len(self.ids) // 2 if self.data_type == "dpo" else len(self.ids)

    def item(self, i: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
        ids = self.ids[i][:limit]
        mask = self.mask[i][:limit] if self.mask is not None else np.ones(len(ids), np.uint8)
        return ids, mask


def open_split(prefix_or_meta: str | Path, split: str = "train") -> Split | None:
    """The named split ("train" | "val") of prepared data; None when it has no such split."""
    prefix, meta = load_meta(prefix_or_meta)
    if meta is None:  # bare binidx (e.g. RWKV-LM's make_data.py): text, all of it "train"
        if Path(f"{prefix}.mask.idx").is_file() or Path(f"{prefix}.mask.bin").is_file():
            raise ValueError(f"{prefix}: SFT / DPO data (it has a .mask) without its "
                             f"{META_SUFFIX}: an interrupted `rwkvforge prepare`? Prepare "
                             "it again")
        return Split(prefix, "text") if split == "train" else None
    info = (meta.get("splits") or {}).get(split)
    if not info or not info.get("documents"):
        return None
    base = prefix.parent
    mask = base / info["mask_prefix"] if info.get("mask_prefix") else None
    return Split(base / info["prefix"], meta["type"], mask)


# ---- batch assembly ------------------------------------------------------------------------------

def pack_rows(rows: list[list[tuple[np.ndarray, np.ndarray]]], T: int
              ) -> dict[str, torch.Tensor]:
    """Packed rows of whole examples -> (B, T) input_ids, targets, loss_mask and reset.

    Each row is a list of (ids, mask) examples of total length <= T + 1, laid end to end.
    reset[t] marks an example's first input token; the input before it (the previous
    example's final 0) predicts it and is masked out of the loss."""
    import torch

    flat = [(np.concatenate([e[0] for e in parts]), np.concatenate([e[1] for e in parts]))
            for parts in rows]
    out = _rows_to_batch(flat, T)
    reset = np.zeros((len(rows), T), dtype=bool)
    m = out["loss_mask"].numpy()
    for b, parts in enumerate(rows):
        starts = np.cumsum([0] + [len(e[0]) for e in parts[:-1]])
        if starts[-1] + len(parts[-1][0]) > T + 1:
            raise ValueError(f"packed row {b}: {starts[-1] + len(parts[-1][0])} tokens do not "
                             f"fit ctx_len={T} + 1")
        reset[b, starts[starts < T]] = True
        m[b, starts[(starts > 0) & (starts <= T)] - 1] = 0.0
    out["reset"] = torch.from_numpy(reset)
    return out


def pack_pairs(split: Split, rows: list[list[int]], ctx_len: int) -> dict[str, torch.Tensor]:
    """Packed DPO rows (lists of pair numbers) -> (B, 2 x ctx_len) input_ids, targets,
    loss_mask, reset and segment, + pair_index (P,) and row_pairs (B + 1,) (module doc)."""
    import torch

    cap, T = ctx_len + 1, 2 * ctx_len
    B = len(rows)
    x = np.zeros((B, T), dtype=np.int64)
    y = np.zeros((B, T), dtype=np.int64)
    m = np.zeros((B, T), dtype=np.float32)
    reset = np.zeros((B, T), dtype=bool)
    seg = np.full((B, T), -1, dtype=np.int64)
    j = 0
    for b, pairs in enumerate(rows):
        t = 0
        for k in pairs:
            for side in (0, 1):
                ids, mask = split.item(2 * k + side, cap)
                n = len(ids) - 1
                if t + n > T:
                    raise ValueError(f"packed DPO row {b}: pair {k} does not fit 2 x "
                                     f"ctx_len={ctx_len} positions")
                x[b, t:t + n], y[b, t:t + n], m[b, t:t + n] = ids[:-1], ids[1:], mask[1:]
                reset[b, t], seg[b, t:t + n] = True, 2 * j + side
                t += n
            j += 1
    offsets = np.cumsum([0] + [len(r) for r in rows])
    return {"input_ids": torch.from_numpy(x), "targets": torch.from_numpy(y),
            "loss_mask": torch.from_numpy(m), "reset": torch.from_numpy(reset),
            "segment": torch.from_numpy(seg),
            "pair_index": torch.tensor([k for r in rows for k in r], dtype=torch.int64),
            "row_pairs": torch.from_numpy(offsets.astype(np.int64))}


def pair_positions(split: Split, pairs: Any, ctx_len: int) -> np.ndarray:
    """Input positions each pair takes in a packed DPO row (both answers, each cut to
    ctx_len + 1 tokens)."""
    cap = ctx_len + 1
    k = np.asarray(pairs, dtype=np.int64)
    sizes = np.minimum(np.asarray(split.ids.sizes, dtype=np.int64), cap) - 1
    return sizes[2 * k] + sizes[2 * k + 1]


PACK_WINDOW = 64  # open rows a packed example may go to (first fit): bounded planning time


def plan_packing(sizes: list[int], cap: int, window: int = PACK_WINDOW) -> list[list[int]]:
    """Rows of positions into `sizes` (each <= cap tokens): first fit over the last `window`
    open rows, in the given order (the order is kept inside each row)."""
    rows: list[list[int]] = []
    room: list[int] = []  # free tokens of rows[len(rows) - len(room):]
    for i, n in enumerate(sizes):
        n = min(int(n), cap)
        for j, free in enumerate(room):
            if n <= free:
                rows[len(rows) - len(room) + j].append(i)
                room[j] -= n
                break
        else:
            rows.append([i])
            room.append(cap - n)
            if len(room) > window:
                room.pop(0)
    return rows


def pack_stats(sizes: Any, ctx_len: int, micro_bsz: int = 1) -> dict[str, float]:
    """What packing does to a list of example sizes (tokens, each ending with its 0): rows
    and padding share with PACK=0 (micro-batches of `micro_bsz` padded to the longest, in
    the given order) and PACK=1 (rows of ctx_len). A token here is an input position."""
    cap = ctx_len + 1
    n = [min(int(x), cap) - 1 for x in sizes]  # input positions of each example
    useful = sum(n)
    padded = sum(max(n[b:b + micro_bsz]) * len(n[b:b + micro_bsz])
                 for b in range(0, len(n), micro_bsz))
    rows = len(plan_packing([x + 1 for x in n], cap))
    return {"examples": len(n), "tokens": useful, "rows_unpacked": len(n),
            "rows_packed": rows,
            "pad_share_unpacked": 1 - useful / padded if padded else 0.0,
            "pad_share_packed": 1 - useful / (rows * ctx_len) if rows else 0.0}


def pair_pack_stats(split: Split, pairs: Any, ctx_len: int, micro_bsz: int = 1
                    ) -> dict[str, float]:
    """pack_stats for DPO pairs (in the given order): PACK=0 runs each micro-batch of
    `micro_bsz` pairs as 2 x micro_bsz rows padded to its longest answer; PACK=1 packs whole
    pairs into rows of 2 x ctx_len positions."""
    cap = ctx_len + 1
    k = np.asarray(pairs, dtype=np.int64)
    sizes = np.minimum(np.asarray(split.ids.sizes, dtype=np.int64), cap) - 1
    longest = np.maximum(sizes[2 * k], sizes[2 * k + 1])
    useful = int(sizes[2 * k].sum() + sizes[2 * k + 1].sum())
    padded = sum(2 * int(longest[b:b + micro_bsz].max()) * len(longest[b:b + micro_bsz])
                 for b in range(0, len(k), micro_bsz))
    rows = len(plan_packing(pair_positions(split, k, ctx_len), 2 * ctx_len))
    return {"examples": len(k), "tokens": useful, "rows_unpacked": 2 * len(k),
            "rows_packed": rows,
            "pad_share_unpacked": 1 - useful / padded if padded else 0.0,
            "pad_share_packed": 1 - useful / (rows * 2 * ctx_len) if rows else 0.0}


def _rows_to_batch(rows: list[tuple[np.ndarray, np.ndarray]], T: int | None,
                   prefix: str = "") -> dict[str, torch.Tensor]:
    """rows of (ids, mask) with len >= 1 -> shifted, padded (B, T) tensors."""
    import torch

    T = T if T is not None else max(max(len(r[0]) - 1 for r in rows), 1)
    B = len(rows)
    x = np.zeros((B, T), dtype=np.int64)
    y = np.zeros((B, T), dtype=np.int64)
    m = np.zeros((B, T), dtype=np.float32)
    for b, (ids, mask) in enumerate(rows):
        n = min(len(ids) - 1, T)
        x[b, :n] = ids[:n]
        y[b, :n] = ids[1:n + 1]
        m[b, :n] = mask[1:n + 1]
    return {f"{prefix}input_ids": torch.from_numpy(x), f"{prefix}targets": torch.from_numpy(y),
            f"{prefix}loss_mask": torch.from_numpy(m)}


class _Stream:
    """Shared position logic: an endless stream of global samples split across ranks."""

    data_type = ""

    def __init__(self, micro_bsz: int, seed: int, rank: int, world_size: int) -> None:
        if micro_bsz < 1:
            raise ValueError(f"micro_bsz must be >= 1, got {micro_bsz}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.micro_bsz, self.seed, self.rank, self.world_size = micro_bsz, seed, rank, world_size
        self.epoch, self.pos = 0, rank  # pos: global sample index inside the epoch

    def epoch_len(self, epoch: int) -> int:
        raise NotImplementedError

    def _next_index(self) -> tuple[int, int]:
        while self.pos >= self.epoch_len(self.epoch):
            self.pos -= self.epoch_len(self.epoch)
            self.epoch += 1
        e, p = self.epoch, self.pos
        self.pos += self.world_size
        return e, p

    @property
    def samples_per_epoch(self) -> int:
        return self.epoch_len(0)

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch on each rank (>= 1)."""
        return max(self.samples_per_epoch // (self.micro_bsz * self.world_size), 1)

    @property
    def epoch_progress(self) -> float:
        """Epochs done as a float (for logs)."""
        n = self.epoch_len(self.epoch)
        return self.epoch + min(self.pos - self.rank, n) / n

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __next__(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _fingerprint(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {"data_type": self.data_type, "epoch": self.epoch, "pos": self.pos,
                "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size,
                "micro_bsz": self.micro_bsz, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = self.state_dict()
        if "kind" in state:  # checkpoints written before the key was renamed
            state = {**state, "data_type": state["kind"]}
        for key in ("data_type", "world_size", *self._fingerprint()):
            if state.get(key) != mine[key]:
                raise ValueError(f"loader state does not match this data/loader: {key} was "
                                 f"{state.get(key)!r}, now {mine[key]!r}. Resume with the "
                                 "same prepared data, CTX_LEN, SEED and number of GPUs, or "
                                 "start a new run.")
        if state.get("rank") != self.rank:
            raise ValueError(f"loader state is for rank {state.get('rank')}, this is rank "
                             f"{self.rank}")
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])


class TextWindowLoader(_Stream):
    """ctx_len + 1-token windows of a token stream in magic-prime order (see module doc).
    The order is RWKV-LM's and does not depend on `seed`."""

    data_type = "text"

    def __init__(self, split: Split, ctx_len: int, micro_bsz: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1) -> None:
        super().__init__(micro_bsz, seed, rank, world_size)
        self.tokens = split.ids.tokens
        self.ctx_len = ctx_len
        self.num_tokens = int(len(self.tokens))
        p = magic_prime(self.num_tokens, ctx_len)
        if p is None:
            raise too_small_text(self.num_tokens, ctx_len, str(split.prefix))
        self.magic_prime = p
        if p < micro_bsz * world_size:
            raise ValueError(
                f"{split.prefix}: {p} windows of ctx_len={ctx_len} per epoch is fewer than "
                f"one batch (micro_bsz={micro_bsz} x {world_size} GPUs). Lower MICRO_BSZ or "
                "CTX_LEN, or prepare more data (--repeat N).")

    def epoch_len(self, epoch: int) -> int:  # noqa: ARG002 - the interface: every epoch is as long for this loader
        return self.magic_prime

    def _fingerprint(self) -> dict[str, Any]:
        return {"ctx_len": self.ctx_len, "magic_prime": self.magic_prime}

    def sample_offset(self, epoch: int, pos: int) -> int:
        return window_offset(epoch * self.magic_prime + pos, self.magic_prime, self.ctx_len)

    def __next__(self) -> dict[str, torch.Tensor]:
        rows = []
        for _ in range(self.micro_bsz):
            off = self.sample_offset(*self._next_index())
            w = np.asarray(self.tokens[off:off + self.ctx_len + 1])
            rows.append((w, np.ones(len(w), np.uint8)))
        return _rows_to_batch(rows, self.ctx_len)


class SFTLoader(_Stream):
    """Masked examples, one per row (padded) or packed (see module doc)."""

    data_type = "sft"

    def __init__(self, split: Split, ctx_len: int, micro_bsz: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pack: bool = False,
                 pad_to: str = "longest") -> None:
        super().__init__(micro_bsz, seed, rank, world_size)
        if pad_to not in ("longest", "ctx_len"):
            raise ValueError(f"pad_to must be 'longest' or 'ctx_len', got {pad_to!r}")
        self.split, self.ctx_len, self.pack, self.pad_to = split, ctx_len, pack, pad_to
        # SFT examples whose trained (assistant) tokens all lie past CTX_LEN would train on
        # nothing (a zero loss, yet an optimiser step): they are left out, and counted
        # (DPO: pairs where either answer has none)
        self.examples = np.arange(split.num_examples)
        if split.mask is not None:
            cap = ctx_len + 1
            per = 2 if self.data_type == "dpo" else 1
            self.examples = np.asarray(
                [i for i in range(split.num_examples)
                 if all(split.mask[per * i + j][1:cap].any() for j in range(per))], np.int64)
            if not len(self.examples):
                what = "pairs has a trained token in both answers" if per == 2 else \
                    "examples has a trained (assistant) token"
                raise ValueError(
                    f"{split.prefix}: none of the {split.num_examples} {what} within "
                    f"ctx_len={ctx_len}: raise CTX_LEN, or shorten the prompts")
        self.skipped = split.num_examples - len(self.examples)
        self.n = len(self.examples)
        need = micro_bsz * world_size
        if self.n < need and not pack:
            raise ValueError(
                f"{split.prefix}: {self.n} examples is fewer than one batch (micro_bsz="
                f"{micro_bsz} x {world_size} GPUs = {need}). Lower MICRO_BSZ, add examples, or "
                "prepare with --repeat N."
                + (f" ({self.skipped} more have no trained token within ctx_len={ctx_len}.)"
                   if self.skipped else ""))
        self._plan_cache: tuple[int, list[list[int]]] | None = None
        self._order_cache: tuple[int, list[int]] | None = None
        if pack and len(self._plan(0)) < need:
            raise ValueError(
                f"{split.prefix}: packing {self.n} examples into ctx_len={ctx_len} rows gives "
                f"{len(self._plan(0))} rows, fewer than one batch ({need}). Lower MICRO_BSZ "
                "or CTX_LEN, or prepare with --repeat N.")

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's examples (split item indices) in a seeded random order."""
        return self.examples[np.random.default_rng([self.seed, epoch]).permutation(self.n)]

    def _plan(self, epoch: int) -> list[list[int]]:
        """Packed rows of an epoch: lists of example indices (whole examples)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        order = self._order(epoch)
        sizes, cap = self._pack_sizes(order)
        rows = [[int(order[j]) for j in row] for row in plan_packing(sizes, cap)]
        self._plan_cache = (epoch, rows)
        return rows

    def _pack_sizes(self, order: np.ndarray) -> tuple[Any, int]:
        """(size of each example in `order`, room of a row), in the packer's units."""
        return self.split.ids.sizes[order], self.ctx_len + 1

    def epoch_len(self, epoch: int) -> int:
        return len(self._plan(epoch)) if self.pack else self.n

    def _fingerprint(self) -> dict[str, Any]:
        return {"ctx_len": self.ctx_len, "examples": self.n, "pack": self.pack,
                "seed": self.seed}

    def _row(self, epoch: int, pos: int) -> tuple[np.ndarray, np.ndarray]:
        return self.split.item(self._epoch_order(epoch)[pos], self.ctx_len + 1)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order_cache is None or self._order_cache[0] != epoch:
            self._order_cache = (epoch, self._order(epoch).tolist())
        return self._order_cache[1]

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.pack:
            cap = self.ctx_len + 1
            return pack_rows([[self.split.item(i, cap) for i in self._plan(e)[p]] for e, p in
                              (self._next_index() for _ in range(self.micro_bsz))], self.ctx_len)
        rows = [self._row(*self._next_index()) for _ in range(self.micro_bsz)]
        T = self.ctx_len if self.pad_to == "ctx_len" else None
        return _rows_to_batch(rows, T)


class DPOLoader(SFTLoader):
    """(chosen, rejected) pairs; batch keys chosen_* and rejected_*, one common T."""

    data_type = "dpo"

    def __init__(self, split: Split, ctx_len: int, micro_bsz: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, pad_to: str = "longest",
                 pack: bool = False) -> None:
        super().__init__(split, ctx_len, micro_bsz, seed, rank, world_size, pack=pack,
                         pad_to=pad_to)
        cap = ctx_len + 1  # pairs whose answers differ only past ctx_len teach nothing
        self.same_within_ctx = sum(
            np.array_equal(split.ids[2 * k][:cap], split.ids[2 * k + 1][:cap])
            for k in self.examples.tolist())

    def _pack_sizes(self, order: np.ndarray) -> tuple[Any, int]:
        # a pair is one unit (both answers); a row holds what one unpacked pair's two rows do
        return pair_positions(self.split, order, self.ctx_len), 2 * self.ctx_len

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.pack:
            return pack_pairs(self.split, [self._plan(e)[p] for e, p in
                                           (self._next_index() for _ in range(self.micro_bsz))],
                              self.ctx_len)
        pairs = [self._epoch_order(e)[p] for e, p in
                 (self._next_index() for _ in range(self.micro_bsz))]
        return _pair_batch(self.split, pairs, self.ctx_len, self.pad_to)


def _pair_batch(split: Split, pairs: list[int], ctx_len: int, pad_to: str
                ) -> dict[str, torch.Tensor]:
    cap = ctx_len + 1
    chosen = [split.item(2 * k, cap) for k in pairs]
    rejected = [split.item(2 * k + 1, cap) for k in pairs]
    T = ctx_len if pad_to == "ctx_len" else max(max(len(r[0]) for r in chosen + rejected) - 1,
                                                1)
    import torch

    return {**_rows_to_batch(chosen, T, "chosen_"), **_rows_to_batch(rejected, T, "rejected_"),
            "pair_index": torch.tensor(pairs, dtype=torch.int64)}


def pair_batches(split: Split, pairs: Any, ctx_len: int, micro_bsz: int
                 ) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of the given DPO pairs, micro_bsz pairs each (the last may be smaller), pairs
    of similar length together (less padding); each batch's `pair_index` says which."""
    cap = ctx_len + 1
    sizes = split.ids.sizes
    order = sorted((int(k) for k in pairs),
                   key=lambda k: min(max(int(sizes[2 * k]), int(sizes[2 * k + 1])), cap))
    for b in range(0, len(order), micro_bsz):
        yield _pair_batch(split, order[b:b + micro_bsz], ctx_len, "longest")


# ---- entry points --------------------------------------------------------------------------------

def build_train_loader(prefix_or_meta: str | Path, ctx_len: int, micro_bsz: int,
                       seed: int = 0, *, rank: int = 0, world_size: int = 1,
                       pack: bool = False, pad_to: str = "longest"
                       ) -> TextWindowLoader | SFTLoader | DPOLoader:
    """Endless, resumable batch iterator over the train split (type from the meta file).

    Text batches are always (micro_bsz, ctx_len). Raises ValueError (never IndexError) when
    the data is smaller than one window / one batch, naming the sizes and what to change."""
    split = open_split(prefix_or_meta, "train")
    if split is None:
        raise ValueError(f"{prefix_or_meta}: no training documents (all held out for "
                         "validation?); lower VAL_FRACTION or add data")
    if split.data_type == "text":
        return TextWindowLoader(split, ctx_len, micro_bsz, seed, rank, world_size)
    if split.data_type == "sft":
        return SFTLoader(split, ctx_len, micro_bsz, seed, rank, world_size, pack, pad_to)
    if split.data_type == "dpo":
        return DPOLoader(split, ctx_len, micro_bsz, seed, rank, world_size, pad_to, pack)
    raise ValueError(f"{prefix_or_meta}: unknown data type {split.data_type!r}")


def build_val_batches(prefix_or_meta: str | Path, ctx_len: int, micro_bsz: int, *,
                      max_batches: int | None = None, pad_to: str = "longest"
                      ) -> list[dict[str, torch.Tensor]]:
    """Deterministic validation batches; [] when the data has no validation split.

    Text: consecutive non-overlapping ctx_len + 1 windows over the val stream (the last one
    shorter, padded with loss_mask 0). SFT / DPO: examples in file order, one per row."""
    split = open_split(prefix_or_meta, "val")
    if split is None:
        return []
    rows: list[Any] = []
    if split.data_type == "text":
        toks = split.ids.tokens
        for start in range(0, max(len(toks) - 1, 0), ctx_len):
            w = np.asarray(toks[start:start + ctx_len + 1])
            rows.append((w, np.ones(len(w), np.uint8)))
    elif split.data_type == "sft":
        rows = [split.item(i, ctx_len + 1) for i in range(split.num_examples)]
    else:
        rows = list(range(split.num_examples))
    batches = []
    for b in range(0, len(rows), micro_bsz):
        chunk = rows[b:b + micro_bsz]
        if split.data_type == "dpo":
            batches.append(_pair_batch(split, chunk, ctx_len, pad_to))
        else:
            T = ctx_len if (split.data_type == "text" or pad_to == "ctx_len") else None
            batches.append(_rows_to_batch(chunk, T))
        if max_batches is not None and len(batches) >= max_batches:
            break
    return batches


def build_loaders(settings: Any, prefix: str | Path, micro_bsz: int, grad_accum: int,
                  world: int, say: Callable[[str], None] = print):
    """(train loader, validation batches) of the prepared data for a run with this micro-batch
    split, checked against DATA_TYPE (ValueError says what to pass instead); notes on the
    examples CTX_LEN leaves out."""
    s = settings
    rows = micro_bsz * grad_accum * world
    pack = bool(getattr(s, "pack", False))
    try:
        loader = build_train_loader(prefix, s.ctx_len, rows, s.seed, pack=pack)
        val_batches = build_val_batches(prefix, s.ctx_len, max(s.micro_bsz, 1), max_batches=64)
    except ValueError as e:
        msg = str(e)
        if "fewer than one batch" in msg and rows != s.micro_bsz:
            msg += (f" (one batch here is one optimiser step: MICRO_BSZ {micro_bsz} x "
                    f"GRAD_ACCUM {grad_accum} x {world} GPUs = {rows} rows; lower GRAD_ACCUM "
                    "too)")
        raise ValueError(msg) from None
    dpo = s.data_type == "dpo"
    if pack and loader.data_type == "text":
        say("note: PACK=1 applies to SFT data; text windows are full CTX_LEN rows already "
            "(RWKV-LM's stream, no resets)")
    if (loader.data_type == "dpo") != dpo:
        raise ValueError(
            f"{prefix}: the prepared data holds "
            f"{'preference pairs (dpo)' if loader.data_type == 'dpo' else loader.data_type}"
            f" (its {Path(str(prefix)).name}.meta.json) but DATA_TYPE={s.data_type}: pass "
            f"--data-type {loader.data_type or 'text'}, or another DATA_PREFIX.")
    skipped = getattr(loader, "skipped", 0)
    if skipped:
        what = ("DPO pairs have an answer with no trained token" if dpo else
                "SFT examples have no trained (assistant) token")
        say(f"note: {skipped} of {skipped + loader.n} {what} within CTX_LEN={s.ctx_len}: left "
            "out (raise CTX_LEN to train on them)")
    same = getattr(loader, "same_within_ctx", 0)
    if same:
        say(f"note: {same} DPO pairs have the same chosen and rejected tokens within "
            f"CTX_LEN={s.ctx_len} (they differ later): they add no preference signal "
            "(raise CTX_LEN)")
    return loader, val_batches


def packing_line(prefix: str | Path, ctx_len: int, per_step: int) -> str | None:
    """prepare's summary line for PACK=1 (None when there is no SFT train split): rows and
    steps per epoch packed, and the padding share either way."""
    split = open_split(prefix, "train")
    if split is None or split.data_type not in ("sft", "dpo"):
        return None
    # in one shuffled order, as the loader reads them
    order = np.random.default_rng([0, 0]).permutation(split.num_examples)
    if split.data_type == "dpo":
        st = pair_pack_stats(split, order, ctx_len, per_step)
        rows = f"{st['rows_packed']} rows of 2 x CTX_LEN = {2 * ctx_len} positions (whole pairs)"
    else:
        st = pack_stats(np.asarray(split.ids.sizes)[order], ctx_len, per_step)
        rows = f"{st['rows_packed']} rows of CTX_LEN={ctx_len}"
    steps = st["rows_packed"] // max(per_step, 1)
    line = (f"  PACK=1: {rows} -> {steps} steps per epoch (padding "
            f"{st['pad_share_unpacked']:.0%} of the tokens unpacked -> "
            f"{st['pad_share_packed']:.0%} packed)")
    if steps == 0:  # train would refuse it only after loading the model
        line += (f"\n  warning: packed, the {st['rows_packed']} rows make no full step of "
                 f"{per_step} rows: train with PACK=0, lower MICRO_BSZ / GRAD_ACCUM, add data, "
                 "or prepare with --repeat N")
    return line


def split_digest(split: Split) -> str:
    """sha256 of a prepared split's token and mask files (what DPO reference log-probs are of)."""
    h = hashlib.sha256()
    prefixes = [split.prefix] + ([split.mask.prefix] if split.mask is not None else [])
    for prefix in prefixes:
        for ext in (".idx", ".bin"):
            with open(f"{prefix}{ext}", "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
    return h.hexdigest()

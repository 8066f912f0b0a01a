"""Preference tuning's state that lives with a run: the reference log-probs of every DPO pair,
computed once from the starting model (loss.reference_logps) and kept in
runs/<run>/reference_logps.pt, so a resume continues against the same reference.

    ref_train, ref_val = dpo_reference(settings, model, loader, val_batches, run_dir, device,
                                       resume=False, write=True, say=print)
"""

from __future__ import annotations

import os
import pickle
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from rwkvforge.data.loader import pair_batches, split_digest
from rwkvforge.distributed import rng_state, set_rng_state
from rwkvforge.loss import reference_logps
from rwkvforge.progress import Progress

class DpoReferenceError(ValueError):
    """A run's kept reference log-probs cannot be used; the message says why and what to do."""


REFERENCE = "reference_logps.pt"


def dpo_reference(s: Any, model: nn.Module, loader, val_batches: list[dict],
                  run_dir: Path, device: torch.device, *, resume: bool, write: bool,
                  say: Callable[[str], None]) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO: the (train, val) reference log-probs of every pair, computed once with the model
    as it starts (base + freshly initialised adapters, i.e. the base model's outputs, also
    under PiSSA, DoRA and TRAIN_PARTS) and kept in runs/<run>/reference_logps.pt for a
    resume (written when `write`). SimPO is reference-free: zeros."""
    path = run_dir / REFERENCE
    n_train = loader.split.num_examples
    n_val = max((int(b["pair_index"].max()) + 1 for b in val_batches), default=0)
    if s.dpo_loss == "simpo":
        say(f"SimPO (DPO_LOSS=simpo): beta {s.dpo_beta:g}, gamma {s.simpo_gamma:g}, no "
            "reference model")
        return (torch.zeros(n_train, 2, dtype=torch.float64),
                torch.zeros(n_val, 2, dtype=torch.float64))
    data = split_digest(loader.split)
    if resume:
        why = "is missing or unreadable"
        try:
            ref = torch.load(path, map_location="cpu", weights_only=True)
            used = torch.as_tensor(loader.examples)
            if ref.get("data") != data:
                why = "was computed for other data (the data was prepared again since)"
            elif not (ref["train"].shape == (n_train, 2) and ref["val"].shape[0] >= n_val
                      and torch.isfinite(ref["train"][used]).all()):
                why = "does not match the data"
            else:
                why = ""
        except (OSError, KeyError, RuntimeError, pickle.UnpicklingError, AttributeError,
                TypeError, IndexError):
            pass
        if why:
            raise DpoReferenceError(f"--resume {run_dir}: {path.name} {why}: the reference "
                             "log-probs of a DPO run come from the model as it started "
                             "on this data. Start a new run.")
        return ref["train"], ref["val"]
    say(f"DPO: computing the reference log-probs of {loader.n} train pairs (one forward pass "
        "each, with the starting model) ...")
    t0 = time.time()
    rng = rng_state()
    args = (s.head_chunk, s.precision, device)
    # train pairs by the path training steps take (compiled ones, with COMPILE=1); val
    # pairs by evaluate_dpo's
    bsz = max(s.micro_bsz, 1)
    n_batches = -(-len(loader.examples) // bsz) + len(val_batches)
    # minutes on a big model: a bar (or a line every few seconds) on the process that writes
    with Progress("DPO reference pass", n_batches, "batch", enabled=write) as bar:
        ref_train = reference_logps(
            model, bar.iterate(pair_batches(loader.split, loader.examples, s.ctx_len, bsz)),
            n_train, *args, compiled=s.compile)
        ref_val = reference_logps(model, bar.iterate(val_batches), n_val, *args)
    set_rng_state(rng)
    if write:
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"train": ref_train, "val": ref_val, "beta": s.dpo_beta, "data": data},
                   tmp)
        os.replace(tmp, path)
    say(f"DPO: reference log-probs of {loader.n} train + "
        f"{sum(b['pair_index'].numel() for b in val_batches)} val pairs in "
        f"{time.time() - t0:.1f}s (beta {s.dpo_beta:g}"
        + (f", chosen-answer cross-entropy x {s.dpo_ftx:g}" if s.dpo_ftx else "") + ")")
    return ref_train, ref_val

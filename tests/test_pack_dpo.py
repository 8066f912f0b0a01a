"""Packed DPO (PACK=1, DATA_TYPE=dpo): rows of 2 x CTX_LEN hold whole pairs, each answer a
document with its own reset, and the loss sums each answer's log-probs by its segment id, so a
packed batch's DPO loss (and DPO_FTX's chosen-answer term) and its gradient equal the unpacked
batch's for the same pairs; dropping the reset or the segment sums breaks that; a short run
through `rwkvforge train` with PACK=1 trains against the reference log-probs of the pairs.

Uses the tiny fixture model (L2 C128, real 65536 vocabulary) and data/samples/bsl_dpo.jsonl,
fp32, one torch thread.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sample_data import prepare_sample
from rwkvforge import config as cfgmod
from rwkvforge import train as T
from rwkvforge.data.loader import (build_train_loader, open_split, packing_line,
                                   pair_batches, pair_pack_stats)
from rwkvforge.loss import LossModule, reference_logps
from rwkvforge.model import wkv as W

ROOT = Path(__file__).resolve().parents[1]
CTX = 512  # the sample's pairs are ~300 tokens: a 2 x 512 row holds about three
BETA, FTX = 0.1, 0.5

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dpo_prefix(tmp_path_factory):
    return prepare_sample(tmp_path_factory, "bsl_dpo", "dpo", 0.15)


# ---- the packed batch ----------------------------------------------------------------------------

def test_packed_rows_hold_whole_pairs_laid_as_their_unpacked_rows(dpo_prefix):
    ld = build_train_loader(dpo_prefix, CTX, 2, seed=3, pack=True)
    split = open_split(dpo_prefix)
    b = next(ld)
    assert b["input_ids"].shape == (2, 2 * CTX)
    off, seg = b["row_pairs"].tolist(), b["segment"]
    assert off[0] == 0 and off[-1] == b["pair_index"].numel() and off[1] >= 2  # packed
    for row in range(2):
        t = 0
        for j in range(off[row], off[row + 1]):
            k = int(b["pair_index"][j])
            for side in (0, 1):
                ids, mask = split.item(2 * k + side, CTX + 1)
                n = len(ids) - 1
                assert seg[row, t:t + n].eq(2 * j + side).all()
                assert b["reset"][row, t] and not b["reset"][row, t + 1:t + n].any()
                assert b["input_ids"][row, t:t + n].tolist() == ids[:-1].tolist()
                assert b["targets"][row, t:t + n].tolist() == ids[1:].tolist()
                assert b["loss_mask"][row, t:t + n].tolist() == mask[1:].tolist()
                t += n
        assert seg[row, t:].eq(-1).all() and b["loss_mask"][row, t:].eq(0).all()
    # an epoch visits every kept pair once, in fewer rows than pairs
    rows = ld._plan(0)
    assert sorted(k for r in rows for k in r) == sorted(ld.examples.tolist())
    assert ld.epoch_len(0) == len(rows) < ld.n
    # prepare's summary counts the same rows, and the padding it removes
    order = ld._order(0)
    st = pair_pack_stats(split, order, CTX, 2)
    assert st["rows_packed"] == len(rows)
    assert st["tokens"] == sum(min(int(split.ids.sizes[i]), CTX + 1) - 1
                               for k in order.tolist() for i in (2 * k, 2 * k + 1))
    assert 0 <= st["pad_share_packed"] < st["pad_share_unpacked"] < 1
    line = packing_line(dpo_prefix, CTX, 2)
    assert "rows of 2 x CTX_LEN = 1024 positions (whole pairs)" in line
    assert "warning" not in line
    # more rows per step than the data packs into: said at prepare, not after the model loads
    many = st["rows_packed"] + 1
    line = packing_line(dpo_prefix, CTX, many)
    assert ("-> 0 steps per epoch" in line and f"make no full step of {many} rows: train "
            "with PACK=0" in line)


# ---- packed loss and gradient == unpacked --------------------------------------------------------

@pytest.fixture(scope="module")
def policy(tiny_model_path):
    """A LoRA model (fp32) whose adapters are moved off zero, and its LossModule."""
    s = cfgmod.Settings(lora_r=8, lora_alpha=16.0, lora_dropout=0.0, precision="fp32")
    pm, _, _ = T.build_model(s, tiny_model_path, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return LossModule(pm, 256, torch.float32, dpo_beta=BETA)


def _loss_and_grads(lm, inputs, splits):
    """Summed loss of micro-batches [(a, b), ...] of `inputs` and the LoRA weights' gradient,
    with the per-answer policy log-probs (by pair) from each call."""
    params = [p for p in lm.parameters() if p.requires_grad]
    total = 0.0
    for a, b in splits:
        loss = lm(*inputs(a, b))
        loss.backward()
        total += float(loss.detach())
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    return total, grads


def _packed_vs_unpacked(lm, dpo_prefix, impl, monkeypatch, reset=True, segments=None):
    """(packed loss, unpacked loss, max relative gradient difference, loss bound) for the
    pairs of one packed batch of two rows, the packed one run as two micro-batches."""
    monkeypatch.setattr(lm.inner(), "wkv_impl", impl)
    monkeypatch.setattr(lm.inner(), "wkv_chunk", 16)  # answers cross chunk edges
    ld = build_train_loader(dpo_prefix, CTX, 2, seed=3, pack=True)
    split = ld.split
    pb = next(ld)
    if not reset:
        pb["reset"] = torch.zeros_like(pb["reset"])
    if segments is not None:
        pb["segment"] = segments(pb["segment"])
    pairs = pb["pair_index"].tolist()
    ub = next(pair_batches(split, pairs, CTX, len(pairs)))
    # reference log-probs: the policy's own (unpacked) +- up to 10 nats, so that the margins
    # (0.1 x that) take both signs without saturating; both batches use the same ones
    ref = reference_logps(lm.model, [ub], split.num_examples) + 20.0 * (torch.rand(
        split.num_examples, 2, dtype=torch.float64,
        generator=torch.Generator().manual_seed(1)) - 0.5)
    dev = torch.device("cpu")
    lu, gu = _loss_and_grads(lm, T.micro_inputs(ub, dev, 1, FTX, ref), [(0, len(pairs))])
    stats_u = lm.last_stats
    lp, gp = _loss_and_grads(lm, T.micro_inputs(pb, dev, 1, FTX, ref), [(0, 1), (1, 2)])
    grad_diff = max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
                    for a, b in zip(gp, gu))
    # fp32 bound. An answer's log-prob is a sum of n <= 512 token log-probs (~11 nats) in the
    # same order either way (the head keeps only the segment's tokens, in row order); each
    # token's value moves by the rounding of the blocks' other batch shapes / chunk edges:
    # tests/test_pack.py measures <= 4e-6 per token. So an answer moves <= 512 x 4e-6 ~ 2e-3
    # nats, a margin <= BETA x 4 x that, each pair's loss as much (|d loss / d margin| <= 1),
    # and DPO_FTX's term by FTX x 2e-3 x chosen answers / chosen tokens (1/n_tok per nat).
    # (pair_scale = 1 / pairs: the DPO part moves <= BETA x 4 x 2e-3 in all)
    bound = BETA * 4 * 2e-3 + FTX * len(pairs) * 2e-3 / float(ub["chosen_loss_mask"].sum())
    return lp, lu, grad_diff, bound, stats_u


IMPLS = ["chunked", "native"]


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_dpo_loss_and_gradient_equal_unpacked(policy, dpo_prefix, impl, monkeypatch):
    if impl == "native" and not W.native_available():
        pytest.skip("the C kernel does not build here")
    lp, lu, grad_diff, bound, stats_u = _packed_vs_unpacked(policy, dpo_prefix, impl,
                                                            monkeypatch)
    assert math.isfinite(lu) and abs(lp - lu) <= bound, (lp, lu, bound)
    # the margins are not saturated: the DPO term has a gradient of its own
    assert 0 < float(stats_u[1]) < float(stats_u[3])
    # gradients: sums over the same tokens of per-token terms that move like the values
    # above (relative ~1e-6); 1e-4 of the largest entry as in tests/test_pack.py
    assert grad_diff < 1e-4, grad_diff


@pytest.mark.parametrize("drop", ["reset", "segment_pairing", "segment_sums"])
def test_dropping_the_reset_or_the_segment_sums_breaks_the_equality(policy, dpo_prefix, drop,
                                                                   monkeypatch):
    """The equality above rests on each part: without the reset the answers see the answers
    before them; with each pair's answers summed as one (chosen = both, rejected = nothing) or
    paired the wrong way round, the loss is another number."""
    over = {"reset": {"reset": False},
            "segment_pairing": {"segments": lambda s: torch.where(s >= 0, s ^ 1, s)},
            "segment_sums": {"segments": lambda s: torch.where(s >= 0, s - s % 2, s)}}[drop]
    lp, lu, _, bound, _ = _packed_vs_unpacked(policy, dpo_prefix, "chunked", monkeypatch,
                                              **over)
    assert abs(lp - lu) > 10 * bound, (drop, lp, lu, bound)


# ---- a training run ------------------------------------------------------------------------------

def test_train_main_with_pack_runs_dpo_against_the_pairs_reference(tiny_model_path, dpo_prefix,
                                                                   tmp_path):
    """`rwkvforge train --pack 1` on the DPO sample, 3 fp32 steps: step 1's policy is the
    starting model, so its loss is ln 2 and its margin 0 against the reference log-probs taken
    unpacked (pair by pair), whatever rows the pairs were packed into; later steps move."""
    args = ["--base-model", str(tiny_model_path), "--data-prefix", str(dpo_prefix),
            "--runs-dir", str(tmp_path), "--run-name", "packed", "--data-type", "dpo",
            "--pack", "1", "--ctx-len", str(CTX), "--micro-bsz", "1", "--grad-accum", "2",
            "--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0", "--lr", "3e-3",
            "--lr-schedule", "constant", "--warmup-steps", "0", "--head-chunk", "256",
            "--log-every", "1", "--eval-every", "0", "--save-every", "0",
            "--precision", "fp32", "--max-steps", "3", "--dpo-ftx", "0.2"]
    assert T.main(args) == 0
    run = tmp_path / "packed"
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # fp32: packed vs the unpacked reference pass moves each answer's log-prob by <= ~2e-3
    # nats (see above), the margin by <= BETA x 4 x that
    assert abs(rows[0]["reward_margin"]) <= BETA * 4 * 2e-3
    assert rows[0]["dpo_loss"] == pytest.approx(math.log(2), abs=BETA * 4 * 2e-3)
    assert rows[-1]["reward_margin"] != 0.0 and all(math.isfinite(r["loss"]) for r in rows)
    log = (run / "train.log").read_text()
    assert "packed rows of pairs" in log

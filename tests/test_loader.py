"""Loader: magic-prime windows (RWKV-LM order), SFT / DPO batches, resume, size errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from rwkvforge.data import loader as L
from rwkvforge.data.binidx import write_binidx
from rwkvforge.data.prepare import Options, run


def brute_magic_prime(tokens: int, ctx: int) -> int | None:
    if tokens < 3 * ctx:
        return None
    cands = [p for p in range(2, tokens // ctx) if p % 3 == 2
             and all(p % d for d in range(2, int(math.isqrt(p)) + 1))]
    return max(cands) if cands else None


def rwkv_lm_offset(epoch: int, idx: int, rank: int, world: int, spe: int, p: int,
                   ctx: int) -> int:
    """RWKV-LM RWKV-v7/train_temp/src/dataset.py sample position, written out."""
    ii = 1 + epoch * spe + idx * world + rank
    factor = int(p * (math.sqrt(5) - 1) / 2)
    return ((factor * ii * ii * ii) % p) * ctx


@pytest.fixture
def text_prefix(tmp_path):
    rng = np.random.default_rng(0)
    docs = [np.append(rng.integers(1, 65530, rng.integers(5, 60)), 0) for _ in range(40)]
    write_binidx(tmp_path / "t", docs)
    return tmp_path / "t", np.concatenate(docs)


def test_magic_prime_rule():
    for tokens in (47, 48, 100, 1000, 4097, 123457):
        for ctx in (4, 16, 31):
            assert L.magic_prime(tokens, ctx) == brute_magic_prime(tokens, ctx)
    assert L.magic_prime(1_000_000, 4096) == 239  # 1e6 // 4096 - 1 = 243 -> 239


def test_text_windows_cover_data_once_per_epoch_in_rwkv_lm_order(text_prefix):
    prefix, stream = text_prefix
    ctx, bsz = 16, 3
    ld = L.build_train_loader(prefix, ctx, bsz, seed=0)  # bare binidx, no meta: text
    p = ld.magic_prime
    assert p == brute_magic_prime(len(stream), ctx)
    offsets = []
    for _ in range(math.ceil(2 * p / bsz)):
        b = next(ld)
        assert b["input_ids"].shape == (bsz, ctx) and b["input_ids"].dtype == torch.long
        assert b["loss_mask"].dtype == torch.float32 and bool((b["loss_mask"] == 1).all())
        for row in range(bsz):
            x = b["input_ids"][row].numpy()
            hits = [o for o in range(0, p * ctx, ctx) if np.array_equal(stream[o:o + ctx], x)]
            assert hits, "window not found in the stream"
            off = L.window_offset(len(offsets), p, ctx)
            assert off in hits
            np.testing.assert_array_equal(b["targets"][row].numpy(), stream[off + 1:off + ctx + 1])
            offsets.append(off)
    first = offsets[:p]
    assert sorted(first) == list(range(0, p * ctx, ctx))  # each window once in epoch 0
    assert sorted(offsets[p:2 * p]) == sorted(first)
    assert first == [rwkv_lm_offset(0, i, 0, 1, p, p, ctx) for i in range(p)]


def test_text_ranks_are_disjoint_and_match_rwkv_lm(text_prefix):
    prefix, _ = text_prefix
    ctx = 16
    seen = []
    for rank in range(2):
        ld = L.build_train_loader(prefix, ctx, 1, rank=rank, world_size=2)
        offs = []
        for idx in range(5):
            e, pos = ld.epoch, ld.pos
            next(ld)
            offs.append(L.window_offset(e * ld.magic_prime + pos, ld.magic_prime, ctx))
            assert offs[-1] == rwkv_lm_offset(0, idx, rank, 2, ld.magic_prime,
                                              ld.magic_prime, ctx)
        seen.append(offs)
    assert not set(seen[0]) & set(seen[1])


def test_resume_gives_the_same_batches(text_prefix):
    prefix, _ = text_prefix
    a = L.build_train_loader(prefix, 16, 2, seed=3)
    for _ in range(7):
        next(a)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON / torch.save
    expect = [next(a) for _ in range(4)]
    b = L.build_train_loader(prefix, 16, 2, seed=3)
    b.load_state_dict(state)
    for e in expect:
        got = next(b)
        assert all(torch.equal(e[k], got[k]) for k in e)
    c = L.build_train_loader(prefix, 32, 2, seed=3)
    with pytest.raises(ValueError, match="ctx_len"):
        c.load_state_dict(state)


def test_too_small_text_is_a_clear_error(tmp_path):
    write_binidx(tmp_path / "s", [[1, 2, 3, 0]] * 10)  # 40 tokens
    with pytest.raises(ValueError, match=r"40 tokens .*ctx_len=16.* 48 tokens.*--repeat 2"):
        L.build_train_loader(tmp_path / "s", 16, 1)
    with pytest.raises(ValueError, match="fewer than one batch"):
        L.build_train_loader(tmp_path / "s", 4, 8)  # p = 8 // ... -> 5 windows < 8


def _sft_data(tmp_path, n=12, val=0.0):
    rows = [{"messages": [{"role": "user", "content": f"Вопрос номер {i}?"},
                          {"role": "assistant", "content": "Ответ " * (i + 1)}]}
            for i in range(n)]
    src = tmp_path / "sft.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    run(Options(input=src, prefix=tmp_path / "sft", data_type="sft", ctx_len=16,
                val_fraction=val, workers=1, progress=False), log=lambda *_: None)
    return tmp_path / "sft"


def test_sft_batches_shift_targets_and_masks(tmp_path):
    prefix = _sft_data(tmp_path)
    split = L.open_split(prefix)
    ctx, bsz = 16, 4
    ld = L.build_train_loader(prefix, ctx, bsz, seed=5)
    seen = []
    for _ in range(3):  # 12 examples = one epoch
        b = next(ld)
        T = b["input_ids"].shape[1]
        assert T <= ctx
        for r in range(bsz):
            x, y, m = (b[k][r].numpy() for k in ("input_ids", "targets", "loss_mask"))
            # which example is this row? (its ids, cut to ctx_len + 1, start the row)
            k = next(i for i in range(split.num_examples)
                     if np.array_equal(split.ids[i][:ctx + 1][:-1],
                                       x[:len(split.ids[i][:ctx + 1]) - 1]))
            ids, mask = split.ids[k][:ctx + 1], split.mask[k][:ctx + 1]
            n = len(ids) - 1
            np.testing.assert_array_equal(x[:n], ids[:-1])
            np.testing.assert_array_equal(y[:n], ids[1:])
            np.testing.assert_array_equal(m[:n], mask[1:])
            assert not m[n:].any() and not x[n:].any()  # padding is masked out
            seen.append(k)
    assert sorted(seen) == list(range(12))  # each example once per epoch
    assert ld._order(1).tolist() != ld._order(0).tolist()  # each epoch reshuffles


def test_sft_pad_to_ctx_and_packing(tmp_path):
    prefix = _sft_data(tmp_path, n=12)
    split = L.open_split(prefix)
    b = next(L.build_train_loader(prefix, 16, 2, pad_to="ctx_len"))
    assert b["input_ids"].shape == (2, 16)
    pk = L.build_train_loader(prefix, 16, 2, seed=1, pack=True)
    plan = pk._plan(0)
    assert sorted(i for row in plan for i in row) == list(range(12))
    for row in plan:  # whole examples only, unless a single example is cut
        assert len(row) == 1 or sum(int(split.ids.sizes[i]) for i in row) <= 17
    b = next(pk)
    first = plan[0]
    expect = np.concatenate([split.ids[i] for i in first])[:17]
    emask = np.concatenate([split.mask[i] for i in first])[:17]
    np.testing.assert_array_equal(b["input_ids"][0, :len(expect) - 1].numpy(), expect[:-1])
    np.testing.assert_array_equal(b["loss_mask"][0, :len(expect) - 1].numpy(), emask[1:])


def test_sft_too_small_and_val(tmp_path):
    prefix = _sft_data(tmp_path, n=6, val=0.34)
    meta = json.loads((tmp_path / "sft.meta.json").read_text())
    n_train = meta["splits"]["train"]["documents"]
    assert n_train == 4
    with pytest.raises(ValueError, match=r"4 examples is fewer than one batch .*micro_bsz=5"):
        L.build_train_loader(prefix, 16, 5)
    val = L.build_val_batches(prefix, 16, 4)
    assert len(val) == 1 and val[0]["input_ids"].shape[0] == 2
    assert float(val[0]["loss_mask"].sum()) > 0
    assert L.build_val_batches(prefix, 16, 4) is not val and all(
        torch.equal(a["input_ids"], b["input_ids"])
        for a, b in zip(val, L.build_val_batches(prefix, 16, 4)))


def test_dpo_batches(tmp_path):
    rows = [{"prompt": f"Напиши процедуру {i}", "chosen": f"Процедура П{i}() КонецПроцедуры",
             "rejected": "не знаю"} for i in range(6)]
    src = tmp_path / "dpo.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    run(Options(input=src, prefix=tmp_path / "dpo", data_type="dpo", ctx_len=32, workers=1,
                progress=False), log=lambda *_: None)
    ld = L.build_train_loader(tmp_path / "dpo", 32, 3, seed=0)
    b = next(ld)
    keys = {f"{s}_{k}" for s in ("chosen", "rejected") for k in ("input_ids", "targets",
                                                                 "loss_mask")}
    assert set(b) == keys | {"pair_index"}
    assert b["chosen_input_ids"].shape == b["rejected_input_ids"].shape
    split = L.open_split(tmp_path / "dpo", "train")
    for r, k in enumerate(b["pair_index"].tolist()):  # row r is pair k: items 2k and 2k + 1
        n = int(split.ids.sizes[2 * k]) - 1
        assert b["chosen_input_ids"][r, :n].tolist() == split.ids[2 * k][:-1].tolist()
    from rwkvforge.tokenizer import get_tokenizer

    tok = get_tokenizer()
    for r in range(3):
        ct = b["chosen_targets"][r][b["chosen_loss_mask"][r] > 0].tolist()
        rt = b["rejected_targets"][r][b["rejected_loss_mask"][r] > 0].tolist()
        assert tok.decode(rt) == " не знаю" and rt[-1] == 0
        assert tok.decode(ct).startswith(" Процедура П")
        # the prompt is the same, unmasked prefix of both rows
        fc = int(b["chosen_loss_mask"][r].nonzero()[0])
        fr = int(b["rejected_loss_mask"][r].nonzero()[0])
        assert fc == fr and fc > 5
        assert torch.equal(b["chosen_input_ids"][r, :fc + 1], b["rejected_input_ids"][r, :fc + 1])
    assert ld.state_dict()["data_type"] == "dpo"


@pytest.mark.parametrize("pack", [False, True])
def test_sft_resume_across_epochs(tmp_path, pack):
    prefix = _sft_data(tmp_path, n=10)
    a = L.build_train_loader(prefix, 16, 3, seed=2, pack=pack)
    for _ in range(4):  # past the end of epoch 0
        next(a)
    state = a.state_dict()
    expect = [next(a) for _ in range(5)]
    b = L.build_train_loader(prefix, 16, 3, seed=2, pack=pack)
    b.load_state_dict(state)
    for e in expect:
        got = next(b)
        assert all(torch.equal(e[k], got[k]) for k in e)
    with pytest.raises(ValueError, match="seed was 2, now 3"):
        L.build_train_loader(prefix, 16, 3, seed=3, pack=pack).load_state_dict(state)


def test_sft_examples_with_nothing_to_train_within_ctx_are_left_out(tmp_path):
    """An example whose assistant tokens all lie past ctx_len would give a zero loss and
    still move the weights: the loader leaves it out and says how many (so does prepare)."""
    long_q = "вопрос " * 80
    rows = [{"prompt": "q1", "response": "a1"}, {"prompt": long_q, "response": "a2"},
            {"prompt": "q3", "response": "a3"}]
    src = tmp_path / "s.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                   encoding="utf-8")
    meta = run(Options(input=src, prefix=tmp_path / "d", data_type="sft", ctx_len=32, workers=1,
                       progress=False), log=lambda *a: None)
    assert meta["untrained_within_ctx"] == 1
    ld = L.build_train_loader(tmp_path / "d", 32, 1, seed=0)
    assert (ld.n, ld.skipped) == (2, 1) and sorted(ld.examples.tolist()) == [0, 2]
    for _ in range(6):  # three epochs: every row trains something
        assert next(ld)["loss_mask"].sum() > 0
    full = L.build_train_loader(tmp_path / "d", 4096, 1, seed=0)  # all fit: order unchanged
    assert full.skipped == 0 and full._order(0).tolist() == np.random.default_rng(
        [0, 0]).permutation(3).tolist()
    with pytest.raises(ValueError, match="none of the 3 examples has a trained"):
        L.build_train_loader(tmp_path / "d", 1, 1, seed=0)


# ---- packing (PACK=1) ----------------------------------------------------------------------------

def test_packed_rows_reset_at_each_example_and_mask_the_boundary(tmp_path):
    """Each packed row = its examples' own (input, target, mask) one after another, with
    reset on each example's first token and the target that crosses into the next example
    masked out (the model check of the same rows is tests/test_pack.py)."""
    prefix = _sft_data(tmp_path, n=30)
    split = L.open_split(prefix)
    ctx = 128
    ld = L.build_train_loader(prefix, ctx, 2, seed=4, pack=True)
    plan = ld._plan(0)
    assert sorted(i for row in plan for i in row) == list(range(30))  # each example once
    assert max(split.ids.sizes) <= ctx + 1  # (none is cut)
    assert max(len(r) for r in plan) > 2 and len(plan) < 30 / 2
    pos = 0
    for _ in range(len(plan) // 2):
        b = next(ld)
        assert set(b) == {"input_ids", "targets", "loss_mask", "reset"}
        assert b["reset"].dtype == torch.bool and b["input_ids"].shape == (2, ctx)
        for r in range(2):
            x, y, m, rs = (b[k][r].numpy() for k in ("input_ids", "targets", "loss_mask", "reset"))
            t = 0
            for i in plan[pos]:
                ids, mask = split.ids[i], split.mask[i]
                n = len(ids)
                np.testing.assert_array_equal(x[t:t + n - 1], ids[:-1])
                np.testing.assert_array_equal(y[t:t + n - 1], ids[1:])
                np.testing.assert_array_equal(m[t:t + n - 1], mask[1:])
                assert rs[t] and not rs[t + 1:t + n].any()
                if t + n - 1 < ctx:  # the example's final 0 predicts the next example
                    assert m[t + n - 1] == 0
                t += n
            assert not m[t:].any()  # row padding is masked
            pos += 1


def test_plan_packing_fills_rows_with_whole_examples():
    rng = np.random.default_rng(0)
    sizes = np.minimum(rng.lognormal(4.0, 1.0, 500).astype(int) + 2, 600)
    cap = 513
    rows = L.plan_packing(sizes.tolist(), cap)
    assert sorted(i for r in rows for i in r) == list(range(500))
    assert all(sum(min(int(sizes[i]), cap) for i in r) <= cap for r in rows)
    assert all(r == sorted(r) for r in rows)  # the given order is kept inside a row
    st = L.pack_stats(sizes, cap - 1, micro_bsz=8)
    # every row but a few is nearly full: the packed padding share is small and far below
    # padding 8 rows to their longest
    assert st["pad_share_packed"] < 0.1 < 0.5 < st["pad_share_unpacked"]
    assert st["rows_packed"] == len(rows)
    assert st["tokens"] == int((np.minimum(sizes, cap) - 1).sum())


def test_pack_builds_reset_rows_and_checks_the_data_type(tmp_path):
    # (PACK=1 refuses nothing now: DPO in tests/test_pack_dpo.py, state in test_pack_state.py)
    from types import SimpleNamespace as NS

    prefix = _sft_data(tmp_path, n=12)
    s = NS(pack=True, data_type="sft", ctx_len=64, seed=0, micro_bsz=2)
    loader, _ = L.build_loaders(s, prefix, 2, 1, 1, say=lambda *_: None)
    assert loader.pack and "reset" in next(loader)
    with pytest.raises(ValueError, match="DATA_TYPE=dpo"):
        L.build_loaders(NS(**{**vars(s), "data_type": "dpo"}), prefix, 2, 1, 1)

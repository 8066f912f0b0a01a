"""DPO training (DATA_TYPE=dpo): the loss, the reference log-probs, batching invariance, a
learning run on the shipped preference sample, resume, and the refusals.

Runs use the tiny fixture model (L2 C128, real 65536 vocabulary) and data/samples/bsl_dpo.jsonl
prepared into a temporary folder; one torch thread per process.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sample_data import prepare_sample
from rwkvforge import config as cfgmod
from rwkvforge import loss as L
from rwkvforge import dpo as D
from rwkvforge import train as T
from rwkvforge import upstream as U

ROOT = Path(__file__).resolve().parents[1]
LN2 = math.log(2.0)
FAST_BETA = 0.1  # DPO_BETA's default
FAST = {"data_type": "dpo", "ctx_len": 160, "micro_bsz": 2, "grad_accum": 1, "lora_r": 8,
        "lora_alpha": 16, "warmup_steps": 0, "head_chunk": 256, "log_every": 1,
        "eval_every": 0, "save_every": 0, "precision": "fp32", "lr_schedule": "constant"}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def dpo_prefix(tmp_path_factory):
    """The shipped DPO sample, prepared (15% of the pairs held out)."""
    return prepare_sample(tmp_path_factory, "bsl_dpo", "dpo", 0.15)


def resolved(model_path, prefix, runs, **over):
    cli = {"base_model": str(model_path), "data_prefix": str(prefix), "runs_dir": str(runs),
           **FAST, **over}
    return cfgmod.resolve(cli=cli, env={}, root=ROOT)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def margin_tolerance(run_dir: Path, loss: str = "sigmoid") -> float:
    """How far two fp32 runs' reward margins may differ when they batch the same pairs
    differently. A DPO margin is beta x ((pi_c - ref_c) - (pi_r - ref_r)): four sequence
    log-probs of ~1e3 nats each (100+ tokens of ~11 nats), each an fp32 sum where one ulp is
    ~6e-5; other row groupings (the reference pass too) and gradient sums in another order
    move them by a few ulps. So: 8 ulps of the largest log-prob, times beta; not relative.
    SimPO keeps no reference file: its log-probs are bounded by CTX_LEN (160) x ~12.5 nats
    (the random model is near uniform over 65536 tokens, ln 65536 = 11.1) = 2e3."""
    ref = torch.load(run_dir / D.REFERENCE, weights_only=True)["train"] \
        if loss == "sigmoid" else torch.tensor([FAST["ctx_len"] * 12.5])
    return 8 * float(ref[~ref.isnan()].abs().max()) * 2.0 ** -23 * FAST_BETA


# ------------------------------------------------------------------------------ units
def test_dpo_loss_is_the_published_formula():
    pol = torch.tensor([[-10.0, -12.0], [-5.0, -4.0], [-7.0, -7.0]])
    ref = torch.tensor([[-11.0, -11.0], [-5.0, -5.0], [-6.0, -8.0]])
    losses, margin = L.dpo_losses(pol, ref, beta=0.5)
    # beta * ((pi_c - ref_c) - (pi_r - ref_r)) = 0.5 * ((1) - (-1)), 0.5 * (0 - 1), 0.5 * (-1 - 1)
    assert margin.tolist() == pytest.approx([1.0, -0.5, -1.0])
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-m)) for m in (1.0, -0.5, -1.0)])
    same, m0 = L.dpo_losses(pol, pol, beta=3.0)  # the model as its own reference: ln 2
    assert same.tolist() == pytest.approx([LN2] * 3) and m0.abs().max() == 0


def test_simpo_loss_is_reference_free_and_length_normalised():
    pol = torch.tensor([[-10.0, -30.0], [-8.0, -4.0]])
    lengths = torch.tensor([[5, 10], [4, 1]])
    losses, margin = L.dpo_losses(pol, None, beta=2.0, kind="simpo", gamma=0.5,
                                  lengths=lengths)
    # beta * (pi_c / n_c - pi_r / n_r): 2 * (-2 - -3) = 2, 2 * (-2 - -4) = 4
    assert margin.tolist() == pytest.approx([2.0, 4.0])
    assert losses.tolist() == pytest.approx([math.log1p(math.exp(-(m - 0.5)))
                                             for m in (2.0, 4.0)])


def test_sequence_logps_sum_the_masked_token_log_probs(tiny_model):
    torch.manual_seed(0)
    x = torch.randint(0, 65536, (3, 20))
    y = torch.randint(0, 65536, (3, 20))
    mask = (torch.rand(3, 20) > 0.4).float()
    mask[2] = 0  # a row with nothing trained has log-prob 0
    hidden, _ = tiny_model.forward_hidden(x)
    hidden = hidden.detach().requires_grad_(True)
    got = L.sequence_logps(hidden, tiny_model.head, y, mask, chunk=7)
    lp = F.log_softmax(tiny_model.head(hidden).float(), -1).gather(-1, y[..., None])[..., 0]
    want = (lp * mask).sum(1)
    assert got.tolist() == pytest.approx(want.tolist(), rel=1e-5, abs=1e-4)
    assert got[2].item() == 0.0
    # the gradient flows per row: d(row 0 - 2 * row 1)/dh equals the dense one
    (g,) = torch.autograd.grad(got[0] - 2 * got[1], hidden)
    (g_want,) = torch.autograd.grad(want[0] - 2 * want[1], hidden)
    torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-6)


def test_pairs_with_an_answer_past_ctx_len_are_left_out(dpo_prefix):
    from rwkvforge.data.loader import build_train_loader, open_split

    split = open_split(dpo_prefix, "train")
    full = build_train_loader(dpo_prefix, ctx_len=4096, micro_bsz=2, seed=1)
    assert full.skipped == 0 and full.n == split.num_examples
    short = build_train_loader(dpo_prefix, ctx_len=40, micro_bsz=2, seed=1)
    assert 0 < short.skipped < split.num_examples
    for k in short.examples.tolist():  # both answers of every kept pair train something
        assert split.mask[2 * k][1:41].any() and split.mask[2 * k + 1][1:41].any()
    batch = next(short)
    assert set(batch["pair_index"].tolist()) <= set(short.examples.tolist())
    assert batch["chosen_input_ids"].shape == batch["rejected_input_ids"].shape
    with pytest.raises(ValueError, match="none of the .* pairs has a trained token in both"):
        build_train_loader(dpo_prefix, ctx_len=16, micro_bsz=2, seed=1)


# ------------------------------------------------------------------------------ runs
def test_dpo_run_learns_the_preference(tiny_model_path, dpo_prefix, tmp_path):
    """Before training the model is its own reference: the held-out DPO loss is ln 2 exactly.
    A short run moves it below ln 2 - 0.05 on held-out pairs, and the run folder holds the
    reference log-probs, reward metrics and an adapter."""
    run = tmp_path / "dpo"
    out = T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=12, lr=3e-3,
                             micro_bsz=4), run, root=ROOT, progress=False).run()
    assert out.val_loss_start == pytest.approx(LN2, abs=1e-6)
    assert out.val_loss_end < LN2 - 0.05, out.val_loss_end
    rows = metrics(run)
    assert rows[0]["loss"] == pytest.approx(LN2, abs=1e-5)  # step 1: policy == reference
    assert rows[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    assert all({"reward_acc", "reward_margin"} <= set(r) for r in rows)
    assert sum(r["reward_acc"] for r in rows[-4:]) / 4 > 0.5
    assert rows[-1]["val_reward_acc"] >= 0.5 and rows[-1]["val_loss"] == pytest.approx(
        out.val_loss_end, abs=1e-6)
    ref = torch.load(run / D.REFERENCE, weights_only=True)
    assert ref["train"].dtype == torch.float64 and (ref["train"][~ref["train"].isnan()] < 0).all()
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert "DPO: reference log-probs of" in (run / "train.log").read_text()


def test_simpo_run_needs_no_reference_and_learns(tiny_model_path, dpo_prefix, tmp_path):
    """DPO_LOSS=simpo: no reference pass and no reference file; the rewards are the policy's
    own length-normalised log-probs, so the margin starts away from 0 and grows."""
    run = tmp_path / "simpo"
    out = T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=12, lr=3e-3,
                             micro_bsz=4, dpo_loss="simpo", dpo_beta=2.0, simpo_gamma=0.5),
                    run, root=ROOT, progress=False).run()
    assert not (run / D.REFERENCE).exists()
    log = (run / "train.log").read_text()
    assert "no reference model" in log and "reference log-probs" not in log
    rows = metrics(run)
    assert rows[0]["reward_margin"] != 0.0
    first, last = (sum(r["reward_margin"] for r in rows[i:i + 4]) / 4 for i in (0, 8))
    assert last > first + 0.1, (first, last)
    assert out.val_loss_end < out.val_loss_start, (out.val_loss_start, out.val_loss_end)


@pytest.mark.parametrize("compile_", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_an_unchanged_model_is_exactly_its_own_reference_in_bf16(tiny_model_path, dpo_prefix,
                                                                 tmp_path, compile_):
    """LR 0 in bf16, eager or compiled: every step's policy log-probs equal the reference's,
    so the loss is ln 2 and the margin 0 at every step, even at a large beta (the reference
    is taken by the code path the policy takes, not the faster inference forward)."""
    run = tmp_path / "lr0"
    T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=3, lr=0.0,
                       lr_final=0.0, micro_bsz=1, precision="bf16", dpo_beta=10.0,
                       compile=compile_), run, root=ROOT, progress=False).run()
    rows = metrics(run)
    assert [r["loss"] for r in rows] == pytest.approx([LN2] * 3, abs=1e-6)
    assert [r["reward_margin"] for r in rows] == [0.0] * 3
    assert rows[-1]["val_loss"] == pytest.approx(LN2, abs=1e-6)


@pytest.mark.parametrize("loss", ["sigmoid", "simpo"])
def test_dpo_gradient_is_independent_of_the_micro_batch_split(tiny_model_path, dpo_prefix,
                                                             tmp_path, loss):
    """MICRO_BSZ 2 x GRAD_ACCUM 1 == MICRO_BSZ 1 x GRAD_ACCUM 2, with the chosen-answer
    cross-entropy on (DPO_FTX): pairs and chosen tokens are normalised over the whole step."""
    kw = dict(max_steps=3, lr=3e-3, dpo_ftx=0.5, lora_dropout=0.0, dpo_loss=loss)
    a = T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, micro_bsz=2, grad_accum=1,
                           **kw), tmp_path / "a", root=ROOT, progress=False)
    a.run()
    b = T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, micro_bsz=1, grad_accum=2,
                           **kw), tmp_path / "b", root=ROOT, progress=False)
    b.run()
    la, lb = metrics(tmp_path / "a"), metrics(tmp_path / "b")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=2e-5, abs=2e-5)
    assert [r["reward_margin"] for r in la] == pytest.approx(
        [r["reward_margin"] for r in lb], abs=margin_tolerance(tmp_path / "a", loss))
    assert la[-1]["reward_margin"] != 0.0


def test_dpo_ftx_adds_the_chosen_answers_cross_entropy(tiny_model_path, dpo_prefix, tmp_path):
    """At the first step (policy == reference) the loss is ln 2 + DPO_FTX x the mean
    cross-entropy of the chosen answers' trained tokens, measured separately."""
    losses = {}
    for ftx in (0.0, 2.0):
        tr = T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=1,
                                dpo_ftx=ftx), tmp_path / f"f{ftx}", root=ROOT, progress=False)
        tr.setup()
        batch = next(tr.loader)
        losses[ftx] = tr._micro_steps(batch)
    chosen = {k[len("chosen_"):]: v for k, v in batch.items() if k.startswith("chosen_")}
    ce = L.evaluate_loss(tr.model, [chosen], head_chunk=256)
    assert losses[0.0] == pytest.approx(LN2, abs=1e-5)
    assert losses[2.0] == pytest.approx(LN2 + 2.0 * ce, rel=1e-5)


def test_dpo_resume_reuses_the_reference_and_continues_exactly(tiny_model_path, dpo_prefix,
                                                               tmp_path):
    """An interrupted DPO run resumes from its checkpoint with the reference log-probs it
    computed at the start (not the trained model's): the losses equal an uninterrupted run's.
    Without that file a resume is refused."""
    kw = dict(max_steps=4, save_every=2, lr=3e-3, lora_dropout=0.1)
    T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, **kw), tmp_path / "full",
              root=ROOT, progress=False).run()

    def stop(step, index, micro_bsz):
        if step == 3:
            raise KeyboardInterrupt

    run = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, **kw), run, root=ROOT,
                  progress=False, on_micro_batch=stop).run()
    T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, **kw), run, root=ROOT,
              progress=False, resume=True).run()
    got, want = metrics(run), metrics(tmp_path / "full")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    assert [r["loss"] for r in got] == [r["loss"] for r in want]
    assert [r["reward_margin"] for r in got] == [r["reward_margin"] for r in want]

    (run / D.REFERENCE).unlink()
    with pytest.raises(T.TrainError, match="reference_logps.pt is missing"):
        T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, **{**kw, "max_steps": 6}),
                  run, root=ROOT, progress=False, resume=True).run()


def test_dpo_refusals(tiny_model_path, dpo_prefix, tmp_path):
    with pytest.raises(T.TrainError, match="set DEEPSPEED_STAGE=2"):
        T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=1,
                           deepspeed_stage=3), tmp_path / "z3", root=ROOT,
                  progress=False).setup()
    from rwkvforge.model.rwkv7 import RWKV7Config

    s = resolved(tiny_model_path, dpo_prefix, tmp_path, trainer="rwkv-peft").settings
    with pytest.raises(U.UpstreamError, match="use TRAINER=builtin for DPO"):
        U.rwkv_peft_command(s, tiny_model_path, dpo_prefix, RWKV7Config.suggested(2, 128),
                            tmp_path / "x", tmp_path / "RWKV-PEFT")


@pytest.mark.slow
def test_dpo_under_deepspeed_two_processes_matches_one(tiny_model_path, dpo_prefix, tmp_path):
    """ZeRO-2 over gloo, 2 processes x 1 pair == 1 process x 2 pairs: the same losses and
    reward margins every step (each process computes the same reference log-probs)."""
    import subprocess
    import sys

    from test_train import sub_env

    def cmd(name, *extra):
        return [sys.executable, "-m", "rwkvforge.train", "--base-model", str(tiny_model_path),
                "--data-prefix", str(dpo_prefix), "--runs-dir", str(tmp_path), "--run-name",
                name, "--no-progress", "--max-steps=3", "--lr=3e-3", "--dpo-ftx=0.5",
                *[f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()
                  if k not in ("micro_bsz",)], *extra]

    env = sub_env()
    for name, extra in (("one", ("--micro-bsz=2",)),
                        ("two", ("--micro-bsz=1", "--deepspeed-stage=2", "--num-gpus=2"))):
        p = subprocess.run(cmd(name, *extra), env=env, capture_output=True, text=True,
                           timeout=900)
        assert p.returncode == 0, p.stderr[-4000:]
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert len(a) == len(b) == 3
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-4)
    assert [r["reward_acc"] for r in b] == [r["reward_acc"] for r in a]
    assert [r["reward_margin"] for r in b] == pytest.approx([r["reward_margin"] for r in a],
                                                            abs=margin_tolerance(tmp_path / "one"))
    assert json.loads((tmp_path / "two" / "config.json").read_text())["training"][
        "world_size"] == 2


def test_data_of_the_other_type_is_a_clear_error(tiny_model_path, dpo_prefix, tmp_path):
    sft = prepare_sample_sft(tmp_path)
    with pytest.raises(T.TrainError, match="holds preference pairs .dpo.* pass --data-type dpo"):
        T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=1,
                           data_type="sft"), tmp_path / "a", root=ROOT, progress=False).setup()
    with pytest.raises(T.TrainError, match="holds sft .* DATA_TYPE=dpo: pass --data-type sft"):
        T.Trainer(resolved(tiny_model_path, sft, tmp_path, max_steps=1), tmp_path / "b",
                  root=ROOT, progress=False).setup()


def prepare_sample_sft(tmp_path: Path) -> Path:
    from rwkvforge.data.prepare import Options, run
    from rwkvforge.paths import sample_data_dir

    out = tmp_path / "sft" / "bsl_sft"
    run(Options(input=sample_data_dir() / "bsl_sft.jsonl", prefix=out, data_type="sft",
                val_fraction=0.1, workers=1, progress=False), log=lambda *a: None)
    return out


def test_a_top_level_system_field_opens_the_dpo_prompt(tmp_path):
    from rwkvforge.data.loader import open_split
    from rwkvforge.data.prepare import Options, run
    from rwkvforge.tokenizer import get_tokenizer

    src = tmp_path / "p.jsonl"
    src.write_text(json.dumps({"system": "Be brief.", "prompt": "q", "chosen": "good answer",
                               "rejected": "bad"}) + "\n", encoding="utf-8")
    run(Options(input=src, prefix=tmp_path / "p", data_type="dpo", val_fraction=0.0, workers=1,
                progress=False), log=lambda *a: None)
    split = open_split(tmp_path / "p", "train")
    tok = get_tokenizer()
    assert tok.decode(split.ids[0].tolist()).startswith("System: Be brief.\n\nUser: q")
    assert tok.decode(split.ids[1].tolist()).startswith("System: Be brief.\n\nUser: q")
    bad = tmp_path / "b.jsonl"
    bad.write_text(json.dumps({"system": "s", "prompt": [{"role": "system", "content": "t"},
                                                         {"role": "user", "content": "q"}],
                               "chosen": "a", "rejected": "b"}) + "\n", encoding="utf-8")
    from rwkvforge.data.prepare import PrepareError

    with pytest.raises(PrepareError, match="top-level 'system' field and a system message"):
        run(Options(input=bad, prefix=tmp_path / "b", data_type="dpo", workers=1, progress=False),
            log=lambda *a: None)


def test_resume_refuses_a_reference_of_other_data(tiny_model_path, tmp_path):
    """Data prepared again under the same prefix (here: chosen and rejected swapped) after
    the run started: the kept reference log-probs belong to the old data, so a resume stops."""
    from rwkvforge.data.prepare import Options, run
    from rwkvforge.paths import sample_data_dir

    lines = (sample_data_dir() / "bsl_dpo.jsonl").read_text(encoding="utf-8").splitlines()
    src, prefix = tmp_path / "pairs.jsonl", tmp_path / "data" / "pairs"

    def prepare(recs):
        src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs),
                       encoding="utf-8")
        run(Options(input=src, prefix=prefix, data_type="dpo", val_fraction=0.1, workers=1,
                    progress=False), log=lambda *a: None)

    recs = [json.loads(x) for x in lines]
    prepare(recs)
    kw = dict(max_steps=2, save_every=1)
    run_dir = tmp_path / "r"
    T.Trainer(resolved(tiny_model_path, prefix, tmp_path, **kw), run_dir, root=ROOT,
              progress=False).run()
    prepare([{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in recs])
    with pytest.raises(T.TrainError, match="was computed for other data"):
        T.Trainer(resolved(tiny_model_path, prefix, tmp_path, **{**kw, "max_steps": 3}),
                  run_dir, root=ROOT, progress=False, resume=True).run()


def test_dpo_ftx_runs_log_the_dpo_loss_alone(tiny_model_path, dpo_prefix, tmp_path):
    """DPO_FTX adds the chosen answers' cross-entropy to the training loss; the row also
    holds the DPO part alone, the one the (DPO-only) validation loss compares with."""
    run = tmp_path / "ftx"
    out = T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=1, dpo_ftx=1.0),
                    run, root=ROOT, progress=False).run()
    row = metrics(run)[0]
    assert row["dpo_loss"] == pytest.approx(LN2, abs=1e-5) and row["loss"] > LN2 + 1.0
    assert out.val_loss_start == pytest.approx(LN2, abs=1e-6)  # validation: DPO alone


def test_the_reference_pass_is_never_silent_for_long(tiny_model_path, dpo_prefix, tmp_path,
                                                     capsys, monkeypatch):
    """Not a terminal: plain lines count the reference pass's batches (EVERY_S shrunk below
    the tiny model's pass), train and val pairs together, up to all of them."""
    from rwkvforge import progress

    monkeypatch.setattr(progress, "EVERY_S", 0.005)
    T.Trainer(resolved(tiny_model_path, dpo_prefix, tmp_path, max_steps=1), tmp_path / "r",
              root=ROOT, progress=False).run()
    lines = [x for x in capsys.readouterr().err.splitlines()
             if x.startswith("DPO reference pass: ")]
    meta = json.loads(Path(f"{dpo_prefix}.meta.json").read_text())
    n = (-(-meta["splits"]["train"]["documents"] // FAST["micro_bsz"])
         + -(-meta["splits"]["val"]["documents"] // FAST["micro_bsz"]))
    assert lines and lines[-1].startswith(f"DPO reference pass: {n}/{n} batch (100%)")

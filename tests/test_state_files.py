"""The state folder a state-tuning run writes, read by the runtimes it is for: the real `rwkv`
pip package (RWKV_V7_ON=1) given rwkv_pip_state.pt gives our model + state's logits; state.pth
loaded the way RWKV-Runner loads it gives the same; state.st is what `rwkvforge export
--format ai00 --state state.pth` writes; bad state files are refused with what to do."""

from __future__ import annotations

import copy

import pytest
import torch

from rwkvforge import export as E
from rwkvforge import state_tuning as ST
from rwkvforge.checkpoint import load_model, save_pth
from rwkvforge.demo import make_random_model_sd
from test_model import TOKS, _rwkv_pip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """(model path, state folder, the state (L,H,N,N)) on a random 3-layer model."""
    tmp = tmp_path_factory.mktemp("state_files")
    path = save_pth(make_random_model_sd(3, 128, seed=7, dim_ffn=320), tmp / "m.pth")
    g = torch.Generator().manual_seed(5)
    wkv = torch.randn(3, 2, 64, 64, generator=g) * 0.5
    (tmp / "state").mkdir()
    ST.save_state(tmp / "state", wkv, {"step": 1})
    return path, tmp / "state", wkv


def ours(path, state_path, toks):
    model = load_model(path)
    ST.load_state_into(model, state_path)
    with torch.no_grad():
        logits, _ = model(torch.tensor([toks]))
    return logits[0]


def test_rwkv_pip_forward_with_the_exported_state_matches_ours(tuned):
    path, folder, wkv = tuned
    ref = _rwkv_pip()(str(path)[: -len(".pth")], strategy="cpu fp32")
    state = torch.load(folder / ST.RWKV_PIP_STATE, weights_only=True)
    plain, _ = ref.forward(TOKS, None, full_output=True)
    theirs, _ = ref.forward(TOKS, copy.deepcopy(state), full_output=True)
    mine = ours(path, folder, TOKS)
    assert (theirs - plain).abs().max() > 1e-2  # the state matters to rwkv pip too
    torch.testing.assert_close(mine, theirs, atol=2e-5, rtol=1e-5)
    # a transposed state (the fla layout) would not match: the layout is checked, not assumed
    bad = [t.transpose(-1, -2).contiguous() if t.dim() == 3 else t for t in state]
    wrong, _ = ref.forward(TOKS, bad, full_output=True)
    assert (wrong - mine).abs().max() > 1e-3


def test_state_pth_loaded_as_rwkv_runner_does(tuned):
    """RWKV-Runner backend-python/utils/rwkv.py load_rwkv_state: exactly n_layer entries, the
    first one's shape[0] * shape[1] == n_embd, and (RWKV-7) each blocks.{i}.att.time_state
    used as rwkv pip's state[3i+1] as it is, between zero token-shift vectors."""
    path, folder, wkv = tuned
    raw = torch.load(folder / ST.STATE_PTH, map_location="cpu", weights_only=True)
    shape = next(iter(raw.values())).shape
    assert len(raw) == 3 and shape[0] * shape[1] == 128
    ref = _rwkv_pip()(str(path)[: -len(".pth")], strategy="cpu fp32")
    state = []
    for i in range(3):
        state += [torch.zeros(128), raw[f"blocks.{i}.att.time_state"].float().contiguous(),
                  torch.zeros(128)]
    theirs, _ = ref.forward(TOKS, state, full_output=True)
    torch.testing.assert_close(ours(path, folder / ST.STATE_PTH, TOKS), theirs,
                               atol=2e-5, rtol=1e-5)


def test_ai00_state_is_what_export_writes(tuned):
    from safetensors.torch import load_file

    _, folder, wkv = tuned
    st = load_file(str(folder / ST.AI00_STATE))
    want = E.ai00_state_dict(E.read_state_file(folder / ST.STATE_PTH, 3, 2, 64))
    assert st.keys() == want.keys()
    for k in want:
        assert torch.equal(st[k], want[k]), k


def test_read_state_resolves_folders_and_refuses_bad_files(tuned, tmp_path):
    path, folder, wkv = tuned
    run = tmp_path / "run"
    (run / "state").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "state" / f.name).write_bytes(f.read_bytes())
    for p in (run, run / "state", folder / ST.STATE_PTH, folder / ST.RWKV_PIP_STATE):
        assert torch.equal(ST.read_state(p), wkv), p
    # RWKV-PEFT's checkpoint names (with a model. prefix from its lightning module)
    torch.save({f"model.blocks.{i}.att.time_state": wkv[i] for i in range(3)}, tmp_path / "p.pth")
    assert torch.equal(ST.read_state(tmp_path / "p.pth"), wkv)
    cfg = load_model(path).config
    cases = [
        ({"blocks.0.att.time_state": wkv[0]}, "takes \\(3, 2, 64, 64\\)"),
        ({"emb.weight": torch.zeros(3)}, "expected blocks.0..N.att.time_state"),
        ({f"blocks.{i}.att.time_state": wkv[i] * float("nan") for i in range(3)}, "NaN"),
    ]
    for i, (obj, msg) in enumerate(cases):
        torch.save(obj, tmp_path / f"bad{i}.pth")
        with pytest.raises(ST.StateError, match=msg):
            ST.read_state(tmp_path / f"bad{i}.pth", cfg)
    (tmp_path / "junk.pth").write_bytes(b"not a pickle")
    with pytest.raises(ST.StateError, match="cannot be read"):
        ST.read_state(tmp_path / "junk.pth")
    with pytest.raises(ST.StateError, match="no state/state.pth"):
        ST.read_state(tmp_path / "empty_dir" if (tmp_path / "empty_dir").mkdir() is None
                      else None)
    with pytest.raises(ST.StateError, match="no such file"):
        ST.read_state(tmp_path / "missing")

"""checkpoint.py (model part): loading BlinkDL .pth files, clear errors, atomic writes."""

from __future__ import annotations

import os

import pytest
import torch

from rwkvforge import checkpoint as ckpt
from rwkvforge.checkpoint import CheckpointError, atomic_dir, infer_config, load_model, load_state_dict, save_pth
from rwkvforge.demo import make_random_model_sd


@pytest.fixture(scope="module")
def small_sd():
    return make_random_model_sd(2, 64, head_size=32, seed=3, dim_ffn=192, vocab_size=65536)


def _write(tmp_path, obj, name="m.pth"):
    path = tmp_path / name
    torch.save(obj, path)
    return path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_loads_every_float_dtype(tmp_path, small_sd, dtype):
    path = save_pth({k: v.to(dtype) for k, v in small_sd.items()}, tmp_path / "m.pth")
    model = load_model(path)
    assert model.head.weight.dtype == torch.float32
    torch.testing.assert_close(model.emb.weight, small_sd["emb.weight"].to(dtype).float())
    logits, _ = model(torch.tensor([[1, 2, 3]]))
    assert torch.isfinite(logits).all()


def test_infer_config_reads_every_shape(small_sd):
    cfg = infer_config(small_sd)
    assert (cfg.vocab_size, cfg.n_layer, cfg.n_embd, cfg.head_size, cfg.n_head) == (65536, 2, 64, 32, 2)
    assert cfg.dim_ffn == 192
    assert (cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate) == (
        small_sd["blocks.0.att.w1"].shape[1], small_sd["blocks.0.att.a1"].shape[1],
        small_sd["blocks.1.att.v1"].shape[1], small_sd["blocks.0.att.g1"].shape[1],
    )


def test_round_trip_keeps_every_tensor(tmp_path, small_sd):
    path = save_pth(small_sd, tmp_path / "sub" / "m.pth")
    model = load_model(path)
    out = model.state_dict()
    assert set(out) == set(small_sd)
    for k in small_sd:
        assert torch.equal(out[k], small_sd[k]), k
    assert [p.name for p in path.parent.iterdir()] == ["m.pth"]  # no temp files left behind
    assert oct(path.stat().st_mode & 0o777) != oct(0o600)  # normal permissions, not mkstemp's


def test_layer0_value_residual_keys_and_squeezed_vectors_are_accepted(tmp_path, small_sd):
    sd = dict(small_sd)
    sd["blocks.0.att.v0"] = torch.zeros(1, 1, 64)  # some exports carry unused layer-0 v0/v1/v2
    sd["blocks.1.att.x_r"] = sd["blocks.1.att.x_r"].reshape(64)  # (C,) instead of (1,1,C)
    model = load_model(_write(tmp_path, sd))
    assert "blocks.0.att.v0" not in model.state_dict()
    assert model.blocks[1].att.x_r.shape == (1, 1, 64)


@pytest.mark.parametrize(
    "key, family",
    [
        ("blocks.0.att.time_first", "RWKV-4"),
        ("blocks.0.att.time_faaaa", "RWKV-5"),
        ("blocks.0.att.time_maa_x", "RWKV-6"),
    ],
)
def test_older_rwkv_versions_are_named(tmp_path, key, family):
    sd = {"emb.weight": torch.zeros(10, 8), key: torch.zeros(8), "head.weight": torch.zeros(10, 8)}
    with pytest.raises(CheckpointError, match=family) as e:
        load_state_dict(_write(tmp_path, sd))
    assert "RWKV-7" in str(e.value) and "m.pth" in str(e.value)


def test_truncated_file(tmp_path, small_sd):
    path = save_pth(small_sd, tmp_path / "m.pth")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointError, match="truncated"):
        load_state_dict(path)


def test_not_a_dict_and_not_tensors(tmp_path):
    with pytest.raises(CheckpointError, match="holds a list"):
        load_state_dict(_write(tmp_path, [torch.zeros(2)]))
    with pytest.raises(CheckpointError, match="'step' is a int"):
        load_state_dict(_write(tmp_path, {"emb.weight": torch.zeros(2, 2), "step": 3}, "b.pth"))


def test_missing_file_and_missing_keys(tmp_path, small_sd):
    with pytest.raises(CheckpointError, match="not found.*demo-model"):
        load_state_dict(tmp_path / "rwkv7-tiny-demo.pth")
    sd = {k: v for k, v in small_sd.items() if k != "blocks.1.ffn.value.weight"}
    with pytest.raises(CheckpointError, match=r"missing 1 RWKV-7 tensor\(s\): blocks\.1\.ffn\.value\.weight"):
        load_model(_write(tmp_path, sd))
    sd = {k: v for k, v in small_sd.items() if k != "blocks.0.att.r_k"}
    with pytest.raises(CheckpointError, match="blocks.0.att.r_k"):
        load_model(_write(tmp_path, sd, "c.pth"))


def test_integer_tensor_and_wrong_shape(tmp_path, small_sd):
    sd = dict(small_sd)
    sd["blocks.1.att.w0"] = torch.zeros(1, 1, 64, dtype=torch.int64)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.w0 has dtype torch\.int64"):
        load_model(_write(tmp_path, sd))
    sd = dict(small_sd)
    sd["blocks.1.att.key.weight"] = torch.zeros(64, 32)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.att\.key\.weight has shape \(64, 32\), expected \(64, 64\)"):
        load_model(_write(tmp_path, sd, "d.pth"))
    sd = dict(small_sd)
    sd["blocks.5.att.w0"] = torch.zeros(1, 1, 64)
    with pytest.raises(CheckpointError, match=r"layer\(s\) \[2, 3, 4\]"):
        load_model(_write(tmp_path, sd, "e.pth"))


def test_save_is_atomic_when_writing_fails(tmp_path, small_sd, monkeypatch):
    path = save_pth({"a": torch.ones(3)}, tmp_path / "m.pth")
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_pth(small_sd, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["m.pth"]


def test_save_writes_views_compactly(tmp_path):
    big = torch.zeros(1000, 100)
    path = save_pth({"row": big[3]}, tmp_path / "v.pth")
    assert path.stat().st_size < 10_000
    assert torch.load(path, weights_only=True)["row"].shape == (100,)


def test_atomic_dir(tmp_path):
    final = tmp_path / "step-1"
    with atomic_dir(final) as d:
        assert d.name == "step-1.tmp"
        (d / "x.txt").write_text("one")
    assert (final / "x.txt").read_text() == "one" and not (tmp_path / "step-1.tmp").exists()
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "x.txt").write_text("two")
            raise RuntimeError("crash")
    assert (final / "x.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]
    with atomic_dir(final) as d:
        (d / "x.txt").write_text("three")
    assert (final / "x.txt").read_text() == "three"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-1"]


def test_atomic_write_bytes(tmp_path):
    p = ckpt.atomic_write_bytes(tmp_path / "a" / "f.bin", b"abc")
    assert p.read_bytes() == b"abc" and os.listdir(p.parent) == ["f.bin"]


def test_atomic_output_keeps_the_old_file_when_the_writer_fails(tmp_path):
    """A writer that dies half-way (here after writing some bytes) leaves the previous file
    as it was and no temp file behind; a writer by path (safetensors) gets the same."""
    import stat

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"):
        with ckpt.atomic_output(target) as tmp:
            tmp.write_bytes(b"half of the new")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["model.safetensors"]

    from rwkvforge.merge import save_safetensors

    sd = {"emb.weight": torch.arange(6.0).view(2, 3)}
    save_safetensors(sd, target, {"format": "pt"})
    from safetensors.torch import load_file

    assert torch.equal(load_file(target)["emb.weight"], sd["emb.weight"])
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert stat.S_IMODE(target.stat().st_mode) != 0o600  # not mkstemp's private mode


def test_demo_model_command_writes_loadable_files(tmp_path, capsys):
    from rwkvforge import demo

    assert demo.main(["--out-dir", str(tmp_path)]) == 0
    path = tmp_path / "rwkv7-tiny-demo.pth"
    cfg = infer_config(load_state_dict(path))
    assert (cfg.n_layer, cfg.n_embd, cfg.vocab_size) == (*demo.TINY_SHAPE, 65536)
    stamp = path.stat().st_mtime_ns
    assert demo.main(["--out-dir", str(tmp_path)]) == 0
    assert path.stat().st_mtime_ns == stamp and "kept existing" in capsys.readouterr().out


def test_random_model_is_seeded_and_not_degenerate():
    a = make_random_model_sd(1, 64, head_size=32, seed=1, vocab_size=1000)
    b = make_random_model_sd(1, 64, head_size=32, seed=1, vocab_size=1000)
    c = make_random_model_sd(1, 64, head_size=32, seed=2, vocab_size=1000)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], c["head.weight"])
    assert "blocks.0.att.v0" not in a
    decay = torch.exp(-0.606531 * torch.sigmoid(a["blocks.0.att.w0"]))
    assert 0.5 < decay.min() and decay.max() < 1.0 and decay.std() > 0.01


# ------------------------------------------------------------------ training checkpoints
def _fill(files: dict[str, bytes]):
    def fill(tmp):
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
    return fill


def test_checkpoint_checksums_name_the_changed_file(tmp_path):
    """COMPLETE records each file's sha256 (sub-folders too); one flipped byte, or a missing
    file, is named; a marker from before checksums ("step N") still counts as complete."""
    ck = ckpt.write_checkpoint(tmp_path, 3, _fill({"a.bin": b"x" * 1000,
                                                   "deepspeed/s.pt": b"y" * 10}))
    assert ckpt.verify_checkpoint(ck) == 2
    data = bytearray((ck / "a.bin").read_bytes())
    data[500] ^= 0x01
    (ck / "a.bin").write_bytes(bytes(data))
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"a\.bin: checksum mismatch"):
        ckpt.verify_checkpoint(ck)
    (ck / "a.bin").unlink()
    with pytest.raises(ckpt.CorruptCheckpoint, match=r"a\.bin: missing"):
        ckpt.verify_checkpoint(ck)
    (ck / "COMPLETE").write_text("step 3\n")  # an older checkpoint: nothing to verify
    assert ckpt.verify_checkpoint(ck) == 0


def test_keep_checkpoints_never_removes_the_newest_complete(tmp_path):
    for step in (2, 4, 6, 8):
        ckpt.write_checkpoint(tmp_path, step, _fill({"a": b"1"}))
    (tmp_path / "checkpoints" / "step-3").mkdir()  # a crash's incomplete folder
    (tmp_path / "checkpoints" / "step-10").mkdir()  # being written right now
    assert ckpt.prune_checkpoints(tmp_path, 0) == []  # 0: keep all
    ckpt.prune_checkpoints(tmp_path, 2)
    assert [(s, ok) for s, _, ok in ckpt.checkpoint_dirs(tmp_path)] == \
        [(6, True), (8, True), (10, False)]
    ckpt.prune_checkpoints(tmp_path, 1)
    assert ckpt.latest_checkpoint(tmp_path).name == "step-8"
    assert [s for s, _, _ in ckpt.checkpoint_dirs(tmp_path)] == [8, 10]


def test_full_disk_checkpoint_leaves_nothing_that_looks_complete(small_fs):
    """A real full filesystem (a 1 MiB tmpfs): the write fails with ENOSPC, disk_error calls
    it a full disk, and no step folder (or temporary one) is left."""
    run = small_fs("1m")
    big = torch.zeros(1 << 19)  # 2 MiB
    with pytest.raises(BaseException) as ei:
        ckpt.write_checkpoint(run, 2, lambda tmp: ckpt.save_trainer_state(tmp / "t.pt",
                                                                           {"x": big}))
    assert ckpt.disk_error(ei.value, run) == "the disk is full"
    assert list((run / "checkpoints").iterdir()) == []


def test_nan_in_a_model_file_names_the_tensor(tmp_path, small_sd):
    sd = {k: v.clone() for k, v in small_sd.items()}
    sd["blocks.1.att.key.weight"][3, 5] = float("nan")
    path = save_pth(sd, tmp_path / "nan.pth")
    with pytest.raises(CheckpointError, match=r"tensor blocks\.1\.att\.key\.weight holds 1 "
                                              r"NaN/Inf value"):
        load_state_dict(path)

"""binidx: MMIDIDX v1 bytes, megatron-core readability, reader checks, atomic writes."""

from __future__ import annotations

import hashlib
import struct
import warnings

import numpy as np
import pytest

from rwkvforge.data import binidx as B

DOCS = [[5, 6, 7, 0], [65529, 0], [1, 2, 3, 4, 5, 6, 7, 8, 9, 0], [0]]


def independent_make_data_idx(sizes: list[int]) -> bytes:
    """The .idx RWKV-LM's make_data.py writes, re-derived from its documented layout:
    magic, <Q version 1, <B dtype code 8 (uint16), <Q item count, <Q doc_idx count,
    int32 sizes, int64 byte pointers, int64 doc_idx = [0, 1, ..., n] (one item per doc)."""
    out = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
    out += struct.pack("<Q", len(sizes)) + struct.pack("<Q", len(sizes) + 1)
    ptr, ptrs = 0, []
    for s in sizes:
        ptrs.append(ptr)
        ptr += 2 * s
    out += b"".join(struct.pack("<i", s) for s in sizes)
    out += b"".join(struct.pack("<q", p) for p in ptrs)
    out += b"".join(struct.pack("<q", i) for i in range(len(sizes) + 1))
    return out


def test_bytes_match_make_data_layout(tmp_path):
    prefix = tmp_path / "d"
    B.write_binidx(prefix, [np.array(d) for d in DOCS])
    assert (tmp_path / "d.idx").read_bytes() == independent_make_data_idx([len(d) for d in DOCS])
    expect_bin = b"".join(struct.pack("<H", t) for d in DOCS for t in d)
    assert (tmp_path / "d.bin").read_bytes() == expect_bin
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]  # no temp left


def test_reader_roundtrip_and_flat_tokens(tmp_path):
    B.write_binidx(tmp_path / "d", DOCS)
    r = B.BinIdxReader(tmp_path / "d")
    assert len(r) == 4 and r.num_documents == 4 and r.dtype == np.uint16
    assert [r[i].tolist() for i in range(4)] == DOCS
    assert r.tokens.tolist() == [t for d in DOCS for t in d]
    assert r.get(2, offset=3, length=2).tolist() == [4, 5]
    with pytest.raises(IndexError):
        r[4]


def test_megatron_core_reads_our_files(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDataset
    B.write_binidx(tmp_path / "d", DOCS)
    with B.BinIdxWriter(tmp_path / "m", np.uint8) as w:  # a mask stream, 2 items per doc
        w.add_item([1, 0])
        w.add_item([0, 0, 1])
        w.end_document()
    ds = IndexedDataset(str(tmp_path / "d"))
    assert len(ds) == 4
    assert ds.sequence_lengths.tolist() == [len(d) for d in DOCS]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    for i, d in enumerate(DOCS):
        assert ds[i].tolist() == d and ds[i].dtype == np.uint16
    assert ds.get(2, offset=1, length=3).tolist() == [2, 3, 4]
    dm = IndexedDataset(str(tmp_path / "m"))
    assert dm[1].tolist() == [0, 0, 1] and dm.document_indices.tolist() == [0, 2]


def test_reader_rejects_bad_files(tmp_path):
    with pytest.raises(B.BinIdxError, match="not found"):
        B.BinIdxReader(tmp_path / "missing")
    B.write_binidx(tmp_path / "d", DOCS)
    idx = (tmp_path / "d.idx").read_bytes()
    (tmp_path / "d.idx").write_bytes(idx[:-8])
    with pytest.raises(B.BinIdxError, match="truncated"):
        B.BinIdxReader(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(idx)
    with open(tmp_path / "d.bin", "ab") as f:
        f.write(b"\x00\x00")
    with pytest.raises(B.BinIdxError, match="different runs or truncated"):
        B.BinIdxReader(tmp_path / "d")
    (tmp_path / "d.idx").write_bytes(b"NOTANIDX!" + idx[9:])
    with pytest.raises(B.BinIdxError, match="bad magic"):
        B.BinIdxReader(tmp_path / "d")


def test_failed_write_leaves_old_dataset_and_no_temp(tmp_path):
    B.write_binidx(tmp_path / "d", DOCS)
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    with pytest.raises(RuntimeError):
        with B.BinIdxWriter(tmp_path / "d") as w:
            w.add_document([9, 9, 0])
            raise RuntimeError("interrupted")
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.iterdir()}
    assert after == before


def test_commit_drops_old_idx_before_new_bin(tmp_path, monkeypatch):
    """If the process dies between the two renames, no stale .idx pairs with the new .bin."""
    B.write_binidx(tmp_path / "d", DOCS)
    w = B.BinIdxWriter(tmp_path / "d")
    w.add_document([1, 2, 0])
    calls = []

    def dying_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".idx"):
            raise KeyboardInterrupt  # killed after the .bin rename
        return real(src, dst)

    real = B.os.replace
    monkeypatch.setattr(B, "_replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        w.commit()
    assert not (tmp_path / "d.idx").exists()
    with pytest.raises(B.BinIdxError, match="not found"):
        B.BinIdxReader(tmp_path / "d")


def test_value_range_checked(tmp_path):
    w = B.BinIdxWriter(tmp_path / "d")
    with pytest.raises(ValueError, match="outside uint16"):
        w.add_item(np.array([70000], dtype=np.int64))
    w.abort()
    assert list(tmp_path.iterdir()) == []

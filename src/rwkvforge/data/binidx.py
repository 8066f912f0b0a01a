"""Reading and writing binidx: the Megatron "MMIDIDX" v1 format used by RWKV-LM.

A dataset `<prefix>` is two files:

* `<prefix>.bin`: the items' elements back to back, in the dtype of the index (RWKV: uint16
  token ids; each document ends with the end-of-document token 0).
* `<prefix>.idx`, all little endian::

      b"MMIDIDX\\x00\\x00"       9-byte magic
      uint64  version = 1
      uint8   dtype code        (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 6 float64,
                                 7 float32 in megatron-core / float in RWKV-LM, 8 uint16)
      uint64  number of items   (N)
      uint64  number of document boundaries (D = documents + 1)
      int32[N]  item sizes, in elements
      int64[N]  item byte offsets into .bin (running sum of size * itemsize)
      int64[D]  document index: first item of each document, then N

RWKV-LM's make_data.py writes one item per document and `[0, 1, ..., N]` as the document
index; `write_binidx` / `BinIdxWriter.add_document` produce the same bytes, and
megatron-core's `IndexedDataset` reads them. This module knows nothing of tokenizers.

Writes are atomic: the writer fills `<final>.tmp-<pid>` files and `commit()` removes any old
`.idx` first, renames the `.bin`, then the `.idx`, so a crash never pairs a new `.bin` with an
old `.idx` (no `.idx` = no dataset).
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
DTYPE_CODES: dict[int, type] = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32,
                                5: np.int64, 6: np.float64, 7: np.float32, 8: np.uint16}
HEADER_SIZE = len(MAGIC) + 8 + 1 + 8 + 8  # 34 bytes


class BinIdxError(ValueError):
    """A binidx file that is missing, truncated or not MMIDIDX v1; the message says which."""


def dtype_code(dtype: np.dtype | type) -> int:
    dt = np.dtype(dtype)
    for code, t in DTYPE_CODES.items():
        if np.dtype(t) == dt:
            return code
    raise ValueError(f"dtype {dt} has no MMIDIDX code; use one of "
                     f"{sorted(np.dtype(t).name for t in DTYPE_CODES.values())}")


def bin_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    return Path(f"{prefix}.idx")


def index_bytes(sizes: Sequence[int] | np.ndarray, doc_idx: Sequence[int] | np.ndarray,
                dtype: np.dtype | type = np.uint16) -> bytes:
    """The complete .idx file content for items of `sizes` elements."""
    sizes64 = np.asarray(sizes, dtype=np.int64)
    if sizes64.size and (sizes64.min() < 0 or sizes64.max() > np.iinfo(np.int32).max):
        raise ValueError("item sizes must fit in int32 (split documents over 2^31 elements)")
    itemsize = np.dtype(dtype).itemsize
    pointers = np.zeros(len(sizes64), dtype=np.int64)
    if len(sizes64) > 1:
        np.cumsum(sizes64[:-1] * itemsize, out=pointers[1:])
    doc = np.asarray(doc_idx, dtype=np.int64)
    return b"".join([
        MAGIC, struct.pack("<Q", VERSION), struct.pack("<B", dtype_code(dtype)),
        struct.pack("<Q", len(sizes64)), struct.pack("<Q", len(doc)),
        sizes64.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(),
        doc.astype("<i8").tobytes(),
    ])


def _replace(tmp: Path, final: Path) -> None:
    os.replace(tmp, final)


class BinIdxWriter:
    """Streaming writer. `add_document(array)` = one item + one document (RWKV-LM layout);
    `add_item` / `end_document` for documents of several items. `commit()` publishes."""

    def __init__(self, prefix: str | Path, dtype: np.dtype | type = np.uint16) -> None:
        self.prefix = Path(prefix)
        self.dtype = np.dtype(dtype)
        dtype_code(self.dtype)
        self.prefix.parent.mkdir(parents=True, exist_ok=True)
        tag = f".tmp-{os.getpid()}"
        self.bin_tmp = Path(f"{bin_path(prefix)}{tag}")
        self.idx_tmp = Path(f"{idx_path(prefix)}{tag}")
        self._f = open(self.bin_tmp, "wb")
        self.sizes: list[int] = []
        self.doc_idx: list[int] = [0]
        self.num_elements = 0
        self._finalized = False

    def add_item(self, arr: np.ndarray | Sequence[int]) -> None:
        a = np.asarray(arr)
        if a.dtype != self.dtype:
            if a.size and np.issubdtype(a.dtype, np.integer) and (
                    a.min() < np.iinfo(self.dtype).min or a.max() > np.iinfo(self.dtype).max):
                raise ValueError(f"values outside {self.dtype} range in item {len(self.sizes)}")
            a = a.astype(self.dtype)
        self._f.write(np.ascontiguousarray(a).tobytes())
        self.sizes.append(int(a.size))
        self.num_elements += int(a.size)

    def add_items(self, flat: np.ndarray, sizes: np.ndarray, items_per_doc: int = 1) -> None:
        """Append many items at once: `flat` = their elements back to back, `sizes` = their
        lengths; a document ends after every `items_per_doc` items."""
        if len(sizes) % items_per_doc:
            raise ValueError(f"{len(sizes)} items is not a whole number of documents")
        a = np.asarray(flat)
        if a.dtype != self.dtype or int(np.sum(sizes)) != a.size:
            raise ValueError("add_items: flat data must match the writer's dtype and sizes")
        self._f.write(np.ascontiguousarray(a).tobytes())
        base = len(self.sizes)
        self.sizes.extend(np.asarray(sizes).tolist())
        self.doc_idx.extend(range(base + items_per_doc, len(self.sizes) + 1, items_per_doc))
        self.num_elements += a.size

    def end_document(self) -> None:
        self.doc_idx.append(len(self.sizes))

    def add_document(self, arr: np.ndarray | Sequence[int]) -> None:
        self.add_item(arr)
        self.end_document()

    def finalize(self) -> list[tuple[Path, Path]]:
        """Close and write the temp .idx; returns [(bin_tmp, bin), (idx_tmp, idx)] in the
        order they must be renamed (see `commit`)."""
        if not self._finalized:
            self._f.close()
            self.idx_tmp.write_bytes(index_bytes(self.sizes, self.doc_idx, self.dtype))
            self._finalized = True
        return [(self.bin_tmp, bin_path(self.prefix)), (self.idx_tmp, idx_path(self.prefix))]

    def commit(self) -> None:
        """finalize, drop any old .idx, rename .bin then .idx into place."""
        pairs = self.finalize()
        idx_path(self.prefix).unlink(missing_ok=True)
        for tmp, final in pairs:
            _replace(tmp, final)

    def abort(self) -> None:
        """Delete the temp files (after an error)."""
        try:
            if not self._f.closed:
                self._f.close()  # flushes: may fail again (a full disk)
        except OSError:
            pass
        finally:
            self.bin_tmp.unlink(missing_ok=True)
            self.idx_tmp.unlink(missing_ok=True)

    def __enter__(self) -> "BinIdxWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_binidx(prefix: str | Path, documents: Iterable[np.ndarray | Sequence[int]],
                 dtype: np.dtype | type = np.uint16) -> Path:
    """Write documents (one item each, taken as given: append the EOT yourself)."""
    with BinIdxWriter(prefix, dtype) as w:
        for d in documents:
            w.add_document(d)
    return idx_path(prefix)


class BinIdxReader:
    """Memory-mapped reader of `<prefix>.bin/.idx`.

    `tokens` is the whole .bin as one flat array (what RWKV-LM samples windows from);
    `reader[i]` is item i; `sizes`, `pointers` (bytes) and `doc_idx` come from the index."""

    def __init__(self, prefix: str | Path) -> None:
        self.prefix = Path(prefix)
        ip, bp = idx_path(prefix), bin_path(prefix)
        for p in (ip, bp):
            if not p.is_file():
                raise BinIdxError(f"{p} not found: prepare the data first (rwkvforge prepare "
                                  "--input X.jsonl --output-prefix "
                                  f"{self.prefix}); an interrupted run leaves no .idx")
        raw = ip.read_bytes()
        if len(raw) < HEADER_SIZE or raw[:9] != MAGIC:
            raise BinIdxError(f"{ip}: not an MMIDIDX index (bad magic {raw[:9]!r})")
        (version,) = struct.unpack_from("<Q", raw, 9)
        if version != VERSION:
            raise BinIdxError(f"{ip}: index version {version}, only version 1 is supported")
        code = raw[17]
        if code not in DTYPE_CODES:
            raise BinIdxError(f"{ip}: unknown dtype code {code}")
        self.dtype = np.dtype(DTYPE_CODES[code])
        n, d = struct.unpack_from("<QQ", raw, 18)
        need = HEADER_SIZE + 4 * n + 8 * n + 8 * d
        if len(raw) < need:
            raise BinIdxError(f"{ip}: truncated ({len(raw)} bytes, header promises {need}); "
                              "prepare the data again")
        off = HEADER_SIZE
        self.sizes = np.frombuffer(raw, "<i4", n, off).astype(np.int64)
        self.pointers = np.frombuffer(raw, "<i8", n, off + 4 * n).copy()
        self.doc_idx = np.frombuffer(raw, "<i8", d, off + 12 * n).copy()
        self.num_tokens = int(self.sizes.sum())
        expect = self.num_tokens * self.dtype.itemsize
        actual = bp.stat().st_size
        if actual != expect:
            raise BinIdxError(f"{bp}: {actual} bytes but {ip} describes {expect} "
                              f"({self.num_tokens} x {self.dtype}); the pair is from "
                              "different runs or truncated: prepare the data again")
        self.tokens = (np.memmap(bp, dtype=self.dtype, mode="r") if actual
                       else np.zeros(0, dtype=self.dtype))
        self.starts = self.pointers // self.dtype.itemsize  # element offset of each item

    def __len__(self) -> int:
        return len(self.sizes)

    @property
    def num_documents(self) -> int:
        return max(len(self.doc_idx) - 1, 0)

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(f"item {i} out of range for {self.prefix} ({len(self)} items)")
        i %= len(self)
        s = int(self.starts[i])
        return np.asarray(self.tokens[s:s + int(self.sizes[i])])

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        item = self[i]
        return item[offset:None if length is None else offset + length]

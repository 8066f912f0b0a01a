"""The Data page's reader: prepared datasets (`rwkvforge prepare` output) in the workspace.

A prepared dataset is `<prefix>.meta.json` (format rwkvforge-data/1, naming its type and
train / val splits) or a bare binidx pair `<prefix>.bin/.idx` (plain text, e.g. from
RWKV-LM's make_data.py). Reading goes through rwkvforge.data.loader.open_split, the same
reader training uses, so the page shows exactly what the trainer sees.

    python -c "from rwkvforge.dashboard.datasets import *; print(find_datasets(Path('.')))"
"""

from __future__ import annotations

import codecs
import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rwkvforge.data.loader import META_SUFFIX, load_meta, open_split

MAX_SHOWN_TOKENS = 2000  # the decoded sample is cut here: the page stays responsive
TRAINED_STYLE = "background:#c8f7c5;color:#0b3d0b"  # in the loss
MASKED_STYLE = "background:#e6e6e6;color:#555"  # prompt: not in the loss


class DatasetError(ValueError):
    """A prepared dataset that cannot be read; the message says which file and why."""


@dataclass
class Dataset:
    path: Path
    data_type: str  # text | sft | dpo
    split: str
    lengths: list[int]
    _split: Any
    tokenizer: Any

    def document(self, i: int) -> tuple[list[int], list[int] | None]:
        """Token ids of item `i` and its loss mask (None for plain text: all trained)."""
        ids = [int(x) for x in np.asarray(self._split.ids[i])]
        if self._split.mask is None:
            return ids, None
        return ids, [int(x) for x in np.asarray(self._split.mask[i])]


def find_datasets(root: Path) -> list[Path]:
    """Meta files of prepared datasets under `root`/data, plus bare binidx prefixes (as
    their .bin path) that no meta file claims."""
    data = root / "data"
    if not data.is_dir():
        return []
    metas = sorted(data.rglob(f"*{META_SUFFIX}"))
    claimed: set[Path] = set()
    for m in metas:
        try:
            prefix, meta = load_meta(m)
        except (ValueError, OSError):
            continue
        for info in ((meta or {}).get("splits") or {}).values():
            for key in ("prefix", "mask_prefix"):
                if info and info.get(key):
                    claimed.add((prefix.parent / str(info[key])).resolve())
    bare = [p for p in sorted(data.rglob("*.bin"))
            if p.with_suffix(".idx").is_file() and p.with_suffix("").resolve() not in claimed]
    return metas + bare


def splits_of(path: Path) -> list[str]:
    """The splits a dataset offers ("train", and "val" when it has one)."""
    try:
        _, meta = load_meta(path)
    except (ValueError, OSError):
        return ["train"]
    if meta is None:
        return ["train"]
    return [s for s in ("train", "val") if ((meta.get("splits") or {}).get(s) or {})
            .get("documents")] or ["train"]


def open_dataset(path: Path, split: str = "train", root: Path | None = None) -> Dataset:
    """One split of a dataset; the files its meta names must lie inside `root` (default:
    the workspace)."""
    from rwkvforge.paths import is_within, workspace_root
    from rwkvforge.tokenizer import get_tokenizer

    root = root or workspace_root()
    try:
        prefix, meta = load_meta(path)
        for info in ((meta or {}).get("splits") or {}).values():
            for key in ("prefix", "mask_prefix"):
                if info and info.get(key) and not is_within(prefix.parent / str(info[key]),
                                                            root):
                    raise DatasetError(f"{path}: its {key} {info[key]!r} points outside the "
                                       "workspace; refused")
        sp = open_split(path, split)
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise DatasetError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
    if sp is None:
        raise DatasetError(f"{path}: no {split!r} split")
    lengths = [int(x) for x in sp.ids.sizes]
    return Dataset(path=path, data_type=sp.data_type, split=split, lengths=lengths, _split=sp,
                   tokenizer=get_tokenizer())


def histogram(lengths: list[int], bins: int = 20) -> list[tuple[str, int]]:
    """(bin label "lo-hi", count) pairs over the document lengths, in order."""
    if not lengths:
        return []
    arr = np.asarray(lengths)
    lo, hi = int(arr.min()), int(arr.max())
    if lo == hi:
        return [(str(lo), len(lengths))]
    edges = np.linspace(lo, hi + 1, min(bins, hi - lo + 1) + 1).round().astype(int)
    edges = np.unique(edges)
    counts, _ = np.histogram(arr, bins=edges)
    width = len(str(hi))  # zero-padded so the labels also sort in order

    def label(a: int, b: int) -> str:
        return f"{a:0{width}d}" if a == b else f"{a:0{width}d}-{b:0{width}d}"

    return [(label(int(edges[i]), int(edges[i + 1]) - 1), int(c)) for i, c in enumerate(counts)]


def _html_text(text: str) -> str:
    """Escaped, with line breaks as character references: a blank line inside the HTML
    would end Markdown's HTML block and show the rest as raw tags (pre-wrap still breaks
    the lines)."""
    return html.escape(text).replace("\r", "&#13;").replace("\n", "&#10;")


def render_tokens_html(tokenizer: Any, ids: list[int], mask: list[int] | None,
                       eot_text: str, boundaries: bool = False) -> str:
    """The decoded document as HTML: trained tokens green, masked tokens grey. Text is
    escaped; bytes of a character split across tokens are carried to the next token."""
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    spans: list[str] = []
    border = "border-right:1px solid #999;" if boundaries else ""
    for j, tok in enumerate(ids[:MAX_SHOWN_TOKENS]):
        trained = True if mask is None else bool(mask[j])
        text = eot_text if tok == 0 else dec.decode(tokenizer.decode_bytes([tok]))
        if not text:
            continue
        style = (TRAINED_STYLE if trained else MASKED_STYLE) + ";" + border
        spans.append(f'<span style="{style}" title="{tok}">{_html_text(text)}</span>')
    tail = dec.decode(b"", final=True)
    if tail:
        spans.append(_html_text(tail))
    return ('<div style="white-space:pre-wrap;font-family:monospace;line-height:1.6">'
            + "".join(spans) + "</div>")

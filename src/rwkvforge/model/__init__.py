"""RWKV-7 model and WKV kernels (no I/O here; files live in rwkvforge.checkpoint)."""

from rwkvforge.model.rwkv7 import RWKV7, RWKV7Config

__all__ = ["RWKV7", "RWKV7Config"]

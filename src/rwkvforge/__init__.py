"""rwkvforge: fine-tune RWKV-7 with LoRA / QLoRA on one GPU or a plain CPU."""

__version__ = "0.1.0"

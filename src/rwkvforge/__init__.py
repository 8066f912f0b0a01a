"""rwkvforge: fine-tune RWKV-7 with LoRA / QLoRA on one GPU or a plain CPU."""

import logging as _logging

__version__ = "0.1.0"

# bitsandbytes >= 0.49 on an AVX512-BF16 CPU tries, at import, to fetch a 4-bit GEMM kernel
# from the Hugging Face Hub through the optional `kernels` package, and warns on every
# command when that package is absent. Its own CPU kernels (what we use and test) work
# without it, and nothing here should reach for the network: keep that one logger quiet.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

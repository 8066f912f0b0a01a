"""Write the embedded demo models: real RWKV-7 architecture, real 65536-token World vocabulary,
random weights. They make every script work on a fresh machine without a download.

    rwkvforge demo-model            # models/base/rwkv7-tiny-demo.pth (L4 C256, ~36M params)
    rwkvforge demo-model --bench    # + models/base/rwkv7-0.1b-shape.pth (L12 C768, like rwkv7-g1 0.1B)
    python -m rwkvforge.demo --force

Random weights follow BlinkDL's RWKV-7 initialisation (decay, mixing and gate ranges), with
the matrices that start at zero in training given small random values instead, so every
path of the network carries signal and outputs are not degenerate.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable

import torch

from rwkvforge import paths, runs
from rwkvforge.checkpoint import CheckpointError, save_pth
from rwkvforge.model.rwkv7 import RWKV7Config

TINY_SHAPE = (4, 256)  # (n_layer, n_embd): a 60-step LoRA run at ctx 256 takes minutes on 2 cores
BENCH_SHAPE = (12, 768)  # the rwkv7-g1 0.1B shape


def make_random_model_sd(
    n_layer: int,
    n_embd: int,
    vocab_size: int = 65536,
    seed: int = 0,
    head_size: int = 64,
    dim_ffn: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """A random RWKV-7 state dict in BlinkDL's `.pth` layout (layer 0 without v0/v1/v2)."""
    cfg = RWKV7Config.suggested(n_layer, n_embd, vocab_size=vocab_size, head_size=head_size)
    if dim_ffn is not None:
        cfg.dim_ffn = dim_ffn
    C, H, N, L = cfg.n_embd, cfg.n_head, cfg.head_size, cfg.n_layer
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=gen) * std

    def uniform(*shape, bound):
        return (torch.rand(*shape, generator=gen) * 2 - 1) * bound

    sd: dict[str, torch.Tensor] = {}
    sd["emb.weight"] = randn(vocab_size, C, std=0.1)  # ln0 follows, so scale only needs to beat eps
    ch = torch.arange(C, dtype=torch.float32)
    ddd = (ch / C).view(1, 1, C)
    linear = ch / (C - 1) - 0.5
    zig = ((ch % N) - (N - 1) / 2) / ((N - 1) / 2)
    zig = zig * zig.abs()
    for i in range(L):
        p = f"blocks.{i}."
        r01 = i / max(L - 1, 1)  # 0 -> 1 over depth
        r10 = 1.0 - i / L  # 1 -> ~0 over depth
        if i == 0:
            sd[p + "ln0.weight"], sd[p + "ln0.bias"] = torch.ones(C), torch.zeros(C)
        for ln in ("ln1", "ln2"):
            sd[p + f"{ln}.weight"] = 1.0 + randn(C, std=0.05)
            sd[p + f"{ln}.bias"] = randn(C, std=0.02)
        a = p + "att."
        for name, e in (("x_r", 0.2), ("x_w", 0.9), ("x_k", 0.7), ("x_v", 0.7), ("x_a", 0.9), ("x_g", 0.2)):
            sd[a + name] = 1.0 - torch.pow(ddd, e * r10)
        www = -6 + 6 * (ch / (C - 1)) ** (1 + r01**0.3)
        sd[a + "w0"] = (www + 0.5 + zig * 2.5).view(1, 1, C)
        sd[a + "w1"] = randn(C, cfg.d_decay, std=0.3 / math.sqrt(C))
        sd[a + "w2"] = randn(cfg.d_decay, C, std=0.3 / math.sqrt(cfg.d_decay))
        sd[a + "a0"] = (-0.19 + zig * 0.3 + linear * 0.4).view(1, 1, C)
        sd[a + "a1"] = randn(C, cfg.d_aaa, std=0.3 / math.sqrt(C))
        sd[a + "a2"] = randn(cfg.d_aaa, C, std=0.3 / math.sqrt(cfg.d_aaa))
        if i > 0:
            sd[a + "v0"] = (0.73 - linear * 0.4).view(1, 1, C)
            sd[a + "v1"] = randn(C, cfg.d_mv, std=0.3 / math.sqrt(C))
            sd[a + "v2"] = randn(cfg.d_mv, C, std=0.3 / math.sqrt(cfg.d_mv))
        sd[a + "g1"] = randn(C, cfg.d_gate, std=0.5 / math.sqrt(C))
        sd[a + "g2"] = randn(cfg.d_gate, C, std=1.0 / math.sqrt(cfg.d_gate))
        sd[a + "k_k"] = (0.71 - linear * 0.1).view(1, 1, C)
        sd[a + "k_a"] = torch.full((1, 1, C), 1.02)
        sd[a + "r_k"] = -0.04 + randn(H, N, std=0.1)
        sd[a + "receptance.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        sd[a + "key.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        sd[a + "value.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        sd[a + "output.weight"] = uniform(C, C, bound=0.5 / math.sqrt(C))
        sd[a + "ln_x.weight"] = 1.0 + randn(C, std=0.05)
        sd[a + "ln_x.bias"] = randn(C, std=0.02)
        f = p + "ffn."
        sd[f + "x_k"] = 1.0 - torch.pow(ddd, r10**4)
        sd[f + "key.weight"] = uniform(cfg.dim_ffn, C, bound=0.5 / math.sqrt(C))
        sd[f + "value.weight"] = uniform(C, cfg.dim_ffn, bound=0.5 / math.sqrt(cfg.dim_ffn))
    sd["ln_out.weight"], sd["ln_out.bias"] = torch.ones(C), torch.zeros(C)
    sd["head.weight"] = randn(vocab_size, C, std=1.0 / math.sqrt(C))
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def write_demo_model(path: Path, n_layer: int, n_embd: int, seed: int = 0, force: bool = False) -> tuple[Path, bool]:
    """Write one random model; returns (path, written). Existing files are kept unless `force`."""
    if path.exists() and not force:
        return path, False
    save_pth(make_random_model_sd(n_layer, n_embd, seed=seed), path)
    return path, True


def resolve_base_model(base_model: str, source: str = "cli", root: Path | None = None, *,
                       generate: bool = True, say: Callable[[str], None] = print,
                       adapter: str | Path | None = None) -> tuple[Path, bool]:
    """The base model .pth every command loads: BASE_MODEL resolved by the one path rule
    (paths.resolve), or, when it is empty, the embedded demo model, written when missing and
    `generate`. Returns (path, is_demo); CheckpointError names the file and the fix.

    With `adapter` from a run (its folder or a path in it) and BASE_MODEL not given on the
    command line, the base that run trained on (its config.json) when that file still exists,
    as merge and eval do: an adapter only fits the base it was trained on."""
    root = root or paths.workspace_root()
    trained = _trained_base(adapter) if adapter and source != "cli" else None
    if trained is not None:
        configured = paths.resolve(base_model, source, root) if base_model else None
        if configured is None or configured.resolve() != trained.resolve():
            say(f"using the base model the adapter's run trained on: {trained} (its config.json; "
                f"BASE_MODEL {'says ' + base_model if base_model else 'is empty'}); pass "
                "--base-model to choose another")
        return trained, trained.resolve() == paths.demo_model_path(root).resolve()
    if not base_model:
        p = paths.demo_model_path(root)
        if not p.is_file():
            if not generate:
                raise CheckpointError(f"{p}: demo model missing; run `rwkvforge demo-model`.")
            say(f"no BASE_MODEL set: generating the demo model {p} (random weights, "
                f"L{TINY_SHAPE[0]} C{TINY_SHAPE[1]})")
            write_demo_model(p, *TINY_SHAPE)
        return p, True
    p = paths.resolve(base_model, source, root)
    if p.is_dir() and (p / "config.json").is_file():
        return p, False  # a Hugging Face RWKV-7 folder (checkpoint.load_state_dict reads it)
    if not p.is_file():
        raise CheckpointError(f"BASE_MODEL={base_model} (from {source}): model file not found "
                              f"at {p}. {_missing_model_hint(p)}Put the .pth there or fix the "
                              "path (--base-model PATH.pth); leave BASE_MODEL empty for the "
                              "demo model.")
    return p, False


def _trained_base(adapter: str | Path) -> Path | None:
    """The existing base model file of the run `adapter` is (or is in); None otherwise."""
    p = Path(adapter)
    run_dir = p if runs.is_run(p) else runs.run_of(p)
    base = runs.run_base_model(runs.run_config(run_dir)) if run_dir is not None else None
    return base if base is not None and base.is_file() else None


def _missing_model_hint(p: Path) -> str:
    """BlinkDL's downloads carry a date (rwkv7-g1-1.5b-20250429-ctx4096.pth) where a model
    .env names the short file (rwkv7-g1-1.5b.pth): name the downloads that start like it."""
    try:
        near = sorted(f.name for f in p.parent.glob(f"{p.stem}*.pth") if f.is_file())
    except OSError:
        return ""
    if not near:
        return ""
    return (f"{p.parent} has {', '.join(near[:3])}: link it under the expected name "
            f"(ln -s {near[0]} {p}) or pass it as --base-model. ")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rwkvforge demo-model", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", action="store_true", help="also write the 0.1B-shaped model (L12 C768, ~0.7 GB)")
    ap.add_argument("--force", action="store_true", help="overwrite existing files")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", type=Path, default=None, help="folder (default: <workspace>/models/base)")
    args = ap.parse_args(argv)

    out_dir = args.out_dir or paths.demo_model_path().parent
    jobs = [(out_dir / paths.demo_model_path().name, *TINY_SHAPE)]
    if args.bench:
        jobs.append((out_dir / "rwkv7-0.1b-shape.pth", *BENCH_SHAPE))
    for path, n_layer, n_embd in jobs:
        cfg = RWKV7Config.suggested(n_layer, n_embd)
        p, written = write_demo_model(path, n_layer, n_embd, seed=args.seed, force=args.force)
        what = "wrote" if written else "kept existing (use --force to rewrite)"
        print(f"{what} {p}  [RWKV-7 L{n_layer} C{n_embd}, {cfg.n_params() / 1e6:.1f}M params, random weights]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

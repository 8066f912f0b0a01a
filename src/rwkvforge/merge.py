"""Merge a LoRA / DoRA adapter into its full-precision RWKV-7 base, and prove the result.

    rwkvforge merge --adapter runs/<run>/adapter                       # base read from the run
    rwkvforge merge --base-model models/base/X.pth --adapter runs/<run>/adapter --dtype fp16
    rwkvforge merge --base-model X.pth --adapter out/rwkv-0.pth --alpha 32     # an RWKV-PEFT .pth
    rwkvforge merge ... --safetensors --export-adapter out/peft-adapter  # extra exports
    ./scripts/merge_lora.sh --adapter runs/<run>/adapter

Inputs: a PEFT adapter folder, a run folder (its final adapter) or an RWKV-PEFT LoRA `.pth`
(RWKV-PEFT does not store alpha, so `--alpha` is required for it); the format and the merge
maths (in fp32, rounded once to the output dtype) are rwkvforge.adapter's. This module is the
stage: it verifies the merge and writes the outputs.
A QLoRA-trained adapter is merged into the full-precision base read from the `.pth`, never into
re-quantised weights (merging into dequantised NF4 weights bakes the quantisation error in).

Verification (every merge; a failed check leaves no output file, only <out>.verify-failed.json):
1. logits: on a fixed probe batch the merged model (its weights rounded to the output dtype,
   run in fp32) is compared with the unmerged base + adapter, run by the `peft` library in
   fp32. Tolerance, per output dtype:
     fp32       FP32_TOL * max(1, max|ref logit|): only summation order differs;
     bf16/fp16  the fp32 tolerance + ROUNDING_FACTOR x the largest logit change caused by
                a simulated rounding (uniform +-1/2 ulp of that dtype, ROUNDING_DRAWS draws) of
                exactly the tensors the merge rounds, on the same probe: the budget is
                measured from the rounding, not widened until the check passes (a scale
                error of 1.5x fails it in bf16).
2. runtime: the merged file is loaded and run by the `rwkv` pip package (RWKV_V7_ON=1, strategy
   "cpu fp32") in a subprocess (so its env vars stay out of this process); its logits must
   match ours for the same file within RUNTIME_TOL * max(1, max|logit|).
The result (numbers, tolerances, sha256 of the output) is written to <out>.verify.json next
to it (one per merged model).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

from rwkvforge import runs, upstream
from rwkvforge.progress import Progress
from rwkvforge.adapter import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKSUMS, Adapter, LoraFactor, MergeError,
                               apply_replacements, check_adapter_matches_base, merge_state_dict,
                               read_adapter, resolve_adapter_path, save_peft_adapter)
from rwkvforge.checkpoint import (COMPLETE_MARKER, DTYPES, CheckpointError, CorruptCheckpoint,
                                  READ_ONLY, file_sha256,
                                  atomic_output, atomic_write_bytes, disk_error, fmt_mb,
                                  free_bytes, load_state_dict, model_from_state_dict, save_pth,
                                  verify_checkpoint)
from rwkvforge.state_tuning import run_state_note

# fp32 logit tolerance, relative to the logit scale. Merged vs unmerged fp32 differ only in
# summation order (x (W + sBA)^T vs x W^T + s (x A^T) B^T): measured ~1e-6 relative on the test
# models; 1e-4 leaves 100x head-room and still fails any real merge error (a wrong scale, a
# missing module or a transposed factor moves logits by >= 1e-2 relative).
FP32_TOL = 1e-4
# bf16/fp16: real rounding and the simulated one (see simulated_rounding) have the same error
# distribution, so their logit effects are of the same size; but the max over all logits of one
# draw is a noisy statistic. Measured on the test models (16 adapters x fp32/bf16 base x
# bf16/fp16 output), actual / one-draw simulated: median ~0.95, max 3.6 (a large adapter, logit
# effect 5). So: the max over ROUNDING_DRAWS draws, times 3.
ROUNDING_DRAWS = 3
ROUNDING_FACTOR = 3.0
# ours vs the rwkv pip package on the same file, both fp32: different kernels and summation
# order over a whole forward pass (measured ~1e-6 relative).
RUNTIME_TOL = 1e-3
PROBE_SHAPE = (2, 24)  # (B, T) fixed probe batch
PROBE_SEED = 20240607


class VerificationError(MergeError):
    """The merged model does not behave like base + adapter (no output was written)."""


# ---- outputs -------------------------------------------------------------------------------------

def save_safetensors(sd: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> Path:
    """The merged model as safetensors (same BlinkDL keys and dtype as the .pth), atomically."""
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp), metadata=metadata)
    return path


# ---- verification --------------------------------------------------------------------------------
def probe_batch(vocab_size: int, shape=PROBE_SHAPE, seed: int = PROBE_SEED) -> torch.Tensor:
    """The fixed probe: token ids drawn from a seeded generator (never token 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, shape, generator=g)


@torch.no_grad()
def model_logits(sd: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
    """Logits (B, T, V) of an RWKV7 built from `sd`, computed in fp32."""
    model = model_from_state_dict(sd, dtype=torch.float32)
    model.wkv_impl = "ref" if idx.shape[1] <= 64 else "auto"
    return model(idx)[0].float()


@torch.no_grad()
def unmerged_logits(base_sd: dict[str, torch.Tensor], adapter: Adapter, idx: torch.Tensor,
                    adapter_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Base (fp32, replacements applied) + adapter run *unmerged* by the peft library.

    `adapter_dir`: the PEFT folder to load (the user's own when the adapter is one, so the
    reference does not go through our reader); else the adapter is exported to a temp folder.
    """
    from peft import PeftModel

    model = model_from_state_dict(apply_replacements(base_sd, adapter), dtype=torch.float32)
    model.wkv_impl = "ref" if idx.shape[1] <= 64 else "auto"
    with contextlib.ExitStack() as stack:
        if adapter_dir is None:
            adapter_dir = stack.enter_context(tempfile.TemporaryDirectory(prefix="rwkvforge-peft-"))
            save_peft_adapter(adapter, Path(adapter_dir) / "adapter")
            adapter_dir = Path(adapter_dir) / "adapter"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # whole-tensor replacements are not peft modules
            pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False)
        pm.eval()
        n_wrapped = sum(1 for n, _ in pm.named_modules() if n.endswith(".lora_A.default"))
        if n_wrapped < len(adapter.factors):
            raise VerificationError(f"peft wrapped {n_wrapped} modules but the adapter has "
                                    f"{len(adapter.factors)}: its target_modules do not cover "
                                    f"all of its tensors.")
        return pm.base_model.model(idx)[0].float()


def _ulp_note(dtype_name: str) -> str:
    return {"fp32": "summation order only", "bf16": "8-bit mantissa", "fp16": "11-bit mantissa"}[dtype_name]



_MANTISSA_BITS = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` numbers at |x| (float64; subnormal range included)."""
    e = torch.floor(torch.log2(x.abs().double().clamp_min(torch.finfo(dtype).tiny)))
    return torch.pow(2.0, e - _MANTISSA_BITS[dtype])


def _merged_for_budget(W: torch.Tensor, f: LoraFactor) -> torch.Tensor:
    """W + s B A (DoRA-rescaled) in fp32, written apart from `merge_fast` on purpose: the
    rounding budget must not move when the merge under test is wrong."""
    w = W.float() + f.scale * (f.B.float() @ f.A.float())
    if f.magnitude is not None:
        w = w * (f.magnitude.float() / torch.linalg.vector_norm(w, dim=1)).unsqueeze(1)
    return w


def simulated_rounding(sd: dict[str, torch.Tensor], adapter: Adapter, dtype: torch.dtype,
                       seed: int = PROBE_SEED + 1) -> dict[str, torch.Tensor]:
    """The merged model in fp32 with the error that rounding to `dtype` makes, simulated:
    uniform noise of +-1/2 ulp (at each merged value) on exactly the tensors the merge rounds:
    the adapted matrices, and any tensor not already representable in `dtype` (e.g. an fp32
    base). Its logit effect is the rounding budget of the check; the noise is random, not the
    rounding under test, and it is not zero for a bf16 base (whose untouched tensors are exact
    in bf16 but whose merged matrices are not). `sd`: the base with replacements applied."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if not v.is_floating_point():
            out[k] = v
            continue
        f = adapter.factors.get(k)
        w = _merged_for_budget(v, f) if f is not None else v.float()
        if f is not None or not torch.equal(v.to(dtype).to(v.dtype), v):
            u = torch.rand(w.shape, generator=g, dtype=torch.float64) - 0.5
            w = (w.double() + u * ulp(w, dtype)).float()
        out[k] = w
    return out


def verify_passes(dtype_name: str) -> int:
    """Forward passes `verify_merge` runs (its progress total): reference, base, merged, and
    for a rounded dtype the clean merge + ROUNDING_DRAWS noisy ones."""
    return 3 + (0 if dtype_name == "fp32" else 1 + ROUNDING_DRAWS)


def verify_merge(base_sd, adapter: Adapter, merged_sd, dtype_name: str,
                 adapter_dir=None, idx: torch.Tensor | None = None,
                 tick: Callable[[], None] = lambda: None) -> dict:
    """Logit check of merged vs base + adapter (see module docstring). Returns the numbers;
    `passed` False when the difference exceeds the tolerance. `tick()` after each forward pass
    (`verify_passes(dtype_name)` of them)."""
    vocab = int(base_sd["emb.weight"].shape[0])
    idx = probe_batch(vocab) if idx is None else idx
    ref = unmerged_logits(base_sd, adapter, idx, adapter_dir)
    tick()
    base_fp32 = apply_replacements(base_sd, adapter)
    base_logits = model_logits(base_fp32, idx)
    tick()
    merged = model_logits(merged_sd, idx)
    tick()
    scale = max(1.0, float(ref.abs().max()))
    tol_fp32 = FP32_TOL * scale
    rounding = 0.0
    if dtype_name != "fp32":
        # effect of the noise alone: noisy vs clean version of the same (independent) weights
        clean = model_logits({k: (_merged_for_budget(v, adapter.factors[k]) if k in adapter.factors
                                  else v) for k, v in base_fp32.items()}, idx)
        tick()
        for d in range(ROUNDING_DRAWS):
            noisy = simulated_rounding(base_fp32, adapter, DTYPES[dtype_name], seed=PROBE_SEED + 1 + d)
            rounding = max(rounding, float((model_logits(noisy, idx) - clean).abs().max()))
            del noisy
            tick()
    tol = tol_fp32 + ROUNDING_FACTOR * rounding
    diff = float((merged - ref).abs().max())
    effect = float((ref - base_logits).abs().max())
    finite = bool(torch.isfinite(merged).all() and torch.isfinite(ref).all())
    res = {
        "probe": {"shape": list(idx.shape), "seed": PROBE_SEED},
        "reference": "base (fp32) + adapter, unmerged, run by peft " + _peft_version(),
        "max_abs_logit": scale,
        "max_abs_diff": diff,
        "tolerance": tol,
        "tolerance_rule": (f"{FP32_TOL:g} x max(1, max|ref logit|)"
                           + ("" if dtype_name == "fp32" else
                              f" + {ROUNDING_FACTOR:g} x simulated-rounding effect "
                              f"({rounding:.4g}, {dtype_name}: {_ulp_note(dtype_name)})")),
        "rounding_effect": rounding,
        "adapter_effect_max_abs": effect,
        "passed": finite and diff <= tol,
        "finite": finite,
    }
    if effect == 0.0:
        res["warning"] = "the adapter does not change the logits at all (B = 0: untrained?)"
    elif dtype_name != "fp32" and effect < rounding:
        res["warning"] = (f"the adapter's effect on the logits ({effect:.3g}) is below the "
                          f"{dtype_name} rounding effect ({rounding:.3g}): much of it is lost "
                          f"in {dtype_name}; consider --dtype fp32.")
    return res


def _peft_version() -> str:
    return runs.package_version("peft") or "?"


# ---- the stage -----------------------------------------------------------------------------------
@dataclass
class MergeResult:
    output: Path | None
    report: dict
    report_path: Path


ADAPTER_FOLDER_FILES = {ADAPTER_CONFIG, *ADAPTER_WEIGHTS, CHECKSUMS, "README.md"}


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def _check_outputs(out: Path, base: Path, adapter_path: Path,
                   export_adapter: str | os.PathLike | None) -> None:
    """Refuse outputs that would destroy an input or a folder that is not an adapter's, and
    a folder this process cannot write (a read-only disk: said before minutes of merging)."""
    for what, folder in (("--out", out.parent), ("--export-adapter", export_adapter)):
        folder = Path(folder) if folder else None
        while folder is not None and not folder.exists() and folder.parent != folder:
            folder = folder.parent  # the nearest existing folder is where it gets created
        if folder is not None and folder.is_dir() and not os.access(folder, os.W_OK):
            raise MergeError(f"{what}: {folder} is not writable (a read-only disk, or no write "
                             "permission): pick a writable folder.")
    inputs = [base, adapter_path] + ([adapter_path / n for n in ADAPTER_WEIGHTS]
                                     if adapter_path.is_dir() else [])
    if any(_same_file(out, p) for p in inputs):
        raise MergeError(f"--out {out} is an input of this merge (the base or the adapter): "
                         "pick another output file.")
    if export_adapter is None:
        return
    exp = Path(export_adapter)
    if _same_file(exp, adapter_path) or _same_file(exp, base):
        raise MergeError(f"--export-adapter {exp} is an input of this merge: pick a new folder.")
    if exp.exists() and not exp.is_dir():
        raise MergeError(f"--export-adapter {exp} is a file: give a folder (new, or an "
                         "adapter folder to replace).")
    if exp.is_dir():
        other = sorted(p.name for p in exp.iterdir() if p.name not in ADAPTER_FOLDER_FILES)
        if other:
            raise MergeError(f"--export-adapter {exp} holds other files ({', '.join(other[:5])}"
                             f"{', ...' if len(other) > 5 else ''}); the export replaces the "
                             "whole folder: pick a new or empty folder.")


def merge(base: str | os.PathLike, adapter_path: str | os.PathLike, out: str | os.PathLike | None = None,
          dtype_name: str = "bf16", alpha: float | None = None, rank: int | None = None,
          safetensors: bool = False, export_adapter: str | os.PathLike | None = None,
          runtime_check: bool = True, log=print, progress: bool = True) -> MergeResult:
    """The whole stage: validate inputs, merge, verify, then (only if verified) write.
    `progress`: a bar on a terminal, else a line every few seconds while it verifies."""
    t0 = time.time()
    if dtype_name not in DTYPES:
        raise MergeError(f"--dtype {dtype_name!r}: choose one of {', '.join(DTYPES)}.")
    adapter_path = Path(adapter_path)
    base = Path(base)
    if not base.is_file():
        raise MergeError(f"{base}: base model not found (pass --base-model with the .pth the adapter "
                         f"was trained on).")
    ck = adapter_path if adapter_path.is_dir() else adapter_path.parent
    if (ck / COMPLETE_MARKER).is_file():  # a training checkpoint: its files as written?
        try:
            verify_checkpoint(ck)
        except CorruptCheckpoint as e:
            raise MergeError(f"checkpoint {ck.name} is damaged: {e} Merge the previous "
                             "checkpoint or the run's final adapter instead.") from None
    adapter = read_adapter(adapter_path, alpha=alpha, rank=rank)
    try:
        base_sd = load_state_dict(base)
    except CheckpointError as e:
        raise MergeError(f"base model: {e}") from e
    check_adapter_matches_base(adapter, base_sd)
    run_dir = runs.run_of(adapter_path)
    out = Path(out) if out else runs.merged_path(adapter_path, dtype_name)
    if out.suffix != ".pth":
        raise MergeError(f"--out {out}: must end in .pth (RWKV runtimes load .pth files).")
    _check_outputs(out, base, adapter_path, export_adapter)
    report_path = out.with_suffix(".verify.json")  # one per merged model
    failed_path = out.with_suffix(".verify-failed.json")
    run_cfg = runs.run_config(run_dir)
    settings = runs.run_settings(run_cfg)
    trained_on = runs.run_base_model(run_cfg)
    if trained_on and trained_on.is_file() and not _same_file(trained_on, base):
        log(f"[merge] warning: the run trained this adapter on {trained_on}, not {base}; "
            "the shapes match, but merging into another base gives another model")
    info = adapter.summary()
    log(f"[merge] base {base} ({base_sd['emb.weight'].dtype}), adapter {adapter.source} "
        f"({adapter.kind}: {info['modules']} modules, r={info['ranks']}, scale={info['scales']}"
        f"{', DoRA' if info['dora'] else ''}{', rsLoRA' if info['use_rslora'] else ''}"
        f"{f', {len(adapter.replacements)} whole tensors' if adapter.replacements else ''})")
    if settings.get("quant", "none") != "none":
        log(f"[merge] trained with QUANT={settings['quant']}: merging into the full-precision base "
            f"weights from {base}, not into re-quantised ones")

    merged = merge_state_dict(base_sd, adapter, DTYPES[dtype_name], dtype_name)
    need = sum(v.numel() * v.element_size() for v in merged.values())
    need *= 2 if safetensors else 1
    log(f"[merge] merged in fp32, rounded once to {dtype_name}; verifying logits ...")
    adapter_dir = adapter.source if adapter.kind == "peft" else None
    report = {
        "output": out.name,
        "base": str(base),
        "base_dtype": str(base_sd["emb.weight"].dtype).replace("torch.", ""),
        "adapter": info,
        "adapter_notes": adapter.notes,
        "dtype": dtype_name,
        "merge_precision": "fp32 (rounded once to the output dtype)",
        "trained_quant": settings.get("quant", "unknown" if run_dir is None else "none"),
        "merged_into": "full-precision base weights read from the .pth (never re-quantised)",
        "versions": {"torch": torch.__version__, "peft": _peft_version()},
    }
    checks = {}
    report["checks"] = checks
    tmp_out = out.parent / f".{out.stem}.verifying-{os.getpid()}.pth"
    # the verification is the long part (minutes on a 1.5B): never silent for long
    bar = Progress("[merge] verifying", verify_passes(dtype_name) + 2 * runtime_check,
                   "forward pass", enabled=progress)
    try:
        checks["logits"] = verify_merge(base_sd, adapter, merged, dtype_name, adapter_dir,
                                        tick=bar.update)
        c = checks["logits"]
        log(f"[merge] logits: max|merged - (base + adapter)| = {c['max_abs_diff']:.3g} "
            f"(tolerance {c['tolerance']:.3g}; adapter effect {c['adapter_effect_max_abs']:.3g})")
        if not c["passed"]:
            raise VerificationError(
                f"merged model differs from base + adapter by {c['max_abs_diff']:.4g} on the probe "
                f"batch (tolerance {c['tolerance']:.4g}, {c['tolerance_rule']}). Not written.")
        out.parent.mkdir(parents=True, exist_ok=True)
        save_pth(merged, tmp_out)
        if runtime_check:
            idx = probe_batch(int(base_sd["emb.weight"].shape[0]))
            ours = model_logits(merged, idx)
            bar.update()
            del base_sd
            bar.set_description("[merge] verifying in the rwkv pip package")
            try:
                theirs = upstream.run_rwkv_pip(tmp_out, idx)
            except upstream.UpstreamError as e:
                raise VerificationError(str(e)) from e
            bar.update()
            rscale = max(1.0, float(ours.abs().max()))
            rdiff = float((theirs - ours).abs().max()) if theirs.shape == ours.shape else float("inf")
            checks["rwkv_pip"] = {
                "package": f"rwkv {runs.package_version('rwkv') or '?'}", "env": "RWKV_V7_ON=1",
                "strategy": "cpu fp32", "max_abs_diff_vs_ours": rdiff,
                "tolerance": RUNTIME_TOL * rscale,
                "tolerance_rule": f"{RUNTIME_TOL:g} x max(1, max|logit|)",
                "passed": bool(torch.isfinite(theirs).all()) and rdiff <= RUNTIME_TOL * rscale,
            }
            log(f"[merge] rwkv pip package: loads and runs; max|rwkv - ours| = {rdiff:.3g}")
            if not checks["rwkv_pip"]["passed"]:
                raise VerificationError(
                    f"the rwkv pip package's logits for the merged file differ from ours by "
                    f"{rdiff:.4g} (tolerance {RUNTIME_TOL * rscale:.4g}). Not written.")
        else:
            checks["rwkv_pip"] = {"skipped": True}
        report["passed"] = True
        bar.close()
        report["sha256"] = file_sha256(tmp_out)
        report["seconds"] = round(time.time() - t0, 2)
        os.replace(tmp_out, out)
    except BaseException as e:
        bar.close()
        with contextlib.suppress(OSError):  # (on a read-only disk this fails too)
            tmp_out.unlink()
        if not isinstance(e, MergeError) and disk_error(e, out.parent) is not None:
            raise _disk_full(e, out, need) from e
        if isinstance(e, MergeError):
            report["passed"] = False
            report["error"] = str(e)
            atomic_write_bytes(failed_path, (json.dumps(report, indent=2) + "\n").encode())
        raise
    extras = {}
    try:
        if safetensors:
            st = save_safetensors(merged, out.with_suffix(".safetensors"),
                                  {"format": "pt", "source": "rwkvforge merge",
                                   "sha256_pth": report["sha256"]})
            extras["safetensors"] = st.name
        if export_adapter:
            extras["peft_adapter"] = str(save_peft_adapter(adapter, export_adapter))
        report["exports"] = extras
        atomic_write_bytes(report_path, (json.dumps(report, indent=2) + "\n").encode())
    except (OSError, RuntimeError) as e:
        if disk_error(e, out.parent) is None:
            raise
        raise _disk_full(e, out, need, done=f"{out.name} was written, its report and "
                         "exports were not") from e
    with contextlib.suppress(FileNotFoundError):
        failed_path.unlink()
    return MergeResult(out, report, report_path)


def _disk_full(e: BaseException, out: Path, need: int,
               done: str = "nothing was written") -> MergeError:
    """A write of merge that failed for the disk's sake: what, how much space, what next."""
    what = disk_error(e, out.parent) or "a write failed"
    head = (f"{what}: writing the merged model {out} failed ({type(e).__name__}: "
            f"{(str(e).splitlines() or [''])[0]}).")
    if what == READ_ONLY:
        return MergeError(f"{head} Pass --out on a writable disk (or remount this one "
                          f"read-write), then run the same merge command again ({done}).")
    return MergeError(f"{head} It needs about {fmt_mb(need)}; "
                      f"{fmt_mb(free_bytes(out.parent))} is free there. Free some space (or "
                      f"pass --out on a disk with room), then run the same merge command "
                      f"again ({done}).")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rwkvforge merge", description=__doc__.split("\n\n")[0],
        epilog="Writes <out>.pth (+ .safetensors) and <out>.verify.json next to it, only if verified. "
               "PiSSA adapters: merge the converted export rwkvforge train writes (a plain LoRA).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", dest="base", type=Path, default=None,
                    help="base model .pth (default: the run's model, from runs/<run>/config.json)")
    ap.add_argument("--base", dest="base", type=Path, help=argparse.SUPPRESS)  # old name
    ap.add_argument("--adapter", type=Path, required=True,
                    help="runs/<run>/adapter, a PEFT adapter folder, or an RWKV-PEFT LoRA .pth")
    ap.add_argument("--out", type=Path, default=None,
                    help="output .pth (default: runs/<run>/merged/<run>-<dtype>.pth, or "
                         "models/merged/<adapter>-<dtype>.pth)")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16",
                    help="output dtype: bf16 (default; what BlinkDL ships), fp16, fp32 (exact)")
    ap.add_argument("--alpha", type=float, default=None,
                    help="lora_alpha (required for RWKV-PEFT .pth files, which do not store it)")
    ap.add_argument("--rank", type=int, default=None, help="lora_r, checked against the file")
    ap.add_argument("--safetensors", action="store_true",
                    help="also write the merged model as <out>.safetensors")
    ap.add_argument("--export-adapter", type=Path, default=None, metavar="DIR",
                    help="also write the adapter in PEFT layout to DIR, a new folder or an adapter folder to replace (e.g. for RWKV-PEFT files)")
    args = ap.parse_args(argv)

    if not args.adapter.exists():
        print(f"error: --adapter {args.adapter}: not found (give runs/<run>/adapter, a "
              "checkpoint folder, a PEFT adapter folder or an RWKV-PEFT .pth).",
              file=sys.stderr)
        return 2
    adapter = resolve_adapter_path(args.adapter)
    if adapter != args.adapter:  # a run folder: its final adapter
        args.adapter = adapter
        print(f"[merge] using the run's final adapter {args.adapter}", file=sys.stderr)
    base = args.base or runs.run_base_model(runs.run_config(runs.run_of(args.adapter)))
    if base is None:
        print("error: --base-model is required (the adapter is not inside a run folder with "
              "config.json naming its model).", file=sys.stderr)
        return 2
    try:
        res = merge(base, args.adapter, args.out, args.dtype, args.alpha, args.rank,
                    args.safetensors, args.export_adapter,
                    log=lambda m: print(m, file=sys.stderr))
    except MergeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"merged model: {res.output}")
    print(f"verification: {res.report_path}")
    for k, v in res.report.get("exports", {}).items():
        print(f"{k}: {v}")
    note = run_state_note(args.adapter, "the merged .pth holds the weights only")
    if note:
        print(f"[merge] {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

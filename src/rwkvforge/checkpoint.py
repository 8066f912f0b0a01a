"""Every on-disk model format: BlinkDL `.pth` checkpoints in and out, and atomic writes.

    from rwkvforge.checkpoint import load_model
    model = load_model("models/base/rwkv7-tiny-demo.pth")

Files are read with `torch.load(..., weights_only=True)` and validated: a file that is not an
RWKV-7 checkpoint (an RWKV-4/5/6 model, a truncated download, a training-state dict, integer
tensors, missing keys, wrong shapes) raises `CheckpointError` saying what was found and what
was expected. Writes go to a temporary name in the same folder and are renamed into place.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shlex
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import load_file

from rwkvforge.model.rwkv7 import RWKV7, RWKV7Config


class CheckpointError(ValueError):
    """A model file that cannot be used, with what was wrong and what to do."""


# the weight dtypes by the names the commands take (--dtype)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_FLOAT_DTYPES = tuple(DTYPES.values())
# keys present in some RWKV-7 exports that the model does not use (layer 0 has no value residual)
_IGNORED_KEYS = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
_REQUIRED_MARKERS = ("emb.weight", "blocks.0.att.r_k", "blocks.0.att.w0", "head.weight")


# ---- loading -------------------------------------------------------------------------------------
def _detect_family(keys: set[str]) -> str | None:
    """Name the model family of a non-RWKV-7 state dict, or None when it looks like RWKV-7."""
    if "blocks.0.att.r_k" in keys and "blocks.0.att.k_k" in keys:
        return None
    if any(k.startswith(("model.layers.", "transformer.h.", "model.decoder.")) for k in keys):
        return "a Hugging Face transformer (not an RWKV .pth)"
    if any(k.startswith("rwkv.") for k in keys):
        return "a Hugging Face RWKV export (rwkv.blocks.*); use BlinkDL's .pth file instead"
    if "blocks.0.att.time_maa_x" in keys or "blocks.0.att.time_decay_w1" in keys:
        return "an RWKV-6 checkpoint (found blocks.0.att.time_maa_x / time_decay_w1)"
    if "blocks.0.att.time_faaaa" in keys:
        return "an RWKV-5 checkpoint (found blocks.0.att.time_faaaa)"
    if "blocks.0.att.time_first" in keys:
        return "an RWKV-4 checkpoint (found blocks.0.att.time_first)"
    return None


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read and validate an RWKV-7 `.pth` (fp32 / bf16 / fp16) into a dict of CPU tensors.
    A folder in the Hugging Face RWKV-7 layout (config.json + safetensors, fla-hub
    `RWKV7ForCausalLM`) is read into the same BlinkDL names and shapes (rwkvforge.hf)."""
    path = Path(path)
    if is_hf_folder(path):
        return load_hf_folder(path)
    if not path.is_file():
        hint = " Run `rwkvforge demo-model` to create the demo model." if "demo" in path.name else ""
        raise CheckpointError(f"{path}: model file not found.{hint}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # old (non-zip) serialisation cannot be memory-mapped
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure here means "not a readable .pth"
        size = path.stat().st_size
        raise CheckpointError(
            f"{path}: cannot be read as a PyTorch checkpoint ({size} bytes; {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}). The file may be truncated (an "
            f"interrupted download or copy) or not a .pth at all; download or generate it again."
        ) from e
    sd = validate_state_dict(obj, source=str(path))
    check_finite_weights(sd, str(path))
    return sd


def check_finite_weights(sd: dict[str, torch.Tensor], source: str) -> None:
    """A model whose weights hold NaN / Inf gives NaN losses and empty generations, which
    look like a diverged run: name the first bad tensor at load instead."""
    for k, v in sd.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise CheckpointError(
                f"{source}: tensor {k} holds {bad} NaN/Inf value(s) (of {v.numel()}): the "
                f"model file is damaged (a broken conversion, download or merge), and "
                f"training or generating from it gives NaN. Download or convert the model "
                f"again.")


def validate_state_dict(obj, source: str = "<state_dict>") -> dict[str, torch.Tensor]:
    """Check that `obj` is an RWKV-7 state dict; return it (unwrapping {'state_dict': ...})."""
    if isinstance(obj, dict) and len(obj) <= 4:
        for wrapper in ("state_dict", "model", "module"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(
            f"{source}: holds a {type(obj).__name__}, expected a dict of tensors "
            f"(an RWKV-7 .pth state dict with keys like emb.weight, blocks.0.att.r_k)."
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        k = bad[0]
        raise CheckpointError(
            f"{source}: entry {k!r} is a {type(obj[k]).__name__}, not a tensor; this looks like "
            f"a training-state file, not model weights. Expected an RWKV-7 .pth state dict."
        )
    keys = set(obj)
    family = _detect_family(keys)
    if family is not None:
        raise CheckpointError(
            f"{source}: this is {family}. rwkvforge works with RWKV-7 (\"x070\") models only; "
            f"use an rwkv7 .pth (e.g. rwkv7-g1 from huggingface.co/BlinkDL)."
        )
    missing = [k for k in _REQUIRED_MARKERS if k not in keys]
    if missing:
        raise CheckpointError(
            f"{source}: not an RWKV-7 checkpoint: missing {', '.join(missing)} "
            f"({len(keys)} keys, e.g. {', '.join(sorted(keys)[:3]) or 'none'})."
        )
    for k, v in obj.items():
        if v.dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{source}: tensor {k} has dtype {v.dtype}; expected float32, bfloat16 or "
                f"float16 weights (quantised / integer checkpoints are not supported)."
            )
    return obj


def infer_config(sd: dict[str, torch.Tensor]) -> RWKV7Config:
    """Read every shape (layers, width, heads, head size, LoRA ranks, FFN, vocab) from `sd`."""
    def get(k: str) -> torch.Tensor:
        if k not in sd:
            raise CheckpointError(f"checkpoint is missing {k}; expected a complete RWKV-7 state dict")
        return sd[k]

    vocab, C = get("emb.weight").shape
    H, N = get("blocks.0.att.r_k").shape
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_layer = max(layers) + 1
    if layers != set(range(n_layer)):
        gaps = sorted(set(range(n_layer)) - layers)
        raise CheckpointError(f"checkpoint has no tensors for layer(s) {gaps} of {n_layer}")
    if H * N != C:
        raise CheckpointError(f"blocks.0.att.r_k is {H}x{N} = {H * N} but emb.weight width is {C}")
    d_mv = sd["blocks.1.att.v1"].shape[1] if "blocks.1.att.v1" in sd else RWKV7Config.suggested(1, C).d_mv
    return RWKV7Config(
        vocab_size=int(vocab),
        n_layer=n_layer,
        n_embd=int(C),
        head_size=int(N),
        dim_ffn=int(get("blocks.0.ffn.key.weight").shape[0]),
        d_decay=int(get("blocks.0.att.w1").shape[1]),
        d_aaa=int(get("blocks.0.att.a1").shape[1]),
        d_mv=int(d_mv),
        d_gate=int(get("blocks.0.att.g1").shape[1]),
    )


def conform_state_dict(sd: dict[str, torch.Tensor], cfg: RWKV7Config, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Match `sd` against the model's expected keys and shapes; reshape squeezed vectors
    (some converters store x_r as (C,) instead of (1,1,C)); drop ignorable keys."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RWKV7(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    extra = sorted(set(sd) - set(expected) - _IGNORED_KEYS)
    if missing:
        raise CheckpointError(
            f"{source}: missing {len(missing)} RWKV-7 tensor(s): {', '.join(missing[:6])}"
            f"{' ...' if len(missing) > 6 else ''} (shape {cfg.n_layer}L x {cfg.n_embd}C inferred)."
        )
    if extra:
        raise CheckpointError(
            f"{source}: unexpected tensor(s) {', '.join(extra[:6])}{' ...' if len(extra) > 6 else ''}; "
            f"not a plain RWKV-7 model (variants such as DeepEmbed are not supported)."
        )
    out = {}
    for k, shape in expected.items():
        t = sd[k]
        if tuple(t.shape) != shape:
            if t.numel() != math_prod(shape):
                raise CheckpointError(
                    f"{source}: tensor {k} has shape {tuple(t.shape)}, expected {shape} for a "
                    f"model with n_embd={cfg.n_embd}, head_size={cfg.head_size}."
                )
            t = t.reshape(shape)
        out[k] = t
    return out


def math_prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def load_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu") -> RWKV7:
    """Load a BlinkDL RWKV-7 `.pth` into an `RWKV7` (eval mode) with weights in `dtype`."""
    sd = load_state_dict(path)
    cfg = infer_config(sd)
    return model_from_state_dict(sd, cfg, dtype=dtype, device=device, source=str(path))


def model_from_state_dict(sd, cfg: RWKV7Config | None = None, dtype=torch.float32, device="cpu", source="state_dict") -> RWKV7:
    cfg = cfg or infer_config(sd)
    sd = conform_state_dict(sd, cfg, source=source)
    with torch.device("meta"):
        model = RWKV7(cfg)
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    model.load_state_dict(sd, assign=True, strict=True)
    return model.eval()


# ---- writing -------------------------------------------------------------------------------------
def _umask_mode() -> int:
    """0o666 minus the process umask: what a plain open() would have given the file."""
    old = os.umask(0o022)
    os.umask(old)
    return 0o666 & ~old


def compact_cpu(t: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor that owns exactly its storage (torch.save writes whole storages)."""
    t = t.detach().to("cpu").contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside folder `path` durable (POSIX; a no-op where a folder cannot be
    opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Create `path` atomically: the body writes the yielded temp path (same folder, normal
    file permissions); on success it is fsynced and renamed over `path`, on any error it is
    removed, so `path` is either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp makes 0600 (and a writer may have recreated the file): normal permissions
        os.chmod(tmp, _umask_mode())
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _atomic_write(path: str | os.PathLike, write: Callable[[Any], None]) -> Path:
    """Create `path` atomically (see atomic_output) from `write(fileobj)`."""
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        write(f)
    return Path(path)


def save_pth(sd: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write a state dict as a `.pth` atomically (temp file in the same folder, then rename)."""
    clean = {k: compact_cpu(v) for k, v in sd.items()}
    return _atomic_write(path, lambda f: torch.save(clean, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically."""
    return _atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Build a folder under `<path>.tmp` and rename it to `path` only if the block succeeds.

        with atomic_dir(run / "checkpoints" / "step-100") as d:
            save_pth(sd, d / "model.pth")
    An existing `path` is replaced; on error the temporary folder is removed.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old, ignore_errors=True)


# ---- resume state --------------------------------------------------------------------------------
# The trainer state of a run's checkpoints/step-N/ (the adapter next to it: rwkvforge.adapter).
#   save_trainer_state(path, state) / load_trainer_state(path)   (torch.save, weights_only)
#   write_checkpoint(run_dir, step, fill) -> checkpoints/step-N (COMPLETE written last)
#   latest_checkpoint(run_dir) -> newest complete checkpoints/step-N or None
TRAINER_STATE = "trainer_state.pt"
COMPLETE_MARKER = "COMPLETE"
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def _rng_to_plain(x):
    """numpy RNG state -> weights_only-loadable types (ndarray -> tensor)."""
    import numpy as np

    if isinstance(x, np.ndarray):
        return torch.from_numpy(x.copy())
    if isinstance(x, (tuple, list)):
        return type(x)(_rng_to_plain(v) for v in x)
    if isinstance(x, dict):
        return {k: _rng_to_plain(v) for k, v in x.items()}
    if isinstance(x, np.generic):
        return x.item()
    return x


def save_trainer_state(path: str | os.PathLike, state: dict) -> Path:
    """torch.save `state` atomically; numpy arrays become tensors so that
    `torch.load(weights_only=True)` reads it back."""
    import io

    buf = io.BytesIO()
    torch.save(_rng_to_plain(state), buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_trainer_state(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: trainer state not found; the checkpoint is incomplete.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e}); resume from "
                              "an earlier checkpoint (delete this step folder).") from e


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[tuple[int, Path, bool]]:
    """(step, path, complete) of every checkpoints/step-N, by step."""
    root = Path(run_dir) / "checkpoints"
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR_RE.match(p.name)
            if m and p.is_dir():
                out.append((int(m.group(1)), p, (p / COMPLETE_MARKER).is_file()))
    return sorted(out)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoints/step-N of a run (None when there is none)."""
    done = [p for _, p, ok in checkpoint_dirs(run_dir) if ok]
    return done[-1] if done else None


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file, read in 1 MiB blocks (checkpoint checksums, merge and export reports)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def complete_marker(folder: str | os.PathLike, step: int) -> bytes:
    """The COMPLETE marker of a checkpoint folder: its step and the sha256 of every file in
    it (sub-folders too, e.g. DeepSpeed's shards), verified on resume and merge."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_sha256(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != COMPLETE_MARKER}
    return (json.dumps({"step": step, "sha256": files}, indent=1) + "\n").encode()


class CorruptCheckpoint(CheckpointError):
    """A complete checkpoint whose files do not match the checksums in its COMPLETE."""


def verify_checkpoint(ck: str | os.PathLike) -> int:
    """Check every file of checkpoint folder `ck` against the sha256 in its COMPLETE marker;
    returns the number of files checked (0: a marker from before checksums, nothing to check).
    Raises CorruptCheckpoint naming the first file that is missing or changed."""
    ck = Path(ck)
    raw = (ck / COMPLETE_MARKER).read_bytes()
    try:
        marker = json.loads(raw)
    except ValueError:
        if raw.startswith(b"step "):
            return 0  # written before checksums were recorded: nothing to verify against
        raise CorruptCheckpoint(f"{ck / COMPLETE_MARKER}: damaged (not the marker this tool "
                                "writes); the checkpoint cannot be trusted.") from None
    sums = marker.get("sha256") if isinstance(marker, dict) else None
    if not isinstance(sums, dict):
        raise CorruptCheckpoint(f"{ck / COMPLETE_MARKER}: damaged (no checksums); the "
                                "checkpoint cannot be trusted.")
    for name, want in sorted(sums.items()):
        f = ck / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing from the checkpoint (COMPLETE lists it).")
        got = file_sha256(f)
        if got != want:
            raise CorruptCheckpoint(f"{f}: checksum mismatch (sha256 {got[:12]}..., COMPLETE "
                                    f"recorded {want[:12]}...): the file changed after it was "
                                    "written (disk or copy damage).")
    return len(sums)


def write_checkpoint(run_dir: str | os.PathLike, step: int, fill) -> Path:
    """Create runs/<run>/checkpoints/step-N atomically: `fill(tmp_dir)` writes the files into
    step-N.tmp, then COMPLETE (with each file's sha256) is written (fsynced) and the folder
    renamed. A crash at any point leaves no folder that looks complete."""
    final = Path(run_dir) / "checkpoints" / f"step-{step}"
    with atomic_dir(final) as tmp:
        fill(tmp)
        atomic_write_bytes(tmp / COMPLETE_MARKER, complete_marker(tmp, step))
    return final


def prune_checkpoints(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """KEEP_CHECKPOINTS: remove all but the newest `keep` complete checkpoints (0 keeps all;
    the newest complete one is never removed). Incomplete folders older than the newest
    complete one go too (left by a crash, never resumable). Returns what was removed."""
    if keep <= 0:
        return []
    dirs = checkpoint_dirs(run_dir)
    done = [p for _, p, ok in dirs if ok]
    if not done:
        return []
    newest = done[-1]
    drop = done[:-max(keep, 1)]
    drop += [p for step, p, ok in dirs if not ok and p.name != newest.name
             and step < int(_STEP_DIR_RE.match(newest.name).group(1))]
    for p in drop:
        shutil.rmtree(p, ignore_errors=True)
    return drop


# ---- full disk -----------------------------------------------------------------------------------
READ_ONLY = "the disk is read-only"  # disk_error's words for EROFS (callers say what to do)
_DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is exceeded",
                errno.EROFS: READ_ONLY, errno.EFBIG: "the file is too large "
                "for the filesystem"}


# what torch.save's zip writer says when a write comes up short (no errno attached)
_TORCH_WRITE_FAILED = ("PytorchStreamWriter failed", "file write failed", "unexpected pos")


def verified_checkpoint(run_dir: str | os.PathLike, fallback: bool = False,
                        warn: Callable[[str], None] = print) -> Path | None:
    """The newest complete checkpoint whose files match the checksums in its COMPLETE (None:
    there is none). A mismatch raises CorruptCheckpoint naming the file and the way out; with
    `fallback` (--fallback-checkpoint) the previous complete checkpoint is tried instead."""
    run_dir = Path(run_dir)
    done = [p for _, p, ok in checkpoint_dirs(run_dir) if ok]
    for ck in reversed(done):
        try:
            verify_checkpoint(ck)
            return ck
        except CorruptCheckpoint as e:  # noqa: PERF203 - a few checkpoints, once per resume
            if not fallback:
                raise CorruptCheckpoint(
                    f"checkpoint {ck.name} is damaged: {e} Resume from the previous complete "
                    f"checkpoint with: rwkvforge train --resume {shlex.quote(str(run_dir))} "
                    "--fallback-checkpoint") from None
            warn(f"checkpoint {ck.name} is damaged ({e}); --fallback-checkpoint: trying the "
                 "previous complete one")
    if done and fallback:
        raise CorruptCheckpoint("every complete checkpoint is damaged (see above); start a "
                                "new run.")
    return None


def disk_error(e: BaseException, where: str | os.PathLike | None = None) -> str | None:
    """What a failed write means when it is the disk's fault (full, quota, read-only), or
    None. Looks through the exception chain; torch.save's "PytorchStreamWriter failed
    writing" RuntimeError carries no errno: it counts as a full disk when `where`'s
    filesystem has (almost) no space left."""
    seen = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in _DISK_ERRNOS:
            return _DISK_ERRNOS[x.errno]
        if isinstance(x, RuntimeError) and any(m in str(x) for m in _TORCH_WRITE_FAILED):
            if where is None:
                return "a write failed (is the disk full?)"
            free = free_bytes(where)
            return ("the disk is full" if free is not None and free < (16 << 20)
                    else "a write failed (is the disk full?)")
        x = x.__cause__ or x.__context__
    return None


def free_bytes(where: str | os.PathLike) -> int | None:
    """Free bytes on the filesystem of `where` (its nearest existing parent)."""
    p = Path(where)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def fmt_mb(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / 2**20:,.1f} MB" if n < 2**30 else f"{n / 2**30:,.2f} GB"


# ---- the Hugging Face RWKV-7 layout, read (fla-hub RWKV7ForCausalLM; the writer: hf.py) ----------
HF_ARCHITECTURES = ("RWKV7ForCausalLM", "Rwkv7ForCausalLM")
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
HF_PROJ = {"receptance": "r_proj", "key": "k_proj", "value": "v_proj", "output": "o_proj",
         "ln_x": "g_norm"}
HF_LN = {"ln0": "pre_norm", "ln1": "attn_norm", "ln2": "ffn_norm"}
HF_LORA_SLOT = {"0": "lora.2.bias", "1": "lora.0.weight", "2": "lora.2.weight"}


HF_TOP = {"emb.weight": "model.embeddings.weight", "ln_out.weight": "model.norm.weight",
          "ln_out.bias": "model.norm.bias", "head.weight": "lm_head.weight"}


def blinkdl_name(name: str) -> tuple[str, bool]:
    """(BlinkDL name, transposed) of an HF tensor name; CheckpointError when unknown."""
    top = {v: k for k, v in HF_TOP.items()}
    if name in top:
        return top[name], False
    m = re.fullmatch(r"model\.layers\.(\d+)\.(\w+)\.(.+)", name)
    if not m:
        raise CheckpointError(f"HF tensor {name!r} is not part of an RWKV-7 model.")
    i, part, rest = m.groups()
    inv_ln = {v: k for k, v in HF_LN.items()}
    if part in inv_ln:
        return f"blocks.{i}.{inv_ln[part]}.{rest}", False
    if part == "ffn":
        return f"blocks.{i}.ffn.{rest}", False
    if part != "attn":
        raise CheckpointError(f"HF tensor {name!r} is not part of an RWKV-7 model.")
    lm = re.fullmatch(r"([wvag])_lora\.(lora\.2\.bias|lora\.0\.weight|lora\.2\.weight)", rest)
    if lm:
        slot = {v: k for k, v in HF_LORA_SLOT.items()}[lm.group(2)]
        return f"blocks.{i}.att.{lm.group(1)}{slot}", slot != "0"
    head, _, tail = rest.partition(".")
    inv_proj = {v: k for k, v in HF_PROJ.items()}
    if head in inv_proj:
        return f"blocks.{i}.att.{inv_proj[head]}.{tail}", False
    return f"blocks.{i}.att.{rest}", False


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], source: str = "HF folder"
                       ) -> dict[str, torch.Tensor]:
    """HF names and shapes back to a validated BlinkDL state dict (vectors as (1,1,C))."""
    sd = {}
    for k, v in hf_sd.items():
        name, transposed = blinkdl_name(k)
        sd[name] = v.t().contiguous() if transposed else v
    sd = validate_state_dict(sd, source=source)
    return conform_state_dict(sd, infer_config(sd), source=source)


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def load_hf_folder(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """An HF RWKV-7 folder as a validated BlinkDL state dict (tensors in the file's dtype)."""
    p = Path(path)
    try:
        hf_config = json.loads((p / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{p}/config.json: cannot be read ({e}).") from e
    arch = hf_config.get("architectures") or []
    if hf_config.get("model_type") != "rwkv7" and not set(arch) & set(HF_ARCHITECTURES):
        raise CheckpointError(
            f"{p}: config.json says model_type={hf_config.get('model_type')!r}, architectures={arch}: "
            "not an RWKV-7 model in the HF layout (fla-hub RWKV7ForCausalLM). rwkvforge imports "
            "only RWKV-7; give a BlinkDL .pth or an fla-hub rwkv7 folder.")
    if (p / HF_INDEX).is_file():
        shards = sorted(set(json.loads((p / HF_INDEX).read_text())["weight_map"].values()))
        files = [p / s for s in shards]
    elif (p / HF_WEIGHTS).is_file():
        files = [p / HF_WEIGHTS]
    else:
        found = sorted(x.name for x in p.iterdir())[:8]
        raise CheckpointError(f"{p}: no {HF_WEIGHTS} (or {HF_INDEX}) in the folder (found: "
                              f"{', '.join(found) or 'nothing'}). Only safetensors weights are "
                              "read; convert .bin shards with transformers' save_pretrained.")
    hf_sd: dict[str, torch.Tensor] = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: shard named in {HF_INDEX} is missing; download it again.")
        try:
            hf_sd.update(load_file(str(f)))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{f}: cannot be read as safetensors ({e}); the file may be "
                                  "truncated: download it again.") from e
    sd = from_hf_state_dict(hf_sd, source=str(p))
    mine = infer_config(sd)
    for key, want in (("hidden_size", mine.n_embd), ("num_hidden_layers", mine.n_layer),
                      ("vocab_size", mine.vocab_size)):
        if key in hf_config and int(hf_config[key]) != want:
            raise CheckpointError(f"{p}: config.json {key}={hf_config[key]} but the weights have {want}; "
                                  "the folder mixes two models.")
    return sd

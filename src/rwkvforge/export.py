"""Export a (tuned) RWKV-7 model for other runtimes: GGUF (llama.cpp / Ollama / LM Studio), the
Hugging Face layout (fla-hub RWKV7ForCausalLM: transformers, vLLM / SGLang forks) and ai00.

    rwkvforge export --format gguf --adapter runs/<run>               # the run's merged model, f16
    rwkvforge export --format gguf --dtype q8_0 --base-model X.pth --out out/x-q8_0.gguf
    rwkvforge export --format hf --adapter runs/<run> --out out/my-model-hf
    rwkvforge export --format ai00 --base-model X.pth --out out/x.st
    ./scripts/export.sh --format gguf --adapter runs/<run>

Input: a base model (`--base-model`: a BlinkDL .pth or an HF RWKV-7 folder; default the run's
model, else BASE_MODEL / the demo model) and optionally an adapter (`--adapter`: a run folder,
a PEFT adapter folder or an RWKV-PEFT .pth), merged in memory in fp32 exactly as `rwkvforge
merge --dtype fp32` would, then written once in the output's dtype.

Outputs (each written to a temporary name and renamed; nothing on failure):
  gguf  <out>.gguf (f16 default, bf16, q8_0, f32) + <out>.Modelfile for `ollama create`;
  hf    folder <out>/ (config.json, model.safetensors, World vocabulary, tokenizer_config.json);
  ai00  <out>.st: safetensors as ai00's converter writes them (web-rwkv 0.10.20
        assets/scripts/convert_safetensors.py: every tensor fp16, names lower-cased, matrices
        whose name contains w1 w2 a1 a2 g1 g2 v1 v2 / time_state transposed), and with
        --state a tuned state as <out>.state.st for ai00's [[state]].
and <out>.verify.json (e.g. x.gguf.verify.json): what was checked, against what, with which tolerance.

Verification:
1. read back: the written file is read again (gguf package / safetensors) and mapped back to
   BlinkDL names: every tensor must be there with the expected dtype, and equal to the source
   rounded the same way (bit for bit for fp16 / bf16 / fp32 tensors);
2. rounding effect: our logits on the file's own weights vs the fp32 source on a fixed probe
   (reported: what the dtype costs);
3. runtime (gguf, `--verify auto` when llama-cpp-python is built, see
   scripts/llama_cpp_venv.sh; `require` makes it mandatory): llama.cpp loads the file, its
   logits on the probe prompt must match ours on the same weights within
   FP32_TOL x max(1, max|logit|) + RUNTIME_FACTOR x the rounding effect of step 2 (llama.cpp
   also rounds the activations to the weights' type before each matmul, an error of the same
   size as rounding the weights), its tokenizer must give our ids for the prompt, and for
   f16 / bf16 / f32 its greedy continuation must equal ours token for token.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from rwkvforge import gguf_file, hf, paths, runs
from rwkvforge.progress import Progress, bar_fits
from rwkvforge.adapter import (
    MergeError,
    check_adapter_matches_base,
    merge_state_dict,
    read_adapter,
    resolve_adapter_path,
)
from rwkvforge.checkpoint import (
    DTYPES,
    file_sha256,
    infer_config,
    HF_WEIGHTS,
    CheckpointError,
    atomic_output,
    atomic_write_bytes,
    load_state_dict,
    model_from_state_dict,
)
from rwkvforge.gguf_file import blinkdl_to_gguf_name
from rwkvforge.tokenizer import get_tokenizer
from rwkvforge import config
from rwkvforge.demo import resolve_base_model

FORMATS = ("gguf", "hf", "ai00")
DEFAULT_DTYPE = {"gguf": "f16", "hf": "bf16", "ai00": "fp16"}
ALLOWED_DTYPES = {"gguf": ("f16", "bf16", "q8_0", "f32"), "hf": tuple(DTYPES), "ai00": ("fp16",)}
FP32_TOL = 1e-4  # summation order / kernel differences only (see merge.py)
RUNTIME_FACTOR = 3.0
PROBE_PROMPT = "User: What is the capital of France?\n\nAssistant:"
N_NEW = 16
# web-rwkv 0.10.20 assets/scripts/convert_safetensors.py (what ai00 loads), read at its source
AI00_RENAME = {"time_faaaa": "time_first", "time_maa": "time_mix", "lora_A": "lora.0",
               "lora_B": "lora.1"}
AI00_TRANSPOSE = ("time_mix_w1", "time_mix_w2", "time_decay_w1", "time_decay_w2",
                  "w1", "w2", "a1", "a2", "g1", "g2", "v1", "v2", "time_state", "lora.0")
AI00_CONVERTER = "web-rwkv 0.10.20 assets/scripts/convert_safetensors.py (ai00_server's loader)"


class ExportError(ValueError):
    """Bad export input or a failed check (no output was written)."""


# ---- ai00 ----------------------------------------------------------------------------------------
def ai00_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`sd` as ai00's converter writes it: rename, lower-case, fp16, transpose the named
    matrices (the first matching substring, last two dims)."""
    out = {}
    for k, v in sd.items():
        name = k
        for a, b in AI00_RENAME.items():
            if a in name:
                name = name.replace(a, b)
        name = name.lower()
        t = v.detach().half()
        for tn in AI00_TRANSPOSE:
            if tn in name:
                t = t.transpose(t.dim() - 2, t.dim() - 1) if t.dim() >= 2 else t
                break
        out[name] = t.contiguous()
    return out


def read_state_file(path: Path, n_layer: int, n_head: int, head_size: int) -> dict[str, torch.Tensor]:
    """A tuned initial state (.pth: blocks.{i}.att.time_state (H,N,N) per layer), checked."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise ExportError(f"--state {path}: cannot be read as a .pth ({type(e).__name__}).") from e
    want = {f"blocks.{i}.att.time_state" for i in range(n_layer)}
    if not isinstance(obj, dict) or set(obj) != want:
        got = sorted(obj)[:4] if isinstance(obj, dict) else type(obj).__name__
        raise ExportError(f"--state {path}: expected exactly blocks.0..{n_layer - 1}.att.time_state "
                          f"(a state-tuning output for this model), found {got}.")
    for k, v in obj.items():
        if tuple(v.shape) != (n_head, head_size, head_size):
            raise ExportError(f"--state {path}: {k} has shape {tuple(v.shape)}, expected "
                              f"{(n_head, head_size, head_size)} for this model.")
    return obj


# ---- checks --------------------------------------------------------------------------------------
@torch.no_grad()
def logits_of(sd: dict[str, torch.Tensor], ids: list[int]) -> torch.Tensor:
    model = model_from_state_dict(sd, dtype=torch.float32)
    model.wkv_impl = "ref"
    return model(torch.tensor([ids]))[0][0].float()


@torch.no_grad()
def greedy(sd: dict[str, torch.Tensor], ids: list[int], n_new: int) -> tuple[list[int], torch.Tensor]:
    """Our greedy continuation (and the logits each token was picked from), fp32."""
    model = model_from_state_dict(sd, dtype=torch.float32)
    model.wkv_impl = "ref"
    out, rows = [], []
    logits, state = model(torch.tensor([ids]))[:2]
    last = logits[0, -1].float()
    for _ in range(n_new):
        t = int(last.argmax())
        out.append(t)
        rows.append(last)
        logits, state = model(torch.tensor([[t]]), state)[:2]
        last = logits[0, -1].float()
    return out, torch.stack(rows)


def _compare(file_sd: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], exact: bool,
             what: str) -> dict:
    missing = sorted(set(expected) - set(file_sd))
    extra = sorted(set(file_sd) - set(expected))
    if missing or extra:
        raise ExportError(f"{what}: read back with missing {missing[:4]} / extra {extra[:4]} tensors.")
    worst = 0.0
    for k, v in expected.items():
        if tuple(file_sd[k].shape) != tuple(v.shape):
            raise ExportError(f"{what}: {k} reads back as {tuple(file_sd[k].shape)}, expected "
                              f"{tuple(v.shape)}.")
        d = float((file_sd[k].float() - v.float()).abs().max()) if v.numel() else 0.0
        worst = max(worst, d)
        if exact and d != 0.0:
            raise ExportError(f"{what}: {k} differs from the source by {d:.3g} after reading back.")
    return {"tensors": len(expected), "max_abs_weight_diff": worst, "exact": exact}


def _check_gguf_read_back(file_sd, src, qtypes: dict[str, str], what: str) -> dict:
    """Each tensor read back from the GGUF vs the source in BlinkDL layout: F32 / F16 / BF16
    tensors must equal the source rounded to that type bit for bit; Q8_0 ones must be within
    one quantisation step (max|w| / 127) of it. A name, order or transpose error fails here."""
    missing = sorted(set(src) - set(file_sd))
    if missing or set(file_sd) - set(src):
        raise ExportError(f"{what}: read back with missing {missing[:4]} / extra "
                          f"{sorted(set(file_sd) - set(src))[:4]} tensors.")
    rnd = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    worst = 0.0
    for k, v in src.items():
        q = qtypes[blinkdl_to_gguf_name(k)]
        got = file_sd[k].float()
        if tuple(got.shape) != tuple(v.shape):
            raise ExportError(f"{what}: {k} reads back as {tuple(got.shape)}, expected {tuple(v.shape)}.")
        if q in rnd:
            want = v.to(rnd[q]).float()
            ok = torch.equal(got, want)
            d = float((got - want).abs().max())
        else:
            d = float((got - v.float()).abs().max())
            ok = d <= float(v.float().abs().max()) / 127
        worst = max(worst, float((got - v.float()).abs().max()))
        if not ok:
            raise ExportError(f"{what}: {k} ({q}) reads back {d:.3g} away from the source: "
                              "the GGUF mapping is wrong.")
    return {"tensors": len(src), "max_abs_weight_diff": worst,
            "rule": "F32/F16/BF16 bit-exact vs the source rounded; Q8_0 within max|w|/127"}


# ---- formats -------------------------------------------------------------------------------------
def _export_gguf(sd, out: Path, dtype: str, verify: str, name: str, log) -> dict:
    if out.suffix != ".gguf":
        raise ExportError(f"--out {out}: a GGUF file must end in .gguf.")
    checks: dict = {}
    tmp = out.with_name(f".{out.name}.verifying-{os.getpid()}")
    try:
        t0 = time.time()
        summary = gguf_file.write_gguf(sd, tmp, dtype, name=name, progress=bar_fits())
        log(f"[export] wrote GGUF {dtype} ({summary['qtypes']}) in {time.time() - t0:.1f} s; verifying ...")
        meta, tensors, qtypes = gguf_file.read_gguf(tmp)
        file_sd = gguf_file.state_dict_from_gguf_tensors(tensors, int(meta["rwkv7.wkv.head_size"]))
        expected_q = {k: gguf_file.tensor_qtype(k, tuple(v.shape), dtype).name
                      for k, v in gguf_file.gguf_tensors(sd).items()}
        if qtypes != expected_q:
            bad = [k for k in expected_q if qtypes.get(k) != expected_q[k]][:4]
            raise ExportError(f"GGUF read back with unexpected tensor types: {bad}")
        src = {k: v for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
        checks["read_back"] = _check_gguf_read_back(file_sd, src, qtypes, str(out))
        checks["read_back"]["qtypes"] = summary["qtypes"]
        tok = get_tokenizer()
        ids = tok.encode(PROBE_PROMPT)
        ours_file = logits_of(file_sd, ids)
        ours_src = logits_of({k: v.float() for k, v in src.items()}, ids)
        rounding = float((ours_file - ours_src).abs().max())
        checks["rounding_effect"] = {"probe": PROBE_PROMPT, "tokens": len(ids),
                                     "max_abs_logit_diff_file_vs_fp32_source": rounding}
        py = gguf_file.llama_cpp_python()
        if verify == "off" or (verify == "auto" and py is None):
            checks["llama_cpp"] = {"skipped": True, "reason": "--verify off" if verify == "off" else
                                   f"llama-cpp-python not built at {gguf_file.llama_cpp_venv()} "
                                   "(./scripts/llama_cpp_venv.sh builds it)"}
            log(f"[export] llama.cpp check skipped: {checks['llama_cpp']['reason']}")
        else:
            try:
                res = gguf_file.run_llama_cpp(tmp, PROBE_PROMPT, ids, N_NEW)
            except gguf_file.RuntimeMissing as e:
                raise ExportError(str(e)) from e
            scale = max(1.0, float(ours_file.abs().max()))
            tol = FP32_TOL * scale + RUNTIME_FACTOR * rounding
            diff = float((res["prompt_logits"] - ours_file).abs().max())
            our_gen, our_rows = greedy(file_sd, ids, N_NEW)
            exact_greedy = dtype != "q8_0"
            c = {"runtime": f"llama-cpp-python {res['version']} (llama.cpp bundled), CPU",
                 "arch": res["arch"], "tokenizer": res["tokenizer"],
                 "tokenizer_matches": res["prompt_tokens"] == ids,
                 "max_abs_logit_diff_vs_ours": diff, "tolerance": tol,
                 "tolerance_rule": f"{FP32_TOL:g} x max(1, max|logit|) + {RUNTIME_FACTOR:g} x rounding effect",
                 "greedy_llama_cpp": res["greedy"], "greedy_ours": our_gen,
                 "greedy_equal": res["greedy"] == our_gen, "greedy_required": exact_greedy}
            c["passed"] = bool(res["arch"] == "rwkv7" and c["tokenizer_matches"] and diff <= tol
                               and (c["greedy_equal"] or not exact_greedy))
            checks["llama_cpp"] = c
            log(f"[export] llama.cpp {res['version']}: max|llama.cpp - ours| = {diff:.3g} "
                f"(tolerance {tol:.3g}); greedy {'equal' if c['greedy_equal'] else 'DIFFERENT'}"
                f" over {N_NEW} tokens; tokenizer {'matches' if c['tokenizer_matches'] else 'DIFFERS'}")
            if not c["passed"]:
                raise ExportError(f"llama.cpp disagrees with rwkvforge on {out.name}: {json.dumps(c)[:600]}")
        sha = file_sha256(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    mf = write_modelfile(out)
    return {"checks": checks, "sha256": sha, "files": [out.name, mf.name], "gguf": summary}


def modelfile_text(gguf_name: str) -> str:
    """An Ollama Modelfile for the World chat format (turns end with a blank line)."""
    return (
        f"# Ollama: ollama create my-rwkv -f {gguf_name.rsplit('.', 1)[0]}.Modelfile && ollama run my-rwkv\n"
        f"FROM ./{gguf_name}\n"
        'TEMPLATE """{{- if .System }}System: {{ .System }}\n\n{{ end }}'
        '{{- range .Messages }}{{- if eq .Role "user" }}User: {{ .Content }}\n\n'
        '{{ else if eq .Role "assistant" }}Assistant: {{ .Content }}\n\n{{ end }}{{- end }}'
        'Assistant:"""\n'
        'PARAMETER stop "\\n\\nUser:"\n'
        'PARAMETER stop "User:"\n'
        'PARAMETER stop "\\n\\n"\n'
        "PARAMETER temperature 1.0\n"
        "PARAMETER top_p 0.3\n"
        "PARAMETER repeat_penalty 1.0\n"
    )


def write_modelfile(gguf_path: Path) -> Path:
    mf = gguf_path.with_suffix(".Modelfile")
    atomic_write_bytes(mf, modelfile_text(gguf_path.name).encode())
    return mf


def _export_hf(sd, out: Path, dtype: str, log) -> dict:

    if out.exists() and not (out / "config.json").is_file():
        if not out.is_dir() or any(out.iterdir()):
            raise ExportError(f"--out {out}: exists and is not an HF model folder; pick a new folder.")
    tdt = DTYPES[dtype]
    hf.write_hf_folder(sd, out, tdt, metadata={"source": "rwkvforge export"})
    back = load_state_dict(out)
    src = {k: v.to(tdt) for k, v in sd.items() if k not in ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")}
    checks = {"read_back": _compare(back, src, exact=True, what=str(out))}
    log(f"[export] HF folder {out} read back: {checks['read_back']['tensors']} tensors equal the source in {dtype}")
    return {"checks": checks, "sha256": file_sha256(out / HF_WEIGHTS), "files": sorted(p.name for p in out.iterdir())}


def _export_ai00(sd, out: Path, state: Path | None, log) -> dict:
    from safetensors.torch import load_file, save_file

    if out.suffix not in (".st", ".safetensors"):
        raise ExportError(f"--out {out}: an ai00 model ends in .st (or .safetensors).")
    want = ai00_state_dict(sd)
    with atomic_output(out) as tmp:
        save_file(want, str(tmp), metadata={"format": "pt"})
        back = load_file(str(tmp))
        checks = {"read_back": _compare(back, want, exact=True, what=str(out)),
                  "layout": AI00_CONVERTER,
                  "dtypes": sorted({str(v.dtype).replace("torch.", "") for v in back.values()})}
        sha = file_sha256(tmp)
    files = [out.name]
    if state is not None:
        cfg = infer_config(sd)
        st = ai00_state_dict(read_state_file(state, cfg.n_layer, cfg.n_head, cfg.head_size))
        sp = out.with_name(out.stem + ".state.st")
        with atomic_output(sp) as tmp:
            save_file(st, str(tmp), metadata={"format": "pt"})
        files.append(sp.name)
    log(f"[export] ai00 model {out}: {len(want)} tensors, fp16, read back equal")
    return {"checks": checks, "sha256": sha, "files": files}


# ---- the stage -----------------------------------------------------------------------------------
def default_out(fmt: str, dtype: str, adapter: Path | None, base: Path) -> Path:
    ext = {"gguf": ".gguf", "hf": "-hf", "ai00": ".st"}[fmt]
    run_dir = runs.run_of(adapter) if adapter else None
    if run_dir is not None:
        return run_dir / "export" / f"{run_dir.name}-{dtype}{ext}"
    stem = (adapter.stem if adapter else base.stem)
    return paths.workspace_root() / "models" / "export" / f"{stem}-{dtype}{ext}"


def export(fmt: str, base: str | os.PathLike, adapter: str | os.PathLike | None = None,
           out: str | os.PathLike | None = None, dtype: str | None = None,
           state: str | os.PathLike | None = None, verify: str = "auto", log=print,
           progress: bool = True) -> dict:
    """The whole stage; returns the report (also written to <out>.verify.json). `progress`:
    a bar on a terminal (else a line every few seconds) counting the steps logged so far."""
    with Progress(f"[export] {fmt}", unit="steps done", enabled=progress) as bar:
        def say(msg: str) -> None:
            log(msg)
            bar.update()
        return _export(fmt, base, adapter, out, dtype, state, verify, say)


def _export(fmt: str, base: str | os.PathLike, adapter: str | os.PathLike | None,
            out: str | os.PathLike | None, dtype: str | None, state: str | os.PathLike | None,
            verify: str, log) -> dict:
    t0 = time.time()
    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}.")
    dtype = dtype or DEFAULT_DTYPE[fmt]
    if dtype not in ALLOWED_DTYPES[fmt]:
        raise ExportError(f"--dtype {dtype} is not available for --format {fmt}: choose one of "
                          f"{', '.join(ALLOWED_DTYPES[fmt])}.")
    if state is not None and fmt != "ai00":
        raise ExportError(f"--state: {fmt} runtimes have no way to load a tuned initial state "
                          "(llama.cpp / transformers start from zeros); export it with --format ai00.")
    base = Path(base)
    adapter_path = resolve_adapter_path(adapter) if adapter else None
    ad = read_adapter(adapter_path) if adapter_path else None
    try:
        sd = load_state_dict(base)
    except CheckpointError as e:
        raise ExportError(f"base model: {e}") from e
    if ad is not None:
        check_adapter_matches_base(ad, sd)
        sd = merge_state_dict(sd, ad, torch.float32, "fp32")
        log(f"[export] merged {ad.kind} adapter {adapter_path} into {base} in fp32")
    out = Path(out) if out else default_out(fmt, dtype, adapter_path, base)
    for p in [base, adapter_path] if adapter_path else [base]:
        with contextlib.suppress(OSError):
            if out.resolve() == Path(p).resolve():
                raise ExportError(f"--out {out} is an input of this export; pick another path.")
    name = (runs.run_of(adapter_path).name if adapter_path and runs.run_of(adapter_path)
            else (adapter_path or base).stem)
    report = {"format": fmt, "dtype": dtype, "base": str(base),
              "adapter": str(adapter_path) if adapter_path else None,
              "versions": {"torch": torch.__version__}}
    if fmt == "gguf":
        import gguf

        report["versions"]["gguf"] = getattr(gguf, "__version__", None) or (runs.package_version("gguf") or "?")
        res = _export_gguf(sd, out, dtype, verify, name, log)
    elif fmt == "hf":
        res = _export_hf(sd, out, dtype, log)
    else:
        res = _export_ai00(sd, out, Path(state) if state else None, log)
    report.update(res)
    report["output"] = str(out)
    report["passed"] = True
    report["seconds"] = round(time.time() - t0, 2)
    rp = out.with_name(out.name + ".verify.json")  # m.gguf.verify.json, m-hf.verify.json, ...
    atomic_write_bytes(rp, (json.dumps(report, indent=2) + "\n").encode())
    report["report_path"] = str(rp)
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="rwkvforge export", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Writes the model and <out>.verify.json next to it, only if every check passed.")
    ap.add_argument("--format", required=True, choices=FORMATS,
                    help="gguf (llama.cpp / Ollama / LM Studio), hf (transformers layout), ai00")
    ap.add_argument("--base-model", dest="base", default=None,
                    help="base .pth or HF RWKV-7 folder (default: the run's model, else BASE_MODEL "
                         "or the demo model)")
    ap.add_argument("--adapter", type=Path, default=None,
                    help="runs/<run> (its final adapter), a PEFT adapter folder or an RWKV-PEFT .pth")
    ap.add_argument("--state", type=Path, default=None,
                    help="a tuned initial state .pth (blocks.N.att.time_state), ai00 only")
    ap.add_argument("--out", type=Path, default=None,
                    help="output path (default: runs/<run>/export/<run>-<dtype>.gguf|-hf|.st, or "
                         "models/export/...)")
    ap.add_argument("--dtype", default=None,
                    help="gguf: f16 (default) bf16 q8_0 f32; hf: bf16 (default) fp16 fp32; ai00: fp16")
    ap.add_argument("--verify", choices=("auto", "require", "off"), default="auto",
                    help="runtime check in llama.cpp (gguf): auto = when built "
                         "(./scripts/llama_cpp_venv.sh), require, off")
    args = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    if args.adapter is not None and not args.adapter.exists():
        print(f"error: --adapter {args.adapter}: not found (give runs/<run>, a PEFT adapter "
              "folder or an RWKV-PEFT .pth).", file=sys.stderr)
        return 2
    base = args.base
    if base is None and args.adapter is not None:
        trained_on = runs.run_base_model(runs.run_config(runs.run_of(resolve_adapter_path(args.adapter))))
        base = str(trained_on) if trained_on else None
    try:
        if base is None:
            res = config.resolve()
            base = str(resolve_base_model(res.settings.base_model, res.sources["BASE_MODEL"],
                                          say=log)[0])
        else:
            p = paths.resolve(base, "cli")
            if not p.exists():
                raise ExportError(f"--base-model {base}: not found at {p} (give a .pth or an HF "
                                  "RWKV-7 folder).")
            base = str(p)
        rep = export(args.format, base, args.adapter, args.out, args.dtype, args.state,
                     args.verify, log=log)
    except (ExportError, MergeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported: {rep['output']}")
    for f in rep["files"][1:] if args.format != "hf" else []:
        print(f"also: {Path(rep['output']).with_name(f)}")
    print(f"verification: {rep['report_path']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# Create or update the workspace environment in .venv/ (safe to run again).
#
#   ./scripts/bootstrap.sh                 # runtime deps + marimo, torch picked from the GPU (or CPU)
#   ./scripts/bootstrap.sh --dev           # + test / benchmark tools (pytest, openai, ...)
#   ./scripts/bootstrap.sh --with-upstream # + clone RWKV-PEFT and Albatross into third_party/
#
# torch: TORCH_SPEC / TORCH_INDEX_URL (configs/workspace.env or the environment) win.
# Otherwise: no nvidia-smi -> the CPU build, never CUDA wheels; with a GPU the CUDA build is
# picked by its compute capability (torch_route below). The choice and its reason are printed.
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

WITH_DEV=0
WITH_UPSTREAM=0
TORCH_VERSION_DEFAULT="2.13.0"
# Pinned upstream refs (optional back-ends; bump deliberately).
RWKV_PEFT_REPO="https://github.com/JL-er/RWKV-PEFT.git"
RWKV_PEFT_REF="14688d1f0e3f751433571698e070d520ad59ea82"
ALBATROSS_REPO="https://github.com/BlinkDL/Albatross.git"
ALBATROSS_REF="b5b43538eaeffcb66249807074a3bf872c12da56"
CUDA_INDEX_BASE="https://download.pytorch.org/whl"

usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dev) WITH_DEV=1 ;;
    --with-upstream) WITH_UPSTREAM=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown option '$1' (see --help)" ;;
  esac
  shift
done

PY_BOOT="${PYTHON:-python3}"
require_cmd "$PY_BOOT" "install Python 3.10+ (3.11 recommended)"
"$PY_BOOT" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)' \
  || die "Python 3.10+ is required; found $("$PY_BOOT" --version 2>&1)"

cd "$ROOT_DIR"
mkdir -p models/base models/merged data/raw data/processed runs logs third_party

if [[ ! -f configs/workspace.env ]]; then
  cp configs/workspace.env.example configs/workspace.env
  info "created configs/workspace.env from the example (edit it for your model and data)"
fi

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  info "creating virtual environment in $VENV_DIR"
  "$PY_BOOT" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check)

# ---- fla-core + triton: the CUDA WKV kernel (model/wkv.py's wkv_fla) ----------------------
# A CUDA torch brings the triton it was built with (torch 2.13.0: triton 3.7.1); fla-core is
# picked to match that triton, and triton is pinned while it installs. A CPU torch has no
# triton: the runtime environment stays without both (a CPU run never imports them); --dev
# installs the pair CI runs fla's kernels with under Triton's interpreter (tests/test_wkv_fla.py).
# Pairs run under the interpreter (tests/fla_interpreter.py): fla-core 0.6.0 with triton
# 3.7.1 and 3.9.0; 0.5.2 with 3.8.0 (issue 21's probe). 0.5.2 + triton 3.9 fails at import.
FLA_DEV_TRITON="3.9.0"
fla_for_triton() {
  case "$1" in
    3.9.*) printf '0.6.0' ;;
    3.8.*) printf '0.5.2' ;;
    3.7.*) printf '0.6.0' ;;
    *) printf '' ;;
  esac
}
install_fla() {
  local triton_req triton_ver fla_ver pins
  triton_req="$("$PY" -c 'import importlib.metadata as m; print(next((r.split(";")[0] for r in m.requires("torch") or [] if r.startswith("triton")), ""))')"
  if [[ -n "$triton_req" ]]; then
    triton_ver="$("$PY" -c 'import importlib.metadata as m; print(m.version("triton"))' 2>/dev/null || true)"
  elif [[ "$WITH_DEV" == 1 ]]; then
    triton_ver="$FLA_DEV_TRITON"
  else
    info "fla-core: not installed (CPU torch: training uses the C / chunked WKV kernels)"
    return 0
  fi
  fla_ver="$(fla_for_triton "$triton_ver")"
  if [[ -z "$fla_ver" ]]; then
    info "WARNING: no fla-core known to work with triton ${triton_ver:-?} (torch needs '$triton_req'); training on the GPU uses the slower chunked WKV kernel"
    return 0
  fi
  pins="$VENV_DIR/fla-constraints.txt"
  { cat "$CONSTRAINTS"; printf 'triton==%s\n' "$triton_ver"; } >"$pins"
  info "fla-core $fla_ver + triton $triton_ver (the CUDA WKV kernel${triton_req:+; torch needs $triton_req})"
  # fla-core 0.6.0 imports packaging without declaring it
  if ! "${PIP[@]}" install --quiet -c "$pins" "triton==$triton_ver" "fla-core==$fla_ver" packaging einops; then
    info "WARNING: fla-core could not be installed (see above): GPU training falls back to the chunked WKV kernel and says so; tests/test_wkv_fla.py skips"
  fi
}

# ---- torch CUDA build by compute capability ------------------------------------------------
# The CUDA builds torch 2.13.0 publishes on download.pytorch.org (x86_64) and the GPUs they
# carry kernels for (SASS only, no PTX; a cubin runs on the same major with a higher minor):
#   cu126: sm_50 60 70 75 80 86 90                (CUDA 12.6: Maxwell .. Hopper)
#   cu129: sm_75 80 86 90 100 120                 (Linux only; the last CUDA 12 build)
#   cu130: sm_75 80 86 90 100 120                 (== the default PyPI wheel)
#   cu132: sm_75 80 86 90 100 120
# cu128 ended with torch 2.11.0 and CUDA 11.8 long before. So Blackwell (major >= 10: B200
# sm_100, B300 sm_103, RTX 50 sm_120, GB10 sm_121) needs cu129 or newer: cu130 when the
# driver runs CUDA 13 (driver >= 580), else cu129 (any CUDA 12 driver that sees the card);
# Turing .. Hopper keep cu126, which runs on the widest range of drivers, and Maxwell / Pascal /
# Volta (dropped by the CUDA 13 builds) have only cu126. Older than sm_50: no torch 2.13 build.
# torch_route CAP [DRIVER_CUDA] -> "INDEX<TAB>reason" (INDEX: cu126 | cu129 | cu130 | cpu).
torch_route() {
  local cap="$1" drv="${2:-}" major minor drv_major
  major="${cap%%.*}"
  minor="${cap#*.}"
  [[ "$minor" == "$cap" ]] && minor=0
  if ! [[ "$major" =~ ^[0-9]+$ && "$minor" =~ ^[0-9]+$ ]]; then
    printf 'cpu\tcompute capability %s could not be read from nvidia-smi: CPU build' "$cap"
    return 0
  fi
  drv_major="${drv%%.*}"
  [[ "$drv_major" =~ ^[0-9]+$ ]] || drv_major=0
  if ((major >= 10)); then
    if ((drv_major >= 13)); then
      printf 'cu130\tsm_%s%s (Blackwell) needs a CUDA 12.9+ build; the driver runs CUDA %s: cu130' \
        "$major" "$minor" "$drv"
    else
      printf 'cu129\tsm_%s%s (Blackwell) needs a CUDA 12.9+ build (torch 2.13.0 has no cu128); the driver runs CUDA %s (cu130 needs driver 580+): cu129' \
        "$major" "$minor" "${drv:-?}"
    fi
  elif ((major >= 5)); then
    printf 'cu126\tsm_%s%s is in the CUDA 12.6 build (sm_50 .. sm_90)' "$major" "$minor"
  else
    printf 'cpu\tsm_%s%s is older than any torch 2.13.0 CUDA build supports (sm_50+): CPU build' \
      "$major" "$minor"
  fi
}

# Skip the slow part when nothing changed since the last successful bootstrap.
STAMP="$VENV_DIR/.rwkvforge-bootstrap"
stamp_value() {
  {
    sha256sum pyproject.toml "${BASH_SOURCE[0]}"
    printf 'dev=%s torch_spec=%s index=%s\n' "$WITH_DEV" "$(env_get TORCH_SPEC)" "$(env_get TORCH_INDEX_URL)"
  } | sha256sum | cut -d' ' -f1
}
STAMP_NOW="$(stamp_value)"  # before TORCH_SPEC & co. are assigned below
if [[ -f "$STAMP" ]] && [[ "$(cat "$STAMP")" == "$STAMP_NOW" ]] \
  && "$PY" -c 'import rwkvforge, torch' 2>/dev/null; then
  info "environment up to date ($VENV_DIR)"
else
  "${PIP[@]}" install --quiet --upgrade pip wheel setuptools

  # ---- choose torch ----------------------------------------------------------------
  TORCH_SPEC="$(env_get TORCH_SPEC)"
  TORCH_INDEX_URL="$(env_get TORCH_INDEX_URL)"
  reason=""
  if [[ -n "$TORCH_SPEC" || -n "$TORCH_INDEX_URL" ]]; then
    reason="TORCH_SPEC / TORCH_INDEX_URL set in configs/workspace.env or the environment"
    TORCH_SPEC="${TORCH_SPEC:-torch==$TORCH_VERSION_DEFAULT}"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n1 | tr -d ' ')"
    gpu="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)"
    # the highest CUDA version the driver runs ("CUDA Version: 12.8" in nvidia-smi's header)
    drv_cuda="$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: *[0-9.]*' | grep -o '[0-9.]*$' || true)"
    TORCH_SPEC="torch==$TORCH_VERSION_DEFAULT"
    route="$(torch_route "$cap" "$drv_cuda")"
    TORCH_INDEX_URL="$CUDA_INDEX_BASE/${route%%$'\t'*}"
    reason="$gpu: ${route#*$'\t'}"
    if [[ "${route%%$'\t'*}" == cpu ]]; then
      info "WARNING: $reason"
    fi
  else
    TORCH_SPEC="torch==$TORCH_VERSION_DEFAULT"
    reason="no NVIDIA GPU (nvidia-smi not found): CPU build, no CUDA wheels"
    # If the default index would resolve a CUDA build (it pulls nvidia-* wheels), use the
    # CPU index instead. A local CPU wheel (pip find-links) is taken as it is.
    report="$(mktemp)"
    if "${PIP[@]}" install --quiet --dry-run --ignore-installed --report "$report" "$TORCH_SPEC" >/dev/null 2>&1 \
      && grep -q '"name": "nvidia-' "$report"; then
      TORCH_INDEX_URL="$CUDA_INDEX_BASE/cpu"
    fi
    rm -f "$report"
  fi
  info "torch: $TORCH_SPEC${TORCH_INDEX_URL:+ from $TORCH_INDEX_URL} — $reason"
  if [[ -n "$TORCH_INDEX_URL" ]]; then
    "${PIP[@]}" install --quiet "$TORCH_SPEC" --index-url "$TORCH_INDEX_URL"
  else
    "${PIP[@]}" install --quiet "$TORCH_SPEC"
  fi

  # Pin whatever torch is now installed so no later requirement can swap the build.
  CONSTRAINTS="$VENV_DIR/torch-constraints.txt"
  "$PY" -c 'import torch; print("torch==" + torch.__version__)' >"$CONSTRAINTS"
  info "pinned $(cat "$CONSTRAINTS") for every later install"

  extras="[notebooks]" # marimo: notebooks/ run in this environment
  [[ "$WITH_DEV" == 1 ]] && extras="[notebooks,dev]"
  info "installing rwkvforge$extras (editable) and its dependencies"
  "${PIP[@]}" install --quiet -c "$CONSTRAINTS" -e ".$extras"
  install_fla
  # deepspeed's build imports torch: build it against the installed one.
  "${PIP[@]}" install --quiet -c "$CONSTRAINTS" --no-build-isolation "deepspeed==0.19.8" \
    || info "deepspeed could not be installed (multi-GPU training unavailable); see the log above"
  printf '%s\n' "$STAMP_NOW" >"$STAMP"
fi

# ---- optional upstream checkouts -----------------------------------------------------
clone_pinned() {
  local name="$1" url="$2" ref="$3" dest="third_party/$1"
  if [[ -d "$dest/.git" ]]; then
    info "$name already in $dest"
    return 0
  fi
  if timeout 120 git clone --quiet --filter=blob:none "$url" "$dest.tmp" >/dev/null 2>&1 \
    && git -C "$dest.tmp" checkout --quiet "$ref" >/dev/null 2>&1; then
    mv "$dest.tmp" "$dest"
    info "$name cloned at $ref into $dest"
  else
    rm -rf "$dest.tmp"
    info "$name: could not clone $url (no network?) — skipped; it is optional"
  fi
}
if [[ "$WITH_UPSTREAM" == 1 ]]; then
  clone_pinned RWKV-PEFT "$RWKV_PEFT_REPO" "$RWKV_PEFT_REF"
  clone_pinned Albatross "$ALBATROSS_REPO" "$ALBATROSS_REF"
fi

info "done. Next: ./scripts/healthcheck.sh"

#!/usr/bin/env bash
# Build llama-cpp-python (the llama.cpp runtime that `rwkvforge export --format gguf` checks its
# files with) from source, once, into its own venv under the user's cache folder:
#   ${XDG_CACHE_HOME:-~/.cache}/rwkvforge/llama-cpp-0.3.36-venv   (RWKVFORGE_LLAMA_CPP_VENV overrides)
# It never touches the workspace .venv (no torch there: numpy, jinja2 and llama.cpp only).
# Needs cmake and a C++ compiler; takes ~6 minutes on 2 cores. A second call returns at once.
#
#   ./scripts/llama_cpp_venv.sh            # build if missing, print the venv's python
#   ./scripts/llama_cpp_venv.sh --check    # exit 0 if built, 1 if not (builds nothing)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

VERSION=0.3.36
CACHE="${XDG_CACHE_HOME:-$HOME/.cache}/rwkvforge"
DEST="${RWKVFORGE_LLAMA_CPP_VENV:-$CACHE/llama-cpp-$VERSION-venv}"

if [[ -f "$DEST/.complete" && -x "$DEST/bin/python" ]]; then
  echo "$DEST/bin/python"
  exit 0
fi
[[ "${1:-}" == "--check" ]] && exit 1

require_cmd cmake "install cmake (Debian: apt-get install cmake)"
command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 \
  || die "no C++ compiler found — install one (Debian: apt-get install g++)"
PY="$(venv_python 2>/dev/null || command -v python3)"

mkdir -p "$(dirname "$DEST")"
exec 9>"$DEST.lock"
flock 9  # one build at a time (parallel test sessions wait for the first)
if [[ -f "$DEST/.complete" ]]; then
  echo "$DEST/bin/python"
  exit 0
fi
TMP="$DEST.building"
rm -rf "$TMP"
info "building llama-cpp-python $VERSION from source into $DEST (several minutes) ..."
start=$SECONDS
"$PY" -m venv "$TMP"
"$TMP/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
# GGML_NATIVE=OFF: a portable build (the cache may be shared between machines of one kind)
CMAKE_ARGS="-DGGML_NATIVE=OFF ${CMAKE_ARGS:-}" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
  "$TMP/bin/python" -m pip install --quiet --disable-pip-version-check --no-cache-dir \
  "llama-cpp-python==$VERSION"
"$TMP/bin/python" -c "import llama_cpp; print(llama_cpp.__version__)" >/dev/null
rm -rf "$DEST"
mv "$TMP" "$DEST"
# a venv's scripts name its folder; `bin/python -c` (all rwkvforge uses) works after the move
date -u +%FT%TZ >"$DEST/.complete"
info "llama-cpp-python $VERSION built in $((SECONDS - start)) s"
echo "$DEST/bin/python"

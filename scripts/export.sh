#!/usr/bin/env bash
# Export a (tuned) model for other runtimes, verified: GGUF for llama.cpp / Ollama / LM Studio,
# the Hugging Face RWKV-7 layout, or ai00's safetensors. Nothing is written unless it checks out.
#
#   ./scripts/export.sh --format gguf --adapter runs/<run>                  # f16 + Ollama Modelfile
#   ./scripts/export.sh --format gguf --dtype q8_0 --adapter runs/<run>
#   ./scripts/export.sh --format hf --base-model models/base/X.pth --out out/x-hf
#   ./scripts/export.sh --format ai00 --adapter runs/<run>
#
# The llama.cpp check needs ./scripts/llama_cpp_venv.sh once (builds llama-cpp-python).
# All options: ./scripts/export.sh --help   (same as `rwkvforge export --help`)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_stage export "$@"

#!/usr/bin/env bash
# Merge an adapter into its full-precision base model, verified (logits vs base + adapter, and
# a load-and-run check in the `rwkv` pip package). No output file unless every check passes.
#
#   ./scripts/merge_lora.sh --adapter runs/<run>/adapter                 # base from the run
#   ./scripts/merge_lora.sh --base-model models/base/X.pth --adapter runs/<run>/adapter --dtype fp16
#   ./scripts/merge_lora.sh --base-model X.pth --adapter rwkv-peft-out/rwkv-0.pth --alpha 32 --safetensors
#
# All options: ./scripts/merge_lora.sh --help   (same as `rwkvforge merge --help`)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_stage merge "$@"

#!/usr/bin/env bash
# Train a LoRA adapter with the lora-bf16 profile (configs/profile/lora-bf16.env); the three
# train_*.sh scripts differ only in the profile. With BASE_MODEL / DATA_FILE unset this
# trains the embedded demo model on the shipped sample data (a few minutes on a CPU).
#
#   ./scripts/train_lora_bf16.sh
#   ./scripts/train_lora_bf16.sh --model rwkv7-1.5b --max-steps 500 --run-name bsl-lora-bf16
#   ./scripts/train_lora_bf16.sh --resume runs/<run>        # continue from its last checkpoint
#
# All options: ./scripts/train_lora_bf16.sh --help   (same as `rwkvforge train --help`)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_train lora-bf16 "$@"

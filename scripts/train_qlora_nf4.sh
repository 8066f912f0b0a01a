#!/usr/bin/env bash
# Train a LoRA adapter with the qlora-nf4 profile (configs/profile/qlora-nf4.env); the three
# train_*.sh scripts differ only in the profile. With BASE_MODEL / DATA_FILE unset this
# trains the embedded demo model on the shipped sample data (a few minutes on a CPU).
#
#   ./scripts/train_qlora_nf4.sh
#   ./scripts/train_qlora_nf4.sh --model rwkv7-1.5b --max-steps 500 --run-name bsl-qlora-nf4
#   ./scripts/train_qlora_nf4.sh --resume runs/<run>        # continue from its last checkpoint
#
# All options: ./scripts/train_qlora_nf4.sh --help   (same as `rwkvforge train --help`)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_train qlora-nf4 "$@"

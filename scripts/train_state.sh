#!/usr/bin/env bash
# State tuning with the state profile (configs/profile/state.env): every weight frozen, the
# initial WKV state of each layer trained; the run writes runs/<run>/state/. With BASE_MODEL /
# DATA_FILE unset this tunes the embedded demo model on the shipped sample data.
#
#   ./scripts/train_state.sh
#   ./scripts/train_state.sh --model rwkv7-1.5b --max-steps 500 --run-name bsl-state
#   ./scripts/train_state.sh --train-type lora+state --state-lr 1   # a LoRA adapter as well
#   ./scripts/train_state.sh --resume runs/<run>        # continue from its last checkpoint
#
# All options: ./scripts/train_state.sh --help   (same as `rwkvforge train --help`)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_train state "$@"

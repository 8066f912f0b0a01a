#!/usr/bin/env bash
# Turn a JSONL into training data: binidx (text), masked SFT examples or DPO pairs.
# Settings come from configs/ (DATA_FILE, DATA_TYPE, DATA_PREFIX, CTX_LEN, VAL_FRACTION, SEED);
# flags override them. Prints documents, tokens, magic prime and steps per epoch.
#   ./scripts/prepare_binidx.sh --input data/raw/corpus.jsonl --type text --ctx-len 4096
#   ./scripts/prepare_binidx.sh --type sft              # the shipped sample data
#   ./scripts/prepare_binidx.sh --help
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_stage prepare "$@"

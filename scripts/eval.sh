#!/usr/bin/env bash
# Evaluate a run: validation loss / perplexity and prompt-check pass rate for the base and the
# tuned model, plus side-by-side answers. Writes runs/<run>/eval/eval.json and report.md.
#
#   ./scripts/eval.sh --run runs/<run>
#   ./scripts/eval.sh --run runs/<run> --tuned runs/<run>/merged/<run>-bf16.pth
#   ./scripts/eval.sh --run runs/<run> --val data/samples/bsl_sft.jsonl --checks data/samples/bsl_checks.jsonl
#
# All options: ./scripts/eval.sh --help   (same as `rwkvforge eval --help`)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_stage eval "$@"

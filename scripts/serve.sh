#!/usr/bin/env bash
# OpenAI-compatible server over the configured model (BASE_MODEL, or the demo model).
#   ./scripts/serve.sh                                   # http://127.0.0.1:8000/v1
#   ./scripts/serve.sh --base-model models/merged/my.pth --serve-port 8080
#   SERVE_API_KEY=secret ./scripts/serve.sh --serve-host 0.0.0.0
# Options: ./scripts/serve.sh --help (same as `rwkvforge serve --help`).
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
run_stage serve "$@"

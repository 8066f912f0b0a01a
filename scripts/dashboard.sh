#!/usr/bin/env bash
# Bilingual web dashboard (English / 中文): runs, live curves, compare, data, chat, system.
# Binds 127.0.0.1 (port DASHBOARD_PORT, default 8501); reads run folders, never writes them.
#
#   ./scripts/dashboard.sh                 # http://127.0.0.1:8501
#   ./scripts/dashboard.sh --port 8502
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

run_stage dashboard "$@"

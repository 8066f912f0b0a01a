#!/usr/bin/env bash
# Check the environment: OS / WSL2, GPU + driver + compute capability, torch kernels for it,
# bitsandbytes (and the GPU code in its CUDA library), deepspeed (and whether DEEPSPEED_OFFLOAD's
# CPU Adam can be built), fla, disk, Python and package versions.
# Exit code: 0 = ready, 1 = warnings only, 2 = blockers. Each finding says what to do.
#
#   ./scripts/healthcheck.sh          # human report
#   ./scripts/healthcheck.sh --json   # machine-readable (stable schema)
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

if [[ ! -x "$VENV_DIR/bin/python" ]]; then
  printf 'blocker: no environment at %s\n  fix: run ./scripts/bootstrap.sh\n' "$VENV_DIR" >&2
  exit 2
fi
exec "$VENV_DIR/bin/python" -m rwkvforge.cli doctor "$@"

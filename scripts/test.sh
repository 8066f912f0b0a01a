#!/usr/bin/env bash
# Run the test suite: bootstraps .venv with the dev extras when needed, installs the
# system tools some tests use (shellcheck, chromium) from Debian's packages when missing
# and possible, runs ruff, then pytest. Extra arguments go to pytest.
#
#   ./scripts/test.sh                 # everything (slow tests included), as CI runs it
#   ./scripts/test.sh -m "not slow"   # the quick subset
#   ./scripts/test.sh tests/test_config.py -x
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$ROOT_DIR"

"$ROOT_DIR/scripts/bootstrap.sh" --dev

apt_install() {
  # apt_install CMD PACKAGE...: install Debian packages when CMD is missing and we can.
  local cmd="$1"
  shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
    info "installing $* (Debian packages) for the tests"
    if ! { apt-get install -y -qq "$@" >/dev/null 2>&1 \
      || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq "$@" >/dev/null 2>&1; }; }; then
      info "could not install $*; tests that need it will say so"
    fi
  else
    info "$cmd not found and not root: tests that need it will say so"
  fi
}
apt_install shellcheck shellcheck
apt_install chromium chromium
apt_install clang clang  # the C kernels are also built and checked with clang
# A CJK font so the Chinese dashboard screenshots show characters, not boxes.
[[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ]] || apt_install fc-cjk-font-missing fonts-wqy-microhei

PY="$(venv_python)"
# lint first: the rules are [tool.ruff] in pyproject.toml (seconds; a finding stops the run)
info "ruff check (pyproject.toml [tool.ruff])"
"$PY" -m ruff check --quiet src tests bench notebooks scripts
mkdir -p "$ROOT_DIR/.test-artifacts"
exec "$PY" -m pytest "$@"

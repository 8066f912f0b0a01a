#!/usr/bin/env bash
# Shared helpers for the scripts in scripts/: ROOT_DIR, die, require_file, env loading and
# the Python of the workspace venv. Source it; don't run it.
#   source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# The workspace root: two levels above this file (scripts/lib/common.sh).
ROOT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export ROOT_DIR
export RWKVFORGE_ROOT="${RWKVFORGE_ROOT:-$ROOT_DIR}"
VENV_DIR="${VENV_DIR:-$ROOT_DIR/.venv}"

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

info() {
  printf '[rwkvforge] %s\n' "$*" >&2
}

require_file() {
  # require_file PATH [what to do]
  [[ -f "$1" ]] || die "missing file: $1${2:+ — $2}"
}

require_cmd() {
  command -v "$1" >/dev/null 2>&1 || die "'$1' not found on PATH${2:+ — $2}"
}

# Read KEY=value lines from an .env file without executing it (no `source`): the file is
# data, so a value like $(rm -rf ~) is never run. Prints "KEY<TAB>value" lines.
# Full validation (unknown keys, types, shell syntax) is done by `rwkvforge config`.
read_env_file() {
  # The same reading as rwkvforge.config.parse_env_text: a UTF-8 byte-order mark and
  # indentation are allowed, a ` # comment` outside quotes ends the value.
  local file="$1" line key val q ch i n=0
  [[ -f "$file" ]] || return 0
  while IFS= read -r line || [[ -n "$line" ]]; do
    n=$((n + 1))
    line="${line%$'\r'}"
    [[ $n -eq 1 ]] && line="${line#$'\xef\xbb\xbf'}"
    line="${line#"${line%%[![:space:]]*}"}"
    [[ -z "$line" || "$line" == \#* ]] && continue
    [[ "$line" =~ ^([A-Z][A-Z0-9_]*)=(.*)$ ]] || die "$file:$n: bad line: $line"
    key="${BASH_REMATCH[1]}"
    val="${BASH_REMATCH[2]}"
    q=""
    for ((i = 0; i < ${#val}; i++)); do
      ch="${val:i:1}"
      if [[ -n "$q" ]]; then
        [[ "$ch" == "$q" ]] && q=""
      elif [[ "$ch" == '"' || "$ch" == "'" ]]; then
        q="$ch"
      elif [[ "$ch" == "#" ]] && { ((i == 0)) || [[ "${val:i-1:1}" == [[:space:]] ]]; }; then
        val="${val:0:i}"
        break
      fi
    done
    val="${val%"${val##*[![:space:]]}"}"
    if [[ "$val" =~ ^\"(.*)\"$ || "$val" =~ ^\'(.*)\'$ ]]; then
      val="${BASH_REMATCH[1]}"
    fi
    printf '%s\t%s\n' "$key" "$val"
  done <"$file"
}

# env_get KEY [default]: value of KEY from the environment, else configs/workspace.env
# (or its .example), else the default. Model / profile layers are resolved in Python.
env_get() {
  local key="$1" def="${2:-}" file k v found=""
  if [[ -n "${!key+x}" ]]; then
    printf '%s' "${!key}"
    return 0
  fi
  file="$ROOT_DIR/configs/workspace.env"
  [[ -f "$file" ]] || file="$ROOT_DIR/configs/workspace.env.example"
  local lines
  lines="$(read_env_file "$file")" || exit 1 # a bad line: read_env_file said which
  while IFS=$'\t' read -r k v; do
    if [[ "$k" == "$key" ]]; then
      found="$v"
    fi
  done <<<"$lines"
  printf '%s' "${found:-$def}"
}

# The workspace Python: .venv when bootstrapped, else fail with what to do.
venv_python() {
  if [[ -x "$VENV_DIR/bin/python" ]]; then
    printf '%s' "$VENV_DIR/bin/python"
  else
    die "no environment at $VENV_DIR — run ./scripts/bootstrap.sh first"
  fi
}

# ensure_env: bootstrap once if the venv is missing, then print its python.
ensure_env() {
  if [[ ! -x "$VENV_DIR/bin/python" ]] || ! "$VENV_DIR/bin/python" -c 'import rwkvforge' 2>/dev/null; then
    info "no working environment yet: running scripts/bootstrap.sh"
    "$ROOT_DIR/scripts/bootstrap.sh" >&2
  fi
  venv_python
}

# run_stage STAGE [args...]: exec `python -m rwkvforge.cli STAGE args...` in the venv.
run_stage() {
  local py
  py="$(ensure_env)"
  exec "$py" -m rwkvforge.cli "$@"
}

# run_train PROFILE [args...]: `rwkvforge train --profile PROFILE args...`; with --resume the
# profile is left out, a resumed run keeps its own (runs/<run>/config.json).
run_train() {
  local profile="$1" arg
  shift
  for arg in "$@"; do
    if [[ "$arg" == "--profile" || "$arg" == --profile=* ]]; then
      die "this script trains the $profile profile; for another use its own train_*.sh or \`rwkvforge train --profile NAME\`"
    fi
  done
  for arg in "$@"; do
    if [[ "$arg" == "--resume" || "$arg" == --resume=* ]]; then
      run_stage train "$@"
    fi
  done
  run_stage train --profile "$profile" "$@"
}

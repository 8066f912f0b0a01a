#!/usr/bin/env bash
# The main job end to end on the embedded default (or on your configured model and data):
# bootstrap -> prepare -> train (QLoRA nf4) -> merge (verified) -> eval (base vs tuned) -> chat.
#
#   ./scripts/quickstart.sh                       # demo model + shipped 1C sample, CPU: minutes
#   ./scripts/quickstart.sh --profile lora-bf16   # another profile; other flags go to `train`
set -euo pipefail
# shellcheck source=lib/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
cd "$ROOT_DIR"

profile_names() {
  local f names=()
  for f in configs/profile/*.env; do
    f="${f##*/}"
    names+=("${f%.env}")
  done
  printf '%s' "${names[*]}"
}

PROFILE="qlora-nf4"
name_arg=""
runs_arg="" # not RUNS_DIR: env_get RUNS_DIR reads a set variable of that name first
args=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --profile) [[ $# -ge 2 ]] || die "--profile needs a value"; PROFILE="$2"; shift ;;
    --profile=*) PROFILE="${1#*=}" ;;
    # the run's folder is needed by the later steps: taken here, passed on to `train`
    --run-name) [[ $# -ge 2 ]] || die "--run-name needs a value"; name_arg="$2"; shift ;;
    --run-name=*) name_arg="${1#*=}" ;;
    --runs-dir) [[ $# -ge 2 ]] || die "--runs-dir needs a value"; runs_arg="$2"; shift ;;
    --runs-dir=*) runs_arg="${1#*=}" ;;
    -h | --help) sed -n '2,6p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [[ "$PROFILE" == *.env || "$PROFILE" == */* ]]; then
  require_file "$PROFILE" "give a profile name (one of: $(profile_names)) or an existing .env file"
  PROFILE_NAME="$(basename "$PROFILE" .env)"
else
  require_file "configs/profile/$PROFILE.env" "profiles: $(profile_names)"
  PROFILE_NAME="$PROFILE"
fi

PY="$(ensure_env)"
RUN_NAME="${name_arg:-quickstart-$PROFILE_NAME-$(date +%Y%m%d-%H%M%S)}"
RUNS_DIR="${runs_arg:-$(env_get RUNS_DIR runs)}"
RUN_DIR="$RUNS_DIR/$RUN_NAME"

info "1/5 prepare + train ($PROFILE) -> $RUN_DIR"
"$PY" -m rwkvforge.cli train --profile "$PROFILE" --run-name "$RUN_NAME" --runs-dir "$RUNS_DIR" \
  ${args[@]+"${args[@]}"}
require_file "$RUN_DIR/adapter/adapter_config.json" "training did not write an adapter; see $RUN_DIR/train.log"

info "2/5 merge the adapter into the full-precision base (self-verified)"
"$PY" -m rwkvforge.cli merge --adapter "$RUN_DIR/adapter"
MERGED="$("$PY" -m rwkvforge.runs merged-path "$RUN_DIR")"
require_file "$MERGED" "merge wrote no model; see its output above"

info "3/5 evaluate base vs tuned"
"$PY" -m rwkvforge.cli eval --run "$RUN_DIR"

# a question from the data used (its first held-out one; the 1C question for the demo data);
# text data: the start of a held-out document, completed as plain text
ASK="$("$PY" -m rwkvforge.runs chat-prompt "$RUN_DIR")"
MODE="${ASK%%$'\n'*}"
PROMPT="${ASK#*$'\n'}"
raw=()
[[ "$MODE" == raw ]] && raw=(--raw)
info "4/5 ask the merged model${raw[*]+ (plain completion)}: $PROMPT"
"$PY" -m rwkvforge.cli infer --base-model "$MERGED" --max-tokens 80 ${raw[@]+"${raw[@]}"} \
  --prompt "$PROMPT"

info "5/5 done. Run folder: $RUN_DIR (report: $RUN_DIR/eval/report.md)"
info "next: ./scripts/dashboard.sh   |   ./scripts/serve.sh --base-model $(printf %q "$MERGED")"
